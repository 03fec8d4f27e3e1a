"""Tests of the benchmark helpers under scripts/benchlib (simulated user, classical baselines, report)."""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from benchlib import classical  # noqa: E402
from benchlib.common import (  # noqa: E402
    ACCURACY_SEED_OFFSETS, REPO, add_model_run_arguments, docs_folder, held_out_plan, write_section,
)
from benchlib.grid_bound import truth_through_working_grid  # noqa: E402
from benchlib.misregistration_bound import truth_where_spect_shows_it  # noqa: E402
from benchlib.simulated_user import PLANES, paint_strokes, seed_strokes  # noqa: E402
from FCMSegmentationLib.metrics import dice_per_class, same_geometry  # noqa: E402


@pytest.fixture()
def truth_array(tiny_case):
    return sitk.GetArrayFromImage(tiny_case[2])


def wrong_prediction(truth: np.ndarray) -> np.ndarray:
    """Lesion missed (called bone), a slab of soft tissue called bone, one bone end called background."""
    prediction = truth.copy()
    prediction[truth == 2] = 1
    slab = prediction[:, 5:12, 18:30]
    slab[truth[:, 5:12, 18:30] == 0] = 1
    prediction[:6][truth[:6] == 1] = 0
    return prediction


def test_strokes_land_inside_error_regions_with_the_true_class(tiny_case, truth_array):
    prediction = wrong_prediction(truth_array)
    spacing = tiny_case[2].GetSpacing()
    codes, strokes = paint_strokes(truth_array, prediction, spacing, 4, np.random.default_rng(0))
    painted = codes > 0
    assert len(strokes) == 4 and painted.any()
    assert np.all(prediction[painted] != truth_array[painted]), "a stroke left the wrongly-labelled regions"
    assert np.all(codes[painted] == truth_array[painted] + 1), "a stroke carries the wrong class"
    assert {s.true_class for s in strokes} >= {0, 1, 2}  # FP soft tissue, FN bone, missed lesion
    assert strokes[0].true_class == 2  # lesion (Dice 0) is the worst class: served first
    for stroke in strokes:
        assert stroke.plane in PLANES and stroke.length_mm <= 15.0 + 2 * max(spacing)
        assert stroke.code == stroke.true_class + 1 and stroke.predicted_class != stroke.true_class


def test_strokes_are_planar_short_and_never_repainted(tiny_case, truth_array):
    prediction = wrong_prediction(truth_array)
    spacing = tiny_case[2].GetSpacing()
    first, _ = paint_strokes(truth_array, prediction, spacing, 3, np.random.default_rng(1))
    second, strokes = paint_strokes(truth_array, prediction, spacing, 3, np.random.default_rng(2), painted_codes=first)
    assert not np.any((first > 0) & (second > 0))
    from scipy import ndimage

    labelled, count = ndimage.label(second > 0, structure=np.ones((3, 3, 3), bool))
    for k in range(1, count + 1):
        zyx = np.argwhere(labelled == k)
        assert (np.ptp(zyx, axis=0) == 0).any(), "a stroke spans more than one plane"
        extent_mm = np.ptp(zyx, axis=0)[::-1] * np.array(spacing)
        assert extent_mm.max() <= 15.0 + 2 * max(spacing)


def test_no_errors_no_strokes(tiny_case, truth_array):
    codes, strokes = paint_strokes(truth_array, truth_array.copy(), tiny_case[2].GetSpacing(), 4,
                                   np.random.default_rng(0))
    assert strokes == [] and not codes.any()


def test_confirming_strokes_land_inside_regions_the_prediction_labels_right(tiny_case, truth_array):
    spacing = tiny_case[2].GetSpacing()
    codes, strokes = paint_strokes(truth_array, truth_array.copy(), spacing, 1, np.random.default_rng(0),
                                   classes=(2,), confirming=True)
    painted = codes > 0
    assert len(strokes) == 1 and painted.any()
    assert np.all(truth_array[painted] == 2) and np.all(codes[painted] == 3)
    assert strokes[0].true_class == strokes[0].predicted_class == 2
    with pytest.raises(ValueError, match="prediction to confirm"):
        paint_strokes(truth_array, None, spacing, 1, np.random.default_rng(0), confirming=True)


