"""Grids and shapes the phantoms are drawn with: images on a reference grid, balls along curves, ellipsoids,
smooth random fields."""
import math
from typing import Sequence, Tuple

import numpy as np
import SimpleITK as sitk

#: A Gaussian's sigma per unit of its full width at half maximum.
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def image_on(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """``array`` (z, y, x) as an image with ``reference``'s geometry."""
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(reference)
    return img


def blank_geometry(shape_zyx: Sequence[int], spacing, origin, direction) -> sitk.Image:
    """An empty uint8 image carrying a grid: size from ``shape_zyx``, spacing/origin (x, y, z), direction."""
    img = sitk.Image([int(shape_zyx[2]), int(shape_zyx[1]), int(shape_zyx[0])], sitk.sitkUInt8)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(d) for d in direction])
    return img


class Grid:
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


def resample_curve(points: np.ndarray, step: float) -> np.ndarray:
    """Points along a polyline (K, 3) spaced ``step`` mm apart (ends included)."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(math.ceil(cum[-1] / max(step, 1e-3))) + 1)
    t = np.linspace(0.0, cum[-1], n)
    return np.stack([np.interp(t, cum, points[:, k]) for k in range(3)], axis=1)


def bezier(p0, p1, p2, n: int = 40) -> np.ndarray:
    """``n`` points of the quadratic Bezier curve with control points ``p0``, ``p1``, ``p2``."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t**2 * np.asarray(p2)


def smooth_field(rng: np.random.Generator, reference: sitk.Image, cell_mm: float = 60.0) -> np.ndarray:
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
