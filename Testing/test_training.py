"""Training: data preparation, crops, the class-balanced loss, a short run, unsupervised ordering, and
a 2-process DistributedDataParallel run on the gloo backend through torchrun."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import REPO
from FCMSegmentationLib.losses import fcm_label_loss
from FCMSegmentationLib.modelfile import load_model
from FCMSegmentationLib.training import (
    IGNORE,
    TrainConfig,
    TrainingCase,
    balanced_label_loss,
    lesion_voxel,
    phantom_plan,
    prepare_training_case,
    random_crop,
    train,
)

TINY = dict(phantoms=2, validation_phantoms=0, steps=4, batch=1, crop=16, channels=(4, 8), checkpoint_every=2)


def test_prepared_case_has_labels_on_the_working_grid(tiny_case):
    spect, ct, truth = tiny_case
    case = prepare_training_case(spect, ct, truth)
    assert case.labels.shape == case.valid.shape == case.features.shape[1:]
    assert set(np.unique(case.labels)) <= {IGNORE, 0, 1, 2}
    assert (case.labels == 2).sum() == len(case.lesion_voxels) > 0
    assert np.all(case.labels[~case.valid] == IGNORE)


def test_prepared_case_keeps_the_axes_as_stored_so_a_reversed_phantom_is_seen_mirrored(tiny_case):
    # CT-derived phantoms reverse their x axis at random: in training that mirrors the anatomy (an
    # augmentation), where segmenting reorders the axes to LPS and sees the anatomy one way round.
    plain = prepare_training_case(*tiny_case)
    reversed_x = prepare_training_case(*(sitk.DICOMOrient(image, "RPS") for image in tiny_case))
    np.testing.assert_allclose(reversed_x.features, plain.features[..., ::-1], atol=1e-5)
    np.testing.assert_array_equal(reversed_x.labels, plain.labels[..., ::-1])


def test_prepared_case_numbers_its_lesions_by_26_connected_component(tiny_case):
    case = prepare_training_case(*tiny_case)
    assert len(case.lesion_ids) == len(case.lesion_voxels)
    assert set(np.unique(case.lesion_ids)) == set(range(case.lesion_ids.max() + 1))


def two_lesion_case() -> TrainingCase:
    """A 1-voxel lesion and a 125-voxel one, as the 3 mm grid sees a 4 mm and a 15 mm lesion."""
    labels = np.zeros((20, 20, 20), dtype=np.int64)
    labels[2, 2, 2] = 2
    labels[10:15, 10:15, 10:15] = 2
    voxels = np.argwhere(labels == 2)
    ids = (voxels[:, 0] >= 10).astype(np.int64)
    valid = np.ones_like(labels, dtype=bool)
    return TrainingCase(np.zeros((2,) + labels.shape, np.float32), valid, labels, voxels, ids, np.argwhere(valid))


def test_per_lesion_sampling_picks_small_lesions_as_often_as_large_ones():
    case = two_lesion_case()

    def small_share(per_lesion):
        rng = np.random.default_rng(0)
        return np.mean([tuple(lesion_voxel(case, rng, per_lesion)) == (2, 2, 2) for _ in range(2000)])

    assert small_share(False) < 0.02  # by voxel: 1 in 126
    assert 0.45 < small_share(True) < 0.55
    rng = np.random.default_rng(1)
    for _ in range(50):  # always a lesion voxel
        assert case.labels[tuple(lesion_voxel(case, rng, True))] == 2


def test_fcmseg_train_samples_by_lesion_only_when_asked():
    from FCMSegmentationLib.cli import build_parser, train_config_from_args

    parse = build_parser().parse_args
    assert not train_config_from_args(parse(["train", "--out", "m.pt"])).per_lesion_crops
    assert train_config_from_args(parse(["train", "--out", "m.pt", "--per-lesion-crops"])).per_lesion_crops


def test_random_crop_pads_and_can_drop_ct(tiny_case):
    case = prepare_training_case(*tiny_case)
    rng = np.random.default_rng(0)
    features, valid, labels = random_crop(case, 48, rng, lesion_fraction=1.0, ct_dropout=1.0)
    assert features.shape == (3, 48, 48, 48) and valid.shape == labels.shape == (48, 48, 48)
    assert np.all(features[1:] == 0)  # CT dropped
    assert np.all(labels[~valid] == IGNORE)
    assert (labels == 2).any()  # centred on a lesion


def test_random_crop_scales_the_spect_by_one_gain_per_crop_of_the_chosen_spread(tiny_case):
    case = prepare_training_case(*tiny_case)

    def gains(sd):
        out = []
        for seed in range(40):
            plain, _, _ = random_crop(case, 24, np.random.default_rng(seed), 1.0, ct_dropout=0.0, spect_gain_sd=0.0)
            scaled, _, labels = random_crop(case, 24, np.random.default_rng(seed), 1.0, ct_dropout=0.0,
                                            spect_gain_sd=sd)
            np.testing.assert_array_equal(scaled[1:], plain[1:])  # the CT channels are left alone
            counts = plain[0] > 0
            ratio = scaled[0][counts] / plain[0][counts]
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)  # one gain for the whole crop
            out.append(float(np.log(ratio[0])))
        return np.array(out)

    assert np.all(gains(0.0) == 0.0)
    narrow, wide = gains(0.1), gains(0.4)
    assert 0.05 < narrow.std() < 0.15 and 0.25 < wide.std() < 0.6
    assert np.allclose(wide, 4 * narrow, atol=1e-5)  # same draws, only the spread differs: runs stay reproducible


def test_label_loss_class_balance_interpolates_between_plain_and_per_class_means():
    u = torch.softmax(torch.randn(1, 3, 10, 10), dim=1)
    labels = torch.zeros(1, 10, 10, dtype=torch.long)
    labels[0, 0, 0] = 2  # one lesion voxel among 99 background ones
    means = [fcm_label_loss(u, torch.where(labels == k, labels, torch.full_like(labels, -1))) for k in (0, 2)]
    assert torch.allclose(balanced_label_loss(u, labels, 2.0, balance=1.0), (means[0] + means[1]) / 2)
    assert torch.allclose(balanced_label_loss(u, labels, 2.0, balance=0.0), fcm_label_loss(u, labels))
    half = balanced_label_loss(u, labels, 2.0, balance=0.5)
    assert torch.allclose(half, (means[0] * 99 ** 0.5 + means[1]) / (99 ** 0.5 + 1))


def test_phantom_plan_seeds_are_disjoint_from_validation_and_benchmark():
    from FCMSegmentationLib.training import BENCHMARK_SEED_BASE
    from FCMSegmentationLib.validation import VALIDATION_SEED_BASE

    plan = phantom_plan(TrainConfig(out="x.pt", phantoms=48, ct_phantoms=8, ct_path="a", bone_labels_path="b"))
    seeds = [seed for _, seed in plan]
    assert len(set(seeds)) == 56 and max(seeds) < VALIDATION_SEED_BASE < BENCHMARK_SEED_BASE


def test_short_training_run_writes_a_loadable_model_with_card(tmp_path):
    out = tmp_path / "model.pt"
    card = train(TrainConfig(out=str(out), **TINY), log=lambda line: None)
    loaded = load_model(out)
    assert loaded.card["weights_sha256"] == card["weights_sha256"]
    training = loaded.card["training"]
    assert training["steps"] == 4 and training["world_size"] == 1
    assert np.isfinite(training["final_loss"])
    assert loaded.card["torch_version"] == torch.__version__
    assert loaded.card["architecture"]["channels"] == [4, 8]


def test_training_can_continue_from_a_model_file(tmp_path):
    from FCMSegmentationLib.errors import InputError
    from FCMSegmentationLib.modelfile import save_model

    train(TrainConfig(out=str(tmp_path / "first.pt"), **TINY), log=lambda line: None)
    start = load_model(tmp_path / "first.pt")
    with torch.no_grad():  # move the weights far from where this seed's random initialisation puts them
        for parameter in start.network.parameters():
            parameter.add_(0.5)
    card = save_model(tmp_path / "start.pt", start.network, start.card)
    continued = train(TrainConfig(out=str(tmp_path / "next.pt"), init=str(tmp_path / "start.pt"),
                                  **dict(TINY, steps=1, spacing_mm=2.0)), log=lambda line: None)
    assert continued["training"]["init_weights_sha256"] == card["weights_sha256"]
    assert load_model(tmp_path / "next.pt").spacing_mm == 2.0  # continued on a finer working grid
    before = dict(start.network.named_parameters())
    after = dict(load_model(tmp_path / "next.pt").network.named_parameters())
    moved = max(float((after[k] - before[k]).detach().abs().max()) for k in before)
    assert moved < 0.1  # one step from the loaded weights
    other_architecture = dict(TINY, channels=(4, 8, 16))
    with pytest.raises(InputError, match="architecture"):
        train(TrainConfig(out=str(tmp_path / "bad.pt"), init=str(tmp_path / "start.pt"), **other_architecture),
              log=lambda line: None)


def test_unsupervised_run_orders_clusters_by_spect(tmp_path):
    out = tmp_path / "unsup.pt"
    card = train(TrainConfig(out=str(out), unsupervised=True, **TINY), log=lambda line: None)
    assert sorted(card["training"]["cluster_order"]) == [0, 1, 2]
    assert "RFCM only" in card["training"]["loss"]


def test_invalid_configuration_is_refused():
    from FCMSegmentationLib.errors import InputError

    with pytest.raises(InputError):
        TrainConfig(out="m.pt", steps=0)
    with pytest.raises(InputError, match="from-ct"):
        TrainConfig(out="m.pt", ct_phantoms=2)


def test_two_process_ddp_on_gloo(tmp_path):
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "FCMSegmentation"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "FCMSegmentationLib.cli", "train", "--out", str(out), "--phantoms", "2", "--steps", "3",
               "--batch", "1", "--crop", "16", "--channels", "4", "8", "--validation", "0", "--device", "cpu"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    card = load_model(out).card
    assert card["training"]["world_size"] == 2
    assert card["training"]["steps"] == 3


def test_build_cases_mixes_procedural_and_ct_derived_phantoms(shared_data, tmp_path):
    from FCMSegmentationLib.training import build_cases, read_real_ct

    config = TrainConfig(out=str(tmp_path / "m.pt"), phantoms=1, ct_phantoms=1,
                         ct_path=str(shared_data / "realct_dicom" / "ct_dicom"),
                         bone_labels_path=str(shared_data / "realct_dicom" / "totalsegmentator_labels.nii.gz"))
    assert read_real_ct(TrainConfig(out="m.pt")) == (None, None)
    cases = build_cases(phantom_plan(config), config, read_real_ct(config))
    assert len(cases) == 2
    assert all((case.labels == 1).any() for case in cases)  # bone in both, procedural and real anatomy


def test_build_cases_in_worker_processes_makes_the_same_phantoms_in_the_same_order(shared_data, tmp_path):
    from FCMSegmentationLib.training import build_cases, read_real_ct

    real = dict(ct_path=str(shared_data / "realct_dicom" / "ct_dicom"),
                bone_labels_path=str(shared_data / "realct_dicom" / "totalsegmentator_labels.nii.gz"))
    alone, pooled = (TrainConfig(out=str(tmp_path / "m.pt"), phantoms=2, ct_phantoms=1, workers=workers, **real)
                     for workers in (1, 2))
    messages = []
    expected = build_cases(phantom_plan(alone), alone, read_real_ct(alone))
    made = build_cases(phantom_plan(pooled), pooled, read_real_ct(pooled),
                       progress=lambda fraction, message: messages.append(message))
    assert len(made) == len(expected) == 3
    for mine, theirs in zip(made, expected):
        np.testing.assert_allclose(mine.features, theirs.features, atol=1e-5)
        np.testing.assert_array_equal(mine.labels, theirs.labels)
    assert made[0].labels.shape != made[1].labels.shape or not np.array_equal(made[0].labels, made[1].labels)
    assert messages[-1].startswith("phantom 3/3 (ct, seed")


def test_train_config_refuses_fewer_than_one_worker():
    from FCMSegmentationLib.errors import InputError

    with pytest.raises(InputError, match="workers"):
        TrainConfig(out="m.pt", workers=0)


def test_prefetched_yields_every_item_in_order_and_raises_what_the_maker_raised():
    from FCMSegmentationLib.training import prefetched

    counter = iter(range(100))
    assert list(prefetched(lambda: next(counter), 7, depth=2)) == list(range(7))
    assert next(counter) == 7  # made no more than asked for

    def failing() -> int:
        raise ValueError("no crop")

    with pytest.raises(ValueError, match="no crop"):
        list(prefetched(failing, 3))


def readme_pipeline(text: str):
    """The ``fcmseg`` commands of the README's default-model section, in order, as (command, arguments)."""
    import shlex

    section = text[text.index("## The default model"):]
    block = section[section.index("```bash"):section.index("```", section.index("```bash") + 3)]
    joined = block.replace("\\\n", " ")
    return [(words[1], words[1:]) for words in (shlex.split(line) for line in joined.splitlines()
                                               if line.strip().startswith("fcmseg "))]


