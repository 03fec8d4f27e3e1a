"""SPECT/CT alignment: the rigid misregistration between the scans is found from bone and undone."""
import dataclasses
import math

import numpy as np
import pytest
import SimpleITK as sitk

from FCMSegmentationLib import alignment
from FCMSegmentationLib.alignment import (
    as_float32, body_mask, estimate_alignment, motion, move_spect, overlap_extent_mm, overlap_samples,
    physical_points, rigid_registration, uptake_image, voxels_inside,
)
from FCMSegmentationLib.phantoms import TRAINING_RANGES, misregistration_transform, procedural_phantom
from FCMSegmentationLib.preprocessing import prepare_case

SMALL_MISREGISTERED = dataclasses.replace(  # a fast phantom, moved by the most the training ranges allow
    TRAINING_RANGES, field_width_mm=(300.0, 300.0), field_length_mm=(160.0, 160.0), ct_spacing_mm=(3.0, 3.0),
    ct_slice_mm=(3.0, 3.0), psf_fwhm_mm=(12.0, 12.0), lesion_count=(2, 2),
    misregistration_shift_mm=(4.0, 4.0), misregistration_rotation_deg=(2.0, 2.0))


def rigid(angle_deg: float = 0.0, axis=(0.0, 0.0, 1.0), shift=(0.0, 0.0, 0.0), centre=(0.0, 0.0, 0.0)):
    transform = sitk.Euler3DTransform()
    transform.SetCenter(centre)
    transform.SetMatrix(sitk.VersorTransform(axis, math.radians(angle_deg)).GetMatrix())
    transform.SetTranslation(shift)
    return transform


def bone_points(case, every: int = 50) -> np.ndarray:
    index = np.argwhere(sitk.GetArrayFromImage(case.truth) > 0)[::every, ::-1]
    return np.array([case.truth.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in index])


def residual_mm(found: sitk.Transform, truth: sitk.Transform, points: np.ndarray) -> float:
    """Mean distance between where two transforms send ``points``."""
    return float(np.mean([np.linalg.norm(np.subtract(found.TransformPoint(p), truth.TransformPoint(p)))
                          for p in points.tolist()]))


@pytest.fixture(scope="module")
def misregistered_phantom():
    return procedural_phantom(33, SMALL_MISREGISTERED)


def test_move_spect_puts_each_count_where_the_transform_sends_it():
    spect = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6))
    spect.SetSpacing((4.0, 4.0, 3.0))
    spect.SetOrigin((-10.0, 5.0, 20.0))
    transform = rigid(7.0, (0.3, 1.0, 0.2), (2.0, -1.5, 3.0), (1.0, 2.0, 3.0))
    moved = move_spect(spect, transform)
    assert np.array_equal(sitk.GetArrayFromImage(moved), sitk.GetArrayFromImage(spect))  # counts untouched
    for index in ([0, 0, 0], [5, 4, 3], [2, 1, 3]):
        np.testing.assert_allclose(moved.TransformIndexToPhysicalPoint(index),
                                   transform.TransformPoint(spect.TransformIndexToPhysicalPoint(index)), atol=1e-9)


