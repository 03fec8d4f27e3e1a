"""Decision calibration: per-class weights on a model's memberships before the argmax that gives labels,
and the lesion core that narrows each lesion found (:mod:`lesion_core`).

The label loss weights class k by ``N_k ** -class_balance``, so the rare classes (bone, lesion) weigh more
in training than background, and a plain argmax of the network's memberships over-calls them: bone
edges one CT voxel too wide, bone hot spots called lesion. Weighting the memberships before the argmax
(a prior correction) undoes that without retraining. The weights are chosen on calibration phantoms
(seeds from :data:`CALIBRATION_SEED_BASE`, never used in training, validation or the benchmarks) as the
grid point with the largest mean bone Dice + mean lesion Dice, separately for SPECT+CT and SPECT-only
input, together with the lesion core and, when asked, the working grid: the weights decide which faint
lesions are found, the core how far a found lesion reaches, and a working grid finer than the one the
network learnt on draws small bones and lesions closer to the CT's detail, if the network tolerates the
change of scale. All three are written into the model card, where :func:`segmentation.segment` and
refinement sessions read them. The memberships themselves, the soft output, are unchanged. The lesion
filter still picks its candidates by the plain argmax on the working grid; the lesion core and the cortex
completion (:mod:`cortex`) follow the weighted decision, and calibration scores the labels with them, as
segmentation gives them.
"""
from dataclasses import replace
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError, require_probability, require_voxel_size
from .metrics import evaluate_images
from .modelfile import LESION_CORE_KEY, WORKING_SPACING_KEY, LoadedModel, decision_key
from .preprocessing import array_to_image, dense_bone_mask, geometry_of
from .progress import ProgressCallback, report
from .validation import INPUTS, plan_phantoms, validation_plan

CALIBRATION_SEED_BASE = 6_000_000
BACKGROUND_WEIGHTS = (1.0, 1.25, 1.5, 2.0)
LESION_WEIGHTS = (1.0, 0.7, 0.5, 0.35, 0.25)
LESION_CORES = (0.0, 0.5, 0.6, 0.7)
OBJECTIVE = "mean bone Dice + mean lesion Dice over the calibration phantoms"

Weights = Tuple[float, float, float]
Decision = Tuple[Weights, float]  # (background, bone, lesion) weights, lesion core


def decision_grid(background: Sequence[float] = BACKGROUND_WEIGHTS, lesion: Sequence[float] = LESION_WEIGHTS,
                  cores: Sequence[float] = LESION_CORES) -> List[Decision]:
    """Candidate decisions: (background, bone, lesion) weights, bone staying 1 (only ratios matter), each
    with every lesion core. The first entry is the plain argmax when all three sequences start with 1, 1
    and 0, so that ties keep the uncalibrated decision."""
    return [((float(b), 1.0, float(les)), float(core)) for b in background for les in lesion for core in cores]


def decision_dice(memberships: sitk.Image, truth: sitk.Image, grid: Sequence[Decision],
                  dense_bone: Optional[np.ndarray] = None) -> np.ndarray:
    """Dice (G, 2: bone, lesion) of the labels each decision of ``grid`` gives from ``memberships``
    (a K-component image, as :class:`segmentation.SegmentationResult` holds), scored as the benchmarks
    score: on the truth's grid. dense_bone: the case's dense CT on the memberships' grid (as
    :class:`preprocessing.WorkingCase` holds it), to label as segmentation does, with the cortex completed."""
    from .segmentation import decide_labels

    stacked = np.moveaxis(sitk.GetArrayFromImage(memberships), -1, 0)
    reference = geometry_of(memberships)
    rows = []
    for weights, core in grid:
        labels = decide_labels(stacked, weights, dense_bone, core)
        dice = evaluate_images(array_to_image(labels, reference), truth)
        rows.append((dice["bone"], dice["lesion"]))
    return np.asarray(rows, dtype=float)


