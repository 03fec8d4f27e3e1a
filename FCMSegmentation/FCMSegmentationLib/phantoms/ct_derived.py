"""CT-derived phantoms: a real CT and its bone labels (e.g. TotalSegmentator's), resampled by physical
coordinates onto a coarser, randomly cropped (and possibly mirrored-index) grid, with simulated activity."""
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import InputError
from ..preprocessing import as_volume
from .case import ORGAN_CODES, PhantomCase
from .geometry import blank_geometry, image_on
from .imaging import Anatomy, finish_case
from .ranges import (
    TRAINING_RANGES,
    SimulationRanges,
    check_seed,
    ranges_name,
    rounded,
    sample_uptakes,
    uniform,
)

# TotalSegmentator "total" task ids (v2).
TOTALSEG_BONE_IDS = tuple(range(25, 51)) + tuple(range(69, 79)) + tuple(range(91, 117))  # 117: cartilage
TOTALSEG_SPINE_IDS = tuple(range(25, 51))
TOTALSEG_ORGAN_IDS = {2: "kidney", 3: "kidney", 5: "liver", 21: "bladder"}


def _label_array(labels: sitk.Image, role: str) -> np.ndarray:
    if labels.GetNumberOfComponentsPerPixel() != 1 or labels.GetDimension() != 3:
        raise InputError(f"{role}: expected a 3-D single-component label map")
    arr = sitk.GetArrayFromImage(labels)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise InputError(f"{role}: label values must be integers")
        arr = arr.astype(np.int32)
    return arr


def bone_mask_from_totalsegmentator(labels: sitk.Image) -> Tuple[sitk.Image, sitk.Image]:
    """Split a TotalSegmentator 'total' label map into (bone, organs), both uint8 on its own grid.

    bone: 1 for ids 25-50 (vertebrae, sacrum), 69-78 (humeri, scapulae, clavicles, femurs, hips) and
    91-116 (skull, ribs, sternum); costal cartilage (117) is not bone. organs: :data:`ORGAN_CODES`
    (1 kidneys = ids 2, 3; 2 liver = 5; 3 urinary bladder = 21), 0 elsewhere.
    """
    return _totalsegmentator_bone_and_organs(_label_array(labels, "bone labels"), labels)


def _totalsegmentator_bone_and_organs(arr: np.ndarray, labels: sitk.Image) -> Tuple[sitk.Image, sitk.Image]:
    bone = np.isin(arr, TOTALSEG_BONE_IDS).astype(np.uint8)
    organs = np.zeros(arr.shape, np.uint8)
    for label_id, name in TOTALSEG_ORGAN_IDS.items():
        organs[arr == label_id] = ORGAN_CODES[name]
    return image_on(bone, labels), image_on(organs, labels)


def _split_labels(
    bone_labels: sitk.Image, organ_labels: Optional[sitk.Image]
) -> Tuple[sitk.Image, Optional[sitk.Image], Optional[sitk.Image], str]:
    """(bone, organs, spine, how): a 0/1 map is a bone mask; any other values are TotalSegmentator ids."""
    arr = _label_array(bone_labels, "bone labels")
    values = np.unique(arr)
    if organ_labels is None and np.any((values != 0) & (values != 1)):
        bone, organs = _totalsegmentator_bone_and_organs(arr, bone_labels)
        spine = image_on(np.isin(arr, TOTALSEG_SPINE_IDS).astype(np.uint8), bone_labels)
        return bone, organs, spine, "totalsegmentator"
    bone = image_on((arr != 0).astype(np.uint8), bone_labels)
    return bone, organ_labels, None, "mask"


