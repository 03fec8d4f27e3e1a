"""The imaging chain shared by every phantom: uptake texture, lesions, CT noise, and the simulated SPECT.

activity on the CT grid -> Gaussian PSF (sampled FWHM, slightly anisotropic) -> rigid SPECT/CT
misregistration and resampling onto the SPECT's own grid (3-5 mm voxels, other origin/extent) ->
attenuation-like depth fall-off (uncorrected fraction) and a broad scatter component -> Poisson noise at a
sampled count density -> optional Gaussian post-filter (correlated, OS-EM-like texture). With the ranges'
``osem_probability`` a case's noise is instead drawn on projections of that image and the image is
reconstructed by OS-EM (``reconstruction``).
"""
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import InputError
from .case import LESION, PhantomCase
from .geometry import FWHM_TO_SIGMA, blank_geometry, image_on, smooth_field
from .lesions import add_lesions
from .ranges import SimulationRanges, log_uniform, rounded, uniform
from .reconstruction import osem_spect, sample_osem


@dataclass
class Anatomy:
    """What a phantom generator hands to the imaging chain; arrays are (z, y, x) on ``ct_grid``.

    hu: float32 CT numbers before noise. activity: float32 uptake (soft tissue = 1). bone, body: masks.
    uptakes: the sampled uptake parameters (see ``ranges.sample_uptakes``).
    """

    ct_grid: sitk.Image
    hu: np.ndarray
    activity: np.ndarray
    bone: np.ndarray
    body: np.ndarray
    uptakes: Dict[str, float]


def spect_grid(
    rng: np.random.Generator, ranges: SimulationRanges, ct_grid: sitk.Image, direction: Sequence[float]
) -> sitk.Image:
    """A SPECT grid (own spacing, origin, extent) covering the CT in-plane plus a margin, most of it in z."""
    d = np.array(direction, float).reshape(3, 3)
    size = ct_grid.GetSize()
    corners = np.array([
        ct_grid.TransformContinuousIndexToPhysicalPoint([c * (n - 0.5) + (1 - c) * -0.5 for c, n in zip(cc, size)])
        for cc in np.ndindex(2, 2, 2)
    ])
    centre = corners.mean(0)
    local = (corners - centre) @ d  # coordinates along the SPECT axes
    extent = local.max(0) - local.min(0)
    s_xy = uniform(rng, ranges.spect_spacing_mm)
    s_z = s_xy if rng.random() < 0.6 else float(np.clip(s_xy * rng.uniform(0.9, 1.1), *ranges.spect_spacing_mm))
    spacing = np.array([s_xy, s_xy, s_z])
    margin = uniform(rng, ranges.spect_xy_margin_mm)
    coverage = uniform(rng, ranges.spect_z_coverage)
    want = np.array([extent[0] + margin, extent[1] + margin, extent[2] * coverage])
    size = np.maximum(1, np.floor(want / spacing)).astype(int)
    size[2] = max(1, min(size[2], int(extent[2] / spacing[2])))
    slack_z = max(0.0, extent[2] - size[2] * spacing[2])
    shift = np.array([uniform(rng, (-10, 10)), uniform(rng, (-10, 10)), uniform(rng, (-slack_z / 2, slack_z / 2))])
    origin = centre + d @ (shift - (size - 1) / 2.0 * spacing)
    return blank_geometry(size[::-1], spacing, origin, d.ravel())


def rigid_transform(centre: Sequence[float], axis: Sequence[float], angle_deg: float,
                     shift: Sequence[float]) -> sitk.Euler3DTransform:
    """Rotation by ``angle_deg`` about ``axis`` through ``centre``, then translation by ``shift`` (mm)."""
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter([float(v) for v in centre])
    rigid.SetMatrix(sitk.VersorTransform([float(v) for v in axis], math.radians(angle_deg)).GetMatrix())
    rigid.SetTranslation([float(v) for v in shift])
    return rigid


