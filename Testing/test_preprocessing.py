"""Working grid, normalisation and output geometry."""
import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from conftest import make_tiny_case
from FCMSegmentationLib.errors import InputError
from FCMSegmentationLib.modelfile import LoadedModel, load_model
from FCMSegmentationLib.preprocessing import (
    CT_CLIP,
    memberships_to_output,
    nearest_inside,
    nearest_lps_axes,
    normalise_ct,
    normalise_spect,
    prepare_case,
)
from FCMSegmentationLib.segmentation import mask_outside_field_of_view, result_from_working, segment

ROTATED = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # 90 degrees about z


def test_spect_normalisation_maps_percentile_to_one():
    counts = np.arange(1, 1001, dtype=np.float32).reshape(10, 10, 10)
    out, scale = normalise_spect(counts, np.ones_like(counts, dtype=bool))
    assert scale == pytest.approx(np.percentile(counts, 99.5))
    assert out.max() <= 5.0
    assert out[counts == scale].size == 0 or out[counts == scale][0] == pytest.approx(1.0)


def test_ct_window():
    hu = np.array([-1000.0, 0.0, 1000.0, 5000.0])
    np.testing.assert_allclose(normalise_ct(hu), [0.0, 0.5, 1.0, CT_CLIP])


def test_working_grid_is_isotropic_on_the_cts_lps_direction(tiny_case):
    spect, ct, _ = tiny_case
    case = prepare_case(spect, ct, spacing_mm=3.0)
    assert case.grid.GetSpacing() == pytest.approx((3.0, 3.0, 3.0))
    assert case.grid.GetDirection() == pytest.approx(ct.GetDirection())  # the tiny CT is stored LPS
    assert case.features.shape[0] == 3
    assert case.features.shape[1:] == case.valid.shape == sitk.GetArrayViewFromImage(case.grid).shape
    assert case.has_ct and np.all(case.features[2] == 1.0)


def test_spect_only_uses_spect_grid_and_zero_ct_channels(tiny_case):
    spect, _, _ = tiny_case
    case = prepare_case(spect, None)
    assert not case.has_ct
    assert np.all(case.features[1:] == 0)
    assert case.output_reference.GetSize() == spect.GetSize()


def test_working_features_follow_physical_space_not_index_for_rotated_ct():
    # The same anatomy with a rotated CT direction: the bone rod stays under the same physical points.
    spect, ct, truth = make_tiny_case(ct_direction=ROTATED)
    case = prepare_case(spect, ct)
    ct_values = sitk.GetArrayFromImage(ct)
    bone_index = np.argwhere(sitk.GetArrayFromImage(truth) == 1)[0]
    point = ct.TransformIndexToPhysicalPoint([int(i) for i in bone_index[::-1]])
    working = case.grid.TransformPhysicalPointToIndex(point)[::-1]
    assert ct_values[tuple(bone_index)] > 300
    assert case.features[1][working] > normalise_ct(np.array([300.0]))[0]


@pytest.mark.parametrize("stored_as", ["RAS", "LPI", "SAR"])
def test_working_features_do_not_depend_on_how_the_images_axes_are_stored(tiny_case, stored_as):
    # The same voxels at the same physical points, with index axes permuted and flipped (as a NIfTI file
    # may store them): the network must see the anatomy as the LPS phantoms it was trained on showed it.
    spect, ct, _ = tiny_case
    plain = prepare_case(spect, ct)
    stored = prepare_case(sitk.DICOMOrient(spect, stored_as), sitk.DICOMOrient(ct, stored_as))
    assert sitk.DICOMOrient(ct, stored_as).GetDirection() != pytest.approx(ct.GetDirection())
    for geometry in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(stored.grid, geometry)() == pytest.approx(getattr(plain.grid, geometry)())
    np.testing.assert_allclose(stored.features, plain.features, atol=1e-5)
    np.testing.assert_array_equal(stored.valid, plain.valid)


