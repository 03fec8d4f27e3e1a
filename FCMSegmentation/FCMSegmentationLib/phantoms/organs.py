"""The procedural torso's soft tissues: lungs, heart, liver, kidneys, bladder and bowel gas."""
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import numpy as np

from .case import ORGAN_CODES
from .ranges import rounded, uniform
from .skeleton import RibCage, Spine
from .torso import Field


@dataclass
class SoftTissues:
    """Boolean (z, y, x) masks, and ``organs`` coded with :data:`ORGAN_CODES` (liver, kidneys, bladder)."""

    lungs: np.ndarray
    heart: np.ndarray
    organs: np.ndarray
    gas: np.ndarray


def build_soft_tissues(rng: np.random.Generator, field: Field, spine: Spine, cage: RibCage, bone: np.ndarray,
                       inner: np.ndarray, params: Dict[str, Any]) -> SoftTissues:
    """Organs placed relative to the skeleton (diaphragm at T10, kidneys at L1, bladder above the pubis),
    none overlapping bone or leaving the fat layer ``inner``; their placement is recorded in ``params``."""
    diaphragm, lungs, heart = _lungs_and_heart(rng, field, spine, cage, bone, inner)
    organs = np.zeros(field.grid.shape, np.uint8)
    organs[_liver(rng, field, spine, diaphragm, lungs, heart, bone, inner)] = ORGAN_CODES["liver"]
    kidney_z = _paint_kidneys(rng, field, spine, bone, inner, organs)
    bladder_centre, bladder_axes = _paint_bladder(rng, field, spine, bone, inner, organs)
    gas, pockets = _bowel_gas(rng, field, spine, diaphragm)
    gas &= inner & ~bone & (organs == 0) & ~lungs & ~heart
    params.update(
        diaphragm_z_mm=rounded(diaphragm),
        kidney_centre_z_mm=rounded(kidney_z),
        bladder_centre_mm=[rounded(v) for v in bladder_centre],
        bladder_semi_axes_mm=[rounded(v) for v in bladder_axes],
        bowel_gas_pockets=pockets,
    )
    return SoftTissues(lungs, heart, organs, gas)


def _lungs_and_heart(rng: np.random.Generator, field: Field, spine: Spine, cage: RibCage, bone: np.ndarray,
                     inner: np.ndarray) -> Tuple[float, np.ndarray, np.ndarray]:
    """(diaphragm height, lungs, heart): lungs fill the rib cage above a domed diaphragm (the left dome
    lower), less the spine, mediastinum and heart."""
    X, Y, zs, kz = field.x, field.y, field.grid.z, field.height_scale
    outline = spine.outline
    cx, cy = outline.centre_x, outline.centre_y
    s_dia = spine.vertebra("T10").middle + uniform(rng, (-15, 15)) * kz
    s_dia_left = s_dia - uniform(rng, (5, 20))
    A_c, B_c = cage.semi_axes(zs)
    A_c = (A_c - cage.rib_radius - 3.0)[:, None, None]
    B_c = (B_c - cage.rib_radius - 3.0)[:, None, None]
    q2 = ((X - cx) / A_c) ** 2 + ((Y - cy) / B_c) ** 2
    Zs = zs[:, None, None]
    dome = np.where(X < cx, s_dia, s_dia_left) - 40.0 * q2
    lungs = (q2 <= 1.0) & (Zs > dome) & (Zs < spine.top_z + 15.0)
    yv3 = spine.body_y(zs)[:, None, None]
    rx_med = 20.0 * field.bone_scale
    lungs &= ~((np.abs(X - cx) < rx_med + 12.0) & (Y > yv3 - 30.0))  # spine and posterior mediastinum
    med = (((X - cx - 0.05 * A_c) / (0.22 * A_c)) ** 2 + ((Y - cy + 0.2 * B_c) / (0.9 * B_c)) ** 2) <= 1.0
    a_dia, b_dia = float(outline.semi_a(s_dia)), float(outline.semi_b(s_dia))
    heart_c = np.array([cx + 0.15 * a_dia, cy - 0.25 * b_dia, s_dia + 55.0])
    heart_ax = np.array([0.33 * a_dia, 0.42 * b_dia, 55.0 * kz])
    heart = (((X - heart_c[0]) / heart_ax[0]) ** 2 + ((Y - heart_c[1]) / heart_ax[1]) ** 2
             + ((Zs - heart_c[2]) / heart_ax[2]) ** 2) <= 1.0
    lungs &= ~med & ~heart & inner
    heart &= inner & ~bone
    lungs &= ~bone
    return s_dia, lungs, heart