def misregistration_transform(params: Mapping[str, Any]) -> sitk.Euler3DTransform:
    """The SPECT/CT misregistration a phantom recorded in its ``params``: the SPECT's activity at physical
    point x is the CT-aligned activity at ``transform.TransformPoint(x)``. Resampling a CT-grid image
    through it (``sitk.Resample(image, image, transform)``) puts that image where the SPECT shows it."""
    return rigid_transform(params["misregistration_centre_mm"], params["misregistration_rotation_axis"],
                            params["misregistration_rotation_deg"], params["misregistration_shift_vector_mm"])


def finish_case(
    rng: np.random.Generator,
    anatomy: Anatomy,
    params: Dict[str, Any],
    ranges: SimulationRanges,
    spect_direction: Optional[Sequence[float]],
    simulated_ct: bool,
) -> PhantomCase:
    """Uptake heterogeneity, lesions, CT noise and the SPECT imaging chain; assemble the case.

    ``simulated_ct``: a simulated CT gets partial-volume blur and the full sampled noise; a real CT (already
    noisy) gets half of it and no blur. ``params`` is completed in place and becomes the case's params.
    """
    ct_grid, up = anatomy.ct_grid, anatomy.uptakes
    activity = anatomy.activity
    activity *= 1.0 + up["uptake_heterogeneity"] * smooth_field(rng, ct_grid) * (activity > 0)
    truth = anatomy.bone.astype(np.uint8)
    lesions = add_lesions(rng, ranges, ct_grid, anatomy.bone, anatomy.hu, activity, truth)
    params.update({k: rounded(v) for k, v in up.items()})
    params["lesion_count"] = len(lesions)
    params["lesions"] = lesions
    ct = _noisy_ct(rng, ranges, anatomy.hu, ct_grid, simulated_ct, params)
    spect = _simulate_spect(rng, ranges, activity, anatomy.body, ct_grid, spect_direction, params)
    params.update(
        ct_spacing_xyz_mm=[rounded(s) for s in ct_grid.GetSpacing()],
        ct_direction=[rounded(v, 6) for v in ct_grid.GetDirection()],
        bone_voxels=int((truth > 0).sum()),
        lesion_voxels=int((truth == LESION).sum()),
    )
    return PhantomCase(spect=spect, ct=ct, truth=image_on(truth, ct_grid), params=params)


def _noisy_ct(rng: np.random.Generator, ranges: SimulationRanges, hu: np.ndarray, ct_grid: sitk.Image,
              simulated: bool, params: Dict[str, Any]) -> sitk.Image:
    """int16 CT: mild partial-volume blur (simulated CTs only) and Gaussian noise."""
    noise_hu = uniform(rng, ranges.ct_noise_hu) * (1.0 if simulated else 0.5)
    params["ct_noise_hu"] = rounded(noise_hu)
    if simulated:
        hu = ndimage.gaussian_filter(hu, 0.5, truncate=2.0)
    hu = hu + rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_hu)
    return image_on(np.clip(np.rint(hu), -1024, 3071).astype(np.int16), ct_grid)


def _sample_misregistration(rng: np.random.Generator,
                            ranges: SimulationRanges) -> Tuple[float, np.ndarray, float, np.ndarray]:
    """(shift length mm, shift vector, rotation deg, unit rotation axis) of the SPECT/CT misregistration."""
    shift_mm = uniform(rng, ranges.misregistration_shift_mm)
    rot_deg = uniform(rng, ranges.misregistration_rotation_deg)
    shift_dir = rng.normal(size=3)
    shift = shift_dir / np.linalg.norm(shift_dir) * shift_mm
    rot_axis = rng.normal(size=3)
    rot_axis /= np.linalg.norm(rot_axis)
    return shift_mm, shift, rot_deg, rot_axis


