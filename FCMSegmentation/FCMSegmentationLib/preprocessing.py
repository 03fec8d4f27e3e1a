"""Bring SPECT and (optional) CT onto one working grid and normalise them for the network.

Conventions (all arrays in SimpleITK's (z, y, x) index order):

* Working grid: the direction of the *reference* image (the CT when given, else the SPECT) with its axes
  permuted and flipped to the nearest of patient LPS, the orientation the model was trained in (a NIfTI file
  stored RAS would otherwise show the network its anatomy mirrored); isotropic voxels of ``spacing_mm`` (the
  model card's value, 3 mm by default), covering the part of the reference that the SPECT's field of view
  overlaps. Resampling is by physical coordinates, so images with other spacing, origin, extent or
  direction are handled.
* Network input channels: ``[spect, ct, ct_present]``.
  - SPECT: counts divided by the 99.5th percentile of the positive voxels in the overlap, clipped to
    [0, 5]. Bone then sits near 0.2-1 and hot lesions above it; the RFCM beta is tuned to this scale.
  - CT: ``(HU + 1000) / 2000`` clipped to [0, 2] (air 0, water 0.5, dense cortex ~1.1).
  - ct_present: 1 where a CT was given, 0 otherwise (the CT channel is then 0); the network is trained
    with CT dropped at random so it works on SPECT alone.
* Outputs: memberships are resampled linearly onto the *output grid* (the CT's grid when given, else the
  SPECT's, geometry copied exactly) and labels are their argmax, weighted by the model's calibrated decision
  weights, with the dense edge of bone completed from the CT (:mod:`cortex`); voxels outside the overlap
  are background.
"""
import itertools
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .alignment import Alignment, align_spect
from .errors import InputError

NUM_CLASSES = 3
CLASS_NAMES = ("background", "bone", "lesion")
BACKGROUND, BONE, LESION = range(len(CLASS_NAMES))
CHANNELS = ("spect", "ct", "ct_present")
DEFAULT_SPACING_MM = 3.0
SPECT_PERCENTILE = 99.5
SPECT_CLIP = 5.0
CT_WINDOW = (-1000.0, 2000.0)  # (offset, width): (HU - offset) / width
CT_CLIP = 2.0
TRAINED_ORIENTATION = "LPS"  # the phantoms' axes: x to the patient's left, y posterior, z superior
NO_AIR_HU = -500.0  # a CT with nothing darker has no air or lung: probably not in HU
DENSE_BONE_HU = 500.0  # cortex; soft tissue and contrast-enhanced blood stay below (see :mod:`cortex`)


@dataclass
class WorkingCase:
    """One SPECT(/CT) study on the working grid, ready for the network.

    features: float32 (C=3, Z, Y, X) network input, channels as in :data:`CHANNELS`.
    valid: bool (Z, Y, X), True inside the SPECT field of view (the voxels the losses use).
    beyond_spect: the grid covers the whole CT, not just its overlap with the SPECT; outside the SPECT
    field the SPECT channel is 0 and the model segments bone from the CT alone (models trained for it).
    grid: an image carrying the working grid's geometry (pixel values unused).
    output_reference: an image carrying the output grid's geometry.
    spect_scale: the count value that maps to 1.0 in the SPECT channel.
    notes: human-readable remarks (partial overlap, replaced NaNs, ...), for the user to see.
    dense_bone: bool (Z, Y, X) on the output grid, the CT above :data:`DENSE_BONE_HU` (None without a CT):
    where :func:`cortex.complete_cortex` may add bone.
    alignment: the SPECT/CT misregistration looked for and, where found, undone (:mod:`alignment`); None
    when not looked for (no CT, or not asked).
    beyond_image: (flat indices of the working voxels whose centre lies outside the reference image, the CT
    or the SPECT without one; flat indices of the nearest voxel inside for each), or None when there are
    none: the grid has whole voxels, so its last slice along an axis can overhang the image by up to one
    voxel, where the network sees padding.
    """

    features: np.ndarray
    valid: np.ndarray
    grid: sitk.Image
    output_reference: sitk.Image
    spect_scale: float
    has_ct: bool
    notes: List[str] = field(default_factory=list)
    beyond_spect: bool = False
    dense_bone: Optional[np.ndarray] = None
    alignment: Optional[Alignment] = None
    beyond_image: Optional[Tuple[np.ndarray, np.ndarray]] = None

    @property
    def segmented(self) -> np.ndarray:
        """Bool (Z, Y, X): the voxels that get a prediction (the SPECT field, or all when beyond_spect)."""
        return np.ones_like(self.valid) if self.beyond_spect else self.valid


