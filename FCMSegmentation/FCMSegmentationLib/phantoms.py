"""Simulated bone SPECT/CT phantoms with exact labels, for training and benchmarking.

No public labelled bone SPECT/CT exists, so (as the method's paper did with XCAT) the network is trained
on simulations. Two kinds of case are made, both returned as a :class:`PhantomCase`:

* **procedural** (:func:`procedural_phantom`): a 3-D torso built from analytic shapes (body outline,
  subcutaneous fat, lungs, heart, liver, kidneys, bladder, bowel gas; vertebrae with bodies, arches,
  spinous and transverse processes and disc gaps, sacrum, ribs, sternum, scapulae, clavicles, iliac
  wings, pubic/ischial rami, femoral heads and necks). Every bone is a cortex shell plus marrow.
* **CT-derived** (:func:`ct_derived_phantom`): a real CT plus a bone label map (e.g. TotalSegmentator's),
  resampled by physical coordinates onto a coarser, randomly cropped (and possibly mirrored-index) grid.

Both then get the same activity model and imaging chain:

activity on the CT grid (soft tissue 1, bone ``bone_ratio`` x, hot organs, lesions ``contrast`` x the
local bone uptake, some cold) -> Gaussian PSF (sampled FWHM, slightly anisotropic) -> rigid SPECT/CT
misregistration and resampling onto the SPECT's own grid (3-5 mm voxels, other origin/extent) ->
attenuation-like depth fall-off (uncorrected fraction) and a broad scatter component -> Poisson noise at a
sampled count density -> optional Gaussian post-filter (correlated, OS-EM-like texture).

Conventions: physical coordinates are ITK/DICOM LPS (x to the patient's left, y posterior, z superior);
arrays are SimpleITK (z, y, x). ``truth`` is uint8 (0 background, 1 bone, 2 lesion) on exactly the CT's
grid; lesion voxels are always inside bone. The SPECT is float32 (counts, post-filtered) on its own grid.
Every random draw comes from ``numpy.random.default_rng(seed)``: a seed gives the same case everywhere.

Known simplifications: the imaging model is image-space (no projector, no OS-EM iterations); attenuation
is a fall-off with depth below the body surface, not along projection lines; scatter is a broad Gaussian
of the activity; arms, skull and legs below the lesser trochanter are not modelled.
"""
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from . import imageio
from .errors import InputError, OutputError
from .preprocessing import as_volume
from .progress import report

Range = Tuple[float, float]
ProgressCallback = Callable[[float, str], None]

BACKGROUND, BONE, LESION = 0, 1, 2