def test_seed_strokes_cover_every_class_and_respect_limits(tiny_case, truth_array):
    spect, ct, truth = tiny_case
    body = sitk.GetArrayFromImage(ct) > classical.BODY_HU
    codes, strokes = seed_strokes(truth_array, truth.GetSpacing(), 2, np.random.default_rng(0),
                                  class_allowed={0: body})
    assert sorted({s.code for s in strokes}) == [1, 2, 3]
    assert np.all(codes[codes > 0] == truth_array[codes > 0] + 1)
    assert np.all(body[codes == 1]), "background seeds outside the body"


def test_otsu_baseline_returns_labels_on_the_truth_grid(tiny_case):
    spect, ct, truth = tiny_case
    for thresholds in (2, 4):
        labels = classical.otsu_spect(spect, truth, thresholds=thresholds)
        assert same_geometry(labels, truth) and labels.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayViewFromImage(labels))) <= {0, 1, 2}


def test_ct_threshold_baseline_finds_the_bone(tiny_case, truth_array):
    spect, ct, truth = tiny_case
    labels = classical.ct_threshold_otsu(spect, ct, truth)
    assert same_geometry(labels, truth)
    scores = dice_per_class(sitk.GetArrayFromImage(labels), truth_array)
    assert scores["bone"] > 0.8


def test_ct_bone_mask_fills_marrow_but_not_large_cavities():
    shell = np.zeros((3, 40, 40), bool)
    y, x = np.mgrid[0:40, 0:40]

    def ring(r0, r1, cy, cx):
        squared = (y - cy) ** 2 + (x - cx) ** 2
        return (squared >= r0 ** 2) & (squared <= r1 ** 2)

    shell[:] = ring(3, 4, 8, 8) | ring(15, 16, 22, 22)  # a small bone ring and a big 'rib cage'
    hu = np.where(shell, 1000.0, 0.0)
    mask = classical.ct_bone_mask(hu, spacing_xyz=(1.0, 1.0, 1.0), max_hole_mm2=100.0, closing_iterations=0)
    assert mask[1, 8, 8], "marrow of the small bone not filled"
    assert not mask[1, 22, 22], "the cavity inside the big ring was filled"


def test_fcm_baseline_returns_labels_on_the_truth_grid(tiny_case):
    spect, ct, truth = tiny_case
    labels, info = classical.fcm_spect_ct(spect, ct, truth, spacing_mm=4.0, sample=5000)
    assert same_geometry(labels, truth)
    assert sorted(info["class_of_cluster"]) == [0, 1, 2]


def test_growcut_labels_agree_with_seeds_and_update_incrementally(tiny_case, truth_array):
    pytest.importorskip("slicer", reason="slicer-core (Grow-from-seeds) is not installed")
    spect, ct, truth = tiny_case
    codes, _ = seed_strokes(truth_array, truth.GetSpacing(), 1, np.random.default_rng(0))
    growcut = classical.GrowCut(classical.growcut_intensity(spect, ct, truth), truth)
    labels = growcut.segment(codes)
    assert same_geometry(labels, truth)
    array = sitk.GetArrayFromImage(labels)
    assert np.all(array[codes > 0] == codes[codes > 0] - 1)
    assert dice_per_class(array, truth_array)["bone"] > 0.5
    more, _ = paint_strokes(truth_array, array, truth.GetSpacing(), 2, np.random.default_rng(1), painted_codes=codes)
    both = np.where(more > 0, more, codes)
    again = sitk.GetArrayFromImage(growcut.segment(both))
    assert growcut.runs == 2 and np.all(again[both > 0] == both[both > 0] - 1)


def test_report_sections_are_rewritten_in_place(tmp_path):
    report = tmp_path / "benchmarks.md"
    write_section(report, "a", "first A")
    write_section(report, "b", "only B")
    write_section(report, "a", "second A")
    text = report.read_text()
    assert "second A" in text and "first A" not in text and "only B" in text
    assert text.index("BEGIN a") < text.index("BEGIN b")
    assert text.count("<!-- BEGIN a -->") == 1 and text.count("<!-- END a -->") == 1
    titled = write_section(tmp_path / "other.md", "a", "body", title="# Other report\n")
    assert titled.read_text().startswith("# Other report\n")


