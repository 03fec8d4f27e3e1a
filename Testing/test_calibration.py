"""Decision calibration: weighted argmax labels, the choice of weights, and calibrated model files."""
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FCMSegmentationLib.calibration import (
    CALIBRATION_SEED_BASE,
    calibrate,
    choose_decision,
    choose_working_spacing,
    decision_dice,
    decision_grid,
    write_calibrated_model,
)
from FCMSegmentationLib.cortex import complete_cortex
from FCMSegmentationLib.errors import InputError, ModelError
from FCMSegmentationLib.lesion_core import trim_lesions
from FCMSegmentationLib.metrics import evaluate_images
from FCMSegmentationLib.modelfile import LoadedModel, load_model, read_card, save_model
from FCMSegmentationLib.preprocessing import dense_bone_mask, labels_from_memberships
from FCMSegmentationLib.segmentation import segment


def _memberships(*voxels):
    """(K=3, 1, 1, N) memberships from N (background, bone, lesion) triples."""
    return np.asarray(voxels, dtype=np.float32).T.reshape(3, 1, 1, -1)


def test_unit_weights_give_the_plain_argmax():
    rng = np.random.default_rng(0)
    memberships = rng.dirichlet((1, 1, 1), size=(4, 5, 6)).transpose(3, 0, 1, 2).astype(np.float32)
    assert np.array_equal(labels_from_memberships(memberships, (1.0, 1.0, 1.0)), memberships.argmax(axis=0))


def test_weights_move_the_decision_between_classes():
    memberships = _memberships((0.45, 0.55, 0.0), (0.1, 0.35, 0.55), (0.2, 0.5, 0.3))
    assert labels_from_memberships(memberships).ravel().tolist() == [1, 2, 1]
    # background weighted up takes the uncertain edge voxel; lesion weighted down needs twice bone's share
    assert labels_from_memberships(memberships, (1.25, 1.0, 0.5)).ravel().tolist() == [0, 1, 1]


def test_a_wrong_number_of_weights_is_refused():
    with pytest.raises(ValueError, match="2 decision weights for 3 classes"):
        labels_from_memberships(_memberships((0.2, 0.5, 0.3)), (1.0, 1.0))


def test_the_grid_starts_with_the_plain_argmax_and_keeps_bone_at_one():
    grid = decision_grid()
    assert grid[0] == ((1.0, 1.0, 1.0), 0.0)  # the plain argmax, lesions untrimmed
    assert all(weights[1] == 1.0 for weights, _ in grid) and len(set(grid)) == len(grid)
    assert {core for _, core in grid} == {0.0, 0.5, 0.6, 0.7}


def test_choose_decision_maximises_bone_plus_lesion_and_skips_undefined_cases():
    grid = [((1.0, 1.0, 1.0), 0.0), ((1.5, 1.0, 1.0), 0.0), ((1.0, 1.0, 0.5), 0.6)]
    scores = np.array([
        [[0.80, 0.30], [0.85, 0.30], [0.80, 0.50]],
        [[0.90, np.nan], [0.95, np.nan], [0.90, np.nan]],  # no lesion in truth or prediction: skipped
    ])
    (weights, core), summary = choose_decision(scores, grid)
    assert (weights, core) == ((1.0, 1.0, 0.5), 0.6)
    assert (summary["weights"], summary["lesion_core"]) == ([1.0, 1.0, 0.5], 0.6)
    assert summary["lesion_dice"] == pytest.approx(0.50) and summary["bone_dice"] == pytest.approx(0.85)
    assert summary["reference_lesion_dice"] == pytest.approx(0.30) and summary["cases"] == 2


def test_choose_decision_keeps_the_first_on_ties_and_checks_the_shape():
    grid = [((1.0, 1.0, 1.0), 0.0), ((2.0, 1.0, 1.0), 0.6)]
    assert choose_decision(np.full((3, 2, 2), 0.5), grid)[0] == grid[0]
    with pytest.raises(InputError, match="must be"):
        choose_decision(np.zeros((3, 5, 2)), grid)


def test_choose_working_spacing_picks_the_grid_with_the_best_decision_and_keeps_the_first_on_ties():
    grid = [((1.0, 1.0, 1.0), 0.0), ((1.5, 1.0, 0.7), 0.6)]
    coarse = np.array([[[0.80, 0.30], [0.85, 0.40]]])  # best 1.25
    fine = np.array([[[0.70, 0.30], [0.90, 0.45]]])  # best 1.35, with the other decision
    mm, decision, summary = choose_working_spacing({3.0: coarse, 2.5: fine}, grid)
    assert (mm, decision) == (2.5, grid[1]) and summary["working_spacing_mm"] == 2.5
    assert summary["bone_dice"] == pytest.approx(0.90) and summary["lesion_dice"] == pytest.approx(0.45)
    assert summary["by_working_spacing"]["3"] == pytest.approx({"bone_dice": 0.85, "lesion_dice": 0.40})
    assert summary["by_working_spacing"]["2.5"] == pytest.approx({"bone_dice": 0.90, "lesion_dice": 0.45})
    assert choose_working_spacing({3.0: coarse, 2.5: coarse.copy()}, grid)[0] == 3.0


