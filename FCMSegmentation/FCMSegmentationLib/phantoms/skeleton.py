"""The procedural skeleton: spine and sacrum, pelvis and femora, ribs, sternum, scapulae and clavicles.

Bones are painted as unions of balls along curves (:meth:`Grid.paint_balls`) into a boolean (z, y, x) mask;
heights are in anatomical millimetres (0 = femoral-head centres), scaled by the field's height scale, and
bone sizes by its bone scale.
"""
import math
from dataclasses import dataclass
from typing import List, NamedTuple, Tuple

import numpy as np

from .geometry import bezier, resample_curve
from .ranges import uniform
from .torso import BodyOutline, Field


class Vertebra(NamedTuple):
    """One vertebral body's level and size; heights in anatomical mm."""

    name: str  # "L5" .. "L1", "T12" .. "T1"
    bottom: float  # mm
    top: float
    rx: float  # semi-axes of the vertebral body (mm)
    ry: float

    @property
    def middle(self) -> float:
        """Height (mm) half-way up the vertebral body."""
        return 0.5 * (self.bottom + self.top)


@dataclass
class Spine:
    """Vertebrae from the sacral promontory up, their masks, and the body-centre line they sit on."""

    vertebrae: List[Vertebra]
    promontory_z: float
    top_z: float
    y_knots: np.ndarray  # heights at which the vertebral body's depth in the body is given
    y_fractions: np.ndarray  # ... as a fraction of the body's antero-posterior semi-axis
    outline: BodyOutline
    mask: np.ndarray  # vertebrae and sacrum
    discs: np.ndarray  # intervertebral discs

    def body_y(self, s):
        """y (mm) of the vertebral bodies' centre at height(s) ``s``."""
        return self.outline.centre_y + self.outline.semi_b(s) * np.interp(s, self.y_knots, self.y_fractions)

    def vertebra(self, name: str) -> Vertebra:
        """The vertebra called ``name`` ("L1", "T10", ...)."""
        return next(v for v in self.vertebrae if v.name == name)


def build_spine(rng: np.random.Generator, field: Field, outline: BodyOutline) -> Spine:
    """Lumbar and thoracic vertebrae (bodies, arches, spinous and transverse processes, disc gaps) and the
    sacrum, with randomly varied heights and disc spaces."""
    kz, kw = field.height_scale, field.bone_scale
    s_s1 = 170.0 * kz
    vertebrae = []
    z = s_s1
    for i in range(17):
        lumbar = i < 5
        t = i / 4.0 if lumbar else (i - 5) / 11.0
        h = (26.0 - 2.0 * t if lumbar else 22.0 - 7.0 * t) * kz * uniform(rng, (0.93, 1.07))
        disc = (9.0 if lumbar else 5.5) * kz * uniform(rng, (0.8, 1.2))
        rx = (24.0 - 3.0 * t if lumbar else 19.0 - 6.0 * t) * kw
        ry = (17.0 - 2.0 * t if lumbar else 15.0 - 4.0 * t) * kw
        z += disc
        vertebrae.append(Vertebra("L%d" % (5 - i) if lumbar else "T%d" % (12 - (i - 5)), z, z + h, rx, ry))
        z += h
    y_knots = np.array([0, 200, 350, 450, 760]) * kz
    y_fractions = np.array([0.25, 0.22, 0.18, 0.32, 0.38]) + rng.uniform(-0.04, 0.04, 5)
    shape = field.grid.shape
    spine = Spine(vertebrae, s_s1, z, y_knots, y_fractions, outline, np.zeros(shape, bool), np.zeros(shape, bool))
    _paint_vertebrae(spine, field)
    _paint_sacrum(spine, field)
    return spine


