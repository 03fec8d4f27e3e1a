"""Lesions placed in bone: label, uptake and CT appearance."""
from typing import Any, Dict, List

import numpy as np
import SimpleITK as sitk

from .case import LESION
from .ranges import SimulationRanges, rounded, uniform


def add_lesions(
    rng: np.random.Generator,
    ranges: SimulationRanges,
    ct_grid: sitk.Image,
    bone: np.ndarray,
    hu: np.ndarray,
    activity: np.ndarray,
    truth: np.ndarray,
) -> List[Dict[str, Any]]:
    """Place lesions centred in bone, changing ``hu``, ``activity`` and ``truth`` (all (z, y, x)) in place.

    Label (2), uptake (``contrast`` x the local uptake) and CT change apply to a lesion's voxels inside bone
    only. Returns each lesion's parameters.
    """
    n = int(rng.integers(ranges.lesion_count[0], ranges.lesion_count[1] + 1))
    flat = np.flatnonzero(bone)
    if n == 0 or flat.size == 0:
        return []
    spacing = np.array(ct_grid.GetSpacing())  # x, y, z
    lesions = []
    for _ in range(n):
        zi, yi, xi = np.unravel_index(flat[int(rng.integers(flat.size))], bone.shape)
        d = uniform(rng, ranges.lesion_diameter_mm)
        aspect = rng.uniform(0.75, 1.25, 3)
        semi = d / 2 * aspect / np.prod(aspect) ** (1 / 3)  # same volume as the sphere of diameter d
        cold = bool(rng.random() < ranges.cold_lesion_probability)
        contrast = uniform(rng, ranges.cold_lesion_contrast if cold else ranges.lesion_contrast)
        change, delta = "none", 0.0
        if rng.random() < ranges.lesion_ct_change_probability:
            if rng.random() < 0.6:
                change, delta = "sclerotic", uniform(rng, ranges.sclerotic_delta_hu)
            else:
                change = "lytic"
        half = np.ceil(semi / spacing).astype(int)
        lo = np.maximum([xi, yi, zi] - half, 0)
        hi = np.minimum(np.array([xi, yi, zi]) + half + 1, bone.shape[::-1])
        gx = (np.arange(lo[0], hi[0]) - xi) * spacing[0] / semi[0]
        gy = (np.arange(lo[1], hi[1]) - yi) * spacing[1] / semi[1]
        gz = (np.arange(lo[2], hi[2]) - zi) * spacing[2] / semi[2]
        ell = gz[:, None, None] ** 2 + gy[None, :, None] ** 2 + gx[None, None, :] ** 2 <= 1.0
        box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        region = ell & bone[box]
        region[zi - lo[2], yi - lo[1], xi - lo[0]] = True
        sub_act = activity[box]
        sub_act[region] = sub_act[region] * contrast
        sub_hu = hu[box]
        if change == "sclerotic":
            sub_hu[region] = np.minimum(sub_hu[region] + delta, 1900.0)
        elif change == "lytic":
            sub_hu[region] = uniform(rng, (20.0, 90.0))
        truth[box][region] = LESION
        centre = ct_grid.TransformIndexToPhysicalPoint((int(xi), int(yi), int(zi)))
        lesions.append(
            {
                "centre_mm": [rounded(c) for c in centre],
                "centre_index_xyz": [int(xi), int(yi), int(zi)],
                "diameter_mm": rounded(d),
                "semi_axes_mm": [rounded(s) for s in semi],
                "contrast": rounded(contrast),
                "cold": cold,
                "ct_change": change,
                "ct_delta_hu": rounded(delta),
                "voxels": int(region.sum()),
            }
        )
    return lesions

