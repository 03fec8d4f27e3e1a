"""Robustness: bad inputs, resource limits and faults give clear errors and lose nothing.

Inputs (files, dimensions, pixel types, NaN/Inf, constant/negative SPECT, overlap, directions, large
volumes, strokes), outputs (missing/unwritable locations, atomic replacement), resources (out of memory,
cancel, reproducibility). Model-file faults: test_robustness_models.py; fuzzing: test_robustness_fuzz.py.
See docs/robustness.md for what the user sees in each case.
"""
import contextlib
import errno
import os
import re
import threading
import tracemalloc

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FCMSegmentationLib import cli, imageio, modelfile
from FCMSegmentationLib.errors import Cancelled, FCMError, InputError, OutputError
from FCMSegmentationLib.imageio import read_image, write_image
from FCMSegmentationLib.inference import (
    estimate_patches,
    estimate_run,
    format_seconds,
    run_with_fallback,
    sliding_window,
)
from FCMSegmentationLib.modelfile import load_model, save_model
from FCMSegmentationLib.preprocessing import prepare_case
from FCMSegmentationLib.refinement import RefinementSession, RefineSettings
from FCMSegmentationLib.segmentation import segment
from robust_helpers import error_lines, image_like, run_cli, same_geometry, synthetic_spect, tiny_model

FAST = RefineSettings(steps=12, adapt_steps=5, crop=16)
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def arrays(image):
    return sitk.GetArrayFromImage(image)


def strokes(truth, classes=(0, 1, 2), per_class=30, seed=0):
    labels = arrays(truth)
    codes = np.zeros_like(labels, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    for k in classes:
        where = np.argwhere(labels == k)
        codes[tuple(where[rng.choice(len(where), per_class, replace=False)].T)] = k + 1
    return image_like(codes, truth)


@pytest.fixture()
def case_files(tiny_case, tmp_path):
    spect, ct, truth = tiny_case
    paths = {"spect": tmp_path / "spect.nrrd", "ct": tmp_path / "ct.nrrd", "truth": tmp_path / "truth.nrrd"}
    sitk.WriteImage(spect, str(paths["spect"]))
    sitk.WriteImage(ct, str(paths["ct"]))
    sitk.WriteImage(truth, str(paths["truth"]))
    return paths


def segment_argv(spect, output, *extra):
    return ["segment", "--spect", str(spect), "--output", str(output), "--random-weights", "--device", "cpu",
            "--patch", "32", *extra]


def assert_clean_cli_error(code, stderr, pattern):
    assert code == 2, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in stderr


# ----- 1. inputs ---------------------------------------------------------------------------------
def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "absent.nii.gz")
    out = tmp_path / "out.nrrd"
    assert_clean_cli_error(*run_cli(segment_argv(tmp_path / "absent.nii.gz", out))[::2], "no such file")
    assert not out.exists()


def test_unreadable_file_is_a_clear_error(tmp_path, tiny_case, monkeypatch):
    path = tmp_path / "spect.nrrd"
    sitk.WriteImage(tiny_case[0], str(path))
    if not ROOT:  # a real permission denial (root reads anything: then only the check below applies)
        path.chmod(0)
        with pytest.raises(InputError, match="not readable"):
            read_image(path)
        path.chmod(0o644)
    real_access = os.access
    monkeypatch.setattr(imageio.os, "access", lambda p, mode: False if mode == os.R_OK else real_access(p, mode))
    with pytest.raises(InputError, match="not readable .*permissions"):
        read_image(path)


@pytest.mark.parametrize("name, content", [
    ("notes.nii.gz", b"this is a text file, not an image\n"),
    ("empty.nrrd", b""),
    ("noise.dcm", bytes(range(256)) * 8),
    ("noext", b"\x00\x01\x02"),
])
def test_a_file_that_is_not_an_image(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match="not a readable image"):
        read_image(path)
    code, _, err = run_cli(segment_argv(path, tmp_path / "out.nrrd"))
    assert_clean_cli_error(code, err, "not a readable image")
    assert not (tmp_path / "out.nrrd").exists()