def test_decision_dice_scores_each_decision_on_the_truth_grid():
    truth_array = np.array([[[0, 1, 2, 2, 1]]], dtype=np.uint8)
    truth = sitk.GetImageFromArray(truth_array)
    truth.SetSpacing((2.0, 2.0, 2.0))
    stacked = _memberships((0.6, 0.4, 0.0), (0.4, 0.6, 0.0), (0.1, 0.3, 0.6), (0.1, 0.55, 0.35), (0.1, 0.6, 0.3))
    memberships = sitk.GetImageFromArray(np.moveaxis(stacked, 0, -1), isVector=True)
    memberships.CopyInformation(truth)
    grid = [((1.0, 1.0, 1.0), 0.0), ((1.0, 1.0, 2.0), 0.0), ((1.0, 1.0, 2.5), 0.0), ((1.0, 1.0, 2.5), 0.55)]
    scores = decision_dice(memberships, truth, grid)
    # plain argmax: bone {1, 3, 4} vs truth {1, 4}; lesion {2} vs truth {2, 3}. Lesion x2: bone {1, 4},
    # lesion {2, 3}. Lesion x2.5 also takes voxel 4 (0.75 > 0.6), which a core of 0.55 x 0.6 = 0.33 trims
    assert scores[0].tolist() == pytest.approx([0.8, 2 / 3])
    assert scores[1].tolist() == pytest.approx([1.0, 1.0])
    assert scores[2].tolist() == pytest.approx([2 / 3, 0.8])
    assert scores[3].tolist() == pytest.approx([1.0, 1.0])


@pytest.fixture(scope="module")
def calibrated_on_one_phantom():
    from FCMSegmentationLib.modelfile import random_model

    model = random_model("cpu", seed=0, norm="instance")
    grid = [((1.0, 1.0, 1.0), 0.0), ((1.5, 1.0, 1.0), 0.0), ((1.0, 1.0, 0.5), 0.0), ((0.7, 1.0, 1.0), 0.0),
            ((0.7, 1.0, 1.0), 0.7)]
    return model, grid, calibrate(model, procedural=1, grid=grid, inputs=("spect_ct",))


def test_calibration_records_its_plan_and_picks_a_grid_point(calibrated_on_one_phantom):
    _, grid, decision = calibrated_on_one_phantom
    record = decision["calibration"]
    assert (record["procedural"], record["ct_derived"], record["seed_base"]) == (1, 0, CALIBRATION_SEED_BASE)
    assert (tuple(decision["spect_ct"]), decision["lesion_core"]["spect_ct"]) in grid
    assert "spect_only" not in decision and "spect_only" not in decision["lesion_core"]
    chosen = record["spect_ct"]
    reference = chosen["reference_bone_dice"] + chosen["reference_lesion_dice"]
    assert chosen["bone_dice"] + chosen["lesion_dice"] >= reference


def test_segment_with_the_calibrated_card_delivers_the_calibrated_dice(calibrated_on_one_phantom):
    from FCMSegmentationLib.phantoms import generate_phantom

    model, _, decision = calibrated_on_one_phantom
    calibrated = LoadedModel(model.network, dict(model.card, decision=decision))
    assert calibrated.decision_weights(with_ct=True) == tuple(decision["spect_ct"])
    assert calibrated.decision_weights(with_ct=False) == (1.0, 1.0, 1.0)  # not calibrated: plain argmax
    assert calibrated.lesion_core(with_ct=True) == decision["lesion_core"]["spect_ct"]
    assert calibrated.lesion_core(with_ct=False) == 0.0
    phantom = generate_phantom(CALIBRATION_SEED_BASE, kind="procedural")
    result = segment(phantom.spect, phantom.ct, calibrated)
    dice = evaluate_images(result.labels, phantom.truth)
    record = decision["calibration"]["spect_ct"]
    assert dice["bone"] == pytest.approx(record["bone_dice"])
    # a lesion Dice undefined on every case counts 0 in the record (the objective needs a number)
    assert (0.0 if math.isnan(dice["lesion"]) else dice["lesion"]) == pytest.approx(record["lesion_dice"])
    plain = np.moveaxis(sitk.GetArrayFromImage(result.memberships), -1, 0)
    decided = trim_lesions(labels_from_memberships(plain, decision["spect_ct"]), plain, decision["spect_ct"],
                           decision["lesion_core"]["spect_ct"])
    completed = complete_cortex(decided, plain, dense_bone_mask(phantom.ct))
    assert np.array_equal(sitk.GetArrayFromImage(result.labels), completed)
    assert not np.array_equal(completed, decided)  # the cortex completion, which calibration scored, added bone