def readme_commands(text: str, command: str = "train"):
    """The ``fcmseg <command>`` commands of the README's default-model section, as argument lists."""
    return [arguments for name, arguments in readme_pipeline(text) if name == command]


def test_readme_commands_are_the_ones_recorded_in_the_shipped_models_card():
    from dataclasses import asdict

    from FCMSegmentationLib.cli import build_parser, train_config_from_args
    from FCMSegmentationLib.modelfile import default_model_path, read_card

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    stages = [train_config_from_args(build_parser().parse_args(c)) for c in readme_commands(readme)]
    assert len(stages) >= 2, "the README should give every training stage of the default model"
    training = read_card(default_model_path())["training"]
    recorded = dict(training["config"])
    from_readme = json.loads(json.dumps(asdict(stages[-1])))  # tuples -> lists, as in the card
    # where files were written or read does not change the weights (a GPU stage read a copy of the real CT)
    paths = {"out", "init", "ct_path", "bone_labels_path"}
    newer = set(from_readme) - set(recorded)  # options added after the model was trained: at their defaults
    defaults = json.loads(json.dumps(asdict(TrainConfig(out="x.pt"))))
    assert {k: from_readme[k] for k in newer} == {k: defaults[k] for k in newer}
    assert {k: v for k, v in from_readme.items() if k not in paths | newer} == \
        {k: v for k, v in recorded.items() if k not in paths}
    assert stages[0].init is None, "the first stage starts from random weights"
    pipeline = [build_parser().parse_args(arguments) for _, arguments in readme_pipeline(readme)]
    for number, later in enumerate(pipeline[1:], start=1):
        if later.command == "train":  # siblings may continue from one model, to be averaged
            written = [earlier.out for earlier in pipeline[:number]]
            assert later.init in written, f"{later.out} must continue from a model written before it"
    assert f"`{training['init_weights_sha256'][:12]}" in readme, "README names another starting model"