def test_voxels_inside_agrees_with_resampling_into_an_oblique_container():
    image = sitk.Image([30, 20, 12], sitk.sitkUInt8)
    image.SetSpacing((3.1, 2.9, 4.3))
    image.SetOrigin((-41.3, -27.7, -23.9))
    container = sitk.Image([17, 23, 9], sitk.sitkUInt8) + 1
    container.SetSpacing((2.3, 1.7, 3.7))
    container.SetOrigin((-13.1, -19.3, -11.7))
    container.SetDirection(rigid(25.0, (0.2, 0.3, 1.0)).GetMatrix())
    expected = sitk.GetArrayFromImage(sitk.Resample(container, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    inside = voxels_inside(image, container)
    assert inside.shape == expected.shape and 0 < inside.sum() < inside.size
    assert np.array_equal(inside, expected.astype(bool))


def test_physical_points_and_overlap_samples_follow_the_image_geometry():
    image = sitk.Image([6, 5, 4], sitk.sitkFloat32)
    image.SetSpacing((2.0, 3.0, 4.0))
    image.SetOrigin((-7.0, 3.5, 11.0))
    image.SetDirection(rigid(30.0, (0.4, 0.2, 1.0)).GetMatrix())
    index = np.array([[0, 0, 0], [5, 4, 3], [2, 1, 3]], dtype=np.float64)
    expected = [image.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in index]
    np.testing.assert_allclose(physical_points(image, index), expected, atol=1e-9)
    inside = np.zeros((4, 5, 6), bool)
    inside[1:3, 1:4, 2:5] = True
    mask, points = overlap_samples(image, inside)
    assert np.array_equal(sitk.GetArrayFromImage(mask), inside.astype(np.uint8))
    assert mask.GetOrigin() == image.GetOrigin() and mask.GetDirection() == image.GetDirection()
    kept = np.argwhere(inside)[::7, ::-1].astype(np.float64)
    np.testing.assert_allclose(points, physical_points(image, kept))


def test_as_float32_keeps_values_and_copies_only_other_types():
    values = sitk.GetImageFromArray(np.array([[[-1000, 40, 1200]]], dtype=np.int16))
    converted = as_float32(values)
    assert converted.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(converted), [[[-1000.0, 40.0, 1200.0]]])
    assert as_float32(converted) is converted


def test_overlap_extent_is_the_bounding_box_in_mm_along_each_axis():
    inside = np.zeros((5, 6, 7), bool)
    inside[1:3, 2:6, 0:4] = True
    image = sitk.Image([7, 6, 5], sitk.sitkUInt8)
    image.SetSpacing((2.0, 3.0, 4.0))
    np.testing.assert_allclose(overlap_extent_mm(inside, image), [4 * 2.0, 4 * 3.0, 2 * 4.0])
    np.testing.assert_allclose(overlap_extent_mm(np.zeros_like(inside), image), 0.0)


def test_uptake_image_is_zero_in_air_one_in_soft_tissue_and_highest_in_dense_bone():
    hu = np.full((30, 30, 30), -1000.0, np.float32)
    hu[:, :, 10:20] = 40.0
    hu[:, :, 20:30] = 1000.0
    ct = sitk.GetImageFromArray(hu)
    ct.SetSpacing((1.0, 1.0, 1.5))
    ct.SetOrigin((5.0, -3.0, 7.0))
    uptake = uptake_image(ct)
    values = sitk.GetArrayFromImage(uptake)
    assert uptake.GetSpacing() == pytest.approx((3.0, 3.0, 3.0))
    assert uptake.GetDirection() == ct.GetDirection()
    np.testing.assert_allclose(np.array(uptake.GetSize()) * 3.0, [30.0, 30.0, 45.0])
    np.testing.assert_allclose(values[:, :, 1], 0.0)
    np.testing.assert_allclose(values[:, :, 5], 1.0)
    np.testing.assert_allclose(values[:, :, 8], 1.0 + alignment.BONE_WEIGHT)


def test_body_mask_leaves_out_a_table_joined_to_the_body_by_a_thin_link():
    foreground = np.zeros((12, 30, 30), bool)
    z, y, x = np.mgrid[0:12, 0:30, 0:30]
    body = ((y - 12) / 9.0) ** 2 + ((x - 15) / 11.0) ** 2 <= 1.0
    table = (y >= 23) & (y <= 25)
    link = (y >= 21) & (y <= 23) & (x == 15)  # one voxel wide: a pad or a point of contact
    foreground[:] = body | table | link
    mask = body_mask(foreground)
    assert np.array_equal(mask[:, :22], body[:, :22])  # the whole body, its edge included
    assert not mask[table].any()
    assert np.array_equal(body_mask(foreground, opening_voxels=0), foreground)  # no opening: all joined
    assert not body_mask(np.zeros_like(foreground)).any()


def test_motion_measures_the_mean_shift_and_the_rotation_angle():
    points = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]])
    assert motion(rigid(shift=(3.0, 4.0, 0.0)), points) == pytest.approx((5.0, 0.0))
    shift, angle = motion(rigid(90.0), np.array([[10.0, 0.0, 0.0]]))
    assert angle == pytest.approx(90.0)
    assert shift == pytest.approx(10.0 * math.sqrt(2.0))