def _liver(rng: np.random.Generator, field: Field, spine: Spine, s_dia: float, lungs: np.ndarray,
           heart: np.ndarray, bone: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Under the right dome of the diaphragm, tapering downwards."""
    X, Y, Zs = field.x, field.y, field.grid.z[:, None, None]
    outline = spine.outline
    cx, cy = outline.centre_x, outline.centre_y
    liver_h = uniform(rng, (120, 170)) * field.height_scale
    a_dia, b_dia = float(outline.semi_a(s_dia)), float(outline.semi_b(s_dia))
    liver_c = np.array([cx - 0.35 * a_dia, cy - 0.05 * b_dia])
    liver_ax = np.array([0.5 * a_dia, 0.7 * b_dia])
    taper = np.sqrt(np.clip((Zs - (s_dia - liver_h)) / liver_h, 0.0, 1.0)) + 1e-6
    liver = ((X - liver_c[0]) / (liver_ax[0] * taper)) ** 2 + ((Y - liver_c[1]) / (liver_ax[1] * taper)) ** 2 <= 1.0
    liver &= (Zs <= s_dia + 10.0) & (Zs >= s_dia - liver_h) & inner & ~lungs & ~bone & ~heart
    return liver


def _paint_kidneys(rng: np.random.Generator, field: Field, spine: Spine, bone: np.ndarray, inner: np.ndarray,
                   organs: np.ndarray) -> float:
    """Two ellipsoids beside L1 (the right one lower) painted into ``organs``; returns their height."""
    kz, kw, outline = field.height_scale, field.bone_scale, spine.outline
    l1 = spine.vertebra("L1")
    kid_s = l1.bottom + uniform(rng, (-15, 15)) * kz
    kid_ax = np.array([uniform(rng, (22, 28)), uniform(rng, (18, 24)), uniform(rng, (45, 60)) * kz]) * kw
    kid_drop = uniform(rng, (5, 25))
    for side in (-1.0, 1.0):
        kc = [outline.centre_x + side * (l1.rx + 38.0 * kw), float(spine.body_y(kid_s)) + 5.0,
              kid_s - (kid_drop if side < 0 else 0.0)]
        _paint_organ(field, kc, kid_ax, bone, inner, organs, ORGAN_CODES["kidney"])
    return kid_s


def _paint_bladder(rng: np.random.Generator, field: Field, spine: Spine, bone: np.ndarray, inner: np.ndarray,
                   organs: np.ndarray) -> Tuple[list, np.ndarray]:
    """An ellipsoid behind the pubis painted into ``organs``; returns (centre, semi-axes)."""
    outline = spine.outline
    bl_ax = np.array([uniform(rng, (28, 55)), uniform(rng, (22, 42)), uniform(rng, (22, 42))])
    b_bl = float(outline.semi_b(40.0)) - outline.fat
    bl_c = [outline.centre_x + uniform(rng, (-8, 8)), outline.centre_y - 0.72 * b_bl + bl_ax[1],
            uniform(rng, (15, 55)) * field.height_scale + bl_ax[2] * 0.5]
    _paint_organ(field, bl_c, bl_ax, bone, inner, organs, ORGAN_CODES["bladder"])
    return bl_c, bl_ax


def _paint_organ(field: Field, centre, semi_axes, bone: np.ndarray, inner: np.ndarray, organs: np.ndarray,
                 code: int) -> None:
    sub = field.grid.ellipsoid(centre, semi_axes)
    if sub is not None:
        organs[sub[0]][sub[1] & inner[sub[0]] & ~bone[sub[0]]] = code


def _bowel_gas(rng: np.random.Generator, field: Field, spine: Spine, s_dia: float) -> Tuple[np.ndarray, int]:
    """(mask, count) of 0-4 gas pockets in the abdomen, not yet clipped to free space."""
    outline = spine.outline
    gas = np.zeros(field.grid.shape, bool)
    n_gas = int(rng.integers(0, 5))
    for _ in range(n_gas):
        s = uniform(rng, (110.0 * field.height_scale, s_dia - 40.0))
        gc = [outline.centre_x + uniform(rng, (-0.6, 0.6)) * float(outline.semi_a(s)),
              outline.centre_y - uniform(rng, (0.0, 0.6)) * float(outline.semi_b(s)), s]
        sub = field.grid.ellipsoid(gc, rng.uniform(8, 25, 3))
        if sub is not None:
            gas[sub[0]] |= sub[1]
    return gas, n_gas