@pytest.mark.parametrize("degrees", [0.0, 20.0, 90.0, 160.0])
def test_nearest_lps_axes_reorders_the_axes_to_point_as_lps_does(degrees):
    turn = np.radians(degrees)
    rotation = np.array([[np.cos(turn), -np.sin(turn), 0.0], [np.sin(turn), np.cos(turn), 0.0], [0.0, 0.0, 1.0]])
    for stored in (rotation, rotation @ np.diag([-1.0, -1.0, 1.0]), rotation[:, [2, 0, 1]]):
        axes = nearest_lps_axes(stored.flatten())
        reordering = stored.T @ axes  # a signed permutation: the same axes, reordered and flipped
        np.testing.assert_allclose(np.abs(reordering).sum(axis=0), 1.0, atol=1e-9)
        np.testing.assert_allclose(np.abs(reordering), np.round(np.abs(reordering)), atol=1e-9)
        assert np.all(np.diag(axes) > 0.5)  # each axis within 45 degrees of L, P and S in turn


def test_working_grid_of_a_rotated_ct_takes_the_nearest_lps_axes():
    spect, ct, _ = make_tiny_case(ct_direction=ROTATED)
    assert prepare_case(spect, ct).grid.GetDirection() == pytest.approx((1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def test_segment_labels_do_not_depend_on_how_the_images_axes_are_stored(tiny_case):
    # Without the SPECT/CT alignment, whose registration samples each image's own voxels (its estimate
    # moves by about 0.1 degree with the storage, and a few labels with it).
    spect, ct, _ = tiny_case
    model = load_model(None)
    plain = segment(spect, ct, model, device="cpu", align=False)
    stored_ct = sitk.DICOMOrient(ct, "RAS")
    stored = segment(sitk.DICOMOrient(spect, "RAS"), stored_ct, model, device="cpu", align=False)
    assert stored.labels.GetDirection() == stored_ct.GetDirection()  # output on the CT's grid as stored
    back = sitk.GetArrayFromImage(sitk.DICOMOrient(stored.labels, "LPS"))
    assert np.unique(back).tolist() == [0, 1, 2]
    np.testing.assert_array_equal(back, sitk.GetArrayFromImage(plain.labels))


@pytest.mark.parametrize("with_ct", [True, False])
def test_segment_output_geometry_is_exactly_the_reference(tiny_case, random_model, with_ct):
    spect, ct, _ = tiny_case
    result = segment(spect, ct if with_ct else None, random_model, device="cpu")
    reference = ct if with_ct else spect
    for image in (result.labels, result.memberships):
        assert image.GetSize() == reference.GetSize()
        assert image.GetSpacing() == reference.GetSpacing()
        assert image.GetOrigin() == reference.GetOrigin()
        assert image.GetDirection() == reference.GetDirection()
    assert result.memberships.GetNumberOfComponentsPerPixel() == 3
    sums = sitk.GetArrayFromImage(result.memberships).sum(axis=-1)
    np.testing.assert_allclose(sums, 1.0, atol=1e-4)


def test_memberships_outside_working_grid_are_background(tiny_case):
    spect, ct, _ = tiny_case
    case = prepare_case(spect, ct)
    uniform = np.full((3,) + case.valid.shape, 1.0 / 3, dtype=np.float32)
    out = memberships_to_output(uniform, case)
    assert out.shape[1:] == sitk.GetArrayViewFromImage(ct).shape
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-5)


def test_the_working_voxels_beyond_the_image_are_its_last_overhanging_slices(tiny_case):
    spect, ct, _ = tiny_case
    # CT 96 x 80 x 64 mm: 3 mm voxels fit x exactly, overhang y by 1 mm (the last centre still inside) and
    # z by 2 mm (the last centre outside)
    beyond = beyond_mask(prepare_case(spect, ct))
    assert beyond[-1].all() and not beyond[:-1].any()
    # SPECT alone, 104 x 88 x 72 mm: only y's last slice overhangs by more than half a voxel
    beyond = beyond_mask(prepare_case(spect))
    assert beyond[:, -1].all() and not beyond[:, :-1].any()


def beyond_mask(case):
    mask = np.zeros(case.valid.shape, dtype=bool)
    mask.flat[case.beyond_image[0]] = True
    return mask


def test_nearest_inside_maps_each_outside_voxel_to_the_closest_inside_one():
    inside = np.zeros((1, 3, 4), dtype=bool)
    inside[0, :2, :3] = True
    outside, source = nearest_inside(inside)
    assert outside.tolist() == [3, 7, 8, 9, 10, 11]
    assert source.tolist() == [2, 6, 4, 5, 6, 6]
    assert nearest_inside(np.ones((2, 2), bool)) is None and nearest_inside(np.zeros((2, 2), bool)) is None


def test_voxels_beyond_the_image_take_the_memberships_of_their_inner_neighbours(tiny_case):
    spect, ct, _ = tiny_case
    case = prepare_case(spect, ct, beyond_spect=True)
    memberships = np.random.default_rng(0).dirichlet(np.ones(3), case.valid.shape).astype(np.float32)
    memberships = np.moveaxis(memberships, -1, 0)
    filled = mask_outside_field_of_view(memberships, case)
    unfilled = mask_outside_field_of_view(memberships, dataclasses.replace(case, beyond_image=None))
    np.testing.assert_array_equal(filled[:, :-1], unfilled[:, :-1])
    np.testing.assert_array_equal(filled[:, -1], unfilled[:, -2])


def test_the_last_ct_slice_keeps_bone_that_runs_through_it(tiny_case):
    spect, ct, truth = tiny_case
    case = prepare_case(spect, ct, beyond_spect=True)
    # memberships as a network gives them: bone where the CT is dense, background where it saw padding
    bone = case.features[1] > 0.7
    memberships = np.stack([~bone, bone, np.zeros_like(bone)]).astype(np.float32)
    rod = ndimage.binary_erosion(sitk.GetArrayFromImage(truth)[-1] > 0)  # the rod runs along z; not its rim
    last_slice = {}
    for name, beyond in (("filled", case.beyond_image), ("unfilled", None)):
        masked = mask_outside_field_of_view(memberships, dataclasses.replace(case, beyond_image=beyond))
        labels = result_from_working(masked, case, "", [], complete_cortex_edge=False).labels
        last_slice[name] = sitk.GetArrayFromImage(labels)[-1]
    assert rod.sum() > 20 and np.all(last_slice["filled"][rod] > 0)
    assert not np.any(last_slice["unfilled"][rod] > 0)  # half background there: what the filling mends


def test_segment_runs_the_network_on_the_working_grid_asked_for(tiny_case, monkeypatch):
    from FCMSegmentationLib import segmentation

    spect, ct, _ = tiny_case
    model = load_model(None)
    grids = []
    predict = segmentation.predict_working
    monkeypatch.setattr(segmentation, "predict_working",
                        lambda loaded, case, *args, **kwargs: grids.append(case.grid.GetSpacing())
                        or predict(loaded, case, *args, **kwargs))
    calibrated = segment(spect, ct, model, device="cpu")
    finer = segment(spect, ct, model, device="cpu", working_spacing_mm=2.0)
    assert grids == [(model.working_spacing_mm(with_ct=True),) * 3, (2.0,) * 3]
    assert finer.labels.GetSize() == calibrated.labels.GetSize()  # the output stays on the CT's grid
    assert not np.array_equal(sitk.GetArrayFromImage(finer.memberships),
                              sitk.GetArrayFromImage(calibrated.memberships))
    # the card's working grid per input is the default; an uncalibrated card runs on the training grid
    decision = dict(model.card["decision"], working_spacing_mm={"spect_ct": 4.0, "spect_only": 5.0})
    grids.clear()
    for card in (dict(model.card, decision=decision), dict(model.card, decision=None)):
        other = LoadedModel(model.network, card)
        segment(spect, ct, other, device="cpu")
        segment(spect, None, other, device="cpu")
    assert grids == [(4.0,) * 3, (5.0,) * 3, (model.spacing_mm,) * 3, (model.spacing_mm,) * 3]
    for bad in (0.0, -3.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="working grid"):
            segment(spect, ct, model, device="cpu", working_spacing_mm=bad)
