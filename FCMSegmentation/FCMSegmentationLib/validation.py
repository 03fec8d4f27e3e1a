"""Held-out validation: per-case Dice of models on validation phantoms, and paired model comparison.

Validation phantoms use their own seeds, never used in training or in the benchmarks: procedural ones
``VALIDATION_SEED_BASE + i`` and CT-derived ones ``VALIDATION_SEED_BASE + CT_DERIVED_SEED_OFFSET + i``.
Several models are scored on the same phantoms, so that they can be compared case by case: per-case
lesion Dice varies far more between phantoms (sd about 0.25) than between two similar models, and a
paired difference cancels the phantom-to-phantom part.
"""
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .modelfile import LoadedModel
from .progress import ProgressCallback, report

if TYPE_CHECKING:  # phantoms is imported only when phantoms are made
    from .phantoms import PhantomCase, SimulationRanges

VALIDATION_SEED_BASE = 5_000_000
CT_DERIVED_SEED_OFFSET = 100
ORIENTATION_AXES = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}  # letter -> patient axis
INPUTS = ("spect_ct", "spect_only")
CLASSES = ("bone", "lesion")


@dataclass(frozen=True)
class CaseScore:
    """Dice of one model on one validation phantom, with one input (``spect_ct`` or ``spect_only``).

    Dice is NaN for a class absent from both the truth and the prediction.
    """

    kind: str
    seed: int
    input: str
    bone: float
    lesion: float


def validation_plan(procedural: int, ct_derived: int = 0,
                    seed_base: int = VALIDATION_SEED_BASE) -> List[Tuple[str, int]]:
    """(kind, seed) of the validation phantoms: ``procedural`` procedural ones (seeds ``seed_base + i``), then
    ``ct_derived`` ones (seeds ``seed_base + CT_DERIVED_SEED_OFFSET + i``)."""
    if procedural < 0 or ct_derived < 0:
        raise InputError("the numbers of validation phantoms cannot be negative")
    if max(procedural, ct_derived) > CT_DERIVED_SEED_OFFSET:
        raise InputError(f"at most {CT_DERIVED_SEED_OFFSET} phantoms of each kind (their seeds would overlap)")
    plan = [("procedural", seed_base + i) for i in range(procedural)]
    plan += [("ct", seed_base + CT_DERIVED_SEED_OFFSET + i) for i in range(ct_derived)]
    return plan


def plan_phantoms(
    plan: Sequence[Tuple[str, int]],
    ct: Optional[sitk.Image] = None,
    bone_labels: Optional[sitk.Image] = None,
    ranges: Optional["SimulationRanges"] = None,
) -> Iterator[Tuple[str, int, "PhantomCase"]]:
    """(kind, seed, phantom) for each entry of ``plan``, each phantom made when it is reached.

    ct, bone_labels: the real CT and its labels that CT-derived phantoms are built on (needed only if
    ``plan`` has any). ranges: simulation ranges (default: the training ranges).
    """
    from .phantoms import TRAINING_RANGES, generate_phantom

    if any(kind == "ct" for kind, _ in plan) and (ct is None or bone_labels is None):
        raise InputError("CT-derived phantoms need the real CT and its bone labels")
    ranges = ranges or TRAINING_RANGES
    for kind, seed in plan:
        yield kind, seed, (generate_phantom(seed, kind="ct", ct=ct, bone_labels=bone_labels, ranges=ranges)
                           if kind == "ct" else generate_phantom(seed, kind="procedural", ranges=ranges))


def is_orientation_code(code: str) -> bool:
    """True for a DICOM orientation code such as ``"RAS"``: one letter of each of R/L, A/P and S/I."""
    return len(code) == 3 and sorted(ORIENTATION_AXES[letter] for letter in code
                                     if letter in ORIENTATION_AXES) == [0, 1, 2]


