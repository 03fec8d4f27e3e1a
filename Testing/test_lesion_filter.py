"""Predicted lesions outside CT bone are left out; lesions in bone (lytic ones included) are kept."""
import numpy as np
import pytest
import SimpleITK as sitk

from FCMSegmentationLib.lesion_filter import BONE_HU, drop_lesions_outside_bone, near_ct_bone
from FCMSegmentationLib.preprocessing import CT_WINDOW, WorkingCase

SHAPE = (20, 30, 30)


def working_case(hu: np.ndarray, has_ct: bool = True, spacing: float = 3.0) -> WorkingCase:
    offset, width = CT_WINDOW
    features = np.zeros((3,) + hu.shape, np.float32)
    features[1] = np.clip((hu - offset) / width, 0, 2) if has_ct else 0.0
    features[2] = float(has_ct)
    grid = sitk.Image(hu.shape[::-1], sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    return WorkingCase(features, np.ones(hu.shape, bool), grid, grid, 1.0, has_ct)


def bone_slab_hu() -> np.ndarray:
    """Soft tissue (40 HU) with a bone slab (700 HU) in x 5..14; a lytic hole (0 HU) inside it."""
    hu = np.full(SHAPE, 40.0)
    hu[:, :, 5:15] = 700.0
    hu[8:11, 8:11, 8:11] = 0.0
    return hu


def memberships_with_lesions(*boxes) -> np.ndarray:
    """Mostly background with some bone; lesion argmax in each box."""
    memberships = np.zeros((3,) + SHAPE, np.float32)
    memberships[0], memberships[1] = 0.7, 0.3
    for box in boxes:
        memberships[:, box[0], box[1], box[2]] = np.array([0.1, 0.3, 0.6])[:, None, None, None]
    return memberships


IN_BONE = (slice(2, 5), slice(2, 5), slice(6, 9))
LYTIC = (slice(8, 11), slice(8, 11), slice(8, 11))
OUTSIDE = (slice(12, 16), slice(20, 24), slice(22, 26))  # 7 voxels (21 mm) from the slab: a bladder, say


def test_a_lesion_away_from_bone_is_dropped_and_lesions_in_bone_are_kept():
    case = working_case(bone_slab_hu())
    before = memberships_with_lesions(IN_BONE, LYTIC, OUTSIDE)
    after, notes = drop_lesions_outside_bone(before, case)
    labels = after.argmax(axis=0)
    assert (labels[IN_BONE] == 2).all() and (labels[LYTIC] == 2).all()
    assert not (labels[OUTSIDE] == 2).any()
    assert (labels[OUTSIDE] == 0).all()                       # the CT shows no bone there: background
    np.testing.assert_allclose(after.sum(axis=0), 1.0, atol=1e-6)
    assert notes == ["1 hot lesion outside bone on the CT (not bone lesions) left out of the lesion class"]
    np.testing.assert_array_equal(before, memberships_with_lesions(IN_BONE, LYTIC, OUTSIDE))  # input untouched


def test_a_dropped_lesion_near_bone_shares_its_membership_in_proportion():
    hu = bone_slab_hu()
    case = working_case(hu)
    # a lesion astride the slab's edge but mostly out of it: its near-bone voxels keep bone : background 3 : 7
    box = (slice(2, 4), slice(20, 22), slice(15, 26))
    after, _ = drop_lesions_outside_bone(memberships_with_lesions(box), case)
    edge = after[:, 2, 20, 15]
    np.testing.assert_allclose(edge, [0.25, 0.75, 0.0], atol=1e-6)


def test_nothing_changes_without_a_ct_or_without_lesions():
    memberships = memberships_with_lesions(OUTSIDE)
    same, notes = drop_lesions_outside_bone(memberships, working_case(bone_slab_hu(), has_ct=False))
    assert same is memberships and notes == []
    plain = memberships_with_lesions()
    same, notes = drop_lesions_outside_bone(plain, working_case(bone_slab_hu()))
    assert same is plain and notes == []


def test_a_lesion_touching_the_keep_mask_survives():
    case = working_case(bone_slab_hu())
    keep = np.zeros(SHAPE, bool)
    keep[13, 21, 23] = True
    after, notes = drop_lesions_outside_bone(memberships_with_lesions(OUTSIDE), case, keep=keep)
    assert (after.argmax(axis=0)[OUTSIDE] == 2).all() and notes == []


@pytest.mark.parametrize("spacing", [3.0, 1.0])
def test_near_ct_bone_reaches_the_margin_in_millimetres(spacing):
    hu = np.full((1, 1, 40), 40.0)
    hu[0, 0, 20] = BONE_HU + 10
    near = near_ct_bone(working_case(hu, spacing=spacing), margin_mm=3.0)[0, 0]
    reach = int(round(3.0 / spacing))
    assert near[20 - reach:20 + reach + 1].all()
    assert near.sum() == 2 * reach + 1


@pytest.mark.parametrize("keep", [False, True])
def test_segment_applies_the_filter_unless_asked_to_keep(tiny_case, random_model, monkeypatch, keep):
    from FCMSegmentationLib import segmentation

    spect, ct, _ = tiny_case

    def lesion_in_soft_tissue(model, case, *args, **kwargs):
        memberships = np.zeros((3,) + case.valid.shape, np.float32)
        memberships[0] = 1.0
        far = np.argwhere(case.valid & ~near_ct_bone(case, margin_mm=9.0) & (case.features[1] > 0.45))[0]
        memberships[:, far[0], far[1], far[2]] = [0.2, 0.1, 0.7]
        return memberships

    monkeypatch.setattr(segmentation, "predict_working", lesion_in_soft_tissue)
    result = segmentation.segment(spect, ct, random_model, device="cpu", keep_lesions_outside_bone=keep)
    assert (sitk.GetArrayFromImage(result.labels) == 2).any() == keep
    assert any("outside bone" in note for note in result.notes) != keep


def test_the_command_line_can_keep_lesions_outside_bone():
    from FCMSegmentationLib.cli import build_parser

    for command in (["segment"], ["refine", "--scribbles", "s.nrrd"], ["adapt"]):
        argv = command + ["--spect", "s.mha", "--output", "o.nrrd"]
        assert not build_parser().parse_args(argv).keep_lesions_outside_bone
        assert build_parser().parse_args(argv + ["--keep-lesions-outside-bone"]).keep_lesions_outside_bone
