"""Cortex completion: put back, from the CT, the dense edge of bone that the working grid rounds off.

The network sees the images on a 3 mm grid and its memberships are interpolated onto the CT's finer grid,
which rounds off bone's outermost, densest shell: on procedural validation phantoms most missed bone
voxels lay within 3 mm of the predicted bone, in dense cortex (median 600-970 HU). After the decision, a
background voxel becomes bone when

* the CT there is above :data:`preprocessing.DENSE_BONE_HU` (cortex; contrast-enhanced blood and soft
  tissue stay below it),
* the network gives it at least :data:`REACH` bone-or-lesion membership (within about one working voxel of
  the network's bone, so a dense structure touching bone is not followed beyond that), and
* it connects to a bone-labelled voxel through such voxels (6-connected).

Painted voxels keep their painted class: the result gives them membership 1 for it, which puts painted
background out of reach. The memberships, the soft output, are not changed.
"""
import numpy as np
from scipy import ndimage

from .preprocessing import BACKGROUND, BONE, box_around

REACH = 0.1


def complete_cortex(labels: np.ndarray, memberships: np.ndarray, dense_bone: np.ndarray,
                    reach: float = REACH) -> np.ndarray:
    """Labels with the dense bone edge completed (see the module docstring).

    labels: uint8 (Z, Y, X), 0 background / 1 bone / 2 lesion. memberships: (K, Z, Y, X) on the same grid,
    summing to 1 over K. dense_bone: bool (Z, Y, X), CT above the dense-bone level. Returns a new array;
    ``labels`` is not modified.
    """
    if not (labels.shape == dense_bone.shape == memberships.shape[1:]):
        raise ValueError(f"shapes differ: labels {labels.shape}, memberships {memberships.shape}, "
                         f"dense bone {dense_bone.shape}")
    candidates = dense_bone & (labels == BACKGROUND) & (memberships[BACKGROUND] <= 1.0 - reach)
    out = labels.copy()
    if not candidates.any():
        return out
    box = box_around(candidates, pad=1)
    bone = labels[box] == BONE
    grown = ndimage.binary_dilation(bone, iterations=-1, mask=bone | candidates[box])  # until nothing changes
    out[box][grown & ~bone] = BONE
    return out
