"""Overlap metrics for evaluating label maps."""
from typing import Dict, Sequence

import numpy as np
import SimpleITK as sitk

from .preprocessing import CLASS_NAMES


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty (undefined, so averages can skip it)."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    denominator = int(pred.sum()) + int(truth.sum())
    if denominator == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(pred, truth).sum()) / denominator


def dice_per_class(pred: np.ndarray, truth: np.ndarray, classes: Sequence[int] = (1, 2)) -> Dict[str, float]:
    """Dice for each foreground class of two label arrays of equal shape, keyed by class name."""
    if pred.shape != truth.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs truth {truth.shape}")
    return {CLASS_NAMES[k]: dice(pred == k, truth == k) for k in classes}


def same_geometry(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    """True when two images share size, spacing, origin and direction (within ``tolerance``)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)
    )


def on_grid_of(labels: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """``labels`` resampled onto ``reference``'s grid by nearest neighbour (as is, if already there)."""
    if same_geometry(labels, reference):
        return labels
    return sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


def evaluate_images(pred: sitk.Image, truth: sitk.Image) -> Dict[str, float]:
    """Per-class Dice of a predicted label image against a truth image, on the truth's grid."""
    pred = on_grid_of(pred, truth)
    return dice_per_class(sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(truth))