def ct_derived_phantom(
    seed: int,
    ct: sitk.Image,
    bone_labels: sitk.Image,
    ranges: SimulationRanges = TRAINING_RANGES,
    organ_labels: Optional[sitk.Image] = None,
    spect_direction: Optional[Sequence[float]] = None,
) -> PhantomCase:
    """A phantom from a real CT and its bone labels, with simulated SPECT and lesions.

    ``bone_labels``: a 0/1 bone mask, or a TotalSegmentator 'total' label map (detected by values other
    than 0/1 when ``organ_labels`` is not given; kidneys, liver and bladder then become hot organs).
    ``organ_labels``: optional map with :data:`ORGAN_CODES`. Labels may have any grid and direction: they
    are resampled onto the phantom's CT grid by physical coordinates (nearest neighbour), never by index.
    The CT is cropped around the body (random margins, random axial sub-range for long scans),
    resampled to a coarser in-plane spacing (``ranges.ct_spacing_mm``, never finer than the original),
    and its index x-axis is reversed at random (the direction matrix changes with it, so the anatomy stays
    where it is physically).
    """
    seed = check_seed(seed)
    ranges.validate()
    rng = np.random.default_rng(seed)
    ct = as_volume(ct, "CT")
    bone_src, organ_src, spine_src, label_kind = _split_labels(bone_labels, organ_labels)
    params: Dict[str, Any] = {"seed": seed, "kind": "ct", "ranges": ranges_name(ranges), "label_kind": label_kind}

    ct_grid = _cropped_grid(rng, ranges, ct, params)
    hu = _resample_ct(ct, ct_grid)
    bone = _labels_on(bone_src, ct_grid) > 0
    if not bone.any():
        raise InputError(
            "bone labels: no bone inside the CT's field of view; check that the label map belongs to this CT "
            "(they are matched by physical coordinates)"
        )
    organs = _labels_on(organ_src, ct_grid)
    spine = _labels_on(spine_src, ct_grid)
    spine = (spine > 0) & bone if spine is not None else np.zeros_like(bone)

    body, lungs, air = _tissues_from_hu(hu, bone)
    uptakes = sample_uptakes(rng, ranges)
    if not spine.any():
        uptakes["spine_factor"] = 1.0
    activity = _activity(uptakes, hu, bone, spine, body, lungs, air, organs)
    params.update(ct_shape_zyx=[int(v) for v in hu.shape], organs_from_labels=organs is not None)
    anatomy = Anatomy(ct_grid, hu, activity, bone, body, uptakes)
    return finish_case(rng, anatomy, params, ranges, spect_direction, simulated_ct=False)


def _cropped_grid(rng: np.random.Generator, ranges: SimulationRanges, ct: sitk.Image,
                  params: Dict[str, Any]) -> sitk.Image:
    """The phantom's CT grid: the body's bounding box plus random margins (a random axial sub-range for
    scans of 16 slices or more), at a coarser sampled spacing, its index x-axis reversed half the time."""
    arr = sitk.GetArrayViewFromImage(ct)
    size = np.array(ct.GetSize())
    spacing0 = np.array(ct.GetSpacing())
    fg = arr > -400.0
    if not fg.any():
        raise InputError("CT: no voxel above -400 HU, so no body to build a phantom from (is it a CT in HU?)")
    xs = np.nonzero(fg.any(axis=(0, 1)))[0]
    ys = np.nonzero(fg.any(axis=(0, 2)))[0]
    margins = rng.uniform(5.0, 40.0, 4)
    lo = np.array([xs[0] - margins[0] / spacing0[0], ys[0] - margins[1] / spacing0[1], -0.5])
    hi = np.array([xs[-1] + margins[2] / spacing0[0], ys[-1] + margins[3] / spacing0[1], size[2] - 0.5])
    lo[:2] = np.maximum(lo[:2], -0.5)
    hi[:2] = np.minimum(hi[:2], size[:2] - 0.5)
    if size[2] >= 16:
        keep = int(math.ceil(size[2] * uniform(rng, (0.75, 1.0))))
        start = int(rng.integers(0, size[2] - keep + 1))
        lo[2], hi[2] = start - 0.5, start + keep - 0.5
    s_xy = max(uniform(rng, ranges.ct_spacing_mm), float(spacing0[:2].max()))
    s_z = float(spacing0[2]) if spacing0[2] >= ranges.ct_slice_mm[0] else uniform(rng, ranges.ct_slice_mm)
    extent = (hi - lo) * spacing0
    while True:
        new_spacing = np.array([s_xy, s_xy, s_z])
        n = np.maximum(1, np.round(extent / new_spacing)).astype(int)
        if int(np.prod(n)) <= ranges.max_ct_voxels:
            break
        s_xy *= 1.05
    new_spacing = extent / n  # exactly covers the box
    d = np.array(ct.GetDirection()).reshape(3, 3)
    start_phys = np.array(ct.TransformContinuousIndexToPhysicalPoint(lo.tolist()))
    origin = start_phys + d @ (new_spacing / 2.0)
    flip = bool(rng.random() < 0.5)
    d_out = d.copy()
    if flip:
        origin = origin + d[:, 0] * (n[0] - 1) * new_spacing[0]
        d_out[:, 0] = -d_out[:, 0]
    params.update(
        source_ct_size=[int(v) for v in size],
        source_ct_spacing_mm=[rounded(v) for v in spacing0],
        crop_index_lo_xyz=[rounded(v) for v in lo],
        crop_index_hi_xyz=[rounded(v) for v in hi],
        crop_margins_mm=[rounded(v) for v in margins],
        ct_spacing_mm=rounded(new_spacing[0]),
        ct_slice_mm=rounded(new_spacing[2]),
        flip_x_index=flip,
    )
    return blank_geometry(n[::-1], new_spacing, origin, d_out.ravel())


