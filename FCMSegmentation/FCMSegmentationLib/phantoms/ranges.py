"""The random parameters of the phantoms: their ranges, and the draws every generator makes from them.

Every draw comes from one ``numpy.random.default_rng(seed)`` per case, in a fixed order, so a seed gives
the same case everywhere; a change to the order of draws changes every case.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Sequence, Tuple

import numpy as np

from ..errors import InputError

Range = Tuple[float, float]

@dataclass(frozen=True)
class SimulationRanges:
    """The range of every random parameter of the phantoms; values are drawn uniformly unless noted.

    Uptake values are relative to soft tissue (= 1). Lesion contrast is relative to the local bone uptake.
    ``count_density`` is expected counts per ml of unit (soft-tissue) activity before noise, drawn
    log-uniformly; the total counts of a case follow from it and the volume imaged.
    """

    # CT grid and field of view (procedural phantoms; CT-derived ones keep the real field)
    ct_spacing_mm: Range = (1.5, 3.0)  # in-plane
    ct_slice_mm: Range = (1.5, 3.0)
    field_width_mm: Range = (300.0, 400.0)
    field_length_mm: Range = (150.0, 300.0)
    max_ct_voxels: int = 3_500_000
    ct_noise_hu: Range = (5.0, 30.0)
    cortex_hu: Range = (700.0, 1500.0)
    marrow_hu: Range = (150.0, 400.0)
    cortex_thickness_mm: Range = (1.5, 3.0)
    # SPECT imaging
    psf_fwhm_mm: Range = (8.0, 18.0)
    psf_axial_ratio: Range = (0.9, 1.2)  # z FWHM / in-plane FWHM
    spect_spacing_mm: Range = (3.0, 5.0)
    spect_xy_margin_mm: Range = (0.0, 160.0)  # SPECT in-plane field beyond the CT's
    spect_z_coverage: Range = (0.8, 1.0)  # SPECT axial extent / CT axial extent
    count_density: Range = (40.0, 800.0)  # counts per ml of unit activity (log-uniform)
    postfilter_fwhm_mm: Range = (0.0, 8.0)
    scatter_fraction: Range = (0.0, 0.25)
    scatter_fwhm_mm: Range = (40.0, 80.0)
    attenuation_mu_per_mm: Range = (0.0, 0.008)  # uncorrected attenuation-like fall-off with depth
    # OS-EM: share of cases reconstructed from noisy projections instead of image-space noise (reconstruction.py)
    osem_probability: float = 0.0
    osem_views: Range = (60, 120)  # projections over 360 degrees
    osem_subsets: Range = (4, 10)
    osem_iterations: Range = (2, 6)
    osem_resolution_recovery_probability: float = 0.5  # the reconstruction models part of the camera's blur
    osem_psf_model_fraction: Range = (0.5, 0.9)  # that part, as a fraction of the PSF's FWHM
    # uptake
    bone_ratio: Range = (6.0, 14.0)  # bone : soft tissue
    marrow_factor: Range = (0.7, 1.1)  # marrow uptake / cortex uptake
    spine_factor: Range = (1.0, 1.4)  # extra uptake of vertebrae and sacrum
    uptake_heterogeneity: Range = (0.0, 0.25)  # amplitude of a smooth multiplicative field
    fat_uptake: Range = (0.4, 0.8)
    lung_uptake: Range = (0.15, 0.35)
    blood_pool_uptake: Range = (1.0, 1.8)
    bladder_uptake: Range = (5.0, 60.0)
    kidney_uptake: Range = (2.0, 8.0)
    liver_uptake: Range = (0.8, 2.5)
    # lesions
    lesion_count: Tuple[int, int] = (0, 6)  # inclusive
    lesion_diameter_mm: Range = (4.0, 20.0)
    lesion_contrast: Range = (1.5, 6.0)  # hot lesions, x local bone uptake
    cold_lesion_probability: float = 0.15
    cold_lesion_contrast: Range = (0.1, 0.5)
    lesion_ct_change_probability: float = 0.5  # sclerotic or lytic CT appearance
    sclerotic_delta_hu: Range = (200.0, 600.0)
    # SPECT/CT misregistration (rigid)
    misregistration_shift_mm: Range = (0.0, 4.0)
    misregistration_rotation_deg: Range = (0.0, 2.0)

    def validate(self) -> "SimulationRanges":
        """Raise :class:`InputError` if a range is reversed or a value is out of its domain."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                if len(value) != 2 or not value[0] <= value[1]:
                    raise InputError(f"simulation range {f.name}={value!r}: give (low, high) with low <= high")
                if value[0] < 0:
                    raise InputError(f"simulation range {f.name}={value!r}: values must be >= 0")
        for name in ("cold_lesion_probability", "lesion_ct_change_probability", "osem_probability",
                     "osem_resolution_recovery_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"simulation parameter {name} must lie in [0, 1]")
        if self.count_density[0] <= 0 or self.spect_spacing_mm[0] <= 0 or self.ct_spacing_mm[0] <= 0:
            raise InputError("count_density and spacings must be > 0")
        return self

    def as_dict(self) -> Dict[str, Any]:
        """Every range as JSON-ready values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


#: The ranges the model is trained on (the method document's values).
TRAINING_RANGES = SimulationRanges()

#: A domain shift for the refinement benchmark: a blurrier camera (FWHM 18-24 mm, beyond training's 8-18),
#: 4-20x fewer counts (10-40 counts/ml vs 40-800) and faint hot lesions (1.2-1.6x bone, below training's
#: 1.5-6x; no cold ones). Everything else is as in training.
SHIFTED_RANGES = dataclasses.replace(
    TRAINING_RANGES,
    psf_fwhm_mm=(18.0, 24.0),
    count_density=(10.0, 40.0),
    lesion_contrast=(1.2, 1.6),
    lesion_count=(1, 6),
    cold_lesion_probability=0.0,
)



def ranges_name(ranges: SimulationRanges) -> str:
    """'training', 'shifted' or 'custom': which ranges a case was drawn from, for its params."""
    if ranges == TRAINING_RANGES:
        return "training"
    if ranges == SHIFTED_RANGES:
        return "shifted"
    return "custom"


def check_seed(seed: Any) -> int:
    """``seed`` as an int, or :class:`InputError` unless it is a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def uniform(rng: np.random.Generator, r: Sequence[float]) -> float:
    """A uniform draw from ``r = (low, high)``; ``low`` itself (and no draw) when the range is empty."""
    return float(rng.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])


def log_uniform(rng: np.random.Generator, r: Sequence[float]) -> float:
    """A log-uniform draw from ``r = (low, high)``, both > 0; ``low`` (and no draw) when the range is empty."""
    return float(math.exp(rng.uniform(math.log(r[0]), math.log(r[1])))) if r[1] > r[0] else float(r[0])


def rounded(x: float, nd: int = 4) -> float:
    """``x`` as a plain float rounded to ``nd`` decimals, for the JSON params."""
    return float(round(float(x), nd))


def sample_uptakes(rng: np.random.Generator, ranges: SimulationRanges) -> Dict[str, float]:
    """Uptake of every tissue relative to soft tissue (= 1), plus the heterogeneity amplitude."""
    names = ("bone_ratio", "marrow_factor", "spine_factor", "uptake_heterogeneity", "fat_uptake", "lung_uptake",
             "blood_pool_uptake", "bladder_uptake", "kidney_uptake", "liver_uptake")
    return {name: uniform(rng, getattr(ranges, name)) for name in names}
