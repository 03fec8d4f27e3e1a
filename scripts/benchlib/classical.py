"""Classical peers of the FCMSegmentation model, each returning a uint8 label image (0 background,
1 bone, 2 lesion) on the grid of a given reference image (the truth's / the CT's):

1. :func:`otsu_spect` — multi-class Otsu on the SPECT alone (2 thresholds -> 3 classes; or more
   thresholds, the top two classes being bone and lesion).
2. :func:`ct_threshold_otsu` — bone = CT > 150 HU (or another threshold), closed and hole-filled for
   marrow; lesion = SPECT Otsu inside that bone.
3. :func:`fcm_spect_ct` — classical fuzzy C-means (scikit-fuzzy) on normalised SPECT and CT.
4. :class:`GrowCut` — Slicer's Grow-from-seeds (``vtkImageGrowCutSegment`` from slicer-core) on a
   SPECT/CT intensity combination (:func:`growcut_intensity`), seeded with painted strokes.

Stroke/seed codes follow the engine's scribbles convention: 0 none, 1 background, 2 bone, 3 lesion.
"""
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .common import ENGINE  # noqa: F401  (puts the engine on sys.path)

BONE_HU = 150.0  # the example; see TUNED_BONE_HU
# Chosen among 150/200/250/300/350 HU by mean bone Dice of ct_bone_mask on 4 validation phantoms
# (VALIDATION_SEED_BASE + 0..2 procedural, + 100 CT-derived; never the benchmark cases): 0.73, 0.80, 0.81,
# 0.82, 0.80. 150 HU also catches the partial-volume halo around the phantoms' cortex.
TUNED_BONE_HU = 300.0


def on_reference(image: sitk.Image, reference: sitk.Image, linear: bool = True, default: float = 0.0) -> np.ndarray:
    """``image`` resampled onto ``reference``'s grid by physical coordinates, float32 (z, y, x) array."""
    out = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), reference, sitk.Transform(),
                        sitk.sitkLinear if linear else sitk.sitkNearestNeighbor, float(default), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def labels_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8))
    image.CopyInformation(reference)
    return image


def otsu_thresholds(values: np.ndarray, count: int, bins: int = 256) -> Tuple[float, ...]:
    """Otsu thresholds of a 1-D sample (SimpleITK's OtsuMultipleThresholds on a 1-row image)."""
    values = np.asarray(values, dtype=np.float32).ravel()
    if values.size < 2 or float(values.max() - values.min()) <= 0:
        return tuple(float(values.max()) if values.size else 0.0 for _ in range(count))
    image = sitk.GetImageFromArray(values[None, None, :])
    otsu = sitk.OtsuMultipleThresholdsImageFilter()
    otsu.SetNumberOfThresholds(count)
    otsu.SetNumberOfHistogramBins(bins)
    otsu.Execute(image)
    return tuple(float(t) for t in otsu.GetThresholds())


# ---------------------------------------------------------------------------------------- 1. Otsu

def otsu_spect(spect: sitk.Image, reference: sitk.Image, thresholds: int = 2, bins: Optional[int] = None) -> sitk.Image:
    """Multi-class Otsu on the SPECT: ``thresholds`` Otsu thresholds computed on the SPECT's own voxels
    (its whole field; ``bins`` histogram bins, default 256 for 2 thresholds and 128 for more — the
    exhaustive search grows as bins^thresholds), applied to the SPECT linearly resampled onto ``reference``: above the
    highest threshold lesion, between the two highest bone, the rest background. With 2 thresholds that
    is the plain 3-class Otsu (< t1 background, [t1, t2) bone, >= t2 lesion); with more, the lowest classes
    (air, soft tissue) all become background. (Thresholding the interpolated SPECT rather than
    nearest-neighbour-resampling SPECT-grid labels gives smoother borders on the finer grid.)"""
    counts = sitk.GetArrayViewFromImage(spect)
    cuts = otsu_thresholds(counts, thresholds, bins or (256 if thresholds <= 2 else 128))
    on_grid = on_reference(spect, reference)
    labels = np.where(on_grid >= cuts[-1], 2, np.where(on_grid >= cuts[-2], 1, 0))
    return labels_image(labels, reference)


# ---------------------------------------------------------------------------- 2. CT threshold + Otsu