def _class_means(scores: np.ndarray) -> np.ndarray:
    """(G, 2) means over cases of (cases, G, 2) Dice, skipping undefined (NaN) cases; 0 if none defined."""
    defined = np.isfinite(scores)
    totals = np.where(defined, scores, 0.0).sum(axis=0)
    return np.where(defined.any(axis=0), totals / np.maximum(defined.sum(axis=0), 1), 0.0)


def choose_decision(scores: np.ndarray, grid: Sequence[Decision]) -> Tuple[Decision, Dict[str, Any]]:
    """The decision of ``grid`` with the largest mean bone + mean lesion Dice over ``scores`` (cases, G, 2);
    the first best on ties. Returns it and a summary: the chosen and the first (reference) entry's means."""
    if scores.ndim != 3 or scores.shape[1:] != (len(grid), 2) or not len(scores):
        raise InputError(f"calibration scores must be (cases, {len(grid)}, 2), got {scores.shape}")
    means = _class_means(scores)
    best = int(np.argmax(means.sum(axis=1)))
    (weights, core), (reference_weights, reference_core) = grid[best], grid[0]
    summary = {
        "weights": list(weights), "lesion_core": core,
        "bone_dice": float(means[best, 0]), "lesion_dice": float(means[best, 1]),
        "reference_weights": list(reference_weights), "reference_lesion_core": reference_core,
        "reference_bone_dice": float(means[0, 0]), "reference_lesion_dice": float(means[0, 1]),
        "cases": int(len(scores)),
    }
    return grid[best], summary


def choose_working_spacing(scores: Mapping[float, np.ndarray], grid: Sequence[Decision]
                           ) -> Tuple[float, Decision, Dict[str, Any]]:
    """The working grid (voxel size in mm), and its decision of ``grid``, with the largest mean bone + mean
    lesion Dice; ``scores`` maps each grid tried to its (cases, G, 2) Dice, the first tried winning ties.
    Returns them and :func:`choose_decision`'s summary for that grid, with the best of every grid tried."""
    choices = {mm: choose_decision(per_grid, grid) for mm, per_grid in scores.items()}
    best = max(choices, key=lambda mm: choices[mm][1]["bone_dice"] + choices[mm][1]["lesion_dice"])
    decision, summary = choices[best]
    summary = dict(summary, working_spacing_mm=best, by_working_spacing={
        f"{mm:g}": {"bone_dice": chosen["bone_dice"], "lesion_dice": chosen["lesion_dice"]}
        for mm, (_, chosen) in choices.items()})
    return best, decision, summary