def test_a_directory_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(tmp_path)


def test_real_planar_scan_is_segmented_as_one_slice(shared_data):
    path = shared_data / "nm_planar" / "whole_body_bone_planar.dcm"
    planar = read_image(path)
    # SimpleITK reads this NM file as 3-D with one slice (256 x 1024 x 1); a 2-D image is also accepted.
    assert planar.GetSize()[:2] == (256, 1024) and planar.GetNumberOfPixels() == 256 * 1024
    for image in (planar, planar[:, :, 0] if planar.GetDimension() == 3 else planar):
        case = prepare_case(image)
        assert case.features.shape[1] == 1  # one slice on the working grid, not stretched to 3 mm
        assert any("negative" in note for note in case.notes)  # this scan has values down to -30
        result = segment(image, None, tiny_model(), device="cpu", patch=64)
        labels = result.labels
        assert labels.GetDimension() == 3 and labels.GetSize() == (256, 1024, 1)
        assert np.allclose(labels.GetSpacing()[:2], image.GetSpacing()[:2])
        assert np.allclose(labels.GetOrigin()[:2], image.GetOrigin()[:2])
        assert set(np.unique(arrays(labels))) <= {0, 1, 2}
        if image.GetDimension() == 2:
            assert any("2-D image" in note for note in result.notes)


def test_four_d_and_multicomponent_images(tiny_case):
    spect, ct, _ = tiny_case
    with pytest.raises(InputError, match="4-D with 2 frames"):
        prepare_case(sitk.JoinSeries([spect, spect]), ct)
    with pytest.raises(InputError, match="components per voxel"):
        prepare_case(sitk.Compose(spect, spect), ct)
    with pytest.raises(InputError, match="CT: has 3 components"):
        prepare_case(spect, sitk.Compose(ct, ct, ct))
    one_frame = prepare_case(sitk.JoinSeries([spect]), ct)  # a 4-D image with one time point is fine
    np.testing.assert_array_equal(one_frame.features, prepare_case(spect, ct).features)


@pytest.mark.parametrize("pixel", [sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16, sitk.sitkInt32,
                                   sitk.sitkUInt32, sitk.sitkInt64, sitk.sitkFloat32, sitk.sitkFloat64])
def test_integer_float_and_unsigned_types_give_the_same_features(tiny_case, pixel):
    spect, ct, _ = tiny_case
    counts = sitk.Cast(sitk.Clamp(spect, sitk.sitkFloat32, 0.0, 255.0), sitk.sitkFloat32)  # fits uint8
    reference = prepare_case(counts, ct)
    hu = ct if pixel not in (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32) else sitk.Clamp(ct, lowerBound=0)
    typed = prepare_case(sitk.Cast(counts, pixel), sitk.Cast(hu, pixel) if pixel != sitk.sitkUInt8 else None)
    np.testing.assert_allclose(typed.features[0], (reference.features[0] if typed.has_ct
                                                   else prepare_case(counts).features[0]), atol=1e-5)


def test_nan_and_inf_voxels_become_zero_with_a_note(tiny_case):
    spect, ct, _ = tiny_case
    a = arrays(spect)
    a[3, 4, 5], a[6, 7, 8], a[9, 10, 11] = np.nan, np.inf, -np.inf
    h = arrays(ct).astype(np.float32)
    h[0, 0, 0] = np.nan
    case = prepare_case(image_like(a, spect), image_like(h, ct))
    assert np.isfinite(case.features).all()
    assert "SPECT: 3 NaN/Inf voxels were set to 0" in case.notes
    assert "CT: 1 NaN/Inf voxels were set to 0" in case.notes
    with pytest.raises(InputError, match="no positive counts"):
        prepare_case(image_like(np.full_like(a, np.nan), spect), ct)


