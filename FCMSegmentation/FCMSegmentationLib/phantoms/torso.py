"""The procedural torso's frame: the field of view and CT grid, and the body outline around everything."""
import math
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import numpy as np

from .geometry import Grid
from .ranges import SimulationRanges, rounded, uniform

#: Anatomical height (mm above the femoral-head centres, unscaled) of the field centre, per region.
REGIONS = {
    "pelvis": (60.0, 180.0),
    "abdomen-pelvis": (150.0, 280.0),
    "abdomen": (260.0, 400.0),
    "thorax-abdomen": (360.0, 470.0),
    "thorax": (450.0, 580.0),
}


@dataclass
class Field:
    """The CT grid in local anatomical millimetres (z = height above the femoral heads) and body scales."""

    grid: Grid
    width: float  # field width (mm), in x and y
    height_scale: float  # stretches every anatomical height
    bone_scale: float  # scales bone sizes

    @property
    def x(self) -> np.ndarray:
        """x coordinates broadcast to (1, 1, nx)."""
        return self.grid.x[None, None, :]

    @property
    def y(self) -> np.ndarray:
        """y coordinates broadcast to (1, ny, 1)."""
        return self.grid.y[None, :, None]


def sample_field(rng: np.random.Generator, ranges: SimulationRanges, params: Dict[str, Any]) -> Field:
    """Field width and length, CT spacing (coarsened until under ``ranges.max_ct_voxels``), body scales and
    the anatomical region imaged; recorded in ``params``."""
    width = uniform(rng, ranges.field_width_mm)
    length = uniform(rng, ranges.field_length_mm)
    sp = uniform(rng, ranges.ct_spacing_mm)
    dz = uniform(rng, ranges.ct_slice_mm)
    while True:
        nxy = int(math.ceil(width / sp))
        nz = int(math.ceil(length / dz))
        if nxy * nxy * nz <= ranges.max_ct_voxels or (
            sp >= ranges.ct_spacing_mm[1] and dz >= ranges.ct_slice_mm[1]
        ):
            break
        sp = min(ranges.ct_spacing_mm[1], sp * 1.05)
        dz = min(ranges.ct_slice_mm[1], dz * 1.05)

    kz = uniform(rng, (0.9, 1.1))
    kw = uniform(rng, (0.85, 1.15))
    region = list(REGIONS)[int(rng.integers(len(REGIONS)))]
    centre_s = uniform(rng, REGIONS[region]) * kz
    s_lo = float(np.clip(centre_s - length / 2, -30.0, 720.0 * kz - length))
    grid = Grid((nz, nxy, nxy), (sp, sp, dz), (-(nxy - 1) * sp / 2, -(nxy - 1) * sp / 2, s_lo))
    params.update(
        region=region,
        field_width_mm=rounded(width),
        field_length_mm=rounded(length),
        ct_spacing_mm=rounded(sp),
        ct_slice_mm=rounded(dz),
        ct_shape_zyx=list(grid.shape),
        anatomical_z_range_mm=[rounded(grid.z[0]), rounded(grid.z[-1])],
        height_scale=rounded(kz),
        bone_scale=rounded(kw),
    )
    return Field(grid, width, kz, kw)


@dataclass
class BodyOutline:
    """A super-ellipse cross-section whose semi-axes vary smoothly with height, and the fat layer inside it."""

    centre_x: float
    centre_y: float
    knots: np.ndarray  # heights (mm) at which the semi-axis factors are given
    factors_a: np.ndarray
    factors_b: np.ndarray
    a0: float
    b0: float
    a_max: float  # the body stays inside the field
    b_max: float
    exponent: float
    fat: float  # subcutaneous fat thickness (mm)

    def semi_a(self, s):
        """Left-right semi-axis (mm) at height(s) ``s``."""
        return np.minimum(self.a0 * np.interp(s, self.knots, self.factors_a), self.a_max)

    def semi_b(self, s):
        """Antero-posterior semi-axis (mm) at height(s) ``s``; never over 0.9 x the left-right one."""
        b = np.minimum(self.b0 * np.interp(s, self.knots, self.factors_b), self.b_max)
        return np.minimum(b, 0.9 * self.semi_a(s))

    def masks(self, field: Field) -> Tuple[np.ndarray, np.ndarray]:
        """(body, inside the fat layer), boolean (z, y, x) on the field's grid."""
        zs = field.grid.z
        A = self.semi_a(zs)[:, None, None]
        B = self.semi_b(zs)[:, None, None]
        ax = np.abs(field.x - self.centre_x)
        ay = np.abs(field.y - self.centre_y)
        body = (ax / A) ** self.exponent + (ay / B) ** self.exponent <= 1.0
        inner = (ax / (A - self.fat)) ** self.exponent + (ay / (B - self.fat)) ** self.exponent <= 1.0
        return body, inner


def sample_body_outline(rng: np.random.Generator, field: Field, params: Dict[str, Any]) -> BodyOutline:
    """A random body outline centred near the field's axis and inside the field; recorded in ``params``."""
    kz = field.height_scale
    cx, cy = uniform(rng, (-10, 10)), uniform(rng, (-15, 15))
    a0, b0 = uniform(rng, (135, 180)), uniform(rng, (85, 125))
    knots = np.array([-80, 0, 100, 200, 300, 400, 500, 600, 760]) * kz
    fa = np.array([1.08, 1.1, 1.08, 1.0, 0.95, 1.0, 1.03, 1.05, 1.08]) + rng.uniform(-0.04, 0.04, 9)
    fb = np.array([0.97, 1.0, 1.0, 0.98, 0.98, 1.0, 1.02, 1.0, 0.95]) + rng.uniform(-0.04, 0.04, 9)
    exponent = uniform(rng, (2.0, 2.6))
    fat = uniform(rng, (5, 30))
    params.update(body_centre_mm=[rounded(cx), rounded(cy)], body_semi_axes_mm=[rounded(a0), rounded(b0)],
                  fat_mm=rounded(fat))
    return BodyOutline(cx, cy, knots, fa, fb, a0, b0, field.width / 2 - abs(cx) - 8,
                       field.width / 2 - abs(cy) - 8, exponent, fat)
