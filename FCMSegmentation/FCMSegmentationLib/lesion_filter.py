"""Bone lesions lie in bone: drop predicted lesions that the CT shows are not in bone.

The network marks hot spots; on a bone scan the hottest non-bone structures (bladder, kidneys) can look
like a lesion on SPECT, while the CT says plainly that there is no bone there. A predicted lesion (a
26-connected component of the lesion argmax on the working grid) of which less than ``min_fraction``
of the voxels lie within ``margin_mm`` of CT bone (above ``bone_hu``) is not a bone lesion: its lesion
membership goes to the other classes. Lytic lesions have low HU themselves but sit inside bone, so the
margin keeps them; the PSF halo of a true lesion stays attached to it and is kept too. Without a CT
nothing is dropped.
"""
from typing import List, Optional, Tuple

import numpy as np
from scipy import ndimage

from .metrics import lesion_components
from .preprocessing import BACKGROUND, CT_WINDOW, LESION, WorkingCase, box_around

BONE_HU = 150.0
MARGIN_MM = 3.0
MIN_FRACTION = 0.2


def _spacing_zyx(case: WorkingCase) -> np.ndarray:
    return np.array(case.grid.GetSpacing()[::-1])


def _radius_voxels(spacing_zyx: np.ndarray, margin_mm: float) -> np.ndarray:
    return np.maximum(np.round(margin_mm / spacing_zyx).astype(int), 0)


def near_ct_bone(case: WorkingCase, margin_mm: float = MARGIN_MM, bone_hu: float = BONE_HU,
                 box: Tuple[slice, ...] = (slice(None),) * 3) -> np.ndarray:
    """Bool: working voxels of ``box`` within ``margin_mm`` of CT above ``bone_hu`` (needs a CT); exact
    for voxels at least the margin away from the box's sides (bone beyond the box is not seen)."""
    offset, width = CT_WINDOW
    bone = case.features[1][box] > (bone_hu - offset) / width
    spacing = _spacing_zyx(case)
    radius = _radius_voxels(spacing, margin_mm)
    if not radius.any():
        return bone
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    ball = sum((g * s) ** 2 for g, s in zip(grid, spacing)) <= margin_mm ** 2 + 1e-6
    return ndimage.binary_dilation(bone, structure=ball)


def drop_lesions_outside_bone(memberships: np.ndarray, case: WorkingCase, margin_mm: float = MARGIN_MM,
                              min_fraction: float = MIN_FRACTION, keep: Optional[np.ndarray] = None
                              ) -> Tuple[np.ndarray, List[str]]:
    """Memberships (K, Z, Y, X) on the working grid with the lesion class removed from predicted lesions
    that are not in CT bone, and a note saying how many were dropped (none without a CT).

    keep: optional bool (Z, Y, X); a lesion touching it is kept whatever the CT says (painted lesions).
    A dropped lesion's voxels, and a one-voxel rim around them, lose their lesion membership: away from
    CT bone they become background; near it the other classes share it in proportion. The soft maps thus
    stay consistent with the labels.
    """
    if not case.has_ct:
        return memberships, []
    lesion = np.argmax(memberships, axis=0) == LESION
    if not lesion.any():
        return memberships, []
    # Only the lesions' surroundings matter: work in their bounding box (fast on large images).
    box = box_around(lesion, _radius_voxels(_spacing_zyx(case), margin_mm) + 2)
    components, count = lesion_components(lesion[box].astype(np.uint8), 1)
    index = np.arange(1, count + 1)
    near = near_ct_bone(case, margin_mm, box=box)
    fraction = ndimage.mean(near, components, index)
    dropped = index[fraction < min_fraction]
    if keep is not None and dropped.size:
        dropped = np.setdiff1d(dropped, np.unique(components[keep[box] & (components > 0)]))
    if dropped.size == 0:
        return memberships, []
    region = ndimage.binary_dilation(np.isin(components, dropped), structure=np.ones((3, 3, 3), bool))
    region &= ~np.isin(components, np.setdiff1d(index, dropped))
    out = memberships.copy()
    inside = out[(slice(None),) + box]  # a view: writing it writes ``out``
    others = [k for k in range(out.shape[0]) if k != LESION]
    rest = inside[others][:, region]  # the other classes' memberships, shared out as they stand
    total = rest.sum(axis=0)
    share = np.where(total > 0, rest / np.where(total > 0, total, 1.0), 0.0)
    away = (total <= 0) | ~near[region]  # where the CT shows no bone, what is not lesion is background
    share[:, away] = 0.0
    share[others.index(BACKGROUND), away] = 1.0
    for row, k in enumerate(others):
        inside[k][region] = share[row]
    inside[LESION][region] = 0.0
    noun = "lesion" if dropped.size == 1 else "lesions"
    return out, [f"{dropped.size} hot {noun} outside bone on the CT (not bone lesions) left out of the lesion class"]