def calibrate(
    model: LoadedModel,
    procedural: int,
    ct_derived: int = 0,
    ct: Optional[sitk.Image] = None,
    bone_labels: Optional[sitk.Image] = None,
    device: str = "cpu",
    grid: Optional[Sequence[Decision]] = None,
    inputs: Iterable[str] = INPUTS,
    osem_spect: float = 0.0,
    working_spacings: Sequence[float] = (),
    progress: Optional[ProgressCallback] = None,
) -> Dict[str, Any]:
    """The card's ``decision`` entry for ``model``: weights per input (``spect_ct``, ``spect_only``), a
    lesion core per input (``lesion_core``) and a working grid per input (``working_spacing_mm``), chosen on
    ``procedural`` + ``ct_derived`` calibration phantoms, and a ``calibration`` record of how.

    The phantoms are segmented once per input and working grid with the model's lesion filter on; every
    grid point is then scored on the same memberships. ct, bone_labels: the real CT for CT-derived
    phantoms. osem_spect: the probability that a phantom's SPECT is reconstructed by OS-EM from noisy
    projections instead of having image-space noise (``phantoms/reconstruction.py``), so that the decision
    suits reconstructed images. working_spacings: the working grids' voxel sizes (mm) to choose among
    (default: only the one the network learnt on, ``model.spacing_mm``); each costs a segmentation per
    phantom and input.
    """
    from .phantoms import TRAINING_RANGES
    from .segmentation import segment

    require_probability(osem_spect, "OS-EM SPECT")
    spacings = list(dict.fromkeys(float(mm) for mm in working_spacings)) or [model.spacing_mm]
    for mm in spacings:
        require_voxel_size(mm, "a working grid's voxel size")
    grid = list(grid or decision_grid())
    inputs = list(inputs)
    unknown = set(inputs) - set(INPUTS)
    if unknown or not inputs:
        raise InputError(f"calibration inputs must be among {list(INPUTS)}, got {inputs}")
    plan = validation_plan(procedural, ct_derived, seed_base=CALIBRATION_SEED_BASE)
    if not plan:
        raise InputError("calibration needs at least one phantom")
    scores: Dict[str, Dict[float, List[np.ndarray]]] = {used: {mm: [] for mm in spacings} for used in inputs}
    ranges = replace(TRAINING_RANGES, osem_probability=osem_spect)
    for number, (kind, seed, phantom) in enumerate(plan_phantoms(plan, ct, bone_labels, ranges), start=1):
        for used in inputs:
            with_ct = used == "spect_ct"
            dense_bone = dense_bone_mask(phantom.ct) if with_ct else None
            for mm in spacings:
                result = segment(phantom.spect, phantom.ct if with_ct else None, model, device=device,
                                 working_spacing_mm=mm)
                scores[used][mm].append(decision_dice(result.memberships, phantom.truth, grid, dense_bone))
        report(progress, number / len(plan), f"calibration phantom {number}/{len(plan)} ({kind}, seed {seed})")
    decision: Dict[str, Any] = {LESION_CORE_KEY: {}, WORKING_SPACING_KEY: {}}
    record: Dict[str, Any] = {"procedural": procedural, "ct_derived": ct_derived, "seed_base": CALIBRATION_SEED_BASE,
                              "osem_spect": osem_spect, "objective": OBJECTIVE, "working_spacings_mm": spacings,
                              "grid": [[list(w), core] for w, core in grid]}
    for used in inputs:
        key = decision_key(used == "spect_ct")
        per_grid = {mm: np.stack(entries) for mm, entries in scores[used].items()}
        mm, (weights, core), record[used] = choose_working_spacing(per_grid, grid)
        decision[key] = list(weights)
        decision[LESION_CORE_KEY][key] = core
        decision[WORKING_SPACING_KEY][key] = mm
    decision["calibration"] = record
    return decision


def write_calibrated_model(
    model_path: Optional[str],
    out: str,
    procedural: int,
    ct_derived: int = 0,
    ct_path: Optional[str] = None,
    bone_labels_path: Optional[str] = None,
    device: str = "cpu",
    osem_spect: float = 0.0,
    working_spacings: Sequence[float] = (),
    progress: Optional[ProgressCallback] = None,
) -> Dict[str, Any]:
    """``fcmseg calibrate``: calibrate the model at ``model_path`` (default: the shipped one) and write a
    copy with the same weights and the ``decision`` entry in its card to ``out`` (atomically). Returns
    the written card."""
    from .imageio import read_image
    from .inference import resolve_device
    from .modelfile import load_model, save_model

    if (ct_path is None) != (bone_labels_path is None):
        raise InputError("--from-ct and --bone-labels go together: give both (or neither, with --ct-phantoms 0)")
    if ct_derived and ct_path is None:
        raise InputError("CT-derived calibration phantoms (--ct-phantoms) need --from-ct and --bone-labels")
    torch_device = resolve_device(device)
    model = load_model(model_path, torch_device)
    report(progress, 0.0, "reading CT and labels" if ct_path else "calibrating")
    ct = read_image(ct_path) if ct_path else None
    labels = read_image(bone_labels_path) if bone_labels_path else None
    decision = calibrate(model, procedural, ct_derived, ct, labels, device=str(torch_device), osem_spect=osem_spect,
                         working_spacings=working_spacings, progress=progress)
    return save_model(out, model.network, dict(model.card, decision=decision))
