"""Small faint lesions: drop a predicted lesion that is both small and never clearly lesion.

A reconstructed (OS-EM) SPECT's noise comes in blobs of a small lesion's size, and the network calls some
of them lesions; with image-space noise it calls fewer, but, like them, small. On calibration phantoms the
predicted lesions that touch no true lesion were mostly small (median 0.15 ml on OS-EM SPECT, 0.21 ml with
image-space noise, against 1.1 and 1.3 ml for those that touch one) and their lesion membership peaked
lower (median 0.60–0.61 against 0.86–0.87). :func:`drop_faint_lesions` therefore drops a predicted lesion (a
26-connected component of the lesion label) smaller than :data:`MAX_VOLUME_ML` whose lesion membership
nowhere reaches :data:`MIN_PEAK`: its voxels take the better of background and bone by the decision
weights. A larger lesion, or a small one the network is sure of, stays; so does one the user painted.

It is an option (``segment(drop_faint_lesions=True)``, ``--drop-faint-lesions``), with a CT only, not the
default: it takes false lesions from 4.4 to 1.3 per case on the accuracy benchmark's reconstructed SPECT,
but it also drops a few small true lesions, and lesion Dice there fell a little (docs/design.md, *Small
faint lesions*).
"""
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .lesion_core import background_or_bone
from .metrics import lesion_components
from .preprocessing import LESION, box_around

MAX_VOLUME_ML = 0.5
MIN_PEAK = 0.7


def measure_lesions(labels: np.ndarray, lesion_membership: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The predicted lesions of ``labels`` (uint8 (Z, Y, X), 2 for lesion): their 26-connected components
    (numbered from 1, 0 elsewhere), and per component its voxel count and the peak of ``lesion_membership``
    (same shape) over it, each (count,)."""
    components, count = lesion_components(labels)
    voxels = np.bincount(components.ravel(), minlength=count + 1)[1:]
    # in the membership's dtype, so that a float32 peak equal to the threshold is not below it
    peaks = np.asarray(ndimage.maximum(lesion_membership, components, np.arange(1, count + 1)),
                       dtype=lesion_membership.dtype)
    return components, voxels, peaks.reshape(count)


def is_faint(volume_ml, peak, max_volume_ml: float = MAX_VOLUME_ML, min_peak: float = MIN_PEAK):
    """Whether a predicted lesion (or an array of them) is small and faint: under ``max_volume_ml`` and its
    lesion membership below ``min_peak`` everywhere."""
    return (volume_ml < max_volume_ml) & (peak < min_peak)


def drop_faint_lesions(labels: np.ndarray, memberships: np.ndarray, weights: Sequence[float], voxel_ml: float,
                       painted: Optional[np.ndarray] = None, max_volume_ml: float = MAX_VOLUME_ML,
                       min_peak: float = MIN_PEAK) -> np.ndarray:
    """Labels without the small faint lesions (see the module docstring).

    labels: uint8 (Z, Y, X), 0 background / 1 bone / 2 lesion. memberships: (K, Z, Y, X) on the same grid.
    weights: the (background, bone, lesion) decision weights that gave ``labels``. voxel_ml: the volume of
    one voxel of that grid, in ml. painted: optional bool (Z, Y, X), voxels the user painted: a lesion
    touching them stays. Returns a new array; ``labels`` is not modified.
    """
    if labels.shape != memberships.shape[1:]:
        raise ValueError(f"shapes differ: labels {labels.shape}, memberships {memberships.shape}")
    if not voxel_ml > 0:
        raise ValueError(f"the voxel volume must be positive, got {voxel_ml} ml")
    out = labels.copy()
    lesion = labels == LESION
    if not lesion.any():
        return out
    box = box_around(lesion)
    components, voxels, peaks = measure_lesions(labels[box], memberships[LESION][box])
    faint = np.flatnonzero(is_faint(voxels * voxel_ml, peaks, max_volume_ml, min_peak)) + 1
    if painted is not None and faint.size:
        faint = np.setdiff1d(faint, components[painted[box] & (components > 0)])
    if not faint.size:
        return out
    dropped = np.isin(components, faint)
    out[box][dropped] = background_or_bone(memberships[(slice(None),) + box], weights)[dropped]
    return out
