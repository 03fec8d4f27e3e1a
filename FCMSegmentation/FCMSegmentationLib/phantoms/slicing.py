"""Thick-slice CT: a phantom's CT as a scanner reconstructing thicker slices would give it.

The CT of a SPECT/CT is often a low-dose scan reconstructed at 3-5 mm slices, while the phantoms' CTs
have slices of about 2 mm. A thick slice averages the tissue over its thickness: thin bone across the
slices (a rib's edge, an end plate) loses contrast and is smeared over the slice. :func:`thick_slice_ct`
imitates that in image space: each new slice is the mean of the CT over ``thickness_mm`` along the slice
axis (a box profile), slices are ``thickness_mm`` apart, and the in-plane grid, direction and first
slice's centre stay as they were. The truth is not touched: it stays on the original grid.
"""
from typing import Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import InputError

#: slice thicknesses (mm) that training draws from (``fcmseg train --thick-ct``)
THICK_SLICE_MM: Tuple[float, float] = (3.0, 6.0)
#: the random stream of a phantom's slice thickness, apart from the phantom's own draws from its seed
THICK_SLICE_STREAM = 7


def thick_slice_ct(ct: sitk.Image, thickness_mm: float) -> sitk.Image:
    """``ct`` (3-D) re-sliced at ``thickness_mm`` (>= its slice spacing): box-averaged along the slice
    axis over the thickness, sampled every ``thickness_mm``; same pixel type, in-plane grid and
    direction, first slice centred where the original's was, last slice inside the original extent."""
    spacing = ct.GetSpacing()
    if ct.GetDimension() != 3:
        raise InputError("thick slices need a 3-D CT")
    if not thickness_mm >= spacing[2]:
        raise InputError(f"slice thickness {thickness_mm} mm is below the CT's slice spacing {spacing[2]:.3g} mm")
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    averaged = ndimage.uniform_filter1d(hu, size=max(1, int(round(thickness_mm / spacing[2]))), axis=0,
                                        mode="nearest")
    source = sitk.GetImageFromArray(averaged)
    source.CopyInformation(ct)
    size = list(ct.GetSize())
    size[2] = int(np.floor((size[2] - 1) * spacing[2] / thickness_mm)) + 1
    thick = sitk.Resample(source, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(),
                          (spacing[0], spacing[1], float(thickness_mm)), ct.GetDirection(), -1000.0,
                          sitk.sitkFloat32)
    if ct.GetPixelID() != sitk.sitkFloat32:
        thick = sitk.Cast(sitk.Round(thick), ct.GetPixelID())
    return thick


def random_thick_slice_ct(ct: sitk.Image, seed: int, probability: float) -> sitk.Image:
    """The phantom of ``seed``'s CT re-sliced, with ``probability``, at a thickness drawn uniformly from
    :data:`THICK_SLICE_MM` (never thinner than its own slices); else ``ct`` itself. The draw has a
    stream of its own, so the phantom of a seed is the same with and without it."""
    if probability <= 0.0:
        return ct
    rng = np.random.default_rng((seed, THICK_SLICE_STREAM))
    if rng.random() >= probability:
        return ct
    thickness = max(float(rng.uniform(*THICK_SLICE_MM)), ct.GetSpacing()[2])
    return thick_slice_ct(ct, thickness)
