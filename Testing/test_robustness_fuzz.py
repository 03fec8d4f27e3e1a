"""Fuzzing the preprocessing and ``fcmseg segment`` over shapes, spacings, directions, pixel types and
contents of tiny volumes: never a traceback, never an output on the wrong grid.

The output of a successful run is on the CT's grid (or the SPECT's when no CT is given); a failure is an
FCMError (CLI: one ``error:`` line, exit 2, no output file).
"""
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from FCMSegmentationLib.errors import FCMError
from FCMSegmentationLib.preprocessing import CT_CLIP, SPECT_CLIP, nearest_lps_axes, prepare_case
from robust_helpers import error_lines, run_cli, same_geometry

PIXEL_TYPES = {
    "uint8": np.uint8, "int8": np.int8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32,
    "float32": np.float32, "float64": np.float64,
}
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def rotation(seed: int) -> tuple:
    """An orthonormal direction: identity, a flip/permutation, or a random rotation, by seed."""
    if seed == 0:
        return tuple(np.eye(3).ravel())
    if seed < 4:
        perm = np.eye(3)[[(seed + i) % 3 for i in range(3)]] * np.array([1, -1, 1])[:, None]
        return tuple(perm.ravel())
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return tuple(q.ravel())


@st.composite
def volumes(draw, role: str):
    dims = draw(st.sampled_from([3, 3, 3, 2]))
    size = tuple(draw(st.integers(1, 12)) for _ in range(dims))
    spacing = tuple(draw(st.floats(0.5, 6.0)) for _ in range(dims))
    dtype = draw(st.sampled_from(sorted(PIXEL_TYPES)))
    content = draw(st.sampled_from(["counts", "counts", "counts", "constant", "zeros", "nan", "negative"]))
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    shape = size[::-1]
    if content == "constant":
        array = np.full(shape, 5.0)
    elif content == "zeros":
        array = np.zeros(shape)
    else:
        array = rng.poisson(20.0, shape).astype(float) + rng.uniform(0, 1, shape) * 50 * (rng.random(shape) < 0.2)
        if content == "negative":
            array -= 10.0
    if role == "CT":
        array = array * 10 - 500  # roughly Hounsfield units
    info = np.iinfo(PIXEL_TYPES[dtype]) if np.issubdtype(PIXEL_TYPES[dtype], np.integer) else None
    if info is not None:
        array = np.clip(array, info.min, info.max)
    array = array.astype(PIXEL_TYPES[dtype])
    if content == "nan" and info is None:
        array.flat[rng.integers(array.size)] = np.nan
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    if dims == 3:
        image.SetDirection(rotation(draw(st.integers(0, 6))))
    image.SetOrigin(tuple(draw(st.floats(-3.0, 3.0)) for _ in range(dims)))
    return image


def reference_geometry_ok(output: sitk.Image, reference: sitk.Image) -> bool:
    """The output is on the reference's grid (a 2-D reference becomes one slice of it)."""
    if reference.GetDimension() == 2:
        return (output.GetSize() == reference.GetSize() + (1,)
                and np.allclose(output.GetSpacing()[:2], reference.GetSpacing(), atol=1e-4)
                and np.allclose(output.GetOrigin()[:2], reference.GetOrigin(), atol=1e-4))
    return same_geometry(output, reference)


@FUZZ
@given(spect=volumes("SPECT"), ct=st.one_of(st.none(), volumes("CT")))
def test_preprocessing_never_crashes_and_keeps_geometry(spect, ct):
    try:
        case = prepare_case(spect, ct)
    except FCMError as err:
        assert str(err) and "\n" not in str(err)
        event(type(err).__name__)
        return
    event("prepared")
    assert case.features.dtype == np.float32 and np.isfinite(case.features).all()
    assert case.features.shape[1:] == case.valid.shape and case.valid.any()
    assert 0 <= case.features[0].min() and case.features[0].max() <= SPECT_CLIP
    assert 0 <= case.features[1].min() and case.features[1].max() <= CT_CLIP
    assert reference_geometry_ok(case.output_reference, ct if ct is not None else spect)
    reference = ct if ct is not None else spect
    stored = reference.GetDirection() if reference.GetDimension() == 3 else np.eye(3).ravel()
    assert np.allclose(case.grid.GetDirection(), nearest_lps_axes(stored).ravel())  # the reference's axes, reordered


@FUZZ
@given(spect=volumes("SPECT"), ct=st.one_of(st.none(), volumes("CT")))
def test_cli_segment_exits_0_or_2_and_writes_on_the_reference_grid(spect, ct):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        argv = ["segment", "--spect", str(folder / "spect.mha"), "--output", str(folder / "labels.nrrd"),
                "--memberships", str(folder / "memberships.nrrd"), "--random-weights", "--device", "cpu",
                "--patch", "32"]
        sitk.WriteImage(spect, str(folder / "spect.mha"))
        if ct is not None:
            sitk.WriteImage(ct, str(folder / "ct.mha"))
            argv += ["--ct", str(folder / "ct.mha")]
        code, out, err = run_cli(argv)  # any exception other than FCMError escapes and fails the test
        assert "Traceback" not in err
        event(f"exit {code}" + (f": {error_lines(err)[0][7:40]}" if code == 2 else ""))
        if code == 2:
            assert len(error_lines(err)) == 1, err
            assert not (folder / "labels.nrrd").exists() and not (folder / "memberships.nrrd").exists()
            return
        assert code == 0, err
        reference = sitk.ReadImage(str(folder / ("ct.mha" if ct is not None else "spect.mha")))
        labels = sitk.ReadImage(str(folder / "labels.nrrd"))
        memberships = sitk.ReadImage(str(folder / "memberships.nrrd"))
        assert reference_geometry_ok(labels, reference) and reference_geometry_ok(memberships, reference)
        assert set(np.unique(sitk.GetArrayFromImage(labels))) <= {0, 1, 2}
        m = sitk.GetArrayFromImage(memberships)
        assert m.shape[-1] == 3 and np.allclose(m.sum(axis=-1), 1.0, atol=1e-4)
        assert sorted(p.name for p in folder.iterdir() if p.name.startswith("."))  == []