def _paint_vertebrae(spine: Spine, field: Field) -> None:
    """Vertebral bodies, arches and processes, and the disc gaps between them, slice by slice."""
    X, Y, kw, cx = field.x[0], field.y[0], field.bone_scale, spine.outline.centre_x
    lv_z = np.array([[v.bottom, v.top] for v in spine.vertebrae])
    for k, s in enumerate(field.grid.z):
        inside = np.nonzero((lv_z[:, 0] <= s) & (s <= lv_z[:, 1]))[0]
        yv = float(spine.body_y(s))
        if inside.size == 0:
            below = np.nonzero(lv_z[:, 0] > s)[0]
            if below.size and (below[0] == 0 or lv_z[below[0] - 1, 1] < s):
                j = below[0]
                rx, ry = spine.vertebrae[j].rx, spine.vertebrae[j].ry
                if j > 0 or s > spine.promontory_z:
                    spine.discs[k] = ((X - cx) / rx) ** 2 + ((Y - yv) / ry) ** 2 <= 1.0
            continue
        name, zb, zt, rx, ry = spine.vertebrae[inside[0]]
        tz = (s - zb) / (zt - zb)
        Xc, Yc = X - cx, Y - yv
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
        spine.mask[k] = sl


def _sacrum_bottom(spine: Spine, field: Field) -> float:
    """Height (mm) of the sacrum's tip."""
    return spine.promontory_z - 120.0 * field.height_scale


def _sacrum_half_width(spine: Spine, field: Field, s: float) -> float:
    """Left-right semi-axis (mm) of the sacrum at height ``s`` (clamped to its extent)."""
    bottom = _sacrum_bottom(spine, field)
    t = min(1.0, max(0.0, (s - bottom) / (spine.promontory_z - bottom)))
    return (12.0 + 42.0 * t) * field.bone_scale


def _paint_sacrum(spine: Spine, field: Field) -> None:
    """A wedge from the promontory down, curving backwards."""
    X, Y, kw, cx = field.x[0], field.y[0], field.bone_scale, spine.outline.centre_x
    sac_bot = _sacrum_bottom(spine, field)
    for k, s in enumerate(field.grid.z):
        if sac_bot <= s <= spine.promontory_z:
            t = (s - sac_bot) / (spine.promontory_z - sac_bot)
            yv = float(spine.body_y(s)) + (1 - t) * 25.0
            wx, wy = _sacrum_half_width(spine, field, s), (10.0 + 8.0 * t) * kw
            spine.mask[k] |= ((X - cx) / wx) ** 2 + ((Y - yv) / wy) ** 2 <= 1.0