def blobs(shift=(0.0, 0.0, 0.0)) -> sitk.Image:
    """Three smooth blobs on a 2 mm grid, all moved by ``shift`` (mm)."""
    z, y, x = np.mgrid[0:30, 0:32, 0:34] * 2.0
    values = sum(np.exp(-((x - cx - shift[0]) ** 2 + (y - cy - shift[1]) ** 2 + (z - cz - shift[2]) ** 2) / 60.0)
                 for cx, cy, cz in ((25.0, 30.0, 20.0), (40.0, 25.0, 35.0), (30.0, 40.0, 30.0)))
    image = sitk.GetImageFromArray((10.0 * values).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    return image


@pytest.mark.parametrize("metric", ["correlation", "mutual_information"])
def test_rigid_registration_finds_a_shift_with_either_metric(metric):
    fixed, moving = blobs(), blobs((3.0, -2.0, 1.5))
    mask = sitk.Image(fixed.GetSize(), sitk.sitkUInt8) + 1
    mask.CopyInformation(fixed)
    transform, before, after = rigid_registration(fixed, moving, mask, (33.0, 31.0, 29.0), metric)
    assert after < before
    np.testing.assert_allclose(transform.GetTranslation(), (3.0, -2.0, 1.5), atol=0.3)
    with pytest.raises(ValueError, match="unknown metric"):
        rigid_registration(fixed, moving, mask, (0.0, 0.0, 0.0), "cross_entropy")


def test_a_simulated_misregistration_is_found_to_within_a_millimetre(misregistered_phantom):
    case = misregistered_phantom
    truth, points = misregistration_transform(case.params), bone_points(case)
    before = residual_mm(sitk.Euler3DTransform(), truth, points)
    found = estimate_alignment(case.spect, case.ct)
    assert found.applied and found.note.startswith("SPECT aligned to the CT")
    assert before > 3.0
    assert residual_mm(found.transform, truth, points) < min(1.0, before / 4)
    assert found.mean_shift_mm == pytest.approx(before, abs=1.5)
    assert 0.5 < found.rotation_deg < 4.0


def test_a_dense_table_under_the_patient_does_not_pull_the_alignment(misregistered_phantom):
    case = misregistered_phantom
    hu = sitk.GetArrayFromImage(case.ct).astype(np.float32)
    below = np.nonzero((hu > -500).any(axis=(0, 2)))[0].max() + 1  # the first row under the body: touching
    hu[:, below:below + 4, :] = 900.0  # a 12 mm slab, denser than most bone, with no uptake
    with_table = sitk.GetImageFromArray(hu)
    with_table.CopyInformation(case.ct)
    truth, points = misregistration_transform(case.params), bone_points(case)
    found = estimate_alignment(case.spect, with_table)
    assert found.applied and residual_mm(found.transform, truth, points) < 1.0


def test_an_estimate_beyond_patient_motion_is_not_used(misregistered_phantom, monkeypatch):
    monkeypatch.setattr(alignment, "MAX_SHIFT_MM", 0.5)
    found = estimate_alignment(misregistered_phantom.spect, misregistered_phantom.ct)
    assert not found.applied and "was not used" in found.note
    assert found.transform.GetParameters() == sitk.Euler3DTransform().GetParameters()


def test_a_thin_overlap_is_left_as_recorded(tiny_case):
    spect, ct, _ = tiny_case
    slab = ct[:, :, 10:20]  # 20 mm of CT: the axial shift and the tilts cannot be told apart
    found = estimate_alignment(spect, slab)
    assert not found.applied and "overlap over only 20 mm" in found.note


def test_a_spect_without_structure_is_left_as_recorded(tiny_case):
    spect, ct, _ = tiny_case
    flat = sitk.Image(spect.GetSize(), sitk.sitkFloat32)
    flat.CopyInformation(spect)
    found = estimate_alignment(flat, ct)
    assert not found.applied and "alignment" in found.note


@pytest.mark.parametrize("align", [True, False])
def test_prepare_case_aligns_only_when_asked_and_only_with_a_ct(tiny_case, align):
    spect, ct, _ = tiny_case
    case = prepare_case(spect, ct, align=align)
    assert (case.alignment is not None) == align
    if align:
        assert case.alignment.note in case.notes
    assert prepare_case(spect, None, align=align).alignment is None


@pytest.mark.parametrize("align", [True, False])
def test_segment_and_refinement_align_unless_told_not_to(tiny_case, random_model, align):
    from FCMSegmentationLib.refinement import RefinementSession
    from FCMSegmentationLib.segmentation import segment

    spect, ct, _ = tiny_case
    notes = segment(spect, ct, random_model, device="cpu", align=align).notes
    assert any("alignment" in note or "aligned" in note for note in notes) == align
    session = RefinementSession(spect, ct, random_model, device="cpu", align=align)
    assert (session.case.alignment is not None) == align


def test_the_command_line_can_use_the_spect_as_recorded():
    from FCMSegmentationLib.cli import build_parser

    for command in (["segment"], ["refine", "--scribbles", "s.nrrd"], ["adapt"]):
        argv = command + ["--spect", "s.mha", "--output", "o.nrrd"]
        assert not build_parser().parse_args(argv).no_align
        assert build_parser().parse_args(argv + ["--no-align"]).no_align


def test_training_can_learn_from_aligned_phantoms_with_the_truth_left_on_the_ct(misregistered_phantom):
    from FCMSegmentationLib.cli import build_parser, train_config_from_args
    from FCMSegmentationLib.training import prepare_training_case

    case = misregistered_phantom  # on the whole CT's grid, as the shipped model segments and was trained
    as_simulated = prepare_training_case(case.spect, case.ct, case.truth, beyond_spect=True)
    aligned = prepare_training_case(case.spect, case.ct, case.truth, beyond_spect=True, align=True)
    segmented = prepare_case(case.spect, case.ct, beyond_spect=True, align=True)
    np.testing.assert_array_equal(aligned.features, segmented.features)  # what segment() gives the network
    assert not np.allclose(aligned.features[0], as_simulated.features[0])  # the SPECT moved...
    np.testing.assert_array_equal(aligned.features[1], as_simulated.features[1])  # ...the CT did not,
    inside_both = aligned.valid & as_simulated.valid
    np.testing.assert_array_equal(aligned.labels[inside_both], as_simulated.labels[inside_both])  # nor the truth
    parse = build_parser().parse_args
    assert not train_config_from_args(parse(["train", "--out", "m.pt"])).align
    assert train_config_from_args(parse(["train", "--out", "m.pt", "--align"])).align
