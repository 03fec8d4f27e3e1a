"""Sliding-window inference: coverage, blending, equality with a whole-volume pass, devices."""
import numpy as np
import pytest
import torch

from FCMSegmentationLib.errors import InputError
from FCMSegmentationLib.inference import (
    estimate_patches,
    fit_patch,
    gaussian_weights,
    patch_starts,
    resolve_device,
    sliding_window,
)


@pytest.mark.parametrize("size, patch, overlap", [(100, 32, 0.25), (32, 32, 0.5), (20, 32, 0.25), (97, 40, 0.5)])
def test_patch_starts_cover_the_axis(size, patch, overlap):
    starts = patch_starts(size, patch, overlap)
    covered = np.zeros(max(size, patch), dtype=bool)
    for s in starts:
        covered[s:s + patch] = True
    assert covered[:size].all()
    assert all(s + patch <= max(size, patch) for s in starts)


def test_fit_patch_rounds_to_multiple_and_caps_at_patch():
    assert fit_patch((5, 100, 64), 96, 8) == (8, 96, 64)


def test_gaussian_weights_peak_in_centre_and_stay_positive():
    w = gaussian_weights((9, 9, 9))
    assert w[4, 4, 4] == pytest.approx(1.0)
    assert w.min() >= 1e-3
    assert w[0, 0, 0] < w[4, 4, 4]


def test_pointwise_function_is_reproduced_exactly_by_blending():
    # A per-voxel function gives the same value from every patch, so blending must return it unchanged.
    volume = np.random.default_rng(0).random((2, 21, 30, 17)).astype(np.float32)

    def square(x: torch.Tensor) -> torch.Tensor:
        return x ** 2

    out = sliding_window(square, volume, 2, torch.device("cpu"), multiple=8, patch=16, overlap=0.5)
    assert out.shape == volume.shape
    np.testing.assert_allclose(out, volume ** 2, rtol=1e-5, atol=1e-6)


def test_estimate_patches_matches_the_run():
    calls = []

    def count(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x[:, :1]

    volume = np.zeros((1, 40, 50, 20), dtype=np.float32)
    sliding_window(count, volume, 1, torch.device("cpu"), patch=16, overlap=0.25)
    assert len(calls) == estimate_patches((40, 50, 20), patch=16, overlap=0.25)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            resolve_device("cuda")
