"""Which of a phantom's simulated lesions a label map finds, grouped by size and by hot or cold, and how
plainly the SPECT shows each.

The phantoms record every lesion they place (centre, diameter, contrast, hot or cold). A lesion is found
when any predicted lesion voxel touches its true lesion (the 26-connected component of the truth's
lesion label holding its centre; two touching lesions share a component, and so are found together).
"""
import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .common import ENGINE  # noqa: F401  (puts the engine on sys.path)

LESION = 2
BONE = 1
#: the bone a lesion is compared with: bone voxels this far (mm) from the lesion, beyond its blur
RING_MM = (8.0, 20.0)
MIN_RING_VOXELS = 10
#: hot lesions by diameter (mm, lower bound inclusive); cold lesions form one group of their own
HOT_SIZE_GROUPS: Tuple[Tuple[str, float, float], ...] = (
    ("hot, 4–8 mm", 0.0, 8.0), ("hot, 8–14 mm", 8.0, 14.0), ("hot, 14–20 mm", 14.0, float("inf")))
COLD = "cold"


def lesion_group(lesion: Mapping[str, Any]) -> str:
    """The group of a recorded lesion: ``cold`` or its hot size group."""
    if lesion["cold"]:
        return COLD
    return next(name for name, low, high in HOT_SIZE_GROUPS if low <= lesion["diameter_mm"] < high)


def recorded_components(lesions: Sequence[Mapping[str, Any]], truth: sitk.Image) -> Tuple[np.ndarray, List[int]]:
    """The truth's lesion components, and the component holding each recorded lesion's centre (0: none)."""
    from FCMSegmentationLib.metrics import lesion_components

    components, _ = lesion_components(sitk.GetArrayFromImage(truth), LESION)
    ids = []
    for lesion in lesions:
        x, y, z = truth.TransformPhysicalPointToIndex(lesion["centre_mm"])
        ids.append(int(components[z, y, x]))
    return components, ids


def lesions_found(lesions: Sequence[Mapping[str, Any]], truth: sitk.Image, labels: sitk.Image) -> List[bool]:
    """For each recorded lesion, whether ``labels`` (on any grid) finds it; scored on the truth's grid."""
    from FCMSegmentationLib.metrics import on_grid_of

    predicted = sitk.GetArrayFromImage(on_grid_of(labels, truth)) == LESION
    components, ids = recorded_components(lesions, truth)
    return [bool(component) and bool(predicted[components == component].any()) for component in ids]


def lesion_visibility(lesions: Sequence[Mapping[str, Any]], truth: sitk.Image,
                      spect_on_truth: sitk.Image) -> List[float]:
    """For each recorded lesion, how plainly the SPECT shows it: the contrast-to-noise ratio
    ``(mean in the lesion - mean in the ring) / sd in the ring``, the ring being the truth's bone
    :data:`RING_MM` from the lesion (beyond its blur, near enough to share its uptake level).

    ``spect_on_truth``: the SPECT on the truth's grid, where the truth's anatomy is (i.e. with any
    misregistration undone), so that what is measured is blur and noise, not position. Near 0: the
    lesion is lost in the noise of its bone; negative: cold. NaN where the centre is in no true lesion or
    the ring has fewer than :data:`MIN_RING_VOXELS` voxels.
    """
    from scipy import ndimage

    truth_array = sitk.GetArrayFromImage(truth)
    spect = sitk.GetArrayFromImage(spect_on_truth).astype(np.float64)
    spacing = truth.GetSpacing()[::-1]
    components, ids = recorded_components(lesions, truth)
    ratios = []
    for component in ids:
        inside = components == component
        if not component:
            ratios.append(math.nan)
            continue
        distance = ndimage.distance_transform_edt(~inside, sampling=spacing)
        ring = (distance > RING_MM[0]) & (distance <= RING_MM[1]) & (truth_array == BONE)
        spread = spect[ring].std() if ring.sum() >= MIN_RING_VOXELS else 0.0
        ratios.append(float((spect[inside].mean() - spect[ring].mean()) / spread) if spread > 0 else math.nan)
    return ratios


def sensitivity_by_group(lesions: Sequence[Mapping[str, Any]], found: Sequence[bool]) -> Dict[str, Dict[str, int]]:
    """``{group: {"lesions": n, "found": k}}`` in display order, groups without lesions left out."""
    table: Dict[str, Dict[str, int]] = {}
    for name in [group for group, _, _ in HOT_SIZE_GROUPS] + [COLD]:
        chosen = [hit for lesion, hit in zip(lesions, found) if lesion_group(lesion) == name]
        if chosen:
            table[name] = {"lesions": len(chosen), "found": int(sum(chosen))}
    return table