def score_models(
    models: Mapping[str, LoadedModel],
    plan: Sequence[Tuple[str, int]],
    ct: Optional[sitk.Image] = None,
    bone_labels: Optional[sitk.Image] = None,
    device: str = "cpu",
    inputs: Sequence[str] = INPUTS,
    ranges: Optional["SimulationRanges"] = None,
    progress: Optional[ProgressCallback] = None,
    keep_lesions_outside_bone: bool = False,
    complete_cortex_edge: bool = True,
    align: bool = True,
    ct_slice_mm: Optional[float] = None,
    stored_as: Optional[str] = None,
    drop_faint_lesions: bool = False,
    working_spacing_mm: Optional[float] = None,
) -> Dict[str, List[CaseScore]]:
    """Per-case Dice of every model in ``models`` on the phantoms of ``plan``, each phantom made once.

    ct, bone_labels: the real CT and its labels that CT-derived phantoms are built on (needed only if
    ``plan`` has any). ranges: simulation ranges (default: the training ranges). keep_lesions_outside_bone,
    complete_cortex_edge, align, drop_faint_lesions: as in :func:`segmentation.segment` (to measure what the
    lesion filter, the cortex completion, the SPECT/CT alignment and dropping faint lesions do).
    ct_slice_mm: give the models each phantom's CT re-sliced at this thickness
    (:func:`phantoms.slicing.thick_slice_ct`); the truth stays as it is.
    stored_as: give the models each phantom's SPECT and CT with their index axes stored in this DICOM
    orientation (e.g. ``"RAS"``, as NIfTI files often are): the same voxels at the same physical points,
    axes permuted and flipped (:func:`SimpleITK.DICOMOrient`); the truth stays as it is.
    working_spacing_mm: run the models on a working grid of this voxel size instead of their training one.
    """
    from .metrics import evaluate_images
    from .phantoms.slicing import thick_slice_ct
    from .segmentation import segment

    unknown = set(inputs) - set(INPUTS)
    if unknown:
        raise InputError(f"unknown validation inputs {sorted(unknown)}; use {list(INPUTS)}")
    if stored_as is not None and not is_orientation_code(stored_as):
        raise InputError(f"unknown orientation {stored_as!r}: give one letter of each of R/L, A/P and S/I, "
                         "e.g. 'RAS' or 'LPS'")
    scores: Dict[str, List[CaseScore]] = {name: [] for name in models}
    for number, (kind, seed, phantom) in enumerate(plan_phantoms(plan, ct, bone_labels, ranges), start=1):
        spect_image = phantom.spect if stored_as is None else sitk.DICOMOrient(phantom.spect, stored_as)
        ct_image = phantom.ct if ct_slice_mm is None else thick_slice_ct(phantom.ct, ct_slice_mm)
        if stored_as is not None:
            ct_image = sitk.DICOMOrient(ct_image, stored_as)
        for name, model in models.items():
            for used in inputs:
                result = segment(spect_image, ct_image if used == "spect_ct" else None, model, device=device,
                                 keep_lesions_outside_bone=keep_lesions_outside_bone,
                                 complete_cortex_edge=complete_cortex_edge, align=align,
                                 drop_faint_lesions=drop_faint_lesions, working_spacing_mm=working_spacing_mm)
                dice = evaluate_images(result.labels, phantom.truth)
                scores[name].append(CaseScore(kind, seed, used, dice["bone"], dice["lesion"]))
        report(progress, number / len(plan), f"validation phantom {number}/{len(plan)} ({kind}, seed {seed})")
    return scores


def _nanmean(values: Sequence[float]) -> Optional[float]:
    array = np.asarray(values, dtype=float)
    return float(np.nanmean(array)) if np.isfinite(array).any() else None


def _means(scores: Sequence[CaseScore]) -> Dict[str, Optional[float]]:
    inputs = [used for used in INPUTS if any(score.input == used for score in scores)]
    return {f"{used}_{cls}_dice": _nanmean([getattr(score, cls) for score in scores if score.input == used])
            for used in inputs for cls in CLASSES}


def summarise(scores: Sequence[CaseScore]) -> Dict[str, Any]:
    """Mean Dice per input and class (``spect_ct_bone_dice`` ...): over all cases, then per phantom kind."""
    summary: Dict[str, Any] = _means(scores)
    summary["by_kind"] = {kind: _means([score for score in scores if score.kind == kind])
                          for kind in sorted({score.kind for score in scores})}
    summary["seeds"] = sorted({score.seed for score in scores})
    return summary


def paired_difference(reference: Sequence[float], other: Sequence[float], resamples: int = 2000,
                      seed: int = 0) -> Dict[str, Optional[float]]:
    """Mean of ``other - reference`` over the cases where both are finite, with a 95 % bootstrap interval.

    Returns ``{"mean", "low", "high", "cases"}``; the numbers are None when no case has both values.
    """
    a, b = np.asarray(reference, dtype=float), np.asarray(other, dtype=float)
    if a.shape != b.shape:
        raise InputError(f"paired values must match case by case, got {a.shape} and {b.shape}")
    differences = (b - a)[np.isfinite(a) & np.isfinite(b)]
    if not len(differences):
        return {"mean": None, "low": None, "high": None, "cases": 0}
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), (resamples, len(differences)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(differences.mean()), "low": float(low), "high": float(high), "cases": int(len(differences))}


def compare(scores: Mapping[str, Sequence[CaseScore]], reference: str) -> Dict[str, Dict[str, Any]]:
    """Paired differences of every other model against ``reference``, per input, class and phantom kind.

    Returns ``{model: {"<input>_<class>": {"all": difference, "<kind>": difference, ...}}}``, each
    difference as :func:`paired_difference` gives it. All models must have been scored on the same cases.
    """
    base = scores[reference]
    cases = [(score.kind, score.seed, score.input) for score in base]
    kinds = sorted({score.kind for score in base})
    table: Dict[str, Dict[str, Any]] = {}
    for name, theirs in scores.items():
        if name == reference:
            continue
        if [(score.kind, score.seed, score.input) for score in theirs] != cases:
            raise InputError(f"{name} was scored on other cases than {reference}; score them together")
        table[name] = {}
        for used in [used for used in INPUTS if any(case[2] == used for case in cases)]:
            for cls in CLASSES:
                def values(entries: Sequence[CaseScore], kind: Optional[str] = None) -> List[float]:
                    return [getattr(score, cls) for score in entries
                            if score.input == used and kind in (None, score.kind)]
                entry = {"all": paired_difference(values(base), values(theirs))}
                entry.update({kind: paired_difference(values(base, kind), values(theirs, kind)) for kind in kinds})
                table[name][f"{used}_{cls}"] = entry
    return table