@pytest.fixture(scope="module")
def calibrated_on_two_grids():
    from FCMSegmentationLib.modelfile import random_model

    model = random_model("cpu", seed=0, norm="instance")
    grid = [((1.0, 1.0, 1.0), 0.0), ((1.5, 1.0, 1.0), 0.0), ((0.7, 1.0, 1.0), 0.7)]
    return model, calibrate(model, procedural=1, grid=grid, inputs=("spect_ct",), working_spacings=(3.0, 4.5, 3))


def test_calibration_chooses_the_working_grid_and_segment_runs_on_it(calibrated_on_two_grids):
    from FCMSegmentationLib.phantoms import generate_phantom

    model, decision = calibrated_on_two_grids
    record = decision["calibration"]
    assert record["working_spacings_mm"] == [3.0, 4.5]  # a repeated size is tried once
    tried = record["spect_ct"]["by_working_spacing"]
    assert set(tried) == {"3", "4.5"} and tried["3"] != tried["4.5"]
    best = max(tried, key=lambda mm: tried[mm]["bone_dice"] + tried[mm]["lesion_dice"])
    chosen = decision["working_spacing_mm"]["spect_ct"]
    assert chosen == float(best) == record["spect_ct"]["working_spacing_mm"]
    calibrated = LoadedModel(model.network, dict(model.card, decision=decision))
    assert calibrated.working_spacing_mm(with_ct=True) == chosen
    assert calibrated.working_spacing_mm(with_ct=False) == model.spacing_mm  # not calibrated: the training grid
    phantom = generate_phantom(CALIBRATION_SEED_BASE, kind="procedural")
    dice = evaluate_images(segment(phantom.spect, phantom.ct, calibrated).labels, phantom.truth)
    assert dice["bone"] == pytest.approx(record["spect_ct"]["bone_dice"])
    other = next(float(mm) for mm in tried if mm != best)
    on_other = evaluate_images(segment(phantom.spect, phantom.ct, calibrated, working_spacing_mm=other).labels,
                               phantom.truth)
    assert on_other["bone"] != pytest.approx(dice["bone"])


def test_calibration_refuses_a_working_grid_that_is_not_a_voxel_size(calibrated_on_one_phantom):
    model, grid, decision = calibrated_on_one_phantom
    assert decision["working_spacing_mm"] == {"spect_ct": model.spacing_mm}  # by default the training grid
    for bad in (0.0, -2.5, float("nan"), float("inf")):
        with pytest.raises(InputError, match="working grid"):
            calibrate(model, procedural=1, grid=grid, working_spacings=(3.0, bad))


def test_write_calibrated_model_keeps_the_weights_and_adds_the_decision(tmp_path, monkeypatch):
    import FCMSegmentationLib.calibration as calibration
    from FCMSegmentationLib.modelfile import random_model

    model = random_model("cpu", seed=0)
    source = tmp_path / "model.pt"
    card = save_model(source, model.network, model.card)
    decision = {"spect_ct": [1.25, 1.0, 0.5], "spect_only": [1.0, 1.0, 0.7], "lesion_core": {"spect_ct": 0.6},
                "calibration": {"procedural": 2}}
    monkeypatch.setattr(calibration, "calibrate", lambda *args, **kwargs: decision)
    out = tmp_path / "calibrated.pt"
    written = write_calibrated_model(str(source), str(out), procedural=2)
    assert written["weights_sha256"] == card["weights_sha256"] and read_card(out)["decision"] == decision
    loaded = load_model(out)
    assert loaded.decision_weights(with_ct=True) == (1.25, 1.0, 0.5)
    assert (loaded.lesion_core(with_ct=True), loaded.lesion_core(with_ct=False)) == (0.6, 0.0)
    for name, value in model.network.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[name], value)


def test_ct_derived_calibration_without_the_ct_is_refused_before_any_output(tmp_path):
    out = tmp_path / "calibrated.pt"
    with pytest.raises(InputError, match="--from-ct"):
        write_calibrated_model(None, str(out), procedural=1, ct_derived=2)
    with pytest.raises(InputError, match="go together"):
        write_calibrated_model(None, str(out), procedural=1, ct_path="ct.nii.gz")
    assert not out.exists()