def ct_bone_mask(hu: np.ndarray, threshold: float = BONE_HU, closing_iterations: int = 1,
                 spacing_xyz: Sequence[float] = (1.0, 1.0, 1.0), max_hole_mm2: float = 400.0) -> np.ndarray:
    """Bone from CT: HU > ``threshold``; a 3-D binary closing (6-connected structuring element,
    ``closing_iterations`` voxels) bridges thin gaps in cortex, then holes in each axial slice up to
    ``max_hole_mm2`` are filled (marrow below the threshold inside a closed cortex becomes bone; larger
    holes — the chest or pelvis enclosed by ribs or pelvic ring — are left alone)."""
    bone = hu > threshold
    if closing_iterations > 0:
        structure = ndimage.generate_binary_structure(3, 1)
        pad = closing_iterations + 1
        closed = ndimage.binary_closing(np.pad(bone, pad), structure, iterations=closing_iterations)
        bone = closed[(slice(pad, -pad),) * 3]
    pixel_mm2 = float(spacing_xyz[0]) * float(spacing_xyz[1])
    max_pixels = max(1, int(max_hole_mm2 / pixel_mm2))
    filled = bone.copy()
    for z, plane in enumerate(bone):
        holes = ndimage.binary_fill_holes(plane) & ~plane
        if not holes.any():
            continue
        labelled, count = ndimage.label(holes)
        sizes = np.bincount(labelled.ravel())
        small = np.nonzero(sizes <= max_pixels)[0]
        small = small[small > 0]
        filled[z] |= np.isin(labelled, small)
    return filled


def ct_threshold_otsu(spect: sitk.Image, ct: sitk.Image, reference: Optional[sitk.Image] = None,
                      threshold: float = BONE_HU) -> sitk.Image:
    """Bone by CT threshold (:func:`ct_bone_mask`), lesions by a 1-threshold Otsu of the SPECT (linearly
    resampled onto the reference grid) over the bone voxels: bone voxels above it are lesion."""
    reference = reference if reference is not None else ct
    hu = on_reference(ct, reference, default=-1000.0)
    bone = ct_bone_mask(hu, threshold, spacing_xyz=reference.GetSpacing())
    labels = bone.astype(np.uint8)
    if bone.any():
        activity = on_reference(spect, reference)
        (cut,) = otsu_thresholds(activity[bone], 1)
        labels[bone & (activity > cut)] = 2
    return labels_image(labels, reference)


# ------------------------------------------------------------------------------------ 3. classical FCM

def fcm_spect_ct(spect: sitk.Image, ct: sitk.Image, reference: Optional[sitk.Image] = None,
                 spacing_mm: float = 3.0, m: float = 2.0, sample: int = 200_000, seed: int = 0,
                 body_hu: float = -400.0) -> Tuple[sitk.Image, Dict[str, object]]:
    """Fuzzy C-means (``skfuzzy.cluster.cmeans``, 3 clusters, fuzzifier ``m``) on two features per voxel
    — the engine's normalised SPECT and CT on its working grid (``prepare_case``, ``spacing_mm``) — over
    the body voxels inside the SPECT field (CT > ``body_hu``; air is background).

    Fitted on a seeded random subsample of ``sample`` voxels; every voxel then goes to the nearest
    centre (= the argmax of its FCM memberships). Clusters -> classes: the highest CT centroid is bone,
    of the other two the higher SPECT centroid is lesion, the last background. (Lesions are far too rare
    to form a cluster of their own: on phantoms the three clusters are soft tissue, hot soft tissue or
    organs, and bone, so FCM's lesion class is mostly hot soft tissue — the ordering by SPECT first
    gave bone Dice < 0.1 instead.) Labels are
    nearest-neighbour resampled onto ``reference``. Returns (labels, info with the centres)."""
    import skfuzzy

    from FCMSegmentationLib.preprocessing import CT_WINDOW, prepare_case

    reference = reference if reference is not None else ct
    case = prepare_case(spect, ct, spacing_mm)
    body_level = (body_hu - CT_WINDOW[0]) / CT_WINDOW[1]
    inside = case.valid & (case.features[1] > body_level)
    data = case.features[:2][:, inside].astype(np.float64)  # (2, N)
    rng = np.random.default_rng(seed)
    fit = data if data.shape[1] <= sample else data[:, rng.choice(data.shape[1], sample, replace=False)]
    centres, _, _, _, _, iterations, _ = skfuzzy.cluster.cmeans(fit, 3, m, error=1e-5, maxiter=300, seed=seed)
    distances = ((data[None, :, :] - centres[:, :, None]) ** 2).sum(axis=1)  # (3, N)
    nearest = np.argmin(distances, axis=0)
    bone = int(np.argmax(centres[:, 1]))
    others = [k for k in range(3) if k != bone]
    lesion = max(others, key=lambda k: centres[k, 0])
    mapping = np.zeros(3, dtype=np.uint8)
    mapping[lesion], mapping[bone] = 2, 1
    working = np.zeros(case.valid.shape, dtype=np.uint8)
    working[inside] = mapping[nearest]
    work_image = labels_image(working, case.grid)
    labels = sitk.Resample(work_image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    info = {"centres_spect_ct": centres.round(4).tolist(), "class_of_cluster": mapping.tolist(),
            "iterations": int(iterations), "voxels": int(data.shape[1])}
    return labels, info


# ------------------------------------------------------------------------------------- 4. GrowCut

def growcut_intensity(spect: sitk.Image, ct: Optional[sitk.Image], reference: sitk.Image,
                      spect_weight: float = 1000.0) -> np.ndarray:
    """The single-channel intensity GrowCut runs on (int16, on ``reference``): clip(HU, -1000, 2000)
    + ``spect_weight`` * clip(SPECT / p99.5, 0, 3), with p99.5 the 99.5th percentile of the positive SPECT
    voxels. The CT draws the bone edges, the SPECT term (a hot lesion adds ~1000) the lesion edges — a
    lesion is invisible on CT alone unless sclerotic/lytic. Without a CT: the SPECT term alone."""
    activity = on_reference(spect, reference)
    positive = activity[activity > 0]
    scale = float(np.percentile(positive, 99.5)) if positive.size else 1.0
    intensity = spect_weight * np.clip(activity / max(scale, 1e-6), 0.0, 3.0)
    if ct is not None:
        intensity = intensity + np.clip(on_reference(ct, reference, default=-1000.0), -1000.0, 2000.0)
    return np.rint(intensity).astype(np.int16)


def _to_vtk(array: np.ndarray, spacing) -> "object":
    import vtk
    from vtk.util import numpy_support

    array = np.ascontiguousarray(array)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.SetSpacing(*[float(s) for s in spacing])
    vtk_type = numpy_support.get_vtk_array_type(array.dtype)
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True, array_type=vtk_type)
    image.GetPointData().SetScalars(scalars)
    return image


