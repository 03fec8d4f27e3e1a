"""Cortex completion: dense CT voxels within the network's reach of labelled bone become bone."""
import numpy as np
import pytest
import SimpleITK as sitk

from FCMSegmentationLib.cortex import REACH, complete_cortex
from FCMSegmentationLib.preprocessing import DENSE_BONE_HU, WorkingCase, box_around, dense_bone_mask

SHAPE = (6, 12, 12)
BONE_CORE = (slice(None), slice(4, 8), slice(4, 8))
SHELL = (slice(None), slice(3, 9), slice(3, 9))  # the core plus a one-voxel shell


def shelled_bone():
    """Labels with a bone core, memberships that leave its one-voxel shell background but within reach
    (bone-or-lesion 0.4), and dense CT on the core and the shell."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[BONE_CORE] = 1
    memberships = np.zeros((3,) + SHAPE, np.float32)
    memberships[0] = 1.0
    memberships[:, SHELL[0], SHELL[1], SHELL[2]] = np.array([0.6, 0.4, 0.0])[:, None, None, None]
    memberships[:, BONE_CORE[0], BONE_CORE[1], BONE_CORE[2]] = np.array([0.1, 0.9, 0.0])[:, None, None, None]
    dense = np.zeros(SHAPE, bool)
    dense[SHELL] = True
    return labels, memberships, dense


def shell_mask() -> np.ndarray:
    shell = np.zeros(SHAPE, bool)
    shell[SHELL] = True
    shell[BONE_CORE] = False
    return shell


def test_the_dense_shell_within_reach_becomes_bone_and_the_input_is_kept():
    labels, memberships, dense = shelled_bone()
    before = labels.copy()
    completed = complete_cortex(labels, memberships, dense)
    assert np.array_equal(labels, before)
    assert (completed[shell_mask()] == 1).all()
    assert (completed[~dense] == 0).all()  # nothing outside the dense CT


def test_soft_tissue_beyond_reach_or_not_dense_stays_background():
    labels, memberships, dense = shelled_bone()
    memberships[:, :, 3, 3:9] = np.array([1.0 - REACH / 2, REACH / 2, 0.0])[:, None, None]  # out of reach
    dense[:, 8, 3:9] = False  # the CT is soft tissue there
    completed = complete_cortex(labels, memberships, dense)
    assert (completed[:, 3, 3:9] == 0).all() and (completed[:, 8, 3:9] == 0).all()
    assert (completed[:, 4:8, 3] == 1).all() and (completed[:, 4:8, 8] == 1).all()


def test_growth_follows_dense_voxels_only_while_they_connect_to_bone_within_reach():
    labels, memberships, dense = shelled_bone()
    # a dense vessel running from the shell out along x: in reach for 2 voxels, then out of reach
    dense[:, 5, 9:12] = True
    memberships[:, :, 5, 9:11] = np.array([0.8, 0.2, 0.0])[:, None, None]
    # a dense island in reach but apart from bone
    dense[:, 0, 0] = True
    memberships[:, :, 0, 0] = np.array([0.5, 0.5, 0.0])[:, None]
    completed = complete_cortex(labels, memberships, dense)
    assert (completed[:, 5, 9:11] == 1).all()
    assert (completed[:, 5, 11] == 0).all()
    assert (completed[:, 0, 0] == 0).all()


def test_lesions_and_painted_background_keep_their_labels_and_block_the_growth():
    labels, memberships, dense = shelled_bone()
    labels[:, 5, 4] = 2  # a lesion at the bone's edge stays lesion
    dense[:, 5, 9:11] = True
    memberships[:, :, 5, 9:11] = np.array([0.5, 0.5, 0.0])[:, None, None]
    # painted background on the shell (membership 1, as results give painted voxels): the path to x = 9, 10
    # goes through it only
    memberships[:, :, 5, 8] = np.array([1.0, 0.0, 0.0])[:, None]
    completed = complete_cortex(labels, memberships, dense)
    assert (completed[:, 5, 4] == 2).all()
    assert (completed[:, 5, 8] == 0).all()
    assert (completed[:, 5, 9:11] == 0).all()
    assert (completed[:, 4, 8] == 1).all()


def test_without_candidates_the_labels_come_back_unchanged_and_shapes_are_checked():
    labels, memberships, _ = shelled_bone()
    assert np.array_equal(complete_cortex(labels, memberships, np.zeros(SHAPE, bool)), labels)
    with pytest.raises(ValueError, match="shapes differ"):
        complete_cortex(labels, memberships, np.zeros((1,) + SHAPE[1:], bool))


def test_box_around_pads_and_stays_inside_the_array():
    mask = np.zeros((4, 5, 6), bool)
    mask[0, 2, 5] = mask[1, 3, 4] = True
    assert box_around(mask) == (slice(0, 2), slice(2, 4), slice(4, 6))
    assert box_around(mask, pad=1) == (slice(0, 3), slice(1, 5), slice(3, 6))
    assert box_around(mask, pad=np.array([0, 2, 0])) == (slice(0, 2), slice(0, 5), slice(4, 6))


def test_dense_bone_mask_thresholds_the_ct_in_hounsfield_units():
    hu = np.array([[[DENSE_BONE_HU - 1, DENSE_BONE_HU, DENSE_BONE_HU + 1, 1500.0]]], np.float32)
    assert dense_bone_mask(sitk.GetImageFromArray(hu)).ravel().tolist() == [False, False, True, True]


def test_decide_labels_weights_the_argmax_then_completes_the_cortex_where_the_ct_is_given():
    from FCMSegmentationLib.preprocessing import labels_from_memberships
    from FCMSegmentationLib.segmentation import decide_labels

    _, memberships, dense = shelled_bone()
    weights = (0.5, 1.0, 1.0)  # the shell's bone (0.4) now beats its weighted background (0.3)
    weighted = labels_from_memberships(memberships, weights)
    assert np.array_equal(decide_labels(memberships, weights), weighted)
    assert (weighted[shell_mask()] == 1).all()
    plain = decide_labels(memberships)
    assert (plain[shell_mask()] == 0).all()
    assert np.array_equal(decide_labels(memberships, None, dense), complete_cortex(plain, memberships, dense))
    assert (decide_labels(memberships, None, dense)[shell_mask()] == 1).all()


def _case_on_its_own_grid(dense: np.ndarray) -> WorkingCase:
    grid = sitk.Image(SHAPE[::-1], sitk.sitkUInt8)
    features = np.zeros((3,) + SHAPE, np.float32)
    return WorkingCase(features, np.ones(SHAPE, bool), grid, grid, 1.0, True, dense_bone=dense)


@pytest.mark.parametrize("complete", [True, False])
def test_results_complete_the_cortex_unless_told_not_to_and_keep_painted_voxels(complete):
    from FCMSegmentationLib.segmentation import result_from_working

    _, memberships, dense = shelled_bone()
    painted = np.zeros(SHAPE, np.uint8)
    painted[:, 3, 5] = 1  # background painted on the shell
    result = result_from_working(memberships, _case_on_its_own_grid(dense), "cpu", [], painted=painted,
                                 complete_cortex_edge=complete)
    labels = sitk.GetArrayFromImage(result.labels)
    assert (labels[:, 3, 5] == 0).all()
    assert (labels[:, 3, 6] == 1).all() == complete
    assert np.array_equal(labels[BONE_CORE], np.ones_like(labels[BONE_CORE]))
    memberships_out = np.moveaxis(sitk.GetArrayFromImage(result.memberships), -1, 0)
    assert memberships_out[1, 0, 3, 6] == pytest.approx(0.4)  # the soft output is the network's


def test_the_command_line_can_leave_the_cortex_as_the_grid_gives_it():
    from FCMSegmentationLib.cli import build_parser

    for command in (["segment"], ["refine", "--scribbles", "s.nrrd"], ["adapt"]):
        argv = command + ["--spect", "s.mha", "--output", "o.nrrd"]
        assert not build_parser().parse_args(argv).no_cortex_completion
        assert build_parser().parse_args(argv + ["--no-cortex-completion"]).no_cortex_completion
