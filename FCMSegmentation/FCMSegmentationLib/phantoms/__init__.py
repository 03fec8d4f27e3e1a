"""Simulated bone SPECT/CT phantoms with exact labels, for training and benchmarking.

No public labelled bone SPECT/CT exists, so (as the method's paper did with XCAT) the network is trained
on simulations. Two kinds of case are made, both returned as a :class:`PhantomCase`:

* **procedural** (:func:`procedural_phantom`, modules ``torso``, ``skeleton``, ``organs``, ``procedural``):
  a 3-D torso built from analytic shapes, every bone a cortex shell plus marrow.
* **CT-derived** (:func:`ct_derived_phantom`, module ``ct_derived``): a real CT plus a bone label map
  (e.g. TotalSegmentator's), resampled by physical coordinates onto a coarser, randomly cropped (and
  possibly mirrored-index) grid.

Both then get the same activity model and imaging chain (module ``imaging``): activity on the CT grid
(soft tissue 1, bone ``bone_ratio`` x, hot organs, lesions ``contrast`` x the local bone uptake, some
cold) -> Gaussian PSF -> rigid SPECT/CT misregistration and resampling onto the SPECT's own grid ->
attenuation-like fall-off and scatter -> Poisson noise -> optional post-filter; or, for a share of cases
(``osem_probability``), Poisson noise on parallel projections of that image and an OS-EM reconstruction,
some with resolution recovery (module ``reconstruction``).

Conventions: physical coordinates are ITK/DICOM LPS (x to the patient's left, y posterior, z superior);
arrays are SimpleITK (z, y, x). ``truth`` is uint8 (0 background, 1 bone, 2 lesion) on exactly the CT's
grid; lesion voxels are always inside bone. The SPECT is float32 (counts, post-filtered) on its own grid.
Every random draw comes from ``numpy.random.default_rng(seed)``: a seed gives the same case everywhere.

Known simplifications: the camera's blur is a Gaussian of fixed width (no depth-dependent collimator
response) applied to the activity, and the OS-EM projector is parallel-beam; attenuation is a fall-off
with depth below the body surface, not along projection lines; scatter is a broad Gaussian of the
activity; arms, skull and legs below the lesser trochanter are not modelled.
"""
from .case import BACKGROUND, BONE, LESION, ORGAN_CODES, PhantomCase
from .command import PHANTOM_FILES, generate_phantom, phantom_command, write_phantom
from .ct_derived import (
    TOTALSEG_BONE_IDS,
    TOTALSEG_ORGAN_IDS,
    bone_mask_from_totalsegmentator,
    ct_derived_phantom,
)
from .imaging import FWHM_TO_SIGMA, misregistration_transform
from .procedural import procedural_phantom
from .ranges import SHIFTED_RANGES, TRAINING_RANGES, SimulationRanges

__all__ = [
    "BACKGROUND", "BONE", "LESION", "ORGAN_CODES", "PhantomCase", "PHANTOM_FILES", "generate_phantom",
    "phantom_command", "write_phantom", "TOTALSEG_BONE_IDS", "TOTALSEG_ORGAN_IDS", "bone_mask_from_totalsegmentator",
    "ct_derived_phantom", "FWHM_TO_SIGMA", "misregistration_transform", "procedural_phantom", "SHIFTED_RANGES",
    "TRAINING_RANGES", "SimulationRanges",
]
