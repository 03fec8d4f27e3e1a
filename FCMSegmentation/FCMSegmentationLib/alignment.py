"""Undo a rigid SPECT/CT misregistration before segmenting.

Patients move between the CT and the SPECT, so the uptake of a bone can sit a few mm off that bone on the
CT; the network then draws lesions where the uptake is, beside the bone the truth puts them in. Bone
uptake follows CT bone, so the rigid transform that best correlates the SPECT with an uptake image made
from the CT (bone weighted by how dense it is, soft tissue 1) recovers the shift. The correction changes
only the SPECT's geometry (origin and direction): its counts are never resampled.

It is only attempted where the overlap of SPECT and CT is at least :data:`MIN_OVERLAP_MM` along every
axis of the SPECT (a thin CT slab leaves the axial shift and the tilts unconstrained), and only kept when
it improves the correlation and stays within :data:`MAX_SHIFT_MM` and :data:`MAX_ROTATION_DEG` (a larger
estimate means the images disagree for another reason, which alignment would not fix).
"""
import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .affine import apply_affine, index_to_physical_matrix, rigid_matrix

UPTAKE_SPACING_MM = 3.0
BONE_HU = (100.0, 400.0)  # uptake rises from soft tissue (below) to full bone uptake (above)
BONE_WEIGHT = 8.0  # bone : soft-tissue uptake of a typical bone scan
BODY_HU = -500.0
BODY_OPENING_VOXELS = 2  # on the 3 mm uptake grid: cuts links (a table, its pad) thinner than about 12 mm
MIN_OVERLAP_MM = 60.0
MAX_SHIFT_MM = 20.0
MAX_ROTATION_DEG = 10.0


@dataclass(frozen=True)
class Alignment:
    """What :func:`estimate_alignment` found.

    transform: rigid; the SPECT's counts at physical point x belong to the CT's point ``transform(x)``
    (identity when not ``applied``). mean_shift_mm: how far it moves the SPECT voxels inside the CT, on
    average. rotation_deg: its rotation angle. note: one sentence for the user.
    """

    transform: sitk.Euler3DTransform
    applied: bool
    mean_shift_mm: float
    rotation_deg: float
    note: str