def test_constant_and_empty_spect_are_clear_errors(tiny_case, tmp_path):
    spect, ct, _ = tiny_case
    with pytest.raises(InputError, match="constant"):
        prepare_case(sitk.Image(spect.GetSize(), sitk.sitkFloat32) + 7.0, ct)
    empty = sitk.Image(spect.GetSize(), sitk.sitkUInt16)
    empty.CopyInformation(spect)
    with pytest.raises(InputError, match="no positive counts"):
        prepare_case(empty, ct)
    sitk.WriteImage(empty, str(tmp_path / "zero.nrrd"))
    code, _, err = run_cli(segment_argv(tmp_path / "zero.nrrd", tmp_path / "out.nrrd"))
    assert_clean_cli_error(code, err, "no positive counts")


def test_negative_spect_values_are_clipped_with_a_note(tiny_case):
    spect, ct, _ = tiny_case
    a = arrays(spect)
    negative = a.copy()
    negative[a == 0] = -3.0  # reconstruction undershoot in the background
    case = prepare_case(image_like(negative, spect), ct)
    assert any("negative values" in note for note in case.notes)
    np.testing.assert_array_equal(case.features, prepare_case(spect, ct).features)


def test_a_ct_with_no_air_gets_a_note_that_it_may_not_be_in_hounsfield_units(tiny_case):
    spect, ct, _ = tiny_case
    assert not any("Hounsfield" in note for note in prepare_case(spect, ct).notes)  # air at -1000
    offset = sitk.Cast(ct, sitk.sitkFloat32) + 1024.0  # stored with 0 for -1024, the offset not undone
    notes = prepare_case(spect, offset).notes
    assert any("may not be in Hounsfield units" in note for note in notes)


def test_spect_and_ct_that_do_not_overlap(case_files, tiny_case, tmp_path):
    spect, ct, _ = tiny_case
    far = sitk.Image(spect)
    far.SetOrigin((500.0, 0.0, 0.0))
    with pytest.raises(InputError, match="do not overlap in space"):
        prepare_case(far, ct)
    sitk.WriteImage(far, str(tmp_path / "far.nrrd"))
    out = tmp_path / "out.nrrd"
    code, _, err = run_cli(segment_argv(tmp_path / "far.nrrd", out, "--ct", str(case_files["ct"])))
    assert_clean_cli_error(code, err, "do not overlap")
    assert not out.exists()


def test_partial_overlap_segments_the_overlap_and_says_so(tiny_case):
    spect, ct, _ = tiny_case
    shifted = sitk.Image(spect)
    shifted.SetOrigin((0.0, -42.0, -34.0))  # covers x >= -2 mm only: about half of the CT
    result = segment(shifted, ct, tiny_model(), device="cpu", patch=32)
    assert any(re.search(r"SPECT covers only \d+% of the CT", note) for note in result.notes)
    assert same_geometry(result.labels, ct)
    memberships = arrays(result.memberships)
    x_mm = ct.GetOrigin()[0] + 2.0 * np.arange(ct.GetSize()[0])
    outside = x_mm < -5.0  # beyond the SPECT's edge and the interpolation margin
    np.testing.assert_allclose(memberships[:, :, outside, 0], 1.0, atol=1e-6)  # pure background there
    assert (arrays(result.labels)[:, :, outside] == 0).all()


def test_different_directions_output_on_the_ct_grid():
    rotated = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    from conftest import make_tiny_case

    spect, ct, _ = make_tiny_case(1, ct_direction=rotated)
    spect.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))  # SPECT unrotated: directions differ
    spect.SetOrigin((-80.0, -80.0, -34.0))
    result = segment(spect, ct, tiny_model(), device="cpu", patch=32)
    assert same_geometry(result.labels, ct, tol=1e-9)
    assert same_geometry(result.memberships, ct, tol=1e-9)


