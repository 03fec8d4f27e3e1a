"""Where the SPECT shows a phantom's truth: the truth moved by the phantom's simulated SPECT/CT misregistration."""
from typing import Any, Mapping

import SimpleITK as sitk

from FCMSegmentationLib.phantoms import misregistration_transform


def truth_where_spect_shows_it(truth: sitk.Image, params: Mapping[str, Any]) -> sitk.Image:
    """The truth label map on its own grid, moved (nearest neighbour) by the misregistration recorded in the
    phantom's ``params``: where the uptake of each class sits in the SPECT. A method that delineated every
    lesion exactly where its uptake is, free of blur and noise, would score this against the truth (not a
    method: it says how much the misregistration alone costs a lesion found by its uptake)."""
    return sitk.Resample(truth, truth, misregistration_transform(params), sitk.sitkNearestNeighbor, 0,
                         truth.GetPixelID())


def spect_where_the_truth_is(spect: sitk.Image, truth: sitk.Image, params: Mapping[str, Any]) -> sitk.Image:
    """The SPECT linearly resampled onto the truth's grid with the phantom's misregistration undone: each
    voxel's uptake where the truth's anatomy is (the inverse of :func:`truth_where_spect_shows_it`)."""
    return sitk.Resample(spect, truth, misregistration_transform(params).GetInverse(), sitk.sitkLinear, 0.0,
                         sitk.sitkFloat32)
