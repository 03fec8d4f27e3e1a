"""Bone beyond the SPECT field: a CT longer than the SPECT is segmented whole by models trained for it
(bone from the CT alone, lesions only where the SPECT sees them); older models keep the overlap only."""
import numpy as np
import pytest
import SimpleITK as sitk

from FCMSegmentationLib.modelfile import LoadedModel
from FCMSegmentationLib.preprocessing import BONE, LESION, prepare_case
from FCMSegmentationLib.segmentation import mask_outside_field_of_view, segment
from FCMSegmentationLib.training import IGNORE, prepare_training_case, random_crop


@pytest.fixture(scope="module")
def short_spect_case(tiny_case):
    """The tiny case with its SPECT cut to the middle 10 of 18 slices (40 of the CT's 64 mm)."""
    spect, ct, truth = tiny_case
    return spect[:, :, 4:14], ct, truth


def test_the_grid_covers_the_whole_ct_only_when_asked(short_spect_case):
    spect, ct, _ = short_spect_case
    overlap = prepare_case(spect, ct, 3.0)
    whole = prepare_case(spect, ct, 3.0, beyond_spect=True)
    assert whole.valid.shape[0] > overlap.valid.shape[0]          # more slices: the CT's full length
    assert (~whole.valid).sum() > (~overlap.valid).sum()
    assert whole.segmented.all() and np.array_equal(overlap.segmented, overlap.valid)
    assert np.all(whole.features[0][~whole.valid] == 0)           # no SPECT there
    assert whole.features[1][~whole.valid].max() > 0.7            # but the CT's bone is
    assert "from the CT alone" in whole.notes[-1] and "background" in overlap.notes[-1]
    assert not prepare_case(spect, None, 3.0, beyond_spect=True).beyond_spect  # nothing beyond without a CT


def test_outside_the_spect_no_lesion_and_bone_only_when_segmenting_beyond(short_spect_case):
    spect, ct, _ = short_spect_case
    for beyond in (False, True):
        case = prepare_case(spect, ct, 3.0, beyond_spect=beyond)
        memberships = np.full((3,) + case.valid.shape, 1 / 3, np.float32)
        masked = mask_outside_field_of_view(memberships, case)
        outside = ~case.valid
        np.testing.assert_allclose(masked.sum(axis=0), 1.0, atol=1e-6)
        assert np.all(masked[LESION][outside] == 0)
        assert np.all(masked[BONE][outside] == (0.5 if beyond else 0.0))
        np.testing.assert_array_equal(masked[:, case.valid], memberships[:, case.valid])


def test_segment_follows_the_models_card(short_spect_case, random_model):
    spect, ct, _ = short_spect_case
    bone_outside = {}
    for beyond in (False, True):
        card = dict(random_model.card, segments_beyond_spect=beyond)
        result = segment(spect, ct, LoadedModel(random_model.network, card), device="cpu")
        memberships = sitk.GetArrayFromImage(result.memberships)        # (z, y, x, K) on the CT grid
        first_slices = memberships[:3]                                   # beyond the SPECT's first slice
        assert np.all(first_slices[..., LESION] == 0)
        bone_outside[beyond] = float(first_slices[..., BONE].max())
    assert bone_outside[False] == 0 and bone_outside[True] > 0


def test_training_cases_keep_bone_labels_beyond_the_spect_and_ignore_lesions_there(short_spect_case):
    spect, ct, truth = short_spect_case
    case = prepare_training_case(spect, ct, truth, 3.0, beyond_spect=True)
    outside = ~case.valid
    assert (case.labels[outside] == BONE).any() and not (case.labels[outside] == LESION).any()
    assert np.all(case.labels[case.valid] != IGNORE)
    overlap = prepare_training_case(spect, ct, truth, 3.0)
    assert overlap.labels.shape[0] < case.labels.shape[0]


def test_spect_truncation_cuts_the_crops_spect_and_its_lesion_labels(tiny_case):
    case = prepare_training_case(*tiny_case)
    cuts = 0
    for seed in range(8):  # the same seed crops the same place; only the truncation differs
        _, plain_valid, _ = random_crop(case, 24, np.random.default_rng(seed), 1.0, ct_dropout=0.0)
        features, valid, labels = random_crop(case, 24, np.random.default_rng(seed), 1.0, ct_dropout=0.0,
                                              spect_truncation=1.0)
        cut = plain_valid.any(axis=(1, 2)) & ~valid.any(axis=(1, 2))   # axial planes that lost their SPECT
        cuts += bool(cut.any())  # none when the cut falls in the crop's padding, beyond the image
        assert np.all(features[0][cut] == 0) and (not cut.any() or features[1][cut].max() > 0)
        assert not (labels[cut] == LESION).any() and (not cut.any() or (labels[cut] == BONE).any())
        features, valid, labels = random_crop(case, 24, np.random.default_rng(seed), 1.0, ct_dropout=1.0,
                                              spect_truncation=1.0)
        assert np.all(labels[~valid] == IGNORE)                          # neither SPECT nor CT: nothing to learn
    assert cuts >= 4


def test_spect_truncation_always_leaves_some_spect_in_the_crop(tiny_case):
    from dataclasses import replace

    case = prepare_training_case(*tiny_case)
    thin = case.valid.copy()
    thin[:-1] = False  # only the last axial plane has SPECT
    case = replace(case, valid=thin, valid_voxels=np.argwhere(thin))
    for seed in range(20):
        _, valid, _ = random_crop(case, 24, np.random.default_rng(seed), 0.0, ct_dropout=0.0, spect_truncation=1.0)
        assert valid.any()


def test_a_model_trained_with_spect_truncation_says_so_in_its_card(tmp_path):
    from FCMSegmentationLib.errors import InputError
    from FCMSegmentationLib.modelfile import load_model
    from FCMSegmentationLib.training import TrainConfig, train

    tiny = dict(phantoms=1, validation_phantoms=0, steps=1, batch=1, crop=16, channels=(4, 8), checkpoint_every=2)
    train(TrainConfig(out=str(tmp_path / "m.pt"), spect_truncation=0.25, **tiny), log=lambda line: None)
    assert load_model(tmp_path / "m.pt").segments_beyond_spect
    train(TrainConfig(out=str(tmp_path / "old.pt"), **tiny), log=lambda line: None)
    assert not load_model(tmp_path / "old.pt").segments_beyond_spect
    with pytest.raises(InputError, match="probability"):
        TrainConfig(out="m.pt", spect_truncation=1.5)