def test_a_class_gets_both_missed_and_false_regions_painted(tiny_case, truth_array):
    prediction = truth_array.copy()
    prediction[:, 2:14, 5:40][truth_array[:, 2:14, 5:40] == 0] = 1  # a big false bone region
    prediction[:8][truth_array[:8] == 1] = 0  # a smaller missed bone region
    codes, strokes = paint_strokes(truth_array, prediction, tiny_case[2].GetSpacing(), 2, np.random.default_rng(0),
                                   classes=(1,))
    assert sorted(s.code for s in strokes) == [1, 2]  # one 'not bone' stroke, one 'bone' stroke


def test_grid_bound_keeps_thick_bone_and_loses_what_is_thinner_than_the_grid(tiny_case, truth_array):
    spect, ct, truth = tiny_case
    fine = truth_through_working_grid(spect, ct, truth, spacing_mm=min(truth.GetSpacing()))
    assert same_geometry(fine, truth)
    assert dice_per_class(sitk.GetArrayFromImage(fine), truth_array)["bone"] > 0.95
    plate = np.zeros_like(truth_array)
    plate[:, :, truth_array.shape[2] // 2] = 1  # one voxel thin: averaged away on a 3x coarser grid
    plate_image = sitk.GetImageFromArray(plate)
    plate_image.CopyInformation(truth)
    coarse = truth_through_working_grid(spect, ct, plate_image, spacing_mm=3 * max(truth.GetSpacing()))
    assert sitk.GetArrayFromImage(coarse).max() == 0


def misregistration(shift_mm):
    """Phantom params recording a pure shift (no rotation)."""
    return {"misregistration_centre_mm": [0.0, 0.0, 0.0], "misregistration_rotation_axis": [0.0, 0.0, 1.0],
            "misregistration_rotation_deg": 0.0, "misregistration_shift_vector_mm": list(shift_mm)}


def test_truth_where_spect_shows_it_moves_the_truth_by_the_recorded_misregistration(tiny_case, truth_array):
    truth = tiny_case[2]
    unmoved = truth_where_spect_shows_it(truth, misregistration((0.0, 0.0, 0.0)))
    assert same_geometry(unmoved, truth)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(unmoved), truth_array)
    step = truth.GetSpacing()[0]
    moved = sitk.GetArrayFromImage(truth_where_spect_shows_it(truth, misregistration((2 * step, 0.0, 0.0))))
    # the SPECT shows at x the activity at x + shift: the labels move by -shift (2 voxels down x)
    np.testing.assert_array_equal(moved[..., :-2], truth_array[..., 2:])
    assert dice_per_class(moved, truth_array)["lesion"] < 1.0


def test_compare_models_reports_paired_differences_against_the_first_model(tmp_path, random_model):
    import json

    import compare_models
    from FCMSegmentationLib.modelfile import default_model_path, save_model

    untrained = tmp_path / "untrained.pt"
    save_model(untrained, random_model.network, random_model.card)
    report = tmp_path / "selection.md"
    assert compare_models.main([str(default_model_path()), str(untrained), "--procedural", "1", "--ct-derived", "0",
                                "--report", str(report)]) == 0
    text = report.read_text()
    assert text.startswith("# Model selection") and "<!-- BEGIN compare_models -->" in text
    assert f"`{untrained}` minus `{default_model_path()}`" in text
    results = json.loads((tmp_path / "results" / "compare_models.json").read_text())
    difference = results["differences"][str(untrained)]["spect_ct_bone"]["all"]
    shipped, bare = (results["scores"][str(path)][0]["bone"] for path in (default_model_path(), untrained))
    assert difference["cases"] == 1 and difference["mean"] == pytest.approx(bare - shipped)
    assert difference["mean"] < 0  # random weights lose to the shipped model