# ----- huge volumes: upfront estimate, bounded memory ----------------------------------------------------
def test_estimate_functions_scale_and_bound_memory():
    small = estimate_run((64, 64, 64), 32, "cpu")
    big = estimate_run((640, 512, 512), 96, "cpu")
    assert big.patches == estimate_patches((640, 512, 512), 96) == 9 * 7 * 7
    assert big.seconds > 100 * small.seconds
    assert estimate_run((640, 512, 512), 96, "cuda").seconds < big.seconds / 50
    # memory per patch is bounded by the patch, not the volume; the volume part is 7 float32 per voxel
    assert estimate_run((2000, 2000, 2000), 96, "cpu").patch_bytes == big.patch_bytes
    assert big.host_bytes == 4 * 7 * 640 * 512 * 512
    message = big.message(torch.device("cpu"))
    assert re.fullmatch(r"working grid 640x512x512 voxels: 441 patches of 96x96x96, roughly \S+ (min|h) on the "
                        r"CPU; memory about \d+ MB for the volume \+ \d+ MB per patch", message), message
    assert format_seconds(3) == "3 s" and format_seconds(600) == "10 min" and format_seconds(9000) == "2.5 h"


def test_large_volume_with_tiny_patch_reports_estimate_and_keeps_patches_bounded():
    model = tiny_model()
    shapes = []
    forward = model.network.forward

    def recording_forward(x):
        shapes.append(tuple(x.shape[2:]))
        return forward(x)

    model.network.forward = recording_forward
    messages = []
    spect = synthetic_spect((40, 70, 70))  # 3 mm voxels: working grid 40x70x70
    result = segment(spect, None, model, device="cpu", patch=16, progress=lambda f, m: messages.append(m))
    match = re.match(r"working grid 40x70x70 voxels: (\d+) patches of 16x16x16, roughly", result.notes[0])
    assert match, result.notes
    assert int(match.group(1)) == len(shapes) == estimate_patches((40, 70, 70), 16, multiple=2)
    assert max(max(s) for s in shapes) == 16  # the network never sees more than one patch
    first_patch = next(i for i, m in enumerate(messages) if m.startswith("patch 1/"))
    assert any(m.startswith("working grid") for m in messages[:first_patch])  # told before the work
    assert same_geometry(result.labels, spect)