# TotalSegmentator "total" task ids (v2).
TOTALSEG_BONE_IDS = tuple(range(25, 51)) + tuple(range(69, 79)) + tuple(range(91, 117))  # 117: cartilage
TOTALSEG_ORGAN_IDS = {2: "kidney", 3: "kidney", 5: "liver", 21: "bladder"}
# Codes of the organ map returned by bone_mask_from_totalsegmentator (and accepted as organ_labels).
ORGAN_CODES = {"kidney": 1, "liver": 2, "bladder": 3}

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass(frozen=True)
class SimulationRanges:
    """The range of every random parameter of the phantoms; values are drawn uniformly unless noted.

    Uptake values are relative to soft tissue (= 1). Lesion contrast is relative to the local bone uptake.
    ``count_density`` is expected counts per ml of unit (soft-tissue) activity before noise, drawn
    log-uniformly; the total counts of a case follow from it and the volume imaged.
    """

    # CT grid and field of view (procedural phantoms; CT-derived ones keep the real field)
    ct_spacing_mm: Range = (1.5, 3.0)  # in-plane
    ct_slice_mm: Range = (1.5, 3.0)
    field_width_mm: Range = (300.0, 400.0)
    field_length_mm: Range = (150.0, 300.0)
    max_ct_voxels: int = 3_500_000
    ct_noise_hu: Range = (5.0, 30.0)
    cortex_hu: Range = (700.0, 1500.0)
    marrow_hu: Range = (150.0, 400.0)
    cortex_thickness_mm: Range = (1.5, 3.0)
    # SPECT imaging
    psf_fwhm_mm: Range = (8.0, 18.0)
    psf_axial_ratio: Range = (0.9, 1.2)  # z FWHM / in-plane FWHM
    spect_spacing_mm: Range = (3.0, 5.0)
    spect_xy_margin_mm: Range = (0.0, 160.0)  # SPECT in-plane field beyond the CT's
    spect_z_coverage: Range = (0.8, 1.0)  # SPECT axial extent / CT axial extent
    count_density: Range = (40.0, 800.0)  # counts per ml of unit activity (log-uniform)
    postfilter_fwhm_mm: Range = (0.0, 8.0)
    scatter_fraction: Range = (0.0, 0.25)
    scatter_fwhm_mm: Range = (40.0, 80.0)
    attenuation_mu_per_mm: Range = (0.0, 0.008)  # uncorrected attenuation-like fall-off with depth
    # uptake
    bone_ratio: Range = (6.0, 14.0)  # bone : soft tissue
    marrow_factor: Range = (0.7, 1.1)  # marrow uptake / cortex uptake
    spine_factor: Range = (1.0, 1.4)  # extra uptake of vertebrae and sacrum
    uptake_heterogeneity: Range = (0.0, 0.25)  # amplitude of a smooth multiplicative field
    fat_uptake: Range = (0.4, 0.8)
    lung_uptake: Range = (0.15, 0.35)
    blood_pool_uptake: Range = (1.0, 1.8)
    bladder_uptake: Range = (5.0, 60.0)
    kidney_uptake: Range = (2.0, 8.0)
    liver_uptake: Range = (0.8, 2.5)
    # lesions
    lesion_count: Tuple[int, int] = (0, 6)  # inclusive
    lesion_diameter_mm: Range = (4.0, 20.0)
    lesion_contrast: Range = (1.5, 6.0)  # hot lesions, x local bone uptake
    cold_lesion_probability: float = 0.15
    cold_lesion_contrast: Range = (0.1, 0.5)
    lesion_ct_change_probability: float = 0.5  # sclerotic or lytic CT appearance
    sclerotic_delta_hu: Range = (200.0, 600.0)
    # SPECT/CT misregistration (rigid)
    misregistration_shift_mm: Range = (0.0, 4.0)
    misregistration_rotation_deg: Range = (0.0, 2.0)

    def validate(self) -> "SimulationRanges":
        """Raise :class:`InputError` if a range is reversed or a value is out of its domain."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                if len(value) != 2 or not value[0] <= value[1]:
                    raise InputError(f"simulation range {f.name}={value!r}: give (low, high) with low <= high")
                if value[0] < 0:
                    raise InputError(f"simulation range {f.name}={value!r}: values must be >= 0")
        for name in ("cold_lesion_probability", "lesion_ct_change_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"simulation parameter {name} must lie in [0, 1]")
        if self.count_density[0] <= 0 or self.spect_spacing_mm[0] <= 0 or self.ct_spacing_mm[0] <= 0:
            raise InputError("count_density and spacings must be > 0")
        return self

    def as_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


#: The ranges the model is trained on (the method document's values).
TRAINING_RANGES = SimulationRanges()

#: A domain shift for the refinement benchmark: a blurrier camera (FWHM 18-24 mm, beyond training's 8-18),
#: 4-20x fewer counts (10-40 counts/ml vs 40-800) and faint hot lesions (1.2-1.6x bone, below training's
#: 1.5-6x; no cold ones). Everything else is as in training.
SHIFTED_RANGES = dataclasses.replace(
    TRAINING_RANGES,
    psf_fwhm_mm=(18.0, 24.0),
    count_density=(10.0, 40.0),
    lesion_contrast=(1.2, 1.6),
    lesion_count=(1, 6),
    cold_lesion_probability=0.0,
)


@dataclass
class PhantomCase:
    """One simulated study.

    spect: float32 counts on its own SPECT grid. ct: int16 HU on the CT grid. truth: uint8 labels
    (0 background, 1 bone, 2 lesion) with exactly the CT's geometry. params: JSON-serialisable record
    of the seed, kind and every sampled parameter (lesions with centre, diameter and contrast).
    """

    spect: sitk.Image
    ct: sitk.Image
    truth: sitk.Image
    params: Dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- helpers


def _u(rng: np.random.Generator, r: Sequence[float]) -> float:
    return float(rng.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])


def _logu(rng: np.random.Generator, r: Sequence[float]) -> float:
    return float(math.exp(rng.uniform(math.log(r[0]), math.log(r[1])))) if r[1] > r[0] else float(r[0])


def _r(x: float, nd: int = 4) -> float:
    return float(round(float(x), nd))


def _image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(reference)
    return img


def _geometry(shape_zyx: Sequence[int], spacing, origin, direction) -> sitk.Image:
    img = sitk.Image([int(shape_zyx[2]), int(shape_zyx[1]), int(shape_zyx[0])], sitk.sitkUInt8)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(d) for d in direction])
    return img


class _Grid:
    """An axis-aligned grid in local millimetres (x, y, z), array order (z, y, x)."""

    def __init__(self, shape_zyx: Tuple[int, int, int], spacing_xyz, origin_xyz):
        self.shape = tuple(int(n) for n in shape_zyx)
        self.sp = np.asarray(spacing_xyz, dtype=float)
        self.org = np.asarray(origin_xyz, dtype=float)
        self.size_xyz = np.array(self.shape[::-1])
        self.x = self.org[0] + self.sp[0] * np.arange(self.shape[2])
        self.y = self.org[1] + self.sp[1] * np.arange(self.shape[1])
        self.z = self.org[2] + self.sp[2] * np.arange(self.shape[0])

    def paint_balls(self, mask: np.ndarray, points, radii, budget: int = 1_000_000) -> None:
        """Set ``mask`` True within ``radii`` mm of ``points`` (N, 3 local mm): tubes, plates, spheres."""
        pts = np.atleast_2d(np.asarray(points, dtype=float))
        if pts.size == 0:
            return
        rad = np.broadcast_to(np.asarray(radii, dtype=float), (len(pts),))
        ci = (pts - self.org) / self.sp
        reach = rad[:, None] / self.sp
        keep = np.all((ci + reach >= -0.5) & (ci - reach <= self.size_xyz - 0.5), axis=1)
        if not keep.any():
            return
        ci, rad = ci[keep], rad[keep]
        rmax = float(rad.max())
        half = np.ceil(rmax / self.sp + 0.5).astype(int)
        grids = np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij")
        offs = np.stack(grids, -1).reshape(-1, 3)
        offs = offs[((offs * self.sp) ** 2).sum(1) <= (rmax + 0.87 * self.sp.max()) ** 2].astype(np.int32)
        base = np.rint(ci).astype(np.int32)
        step = max(1, budget // len(offs))
        for i in range(0, len(ci), step):
            idx = base[i : i + step, None, :] + offs[None]
            d2 = (((idx - ci[i : i + step, None, :]) * self.sp) ** 2).sum(-1)
            ok = (d2 <= rad[i : i + step, None] ** 2) & np.all((idx >= 0) & (idx < self.size_xyz), -1)
            sel = idx[ok]
            mask[sel[:, 2], sel[:, 1], sel[:, 0]] = True

    def ellipsoid(self, centre, semi_axes):
        """(slices, boolean sub-array) of an axis-aligned ellipsoid, or None when outside."""
        c = np.asarray(centre, float)
        s = np.asarray(semi_axes, float)
        lo = np.floor((c - s - self.org) / self.sp).astype(int)
        hi = np.ceil((c + s - self.org) / self.sp).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, self.size_xyz)
        if np.any(hi <= lo):
            return None
        x = (self.x[lo[0] : hi[0]] - c[0]) / s[0]
        y = (self.y[lo[1] : hi[1]] - c[1]) / s[1]
        z = (self.z[lo[2] : hi[2]] - c[2]) / s[2]
        inside = z[:, None, None] ** 2 + y[None, :, None] ** 2 + x[None, None, :] ** 2 <= 1.0
        return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0])), inside


def _resample_curve(points: np.ndarray, step: float) -> np.ndarray:
    """Points along a polyline (K, 3) spaced ``step`` mm apart (ends included)."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(math.ceil(cum[-1] / max(step, 1e-3))) + 1)
    t = np.linspace(0.0, cum[-1], n)
    return np.stack([np.interp(t, cum, points[:, k]) for k in range(3)], axis=1)


def _bezier(p0, p1, p2, n: int = 40) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t**2 * np.asarray(p2)


