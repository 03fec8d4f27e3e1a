"""Lesion core: each predicted lesion narrowed to the voxels near its peak lesion membership."""
import numpy as np
import pytest

from FCMSegmentationLib.lesion_core import trim_lesions
from FCMSegmentationLib.preprocessing import labels_from_memberships

UNIT = (1.0, 1.0, 1.0)


def _row(lesion, background=0.0):
    """(K=3, 1, 1, N) memberships along a line: the given lesion and background memberships, bone the rest."""
    lesion, background = np.asarray(lesion, dtype=np.float32), np.broadcast_to(np.float32(background), len(lesion))
    return np.stack([background, 1.0 - lesion - background, lesion]).reshape(3, 1, 1, -1)


def test_a_lesion_keeps_its_core_and_its_rim_goes_to_bone():
    memberships = _row([0.0, 0.55, 0.7, 1.0, 0.7, 0.55, 0.0])
    labels = labels_from_memberships(memberships)
    assert labels.ravel().tolist() == [1, 2, 2, 2, 2, 2, 1]
    assert trim_lesions(labels, memberships, UNIT, 0.6).ravel().tolist() == [1, 1, 2, 2, 2, 1, 1]
    assert trim_lesions(labels, memberships, UNIT, 0.8).ravel().tolist() == [1, 1, 1, 2, 1, 1, 1]
    assert labels.ravel().tolist() == [1, 2, 2, 2, 2, 2, 1]  # the input is not modified


def test_each_lesion_is_trimmed_against_its_own_peak_and_none_disappears():
    # a strong lesion (peak 1.0) and a faint one (peak 0.6), apart: a core of 0.7 keeps 0.6 in the faint one
    memberships = _row([0.65, 1.0, 0.65, 0.0, 0.0, 0.45, 0.6, 0.45], background=0.05)
    labels = labels_from_memberships(memberships)
    assert labels.ravel().tolist() == [2, 2, 2, 1, 1, 1, 2, 1]
    assert trim_lesions(labels, memberships, UNIT, 0.7).ravel().tolist() == [1, 2, 1, 1, 1, 1, 2, 1]


def test_the_rim_takes_the_better_of_background_and_bone_by_the_decision_weights():
    memberships = np.array([[0.3, 0.1, 0.2],    # rows: background, bone, lesion; columns: voxels
                            [0.25, 0.0, 0.5],   # first voxel: background 0.3 beats bone 0.25
                            [0.45, 0.9, 0.3]], dtype=np.float32).reshape(3, 1, 1, 3)
    labels = np.array([2, 2, 2], dtype=np.uint8).reshape(1, 1, 3)
    assert trim_lesions(labels, memberships, UNIT, 0.6).ravel().tolist() == [0, 2, 1]
    # background weighted down: bone wins the first voxel too; equal weighted memberships go to background
    assert trim_lesions(labels, memberships, (0.5, 1.0, 1.0), 0.6).ravel().tolist() == [1, 2, 1]
    assert trim_lesions(labels, memberships, (1.0, 1.2, 1.0), 0.6).ravel().tolist() == [0, 2, 1]


def test_painted_voxels_keep_their_label_and_do_not_set_the_peak():
    # a lesion stroke (membership 1, as results give painted voxels) beside the network's lesion (peak 0.7)
    memberships = _row([1.0, 1.0, 0.7, 0.5, 0.3, 0.0])
    labels = np.array([2, 2, 2, 2, 2, 1], dtype=np.uint8).reshape(1, 1, -1)
    painted = np.array([True, True, False, False, False, False]).reshape(1, 1, -1)
    # unpainted peak 0.7: a core of 0.6 keeps 0.7 and 0.5 (>= 0.42), not 0.3
    assert trim_lesions(labels, memberships, UNIT, 0.6, painted).ravel().tolist() == [2, 2, 2, 2, 1, 1]
    # were the stroke's 1.0 the peak, 0.5 would go too
    assert trim_lesions(labels, memberships, UNIT, 0.6).ravel().tolist() == [2, 2, 2, 1, 1, 1]
    # a painted voxel below its lesion's core keeps its label (here the unpainted peak is 1.0)
    dim = np.array([False, False, False, False, True, False]).reshape(1, 1, -1)
    assert trim_lesions(labels, memberships, UNIT, 0.6, dim).ravel().tolist() == [2, 2, 2, 1, 2, 1]


def test_a_zero_core_or_no_lesion_leaves_the_labels_as_they_are():
    rng = np.random.default_rng(0)
    memberships = rng.dirichlet((1, 1, 1), size=(5, 6, 7)).transpose(3, 0, 1, 2).astype(np.float32)
    labels = labels_from_memberships(memberships)
    assert (labels == 2).any()
    np.testing.assert_array_equal(trim_lesions(labels, memberships, UNIT, 0.0), labels)
    no_lesion = np.minimum(labels, 1).astype(np.uint8)
    np.testing.assert_array_equal(trim_lesions(no_lesion, memberships, UNIT, 0.6), no_lesion)


def test_lesions_touching_diagonally_are_one_lesion():
    memberships = np.zeros((3, 1, 2, 2), dtype=np.float32)
    memberships[2] = [[1.0, 0.0], [0.0, 0.65]]
    memberships[1] = 1.0 - memberships[2]
    labels = np.array([[[2, 1], [1, 2]]], dtype=np.uint8)
    # 26-connected: the weaker voxel is measured against the other's peak and trimmed
    assert trim_lesions(labels, memberships, UNIT, 0.7).ravel().tolist() == [2, 1, 1, 1]


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_a_fraction_outside_zero_to_one_is_refused(fraction):
    memberships = _row([0.0, 1.0])
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        trim_lesions(labels_from_memberships(memberships), memberships, UNIT, fraction)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        trim_lesions(np.zeros((1, 1, 3), np.uint8), _row([0.0, 1.0]), UNIT, 0.6)


