"""Phantom generator: determinism, geometry, labels, uptake, ranges, CT-derived alignment, writing."""
import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from FCMSegmentationLib import phantoms as P
from FCMSegmentationLib.phantoms import command as phantom_command_module
from FCMSegmentationLib.errors import InputError
from FCMSegmentationLib.preprocessing import overlap_region

SEEDS = (2, 3, 14, 18)  # thorax, thorax-abdomen, pelvis, abdomen (with hot and cold lesions)
# TotalSegmentator 'total' bone ids, written out here independently of the module under test.
TS_BONE = set(range(25, 51)) | set(range(69, 79)) | set(range(91, 117))


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    return repo_root().parent / "shared" / "data"


def real_ct_paths():
    base = data_dir() / "realct_dicom"
    ct, labels = base / "ct_dicom", base / "totalsegmentator_labels.nii.gz"
    if not (ct.is_dir() and labels.is_file()):
        pytest.skip(f"real CT test data not found at {base} (expected ../shared/data beside the repository)")
    return ct, labels


@functools.lru_cache(maxsize=None)
def proc(seed: int) -> P.PhantomCase:
    return P.procedural_phantom(seed)


@functools.lru_cache(maxsize=None)
def real_ct():
    from FCMSegmentationLib import imageio

    ct_path, labels_path = real_ct_paths()
    return imageio.read_image(ct_path), imageio.read_image(labels_path)


@functools.lru_cache(maxsize=None)
def ct_case(seed: int) -> P.PhantomCase:
    ct, labels = real_ct()
    return P.ct_derived_phantom(seed, ct, labels)


def arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


def geometry(img: sitk.Image):
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def small_ranges(**changes) -> P.SimulationRanges:
    """A fast, small field for uptake tests (degenerate ranges consume no random draws)."""
    base = dict(
        field_width_mm=(300.0, 300.0),
        field_length_mm=(160.0, 160.0),
        ct_spacing_mm=(3.0, 3.0),
        ct_slice_mm=(3.0, 3.0),
        psf_fwhm_mm=(8.0, 8.0),
        count_density=(2000.0, 2000.0),
        postfilter_fwhm_mm=(0.0, 0.0),
        misregistration_shift_mm=(0.0, 0.0),
        misregistration_rotation_deg=(0.0, 0.0),
        lesion_count=(3, 3),
        lesion_diameter_mm=(16.0, 20.0),
        cold_lesion_probability=0.0,
        lesion_ct_change_probability=0.0,
    )
    base.update(changes)
    return dataclasses.replace(P.TRAINING_RANGES, **base)


# ------------------------------------------------------------------------------------ determinism


def test_same_seed_same_case():
    a, b = proc(3), P.procedural_phantom(3)
    for name in ("spect", "ct", "truth"):
        ia, ib = getattr(a, name), getattr(b, name)
        assert geometry(ia) == geometry(ib)
        np.testing.assert_array_equal(arr(ia), arr(ib))
    assert json.dumps(a.params, sort_keys=True) == json.dumps(b.params, sort_keys=True)


RECORDED_DRAWS = Path(__file__).parent / "data" / "phantom_params.json"


def recorded_cases():
    """The cases whose params are recorded: a procedural one, a shifted one, a CT-derived one."""
    return {"procedural_14": proc(14), "shifted_3": P.procedural_phantom(3, P.SHIFTED_RANGES), "ct_0": ct_case(0)}