def _simulate_spect(
    rng: np.random.Generator,
    ranges: SimulationRanges,
    activity: np.ndarray,
    body: np.ndarray,
    ct_grid: sitk.Image,
    spect_direction: Optional[Sequence[float]],
    params: Dict[str, Any],
) -> sitk.Image:
    """The SPECT counts image of ``activity`` (see the module docstring); its parameters go into ``params``."""
    fwhm = uniform(rng, ranges.psf_fwhm_mm)
    axial = uniform(rng, ranges.psf_axial_ratio)
    shift_mm, shift, rot_deg, rot_axis = _sample_misregistration(rng, ranges)
    direction = tuple(spect_direction) if spect_direction is not None else ct_grid.GetDirection()
    if len(direction) != 9:
        raise InputError("spect_direction must have 9 numbers (a row-major 3x3 matrix)")
    spect_ref = spect_grid(rng, ranges, ct_grid, direction)
    count_density = log_uniform(rng, ranges.count_density)
    post = uniform(rng, ranges.postfilter_fwhm_mm)
    scatter = uniform(rng, ranges.scatter_fraction)
    scatter_fwhm = uniform(rng, ranges.scatter_fwhm_mm)
    mu = uniform(rng, ranges.attenuation_mu_per_mm)
    osem, osem_stream = sample_osem(params["seed"], ranges, fwhm)

    sig = fwhm * FWHM_TO_SIGMA
    blurred = sitk.SmoothingRecursiveGaussian(image_on(activity, ct_grid), [sig, sig, sig * axial])
    centre = np.array(ct_grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ct_grid.GetSize()]))
    rigid = rigid_transform(centre, rot_axis, rot_deg, shift)
    expected = sitk.Resample(blurred, spect_ref, rigid, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    if scatter > 0:
        ssig = scatter_fwhm * FWHM_TO_SIGMA
        expected = expected + scatter * sitk.SmoothingRecursiveGaussian(expected, [ssig] * 3)
    exp_arr = sitk.GetArrayFromImage(expected).astype(np.float64)
    if mu > 0:
        body_img = image_on(body.astype(np.uint8), ct_grid)
        body_s = sitk.GetArrayFromImage(sitk.Resample(body_img, spect_ref, rigid, sitk.sitkNearestNeighbor, 0))
        depth = ndimage.distance_transform_edt(body_s, sampling=spect_ref.GetSpacing()[::-1])
        exp_arr *= np.exp(-mu * depth)
    voxel_ml = float(np.prod(spect_ref.GetSpacing())) / 1000.0
    exp_arr *= count_density * voxel_ml
    if osem is None:
        counts = rng.poisson(np.maximum(exp_arr, 0.0)).astype(np.float32)
    else:
        counts = osem_spect(exp_arr, spect_ref.GetSpacing()[0], osem, osem_stream)
    if post > 0.5:
        sig_vox = [post * FWHM_TO_SIGMA / s for s in spect_ref.GetSpacing()[::-1]]
        counts = ndimage.gaussian_filter(counts, sig_vox, truncate=3.0).astype(np.float32)

    params.update(
        psf_fwhm_mm=rounded(fwhm),
        psf_axial_ratio=rounded(axial),
        spect_spacing_mm=[rounded(s) for s in spect_ref.GetSpacing()],
        spect_origin_mm=[rounded(s) for s in spect_ref.GetOrigin()],
        spect_shape_zyx=list(counts.shape),
        spect_direction=[rounded(v, 6) for v in spect_ref.GetDirection()],
        count_density=rounded(count_density),
        expected_total_counts=rounded(float(exp_arr.sum()), 1),
        total_counts=rounded(float(counts.sum()), 1),
        spect_reconstruction=None if osem is None else osem.as_params(),
        postfilter_fwhm_mm=rounded(post),
        scatter_fraction=rounded(scatter),
        scatter_fwhm_mm=rounded(scatter_fwhm),
        attenuation_mu_per_mm=rounded(mu, 6),
        misregistration_shift_mm=rounded(shift_mm),
        misregistration_shift_vector_mm=[rounded(v) for v in shift],
        misregistration_rotation_deg=rounded(rot_deg),
        misregistration_rotation_axis=[rounded(v) for v in rot_axis],
        misregistration_centre_mm=[rounded(v) for v in centre],
        misregistration_note=(
            "the SPECT's activity at physical point x is the CT-aligned activity at R(x - c) + c + t "
            "(ITK Euler3DTransform, rotation R about the axis, centre c, translation t)"
        ),
    )
    return image_on(counts, spect_ref)
