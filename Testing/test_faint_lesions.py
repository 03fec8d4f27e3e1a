"""Small faint lesions: a predicted lesion both small and never clearly lesion is dropped."""
import numpy as np
import pytest

from FCMSegmentationLib.faint_lesions import MAX_VOLUME_ML, MIN_PEAK, drop_faint_lesions
from FCMSegmentationLib.preprocessing import labels_from_memberships
from FCMSegmentationLib.segmentation import decide_labels

UNIT = (1.0, 1.0, 1.0)
VOXEL_ML = 0.1  # 5 voxels make MAX_VOLUME_ML


def _row(lesion, background=0.0):
    """(K=3, 1, 1, N) memberships along a line: the given lesion and background memberships, bone the rest."""
    lesion, background = np.asarray(lesion, dtype=np.float32), np.broadcast_to(np.float32(background), len(lesion))
    return np.stack([background, 1.0 - lesion - background, lesion]).reshape(3, 1, 1, -1)


def test_a_small_faint_lesion_goes_and_a_small_clear_one_stays():
    # two lesions of 2 voxels (0.2 ml): one peaking at 0.6, one at 0.9
    memberships = _row([0.0, 0.55, 0.6, 0.0, 0.0, 0.9, 0.8, 0.0])
    labels = labels_from_memberships(memberships)
    assert labels.ravel().tolist() == [1, 2, 2, 1, 1, 2, 2, 1]
    kept = drop_faint_lesions(labels, memberships, UNIT, VOXEL_ML)
    assert kept.ravel().tolist() == [1, 1, 1, 1, 1, 2, 2, 1]
    assert labels.ravel().tolist() == [1, 2, 2, 1, 1, 2, 2, 1]  # the input is not modified


def test_a_faint_lesion_of_half_a_millilitre_or_more_stays():
    faint = [0.0] + [0.6] * 5 + [0.0]
    labels = labels_from_memberships(_row(faint))
    assert (drop_faint_lesions(labels, _row(faint), UNIT, MAX_VOLUME_ML / 5) == labels).all()
    # the same lesion on a finer grid is under 0.5 ml and goes: the volume is physical, not a voxel count
    assert not (drop_faint_lesions(labels, _row(faint), UNIT, MAX_VOLUME_ML / 6) == 2).any()


def test_the_thresholds_are_those_of_the_module():
    just_clear = _row([0.0, MIN_PEAK, 0.0])
    labels = labels_from_memberships(just_clear)
    assert (drop_faint_lesions(labels, just_clear, UNIT, VOXEL_ML) == labels).all()
    assert not (drop_faint_lesions(labels, just_clear, UNIT, VOXEL_ML, min_peak=MIN_PEAK + 0.01) == 2).any()


def test_a_dropped_lesion_takes_the_better_of_background_and_bone_by_the_weights():
    memberships = _row([0.0, 0.6, 0.0], background=0.25)  # the lesion voxel: background 0.25, bone 0.15
    labels = labels_from_memberships(memberships)
    assert drop_faint_lesions(labels, memberships, UNIT, VOXEL_ML).ravel().tolist() == [1, 0, 1]
    assert drop_faint_lesions(labels, memberships, (0.5, 1.0, 1.0), VOXEL_ML).ravel().tolist() == [1, 1, 1]


def test_a_painted_lesion_stays_however_faint():
    memberships = _row([0.0, 0.55, 0.6, 0.0])
    labels = labels_from_memberships(memberships)
    painted = np.zeros(labels.shape, bool)
    painted[0, 0, 1] = True
    assert drop_faint_lesions(labels, memberships, UNIT, VOXEL_ML, painted).ravel().tolist() == [1, 2, 2, 1]
    assert drop_faint_lesions(labels, memberships, UNIT, VOXEL_ML).ravel().tolist() == [1, 1, 1, 1]