def paint_pelvis(rng: np.random.Generator, field: Field, spine: Spine, bone: np.ndarray) -> None:
    """Iliac wings from the sacrum to the crest, pubic and ischial rami, hip joints, femoral heads and necks,
    trochanters and the top of the shafts, painted into ``bone``."""
    grid, kz, kw = field.grid, field.height_scale, field.bone_scale
    outline = spine.outline
    cy, fat = outline.centre_y, outline.fat
    head_r = uniform(rng, (21, 26)) * kw
    fh_x = 0.5 * float(outline.semi_a(0.0)) - fat * 0.3
    a_in0 = float(outline.semi_a(0.0)) - fat
    b_in0 = float(outline.semi_b(0.0)) - fat
    crest = spine.promontory_z + 25.0 * kz
    s_ac = 18.0 * kz
    heads = []
    for side in (-1.0, 1.0):
        pts, rad = [], []
        for s in np.arange(s_ac, crest + 1e-6, max(2.0, grid.sp[2])):
            t = (s - s_ac) / (crest - s_ac)
            a_s = float(outline.semi_a(s)) - fat
            b_s = float(outline.semi_b(s)) - fat
            ys_ = float(spine.body_y(s)) + 5.0
            wsac = _sacrum_half_width(spine, field, s)
            acet = np.array([side * (fh_x - 5.0), cy + 0.05 * b_s, s])
            asis = np.array([side * 0.78 * a_s, cy - 0.3 * b_s, s])
            p2 = (1 - t) * acet + t * asis
            p0 = np.array([side * (wsac + 2.0), ys_, s]) if t > 0.35 else (acet + np.array([0, 0.35 * b_s, 0]))
            p1 = np.array([side * 0.8 * a_s, ys_ - 0.05 * b_s, s]) if t > 0.35 else (p0 + p2) / 2
            th = (12.0 - 7.0 * t) * kw  # half-thickness
            curve = resample_curve(bezier(p0, p1, p2), th / 2)
            pts.append(curve)
            rad.append(np.full(len(curve), th))
        if pts:
            grid.paint_balls(bone, np.concatenate(pts), np.concatenate(rad))
        head = np.array([side * fh_x, cy + 0.02 * b_in0, 0.0])
        heads.append(head)
        # pubic ramus to the symphysis, ischium down to the tuberosity
        pubic = resample_curve(
            np.array([head + [-side * 5, -0.35 * b_in0, 8], [side * 9.0, cy - 0.82 * b_in0, -8.0 * kz]]), 3.0
        )
        ischium = resample_curve(
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
        grid.paint_balls(bone, resample_curve(np.array([head, troch]), 4.0), 13.0 * kw)
        grid.paint_balls(bone, troch, 16.0 * kw)
        shaft = resample_curve(np.array([troch, troch + [-side * 12.0, 0, -160.0]]), 5.0)
        grid.paint_balls(bone, shaft, 13.0 * kw)


@dataclass
class RibCage:
    """Where the ribs run: per rib (sorted by height) its height and the semi-axes of its ellipse."""

    rib_radius: float
    z: np.ndarray
    semi_a: np.ndarray
    semi_b: np.ndarray

    def semi_axes(self, s) -> Tuple[np.ndarray, np.ndarray]:
        """(left-right, antero-posterior) semi-axes of the cage at height(s) ``s``, interpolated."""
        return np.interp(s, self.z, self.semi_a), np.interp(s, self.z, self.semi_b)


def paint_thorax(rng: np.random.Generator, field: Field, spine: Spine, bone: np.ndarray) -> RibCage:
    """Ribs, sternum, scapulae and clavicles, painted into ``bone``; returns the rib cage's shape."""
    cage = _paint_ribs(rng, field, spine, bone)
    sternum_top = _paint_sternum(rng, field, spine, bone)
    _paint_scapulae(field, spine, cage, bone)
    _paint_clavicles(field, spine.outline, sternum_top, bone)
    return cage


def _paint_ribs(rng: np.random.Generator, field: Field, spine: Spine, bone: np.ndarray) -> RibCage:
    """12 pairs of curved tubes from the thoracic vertebrae round to the front, dropping as they go."""
    kz, kw, outline = field.height_scale, field.bone_scale, spine.outline
    cx, cy, fat = outline.centre_x, outline.centre_y, outline.fat
    r_rib = uniform(rng, (3.8, 5.2)) * kw
    cage = np.array([0.55, 0.68, 0.78, 0.86, 0.92, 0.96, 0.99, 1.0, 1.0, 0.99, 0.97, 0.95])
    ends = np.array([0.78, 0.8, 0.82, 0.83, 0.84, 0.84, 0.83, 0.78, 0.72, 0.62, 0.45, 0.32]) * math.pi
    rib_pts = []
    rib_ellipse = []  # (z, A, B) per rib, for lungs/scapulae
    for k in range(12):
        vertebra = spine.vertebra("T%d" % (k + 1))
        z0, rx, ry = vertebra.middle, vertebra.rx, vertebra.ry
        A_r = (float(outline.semi_a(z0)) - fat - 12.0 - r_rib) * cage[k]
        B_r = (float(outline.semi_b(z0)) - fat - 10.0 - r_rib) * (0.75 + 0.25 * cage[k])
        yv = float(spine.body_y(z0))
        rib_ellipse.append((z0, A_r, B_r))
        drop = (25.0 + 35.0 * k / 11.0) * kz * uniform(rng, (0.8, 1.2))
        phi0 = 0.2 * math.pi
        phi_end = ends[k] + uniform(rng, (-0.03, 0.03)) * math.pi
        phi = np.linspace(phi0, phi_end, 80)
        zz = z0 - drop * ((phi - phi0) / (math.pi - phi0)) ** 1.2
        for side in (-1.0, 1.0):
            arc = np.stack([cx + side * A_r * np.sin(phi), cy + B_r * np.cos(phi), zz], 1)
            head = np.array([cx + side * (rx + 3.0), yv + 0.4 * ry, z0])
            tuber = np.array([cx + side * (0.4 * rx + 20.0 * kw), yv + ry + 0.42 * rx + 1.5, z0])
            rib_pts.append(resample_curve(np.vstack([head, tuber, arc]), r_rib / 2))
    field.grid.paint_balls(bone, np.concatenate(rib_pts), r_rib)
    rib_order = np.argsort([e[0] for e in rib_ellipse])  # np.interp needs increasing z
    return RibCage(r_rib, *(np.array([rib_ellipse[i][j] for i in rib_order]) for j in range(3)))


def _paint_sternum(rng: np.random.Generator, field: Field, spine: Spine, bone: np.ndarray) -> float:
    """Manubrium and body: a flat plate behind the anterior wall. Returns the height of its top."""
    kz, outline = field.height_scale, spine.outline
    cx, cy, fat = outline.centre_x, outline.centre_y, outline.fat
    st_top = spine.vertebra("T2").middle - 20.0 * kz
    st_bot = spine.vertebra("T9").middle - 45.0 * kz
    st_half = uniform(rng, (5.0, 7.0))
    st_pts = []
    for s in np.arange(st_bot, st_top, st_half / 2):
        w = 14.0 + 10.0 * max(0.0, (s - (st_top - 50.0)) / 50.0)
        yb = cy - (float(outline.semi_b(s)) - fat - 6.0 - st_half)
        for xo in np.arange(-w + st_half, w - st_half + 1e-6, st_half / 2):
            st_pts.append((cx + xo, yb, s))
    field.grid.paint_balls(bone, np.array(st_pts), st_half)
    return st_top


def _paint_scapulae(field: Field, spine: Spine, cage: RibCage, bone: np.ndarray) -> None:
    """Thin curved plates outside the posterior ribs, triangular (narrowing downwards)."""
    cx, cy, r_rib = spine.outline.centre_x, spine.outline.centre_y, cage.rib_radius
    sc_top = spine.vertebra("T2").middle + 15.0 * field.height_scale
    sc_bot = spine.vertebra("T8").middle
    sc_pts, sc_rad = [], []
    for s in np.arange(sc_bot, sc_top, 2.0):
        t = (s - sc_bot) / (sc_top - sc_bot)
        A_r, B_r = cage.semi_axes(s)
        lo_phi = (0.25 - 0.1 * t) * math.pi
        hi_phi = (0.25 + 0.2 * t) * math.pi
        phi = np.linspace(lo_phi, hi_phi, max(2, int(10 + 40 * t)))
        for side in (-1.0, 1.0):
            arc = np.stack([cx + side * (A_r + r_rib + 9.0) * np.sin(phi), cy + (B_r + r_rib + 9.0) * np.cos(phi),
                            np.full_like(phi, s)], 1)
            sc_pts.append(arc)
            sc_rad.append(np.where(phi > hi_phi - 0.04 * math.pi, 6.0, 3.0))
    field.grid.paint_balls(bone, np.concatenate(sc_pts), np.concatenate(sc_rad))


def _paint_clavicles(field: Field, outline: BodyOutline, sternum_top: float, bone: np.ndarray) -> None:
    """From the manubrium out to the acromion."""
    cx, cy, fat = outline.centre_x, outline.centre_y, outline.fat
    for side in (-1.0, 1.0):
        a_t, b_t = float(outline.semi_a(sternum_top)) - fat, float(outline.semi_b(sternum_top)) - fat
        cl = bezier(
            [cx + side * 16.0, cy - b_t + 8.0, sternum_top + 8.0],
            [cx + side * 0.5 * a_t, cy - b_t + 2.0, sternum_top + 18.0],
            [cx + side * 0.85 * a_t, cy + 0.1 * b_t, sternum_top + 30.0],
        )
        field.grid.paint_balls(bone, resample_curve(cl, 3.0), 6.0 * field.bone_scale)