def uptake_image(ct: sitk.Image, spacing_mm: float = UPTAKE_SPACING_MM) -> sitk.Image:
    """The uptake a bone scan would show given ``ct`` (HU): 1 in the body, up to 1 + :data:`BONE_WEIGHT` in
    dense bone, 0 in air and outside the patient (:func:`body_mask`: no uptake in the table); float32 on an
    isotropic ``spacing_mm`` grid with the CT's direction and extent."""
    shrink = [max(1, int(spacing_mm // s)) for s in ct.GetSpacing()]
    averaged = sitk.BinShrink(as_float32(ct), shrink)  # block means: no aliasing
    extent = np.array(ct.GetSize()) * np.array(ct.GetSpacing())
    size = [max(1, int(round(e / spacing_mm))) for e in extent]
    corner = np.array(ct.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
    direction = np.array(ct.GetDirection()).reshape(3, 3)
    origin = corner + direction @ np.full(3, spacing_mm / 2.0)
    hu = sitk.GetArrayFromImage(sitk.Resample(
        averaged, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), [spacing_mm] * 3,
        ct.GetDirection(), -1000.0, sitk.sitkFloat32))
    low, high = BONE_HU
    uptake = (BONE_WEIGHT * np.clip((hu - low) / (high - low), 0.0, 1.0) + 1.0) * body_mask(hu > BODY_HU)
    image = sitk.GetImageFromArray(uptake.astype(np.float32))
    image.SetOrigin(origin.tolist())
    image.SetSpacing([spacing_mm] * 3)
    image.SetDirection(ct.GetDirection())
    return image


def body_mask(foreground: np.ndarray, opening_voxels: int = BODY_OPENING_VOXELS) -> np.ndarray:
    """The patient in a CT's foreground (bool (z, y, x)): the largest region left after an opening of
    ``opening_voxels``, grown back within the foreground. The table the patient lies on, and anything joined
    to the body by less than the opening's width, is left out: it is dense on the CT but shows no uptake."""
    if not opening_voxels:
        return _largest_region(foreground)
    cube = ndimage.generate_binary_structure(3, 3)
    # the image's border does not erode: a body cut by the field of view keeps its edge there
    core = _largest_region(ndimage.binary_erosion(foreground, cube, opening_voxels, border_value=1))
    return ndimage.binary_dilation(core, cube, opening_voxels + 1, mask=foreground) if core.any() else core


def _largest_region(mask: np.ndarray) -> np.ndarray:
    regions, count = ndimage.label(mask)
    return regions == np.argmax(np.bincount(regions.ravel())[1:]) + 1 if count else np.zeros_like(mask)


def as_float32(image: sitk.Image) -> sitk.Image:
    """``image`` as float32, not copied when it already is (any input type then gives the same sums)."""
    return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)


def voxels_inside(image: sitk.Image, container: sitk.Image) -> np.ndarray:
    """Bool (z, y, x) on ``image``'s grid: voxel centres inside ``container``'s box, by physical position."""
    to_container = (np.linalg.inv(index_to_physical_matrix(container)) @ index_to_physical_matrix(image))[:3]
    nx, ny, nz = image.GetSize()
    y, x = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij")
    plane = np.stack([x, y, np.zeros_like(x), np.ones_like(x)], -1) @ to_container.T
    upper = np.array(container.GetSize()) - 0.5
    inside = np.zeros((nz, ny, nx), dtype=bool)
    for z in range(nz):  # slice by slice: a large SPECT never needs a coordinate array of its own size
        continuous = plane + z * to_container[:, 2]
        inside[z] = np.all((continuous >= -0.5) & (continuous <= upper), axis=-1)
    return inside


def physical_points(image: sitk.Image, index_xyz: np.ndarray) -> np.ndarray:
    """(N, 3) physical points of the (N, 3) (x, y, z) voxel indices ``index_xyz`` of ``image``."""
    return apply_affine(index_to_physical_matrix(image), index_xyz)


def overlap_samples(image: sitk.Image, inside: np.ndarray) -> Tuple[sitk.Image, np.ndarray]:
    """(uint8 mask image of ``inside`` on ``image``'s grid, physical points of every 7th True voxel):
    a registration's metric mask, and the points its centre and motion are taken over."""
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(image)
    return mask, physical_points(image, np.argwhere(inside)[::7, ::-1].astype(np.float64))


def overlap_extent_mm(inside: np.ndarray, image: sitk.Image) -> np.ndarray:
    """(x, y, z) extent in mm, along ``image``'s axes, of the bounding box of the True voxels of ``inside``."""
    if not inside.any():
        return np.zeros(3)
    extent = [np.ptp(np.nonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))[0]) + 1
              for axis in range(3)]  # (z, y, x)
    return np.array(extent[::-1], dtype=float) * np.array(image.GetSpacing())


def motion(transform: sitk.Euler3DTransform, points: np.ndarray) -> Tuple[float, float]:
    """(mean displacement in mm of ``points`` (N, 3), rotation angle in degrees) of a rigid ``transform``."""
    affine = rigid_matrix(transform)
    angle = math.degrees(math.acos(float(np.clip((np.trace(affine[:3, :3]) - 1.0) / 2.0, -1.0, 1.0))))
    shifts = np.linalg.norm(apply_affine(affine, points) - points, axis=1)
    return float(shifts.mean()) if len(points) else 0.0, angle


def _not_applied(note: str) -> Alignment:
    return Alignment(sitk.Euler3DTransform(), False, 0.0, 0.0, note)


