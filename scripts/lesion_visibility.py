#!/usr/bin/env python3
"""Which lesions the model finds, by how plainly the SPECT shows them and whether the CT shows them.

For every lesion a validation phantom records, its contrast-to-noise ratio in the SPECT against the bone
around it (``benchlib.lesions.lesion_visibility``; the phantom's misregistration undone, so that blur and
noise are measured, not position), whether its CT changes (sclerotic or lytic, or none), and whether the
model on SPECT+CT finds it (any predicted lesion voxel touches it). Also two ceilings per case: the lesion
Dice of a method that delineated exactly the lesions the SPECT shows (contrast-to-noise at least 1) and
missed every other, and of one that also found every lesion the CT shows.

Writes the ``lesion_visibility`` section of docs/benchmarks.md (or ``--report``) and
results/lesion_visibility.json beside it.

    python scripts/lesion_visibility.py --threads 2                      # 48 procedural + 24 CT-derived
    python scripts/lesion_visibility.py --procedural 2 --ct-derived 0 --report out/vis.md   # quick look
"""
import argparse
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from benchlib.common import (  # noqa: E402
    REPO, command_line, load_benchmark_model, machine_line, markdown_table, mean_sd, fmt_mean_sd, real_ct_for,
    write_json, write_section,
)
from benchlib.lesions import LESION, RING_MM, lesion_visibility, lesions_found, recorded_components  # noqa: E402
from benchlib.misregistration_bound import spect_where_the_truth_is  # noqa: E402

SECTION = "lesion_visibility"
VISIBLE = 1.0  # contrast-to-noise at which a lesion stands out of its bone's noise
#: contrast-to-noise bins (lower bound inclusive), as rows
BINS = ((-math.inf, 0.0, "below 0 (colder than its bone)"), (0.0, 0.5, "0–0.5"), (0.5, 1.0, "0.5–1"),
        (1.0, 2.0, "1–2"), (2.0, math.inf, "2 or more"))
KINDS = ("hot, CT unchanged", "hot, CT sclerotic or lytic", "cold")


def appearance(lesion: Mapping[str, Any]) -> str:
    """The column of a recorded lesion: cold, or hot with or without a CT change."""
    if lesion["cold"]:
        return KINDS[2]
    return KINDS[0] if lesion.get("ct_change", "none") == "none" else KINDS[1]


def shows(lesion: Mapping[str, Any], visibility: float) -> Dict[str, bool]:
    """Whether the SPECT shows a lesion (hot: contrast-to-noise at least :data:`VISIBLE`, cold: at most
    -:data:`VISIBLE`; an unmeasurable one counts as shown) and whether the SPECT or the CT does."""
    signed = -visibility if lesion["cold"] else visibility
    spect = not signed < VISIBLE  # NaN (no ring to compare with) counts as shown: the ceiling stays a ceiling
    return {"spect": spect, "spect_or_ct": spect or lesion.get("ct_change", "none") != "none"}


def ceiling_dice(components: np.ndarray, ids: Sequence[int], shown: Sequence[bool], truth_lesion: np.ndarray) -> float:
    """Lesion Dice of delineating exactly the true lesions whose recorded lesion is ``shown`` (NaN without lesions)."""
    kept = np.isin(components, [component for component, keep in zip(ids, shown) if keep and component])
    total = int(truth_lesion.sum())
    return 2.0 * int(kept.sum()) / (int(kept.sum()) + total) if total else math.nan


def score_phantom(kind: str, seed: int, phantom, model) -> Dict[str, Any]:
    """Per recorded lesion: appearance, visibility, found; and the case's two ceilings and the model's Dice."""
    import SimpleITK as sitk

    from FCMSegmentationLib.metrics import evaluate_images
    from FCMSegmentationLib.segmentation import segment

    lesions = phantom.params.get("lesions") or []
    result = segment(phantom.spect, phantom.ct, model, device="auto")
    visibility = lesion_visibility(lesions, phantom.truth,
                                   spect_where_the_truth_is(phantom.spect, phantom.truth, phantom.params))
    found = lesions_found(lesions, phantom.truth, result.labels)
    components, ids = recorded_components(lesions, phantom.truth)
    truth_lesion = sitk.GetArrayFromImage(phantom.truth) == LESION
    shown = [shows(lesion, v) for lesion, v in zip(lesions, visibility)]
    return {
        "kind": kind, "seed": seed, "model_lesion_dice": evaluate_images(result.labels, phantom.truth)["lesion"],
        "ceiling_spect": ceiling_dice(components, ids, [s["spect"] for s in shown], truth_lesion),
        "ceiling_spect_or_ct": ceiling_dice(components, ids, [s["spect_or_ct"] for s in shown], truth_lesion),
        "lesions": [{"appearance": appearance(lesion), "diameter_mm": lesion["diameter_mm"],
                     "contrast": lesion["contrast"], "visibility": v, "shown_by_spect": s["spect"], "found": hit}
                    for lesion, v, s, hit in zip(lesions, visibility, shown, found)],
    }