@pytest.mark.parametrize("bad", [{"spect_ct": [1.0, 1.0]}, {"spect_ct": [1.0, 0.0, 1.0]},
                                 {"spect_ct": [1.0, float("inf"), 1.0]}, {"spect_ct": "1,1,1"},
                                 {"lesion_core": {"spect_ct": 1.0}}, {"lesion_core": {"spect_ct": -0.1}},
                                 {"lesion_core": {"spect_ct": float("nan")}}, {"lesion_core": [0.6]},
                                 {"working_spacing_mm": {"spect_ct": 0.0}},
                                 {"working_spacing_mm": {"spect_ct": float("nan")}},
                                 {"working_spacing_mm": {"spect_ct": "2.5"}}, {"working_spacing_mm": 2.5}])
def test_a_card_with_bad_decision_weights_is_refused_on_load(tmp_path, bad):
    from FCMSegmentationLib.modelfile import random_model

    model = random_model("cpu", seed=0)
    path = tmp_path / "bad.pt"
    save_model(path, model.network, dict(model.card, decision=bad))
    with pytest.raises(ModelError, match="decision weights|lesion core|working grid"):
        load_model(path)


def test_the_command_line_calibrates_and_reports(tmp_path, monkeypatch, capsys):
    import FCMSegmentationLib.calibration as calibration
    from FCMSegmentationLib.cli import main
    from FCMSegmentationLib.modelfile import random_model

    model = random_model("cpu", seed=0)
    source = tmp_path / "model.pt"
    save_model(source, model.network, model.card)
    summary = {"weights": [1.25, 1.0, 0.5], "lesion_core": 0.6, "working_spacing_mm": 2.5, "bone_dice": 0.9,
               "lesion_dice": 0.3, "reference_bone_dice": 0.88, "reference_lesion_dice": 0.25, "cases": 3}
    seen = {}

    def fake_calibrate(model, procedural, ct_derived, *args, working_spacings=(), **kwargs):
        seen.update(procedural=procedural, ct_derived=ct_derived, working_spacings=working_spacings)
        return {"spect_ct": [1.25, 1.0, 0.5], "spect_only": [1.25, 1.0, 0.5],
                "calibration": {"spect_ct": summary, "spect_only": summary}}

    monkeypatch.setattr(calibration, "calibrate", fake_calibrate)
    out = tmp_path / "calibrated.pt"
    assert main(["calibrate", "--model", str(source), "--out", str(out), "--phantoms", "3",
                 "--working-spacings", "3", "2.5"]) == 0
    assert seen == {"procedural": 3, "ct_derived": 0, "working_spacings": [3.0, 2.5]}
    printed = capsys.readouterr().out
    assert ("lesion core 0.6, working grid 2.5 mm: bone Dice 0.880 -> 0.900, lesion Dice 0.250 -> 0.300 on 3 "
            "phantoms") in printed
    assert load_model(out).decision_weights(with_ct=False) == (1.25, 1.0, 0.5)


def test_calibration_on_reconstructed_spect_scores_os_em_images_and_records_it(calibrated_on_one_phantom,
                                                                                monkeypatch):
    import FCMSegmentationLib.calibration as calibration

    model, grid, on_image_noise = calibrated_on_one_phantom
    reconstructions, make_phantoms = [], calibration.plan_phantoms

    def spying(plan, ct=None, bone_labels=None, ranges=None):
        for kind, seed, phantom in make_phantoms(plan, ct, bone_labels, ranges):
            reconstructions.append(phantom.params["spect_reconstruction"])
            yield kind, seed, phantom

    monkeypatch.setattr(calibration, "plan_phantoms", spying)
    decision = calibrate(model, procedural=1, grid=grid, inputs=("spect_ct",), osem_spect=1.0)
    assert len(reconstructions) == 1 and reconstructions[0] is not None  # the same seed, reconstructed by OS-EM
    assert decision["calibration"]["osem_spect"] == 1.0 and on_image_noise["calibration"]["osem_spect"] == 0.0
    with pytest.raises(InputError, match="probability"):
        calibrate(model, procedural=1, grid=grid, osem_spect=1.5)


def test_the_command_line_passes_the_os_em_share_to_calibration(tmp_path, monkeypatch):
    import FCMSegmentationLib.calibration as calibration
    from FCMSegmentationLib.cli import main

    summary = {"weights": [1.0, 1.0, 1.0], "lesion_core": 0.0, "working_spacing_mm": 3.0, "bone_dice": 0.9,
               "lesion_dice": 0.3, "reference_bone_dice": 0.9, "reference_lesion_dice": 0.3, "cases": 1}
    seen = {}

    def fake_calibrate(*args, osem_spect=0.0, **kwargs):
        seen["osem_spect"] = osem_spect
        return {"calibration": {"spect_ct": summary, "spect_only": summary}}

    monkeypatch.setattr(calibration, "calibrate", fake_calibrate)
    assert main(["calibrate", "--out", str(tmp_path / "c.pt"), "--phantoms", "1", "--osem-spect", "0.5"]) == 0
    assert seen == {"osem_spect": 0.5}
