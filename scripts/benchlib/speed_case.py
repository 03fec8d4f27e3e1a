"""The volume that Segment and Refine are timed on (refinement benchmark, inference benchmark): a procedural
phantom resampled onto a cube of 3 mm voxels, so that the working grid is that cube."""
import numpy as np

from .common import ENGINE  # noqa: F401  (puts the engine on sys.path)

SPEED_SEED_OFFSET = 300  # added to the benchmark seed base


def cube_grid(reference, size: int, spacing_mm: float):
    """An empty ``size``^3 image of ``spacing_mm`` voxels, identity direction, centred on ``reference``."""
    import SimpleITK as sitk

    centre = np.array(reference.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2.0 for n in reference.GetSize()]))
    grid = sitk.Image([size] * 3, sitk.sitkUInt8)
    grid.SetSpacing([spacing_mm] * 3)
    grid.SetOrigin((centre - spacing_mm * (size - 1) / 2.0).tolist())
    return grid


def speed_case(seed: int, size: int, spacing_mm: float):
    """(spect, ct, truth) of a procedural phantom resampled onto a ``size``^3 grid of ``spacing_mm`` voxels
    (CT padded with -1000 HU, SPECT with 0 counts, truth by nearest neighbour). The SPECT covers the whole
    cube, so the refinement session's working grid (3 mm, the CT's direction) is that cube."""
    import SimpleITK as sitk

    from FCMSegmentationLib.phantoms import generate_phantom

    phantom = generate_phantom(seed, kind="procedural")
    grid = cube_grid(phantom.ct, size, spacing_mm)

    def resample(image, interpolator, default, pixel):
        return sitk.Resample(image, grid, sitk.Transform(), interpolator, default, pixel)

    ct = resample(phantom.ct, sitk.sitkLinear, -1000.0, sitk.sitkInt16)
    spect = resample(phantom.spect, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    truth = resample(phantom.truth, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return spect, ct, truth
