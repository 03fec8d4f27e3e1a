#!/usr/bin/env python3
"""Which predicted lesions are false, and what dropping the small faint ones does (``faint_lesions.py``).

On calibration phantoms (seeds of ``calibration.py``, never used in training, validation or the benchmarks),
each segmented twice with SPECT+CT, once with its SPECT's image-space noise and once with the SPECT
reconstructed by OS-EM, the model labels as shipped, every lesion kept. Every predicted
lesion (a 26-connected component of the lesion label) is measured: its volume, its peak lesion membership
and whether it touches a true lesion. Each rule "drop a predicted lesion under V ml whose lesion membership
stays below P" is then scored on those components: dropping one takes its voxels out of the lesion class, so
the case's lesion Dice follows from the components' voxel and overlap counts without segmenting again.

Writes the ``faint_lesion_rule`` section of docs/model_selection.md (or ``--report``) and
results/faint_lesion_rule.json beside it.

    python scripts/faint_lesion_rule.py --threads 2                                  # 32 procedural + 16 CT-derived
    python scripts/faint_lesion_rule.py --procedural 1 --ct-derived 0 --report out/rule.md  # quick look
"""
import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from benchlib.common import (  # noqa: E402
    REPO, command_line, load_benchmark_model, machine_line, markdown_table, real_ct_for, write_json, write_section,
)

SECTION = "faint_lesion_rule"
SPECTS = {"image-space noise": 0.0, "OS-EM": 1.0}  # name: OS-EM probability of the phantoms' SPECT
VOLUMES_ML = (0.2, 0.3, 0.5, 1.0, math.inf)
PEAKS = (0.6, 0.7, 0.8, math.inf)
QUANTILES = (10, 50, 90)

Rule = Tuple[float, float]  # (max volume in ml, min peak lesion membership); a component under both goes


def measure_components(labels: np.ndarray, lesion_membership: np.ndarray, truth: np.ndarray,
                       voxel_ml: float) -> List[Dict[str, Any]]:
    """Per predicted lesion of ``labels`` (uint8 (Z, Y, X), 2 for lesion): its voxels, volume (ml), peak of
    ``lesion_membership`` (same shape), voxels overlapping the truth's lesion and whether it touches one."""
    from FCMSegmentationLib.faint_lesions import measure_lesions

    components, voxels, peaks = measure_lesions(labels, lesion_membership)
    overlap = np.bincount(components[truth == 2], minlength=len(voxels) + 1)[1:]
    return [{"voxels": int(n), "volume_ml": float(n * voxel_ml), "peak": float(peak), "overlap": int(o),
             "true": bool(o)} for n, peak, o in zip(voxels, peaks, overlap)]


def measure_case(kind: str, seed: int, spect: str, phantom, model) -> Dict[str, Any]:
    """One phantom segmented with SPECT+CT and every lesion kept: its true lesion voxels and its predicted lesions."""
    import SimpleITK as sitk

    from FCMSegmentationLib.metrics import on_grid_of
    from FCMSegmentationLib.preprocessing import voxel_volume_ml
    from FCMSegmentationLib.segmentation import segment

    result = segment(phantom.spect, phantom.ct, model, device="auto")
    labels = sitk.GetArrayFromImage(on_grid_of(result.labels, phantom.truth))
    lesion_membership = sitk.GetArrayFromImage(sitk.VectorIndexSelectionCast(result.memberships, 2))
    truth = sitk.GetArrayFromImage(phantom.truth)
    return {"kind": kind, "seed": seed, "spect": spect, "true_voxels": int((truth == 2).sum()),
            "predicted": measure_components(labels, lesion_membership, truth, voxel_volume_ml(result.labels))}


def dropped(component: Mapping[str, Any], rule: Optional[Rule]) -> bool:
    from FCMSegmentationLib.faint_lesions import is_faint

    return rule is not None and bool(is_faint(component["volume_ml"], component["peak"], *rule))


def rule_dice(case: Mapping[str, Any], rule: Optional[Rule]) -> float:
    """The case's lesion Dice with the predicted lesions that ``rule`` drops taken out (NaN if undefined)."""
    kept = [c for c in case["predicted"] if not dropped(c, rule)]
    total = sum(c["voxels"] for c in kept) + case["true_voxels"]
    return 2.0 * sum(c["overlap"] for c in kept) / total if total else math.nan


def rule_row(cases: Sequence[Mapping[str, Any]], rule: Optional[Rule]) -> Dict[str, float]:
    """Mean lesion Dice over the cases where it is defined, false and true predicted lesions kept per case,
    and the lesion-free cases left with no lesion."""
    kept = [[c for c in case["predicted"] if not dropped(c, rule)] for case in cases]
    free = [k for case, k in zip(cases, kept) if not case["true_voxels"]]
    dice = [rule_dice(case, rule) for case in cases]
    return {"lesion_dice": float(np.nanmean(dice)) if np.isfinite(dice).any() else math.nan,
            "false_per_case": sum(not c["true"] for k in kept for c in k) / len(cases),
            "true_kept": sum(c["true"] for k in kept for c in k), "lesion_free": len(free),
            "lesion_free_clear": sum(not k for k in free)}


