"""Which of a phantom's simulated lesions a label map finds, grouped by size and by hot or cold.

The phantoms record every lesion they place (centre, diameter, contrast, hot or cold). A lesion is found
when any predicted lesion voxel touches its true lesion (the 26-connected component of the truth's
lesion label holding its centre; two touching lesions share a component, and so are found together).
"""
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import SimpleITK as sitk

from .common import ENGINE  # noqa: F401  (puts the engine on sys.path)

LESION = 2
#: hot lesions by diameter (mm, lower bound inclusive); cold lesions form one group of their own
HOT_SIZE_GROUPS: Tuple[Tuple[str, float, float], ...] = (
    ("hot, 4–8 mm", 0.0, 8.0), ("hot, 8–14 mm", 8.0, 14.0), ("hot, 14–20 mm", 14.0, float("inf")))
COLD = "cold"


def lesion_group(lesion: Mapping[str, Any]) -> str:
    """The group of a recorded lesion: ``cold`` or its hot size group."""
    if lesion["cold"]:
        return COLD
    return next(name for name, low, high in HOT_SIZE_GROUPS if low <= lesion["diameter_mm"] < high)


def lesions_found(lesions: Sequence[Mapping[str, Any]], truth: sitk.Image, labels: sitk.Image) -> List[bool]:
    """For each recorded lesion, whether ``labels`` (on any grid) finds it; scored on the truth's grid."""
    from FCMSegmentationLib.metrics import lesion_components, on_grid_of

    predicted = sitk.GetArrayFromImage(on_grid_of(labels, truth)) == LESION
    components, _ = lesion_components(sitk.GetArrayFromImage(truth), LESION)
    found = []
    for lesion in lesions:
        x, y, z = truth.TransformPhysicalPointToIndex(lesion["centre_mm"])
        component = components[z, y, x]
        found.append(bool(component) and bool(predicted[components == component].any()))
    return found


def sensitivity_by_group(lesions: Sequence[Mapping[str, Any]], found: Sequence[bool]) -> Dict[str, Dict[str, int]]:
    """``{group: {"lesions": n, "found": k}}`` in display order, groups without lesions left out."""
    table: Dict[str, Dict[str, int]] = {}
    for name in [group for group, _, _ in HOT_SIZE_GROUPS] + [COLD]:
        chosen = [hit for lesion, hit in zip(lesions, found) if lesion_group(lesion) == name]
        if chosen:
            table[name] = {"lesions": len(chosen), "found": int(sum(chosen))}
    return table