def assert_params_match(got, want, where="params"):
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for key in want:
            assert_params_match(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_params_match(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-3), where
    else:
        assert got == want, where


def test_seeds_reproduce_the_recorded_cases():
    """A seed's case must not change when the code is reorganised: the README's training recipe names seeds.

    Every parameter (and so the order of the random draws) is compared with the record. After an intended
    change of the simulation, rewrite the record with FCMSEG_RECORD_PHANTOMS=1 and say so in the commit.
    """
    import os

    params = {name: case.params for name, case in recorded_cases().items()}
    if os.environ.get("FCMSEG_RECORD_PHANTOMS") == "1":
        RECORDED_DRAWS.parent.mkdir(exist_ok=True)
        RECORDED_DRAWS.write_text(json.dumps(params, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    assert_params_match(params, json.loads(RECORDED_DRAWS.read_text(encoding="utf-8")))


def test_different_seeds_differ():
    a, b = proc(SEEDS[0]), proc(SEEDS[1])
    assert a.params["psf_fwhm_mm"] != b.params["psf_fwhm_mm"]
    assert a.params["bone_ratio"] != b.params["bone_ratio"]
    if a.ct.GetSize() == b.ct.GetSize():
        assert not np.array_equal(arr(a.truth), arr(b.truth))


# ------------------------------------------------------------------------------ geometry and labels


@pytest.mark.parametrize("seed", SEEDS)
def test_geometry_types_and_labels(seed):
    case = proc(seed)
    assert geometry(case.truth) == geometry(case.ct)
    assert case.truth.GetPixelID() == sitk.sitkUInt8
    assert case.ct.GetPixelID() in (sitk.sitkInt16, sitk.sitkFloat32)
    assert case.spect.GetPixelID() == sitk.sitkFloat32
    spacing = np.array(case.spect.GetSpacing())
    assert np.all((spacing >= 3.0 - 1e-9) & (spacing <= 5.0 + 1e-9)), spacing
    assert geometry(case.spect)[:3] != geometry(case.ct)[:3]
    assert case.spect.GetSpacing() != case.ct.GetSpacing()
    overlap_region(case.ct, case.spect)  # raises if they do not overlap in space
    truth = arr(case.truth)
    assert set(np.unique(truth).tolist()) <= {0, 1, 2}
    assert (truth == 1).sum() > 1000
    assert (truth == 2).sum() == case.params["lesion_voxels"]
    assert case.params["lesion_count"] == len(case.params["lesions"])
    spect = arr(case.spect)
    assert np.isfinite(spect).all() and spect.min() >= 0 and spect.max() > 0
    json.dumps(case.params, allow_nan=False)  # JSON-serialisable


@pytest.mark.parametrize("seed", SEEDS)
def test_bone_hu_high_elsewhere_low(seed):
    case = proc(seed)
    ct, truth = arr(case.ct).astype(float), arr(case.truth)
    assert np.median(ct[truth == 1]) > 150
    assert np.percentile(ct[truth > 0], 95) > 600  # cortex
    assert np.median(ct[truth == 0]) < 100
    body_non_bone = (truth == 0) & (ct > -300)
    assert np.median(ct[body_non_bone]) < 100


@pytest.mark.parametrize("seed", SEEDS)
def test_lesions_labelled_inside_bone(seed):
    case = proc(seed)
    truth = arr(case.truth)
    lesion = truth == 2
    for les in case.params["lesions"]:
        x, y, z = les["centre_index_xyz"]
        assert truth[z, y, x] == 2
        idx = case.ct.TransformPhysicalPointToIndex(les["centre_mm"])
        assert tuple(idx) == (x, y, z)
    # every lesion component touches ordinary bone (it sits in a bone, not in soft tissue)
    comps, n = ndimage.label(lesion)
    near_bone = ndimage.binary_dilation(truth == 1)
    for k in range(1, n + 1):
        assert (near_bone & (comps == k)).any()


def test_lesions_within_ct_bone():
    """Independent of the labels: lesion voxels lie in high-HU bone (dilated by one voxel)."""
    rng_ranges = small_ranges(lesion_count=(6, 6), lesion_diameter_mm=(4.0, 20.0), marrow_hu=(250.0, 400.0),
                              ct_noise_hu=(5.0, 10.0))
    for seed in (11, 12):
        case = P.procedural_phantom(seed, rng_ranges)
        ct, truth = arr(case.ct), arr(case.truth)
        assert (truth == 2).any()
        ct_bone = ndimage.binary_dilation(ct > 100)
        assert ct_bone[truth == 2].all()
        assert ct_bone[truth == 1].mean() > 0.99


def _lesion_and_bone_means(case):
    spect = sitk.Resample(case.spect, case.ct, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    s, truth = arr(spect), arr(case.truth)
    ones = sitk.Image(case.spect.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(case.spect)
    inside = arr(sitk.Resample(ones, case.ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    return s[(truth == 2) & inside].mean(), s[(truth == 1) & inside].mean()


def test_lesion_uptake_follows_contrast():
    seed = 21
    hot = P.procedural_phantom(seed, small_ranges(lesion_contrast=(5.0, 5.0)))
    flat = P.procedural_phantom(seed, small_ranges(lesion_contrast=(1.0, 1.0)))
    cold = P.procedural_phantom(seed, small_ranges(cold_lesion_probability=1.0, cold_lesion_contrast=(0.1, 0.1)))
    np.testing.assert_array_equal(arr(hot.truth), arr(flat.truth))  # same anatomy and lesions
    np.testing.assert_array_equal(arr(hot.truth), arr(cold.truth))
    assert all(les["contrast"] == 5.0 and not les["cold"] for les in hot.params["lesions"])
    assert all(les["cold"] for les in cold.params["lesions"])
    hot_lesion, hot_bone = _lesion_and_bone_means(hot)
    flat_lesion, _ = _lesion_and_bone_means(flat)
    cold_lesion, _ = _lesion_and_bone_means(cold)
    assert hot_lesion > hot_bone  # a hot lesion outshines bone on average
    assert hot_lesion > 1.5 * flat_lesion
    assert cold_lesion < 0.9 * flat_lesion


def test_misregistration_transform_puts_the_truth_where_the_spect_shows_it():
    case = P.procedural_phantom(21, small_ranges(misregistration_shift_mm=(9.0, 9.0), lesion_count=(0, 0)))
    rigid = P.misregistration_transform(case.params)
    centre = np.array(case.params["misregistration_centre_mm"])
    np.testing.assert_allclose(rigid.TransformPoint(centre.tolist()),
                               centre + case.params["misregistration_shift_vector_mm"], atol=1e-6)
    spect = arr(sitk.Resample(case.spect, case.ct, sitk.Transform(), sitk.sitkLinear, 0.0))
    inside = spect > 0

    def bone_contrast(truth: sitk.Image) -> float:
        bone = arr(truth) > 0
        return spect[bone & inside].mean() / spect[~bone & inside].mean()

    moved = sitk.Resample(case.truth, case.truth, rigid, sitk.sitkNearestNeighbor, 0)
    backwards = sitk.Resample(case.truth, case.truth, rigid.GetInverse(), sitk.sitkNearestNeighbor, 0)
    # the SPECT's bone uptake lines up with the moved bone better than with the CT's, or the opposite move
    assert bone_contrast(moved) > 1.05 * bone_contrast(case.truth) > 1.05 * bone_contrast(backwards)


# ------------------------------------------------------------------------------------------- ranges


def _within(value, rng, tol=1e-3):
    return rng[0] - tol <= value <= rng[1] + tol


def test_parameters_within_training_ranges():
    r = P.TRAINING_RANGES
    for seed in SEEDS:
        p = proc(seed).params
        assert p["kind"] == "procedural" and p["seed"] == seed and p["ranges"] == "training"
        for name in (
            "psf_fwhm_mm",
            "bone_ratio",
            "count_density",
            "misregistration_shift_mm",
            "misregistration_rotation_deg",
            "ct_spacing_mm",
            "ct_slice_mm",
            "field_width_mm",
            "field_length_mm",
            "cortex_hu",
            "marrow_hu",
            "ct_noise_hu",
            "bladder_uptake",
            "kidney_uptake",
            "liver_uptake",
            "postfilter_fwhm_mm",
        ):
            assert _within(p[name], getattr(r, name)), (seed, name, p[name])
        assert all(_within(s, r.spect_spacing_mm) for s in p["spect_spacing_mm"])
        assert r.lesion_count[0] <= p["lesion_count"] <= r.lesion_count[1]
        assert abs(np.linalg.norm(p["misregistration_shift_vector_mm"]) - p["misregistration_shift_mm"]) < 1e-2
        for les in p["lesions"]:
            assert _within(les["diameter_mm"], r.lesion_diameter_mm)
            assert _within(les["contrast"], r.cold_lesion_contrast if les["cold"] else r.lesion_contrast)
        ct_size = proc(seed).ct.GetSize()
        assert int(np.prod(ct_size)) <= r.max_ct_voxels


def test_shifted_ranges_lie_outside_training():
    t, s = P.TRAINING_RANGES, P.SHIFTED_RANGES
    assert s.psf_fwhm_mm[0] >= t.psf_fwhm_mm[1]
    assert s.count_density[1] <= t.count_density[0]
    assert s.lesion_contrast[0] < t.lesion_contrast[0]
    case = P.procedural_phantom(3, P.SHIFTED_RANGES)
    p = case.params
    assert p["ranges"] == "shifted"
    assert _within(p["psf_fwhm_mm"], s.psf_fwhm_mm) and _within(p["count_density"], s.count_density)
    assert p["lesion_count"] >= 1
    assert all(_within(les["contrast"], (1.2, 1.6)) for les in p["lesions"])


def test_invalid_arguments():
    with pytest.raises(InputError):
        P.procedural_phantom(-1)
    with pytest.raises(InputError):
        P.procedural_phantom(0, dataclasses.replace(P.TRAINING_RANGES, psf_fwhm_mm=(18.0, 8.0)))
    with pytest.raises(InputError):
        P.generate_phantom(0, kind="xcat")
    with pytest.raises(InputError):
        P.generate_phantom(0, kind="ct")
    with pytest.raises(InputError):
        P.phantom_command("unused", 0, from_ct="ct_dir")  # labels missing
    with pytest.raises(InputError):
        P.phantom_command("unused", 0, count=0)


def test_spect_direction_option():
    angle = np.deg2rad(10.0)
    c, s = np.cos(angle), np.sin(angle)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    case = P.procedural_phantom(3, spect_direction=direction)
    np.testing.assert_allclose(case.spect.GetDirection(), direction, atol=1e-12)
    assert case.ct.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    overlap_region(case.ct, case.spect)
    assert arr(case.spect).sum() > 0


# --------------------------------------------------------------------------------------- CT-derived


@pytest.mark.parametrize("seed", (0, 1))
def test_ct_derived_bone_matches_totalsegmentator(seed):
    case = ct_case(seed)
    _, labels = real_ct()
    assert case.params["kind"] == "ct" and case.params["label_kind"] == "totalsegmentator"
    assert geometry(case.truth) == geometry(case.ct)
    truth = arr(case.truth)
    assert set(np.unique(truth).tolist()) <= {0, 1, 2}
    ts = arr(sitk.Resample(labels, case.truth, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID()))
    ts_bone = np.isin(ts, sorted(TS_BONE))
    assert truth.any()
    assert ts_bone[truth > 0].all()  # truth bone is TotalSegmentator bone (117 cartilage excluded)
    assert (truth[ts_bone] > 0).mean() > 0.99
    assert not (truth[ts == 117] > 0).any()
    assert np.median(arr(case.ct)[truth == 1]) > 150
    spacing = np.array(case.spect.GetSpacing())
    assert np.all((spacing >= 3.0) & (spacing <= 5.0))
    assert case.spect.GetSpacing() != case.ct.GetSpacing()
    assert max(case.ct.GetSpacing()[:2]) > 1.4  # coarser than the 0.98 mm source


def test_ct_derived_physical_alignment():
    """A bone voxel of the label map maps, by physical point, to bone in the truth and to bone HU in the CT."""
    ct, labels = real_ct()
    assert labels.GetDirection() != ct.GetDirection()  # the y flip the resampling must respect
    lab = arr(labels)
    vertebra = ndimage.binary_erosion(np.isin(lab, sorted(range(25, 51))), iterations=3)
    assert vertebra.any()
    z, y, x = np.argwhere(vertebra)[len(np.argwhere(vertebra)) // 2]
    point = labels.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
    ct_idx = ct.TransformPhysicalPointToIndex(point)
    assert arr(ct)[ct_idx[2], ct_idx[1], ct_idx[0]] > 150  # the source CT agrees: that point is bone
    for seed in (0, 1):
        case = ct_case(seed)
        idx = case.truth.TransformPhysicalPointToIndex(point)
        if not all(0 <= i < n for i, n in zip(idx, case.truth.GetSize())):
            continue  # cropped away in z
        assert arr(case.truth)[idx[2], idx[1], idx[0]] > 0
        assert arr(case.ct)[idx[2], idx[1], idx[0]] > 100


def test_bone_mask_from_totalsegmentator():
    _, labels = real_ct()
    bone, organs = P.bone_mask_from_totalsegmentator(labels)
    assert geometry(bone) == geometry(labels) and geometry(organs) == geometry(labels)
    lab, b, o = arr(labels), arr(bone), arr(organs)
    np.testing.assert_array_equal(b > 0, np.isin(lab, sorted(TS_BONE)))
    assert (o == P.ORGAN_CODES["liver"]).sum() == (lab == 5).sum() > 0


# -------------------------------------------------------------------------------------------- writing


def test_write_phantom_atomic(tmp_path):
    case = proc(3)
    paths = P.write_phantom(case, tmp_path / "case_3")
    names = sorted(p.name for p in (tmp_path / "case_3").iterdir())
    assert names == ["ct.nii.gz", "params.json", "spect.nii.gz", "truth.nii.gz"]
    assert sorted(paths) == ["ct", "params", "spect", "truth"]
    truth = sitk.ReadImage(str(paths["truth"]))
    np.testing.assert_array_equal(arr(truth), arr(case.truth))
    np.testing.assert_allclose(truth.GetOrigin(), case.truth.GetOrigin(), atol=1e-4)
    spect = sitk.ReadImage(str(paths["spect"]))
    np.testing.assert_allclose(spect.GetSpacing(), case.spect.GetSpacing(), atol=1e-5)
    np.testing.assert_array_equal(arr(spect), arr(case.spect))
    assert json.loads(paths["params"].read_text()) == json.loads(json.dumps(case.params))


def test_phantom_command(tmp_path, monkeypatch):
    calls = []
    small = P.procedural_phantom(5, small_ranges())

    def fake(seed, kind, ranges, ct=None, bone_labels=None):
        calls.append((seed, kind, ranges))
        return P.PhantomCase(small.spect, small.ct, small.truth, dict(small.params, seed=seed))

    monkeypatch.setattr(phantom_command_module, "generate_phantom", fake)
    seen = []
    out = P.phantom_command(str(tmp_path / "out"), seed=7, count=2, shifted=True, progress=lambda f, m: seen.append(f))
    assert [c[0] for c in calls] == [7, 8] and all(c[1] == "procedural" for c in calls)
    assert all(c[2] is P.SHIFTED_RANGES for c in calls)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_7", "case_8"]
    assert len(out) == 2 and all(Path(d["spect"]).is_file() for d in out)
    assert json.loads(Path(out[1]["params"]).read_text())["seed"] == 8
    assert seen[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in seen)
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.name.startswith(".")]
    assert not leftovers


def test_phantom_command_from_ct(tmp_path):
    ct_path, labels_path = real_ct_paths()
    out = P.phantom_command(str(tmp_path), seed=4, from_ct=str(ct_path), bone_labels=str(labels_path))
    params = json.loads(Path(out[0]["params"]).read_text())
    assert params["kind"] == "ct" and params["seed"] == 4
    assert sorted(p.name for p in (tmp_path / "case_4").iterdir()) == [
        "ct.nii.gz",
        "params.json",
        "spect.nii.gz",
        "truth.nii.gz",
    ]