def rules() -> List[Optional[Rule]]:
    """None (every lesion kept), then each volume with each peak, leaving out the rule that drops everything."""
    return [None] + [(v, p) for v in VOLUMES_ML for p in PEAKS if math.isfinite(v) or math.isfinite(p)]


def describe(rule: Optional[Rule]) -> str:
    if rule is None:
        return "none (every lesion kept)"
    parts = ([f"under {rule[0]:g} ml"] if math.isfinite(rule[0]) else []) + (
        [f"peak below {rule[1]:g}"] if math.isfinite(rule[1]) else [])
    return " and ".join(parts)


def quantile_rows(cases: Sequence[Mapping[str, Any]]) -> List[List[str]]:
    """Per SPECT and truth: how many predicted lesions, and the 10th/50th/90th percentiles of volume and peak."""
    rows = []
    for spect in SPECTS:
        for true in (True, False):
            found = [c for case in cases if case["spect"] == spect for c in case["predicted"] if c["true"] == true]
            if not found:
                continue
            volume, peak = (np.percentile([c[key] for c in found], QUANTILES) for key in ("volume_ml", "peak"))
            rows.append([spect, "touches a true lesion" if true else "false", str(len(found)),
                         " / ".join(f"{v:.2f}" for v in volume), " / ".join(f"{p:.2f}" for p in peak)])
    return rows


def report(cases: Sequence[Mapping[str, Any]], described: str, procedural: int, ct_derived: int,
           chosen: Rule) -> str:
    table = []
    for rule in rules():
        row = [describe(rule) + (" **(`--drop-faint-lesions`)**" if rule == chosen else "")]
        for spect in SPECTS:
            scored = rule_row([case for case in cases if case["spect"] == spect], rule)
            row += [f"{scored['lesion_dice']:.3f}", f"{scored['false_per_case']:.2f}", str(scored["true_kept"]),
                    f"{scored['lesion_free_clear']} / {scored['lesion_free']}"]
        table.append(row)
    columns = [f"{spect}: {what}" for spect in SPECTS
               for what in ("lesion Dice", "false lesions per case", "true lesions kept", "lesion-free clear")]
    return "\n".join([
        f"Command: `{command_line()}`",
        "",
        f"Machine: {machine_line()}. Model: {described}.",
        "",
        f"Phantoms: {procedural} procedural and {ct_derived} CT-derived calibration phantoms (seeds of "
        "`calibration.py`), each with SPECT+CT, its SPECT once with image-space noise and once reconstructed by "
        "OS-EM; labels with every lesion kept. Predicted lesions, by whether they touch a true lesion: "
        f"percentiles {'/'.join(map(str, QUANTILES))} of volume (ml) and of peak lesion membership:",
        "",
        markdown_table(["SPECT", "predicted lesion", "count", "volume (ml)", "peak lesion membership"],
                       quantile_rows(cases)),
        "",
        "Dropping a predicted lesion smaller than a volume whose lesion membership stays below a peak: mean lesion "
        "Dice over the cases where it is defined (a lesion-free case left clear has none), false and true "
        "predicted lesions kept, lesion-free cases left clear:",
        "",
        markdown_table(["dropped"] + columns, table),
        "",
        f"Raw results: `results/{SECTION}.json`.",
    ])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model file (default: the shipped model)")
    parser.add_argument("--procedural", type=int, default=32, help="procedural calibration phantoms")
    parser.add_argument("--ct-derived", type=int, default=16, help="CT-derived calibration phantoms (real CT)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "model_selection.md")
    args = parser.parse_args(argv)

    import torch

    from FCMSegmentationLib.calibration import CALIBRATION_SEED_BASE
    from FCMSegmentationLib.cli import progress_bar
    from FCMSegmentationLib.faint_lesions import MAX_VOLUME_ML, MIN_PEAK
    from FCMSegmentationLib.phantoms import TRAINING_RANGES
    from FCMSegmentationLib.validation import plan_phantoms, validation_plan

    if args.threads:
        torch.set_num_threads(args.threads)
    real_ct, real_labels = real_ct_for(parser, args.ct_derived)
    model, described = load_benchmark_model(args.model)
    plan = validation_plan(args.procedural, args.ct_derived, seed_base=CALIBRATION_SEED_BASE)
    cases = []
    for spect, osem in SPECTS.items():
        ranges = replace(TRAINING_RANGES, osem_probability=osem)
        with progress_bar(f"calibration phantoms, {spect}") as progress:
            for number, (kind, seed, phantom) in enumerate(plan_phantoms(plan, real_ct, real_labels, ranges), 1):
                cases.append(measure_case(kind, seed, spect, phantom, model))
                progress(number / len(plan), f"{kind} {seed}")
    body = report(cases, described, args.procedural, args.ct_derived, (MAX_VOLUME_ML, MIN_PEAK))
    write_section(args.report, SECTION, body)
    write_json(args.report.parent / "results" / f"{SECTION}.json", {"cases": cases})
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