def _resample_ct(ct: sitk.Image, ct_grid: sitk.Image) -> np.ndarray:
    """The CT's HU on ``ct_grid`` (float32), Gaussian anti-aliased before linear resampling."""
    spacing0, new_spacing = ct.GetSpacing(), ct_grid.GetSpacing()
    sigma = [max(0.0, 0.4 * math.sqrt(max(0.0, new_spacing[k] ** 2 - spacing0[k] ** 2)) / spacing0[k])
             for k in range(3)]
    source = sitk.GetArrayFromImage(ct)
    smooth = ndimage.gaussian_filter(source, sigma[::-1], truncate=2.5) if max(sigma) > 0.1 else source
    return sitk.GetArrayFromImage(
        sitk.Resample(image_on(smooth.astype(np.float32), ct), ct_grid, sitk.Transform(), sitk.sitkLinear, -1024.0,
                      sitk.sitkFloat32)
    )


def _labels_on(labels: Optional[sitk.Image], ct_grid: sitk.Image) -> Optional[np.ndarray]:
    """``labels`` (uint8) on ``ct_grid`` by physical coordinates, nearest neighbour; None stays None."""
    if labels is None:
        return None
    labels = sitk.Cast(labels, sitk.sitkUInt8) if labels.GetPixelID() != sitk.sitkUInt8 else labels
    return sitk.GetArrayFromImage(sitk.Resample(labels, ct_grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                sitk.sitkUInt8))


def _tissues_from_hu(hu: np.ndarray, bone: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(body, lungs, air inside the body) from HU: the largest connected region above -400 HU, holes filled
    slice by slice, plus bone; lungs are the filled holes above -960 HU, air those at or below."""
    fg = hu > -400.0
    comp, ncomp = ndimage.label(fg)
    if ncomp > 1:
        sizes = ndimage.sum_labels(fg, comp, index=np.arange(1, ncomp + 1))
        fg = comp == (1 + int(np.argmax(sizes)))
    hull = np.stack([ndimage.binary_fill_holes(sl) for sl in fg])
    return hull | bone, hull & ~fg & (hu > -960.0), hull & (hu <= -960.0)


def _activity(uptakes: Dict[str, float], hu: np.ndarray, bone: np.ndarray, spine: np.ndarray, body: np.ndarray,
              lungs: np.ndarray, air: np.ndarray, organs: Optional[np.ndarray]) -> np.ndarray:
    """float32 uptake per tissue, soft tissue = 1; fat by HU < -30, hot organs where labelled."""
    activity = np.zeros(hu.shape, np.float32)
    activity[body] = 1.0
    activity[body & (hu < -30.0)] = uptakes["fat_uptake"]
    activity[lungs] = uptakes["lung_uptake"]
    activity[air] = 0.0
    if organs is not None:
        activity[organs == ORGAN_CODES["liver"]] = uptakes["liver_uptake"]
        activity[organs == ORGAN_CODES["kidney"]] = uptakes["kidney_uptake"]
        activity[organs == ORGAN_CODES["bladder"]] = uptakes["bladder_uptake"]
    activity[bone] = uptakes["bone_ratio"]
    activity[ndimage.binary_erosion(bone)] *= uptakes["marrow_factor"]
    activity[spine] *= uptakes["spine_factor"]
    return activity