def test_labels_without_lesions_come_back_unchanged_and_bad_input_is_refused():
    memberships = _row([0.0, 0.2, 0.0])
    labels = labels_from_memberships(memberships)
    assert (drop_faint_lesions(labels, memberships, UNIT, VOXEL_ML) == labels).all()
    with pytest.raises(ValueError, match="shapes differ"):
        drop_faint_lesions(labels[..., :2], memberships, UNIT, VOXEL_ML)
    with pytest.raises(ValueError, match="voxel volume"):
        drop_faint_lesions(labels, memberships, UNIT, 0.0)


def test_decide_labels_drops_faint_lesions_only_given_the_voxel_volume():
    memberships = _row([0.0, 0.6, 0.0, 0.95, 0.0])
    assert decide_labels(memberships).ravel().tolist() == [1, 2, 1, 2, 1]
    assert decide_labels(memberships, voxel_ml=VOXEL_ML).ravel().tolist() == [1, 1, 1, 2, 1]


def test_segment_drops_faint_lesions_when_asked(tiny_case):
    import SimpleITK as sitk

    from FCMSegmentationLib.modelfile import LoadedModel, random_model
    from FCMSegmentationLib.preprocessing import voxel_volume_ml
    from FCMSegmentationLib.segmentation import segment

    spect, ct, _ = tiny_case
    untrained = random_model("cpu", seed=0, norm="instance")
    weights = [1.0, 1.0, 2.5]  # lesion weighted up: an untrained network's faint memberships then call lesions
    model = LoadedModel(untrained.network, dict(untrained.card, decision={"spect_ct": weights}))
    kept = segment(spect, ct, model, keep_lesions_outside_bone=True)
    dropped = segment(spect, ct, model, keep_lesions_outside_bone=True, drop_faint_lesions=True)
    memberships = np.moveaxis(sitk.GetArrayFromImage(kept.memberships), -1, 0)
    assert voxel_volume_ml(ct) == pytest.approx(np.prod(ct.GetSpacing()) / 1000)
    expected = decide_labels(memberships, weights, voxel_ml=voxel_volume_ml(ct))
    assert (sitk.GetArrayFromImage(kept.labels) == 2).any()
    lesion = sitk.GetArrayFromImage(dropped.labels) == 2
    assert np.array_equal(lesion, expected == 2)
    assert lesion.sum() < (sitk.GetArrayFromImage(kept.labels) == 2).sum()


def test_without_a_ct_segment_keeps_faint_lesions_even_when_asked(tiny_case):
    import SimpleITK as sitk

    from FCMSegmentationLib.modelfile import LoadedModel, random_model
    from FCMSegmentationLib.preprocessing import voxel_volume_ml
    from FCMSegmentationLib.segmentation import NO_CT_FOR_FAINT_LESIONS, segment

    spect, _, _ = tiny_case
    untrained = random_model("cpu", seed=0, norm="instance")
    weights = [1.0, 1.0, 1.6]  # an untrained network then calls some small faint lesions on the SPECT's grid
    model = LoadedModel(untrained.network, dict(untrained.card, decision={"spect_only": weights}))
    result = segment(spect, None, model, drop_faint_lesions=True)
    labels = sitk.GetArrayFromImage(result.labels)
    memberships = np.moveaxis(sitk.GetArrayFromImage(result.memberships), -1, 0)
    with_ct_they_would_go = drop_faint_lesions(labels, memberships, weights, voxel_volume_ml(result.labels))
    assert (with_ct_they_would_go == 2).sum() < (labels == 2).sum()
    assert np.array_equal(labels, sitk.GetArrayFromImage(segment(spect, None, model).labels))
    assert NO_CT_FOR_FAINT_LESIONS in result.notes
    assert NO_CT_FOR_FAINT_LESIONS not in segment(spect, None, model).notes


def test_the_command_line_can_drop_faint_lesions():
    from FCMSegmentationLib.cli import build_parser

    for command in (["segment"], ["refine", "--scribbles", "s.nrrd"], ["adapt"]):
        argv = command + ["--spect", "s.mha", "--output", "o.nrrd"]
        assert not build_parser().parse_args(argv).drop_faint_lesions
        assert build_parser().parse_args(argv + ["--drop-faint-lesions"]).drop_faint_lesions
