"""Validation: seeds, per-case scoring of several models on shared phantoms, summaries, paired comparison."""
import dataclasses
import math

import numpy as np
import pytest

from FCMSegmentationLib.errors import InputError
from FCMSegmentationLib.validation import (
    CT_DERIVED_SEED_OFFSET,
    VALIDATION_SEED_BASE,
    CaseScore,
    compare,
    is_orientation_code,
    paired_difference,
    score_models,
    summarise,
    validation_plan,
)


def test_validation_plan_gives_procedural_then_ct_derived_seeds_of_their_own():
    from FCMSegmentationLib.training import BENCHMARK_SEED_BASE, TrainConfig, phantom_plan

    plan = validation_plan(3, 2)
    assert plan == [("procedural", VALIDATION_SEED_BASE), ("procedural", VALIDATION_SEED_BASE + 1),
                    ("procedural", VALIDATION_SEED_BASE + 2), ("ct", VALIDATION_SEED_BASE + CT_DERIVED_SEED_OFFSET),
                    ("ct", VALIDATION_SEED_BASE + CT_DERIVED_SEED_OFFSET + 1)]
    training = {seed for _, seed in phantom_plan(TrainConfig(out="m.pt", phantoms=64, ct_phantoms=16, seed=6000,
                                                             ct_path="ct", bone_labels_path="labels"))}
    assert not training & {seed for _, seed in plan}
    assert max(seed for _, seed in plan) < BENCHMARK_SEED_BASE
    with pytest.raises(InputError, match="negative"):
        validation_plan(-1)


def test_calibration_seeds_are_disjoint_from_validation_benchmark_and_training_seeds():
    from FCMSegmentationLib.calibration import CALIBRATION_SEED_BASE
    from FCMSegmentationLib.training import BENCHMARK_SEED_BASE

    largest = validation_plan(CT_DERIVED_SEED_OFFSET, CT_DERIVED_SEED_OFFSET)
    calibration = validation_plan(3, 2, seed_base=CALIBRATION_SEED_BASE)
    assert calibration[0] == ("procedural", CALIBRATION_SEED_BASE)
    assert calibration[-1] == ("ct", CALIBRATION_SEED_BASE + CT_DERIVED_SEED_OFFSET + 1)
    assert max(seed for _, seed in largest) < CALIBRATION_SEED_BASE < BENCHMARK_SEED_BASE
    with pytest.raises(InputError, match="overlap"):
        validation_plan(CT_DERIVED_SEED_OFFSET + 1)


def test_paired_difference_is_the_mean_case_by_case_change_with_an_interval_around_it():
    rng = np.random.default_rng(0)
    reference = rng.uniform(0.0, 1.0, 40)  # wide spread between cases, as lesion Dice has
    other = reference + 0.05 + rng.normal(0.0, 0.01, 40)
    difference = paired_difference(reference, other)
    assert difference["cases"] == 40
    assert difference["mean"] == pytest.approx(np.mean(other - reference))
    assert difference["low"] < difference["mean"] < difference["high"]
    assert 0.0 < difference["low"] and difference["high"] < 0.1  # pairing removes the case-to-case spread


def test_paired_difference_skips_cases_missing_on_either_side():
    difference = paired_difference([0.5, math.nan, 0.2, 0.4], [0.7, 0.9, math.nan, 0.4])
    assert difference["cases"] == 2 and difference["mean"] == pytest.approx(0.1)
    assert paired_difference([math.nan], [0.3]) == {"mean": None, "low": None, "high": None, "cases": 0}
    with pytest.raises(InputError, match="case by case"):
        paired_difference([0.1, 0.2], [0.1])


def _scores(lesion_shift: float = 0.0):
    return [CaseScore("procedural", 1, "spect_ct", 0.8, 0.2 + lesion_shift),
            CaseScore("procedural", 2, "spect_ct", 0.6, math.nan),
            CaseScore("ct", 3, "spect_ct", 0.5, 0.4 + lesion_shift),
            CaseScore("ct", 3, "spect_only", 0.3, 0.1 + lesion_shift)]


def test_summarise_gives_means_over_all_cases_and_per_kind_ignoring_absent_classes():
    summary = summarise(_scores())
    assert summary["spect_ct_bone_dice"] == pytest.approx((0.8 + 0.6 + 0.5) / 3)
    assert summary["spect_ct_lesion_dice"] == pytest.approx(0.3)  # the NaN case does not count
    assert summary["spect_only_bone_dice"] == pytest.approx(0.3)
    assert summary["by_kind"]["procedural"]["spect_ct_bone_dice"] == pytest.approx(0.7)
    assert summary["by_kind"]["procedural"]["spect_ct_lesion_dice"] == pytest.approx(0.2)
    assert "spect_only_bone_dice" not in summary["by_kind"]["procedural"]
    assert summary["by_kind"]["ct"]["spect_ct_lesion_dice"] == pytest.approx(0.4)
    assert summary["seeds"] == [1, 2, 3]


def test_compare_reports_each_model_against_the_reference_per_kind():
    table = compare({"old": _scores(), "new": _scores(lesion_shift=0.1)}, reference="old")
    assert set(table) == {"new"}
    lesion = table["new"]["spect_ct_lesion"]
    assert lesion["all"]["mean"] == pytest.approx(0.1) and lesion["all"]["cases"] == 2
    assert lesion["ct"]["mean"] == pytest.approx(0.1) and lesion["procedural"]["cases"] == 1
    assert table["new"]["spect_ct_bone"]["all"]["mean"] == pytest.approx(0.0)
    assert table["new"]["spect_only_lesion"]["all"]["mean"] == pytest.approx(0.1)
    shuffled = list(reversed(_scores()))
    with pytest.raises(InputError, match="other cases"):
        compare({"old": _scores(), "new": shuffled}, reference="old")


def test_score_models_scores_every_model_on_the_same_phantoms(random_model):
    from FCMSegmentationLib import phantoms
    from FCMSegmentationLib.modelfile import load_model

    small = dataclasses.replace(phantoms.TRAINING_RANGES, field_width_mm=(260.0, 280.0),
                                field_length_mm=(90.0, 110.0), ct_spacing_mm=(3.0, 3.0), ct_slice_mm=(3.0, 3.0))
    models = {"shipped": load_model(None), "untrained": random_model}
    scores = score_models(models, validation_plan(1), inputs=("spect_ct",), ranges=small)
    assert [(s.kind, s.seed, s.input) for s in scores["shipped"]] == [("procedural", VALIDATION_SEED_BASE, "spect_ct")]
    assert [(s.kind, s.seed) for s in scores["untrained"]] == [(s.kind, s.seed) for s in scores["shipped"]]
    assert scores["shipped"][0].bone > 0.5 > scores["untrained"][0].bone  # a trained model, scored as such


def test_score_models_refuses_ct_derived_cases_without_the_real_ct_and_unknown_inputs(random_model):
    with pytest.raises(InputError, match="real CT"):
        score_models({"m": random_model}, validation_plan(0, 1))
    with pytest.raises(InputError, match="inputs"):
        score_models({"m": random_model}, validation_plan(1), inputs=("ct_only",))
    with pytest.raises(InputError, match="orientation"):
        score_models({"m": random_model}, validation_plan(1), stored_as="RAR")


@pytest.mark.parametrize("code, valid", [("RAS", True), ("LPS", True), ("PIR", True), ("SLA", True), ("RAR", False),
                                         ("RA", False), ("LPSI", False), ("ras", False), ("XYZ", False)])
def test_is_orientation_code_takes_one_letter_per_patient_axis(code, valid):
    assert is_orientation_code(code) is valid
