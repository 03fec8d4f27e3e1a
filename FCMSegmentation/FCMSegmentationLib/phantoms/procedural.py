"""Procedural torso phantoms: analytic anatomy, CT numbers and activity, then the shared imaging chain.

The anatomy: body outline, subcutaneous fat, lungs, heart, liver, kidneys, bladder, bowel gas; vertebrae
with bodies, arches, spinous and transverse processes and disc gaps, sacrum, ribs, sternum, scapulae,
clavicles, iliac wings, pubic/ischial rami, femoral heads and necks. Every bone is a cortex shell plus
marrow. Arms, skull and legs below the lesser trochanter are not modelled.
"""
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .case import ORGAN_CODES, PhantomCase
from .geometry import blank_geometry
from .imaging import Anatomy, finish_case
from .organs import SoftTissues, build_soft_tissues
from .ranges import (
    TRAINING_RANGES,
    SimulationRanges,
    check_seed,
    ranges_name,
    rounded,
    sample_uptakes,
    uniform,
)
from .skeleton import RibCage, Spine, build_spine, paint_pelvis, paint_thorax
from .torso import Field, sample_body_outline, sample_field


def procedural_phantom(
    seed: int,
    ranges: SimulationRanges = TRAINING_RANGES,
    spect_direction: Optional[Sequence[float]] = None,
) -> PhantomCase:
    """A procedural torso phantom (see the module docstring); deterministic in ``seed``.

    ``spect_direction`` (9 numbers, row-major) gives the SPECT grid another direction than the CT's
    (for geometry tests); by default both share the CT's identity direction.
    """
    seed = check_seed(seed)
    ranges.validate()
    rng = np.random.default_rng(seed)
    params: Dict[str, Any] = {"seed": seed, "kind": "procedural", "ranges": ranges_name(ranges)}

    torso = build_torso(rng, ranges, params)
    hu, marrow = _ct_numbers(rng, ranges, torso, params)
    uptakes = sample_uptakes(rng, ranges)
    activity = _activity(uptakes, torso, marrow)

    grid = torso.field.grid
    ct_grid = blank_geometry(grid.shape, grid.sp, [0, 0, 0], np.eye(3).ravel())
    offset = np.array([uniform(rng, (-40, 40)), uniform(rng, (-40, 40)), uniform(rng, (-900, -300))])
    ct_grid.SetOrigin((grid.org + offset).tolist())
    params["ct_origin_mm"] = [rounded(v) for v in ct_grid.GetOrigin()]
    anatomy = Anatomy(ct_grid, hu, activity, torso.bone, torso.body, uptakes)
    return finish_case(rng, anatomy, params, ranges, spect_direction, simulated_ct=True)


@dataclass
class Torso:
    """The procedural anatomy, masks (z, y, x) on the field's grid: bone is clipped to ``inner`` (inside the
    subcutaneous fat), ``spine.mask`` to bone; the soft tissues avoid bone."""

    field: Field
    body: np.ndarray
    inner: np.ndarray
    spine: Spine
    bone: np.ndarray
    cage: RibCage
    tissues: SoftTissues


def build_torso(rng: np.random.Generator, ranges: SimulationRanges, params: Dict[str, Any]) -> Torso:
    """Field, body outline, skeleton and soft tissues, drawn in that order; placements go into ``params``."""
    field = sample_field(rng, ranges, params)
    outline = sample_body_outline(rng, field, params)
    body, inner = outline.masks(field)
    spine = build_spine(rng, field, outline)
    bone = spine.mask.copy()
    paint_pelvis(rng, field, spine, bone)
    cage = paint_thorax(rng, field, spine, bone)
    bone &= inner
    spine.mask &= bone
    if not bone.any():  # cannot happen with the anatomical window used; guard anyway
        raise RuntimeError(f"phantom seed {params.get('seed')}: no bone in the field of view")
    tissues = build_soft_tissues(rng, field, spine, cage, bone, inner, params)
    return Torso(field, body, inner, spine, bone, cage, tissues)


def _ct_numbers(rng: np.random.Generator, ranges: SimulationRanges, torso: Torso,
                params: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    """(HU float32, marrow mask): a value per tissue; bone is a cortex shell of sampled thickness round marrow."""
    grid, bone, body, inner, tissues = torso.field.grid, torso.bone, torso.body, torso.inner, torso.tissues
    cortex_mm = uniform(rng, ranges.cortex_thickness_mm)
    marrow = ndimage.binary_erosion(bone, iterations=max(1, int(round(cortex_mm / grid.sp.max() + 0.25))))
    cortex_hu = uniform(rng, ranges.cortex_hu)
    marrow_hu = uniform(rng, ranges.marrow_hu)
    organs = tissues.organs
    hu = np.full(grid.shape, -1000.0, np.float32)
    hu[body] = uniform(rng, (-120, -80))
    hu[inner] = uniform(rng, (35, 55))
    hu[tissues.lungs] = uniform(rng, (-870, -750))
    hu[tissues.heart] = uniform(rng, (35, 50))
    hu[organs == ORGAN_CODES["liver"]] = uniform(rng, (50, 65))
    hu[organs == ORGAN_CODES["kidney"]] = uniform(rng, (25, 40))
    hu[organs == ORGAN_CODES["bladder"]] = uniform(rng, (0, 15))
    hu[tissues.gas] = uniform(rng, (-950, -850))
    hu[torso.spine.discs & inner & ~bone] = uniform(rng, (70, 100))
    hu[bone] = cortex_hu
    hu[marrow] = marrow_hu
    params.update(cortex_hu=rounded(cortex_hu), marrow_hu=rounded(marrow_hu), cortex_thickness_mm=rounded(cortex_mm))
    return hu, marrow


def _activity(uptakes: Dict[str, float], torso: Torso, marrow: np.ndarray) -> np.ndarray:
    """float32 uptake per tissue, soft tissue = 1."""
    bone, body, inner, tissues = torso.bone, torso.body, torso.inner, torso.tissues
    organs = tissues.organs
    activity = np.zeros(bone.shape, np.float32)
    activity[body] = uptakes["fat_uptake"]
    activity[inner] = 1.0
    activity[tissues.lungs] = uptakes["lung_uptake"]
    activity[tissues.heart] = uptakes["blood_pool_uptake"]
    activity[organs == ORGAN_CODES["liver"]] = uptakes["liver_uptake"]
    activity[organs == ORGAN_CODES["kidney"]] = uptakes["kidney_uptake"]
    activity[organs == ORGAN_CODES["bladder"]] = uptakes["bladder_uptake"]
    activity[tissues.gas] = 0.0
    activity[bone] = uptakes["bone_ratio"]
    activity[marrow] *= uptakes["marrow_factor"]
    activity[torso.spine.mask] *= uptakes["spine_factor"]
    return activity