def test_segment_trims_lesions_by_the_cards_lesion_core(tiny_case):
    import SimpleITK as sitk

    from FCMSegmentationLib.cortex import complete_cortex
    from FCMSegmentationLib.modelfile import LoadedModel, random_model
    from FCMSegmentationLib.preprocessing import dense_bone_mask
    from FCMSegmentationLib.segmentation import segment

    spect, ct, _ = tiny_case
    untrained = random_model("cpu", seed=0, norm="instance")
    weights = [1.0, 1.0, 2.5]  # lesion weighted up: an untrained network then calls lesions to trim
    labelled = {}
    for core in (0.0, 0.9):
        card = dict(untrained.card, decision={"spect_ct": weights, "lesion_core": {"spect_ct": core}})
        result = segment(spect, ct, LoadedModel(untrained.network, card), keep_lesions_outside_bone=True)
        labelled[core] = sitk.GetArrayFromImage(result.labels)
    memberships = np.moveaxis(sitk.GetArrayFromImage(result.memberships), -1, 0)
    trimmed = trim_lesions(labels_from_memberships(memberships, weights), memberships, weights, 0.9)
    np.testing.assert_array_equal(labelled[0.9], complete_cortex(trimmed, memberships, dense_bone_mask(ct)))
    assert 0 < (labelled[0.9] == 2).sum() < (labelled[0.0] == 2).sum()


def test_a_users_lesion_core_replaces_the_calibrated_one_for_both_inputs():
    from FCMSegmentationLib.errors import InputError
    from FCMSegmentationLib.modelfile import LoadedModel, random_model

    untrained = random_model("cpu")
    calibrated = LoadedModel(untrained.network, dict(
        untrained.card, decision={"spect_ct": [1.5, 1.0, 0.7], "lesion_core": {"spect_ct": 0.6, "spect_only": 0.6}}))
    chosen = calibrated.with_lesion_core(0.4)
    assert (chosen.lesion_core(True), chosen.lesion_core(False)) == (0.4, 0.4)
    assert chosen.decision_weights(True) == (1.5, 1.0, 0.7)  # the weights stay calibrated
    assert calibrated.lesion_core(True) == 0.6  # the loaded model is not changed
    assert untrained.with_lesion_core(0.0).lesion_core(False) == 0.0  # an uncalibrated model takes one too
    for nonsense in (1.0, -0.1):
        with pytest.raises(InputError, match="lesion core"):
            calibrated.with_lesion_core(nonsense)


def test_cli_lesion_core_narrows_lesions_and_reaches_refinement_sessions(tiny_case, tmp_path):
    import SimpleITK as sitk
    from robust_helpers import run_cli

    from FCMSegmentationLib.cli import _load_for_session, build_parser
    from FCMSegmentationLib.modelfile import random_model, save_model

    spect, ct, _ = tiny_case
    paths = {name: tmp_path / f"{name}.nrrd" for name in ("spect", "ct")}
    sitk.WriteImage(spect, str(paths["spect"]))
    sitk.WriteImage(ct, str(paths["ct"]))
    untrained = random_model("cpu", seed=0, norm="instance")
    model_path = tmp_path / "model.pt"  # lesion weighted up: the untrained network then calls lesions to trim
    save_model(model_path, untrained.network, dict(untrained.card, decision={"spect_ct": [1.0, 1.0, 2.5]}))
    lesion_voxels = {}
    for core in ("0", "0.9"):
        out = tmp_path / f"labels_{core}.nrrd"
        code, _, err = run_cli(["segment", "--spect", str(paths["spect"]), "--ct", str(paths["ct"]), "--output",
                                str(out), "--model", str(model_path), "--device", "cpu", "--keep-lesions-outside-bone",
                                "--lesion-core", core])
        assert code == 0, err
        lesion_voxels[core] = int((sitk.GetArrayFromImage(sitk.ReadImage(str(out))) == 2).sum())
    assert 0 < lesion_voxels["0.9"] < lesion_voxels["0"]

    refine = build_parser().parse_args(["refine", "--spect", str(paths["spect"]), "--output", str(tmp_path / "r.nrrd"),
                                        "--scribbles", str(paths["ct"]), "--model", str(model_path),
                                        "--lesion-core", "0.3"])
    assert _load_for_session(refine)[2].lesion_core(False) == 0.3

    missing = tmp_path / "no_such_spect.nrrd"  # the core is checked before any image is read
    code, _, err = run_cli(["segment", "--spect", str(missing), "--output", str(tmp_path / "x.nrrd"),
                            "--model", str(model_path), "--lesion-core", "1.5"])
    assert code == 2 and "lesion core" in err and not (tmp_path / "x.nrrd").exists()


def test_a_voxel_out_of_a_lesion_takes_the_better_of_background_and_bone_ties_to_background():
    from FCMSegmentationLib.lesion_core import background_or_bone

    memberships = np.array([[0.3, 0.2, 0.25], [0.2, 0.3, 0.25], [0.5, 0.5, 0.5]], np.float32).reshape(3, 1, 1, 3)
    assert background_or_bone(memberships, UNIT).ravel().tolist() == [0, 1, 0]
    assert background_or_bone(memberships, (0.5, 1.0, 1.0)).ravel().tolist() == [1, 1, 1]
    assert background_or_bone(memberships, UNIT).dtype == np.uint8
