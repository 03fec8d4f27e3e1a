"""Small helpers shared by the robustness tests (not a test module)."""
import contextlib
import io
from typing import List, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from FCMSegmentationLib import cli
from FCMSegmentationLib.modelfile import LoadedModel, new_card
from FCMSegmentationLib.networks import UNet


def tiny_model(seed: int = 0) -> LoadedModel:
    """A 2-level, 4-channel U-Net: same code paths as the real one, ~50x cheaper (size multiple 2)."""
    torch.manual_seed(seed)
    network = UNet(channels=(4, 8), head_channels=4)
    return LoadedModel(network.eval(), new_card(network, name="tiny test network"))


def run_cli(argv: List[str]) -> Tuple[int, str, str]:
    """``fcmseg`` in-process: (exit code, stdout, stderr). Any exception other than SystemExit escapes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def error_lines(stderr: str) -> List[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def image_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def synthetic_spect(shape_zyx=(40, 70, 70), spacing=3.0, seed: int = 0) -> sitk.Image:
    """Poisson counts of a few hot blobs on a warm background."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape_zyx, dtype=np.float32)
    activity = np.ones(shape_zyx, np.float32)
    for _ in range(4):
        c = [rng.uniform(0, n) for n in shape_zyx]
        activity += 10 * np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / 30.0)
    image = sitk.GetImageFromArray(rng.poisson(activity * 5).astype(np.float32))
    image.SetSpacing((spacing,) * 3)
    return image
