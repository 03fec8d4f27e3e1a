"""The phantom generator's parts: random draws, drawing shapes, the torso frame, skeleton and organs."""
import math

import numpy as np
import pytest
from FCMSegmentationLib.errors import InputError
from FCMSegmentationLib.phantoms import TRAINING_RANGES
from FCMSegmentationLib.phantoms.case import ORGAN_CODES
from FCMSegmentationLib.phantoms.geometry import Grid, bezier, resample_curve
from FCMSegmentationLib.phantoms.procedural import build_torso
from FCMSegmentationLib.phantoms.ranges import check_seed, log_uniform, uniform
from FCMSegmentationLib.phantoms.skeleton import build_spine
from FCMSegmentationLib.phantoms.torso import REGIONS

# ------------------------------------------------------------------------------------------ draws


def test_uniform_of_an_empty_range_draws_nothing():
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    assert uniform(a, (3.0, 3.0)) == 3.0 and log_uniform(a, (2.0, 2.0)) == 2.0
    assert a.random() == b.random()  # the stream is where it was: later draws are unchanged


def test_uniform_and_log_uniform_stay_in_range():
    rng = np.random.default_rng(0)
    u = [uniform(rng, (2.0, 5.0)) for _ in range(500)]
    lu = [log_uniform(rng, (10.0, 1000.0)) for _ in range(2000)]
    assert min(u) >= 2.0 and max(u) <= 5.0
    assert min(lu) >= 10.0 and max(lu) <= 1000.0
    assert 0.25 < np.mean(np.array(lu) < 100.0) < 0.75  # log-uniform: half the draws below the geometric mean


@pytest.mark.parametrize("bad", (-1, 1.5, True, "3", None))
def test_check_seed_refuses_non_integers(bad):
    with pytest.raises(InputError, match="seed"):
        check_seed(bad)


# --------------------------------------------------------------------------------------- geometry


def test_paint_balls_volume_and_clipping():
    grid = Grid((40, 40, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    mask = np.zeros(grid.shape, bool)
    grid.paint_balls(mask, [[20.0, 20.0, 20.0]], 8.0)
    assert mask.sum() == pytest.approx(4 / 3 * math.pi * 8.0**3, rel=0.03)
    assert mask[20, 20, 20] and not mask[20, 20, 29]
    edge = np.zeros(grid.shape, bool)
    grid.paint_balls(edge, [[0.0, 0.0, 0.0], [500.0, 0.0, 0.0]], 5.0)  # one ball clipped, one wholly outside
    assert 0 < edge.sum() < 4 / 3 * math.pi * 5.0**3 / 4


def test_ellipsoid_sub_array_and_outside():
    grid = Grid((20, 30, 40), (2.0, 2.0, 2.0), (-40.0, -30.0, -20.0))
    sub = grid.ellipsoid([0.0, 0.0, 0.0], [10.0, 6.0, 4.0])
    slices, inside = sub
    assert inside.shape == tuple(s.stop - s.start for s in slices)
    assert inside.sum() == pytest.approx(4 / 3 * math.pi * 10 * 6 * 4 / 8.0, rel=0.15)
    assert grid.ellipsoid([500.0, 0.0, 0.0], [5.0, 5.0, 5.0]) is None


def test_resample_curve_spacing_and_ends():
    corner = np.array([[0.0, 0.0, 0.0], [30.0, 0.0, 0.0], [30.0, 40.0, 0.0]])
    pts = resample_curve(corner, 5.0)
    steps = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    assert np.allclose(pts[0], corner[0]) and np.allclose(pts[-1], corner[-1])
    assert steps.max() <= 5.0 + 1e-9 and len(pts) == 15  # 70 mm in 14 steps
    b = bezier([0, 0, 0], [5, 10, 0], [10, 0, 0], n=21)
    assert np.allclose(b[10], [5.0, 5.0, 0.0])  # the midpoint is halfway to the control point


# ------------------------------------------------------------------------------------ anatomy


def anatomy(seed: int):
    params = {}
    torso = build_torso(np.random.default_rng(seed), TRAINING_RANGES, params)
    return torso, params


@pytest.mark.parametrize("seed", (2, 14))  # thorax, pelvis
def test_field_and_body_outline(seed):
    torso, params = anatomy(seed)
    field, outline, body, inner = torso.field, torso.spine.outline, torso.body, torso.inner
    assert params["region"] in REGIONS
    nz, ny, nx = field.grid.shape
    assert nx * ny * nz <= TRAINING_RANGES.max_ct_voxels
    assert (nx - 1) * field.grid.sp[0] <= TRAINING_RANGES.field_width_mm[1]
    assert inner.any() and not (inner & ~body).any()  # the fat layer lies inside the body
    zs = field.grid.z
    assert np.all(outline.semi_b(zs) <= 0.9 * outline.semi_a(zs) + 1e-9)
    assert not body[:, 0, :].any() and not body[:, :, 0].any()  # the body stays inside the field


def test_spine_levels_run_upwards_without_overlap():
    torso, _ = anatomy(3)
    spine = build_spine(np.random.default_rng(0), torso.field, torso.spine.outline)
    names = [v.name for v in spine.vertebrae]
    assert names[:5] == ["L5", "L4", "L3", "L2", "L1"] and names[5] == "T12" and names[-1] == "T1"
    for below, above in zip(spine.vertebrae, spine.vertebrae[1:]):
        assert below.bottom < below.middle < below.top < above.bottom  # a disc space between neighbours
    assert spine.top_z == spine.vertebrae[-1].top
    assert spine.vertebra("L1").name == "L1"
    assert not (spine.discs & spine.mask).any()


@pytest.mark.parametrize("seed", (2, 3))  # thorax, thorax-abdomen
def test_soft_tissues_avoid_bone_and_each_other(seed):
    torso, params = anatomy(seed)
    field, inner, bone, cage, tissues = torso.field, torso.inner, torso.bone, torso.cage, torso.tissues
    for mask in (tissues.lungs, tissues.heart, tissues.organs > 0, tissues.gas):
        assert not (mask & bone).any() and not (mask & ~inner).any()
    assert not (tissues.lungs & tissues.heart).any()
    assert tissues.lungs.any()
    lung_z = field.grid.z[tissues.lungs.any(axis=(1, 2))]
    # above the domes: the left one up to 20 mm lower, both sagging at most 40 mm at the cage wall
    assert lung_z.min() > params["diaphragm_z_mm"] - 60.0
    assert set(np.unique(tissues.organs)) <= {0, *ORGAN_CODES.values()}
    a, b = cage.semi_axes(lung_z)
    assert np.all(a > 0) and np.all(b > 0)