def rigid_registration(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image, centre: Sequence[float],
                       metric: str = "correlation") -> Tuple[sitk.Euler3DTransform, float, float]:
    """(transform, metric value before, after): the rigid transform about ``centre`` that sends points of
    ``fixed`` (float32) to where ``moving`` matches them best over ``mask`` (on ``fixed``'s grid); metric
    ``correlation`` (as :func:`estimate_alignment` uses it) or ``mutual_information`` (Mattes, 32 bins, as
    general-purpose registration tools do). Metric values are to be minimised. Raises RuntimeError when the
    registration cannot run (no overlap, a constant image)."""
    method = sitk.ImageRegistrationMethod()
    if metric == "correlation":
        method.SetMetricAsCorrelation()
    elif metric == "mutual_information":
        method.SetMetricAsMattesMutualInformation(32)
    else:
        raise ValueError(f"unknown metric {metric!r}; use 'correlation' or 'mutual_information'")
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=300,
                                                     relaxationFactor=0.8)
    method.SetOptimizerScalesFromPhysicalShift()
    transform = sitk.Euler3DTransform()
    transform.SetCenter([float(v) for v in centre])
    method.SetInitialTransform(transform, inPlace=True)
    before = method.MetricEvaluate(fixed, moving)
    method.Execute(fixed, moving)
    return transform, before, method.GetMetricValue()


def estimate_alignment(spect: sitk.Image, ct: sitk.Image) -> Alignment:
    """The rigid transform that puts ``spect`` on ``ct`` (3-D images, CT in HU); see the module text for
    when it is not applied. Never raises for a registration that fails: it is then not applied."""
    inside = voxels_inside(spect, ct)
    extent = overlap_extent_mm(inside, spect)
    if extent.min() < MIN_OVERLAP_MM:
        return _not_applied(f"SPECT/CT alignment not checked: the images overlap over only {extent.min():.0f} mm "
                            f"along one axis ({MIN_OVERLAP_MM:.0f} mm needed)")
    mask, points = overlap_samples(spect, inside)
    try:
        transform, before, after = rigid_registration(as_float32(spect), uptake_image(ct), mask, points.mean(axis=0))
    except RuntimeError as error:  # e.g. a constant SPECT: no correlation to maximise
        return _not_applied(f"SPECT/CT alignment not checked: registration failed ({str(error).strip()[-120:]})")
    shift, angle = motion(transform, points)
    if not after < before:
        return _not_applied("SPECT/CT alignment checked: no shift improves it, the SPECT is used as recorded")
    if shift > MAX_SHIFT_MM or angle > MAX_ROTATION_DEG:
        return _not_applied(f"SPECT/CT alignment: an estimate of {shift:.1f} mm and {angle:.1f}° was not used "
                            f"(beyond {MAX_SHIFT_MM:.0f} mm or {MAX_ROTATION_DEG:.0f}°, so not patient motion); "
                            "the SPECT is used as recorded")
    return Alignment(transform, True, shift, angle, f"SPECT aligned to the CT: moved {shift:.1f} mm on average, "
                                                    f"rotated {angle:.1f}° (patient motion between the scans)")


def move_spect(spect: sitk.Image, transform: sitk.Euler3DTransform) -> sitk.Image:
    """``spect`` with its geometry moved by ``transform`` (as in :class:`Alignment`), counts untouched."""
    rotation = np.array(transform.GetMatrix()).reshape(3, 3)
    moved = sitk.Image(spect)
    moved.SetOrigin(transform.TransformPoint(spect.GetOrigin()))
    moved.SetDirection((rotation @ np.array(spect.GetDirection()).reshape(3, 3)).ravel().tolist())
    return moved


def align_spect(spect: sitk.Image, ct: sitk.Image) -> Tuple[sitk.Image, Alignment]:
    """``spect`` aligned to ``ct`` where :func:`estimate_alignment` applies, with what it found."""
    alignment = estimate_alignment(spect, ct)
    return (move_spect(spect, alignment.transform) if alignment.applied else spect), alignment
