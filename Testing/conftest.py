"""Shared fixtures: the engine on sys.path, one torch thread per xdist worker, tiny synthetic cases."""
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FCMSegmentation"))

import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # 2 cores, 2 xdist workers: oversubscription makes everything slower

SHARED_DATA = REPO.parent / "shared" / "data"


def load_script(name: str):
    """A script under scripts/ (``name`` without .py) imported as a module, for testing its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tiny_case(seed: int = 0, ct_direction=None):
    """A 48x40x32 (x, y, z) CT at 2 mm with a bone rod and a lesion in it, a SPECT at 4 mm on another
    origin, and the truth on the CT grid. Returns (spect, ct, truth) SimpleITK images."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:32, 0:40, 0:48]
    body = ((x - 24) / 22.0) ** 2 + ((y - 20) / 18.0) ** 2 < 1
    bone = ((x - 24) / 5.0) ** 2 + ((y - 22) / 5.0) ** 2 < 1
    lesion = bone & (((x - 24) ** 2 + (y - 22) ** 2 + (z - 16) ** 2) < 3.5 ** 2)
    hu = np.where(body, 40.0, -1000.0) + np.where(bone, 600.0, 0.0) + rng.normal(0, 10, body.shape)
    truth = np.where(bone, 1, 0) + np.where(lesion, 1, 0)
    ct = sitk.GetImageFromArray(hu.astype(np.int16))
    ct.SetSpacing((2.0, 2.0, 2.0))
    ct.SetOrigin((-48.0, -40.0, -32.0))
    if ct_direction is not None:
        ct.SetDirection(ct_direction)
    truth_image = sitk.GetImageFromArray(truth.astype(np.uint8))
    truth_image.CopyInformation(ct)
    activity = np.where(body, 1.0, 0.0) + np.where(bone, 9.0, 0.0) + np.where(lesion, 30.0, 0.0)
    activity_image = sitk.GetImageFromArray(activity.astype(np.float32))
    activity_image.CopyInformation(ct)
    grid = sitk.Image([26, 22, 18], sitk.sitkFloat32)
    grid.SetSpacing((4.0, 4.0, 4.0))
    grid.SetOrigin((-50.0, -42.0, -34.0))
    grid.SetDirection(ct.GetDirection())
    spect = sitk.Resample(sitk.SmoothingRecursiveGaussian(activity_image, 4.0), grid, sitk.Transform(),
                          sitk.sitkLinear, 0.0)
    counts = rng.poisson(np.maximum(sitk.GetArrayFromImage(spect), 0) * 20.0).astype(np.float32)
    noisy = sitk.GetImageFromArray(counts)
    noisy.CopyInformation(spect)
    return noisy, ct, truth_image


@pytest.fixture(scope="session")
def tiny_case():
    return make_tiny_case()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture()
def random_model():
    from FCMSegmentationLib.modelfile import random_model as make

    return make("cpu", seed=0)