def _smooth_field(rng: np.random.Generator, reference: sitk.Image, cell_mm: float = 60.0) -> np.ndarray:
    """A smooth random field in about [-1, 1] on ``reference``'s grid (coarse noise, linearly upsampled)."""
    size = np.array(reference.GetSize(), float)
    spacing = np.array(reference.GetSpacing(), float)
    extent = size * spacing
    cells = np.maximum(1, np.ceil(extent / cell_mm)).astype(int)
    n = cells + 3  # one node before the start, two after the end
    step = extent / cells
    coarse = sitk.GetImageFromArray(rng.uniform(-1.0, 1.0, size=tuple(n[::-1])).astype(np.float32))
    coarse.SetSpacing(step.tolist())
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    start = np.array(reference.TransformContinuousIndexToPhysicalPoint((-0.5, -0.5, -0.5)))
    coarse.SetOrigin((start - direction @ step).tolist())
    coarse.SetDirection(reference.GetDirection())
    out = sitk.Resample(coarse, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


# ------------------------------------------------------------------------------------------ procedural

_REGIONS = {  # anatomical height (mm above the femoral-head centres, unscaled) of the field centre
    "pelvis": (60.0, 180.0),
    "abdomen-pelvis": (150.0, 280.0),
    "abdomen": (260.0, 400.0),
    "thorax-abdomen": (360.0, 470.0),
    "thorax": (450.0, 580.0),
}


def procedural_phantom(
    seed: int,
    ranges: SimulationRanges = TRAINING_RANGES,
    spect_direction: Optional[Sequence[float]] = None,
) -> PhantomCase:
    """A procedural torso phantom (see the module docstring); deterministic in ``seed``.

    ``spect_direction`` (9 numbers, row-major) gives the SPECT grid another direction than the CT's
    (for geometry tests); by default both share the CT's identity direction.
    """
    seed = _check_seed(seed)
    ranges.validate()
    rng = np.random.default_rng(seed)
    p: Dict[str, Any] = {"seed": seed, "kind": "procedural", "ranges": _ranges_name(ranges)}

    # ---- field of view and CT grid
    width = _u(rng, ranges.field_width_mm)
    length = _u(rng, ranges.field_length_mm)
    sp = _u(rng, ranges.ct_spacing_mm)
    dz = _u(rng, ranges.ct_slice_mm)
    while True:
        nxy = int(math.ceil(width / sp))
        nz = int(math.ceil(length / dz))
        if nxy * nxy * nz <= ranges.max_ct_voxels or (
            sp >= ranges.ct_spacing_mm[1] and dz >= ranges.ct_slice_mm[1]
        ):
            break
        sp = min(ranges.ct_spacing_mm[1], sp * 1.05)
        dz = min(ranges.ct_slice_mm[1], dz * 1.05)

    kz = _u(rng, (0.9, 1.1))  # body height scale
    kw = _u(rng, (0.85, 1.15))  # bone size scale
    region = list(_REGIONS)[int(rng.integers(len(_REGIONS)))]
    centre_s = _u(rng, _REGIONS[region]) * kz
    s_lo = float(np.clip(centre_s - length / 2, -30.0, 720.0 * kz - length))
    grid = _Grid((nz, nxy, nxy), (sp, sp, dz), (-(nxy - 1) * sp / 2, -(nxy - 1) * sp / 2, s_lo))
    shape = grid.shape
    X = grid.x[None, None, :]
    Y = grid.y[None, :, None]
    zs = grid.z
    p.update(
        region=region,
        field_width_mm=_r(width),
        field_length_mm=_r(length),
        ct_spacing_mm=_r(sp),
        ct_slice_mm=_r(dz),
        ct_shape_zyx=list(shape),
        anatomical_z_range_mm=[_r(zs[0]), _r(zs[-1])],
        height_scale=_r(kz),
        bone_scale=_r(kw),
    )

    # ---- body outline (super-ellipse varying along z) and subcutaneous fat
    cx, cy = _u(rng, (-10, 10)), _u(rng, (-15, 15))
    a0, b0 = _u(rng, (135, 180)), _u(rng, (85, 125))
    knots = np.array([-80, 0, 100, 200, 300, 400, 500, 600, 760]) * kz
    fa = np.array([1.08, 1.1, 1.08, 1.0, 0.95, 1.0, 1.03, 1.05, 1.08]) + rng.uniform(-0.04, 0.04, 9)
    fb = np.array([0.97, 1.0, 1.0, 0.98, 0.98, 1.0, 1.02, 1.0, 0.95]) + rng.uniform(-0.04, 0.04, 9)
    a_max = width / 2 - abs(cx) - 8
    b_max = width / 2 - abs(cy) - 8

    def body_a(s):
        return np.minimum(a0 * np.interp(s, knots, fa), a_max)

    def body_b(s):
        return np.minimum(np.minimum(b0 * np.interp(s, knots, fb), b_max), 0.9 * body_a(s))

    pexp = _u(rng, (2.0, 2.6))
    fat = _u(rng, (5, 30))
    A = body_a(zs)[:, None, None]
    B = body_b(zs)[:, None, None]
    ax = np.abs(X - cx)
    ay = np.abs(Y - cy)
    body = (ax / A) ** pexp + (ay / B) ** pexp <= 1.0
    inner = (ax / (A - fat)) ** pexp + (ay / (B - fat)) ** pexp <= 1.0
    del ax, ay
    p.update(body_centre_mm=[_r(cx), _r(cy)], body_semi_axes_mm=[_r(a0), _r(b0)], fat_mm=_r(fat))

    # ---- spine: vertebra levels from the sacral promontory up
    s_s1 = 170.0 * kz
    levels = []  # (name, z_bottom, z_top, rx, ry)
    z = s_s1
    for i in range(17):
        lumbar = i < 5
        t = i / 4.0 if lumbar else (i - 5) / 11.0
        h = (26.0 - 2.0 * t if lumbar else 22.0 - 7.0 * t) * kz * _u(rng, (0.93, 1.07))
        disc = (9.0 if lumbar else 5.5) * kz * _u(rng, (0.8, 1.2))
        rx = (24.0 - 3.0 * t if lumbar else 19.0 - 6.0 * t) * kw
        ry = (17.0 - 2.0 * t if lumbar else 15.0 - 4.0 * t) * kw
        z += disc
        levels.append(("L%d" % (5 - i) if lumbar else "T%d" % (12 - (i - 5)), z, z + h, rx, ry))
        z += h
    top_spine = z
    yfrac_knots = np.array([0, 200, 350, 450, 760]) * kz
    yfrac_vals = np.array([0.25, 0.22, 0.18, 0.32, 0.38]) + rng.uniform(-0.04, 0.04, 5)

    def vb_y(s):
        return cy + body_b(s) * np.interp(s, yfrac_knots, yfrac_vals)

    bone = np.zeros(shape, bool)
    spine = np.zeros(shape, bool)
    discs = np.zeros(shape, bool)
    # vertebral bodies, arches and processes, slice by slice
    lv_z = np.array([[lv[1], lv[2]] for lv in levels])
    for k, s in enumerate(zs):
        inside = np.nonzero((lv_z[:, 0] <= s) & (s <= lv_z[:, 1]))[0]
        yv = float(vb_y(s))
        if inside.size == 0:
            below = np.nonzero(lv_z[:, 0] > s)[0]
            if below.size and (below[0] == 0 or lv_z[below[0] - 1, 1] < s):
                j = below[0]
                rx, ry = levels[j][3], levels[j][4]
                if j > 0 or s > s_s1:
                    discs[k] = ((X[0] - cx) / rx) ** 2 + ((Y[0] - yv) / ry) ** 2 <= 1.0
            continue
        name, zb, zt, rx, ry = levels[inside[0]]
        tz = (s - zb) / (zt - zb)
        Xc, Yc = X[0] - cx, Y[0] - yv
        sl = (Xc / rx) ** 2 + (Yc / ry) ** 2 <= 1.0
        rc = 0.42 * rx
        yc = ry + rc + 1.5
        rr = np.hypot(Xc, Yc - yc)
        arch = (rr >= rc) & (rr <= rc + 5.5 * kw) & (Yc >= 0.5 * ry)
        if 0.1 < tz < 0.95:
            sl |= arch
        lumbar = name.startswith("L")
        sp_len = (30.0 if lumbar else 34.0) * kw
        if 0.15 < tz < 0.85:
            sl |= (np.abs(Xc) <= 3.5 * kw) & (Yc >= yc + rc) & (Yc <= yc + rc + sp_len)
        if 0.3 < tz < 0.75:
            tp_len = (32.0 if lumbar else 24.0) * kw
            sl |= (np.abs(Yc - yc) <= 4.5 * kw) & (np.abs(Xc) >= 0.4 * rx) & (np.abs(Xc) <= rx + tp_len)
        spine[k] = sl
    # sacrum: a wedge from the promontory down, curving backwards
    sac_bot = s_s1 - 120.0 * kz
    for k, s in enumerate(zs):
        if sac_bot <= s <= s_s1:
            t = (s - sac_bot) / (s_s1 - sac_bot)
            yv = float(vb_y(s)) + (1 - t) * 25.0
            wx, wy = (12.0 + 42.0 * t) * kw, (10.0 + 8.0 * t) * kw
            spine[k] |= ((X[0] - cx) / wx) ** 2 + ((Y[0] - yv) / wy) ** 2 <= 1.0
    bone |= spine

    # ---- pelvis and femora
    head_r = _u(rng, (21, 26)) * kw
    fh_x = 0.5 * float(body_a(0.0)) - fat * 0.3
    a_in0 = float(body_a(0.0)) - fat
    b_in0 = float(body_b(0.0)) - fat
    crest = s_s1 + 25.0 * kz
    s_ac = 18.0 * kz
    heads = []
    for side in (-1.0, 1.0):
        pts, rad = [], []
        for s in np.arange(s_ac, crest + 1e-6, max(2.0, dz)):
            t = (s - s_ac) / (crest - s_ac)
            a_s = float(body_a(s)) - fat
            b_s = float(body_b(s)) - fat
            ys_ = float(vb_y(s)) + 5.0
            wsac = (12.0 + 42.0 * min(1.0, max(0.0, (s - sac_bot) / (s_s1 - sac_bot)))) * kw
            acet = np.array([side * (fh_x - 5.0), cy + 0.05 * b_s, s])
            asis = np.array([side * 0.78 * a_s, cy - 0.3 * b_s, s])
            p2 = (1 - t) * acet + t * asis
            p0 = np.array([side * (wsac + 2.0), ys_, s]) if t > 0.35 else (acet + np.array([0, 0.35 * b_s, 0]))
            p1 = np.array([side * 0.8 * a_s, ys_ - 0.05 * b_s, s]) if t > 0.35 else (p0 + p2) / 2
            th = (12.0 - 7.0 * t) * kw  # half-thickness
            curve = _resample_curve(_bezier(p0, p1, p2), th / 2)
            pts.append(curve)
            rad.append(np.full(len(curve), th))
        if pts:
            grid.paint_balls(bone, np.concatenate(pts), np.concatenate(rad))
        head = np.array([side * fh_x, cy + 0.02 * b_in0, 0.0])
        heads.append(head)
        # pubic ramus to the symphysis, ischium down to the tuberosity
        pubic = _resample_curve(
            np.array([head + [-side * 5, -0.35 * b_in0, 8], [side * 9.0, cy - 0.82 * b_in0, -8.0 * kz]]), 3.0
        )
        ischium = _resample_curve(
            np.array([head + [-side * 10, 0.35 * b_in0, -5], [side * 0.7 * fh_x, cy + 0.3 * b_in0, -40.0 * kz]]),
            3.5,
        )
        grid.paint_balls(bone, pubic, 8.0 * kw)
        grid.paint_balls(bone, ischium, 10.0 * kw)
    for head in heads:  # joint space around each femoral head, then the femur
        sub = grid.ellipsoid(head, [head_r + 3.0] * 3)
        if sub is not None:
            bone[sub[0]] &= ~sub[1]
    for side, head in zip((-1.0, 1.0), heads):
        troch = np.array([side * min(0.9 * a_in0, fh_x + 45.0), cy + 0.05 * b_in0, -30.0 * kz])
        grid.paint_balls(bone, head, head_r)
        grid.paint_balls(bone, _resample_curve(np.array([head, troch]), 4.0), 13.0 * kw)
        grid.paint_balls(bone, troch, 16.0 * kw)
        shaft = _resample_curve(np.array([troch, troch + [-side * 12.0, 0, -160.0]]), 5.0)
        grid.paint_balls(bone, shaft, 13.0 * kw)

    # ---- rib cage: 12 pairs of curved tubes from the thoracic vertebrae round to the front
    r_rib = _u(rng, (3.8, 5.2)) * kw
    cage = np.array([0.55, 0.68, 0.78, 0.86, 0.92, 0.96, 0.99, 1.0, 1.0, 0.99, 0.97, 0.95])
    ends = np.array([0.78, 0.8, 0.82, 0.83, 0.84, 0.84, 0.83, 0.78, 0.72, 0.62, 0.45, 0.32]) * math.pi
    thoracic = {lv[0]: lv for lv in levels if lv[0].startswith("T")}
    rib_pts = []
    rib_ellipse = []  # (z, A, B) per rib, for lungs/scapulae
    for k in range(12):
        name, zb, zt, rx, ry = thoracic["T%d" % (k + 1)]
        z0 = 0.5 * (zb + zt)
        A_r = (float(body_a(z0)) - fat - 12.0 - r_rib) * cage[k]
        B_r = (float(body_b(z0)) - fat - 10.0 - r_rib) * (0.75 + 0.25 * cage[k])
        yv = float(vb_y(z0))
        rib_ellipse.append((z0, A_r, B_r))
        drop = (25.0 + 35.0 * k / 11.0) * kz * _u(rng, (0.8, 1.2))
        phi0 = 0.2 * math.pi
        phi_end = ends[k] + _u(rng, (-0.03, 0.03)) * math.pi
        phi = np.linspace(phi0, phi_end, 80)
        zz = z0 - drop * ((phi - phi0) / (math.pi - phi0)) ** 1.2
        for side in (-1.0, 1.0):
            arc = np.stack([cx + side * A_r * np.sin(phi), cy + B_r * np.cos(phi), zz], 1)
            head = np.array([cx + side * (rx + 3.0), yv + 0.4 * ry, z0])
            tuber = np.array([cx + side * (0.4 * rx + 20.0 * kw), yv + ry + 0.42 * rx + 1.5, z0])
            rib_pts.append(_resample_curve(np.vstack([head, tuber, arc]), r_rib / 2))
    grid.paint_balls(bone, np.concatenate(rib_pts), r_rib)
    rib_order = np.argsort([e[0] for e in rib_ellipse])  # np.interp needs increasing z
    rib_z = np.array([rib_ellipse[i][0] for i in rib_order])
    rib_a = np.array([rib_ellipse[i][1] for i in rib_order])
    rib_b = np.array([rib_ellipse[i][2] for i in rib_order])

    def cage_ab(s):
        return np.interp(s, rib_z, rib_a), np.interp(s, rib_z, rib_b)

    # sternum (manubrium + body), a flat plate behind the anterior wall
    t2 = thoracic["T2"]
    t9 = thoracic["T9"]
    st_top = 0.5 * (t2[1] + t2[2]) - 20.0 * kz
    st_bot = 0.5 * (t9[1] + t9[2]) - 45.0 * kz
    st_half = _u(rng, (5.0, 7.0))
    st_pts = []
    for s in np.arange(st_bot, st_top, st_half / 2):
        w = 14.0 + 10.0 * max(0.0, (s - (st_top - 50.0)) / 50.0)
        yb = cy - (float(body_b(s)) - fat - 6.0 - st_half)
        for xo in np.arange(-w + st_half, w - st_half + 1e-6, st_half / 2):
            st_pts.append((cx + xo, yb, s))
    grid.paint_balls(bone, np.array(st_pts), st_half)
    # scapulae: thin curved plates outside the posterior ribs, triangular (narrowing downwards)
    sc_top = 0.5 * (t2[1] + t2[2]) + 15.0 * kz
    sc_bot = 0.5 * (thoracic["T8"][1] + thoracic["T8"][2])
    sc_pts, sc_rad = [], []
    for s in np.arange(sc_bot, sc_top, 2.0):
        t = (s - sc_bot) / (sc_top - sc_bot)
        A_r, B_r = cage_ab(s)
        lo_phi = (0.25 - 0.1 * t) * math.pi
        hi_phi = (0.25 + 0.2 * t) * math.pi
        phi = np.linspace(lo_phi, hi_phi, max(2, int(10 + 40 * t)))
        for side in (-1.0, 1.0):
            arc = np.stack(
                [cx + side * (A_r + r_rib + 9.0) * np.sin(phi), cy + (B_r + r_rib + 9.0) * np.cos(phi), np.full_like(phi, s)], 1
            )
            sc_pts.append(arc)
            sc_rad.append(np.where(phi > hi_phi - 0.04 * math.pi, 6.0, 3.0))
    grid.paint_balls(bone, np.concatenate(sc_pts), np.concatenate(sc_rad))
    # clavicles, from the manubrium out to the acromion
    for side in (-1.0, 1.0):
        a_t, b_t = float(body_a(st_top)) - fat, float(body_b(st_top)) - fat
        cl = _bezier(
            [cx + side * 16.0, cy - b_t + 8.0, st_top + 8.0],
            [cx + side * 0.5 * a_t, cy - b_t + 2.0, st_top + 18.0],
            [cx + side * 0.85 * a_t, cy + 0.1 * b_t, st_top + 30.0],
        )
        grid.paint_balls(bone, _resample_curve(cl, 3.0), 6.0 * kw)
    bone &= inner
    spine &= bone
    if not bone.any():  # cannot happen with the anatomical window used; guard anyway
        raise RuntimeError(f"phantom seed {seed}: no bone in the field of view")

    # ---- lungs, heart, liver, kidneys, bladder, bowel gas
    s_dia = 0.5 * sum(thoracic["T10"][1:3]) + _u(rng, (-15, 15)) * kz
    s_dia_left = s_dia - _u(rng, (5, 20))
    A_c, B_c = cage_ab(zs)
    A_c = (A_c - r_rib - 3.0)[:, None, None]
    B_c = (B_c - r_rib - 3.0)[:, None, None]
    q2 = ((X - cx) / A_c) ** 2 + ((Y - cy) / B_c) ** 2
    Zs = zs[:, None, None]
    dome = np.where(X < cx, s_dia, s_dia_left) - 40.0 * q2
    lungs = (q2 <= 1.0) & (Zs > dome) & (Zs < top_spine + 15.0)
    yv3 = vb_y(zs)[:, None, None]
    rx_med = 20.0 * kw
    lungs &= ~((np.abs(X - cx) < rx_med + 12.0) & (Y > yv3 - 30.0))  # spine and posterior mediastinum
    med = (((X - cx - 0.05 * A_c) / (0.22 * A_c)) ** 2 + ((Y - cy + 0.2 * B_c) / (0.9 * B_c)) ** 2) <= 1.0
    heart_c = np.array([cx + 0.15 * float(body_a(s_dia)), cy - 0.25 * float(body_b(s_dia)), s_dia + 55.0])
    heart_ax = np.array([0.33 * float(body_a(s_dia)), 0.42 * float(body_b(s_dia)), 55.0 * kz])
    heart = (((X - heart_c[0]) / heart_ax[0]) ** 2 + ((Y - heart_c[1]) / heart_ax[1]) ** 2 + ((Zs - heart_c[2]) / heart_ax[2]) ** 2) <= 1.0
    lungs &= ~med & ~heart & inner
    heart &= inner & ~bone
    lungs &= ~bone
    del q2, dome, med

    liver_h = _u(rng, (120, 170)) * kz
    liver_c = np.array([cx - 0.35 * float(body_a(s_dia)), cy - 0.05 * float(body_b(s_dia))])
    liver_ax = np.array([0.5 * float(body_a(s_dia)), 0.7 * float(body_b(s_dia))])
    taper = np.sqrt(np.clip((Zs - (s_dia - liver_h)) / liver_h, 0.0, 1.0)) + 1e-6
    liver = (((X - liver_c[0]) / (liver_ax[0] * taper)) ** 2 + ((Y - liver_c[1]) / (liver_ax[1] * taper)) ** 2 <= 1.0)
    liver &= (Zs <= s_dia + 10.0) & (Zs >= s_dia - liver_h) & inner & ~lungs & ~bone & ~heart
    del taper
    organs = np.zeros(shape, np.uint8)
    organs[liver] = ORGAN_CODES["liver"]
    del liver
    l1 = [lv for lv in levels if lv[0] == "L1"][0]
    kid_s = l1[1] + _u(rng, (-15, 15)) * kz
    kid_ax = np.array([_u(rng, (22, 28)), _u(rng, (18, 24)), _u(rng, (45, 60)) * kz]) * kw
    kid_drop = _u(rng, (5, 25))
    for side in (-1.0, 1.0):
        kc = [cx + side * (l1[3] + 38.0 * kw), float(vb_y(kid_s)) + 5.0, kid_s - (kid_drop if side < 0 else 0.0)]
        sub = grid.ellipsoid(kc, kid_ax)
        if sub is not None:
            organs[sub[0]][sub[1] & inner[sub[0]] & ~bone[sub[0]]] = ORGAN_CODES["kidney"]
    bl_ax = np.array([_u(rng, (28, 55)), _u(rng, (22, 42)), _u(rng, (22, 42))])
    b_bl = float(body_b(40.0)) - fat
    bl_c = [cx + _u(rng, (-8, 8)), cy - 0.72 * b_bl + bl_ax[1], _u(rng, (15, 55)) * kz + bl_ax[2] * 0.5]
    sub = grid.ellipsoid(bl_c, bl_ax)
    if sub is not None:
        organs[sub[0]][sub[1] & inner[sub[0]] & ~bone[sub[0]]] = ORGAN_CODES["bladder"]
    gas = np.zeros(shape, bool)
    n_gas = int(rng.integers(0, 5))
    for _ in range(n_gas):
        s = _u(rng, (110.0 * kz, s_dia - 40.0))
        gc = [cx + _u(rng, (-0.6, 0.6)) * float(body_a(s)), cy - _u(rng, (0.0, 0.6)) * float(body_b(s)), s]
        sub = grid.ellipsoid(gc, rng.uniform(8, 25, 3))
        if sub is not None:
            gas[sub[0]] |= sub[1]
    gas &= inner & ~bone & (organs == 0) & ~lungs & ~heart
    p.update(
        diaphragm_z_mm=_r(s_dia),
        kidney_centre_z_mm=_r(kid_s),
        bladder_centre_mm=[_r(v) for v in bl_c],
        bladder_semi_axes_mm=[_r(v) for v in bl_ax],
        bowel_gas_pockets=n_gas,
    )

    # ---- cortex / marrow, CT numbers
    cortex_mm = _u(rng, ranges.cortex_thickness_mm)
    marrow = ndimage.binary_erosion(bone, iterations=max(1, int(round(cortex_mm / max(sp, dz) + 0.25))))
    cortex_hu = _u(rng, ranges.cortex_hu)
    marrow_hu = _u(rng, ranges.marrow_hu)
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = _u(rng, (-120, -80))
    hu[inner] = _u(rng, (35, 55))
    hu[lungs] = _u(rng, (-870, -750))
    hu[heart] = _u(rng, (35, 50))
    hu[organs == ORGAN_CODES["liver"]] = _u(rng, (50, 65))
    hu[organs == ORGAN_CODES["kidney"]] = _u(rng, (25, 40))
    hu[organs == ORGAN_CODES["bladder"]] = _u(rng, (0, 15))
    hu[gas] = _u(rng, (-950, -850))
    hu[discs & inner & ~bone] = _u(rng, (70, 100))
    hu[bone] = cortex_hu
    hu[marrow] = marrow_hu
    p.update(cortex_hu=_r(cortex_hu), marrow_hu=_r(marrow_hu), cortex_thickness_mm=_r(cortex_mm))

    # ---- activity (soft tissue = 1)
    up = _sample_uptakes(rng, ranges)
    act = np.zeros(shape, np.float32)
    act[body] = up["fat_uptake"]
    act[inner] = 1.0
    act[lungs] = up["lung_uptake"]
    act[heart] = up["blood_pool_uptake"]
    act[organs == ORGAN_CODES["liver"]] = up["liver_uptake"]
    act[organs == ORGAN_CODES["kidney"]] = up["kidney_uptake"]
    act[organs == ORGAN_CODES["bladder"]] = up["bladder_uptake"]
    act[gas] = 0.0
    act[bone] = up["bone_ratio"]
    act[marrow] *= up["marrow_factor"]
    act[spine] *= up["spine_factor"]
    del lungs, heart, gas, discs, organs

    ct_ref = _geometry(shape, (sp, sp, dz), [0, 0, 0], np.eye(3).ravel())
    offset = np.array([_u(rng, (-40, 40)), _u(rng, (-40, 40)), _u(rng, (-900, -300))])
    ct_ref.SetOrigin((grid.org + offset).tolist())
    p["ct_origin_mm"] = [_r(v) for v in ct_ref.GetOrigin()]
    return _finish_case(rng, p, ranges, ct_ref, hu, act, bone, body, up, spect_direction, add_ct_noise=True)


def _sample_uptakes(rng: np.random.Generator, ranges: SimulationRanges) -> Dict[str, float]:
    up = {}
    for name in (
        "bone_ratio",
        "marrow_factor",
        "spine_factor",
        "uptake_heterogeneity",
        "fat_uptake",
        "lung_uptake",
        "blood_pool_uptake",
        "bladder_uptake",
        "kidney_uptake",
        "liver_uptake",
    ):
        up[name] = _u(rng, getattr(ranges, name))
    return up


# ------------------------------------------------------------------------- lesions and imaging chain


def _add_lesions(
    rng: np.random.Generator,
    ranges: SimulationRanges,
    ct_ref: sitk.Image,
    bone: np.ndarray,
    hu: np.ndarray,
    act: np.ndarray,
    truth: np.ndarray,
) -> List[Dict[str, Any]]:
    """Place lesions centred in bone; label (2) and uptake apply to their voxels inside bone only."""
    n = int(rng.integers(ranges.lesion_count[0], ranges.lesion_count[1] + 1))
    flat = np.flatnonzero(bone)
    if n == 0 or flat.size == 0:
        return []
    spacing = np.array(ct_ref.GetSpacing())  # x, y, z
    lesions = []
    for _ in range(n):
        zi, yi, xi = np.unravel_index(flat[int(rng.integers(flat.size))], bone.shape)
        d = _u(rng, ranges.lesion_diameter_mm)
        aspect = rng.uniform(0.75, 1.25, 3)
        semi = d / 2 * aspect / np.prod(aspect) ** (1 / 3)  # same volume as the sphere of diameter d
        cold = bool(rng.random() < ranges.cold_lesion_probability)
        contrast = _u(rng, ranges.cold_lesion_contrast if cold else ranges.lesion_contrast)
        change, delta = "none", 0.0
        if rng.random() < ranges.lesion_ct_change_probability:
            if rng.random() < 0.6:
                change, delta = "sclerotic", _u(rng, ranges.sclerotic_delta_hu)
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
        sub_act = act[box]
        sub_act[region] = sub_act[region] * contrast
        sub_hu = hu[box]
        if change == "sclerotic":
            sub_hu[region] = np.minimum(sub_hu[region] + delta, 1900.0)
        elif change == "lytic":
            sub_hu[region] = _u(rng, (20.0, 90.0))
        truth[box][region] = LESION
        centre = ct_ref.TransformIndexToPhysicalPoint((int(xi), int(yi), int(zi)))
        lesions.append(
            {
                "centre_mm": [_r(c) for c in centre],
                "centre_index_xyz": [int(xi), int(yi), int(zi)],
                "diameter_mm": _r(d),
                "semi_axes_mm": [_r(s) for s in semi],
                "contrast": _r(contrast),
                "cold": cold,
                "ct_change": change,
                "ct_delta_hu": _r(delta),
                "voxels": int(region.sum()),
            }
        )
    return lesions


def _spect_grid(
    rng: np.random.Generator, ranges: SimulationRanges, ct_ref: sitk.Image, direction: Sequence[float]
) -> sitk.Image:
    """A SPECT grid (own spacing, origin, extent) covering the CT in-plane plus a margin, most of it in z."""
    d = np.array(direction, float).reshape(3, 3)
    corners = np.array(
        [
            ct_ref.TransformContinuousIndexToPhysicalPoint([c * (n - 0.5) + (1 - c) * -0.5 for c, n in zip(cc, ct_ref.GetSize())])
            for cc in np.ndindex(2, 2, 2)
        ]
    )
    centre = corners.mean(0)
    local = (corners - centre) @ d  # coordinates along the SPECT axes
    extent = local.max(0) - local.min(0)
    s_xy = _u(rng, ranges.spect_spacing_mm)
    s_z = s_xy if rng.random() < 0.6 else float(np.clip(s_xy * rng.uniform(0.9, 1.1), *ranges.spect_spacing_mm))
    spacing = np.array([s_xy, s_xy, s_z])
    margin = _u(rng, ranges.spect_xy_margin_mm)
    coverage = _u(rng, ranges.spect_z_coverage)
    want = np.array([extent[0] + margin, extent[1] + margin, extent[2] * coverage])
    size = np.maximum(1, np.floor(want / spacing)).astype(int)
    size[2] = max(1, min(size[2], int(extent[2] / spacing[2])))
    slack_z = max(0.0, extent[2] - size[2] * spacing[2])
    shift = np.array([_u(rng, (-10, 10)), _u(rng, (-10, 10)), _u(rng, (-slack_z / 2, slack_z / 2))])
    origin = centre + d @ (shift - (size - 1) / 2.0 * spacing)
    return _geometry(size[::-1], spacing, origin, d.ravel())


def _rigid_transform(centre: Sequence[float], axis: Sequence[float], angle_deg: float,
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
    return _rigid_transform(params["misregistration_centre_mm"], params["misregistration_rotation_axis"],
                            params["misregistration_rotation_deg"], params["misregistration_shift_vector_mm"])


def _finish_case(
    rng: np.random.Generator,
    p: Dict[str, Any],
    ranges: SimulationRanges,
    ct_ref: sitk.Image,
    hu: np.ndarray,
    act: np.ndarray,
    bone: np.ndarray,
    body: np.ndarray,
    up: Dict[str, float],
    spect_direction: Optional[Sequence[float]],
    add_ct_noise: bool,
) -> PhantomCase:
    """Heterogeneity, lesions, CT noise and the SPECT imaging chain; assemble the case."""
    het = _smooth_field(rng, ct_ref)
    act *= 1.0 + up["uptake_heterogeneity"] * het * (act > 0)
    del het
    truth = bone.astype(np.uint8)
    lesions = _add_lesions(rng, ranges, ct_ref, bone, hu, act, truth)
    p.update({k: _r(v) for k, v in up.items()})
    p["lesion_count"] = len(lesions)
    p["lesions"] = lesions

    # CT: mild partial-volume blur and noise
    noise_hu = _u(rng, ranges.ct_noise_hu) * (1.0 if add_ct_noise else 0.5)
    p["ct_noise_hu"] = _r(noise_hu)
    if add_ct_noise:
        hu = ndimage.gaussian_filter(hu, 0.5, truncate=2.0)
    hu = hu + rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_hu)
    ct = _image(np.clip(np.rint(hu), -1024, 3071).astype(np.int16), ct_ref)
    truth_img = _image(truth, ct_ref)

    # SPECT
    fwhm = _u(rng, ranges.psf_fwhm_mm)
    axial = _u(rng, ranges.psf_axial_ratio)
    shift_mm = _u(rng, ranges.misregistration_shift_mm)
    rot_deg = _u(rng, ranges.misregistration_rotation_deg)
    shift_dir = rng.normal(size=3)
    shift = shift_dir / np.linalg.norm(shift_dir) * shift_mm
    rot_axis = rng.normal(size=3)
    rot_axis /= np.linalg.norm(rot_axis)
    direction = tuple(spect_direction) if spect_direction is not None else ct_ref.GetDirection()
    if len(direction) != 9:
        raise InputError("spect_direction must have 9 numbers (a row-major 3x3 matrix)")
    spect_ref = _spect_grid(rng, ranges, ct_ref, direction)
    count_density = _logu(rng, ranges.count_density)
    post = _u(rng, ranges.postfilter_fwhm_mm)
    scatter = _u(rng, ranges.scatter_fraction)
    scatter_fwhm = _u(rng, ranges.scatter_fwhm_mm)
    mu = _u(rng, ranges.attenuation_mu_per_mm)

    act_img = _image(act, ct_ref)
    sig = fwhm * FWHM_TO_SIGMA
    blurred = sitk.SmoothingRecursiveGaussian(act_img, [sig, sig, sig * axial])
    centre = np.array(ct_ref.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ct_ref.GetSize()]))
    rigid = _rigid_transform(centre, rot_axis, rot_deg, shift)
    expected = sitk.Resample(blurred, spect_ref, rigid, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    if scatter > 0:
        ssig = scatter_fwhm * FWHM_TO_SIGMA
        expected = expected + scatter * sitk.SmoothingRecursiveGaussian(expected, [ssig] * 3)
    exp_arr = sitk.GetArrayFromImage(expected).astype(np.float64)
    if mu > 0:
        body_img = _image(body.astype(np.uint8), ct_ref)
        body_s = sitk.GetArrayFromImage(sitk.Resample(body_img, spect_ref, rigid, sitk.sitkNearestNeighbor, 0))
        depth = ndimage.distance_transform_edt(body_s, sampling=spect_ref.GetSpacing()[::-1])
        exp_arr *= np.exp(-mu * depth)
    voxel_ml = float(np.prod(spect_ref.GetSpacing())) / 1000.0
    exp_arr *= count_density * voxel_ml
    counts = rng.poisson(np.maximum(exp_arr, 0.0)).astype(np.float32)
    if post > 0.5:
        sig_vox = [post * FWHM_TO_SIGMA / s for s in spect_ref.GetSpacing()[::-1]]
        counts = ndimage.gaussian_filter(counts, sig_vox, truncate=3.0).astype(np.float32)
    spect = _image(counts, spect_ref)

    p.update(
        psf_fwhm_mm=_r(fwhm),
        psf_axial_ratio=_r(axial),
        spect_spacing_mm=[_r(s) for s in spect_ref.GetSpacing()],
        spect_origin_mm=[_r(s) for s in spect_ref.GetOrigin()],
        spect_shape_zyx=list(counts.shape),
        spect_direction=[_r(v, 6) for v in spect_ref.GetDirection()],
        count_density=_r(count_density),
        expected_total_counts=_r(float(exp_arr.sum()), 1),
        total_counts=_r(float(counts.sum()), 1),
        postfilter_fwhm_mm=_r(post),
        scatter_fraction=_r(scatter),
        scatter_fwhm_mm=_r(scatter_fwhm),
        attenuation_mu_per_mm=_r(mu, 6),
        misregistration_shift_mm=_r(shift_mm),
        misregistration_shift_vector_mm=[_r(v) for v in shift],
        misregistration_rotation_deg=_r(rot_deg),
        misregistration_rotation_axis=[_r(v) for v in rot_axis],
        misregistration_centre_mm=[_r(v) for v in centre],
        misregistration_note=(
            "the SPECT's activity at physical point x is the CT-aligned activity at R(x - c) + c + t "
            "(ITK Euler3DTransform, rotation R about the axis, centre c, translation t)"
        ),
        ct_spacing_xyz_mm=[_r(s) for s in ct_ref.GetSpacing()],
        ct_direction=[_r(v, 6) for v in ct_ref.GetDirection()],
        bone_voxels=int((truth > 0).sum()),
        lesion_voxels=int((truth == LESION).sum()),
    )
    return PhantomCase(spect=spect, ct=ct, truth=truth_img, params=p)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _ranges_name(ranges: SimulationRanges) -> str:
    if ranges == TRAINING_RANGES:
        return "training"
    if ranges == SHIFTED_RANGES:
        return "shifted"
    return "custom"


# ---------------------------------------------------------------------------------------- CT-derived


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
    arr = _label_array(labels, "bone labels")
    bone = np.isin(arr, TOTALSEG_BONE_IDS).astype(np.uint8)
    organs = np.zeros(arr.shape, np.uint8)
    for label_id, name in TOTALSEG_ORGAN_IDS.items():
        organs[arr == label_id] = ORGAN_CODES[name]
    return _image(bone, labels), _image(organs, labels)


def _spine_mask_from_totalsegmentator(labels: sitk.Image) -> sitk.Image:
    arr = _label_array(labels, "bone labels")
    return _image(((arr >= 25) & (arr <= 50)).astype(np.uint8), labels)


def _split_labels(
    bone_labels: sitk.Image, organ_labels: Optional[sitk.Image]
) -> Tuple[sitk.Image, Optional[sitk.Image], Optional[sitk.Image], str]:
    """(bone, organs, spine, how): a 0/1 map is a bone mask; any other values are TotalSegmentator ids."""
    arr = _label_array(bone_labels, "bone labels")
    values = np.unique(arr)
    if organ_labels is None and np.any((values != 0) & (values != 1)):
        bone, organs = bone_mask_from_totalsegmentator(bone_labels)
        return bone, organs, _spine_mask_from_totalsegmentator(bone_labels), "totalsegmentator"
    bone = _image((arr != 0).astype(np.uint8), bone_labels)
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
    seed = _check_seed(seed)
    ranges.validate()
    rng = np.random.default_rng(seed)
    ct = as_volume(ct, "CT")
    bone_src, organ_src, spine_src, label_kind = _split_labels(bone_labels, organ_labels)
    p: Dict[str, Any] = {"seed": seed, "kind": "ct", "ranges": _ranges_name(ranges), "label_kind": label_kind}

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
        keep = int(math.ceil(size[2] * _u(rng, (0.75, 1.0))))
        start = int(rng.integers(0, size[2] - keep + 1))
        lo[2], hi[2] = start - 0.5, start + keep - 0.5
    s_xy = max(_u(rng, ranges.ct_spacing_mm), float(spacing0[:2].max()))
    s_z = float(spacing0[2]) if spacing0[2] >= ranges.ct_slice_mm[0] else _u(rng, ranges.ct_slice_mm)
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
    ct_ref = _geometry(n[::-1], new_spacing, origin, d_out.ravel())

    # anti-aliased CT resampling; labels by physical coordinates, nearest neighbour
    sigma = [max(0.0, 0.4 * math.sqrt(max(0.0, new_spacing[k] ** 2 - spacing0[k] ** 2)) / spacing0[k]) for k in range(3)]
    smooth = ndimage.gaussian_filter(sitk.GetArrayFromImage(ct), sigma[::-1], truncate=2.5) if max(sigma) > 0.1 else sitk.GetArrayFromImage(ct)
    hu = sitk.GetArrayFromImage(
        sitk.Resample(_image(smooth.astype(np.float32), ct), ct_ref, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    )
    del smooth

    def nearest(img: Optional[sitk.Image]) -> Optional[np.ndarray]:
        if img is None:
            return None
        img = sitk.Cast(img, sitk.sitkUInt8) if img.GetPixelID() != sitk.sitkUInt8 else img
        return sitk.GetArrayFromImage(sitk.Resample(img, ct_ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))

    bone = nearest(bone_src) > 0
    if not bone.any():
        raise InputError(
            "bone labels: no bone inside the CT's field of view; check that the label map belongs to this CT "
            "(they are matched by physical coordinates)"
        )
    organs = nearest(organ_src)
    spine = nearest(spine_src)
    spine = (spine > 0) & bone if spine is not None else np.zeros_like(bone)

    # tissue classes from HU
    fg = hu > -400.0
    comp, ncomp = ndimage.label(fg)
    if ncomp > 1:
        sizes = ndimage.sum_labels(fg, comp, index=np.arange(1, ncomp + 1))
        fg = comp == (1 + int(np.argmax(sizes)))
    del comp
    hull = np.stack([ndimage.binary_fill_holes(sl) for sl in fg])
    body = hull | bone
    lungs = hull & ~fg & (hu > -960.0)

    up = _sample_uptakes(rng, ranges)
    if not spine.any():
        up["spine_factor"] = 1.0
    act = np.zeros(hu.shape, np.float32)
    act[body] = 1.0
    act[body & (hu < -30.0)] = up["fat_uptake"]
    act[lungs] = up["lung_uptake"]
    act[hull & (hu <= -960.0)] = 0.0
    if organs is not None:
        act[organs == ORGAN_CODES["liver"]] = up["liver_uptake"]
        act[organs == ORGAN_CODES["kidney"]] = up["kidney_uptake"]
        act[organs == ORGAN_CODES["bladder"]] = up["bladder_uptake"]
    marrow = ndimage.binary_erosion(bone)
    act[bone] = up["bone_ratio"]
    act[marrow] *= up["marrow_factor"]
    act[spine] *= up["spine_factor"]
    del marrow, lungs, hull, fg

    p.update(
        source_ct_size=[int(v) for v in size],
        source_ct_spacing_mm=[_r(v) for v in spacing0],
        crop_index_lo_xyz=[_r(v) for v in lo],
        crop_index_hi_xyz=[_r(v) for v in hi],
        crop_margins_mm=[_r(v) for v in margins],
        ct_spacing_mm=_r(new_spacing[0]),
        ct_slice_mm=_r(new_spacing[2]),
        ct_shape_zyx=[int(v) for v in hu.shape],
        flip_x_index=flip,
        organs_from_labels=organs is not None,
    )
    return _finish_case(rng, p, ranges, ct_ref, hu, act, bone, body, up, spect_direction, add_ct_noise=False)


# ------------------------------------------------------------------------------------ front-door API


def generate_phantom(
    seed: int,
    kind: str = "procedural",
    ranges: SimulationRanges = TRAINING_RANGES,
    ct: Optional[sitk.Image] = None,
    bone_labels: Optional[sitk.Image] = None,
    organ_labels: Optional[sitk.Image] = None,
) -> PhantomCase:
    """One phantom: ``kind='procedural'`` or ``kind='ct'`` (needs ``ct`` and ``bone_labels``)."""
    if kind == "procedural":
        if ct is not None or bone_labels is not None:
            raise InputError("a procedural phantom takes no CT or labels; use kind='ct' to build from a CT")
        return procedural_phantom(seed, ranges)
    if kind == "ct":
        if ct is None or bone_labels is None:
            raise InputError("a CT-derived phantom needs both a CT and a bone label map")
        return ct_derived_phantom(seed, ct, bone_labels, ranges, organ_labels=organ_labels)
    raise InputError(f"unknown phantom kind {kind!r}; use 'procedural' or 'ct'")


PHANTOM_FILES = {"spect": "spect.nii.gz", "ct": "ct.nii.gz", "truth": "truth.nii.gz", "params": "params.json"}


def write_phantom(case: PhantomCase, out_dir) -> Dict[str, Path]:
    """Write spect.nii.gz, ct.nii.gz, truth.nii.gz and params.json into ``out_dir`` (created), atomically."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{out_dir}: cannot create the output directory: {err.strerror or err}") from None
    paths = {key: out_dir / name for key, name in PHANTOM_FILES.items()}
    try:
        text = json.dumps(case.params, indent=1, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise OutputError(f"phantom parameters are not JSON-serialisable: {err}") from None
    imageio.write_image(case.spect, paths["spect"])
    imageio.write_image(case.ct, paths["ct"])
    imageio.write_image(case.truth, paths["truth"])
    with imageio.atomic_path(paths["params"]) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return paths


def phantom_command(
    out: str,
    seed: int,
    count: int = 1,
    from_ct: Optional[str] = None,
    bone_labels: Optional[str] = None,
    shifted: bool = False,
    progress: Optional[ProgressCallback] = None,
) -> List[Dict[str, Path]]:
    """``fcmseg phantom``: write ``out/case_<seed>/`` for seeds ``seed .. seed+count-1``.

    Procedural phantoms by default; with ``from_ct`` (a CT file or DICOM directory) and ``bone_labels``
    (a 0/1 bone mask or a TotalSegmentator label map) CT-derived ones. ``shifted`` draws from
    :data:`SHIFTED_RANGES` instead of :data:`TRAINING_RANGES`. Returns each case's file paths.
    """
    seed = _check_seed(seed)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise InputError(f"count must be a positive integer, got {count!r}")
    if (from_ct is None) != (bone_labels is None):
        raise InputError("--from-ct and --bone-labels go together: give both (or neither for procedural phantoms)")
    ranges = SHIFTED_RANGES if shifted else TRAINING_RANGES
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise OutputError(f"{out_path}: exists and is not a directory")
    ct_img = labels_img = None
    if from_ct is not None:
        report(progress, 0.0, "reading CT and labels")
        ct_img = imageio.read_image(from_ct)
        labels_img = imageio.read_image(bone_labels)
    kind = "procedural" if ct_img is None else "ct"
    written = []
    for i in range(int(count)):
        s = seed + i
        report(progress, i / count, f"phantom {i + 1}/{count} (seed {s})")
        start = time.perf_counter()
        case = generate_phantom(s, kind, ranges, ct=ct_img, bone_labels=labels_img)
        case.params["generation_seconds"] = _r(time.perf_counter() - start, 3)
        written.append(write_phantom(case, out_path / f"case_{s}"))
    report(progress, 1.0, f"wrote {count} phantom(s) to {out_path}")
    return written
