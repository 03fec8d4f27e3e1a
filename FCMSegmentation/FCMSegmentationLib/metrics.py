"""Overlap metrics for evaluating label maps: per-class Dice, and a lesion-by-lesion view."""
from typing import Dict, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

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


def lesion_components(labels: np.ndarray, lesion: int = 2) -> Tuple[np.ndarray, int]:
    """The 26-connected components of ``labels == lesion`` (numbered from 1, 0 elsewhere) and their count."""
    return ndimage.label(labels == lesion, structure=np.ones((3,) * labels.ndim, dtype=bool))


def lesion_detection(pred: np.ndarray, truth: np.ndarray, lesion: int = 2) -> Dict[str, int]:
    """Lesion-level counts of a predicted label array against the truth (equal shapes).

    Lesions are 26-connected components of the lesion label. ``lesions``: true lesions; ``found``: true
    lesions that at least one predicted lesion voxel touches; ``false_lesions``: predicted components
    that touch no true lesion; ``true_voxels``, ``predicted_voxels``, ``overlap_voxels``: for voxel
    precision (overlap / predicted) and recall (overlap / true), which pool over cases without NaNs.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs truth {truth.shape}")
    predicted, actual = pred == lesion, truth == lesion
    true_components, count = lesion_components(truth, lesion)
    found = len(np.setdiff1d(np.unique(true_components[predicted]), [0]))
    predicted_components, predicted_count = lesion_components(pred, lesion)
    touching = len(np.setdiff1d(np.unique(predicted_components[actual]), [0]))
    return {"lesions": int(count), "found": int(found), "false_lesions": int(predicted_count - touching),
            "true_voxels": int(actual.sum()), "predicted_voxels": int(predicted.sum()),
            "overlap_voxels": int((predicted & actual).sum())}


def evaluate_lesions(pred: sitk.Image, truth: sitk.Image) -> Dict[str, int]:
    """:func:`lesion_detection` of a predicted label image against a truth image, on the truth's grid."""
    pred = on_grid_of(pred, truth)
    return lesion_detection(sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(truth))


def pool_lesion_detection(counts: Sequence[Dict[str, int]]) -> Dict[str, float]:
    """Pool :func:`lesion_detection` counts over cases.

    ``sensitivity``: found / true lesions; ``false_lesions_per_case``; ``voxel_precision`` and
    ``voxel_recall`` of all lesion voxels together. A ratio with nothing to divide by is NaN.
    """
    total = {key: sum(c[key] for c in counts) for key in ("lesions", "found", "false_lesions", "true_voxels",
                                                         "predicted_voxels", "overlap_voxels")}

    def ratio(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator else float("nan")

    return {"lesions": total["lesions"], "found": total["found"],
            "sensitivity": ratio(total["found"], total["lesions"]),
            "false_lesions_per_case": ratio(total["false_lesions"], len(counts)),
            "voxel_precision": ratio(total["overlap_voxels"], total["predicted_voxels"]),
            "voxel_recall": ratio(total["overlap_voxels"], total["true_voxels"])}
