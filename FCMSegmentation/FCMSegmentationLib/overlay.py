"""PNG overlays of a segmentation on its image (numpy + SimpleITK only, so the engine can draw them)."""
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .imageio import SEGMENT_COLORS, atomic_path
from .metrics import on_grid_of

OPACITY = 0.45


def _window(array: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((array - low) / max(high - low, 1e-6), 0.0, 1.0)


def _isotropic_slice(image: sitk.Image, axis: int, index: int, linear: bool) -> np.ndarray:
    """A (rows, cols) slice through ``image`` perpendicular to ``axis`` (0 z, 1 y), aspect-corrected."""
    array = sitk.GetArrayViewFromImage(image)
    plane = array[index] if axis == 0 else array[:, index, :][::-1]  # coronal: head up
    spacing = image.GetSpacing()
    row_mm, col_mm = (spacing[1], spacing[0]) if axis == 0 else (spacing[2], spacing[0])
    rows = max(1, int(round(plane.shape[0] * row_mm / col_mm)))
    if rows == plane.shape[0]:
        return np.asarray(plane, dtype=np.float32)
    positions = np.linspace(0, plane.shape[0] - 1, rows)
    if linear:
        lo = np.floor(positions).astype(int)
        hi = np.minimum(lo + 1, plane.shape[0] - 1)
        t = (positions - lo)[:, None]
        return (plane[lo] * (1 - t) + plane[hi] * t).astype(np.float32)
    return np.asarray(plane[np.rint(positions).astype(int)], dtype=np.float32)


def overlay_panel(background: np.ndarray, labels: np.ndarray,
                  colors: Sequence[Tuple[float, float, float]]) -> np.ndarray:
    """RGB uint8 image: grey ``background`` in [0, 1] with label k tinted ``colors[k-1]``."""
    rgb = np.repeat(background[..., None], 3, axis=2)
    for k, color in enumerate(colors, start=1):
        where = labels == k
        rgb[where] = (1 - OPACITY) * rgb[where] + OPACITY * np.array(color)
    return (rgb * 255).astype(np.uint8)


def write_overlay(path: Path, labels: sitk.Image, ct: Optional[sitk.Image], spect: sitk.Image,
                  truth: Optional[sitk.Image] = None) -> Path:
    """Write a PNG: axial and coronal slices through the labels' grid, CT (or SPECT) underneath,
    SPECT in a second row, truth in a third row when given. Slices pass through the lesion-richest
    axial plane and the bone-richest coronal plane."""
    reference = labels
    under = on_grid_of(sitk.Cast(ct, sitk.sitkFloat32), reference) if ct is not None else None
    hot = sitk.Resample(sitk.Cast(spect, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkLinear, 0.0)
    label_array = sitk.GetArrayViewFromImage(labels)
    lesion = label_array == 2
    axial = int(np.argmax(lesion.sum(axis=(1, 2)))) if lesion.any() else label_array.shape[0] // 2
    coronal = int(np.argmax((label_array >= 1).sum(axis=(0, 2))))
    spect_high = float(np.percentile(sitk.GetArrayViewFromImage(hot), 99.5)) or 1.0
    rows = []
    layers = [("labels", labels)] + ([("truth", truth)] if truth is not None else [])
    for _, label_image in layers:
        label_image = on_grid_of(label_image, reference)
        panels = []
        for axis, index in ((0, axial), (1, coronal)):
            base = (_window(_isotropic_slice(under, axis, index, True), -400, 1400) if under is not None
                    else _window(_isotropic_slice(hot, axis, index, True), 0, spect_high))
            panels.append(overlay_panel(base, _isotropic_slice(label_image, axis, index, False), SEGMENT_COLORS))
            panels.append(overlay_panel(_window(_isotropic_slice(hot, axis, index, True), 0, spect_high),
                                        _isotropic_slice(label_image, axis, index, False) * 0, SEGMENT_COLORS))
        rows.append(_hstack(panels))
    picture = _vstack(rows)
    with atomic_path(path) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(picture, isVector=True), str(tmp))
    return Path(path)


def _hstack(panels: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, gap), (0, 0))) for p in panels]
    return np.concatenate(padded, axis=1)


def _vstack(rows: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(padded, axis=0)
