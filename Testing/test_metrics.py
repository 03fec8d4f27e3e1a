"""Metrics: Dice (NaN when undefined), per-class Dice, and lesion-by-lesion detection counts."""
import math

import numpy as np
import pytest
import SimpleITK as sitk

from FCMSegmentationLib.metrics import (
    dice,
    dice_per_class,
    evaluate_lesions,
    lesion_components,
    lesion_detection,
    pool_lesion_detection,
)


def test_dice_counts_overlap_and_is_undefined_for_two_empty_masks():
    a = np.array([1, 1, 0, 0], bool)
    assert dice(a, np.array([1, 0, 1, 0], bool)) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert math.isnan(dice(np.zeros(4, bool), np.zeros(4, bool)))
    scores = dice_per_class(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]))
    assert scores == {"bone": pytest.approx(2 / 3), "lesion": pytest.approx(2 / 3)}


def _two_lesions() -> np.ndarray:
    truth = np.ones((12, 12, 12), np.uint8)  # bone everywhere
    truth[1:4, 1:4, 1:4] = 2
    truth[7:10, 7:10, 7:10] = 2
    return truth


def test_lesion_detection_counts_found_missed_and_false_lesions():
    truth = _two_lesions()
    pred = np.ones_like(truth)
    pred[0:5, 0:5, 0:5] = 2  # a halo over the first lesion: found, with false voxels around it
    pred[0, 11, 11] = 2  # a false lesion far from both
    counts = lesion_detection(pred, truth)
    assert counts == {"lesions": 2, "found": 1, "false_lesions": 1, "true_voxels": 54,
                      "predicted_voxels": 126, "overlap_voxels": 27}


def test_lesion_detection_joins_diagonal_neighbours_into_one_lesion():
    truth = np.zeros((3, 3, 3), np.uint8)
    truth[0, 0, 0] = truth[1, 1, 1] = 2
    assert lesion_detection(np.zeros_like(truth), truth)["lesions"] == 1
    components, count = lesion_components(truth)
    assert count == 1 and components[0, 0, 0] == components[1, 1, 1] == 1 and components.sum() == 2
    with pytest.raises(ValueError, match="shape"):
        lesion_detection(np.zeros((2, 2, 2)), truth)


def test_evaluate_lesions_scores_on_the_truths_grid():
    truth = sitk.GetImageFromArray(_two_lesions())
    truth.SetSpacing((2.0, 2.0, 2.0))
    pred = sitk.Resample(truth, [24] * 3, sitk.Transform(), sitk.sitkNearestNeighbor, truth.GetOrigin(),
                         (1.0, 1.0, 1.0), truth.GetDirection(), 0, truth.GetPixelID())  # finer grid, same labels
    counts = evaluate_lesions(pred, truth)
    assert counts["found"] == counts["lesions"] == 2 and counts["false_lesions"] == 0
    assert counts["overlap_voxels"] == counts["true_voxels"] == counts["predicted_voxels"]


def test_pooled_lesion_detection_adds_counts_over_cases_before_dividing():
    first = {"lesions": 2, "found": 1, "false_lesions": 1, "true_voxels": 54, "predicted_voxels": 126,
             "overlap_voxels": 27}
    empty = {"lesions": 0, "found": 0, "false_lesions": 2, "true_voxels": 0, "predicted_voxels": 10,
             "overlap_voxels": 0}
    pooled = pool_lesion_detection([first, empty])
    assert pooled["lesions"] == 2 and pooled["found"] == 1 and pooled["sensitivity"] == 0.5
    assert pooled["false_lesions_per_case"] == 1.5
    assert pooled["voxel_precision"] == pytest.approx(27 / 136) and pooled["voxel_recall"] == pytest.approx(0.5)
    nothing = pool_lesion_detection([empty])
    assert math.isnan(nothing["sensitivity"]) and math.isnan(nothing["voxel_recall"])
