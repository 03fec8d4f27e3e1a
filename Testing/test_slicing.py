"""phantoms/slicing.py: a phantom's CT re-sliced thicker, as low-dose SPECT/CT CTs come."""
import numpy as np
import pytest
import SimpleITK as sitk

from FCMSegmentationLib.errors import InputError
from FCMSegmentationLib.phantoms.slicing import THICK_SLICE_MM, random_thick_slice_ct, thick_slice_ct


def slab_ct(slab_hu: int = 900, background: int = 0) -> sitk.Image:
    """int16 CT, 12 x 10 x 30 voxels of 1 x 1 x 2 mm, turned and moved, with a 2 mm slab at slice 15."""
    hu = np.full((30, 10, 12), background, dtype=np.int16)
    hu[15] = slab_hu
    ct = sitk.GetImageFromArray(hu)
    ct.SetSpacing((1.0, 1.0, 2.0))
    ct.SetOrigin((-5.0, 3.0, 40.0))
    ct.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return ct


def test_thick_slices_keep_the_in_plane_grid_and_spread_a_thin_slab_over_the_slice():
    ct = slab_ct()
    thick = thick_slice_ct(ct, 6.0)
    assert thick.GetPixelID() == ct.GetPixelID()
    assert thick.GetSpacing() == pytest.approx((1.0, 1.0, 6.0))
    assert thick.GetOrigin() == pytest.approx(ct.GetOrigin())
    assert thick.GetDirection() == pytest.approx(ct.GetDirection())
    assert thick.GetSize() == (12, 10, 10)  # 58 mm of slice centres, every 6 mm
    profile = sitk.GetArrayFromImage(thick)[:, 5, 6].astype(float)
    assert profile.max() == pytest.approx(300.0, abs=1)  # 900 HU over 2 of the slice's 6 mm
    assert profile.sum() * 6.0 == pytest.approx(900.0 * 2.0, rel=0.05)  # HU x mm along z is kept
    assert np.count_nonzero(profile) <= 2


def test_thick_slices_leave_a_uniform_ct_uniform_and_refuse_thinner_slices_or_2d():
    uniform = sitk.GetArrayFromImage(thick_slice_ct(slab_ct(slab_hu=40, background=40), 5.0))
    assert np.all(uniform == 40)
    with pytest.raises(InputError, match="below the CT's slice spacing"):
        thick_slice_ct(slab_ct(), 1.0)
    with pytest.raises(InputError, match="3-D"):
        thick_slice_ct(sitk.Image(8, 8, sitk.sitkInt16), 5.0)


def test_random_thick_slices_follow_the_seed_and_the_probability():
    ct = slab_ct()
    assert random_thick_slice_ct(ct, 1, 0.0) is ct
    thicknesses = [random_thick_slice_ct(ct, seed, 1.0).GetSpacing()[2] for seed in range(20)]
    assert all(THICK_SLICE_MM[0] <= t <= THICK_SLICE_MM[1] for t in thicknesses)
    assert len(set(thicknesses)) == 20  # drawn per seed
    assert random_thick_slice_ct(ct, 3, 1.0).GetSpacing() == random_thick_slice_ct(ct, 3, 1.0).GetSpacing()
    thick = sum(random_thick_slice_ct(ct, seed, 0.5) is not ct for seed in range(200))
    assert 70 < thick < 130


def test_training_with_thick_ct_changes_the_ct_channel_and_keeps_the_truth(tmp_path):
    from FCMSegmentationLib.training import TrainConfig, build_cases, phantom_plan

    plain = TrainConfig(out=str(tmp_path / "m.pt"), phantoms=1, seed=5)
    thick = TrainConfig(out=str(tmp_path / "m.pt"), phantoms=1, seed=5, thick_ct=1.0)
    (as_simulated,), (resliced,) = (build_cases(phantom_plan(config), config) for config in (plain, thick))
    np.testing.assert_array_equal(resliced.features[0], as_simulated.features[0])  # the SPECT is untouched
    assert not np.allclose(resliced.features[1], as_simulated.features[1])  # the CT is thicker-sliced
    both = (resliced.labels >= 0) & (as_simulated.labels >= 0)
    assert both.mean() > 0.9
    np.testing.assert_array_equal(resliced.labels[both], as_simulated.labels[both])  # the truth is not