def test_normalisation_moved_multiplies_the_normalised_spect_only_while_active(tiny_case):
    from benchlib.spect_scale import normalisation_moved
    from FCMSegmentationLib.preprocessing import SPECT_CLIP, prepare_case

    spect, ct, _ = tiny_case
    plain = prepare_case(spect, ct).features
    with normalisation_moved(1.0):
        np.testing.assert_array_equal(prepare_case(spect, ct).features, plain)
    with normalisation_moved(0.5):
        halved = prepare_case(spect, ct).features
    np.testing.assert_allclose(halved[0], plain[0] * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(halved[1:], plain[1:])  # the CT is untouched
    with normalisation_moved(100.0):
        assert prepare_case(spect, ct).features[0].max() == pytest.approx(SPECT_CLIP)  # clipped as usual
    np.testing.assert_array_equal(prepare_case(spect, ct).features, plain)  # restored afterwards
    with pytest.raises(ValueError, match="positive"):
        with normalisation_moved(0.0):
            pass


def test_compare_models_scores_every_model_again_with_the_spect_normalisation_moved_thick_ct_and_osem(
        tmp_path, random_model):
    import json

    import compare_models
    from FCMSegmentationLib.modelfile import default_model_path, save_model

    untrained = tmp_path / "untrained.pt"
    save_model(untrained, random_model.network, random_model.card)
    report = tmp_path / "selection.md"
    shipped = str(default_model_path())
    assert compare_models.main([shipped, str(untrained), "--procedural", "1", "--ct-derived", "0",
                                "--spect-gains", "0.25", "--ct-slices", "6", "--osem-spect", "--stored-as", "RAS",
                                "--working-spacing", "4", "--report", str(report)]) == 0
    text = report.read_text()
    assert "With the SPECT's normalisation moved" in text and "With thick CT slices" in text
    assert "With the SPECT reconstructed by OS-EM" in text
    assert "| 6 mm | `" + shipped + "` |" in text and "| OS-EM | `" + shipped + "` |" in text
    for setting in ("OS-EM SPECT", "stored RAS", "working grid 4 mm"):  # the same model, paired across settings
        assert f"`{shipped}, {setting}` minus `{shipped}`" in text
    results = json.loads((tmp_path / "results" / "compare_models.json").read_text())
    plain = results["scores"][shipped][0]
    for moved in (results["spect_gains"]["0.25"]["scores"][shipped][0],
                  results["ct_slices_mm"]["6"]["scores"][shipped][0],
                  results["scores"][f"{shipped}, OS-EM SPECT"][0],
                  results["scores"][f"{shipped}, working grid 4 mm"][0]):
        assert plain["seed"] == moved["seed"]
        assert (plain["bone"], plain["lesion"]) != (moved["bone"], moved["lesion"])  # the model sees other images
    assert results["scores"][f"{shipped}, stored RAS"][0]["seed"] == plain["seed"]
    for conflicting in (["--spect-gains", "0.5"], ["--ct-slices", "5"], ["--stored-as", "RAS"],
                        ["--working-spacing", "2.5"]):
        with pytest.raises(SystemExit):
            compare_models.main([shipped, "--cortex-ablation", *conflicting])
    with pytest.raises(SystemExit):
        compare_models.main([shipped, str(untrained), "--ct-slices", "2"])  # not thicker than the phantoms' own
    with pytest.raises(SystemExit):
        compare_models.main([shipped, "--stored-as", "RAX"])
    for bad in ("0", "inf"):  # refused before any phantom is scored, as segment() would refuse it
        with pytest.raises(SystemExit):
            compare_models.main([shipped, "--working-spacing", bad])


def ablation_scores(tmp_path, flag: str, suffix: str):
    """The shipped model's score on one procedural validation phantom as shipped and with the step that
    ``flag`` names left out (the reference), through ``compare_models``' report."""
    import json

    import compare_models
    from FCMSegmentationLib.modelfile import default_model_path

    model = str(default_model_path())
    report = tmp_path / "selection.md"
    assert compare_models.main([model, flag, "--procedural", "1", "--ct-derived", "0",
                                "--report", str(report), "--section", "ablation"]) == 0
    reference = f"{model}, {suffix}"
    assert f"`{model}` minus `{reference}`" in report.read_text()
    results = json.loads((tmp_path / "results" / "ablation.json").read_text())
    shipped, left_out = (results["scores"][name][0] for name in (model, reference))
    assert shipped["seed"] == left_out["seed"]
    return shipped, left_out


def test_compare_models_needs_two_models_or_one_ablation_or_setting(tmp_path):
    import compare_models
    from FCMSegmentationLib.modelfile import default_model_path

    model = str(default_model_path())
    for argv in ([model], [model, "--lesion-filter-ablation", "--cortex-ablation"]):
        with pytest.raises(SystemExit):
            compare_models.main(argv)
    report = tmp_path / "one.md"  # one model in one setting: the setting against image-space noise, paired
    assert compare_models.main([model, "--osem-spect", "--procedural", "1", "--ct-derived", "0",
                                "--report", str(report)]) == 0
    assert f"`{model}, OS-EM SPECT` minus `{model}`" in report.read_text()


def test_compare_models_scores_an_option_beside_the_first_model_on_both_spects(tmp_path):
    import json

    import compare_models
    from FCMSegmentationLib.modelfile import default_model_path

    model = str(default_model_path())
    report = tmp_path / "selection.md"
    assert compare_models.main([model, "--faint-lesion-option", "--osem-spect", "--procedural", "1", "--ct-derived",
                                "0", "--report", str(report), "--section", "option"]) == 0
    variant = f"{model}, faint lesions dropped"
    text = report.read_text()
    assert f"`{variant}` minus `{model}`" in text  # the model as shipped stays the reference
    assert f"| OS-EM | `{variant}` |" in text
    scores = json.loads((tmp_path / "results" / "option.json").read_text())["scores"]
    assert {model, variant, f"{model}, OS-EM SPECT", f"{variant}, OS-EM SPECT"} <= set(scores)
    assert scores[variant][0]["bone"] >= scores[model][0]["bone"] - 0.01  # the option only removes lesion voxels


def test_compare_models_measures_the_lesion_filter_against_keeping_every_lesion(tmp_path):
    filtered, unfiltered = ablation_scores(tmp_path, "--lesion-filter-ablation", "lesions outside bone kept")
    assert filtered["bone"] >= unfiltered["bone"] - 0.01  # the filter only ever removes lesion voxels


def test_compare_models_measures_the_cortex_completion_against_the_grid_s_bone(tmp_path):
    completed, grid_only = ablation_scores(tmp_path, "--cortex-ablation", "no cortex completion")
    assert completed["bone"] != grid_only["bone"]
    assert completed["lesion"] == grid_only["lesion"]  # the completion turns background into bone only


def test_recorded_lesions_are_found_by_their_component_and_grouped_by_size_and_coldness(tiny_case, truth_array):
    from benchlib.lesions import lesion_group, lesions_found, sensitivity_by_group

    truth = tiny_case[2]
    centre = truth.TransformIndexToPhysicalPoint((24, 22, 16))  # the tiny case's lesion
    elsewhere = truth.TransformIndexToPhysicalPoint((24, 22, 2))  # bone, no lesion there
    lesions = [{"centre_mm": centre, "diameter_mm": 14.0, "cold": False},
               {"centre_mm": elsewhere, "diameter_mm": 5.0, "cold": False},
               {"centre_mm": centre, "diameter_mm": 9.0, "cold": True}]
    prediction = np.where(truth_array == 2, 1, truth_array).astype(np.uint8)
    prediction[16, 22, 24] = 2  # one voxel of the lesion
    labels = sitk.GetImageFromArray(prediction)
    labels.CopyInformation(truth)
    assert lesions_found(lesions, truth, labels) == [True, False, True]
    missed = sitk.GetImageFromArray(np.where(truth_array == 2, 1, truth_array).astype(np.uint8))
    missed.CopyInformation(truth)
    assert lesions_found(lesions, truth, missed) == [False, False, False]
    assert [lesion_group(lesion) for lesion in lesions] == ["hot, 14–20 mm", "hot, 4–8 mm", "cold"]
    assert sensitivity_by_group(lesions, [True, False, True]) == {
        "hot, 4–8 mm": {"lesions": 1, "found": 0}, "hot, 14–20 mm": {"lesions": 1, "found": 1},
        "cold": {"lesions": 1, "found": 1}}


def test_held_out_plan_takes_a_third_ct_derived_with_benchmark_seeds():
    from FCMSegmentationLib.training import BENCHMARK_SEED_BASE

    plan = held_out_plan(6, have_ct=True)
    procedural, ct_offset = (BENCHMARK_SEED_BASE + offset for offset in ACCURACY_SEED_OFFSETS)
    assert plan == [{"kind": "procedural", "seed": procedural + i} for i in range(4)] + \
        [{"kind": "ct", "seed": ct_offset + i} for i in range(2)]
    assert held_out_plan(6, have_ct=False) == [{"kind": "procedural", "seed": procedural + i} for i in range(6)]
    assert [entry["kind"] for entry in held_out_plan(1, have_ct=True)] == ["procedural"]
    shifted = held_out_plan(3, have_ct=True, seed_offsets=(200, 250))
    assert [entry["seed"] - BENCHMARK_SEED_BASE for entry in shifted] == [200, 201, 250]
    assert len({entry["seed"] for entry in plan + shifted}) == len(plan + shifted)



def test_benchmark_model_description_names_an_averaged_models_parents(tmp_path):
    from benchlib.common import load_benchmark_model
    from FCMSegmentationLib.modelfile import random_model, save_model

    model = random_model(seed=0)
    save_model(tmp_path / "plain.pt", model.network, model.card)
    save_model(tmp_path / "mean.pt", model.network, dict(model.card, averaged_from=["a" * 64, "b" * 64]))
    assert "mean of" not in load_benchmark_model(str(tmp_path / "plain.pt"))[1]
    described = load_benchmark_model(str(tmp_path / "mean.pt"))[1]
    assert f"the mean of 2 models' weights ({'a' * 12}, {'b' * 12})" in described


def test_accuracy_benchmark_with_osem_reconstructs_every_case_and_writes_its_own_section(tmp_path):
    import json

    import bench_accuracy
    from FCMSegmentationLib.phantoms import TRAINING_RANGES

    assert bench_accuracy.case_ranges("ct", quick=False, osem=False) is TRAINING_RANGES
    for kind in ("procedural", "ct"):
        assert bench_accuracy.case_ranges(kind, quick=True, osem=True).osem_probability == 1.0
    assert bench_accuracy.case_ranges("procedural", quick=True, osem=False) == bench_accuracy.quick_ranges()
    assert bench_accuracy.main(["--quick", "--osem", "--random-weights", "--cases", "1", "--docs", str(tmp_path)]) == 0
    text = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- BEGIN bench_accuracy_osem -->" in text and "<!-- BEGIN bench_accuracy -->" not in text
    assert "SPECT reconstructed by OS-EM" in text and "overlay" not in text.lower()
    results = json.loads((tmp_path / "results" / "bench_accuracy_osem.json").read_text())
    assert results["osem"] is True and len(results["cases"]) == 1
    assert (tmp_path / "figures" / "accuracy_dice_osem.png").is_file()


def rod_with_lesion(contrast: float, noise_sd: float = 1.0, seed: int = 0) -> sitk.Image:
    """SPECT on the tiny case's truth grid: bone uptake 9 (+ Gaussian noise), its lesion at ``contrast`` x bone."""
    from conftest import make_tiny_case

    truth = make_tiny_case()[2]
    labels = sitk.GetArrayFromImage(truth)
    uptake = np.where(labels >= 1, 9.0, 1.0) * np.where(labels == 2, contrast, 1.0)
    uptake += np.random.default_rng(seed).normal(0.0, noise_sd, uptake.shape)
    image = sitk.GetImageFromArray(uptake.astype(np.float32))
    image.CopyInformation(truth)
    return image


def test_lesion_visibility_grows_with_contrast_and_is_negative_for_a_cold_lesion(tiny_case):
    from benchlib.lesions import lesion_visibility

    truth = tiny_case[2]
    lesion = {"centre_mm": truth.TransformIndexToPhysicalPoint((24, 22, 16))}
    outside = {"centre_mm": truth.TransformIndexToPhysicalPoint((24, 22, 2))}  # bone, but in no lesion
    (hot,), (faint,), (equal,), (cold,) = (lesion_visibility([lesion], truth, rod_with_lesion(c))
                                           for c in (3.0, 1.2, 1.0, 0.3))
    assert hot > faint > 1.0  # 1.8 noise sd above the bone, averaged over the lesion
    assert abs(equal) < 0.5 and cold < -1.0
    noisier = lesion_visibility([lesion], truth, rod_with_lesion(1.2, noise_sd=4.0))[0]
    assert noisier < faint  # the same lesion, harder to see in more noise
    assert np.isnan(lesion_visibility([outside], truth, rod_with_lesion(3.0))[0])


def test_spect_where_the_truth_is_undoes_the_recorded_misregistration(tiny_case, truth_array):
    from benchlib.misregistration_bound import spect_where_the_truth_is

    truth = tiny_case[2]
    shift = misregistration((2 * truth.GetSpacing()[0], 0.0, 0.0))
    as_spect_shows_it = sitk.Cast(truth_where_spect_shows_it(truth, shift), sitk.sitkFloat32)
    back = sitk.GetArrayFromImage(spect_where_the_truth_is(as_spect_shows_it, truth, shift))
    np.testing.assert_array_equal(back[..., 2:-2], truth_array[..., 2:-2].astype(np.float32))
    assert not np.array_equal(sitk.GetArrayFromImage(as_spect_shows_it)[..., 2:-2], back[..., 2:-2])


def test_visibility_ceilings_keep_exactly_the_lesions_shown():
    import lesion_visibility as script

    components = np.zeros((1, 1, 40), np.int32)
    components[0, 0, :10], components[0, 0, 10:40] = 1, 2
    truth_lesion = components > 0
    assert script.ceiling_dice(components, [1, 2], [True, False], truth_lesion) == pytest.approx(2 * 10 / 50)
    assert script.ceiling_dice(components, [1, 2, 0], [True, True, True], truth_lesion) == 1.0
    assert np.isnan(script.ceiling_dice(components, [], [], np.zeros_like(truth_lesion)))
    hot, lytic, cold = ({"cold": False, "ct_change": "none"}, {"cold": False, "ct_change": "lytic"},
                        {"cold": True, "ct_change": "none"})
    assert script.shows(hot, 0.4) == {"spect": False, "spect_or_ct": False}
    assert script.shows(lytic, 0.4) == {"spect": False, "spect_or_ct": True}
    assert script.shows(hot, float("nan"))["spect"]  # unmeasurable: counted as shown, so the ceiling stays one
    assert script.shows(cold, -1.5)["spect"] and not script.shows(cold, 1.5)["spect"]
    assert [script.appearance(lesion) for lesion in (hot, lytic, cold)] == list(script.KINDS)


def test_lesion_visibility_report_counts_every_recorded_lesion_once(tmp_path):
    import json

    import lesion_visibility as script

    report = tmp_path / "benchmarks.md"
    assert script.main(["--procedural", "1", "--ct-derived", "0", "--report", str(report)]) == 0
    text = report.read_text()
    assert "<!-- BEGIN lesion_visibility -->" in text
    case = json.loads((tmp_path / "results" / "lesion_visibility.json").read_text())["cases"][0]
    assert case["lesions"] and all({"appearance", "visibility", "found"} <= set(lesion) for lesion in case["lesions"])
    total_row = next(line for line in text.splitlines() if line.startswith("| all |"))
    assert total_row.rstrip(" |").endswith(f"{sum(lesion['found'] for lesion in case['lesions'])} / "
                                           f"{len(case['lesions'])}")
    assert case["ceiling_spect"] <= case["ceiling_spect_or_ct"] <= 1.0


def test_speed_case_is_a_cube_of_3mm_voxels_the_spect_covers_with_bone_in_its_truth():
    from benchlib.speed_case import speed_case

    spect, ct, truth = speed_case(10_000_300, 32, 3.0)
    for image in (spect, ct, truth):
        assert image.GetSize() == (32, 32, 32) and image.GetSpacing() == (3.0, 3.0, 3.0)
    assert (sitk.GetArrayFromImage(spect) > 0).mean() > 0.5
    assert (sitk.GetArrayFromImage(truth) == 1).any()


def test_inference_benchmark_prints_one_row_with_every_timing():
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_inference.py"
    run = subprocess.run([sys.executable, str(script), "--size", "32", "--repeats", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    header, _, row = run.stdout.strip().splitlines()[-3:]
    assert "Refine round" in header
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[0] == "CPU, 1 threads" and cells[1] == "1,402,435"
    assert all(float(cell.removesuffix(" s")) > 0 for cell in cells[2:]) and len(cells) == 6


def test_faint_lesion_rule_measures_each_predicted_lesion_and_scores_rules_from_them():
    import faint_lesion_rule as script

    labels = np.zeros((1, 1, 12), np.uint8)
    labels[0, 0, 1:3] = 2  # a false lesion of 2 voxels
    labels[0, 0, 6:10] = 2  # a lesion of 4 voxels, 3 of them on the true lesion
    membership = np.zeros(labels.shape, np.float32)
    membership[0, 0, 1:3], membership[0, 0, 6:10] = (0.5, 0.6), (0.7, 0.9, 0.8, 0.6)
    truth = np.zeros(labels.shape, np.uint8)
    truth[0, 0, 7:11] = 2
    false, true = script.measure_components(labels, membership, truth, voxel_ml=0.1)
    assert false == {"voxels": 2, "volume_ml": pytest.approx(0.2), "peak": pytest.approx(0.6), "overlap": 0,
                     "true": False}
    assert true == {"voxels": 4, "volume_ml": pytest.approx(0.4), "peak": pytest.approx(0.9), "overlap": 3,
                    "true": True}
    case = {"true_voxels": 4, "predicted": [false, true]}
    assert script.rule_dice(case, None) == pytest.approx(2 * 3 / (6 + 4))
    assert script.rule_dice(case, (0.5, 0.7)) == pytest.approx(2 * 3 / (4 + 4))  # the false one goes
    assert script.rule_dice(case, (0.5, 1.0)) == 0.0  # both go
    free = {"true_voxels": 0, "predicted": [false]}
    assert script.rule_dice(free, None) == 0.0 and np.isnan(script.rule_dice(free, (0.5, 0.7)))
    row = script.rule_row([case, free], (0.5, 0.7))
    assert row == {"lesion_dice": pytest.approx(0.75), "false_per_case": 0.0, "true_kept": 1, "lesion_free": 1,
                   "lesion_free_clear": 1}
    assert None in script.rules() and (math.inf, math.inf) not in script.rules()


def test_faint_lesion_rule_report_marks_the_rule_the_option_applies(tmp_path):
    import json

    import faint_lesion_rule as script

    report = tmp_path / "model_selection.md"
    assert script.main(["--procedural", "1", "--ct-derived", "0", "--report", str(report)]) == 0
    text = report.read_text()
    assert "<!-- BEGIN faint_lesion_rule -->" in text
    assert "| under 0.5 ml and peak below 0.7 **(`--drop-faint-lesions`)** |" in text
    cases = json.loads((tmp_path / "results" / "faint_lesion_rule.json").read_text())["cases"]
    assert [case["spect"] for case in cases] == list(script.SPECTS)
    none_row = next(line for line in text.splitlines() if line.startswith("| none"))
    dice = [script.rule_dice(case, None) for case in cases]
    assert none_row.split(" | ")[1] == f"{dice[0]:.3f}" and none_row.split(" | ")[5] == f"{dice[1]:.3f}"


def test_real_ct_for_reads_the_shared_ct_only_when_asked_and_says_how_to_go_without(monkeypatch, tmp_path):
    import argparse

    from benchlib import common

    parser = argparse.ArgumentParser()
    assert common.real_ct_for(parser, 0) == (None, None)
    monkeypatch.setattr(common, "REAL_CT", tmp_path / "missing")
    with pytest.raises(SystemExit):
        common.real_ct_for(parser, 1)


def test_quick_runs_write_outside_the_published_docs_unless_told_where(tmp_path):
    parser = argparse.ArgumentParser()
    add_model_run_arguments(parser)
    assert docs_folder(parser.parse_args([])) == REPO / "docs"
    assert docs_folder(parser.parse_args(["--quick"])) == REPO / "out" / "bench-quick"
    assert docs_folder(parser.parse_args(["--quick", "--docs", str(tmp_path)])) == tmp_path
    args = parser.parse_args(["--model", "m.pt", "--random-weights", "--threads", "3"])
    assert (args.model, args.random_weights, args.threads) == ("m.pt", True, 3)