def test_readme_calibration_command_is_the_one_recorded_in_the_shipped_models_card():
    from FCMSegmentationLib.cli import build_parser
    from FCMSegmentationLib.modelfile import DEFAULT_MODEL_NAME, default_model_path, read_card

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    card = read_card(default_model_path())
    pipeline = [build_parser().parse_args(arguments) for _, arguments in readme_pipeline(readme)]
    calibrations = [step for step in pipeline if step.command == "calibrate"]
    if "decision" not in card:
        assert not calibrations, "the README calibrates the default model, but its card has no decision weights"
        return
    assert len(calibrations) == 1 and pipeline[-1] is calibrations[0], \
        "the README should end with the one calibration of the default model"
    calibration, calibrated = pipeline[-1], pipeline[-2]
    assert calibration.model == calibrated.out, "calibration must start from the step just before it"
    for number, average in enumerate(pipeline):
        if average.command == "average":  # of trained stages or of earlier averages
            assert set(average.models) <= {earlier.out for earlier in pipeline[:number]}, \
                "an average is of models written before it"
    if calibrated.command == "average":  # the shipped weights are the mean of trained stages
        assert len(card["averaged_from"]) == len(calibrated.models)
    else:
        assert "averaged_from" not in card, "the shipped model is an average, but the README does not say so"
    assert calibration.out.endswith(DEFAULT_MODEL_NAME)
    recorded = card["decision"]["calibration"]
    assert (calibration.phantoms, calibration.ct_phantoms) == (recorded["procedural"], recorded["ct_derived"])
    for used in ("spect_ct", "spect_only"):
        assert card["decision"][used] == recorded[used]["weights"]