def as_volume(image: sitk.Image, role: str, notes: Optional[List[str]] = None) -> sitk.Image:
    """Check an input and return it as a 3-D float32 scalar volume.

    A 2-D image (a planar scan) becomes a one-slice volume; a 4-D image with one time point is squeezed.
    NaN/Inf voxels become 0 (noted). Raises :class:`InputError` for multi-component or true 4-D images
    and for images with no voxels.
    """
    notes = notes if notes is not None else []
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{role}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector image); "
            f"give a single-channel {role} volume"
        )
    dim = image.GetDimension()
    if dim == 4:
        if image.GetSize()[3] != 1:
            raise InputError(
                f"{role}: is 4-D with {image.GetSize()[3]} frames (dynamic/gated); "
                "extract one frame or sum them into a 3-D volume first"
            )
        image = image[:, :, :, 0]
    elif dim == 2:
        image = sitk.JoinSeries(image)  # one slice, unit-thickness z
        notes.append(f"{role} is a 2-D image: segmented as a single slice")
    elif dim != 3:
        raise InputError(f"{role}: {dim}-D images are not supported; give a 3-D volume")
    if min(image.GetSize()) < 1 or image.GetNumberOfPixels() == 0:
        raise InputError(f"{role}: image has no voxels")
    image = sitk.Cast(image, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        clean = np.nan_to_num(sitk.GetArrayFromImage(image), nan=0.0, posinf=0.0, neginf=0.0)
        fixed = sitk.GetImageFromArray(clean)
        fixed.CopyInformation(image)
        image = fixed
        notes.append(f"{role}: {bad} NaN/Inf voxels were set to 0")
    return image


def physical_bounds(image: sitk.Image) -> np.ndarray:
    """The physical positions of the 8 corners of the image's voxel-edge box, shape (8, 3)."""
    size = np.array(image.GetSize(), dtype=float)
    corners = []
    for cz in (0, 1):
        for cy in (0, 1):
            for cx in (0, 1):
                index = np.array([cx, cy, cz]) * size - 0.5
                corners.append(image.TransformContinuousIndexToPhysicalPoint(index.tolist()))
    return np.array(corners)


def overlap_region(reference: sitk.Image, other: sitk.Image) -> Tuple[np.ndarray, np.ndarray]:
    """Continuous-index box (lo, hi), (x, y, z) order, of ``reference`` covered by ``other``'s box.

    Raises :class:`InputError` when the two do not overlap in space.
    """
    corners = physical_bounds(other)
    idx = np.array([reference.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in corners])
    size = np.array(reference.GetSize(), dtype=float)
    lo = np.maximum(idx.min(axis=0), -0.5)
    hi = np.minimum(idx.max(axis=0), size - 0.5)
    if np.any(hi - lo <= 1e-6):
        raise InputError(
            "SPECT and CT do not overlap in space (check that they belong to the same study and that "
            "their origins/directions are correct)"
        )
    return lo, hi


def working_grid(reference: sitk.Image, lo: np.ndarray, hi: np.ndarray, spacing_mm: float,
                 stored_axes: bool = False) -> sitk.Image:
    """An empty image with isotropic ``spacing_mm`` covering the box of the reference's continuous indices
    [lo, hi], on the reference's axes permuted and flipped to the nearest of LPS: the same grid however the
    reference stores its axes. stored_axes: on the reference's axes as stored instead."""
    direction = np.array(reference.GetDirection()).reshape(3, 3) if stored_axes else \
        nearest_lps_axes(reference.GetDirection())
    corners = np.array([reference.TransformContinuousIndexToPhysicalPoint(corner)
                        for corner in itertools.product(*zip(lo.tolist(), hi.tolist()))])
    along_axes = corners @ direction  # the box's corners in the grid's axes (columns of ``direction``)
    low = along_axes.min(axis=0)
    extent_mm = along_axes.max(axis=0) - low
    spacing = np.full(3, float(spacing_mm))
    # A one-slice input keeps one slice (planar scans) instead of being stretched over the spacing.
    spacing = np.where(extent_mm < spacing, np.maximum(extent_mm, 1e-3), spacing)
    size = np.maximum(1, np.ceil(extent_mm / spacing - 1e-6)).astype(int)
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing(spacing.tolist())
    grid.SetOrigin((direction @ (low + spacing / 2.0)).tolist())
    grid.SetDirection(direction.flatten().tolist())
    return grid


def nearest_lps_axes(direction: Sequence[float]) -> np.ndarray:
    """(3, 3) direction cosines (columns: axes): ``direction``'s axes permuted and flipped to the nearest of
    :data:`TRAINED_ORIENTATION`, as :func:`SimpleITK.DICOMOrient` reorders an image."""
    probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    probe.SetDirection(tuple(direction))
    return np.array(sitk.DICOMOrient(probe, TRAINED_ORIENTATION).GetDirection()).reshape(3, 3)


def resample_to(image: sitk.Image, grid: sitk.Image, linear: bool = True, default: float = 0.0) -> np.ndarray:
    """``image`` resampled onto ``grid`` by physical coordinates, as a (z, y, x) array."""
    interpolator = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    out = sitk.Resample(image, grid, sitk.Transform(), interpolator, default, image.GetPixelID())
    return sitk.GetArrayFromImage(out)


def normalise_spect(counts: np.ndarray, valid: np.ndarray) -> Tuple[np.ndarray, float]:
    """SPECT counts scaled so the 99.5th percentile of positive valid voxels is 1; returns (array, scale)."""
    positive = counts[valid & (counts > 0)]
    if positive.size == 0:
        raise InputError("SPECT has no positive counts inside the field of view; nothing to segment")
    scale = float(np.percentile(positive, SPECT_PERCENTILE))
    if not scale > 0 or float(positive.max() - positive.min()) <= 1e-6 * scale:
        raise InputError("SPECT is constant inside the field of view; nothing to segment")
    return np.clip(counts / scale, 0.0, SPECT_CLIP).astype(np.float32), scale


def normalise_ct(hu: np.ndarray) -> np.ndarray:
    """CT in Hounsfield units mapped by the fixed window of :data:`CT_WINDOW`, clipped to [0, 2]."""
    offset, width = CT_WINDOW
    return np.clip((hu - offset) / width, 0.0, CT_CLIP).astype(np.float32)


def prepare_case(
    spect: sitk.Image, ct: Optional[sitk.Image] = None, spacing_mm: float = DEFAULT_SPACING_MM,
    beyond_spect: bool = False, align: bool = False, stored_axes: bool = False,
) -> WorkingCase:
    """Validate, resample and normalise a SPECT (and optional CT) into a :class:`WorkingCase`.

    The working grid covers the SPECT's overlap with the CT, or the whole CT when ``beyond_spect`` (for
    models trained to segment bone where only the CT sees it). align: first undo a rigid SPECT/CT
    misregistration (:mod:`alignment`). Segmenting does; training does when asked (``fcmseg train --align``,
    as the shipped model's last stage did), so that the network learns from images registered as well.
    stored_axes: keep the reference's axes as stored instead of reordering them to LPS. Training does: a
    CT-derived phantom reverses its x axis at random, which then mirrors the anatomy the network learns
    from, as it did when the shipped model was trained.
    """
    notes: List[str] = []
    spect = as_volume(spect, "SPECT", notes)
    if float(np.min(sitk.GetArrayViewFromImage(spect))) < 0:
        notes.append("SPECT has negative values (reconstruction artefact): clipped to 0")
        spect = sitk.Clamp(spect, sitk.sitkFloat32, lowerBound=0.0)
    reference = as_volume(ct, "CT", notes) if ct is not None else spect
    if ct is not None and float(np.min(sitk.GetArrayViewFromImage(reference))) > NO_AIR_HU:
        notes.append(f"CT has no voxel below {NO_AIR_HU:.0f}: air should be near -1000, so it may not be in Hounsfield "
                     "units (a CT stored with an offset, 0 for -1024, must be shifted back before segmenting)")
    alignment = None
    if align and ct is not None:
        spect, alignment = align_spect(spect, reference)
        notes.append(alignment.note)
    lo, hi = overlap_region(reference, spect)
    full = np.array(reference.GetSize(), dtype=float)
    beyond_spect = beyond_spect and ct is not None
    if ct is not None and (np.any(lo > -0.5 + 1e-3) or np.any(hi < full - 0.5 - 1e-3)):
        covered = float(np.prod((hi - lo) / full))
        notes.append(f"SPECT covers only {covered:.0%} of the CT: bone beyond it is segmented from the CT alone, "
                     "lesions only inside the SPECT" if beyond_spect else
                     f"SPECT covers only {covered:.0%} of the CT: segmenting the overlap, the rest is background")
    if beyond_spect:
        lo, hi = np.full(3, -0.5), full - 0.5
    grid = working_grid(reference, lo, hi, spacing_mm, stored_axes)
    valid = covered_by(spect, grid)
    spect_norm, scale = normalise_spect(resample_to(spect, grid), valid)
    if ct is not None:
        ct_norm = normalise_ct(resample_to(reference, grid, default=-1000.0))
        present = np.ones_like(ct_norm)
    else:
        ct_norm = np.zeros_like(spect_norm)
        present = np.zeros_like(spect_norm)
    features = np.stack([spect_norm * valid, ct_norm, present]).astype(np.float32)
    dense_bone = dense_bone_mask(reference) if ct is not None else None
    return WorkingCase(features, valid, grid, geometry_of(reference), scale, ct is not None, notes, beyond_spect,
                       dense_bone, alignment, nearest_inside(covered_by(reference, grid)))


def covered_by(image: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """Bool (Z, Y, X) on ``grid``: the voxels whose centre lies inside ``image``'s voxel-edge box."""
    inside = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(image)
    return resample_to(inside, grid, linear=False).astype(bool)


def nearest_inside(inside: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(flat indices of the False voxels of ``inside``, flat indices of the nearest True voxel to each), or
    None when all or none are True. Found once per case: applying it is cheap, in every refine round."""
    if inside.all() or not inside.any():
        return None
    nearest = ndimage.distance_transform_edt(~inside, return_distances=False, return_indices=True)
    outside = np.flatnonzero(~inside)
    source = np.ravel_multi_index(tuple(axis.ravel()[outside] for axis in nearest), inside.shape)
    return outside, source


def dense_bone_mask(ct: sitk.Image) -> np.ndarray:
    """Bool (Z, Y, X) on the CT's grid: the voxels above :data:`DENSE_BONE_HU`."""
    return sitk.GetArrayViewFromImage(ct) > DENSE_BONE_HU


def voxel_volume_ml(image: sitk.Image) -> float:
    """The volume of one voxel of ``image``, in ml."""
    return float(np.prod(image.GetSpacing())) / 1000.0


def geometry_of(image: sitk.Image) -> sitk.Image:
    """A 1-byte-per-voxel image with exactly ``image``'s geometry (keeps memory low)."""
    ref = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    ref.CopyInformation(image)
    return ref


def array_to_image(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """A (z, y, x) array as an image with ``grid``'s geometry."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    return image


def box_around(mask: np.ndarray, pad: Union[int, np.ndarray] = 0) -> Tuple[slice, ...]:
    """The bounding box of ``mask``'s True voxels (it must have some) grown by ``pad`` voxels per axis,
    inside the array."""
    where = np.argwhere(mask)
    low = np.maximum(where.min(axis=0) - pad, 0)
    high = np.minimum(where.max(axis=0) + pad + 1, mask.shape)
    return tuple(slice(int(lo), int(hi)) for lo, hi in zip(low, high))


def memberships_to_output(memberships: np.ndarray, case: WorkingCase) -> np.ndarray:
    """Working-grid memberships (K, Z, Y, X) resampled linearly onto the output grid, renormalised.

    Outside the working grid the membership is 1 for background.
    """
    shape = sitk.GetArrayViewFromImage(case.output_reference).shape
    stacked = np.empty((memberships.shape[0],) + shape, dtype=np.float32)  # filled in place: no 2nd copy
    for k in range(memberships.shape[0]):
        channel = array_to_image(memberships[k].astype(np.float32), case.grid)
        stacked[k] = resample_to(channel, case.output_reference, default=1.0 if k == 0 else 0.0)
    stacked /= np.maximum(stacked.sum(axis=0, keepdims=True), 1e-8)
    return stacked


def labels_from_memberships(memberships: np.ndarray, weights: Optional[Sequence[float]] = None) -> np.ndarray:
    """Hard labels (uint8 (Z, Y, X), 0 background / 1 bone / 2 lesion) from memberships (K, Z, Y, X): the
    argmax over classes of ``weights[k] * memberships[k]`` (a model's calibrated decision weights; default
    all 1, the plain argmax). Ties go to the lower class, as with ``np.argmax``."""
    if weights is None:
        return np.argmax(memberships, axis=0).astype(np.uint8)
    if len(weights) != memberships.shape[0]:
        raise ValueError(f"{len(weights)} decision weights for {memberships.shape[0]} classes")
    # class by class, so that no weighted copy of all K channels is held (large CT grids)
    labels = np.zeros(memberships.shape[1:], dtype=np.uint8)
    best = memberships[0] * np.float32(weights[0])
    for k in range(1, memberships.shape[0]):
        weighted = memberships[k] * np.float32(weights[k])
        better = weighted > best
        labels[better] = k
        np.maximum(best, weighted, out=best)
    return labels
