"""Lesion extent: of each predicted lesion keep its core, where its membership is near the lesion's peak.

Finding a lesion and drawing its edge are two decisions. The network's lesion membership is the SPECT's
blurred uptake seen on a 3 mm grid, so at the weighted argmax that finds faint lesions a found lesion is
drawn wider than it is, mostly into the bone around it. As nuclear medicine draws a lesion at a fraction
of its maximum uptake, :func:`trim_lesions` keeps of each predicted lesion (a 26-connected component of
the lesion label) the voxels whose lesion membership is at least ``fraction`` of the component's peak;
the others take the better of background and bone by the decision weights. A lesion is never removed
(its peak voxel stays), only narrowed, and painted voxels keep their class.
``fraction`` is calibrated with the decision weights (:mod:`calibration`); 0 leaves the labels as they are.
"""
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from .preprocessing import BACKGROUND, BONE, LESION, box_around

CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def trim_lesions(labels: np.ndarray, memberships: np.ndarray, weights: Sequence[float],
                 fraction: float, painted: Optional[np.ndarray] = None) -> np.ndarray:
    """Labels with each lesion narrowed to its core (see the module docstring).

    labels: uint8 (Z, Y, X), 0 background / 1 bone / 2 lesion, as the weighted argmax gives them.
    memberships: (K, Z, Y, X) on the same grid. weights: the (background, bone, lesion) decision weights
    that gave ``labels``. fraction: in [0, 1). painted: optional bool (Z, Y, X), voxels the user painted:
    they keep their label and do not count towards a lesion's peak (their membership 1 is the user's
    word, not the network's: a lesion stroke would otherwise set the peak to 1 and trim the rest of its
    lesion harder than an unpainted one). Returns a new array; ``labels`` is not modified.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the lesion core fraction must be in [0, 1), got {fraction}")
    if labels.shape != memberships.shape[1:]:
        raise ValueError(f"shapes differ: labels {labels.shape}, memberships {memberships.shape}")
    out = labels.copy()
    lesion = labels == LESION
    if fraction == 0.0 or not lesion.any():
        return out
    box = box_around(lesion)
    components, count = ndimage.label(lesion[box], CONNECTIVITY)
    membership = memberships[LESION][box]
    unpainted = np.ones(membership.shape, dtype=bool) if painted is None else ~painted[box]
    # the peak over each component's unpainted voxels (0 for a component painted all over)
    peaks = ndimage.maximum(np.where(unpainted, membership, 0.0), components, np.arange(1, count + 1))
    peak_of_voxel = np.concatenate(([0.0], peaks)).astype(np.float32)[components]
    rim = (components > 0) & unpainted & (membership < np.float32(fraction) * peak_of_voxel)
    out[box][rim] = background_or_bone(memberships[(slice(None),) + box], weights)[rim]
    return out


def background_or_bone(memberships: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """uint8 (Z, Y, X): the better of background and bone by the decision ``weights`` at every voxel of
    ``memberships`` (K, Z, Y, X), ties to background as in the argmax: what a voxel taken out of a lesion
    becomes."""
    bone = memberships[BONE] * np.float32(weights[BONE])
    bone_wins = bone > memberships[BACKGROUND] * np.float32(weights[BACKGROUND])
    return np.where(bone_wins, BONE, BACKGROUND).astype(np.uint8)