@pytest.mark.parametrize("flag, field, default, value, nonsense, message", [
    ("--spacing", "spacing_mm", 3.0, 2.0, "0", "spacing"),  # the working grid
    ("--spect-gain-sd", "spect_gain_sd", 0.1, 0.35, "-0.1", "gain"),  # the SPECT gain augmentation's spread
    ("--thick-ct", "thick_ct", 0.0, 0.5, "1.5", "thick CT"),  # the share of phantoms with thick CT slices
    ("--osem-spect", "osem_spect", 0.0, 0.5, "-0.5", "OS-EM"),  # the share of phantoms with OS-EM SPECT
])
def test_train_flags_set_their_option_and_reject_nonsense(tmp_path, flag, field, default, value, nonsense, message):
    from FCMSegmentationLib.cli import build_parser, train_config_from_args
    from FCMSegmentationLib.errors import InputError

    base = ["train", "--out", str(tmp_path / "m.pt")]
    assert getattr(train_config_from_args(build_parser().parse_args(base)), field) == default
    assert getattr(train_config_from_args(build_parser().parse_args(base + [flag, str(value)])), field) == value
    with pytest.raises(InputError, match=message):
        train_config_from_args(build_parser().parse_args(base + [flag, nonsense]))


def test_validation_adds_ct_derived_phantoms_when_the_run_has_a_real_ct(shared_data, random_model):
    from FCMSegmentationLib.training import read_real_ct, validate
    from FCMSegmentationLib.validation import CT_DERIVED_SEED_OFFSET, VALIDATION_SEED_BASE

    config = TrainConfig(out="m.pt", ct_phantoms=1, ct_path=str(shared_data / "realct_dicom" / "ct_dicom"),
                         bone_labels_path=str(shared_data / "realct_dicom" / "totalsegmentator_labels.nii.gz"))
    summary = validate(random_model, 1, real_ct=read_real_ct(config))
    assert summary["seeds"] == [VALIDATION_SEED_BASE, VALIDATION_SEED_BASE + CT_DERIVED_SEED_OFFSET]
    assert set(summary["by_kind"]) == {"procedural", "ct"}
    assert {"spect_ct_bone_dice", "spect_only_lesion_dice"} <= set(summary["by_kind"]["ct"])


@pytest.mark.parametrize("field, name", [("spect_truncation", "spect truncation"), ("thick_ct", "thick CT"),
                                         ("osem_spect", "OS-EM SPECT")])
def test_training_probabilities_outside_zero_to_one_are_refused_by_name(field, name):
    from FCMSegmentationLib.errors import InputError

    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InputError, match=f"{name} is a probability in \\[0, 1\\], got {bad}"):
            TrainConfig(out="m.pt", **{field: bad})
    assert getattr(TrainConfig(out="m.pt", **{field: 1.0}), field) == 1.0