def found_table(cases: Sequence[Mapping[str, Any]]) -> List[List[str]]:
    """Rows of "found / lesions" by visibility bin (rows) and appearance (columns), then a total row."""
    lesions = [lesion for case in cases for lesion in case["lesions"]]

    def row(name: str, chosen: List[Mapping[str, Any]]) -> List[str]:
        by_kind = [[lesion for lesion in chosen if lesion["appearance"] == kind] for kind in KINDS] + [chosen]
        return [name] + [f"{sum(lesion['found'] for lesion in part)} / {len(part)}" if part else "—"
                         for part in by_kind]

    rows = [row(name, [lesion for lesion in lesions if low <= lesion["visibility"] < high])
            for low, high, name in BINS]
    unmeasured = [lesion for lesion in lesions if not np.isfinite(lesion["visibility"])]
    if unmeasured:
        rows.append(row("not measurable (too little bone around)", unmeasured))
    rows.append(row("all", lesions))
    return rows


def report(cases: Sequence[Mapping[str, Any]], described: str, procedural: int, ct_derived: int) -> str:
    lesions = [lesion for case in cases for lesion in case["lesions"]]
    faint = [lesion for lesion in lesions if not lesion["shown_by_spect"]]
    with_lesions = [case for case in cases if math.isfinite(case["ceiling_spect"])]
    falsely_called = sum(1 for case in cases if case not in with_lesions and case["model_lesion_dice"] == 0.0)
    dice = {name: mean_sd(case[name] for case in with_lesions)
            for name in ("model_lesion_dice", "ceiling_spect", "ceiling_spect_or_ct")}
    return "\n".join([
        "## Which lesions the SPECT shows (`scripts/lesion_visibility.py`)",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Machine: {machine_line()}. Model: {described}.",
        "",
        f"Phantoms: {procedural} procedural and {ct_derived} CT-derived validation phantoms (seeds of "
        "`validation.py`, never used in training or in the accuracy benchmark), training ranges. For each "
        "lesion a phantom records: its contrast-to-noise ratio in the SPECT, (mean uptake in the lesion − mean "
        f"in its bone {RING_MM[0]:g}–{RING_MM[1]:g} mm away) / sd of that bone, measured with the "
        "phantom's SPECT/CT misregistration undone, so that it says how far blur and noise hide the lesion "
        "(`benchlib/lesions.py`, `lesion_visibility`); whether the phantom changed its CT (sclerotic: denser, "
        "lytic: 20–90 HU); and whether the model on SPECT+CT finds it (a predicted lesion voxel touches it).",
        "",
        f"Lesions found / lesions, by contrast-to-noise in the SPECT (rows) and appearance (columns). "
        f"{len(faint)} of {len(lesions)} lesions stand less than one noise sd out of their bone "
        f"(hot ones above, cold ones below it):",
        "",
        markdown_table(["contrast-to-noise in the SPECT"] + list(KINDS) + ["all"], found_table(cases)),
        "",
        f"Lesion Dice per case, mean ± sd over the {len(with_lesions)} cases with lesions (of the "
        f"{len(cases) - len(with_lesions)} without, the model calls a lesion in {falsely_called}): the model, and "
        f"two ceilings, not methods: every lesion standing at least {VISIBLE:g} noise sd out of its bone "
        "delineated exactly and every other missed (what the SPECT shows), and the same plus every lesion whose "
        "CT changed (what the SPECT or the CT shows):",
        "",
        markdown_table(["", "lesion Dice"], [
            ["model (SPECT+CT)", fmt_mean_sd(dice["model_lesion_dice"], show_n=True)],
            ["ceiling: lesions the SPECT shows", fmt_mean_sd(dice["ceiling_spect"], show_n=True)],
            ["ceiling: lesions the SPECT or the CT shows", fmt_mean_sd(dice["ceiling_spect_or_ct"], show_n=True)],
        ]),
        "",
        "Raw results: `results/lesion_visibility.json`.",
    ])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model file (default: the shipped model)")
    parser.add_argument("--procedural", type=int, default=48, help="procedural validation phantoms")
    parser.add_argument("--ct-derived", type=int, default=24, help="CT-derived validation phantoms (real CT)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    import torch

    from FCMSegmentationLib.cli import progress_bar
    from FCMSegmentationLib.validation import plan_phantoms, validation_plan

    if args.threads:
        torch.set_num_threads(args.threads)
    real_ct, real_labels = real_ct_for(parser, args.ct_derived)
    model, described = load_benchmark_model(args.model)
    plan = validation_plan(args.procedural, args.ct_derived)
    cases = []
    with progress_bar("validation phantoms") as progress:
        for number, (kind, seed, phantom) in enumerate(plan_phantoms(plan, real_ct, real_labels), start=1):
            cases.append(score_phantom(kind, seed, phantom, model))
            progress(number / len(plan), f"{kind} {seed}")
    body = report(cases, described, args.procedural, args.ct_derived)
    write_section(args.report, SECTION, body)
    write_json(args.report.parent / "results" / f"{SECTION}.json", {"cases": cases})
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