class GrowCut:
    """Slicer's Grow-from-seeds on one intensity volume, used as Slicer's effect uses it: the filter is
    kept, so after the first run (initialisation) a call with more seeds is an incremental update.

    ``intensity``: (z, y, x) int16 array; ``spacing``: (x, y, z) mm (GrowCut weighs neighbour distances by
    it); ``reference``: the image whose geometry the labels get. :meth:`segment` takes a seed array of
    stroke codes (0 none, 1 background, 2 bone, 3 lesion) and returns class labels (0/1/2) as an image.
    ``distance_penalty`` is Slicer's "seed locality" (0 = Slicer's default).
    """

    def __init__(self, intensity: np.ndarray, reference: sitk.Image, distance_penalty: float = 0.0):
        from slicer import vtkImageGrowCutSegment

        self.reference = reference
        self.spacing = reference.GetSpacing()
        self.shape = tuple(intensity.shape)
        self.filter = vtkImageGrowCutSegment()
        self.filter.SetIntensityVolume(_to_vtk(intensity.astype(np.int16), self.spacing))
        self.filter.SetDistancePenalty(float(distance_penalty))
        self.runs = 0
        self.last_seconds = float("nan")

    def segment(self, seeds: np.ndarray) -> sitk.Image:
        from vtk.util import numpy_support

        seeds = np.asarray(seeds)
        if seeds.shape != self.shape:
            raise ValueError(f"seeds {seeds.shape} do not match the intensity volume {self.shape}")
        if not seeds.any():
            raise ValueError("GrowCut needs at least one seed")
        start = time.perf_counter()
        self.filter.SetSeedLabelVolume(_to_vtk(seeds.astype(np.int16), self.spacing))
        self.filter.Update()
        output = self.filter.GetOutput()
        scalars = output.GetPointData().GetScalars() if output is not None else None
        if scalars is None:
            raise RuntimeError("vtkImageGrowCutSegment produced no output (geometry mismatch?)")
        codes = numpy_support.vtk_to_numpy(scalars).reshape(self.shape)
        self.last_seconds = time.perf_counter() - start
        self.runs += 1
        labels = np.clip(codes.astype(np.int16) - 1, 0, 2).astype(np.uint8)
        return labels_image(labels, self.reference)


def growcut_segment(spect: sitk.Image, ct: Optional[sitk.Image], reference: sitk.Image,
                    seeds: np.ndarray) -> sitk.Image:
    """One-shot Grow-from-seeds on :func:`growcut_intensity` with ``seeds`` (stroke codes on reference)."""
    return GrowCut(growcut_intensity(spect, ct, reference), reference).segment(seeds)


def spect_field_of_view(spect: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """Boolean (z, y, x) mask of ``reference``'s voxels whose centres lie inside the SPECT's field."""
    inside = sitk.Image(spect.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(spect)
    out = sitk.Resample(inside, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out).astype(bool)


BODY_HU = -400.0  # body = CT above this (air and lungs below)