def test_sliding_window_memory_stays_within_the_estimate():
    volume = np.random.default_rng(0).random((3, 40, 64, 64), dtype=np.float32)
    network = tiny_model().network
    estimate = estimate_run(volume.shape[1:], 16, "cpu", network.config, multiple=2)
    tracemalloc.start()
    try:
        sliding_window(network, volume, 3, torch.device("cpu"), 2, 16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * estimate.host_bytes, (peak, estimate.host_bytes)


def test_volume_smaller_than_one_bottleneck_voxel_is_segmented():
    spect = synthetic_spect((5, 6, 7), spacing=3.0)  # working grid under 8 voxels on every axis
    result = segment(spect, None, modelfile.random_model(), device="cpu", patch=8)  # default U-Net: 3 pools
    assert same_geometry(result.labels, spect)


def test_patch_smaller_than_the_network_allows_is_a_clear_error(tiny_case, case_files, tmp_path):
    with pytest.raises(InputError, match="patch size 4 is too small"):
        segment(tiny_case[0], None, modelfile.random_model(), device="cpu", patch=4)
    code, _, err = run_cli(segment_argv(case_files["spect"], tmp_path / "o.nrrd")[:-2] + ["--patch", "0"])
    assert_clean_cli_error(code, err, "patch size 0 is too small")


# ----- strokes ------------------------------------------------------------------------------------------------
@pytest.fixture()
def session(tiny_case):
    spect, ct, _ = tiny_case
    return RefinementSession(spect, ct, tiny_model(), "cpu", FAST, patch=32)


def test_empty_one_class_and_outside_strokes(tiny_case, session):
    _, ct, truth = tiny_case
    empty = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(ct)
    with pytest.raises(InputError, match="no painted strokes"):
        session.refine(empty)
    outside = strokes(truth)
    outside.SetOrigin((900.0, 900.0, 900.0))
    with pytest.raises(InputError, match="no painted strokes inside the image"):
        session.refine(outside)
    assert not session.can_undo and session.history == []
    before = {k: v.clone() for k, v in session.model.network.state_dict().items()}
    session.refine(strokes(truth, classes=(1,)))  # bone only: defined, refinement proceeds
    after = session.model.network.state_dict()
    assert session.can_undo and session.history[-1].strokes["bone"] > 0
    assert any(not torch.equal(before[k], after[k]) for k in before)


# ----- 3. outputs ---------------------------------------------------------------------------------------------
def test_missing_output_directory(tiny_case, case_files, tmp_path):
    with pytest.raises(OutputError, match="does not exist; create it first"):
        write_image(tiny_case[2], tmp_path / "nope" / "out.nrrd")
    code, _, err = run_cli(segment_argv(case_files["spect"], tmp_path / "nope" / "out.nrrd"))
    assert_clean_cli_error(code, err, "does not exist")


def test_output_under_a_regular_file_or_onto_a_directory(tiny_case, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        write_image(tiny_case[2], tmp_path / "file.txt" / "out.nrrd")
    (tmp_path / "dir.nrrd").mkdir()
    with pytest.raises(OutputError, match="is an existing directory"):
        write_image(tiny_case[2], tmp_path / "dir.nrrd")


def test_unwritable_output_directory(tiny_case, case_files, tmp_path, monkeypatch):
    target = tmp_path / "ro" / "out.nrrd"
    target.parent.mkdir()
    if not ROOT:  # real permission bits only stop non-root users
        target.parent.chmod(0o500)
        with pytest.raises(OutputError, match="not writable"):
            write_image(tiny_case[2], target)
        target.parent.chmod(0o700)
    # what a read-only file system does to root: os.access says yes, creating a file fails
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(imageio.tempfile, "TemporaryFile", read_only)
    with pytest.raises(OutputError, match="cannot create files in .*Read-only file system"):
        write_image(tiny_case[2], target)
    code, _, err = run_cli(segment_argv(case_files["spect"], target))
    assert_clean_cli_error(code, err, "Read-only file system")
    monkeypatch.undo()
    real_access = os.access
    monkeypatch.setattr(imageio.os, "access",
                        lambda p, mode: False if mode & os.W_OK else real_access(p, mode))
    with pytest.raises(OutputError, match="is not writable"):
        write_image(tiny_case[2], target)
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize("failure", ["runtime", "disk-full", "interrupt"])
def test_existing_output_is_replaced_atomically(tiny_case, tmp_path, monkeypatch, failure):
    target = tmp_path / "labels.nrrd"
    write_image(tiny_case[2], target)
    old = target.read_bytes()
    real_write = sitk.WriteImage

    def crash_midway(image, path, *args):
        with open(path, "wb") as handle:  # half an image in the temporary file...
            handle.write(b"NRRD0004\n# partial")
        if failure == "runtime":
            raise RuntimeError("ITK ERROR: cannot write")
        if failure == "disk-full":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise KeyboardInterrupt  # Ctrl-C / a crash of the caller

    monkeypatch.setattr(sitk, "WriteImage", crash_midway)
    expected = KeyboardInterrupt if failure == "interrupt" else OutputError
    with pytest.raises(expected):
        write_image(sitk.Image(tiny_case[2]) * 0, target)
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nrrd"]  # no temporary file left behind
    monkeypatch.setattr(sitk, "WriteImage", real_write)
    write_image(sitk.Image(tiny_case[2]) * 0, target)  # and a successful write does replace it
    assert arrays(read_image(target)).max() == 0


def test_cli_write_failure_keeps_the_previous_output(case_files, tmp_path, monkeypatch):
    out = tmp_path / "seg.nrrd"
    out.write_bytes(b"previous result")

    def fail(*args):
        raise RuntimeError("ITK ERROR: disk quota exceeded")

    monkeypatch.setattr(sitk, "WriteImage", fail)
    code, _, err = run_cli(segment_argv(case_files["spect"], out))
    assert_clean_cli_error(code, err, "could not write")
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd", "seg.nrrd", "spect.nrrd", "truth.nrrd"]


def test_saved_model_is_replaced_atomically(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    first = tiny_model(seed=1)
    save_model(target, first.network, first.card)
    old = target.read_bytes()
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):  # the file write, not the in-memory weights buffer
            with open(f, "wb") as handle:
                handle.write(old[: len(old) // 3])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(modelfile.torch, "save", crash_midway)
    second = tiny_model(seed=2)
    with pytest.raises(OutputError, match="No space left"):
        save_model(target, second.network, second.card)
    assert target.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    monkeypatch.undo()
    reloaded = load_model(target)
    assert all(torch.equal(v, first.network.state_dict()[k]) for k, v in reloaded.network.state_dict().items())


# ----- 4. resources: out of memory ----------------------------------------------------------------------
def test_run_with_fallback_halves_the_patch_then_moves_to_the_cpu():
    calls, notes = [], []

    def run(device, patch):
        calls.append((device.type, patch))
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return np.ones(3)

    result, used = run_with_fallback(run, torch.device("cuda"), 96, notify=notes.append)
    assert calls == [("cuda", 96), ("cuda", 48), ("cpu", 48)] and used.type == "cpu"
    assert result.tolist() == [1, 1, 1]
    assert notes == ["out of memory on the GPU: retrying with 48-voxel patches",
                     "GPU out of memory even with 48-voxel patches: continuing on the CPU (slower)"]


def test_out_of_memory_on_the_cpu_ends_with_a_clear_error_not_a_loop():
    calls = []

    def run(device, patch):
        calls.append(patch)
        if len(calls) > 10:
            pytest.fail("run_with_fallback does not stop")
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory")

    with pytest.raises(FCMError, match="out of memory on the CPU even with 48-voxel patches"):
        run_with_fallback(run, torch.device("cpu"), 96)
    assert calls == [96, 48]
    with pytest.raises(ValueError):  # anything that is not out-of-memory propagates unchanged
        run_with_fallback(lambda d, p: (_ for _ in ()).throw(ValueError("bug")), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_fallback(lambda d, p: (_ for _ in ()).throw(RuntimeError("shape mismatch")), torch.device("cpu"))


def test_segment_falls_back_to_smaller_patches_on_out_of_memory():
    spect = synthetic_spect((40, 70, 70))
    model = tiny_model()
    forward = model.network.forward

    def limited_forward(x):
        if max(x.shape[2:]) > 48:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(x)

    model.network.forward = limited_forward
    result = segment(spect, None, model, device="cpu", patch=96)
    assert "out of memory on the CPU: retrying with 48-voxel patches" in result.notes
    direct = segment(spect, None, model, device="cpu", patch=48)  # exactly what the retry computed
    np.testing.assert_array_equal(arrays(result.memberships), arrays(direct.memberships))


# ----- 4. resources: cancel ------------------------------------------------------------------------------
def test_cancelled_segment_leaves_inputs_and_model_untouched(tiny_case):
    spect, ct, _ = tiny_case
    spect_before, ct_before = arrays(spect), arrays(ct)
    model = tiny_model()
    weights = {k: v.clone() for k, v in model.network.state_dict().items()}
    cancel = threading.Event()

    def cancel_at_second_patch(fraction, message):
        if message.startswith("patch 2/"):
            cancel.set()

    with pytest.raises(Cancelled, match="nothing was changed"):
        segment(spect, ct, model, device="cpu", patch=16, progress=cancel_at_second_patch, cancel=cancel)
    np.testing.assert_array_equal(arrays(spect), spect_before)
    np.testing.assert_array_equal(arrays(ct), ct_before)
    assert all(torch.equal(v, weights[k]) for k, v in model.network.state_dict().items())


def test_cancelled_refine_changes_nothing(tiny_case, session):
    spect, _, truth = tiny_case
    session.refine(strokes(truth))
    weights = {k: v.clone() for k, v in session.model.network.state_dict().items()}
    undo, history = list(session._undo), list(session.history)
    memberships = arrays(session.segment().memberships)
    cancel, steps = threading.Event(), []

    def cancel_after_three_steps(fraction, message):
        if message.startswith("step"):
            steps.append(message)
            if len(steps) == 3:
                cancel.set()

    with pytest.raises(Cancelled):
        session.refine(strokes(truth, seed=5), steps=50, progress=cancel_after_three_steps, cancel=cancel)
    assert len(steps) == 3  # it stopped at the next step, not at the end
    assert all(torch.equal(v, weights[k]) for k, v in session.model.network.state_dict().items())
    assert session._undo == undo and session.history == history
    np.testing.assert_array_equal(arrays(session.segment().memberships), memberships)


def interrupting_progress_bar(after: float):
    @contextlib.contextmanager
    def bar(description):
        def update(fraction, message):
            if description in ("segment", "refine") and fraction > after:
                raise KeyboardInterrupt

        yield update

    return bar


def test_cli_interrupt_writes_nothing_and_keeps_previous_files(case_files, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "progress_bar", interrupting_progress_bar(0.3))
    fresh = tmp_path / "fresh.nrrd"
    code, _, err = run_cli(segment_argv(case_files["spect"], fresh, "--memberships", str(tmp_path / "m.nrrd")))
    assert code == 130 and "interrupted; no output was written" in err
    assert not fresh.exists() and not (tmp_path / "m.nrrd").exists()
    # refine: neither the label map nor the fine-tuned model appears; an existing output survives
    model_path = tmp_path / "base.pt"
    base = tiny_model()
    save_model(model_path, base.network, base.card)
    old = tmp_path / "old.nrrd"
    old.write_bytes(b"previous")
    scribbles = tmp_path / "strokes.nrrd"
    sitk.WriteImage(strokes(read_image(case_files["truth"])), str(scribbles))
    code, _, err = run_cli(["refine", "--spect", str(case_files["spect"]), "--ct", str(case_files["ct"]),
                            "--scribbles", str(scribbles), "--model", str(model_path), "--output", str(old),
                            "--save-model", str(tmp_path / "tuned.pt"), "--device", "cpu", "--steps", "20"])
    assert code == 130, err
    assert old.read_bytes() == b"previous" and not (tmp_path / "tuned.pt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files


# ----- 4. resources: reproducibility ----------------------------------------------------------------------
def test_same_inputs_same_seed_same_result(tiny_case):
    spect, ct, truth = tiny_case
    model = tiny_model()
    first = segment(spect, ct, model, device="cpu", patch=16)
    second = segment(spect, ct, model, device="cpu", patch=16)
    np.testing.assert_array_equal(arrays(first.memberships), arrays(second.memberships))
    np.testing.assert_array_equal(arrays(first.labels), arrays(second.labels))

    def refined(seed):
        session = RefinementSession(spect, ct, tiny_model(), "cpu", RefineSettings(steps=12, crop=16, seed=seed),
                                    patch=32)
        result = session.refine(strokes(truth))
        return arrays(result.memberships), session.model.network.state_dict()

    (m1, w1), (m2, w2), (_, w3) = refined(0), refined(0), refined(1)
    np.testing.assert_array_equal(m1, m2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)  # the seed does matter (the test can fail)


def test_atomic_writes_get_normal_permissions_and_keep_a_replaced_files_mode(tmp_path):
    import os
    import stat

    from FCMSegmentationLib.imageio import atomic_path

    umask = os.umask(0o022)
    try:
        fresh = tmp_path / "new.txt"
        with atomic_path(fresh) as tmp:
            tmp.write_text("x")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # not mkstemp's private 0600
        kept = tmp_path / "kept.txt"
        kept.write_text("old")
        os.chmod(kept, 0o640)
        with atomic_path(kept) as tmp:
            tmp.write_text("new")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "new"
    finally:
        os.umask(umask)


def test_top_level_help_says_what_the_tool_does_and_its_exit_statuses(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "Segment bone and bone lesions in SPECT/CT" in text
    assert "``" not in text  # plain text, not the module docstring's markup
    flat = " ".join(text.split())
    assert "0 on success; 2 on a problem you can fix" in flat and "130 when interrupted" in flat
