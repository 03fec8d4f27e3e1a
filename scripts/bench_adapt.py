#!/usr/bin/env python3
"""Label-free adaptation benchmark: what Adapt changes on images unlike those the model was trained on.

Adapt fine-tunes the network on the user's own image with the unsupervised RFCM loss alone (no strokes,
no labels; :meth:`RefinementSession.adapt`, the Slicer module's *Adapt* button, ``fcmseg adapt``). Cases are
held-out phantoms (seeds never used in training), each segmented with and without its CT, under three
shifts away from the training data, and once as simulated:

* ``shifted``: the refinement benchmark's domain-shifted phantoms (``SHIFTED_RANGES``: PSF 18-24 mm,
  10-40 counts/ml, lesions 1.2-1.6 times bone, all outside the training ranges);
* ``osem``: the accuracy benchmark's cases with their SPECT reconstructed by OS-EM from noisy projections
  (correlated noise) instead of image-space noise;
* ``gain2``: the accuracy benchmark's cases with the normalised SPECT doubled (``benchlib.spect_scale``: as
  if another scanner or reconstruction put bone uptake twice as high after the normalisation);
* ``training``: the accuracy benchmark's cases as simulated, where there is nothing to adapt to: Adapt
  should change nothing there.

For each case: per-class Dice and false lesions after Segment, after one Adapt and after three in a row
(a user pressing it again), and the seconds of each Adapt call. Differences are paired case by case
(after minus Segment), with 95 % bootstrap intervals.

Writes the ``bench_adapt`` section of <docs>/benchmarks.md, <docs>/figures/adapt_dice_change.png and
<docs>/results/bench_adapt.json.

    python scripts/bench_adapt.py            # full run (6 cases per shift, about 20 min on 2 cores)
    python scripts/bench_adapt.py --quick    # smoke test (1 small case per shift, to out/bench-quick)
"""
import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib.common import (  # noqa: E402
    ACCURACY_SEED_OFFSETS, CLASSES, SHIFTED_SEED_OFFSETS, add_model_run_arguments, command_line, docs_folder,
    finite, held_out_plan, load_benchmark_model, machine_line, markdown_table, read_real_ct, relative_to_docs,
    save_figure, write_json, write_section,
)
from benchlib.spect_scale import normalisation_moved  # noqa: E402

SECTION = "bench_adapt"
# name: (what it is, for the report; seed offsets; simulation ranges; OS-EM SPECT; SPECT gain)
SHIFTS = {
    "shifted": ("domain-shifted (PSF 18–24 mm, 10–40 counts/ml, lesions 1.2–1.6× bone)", SHIFTED_SEED_OFFSETS,
                "shifted", False, 1.0),
    "osem": ("SPECT reconstructed by OS-EM", ACCURACY_SEED_OFFSETS, "training", True, 1.0),
    "gain2": ("normalised SPECT doubled (bone uptake twice as high)", ACCURACY_SEED_OFFSETS, "training", False, 2.0),
    "training": ("as simulated (training ranges; nothing to adapt to)", ACCURACY_SEED_OFFSETS, "training", False,
                 1.0),
}
INPUTS = {"spect_ct": "SPECT+CT", "spect_only": "SPECT only"}
STAGES = ("segment", "adapt1", "adapt3")  # Segment, after one Adapt, after three in a row
ADAPTS = {"adapt1": "1 Adapt", "adapt3": "3 Adapts"}


def simulation_ranges(name: str, quick: bool):
    """The phantom ranges of a shift: its own ranges, a smaller and coarser field when ``quick``, every SPECT
    reconstructed by OS-EM for ``osem``."""
    from FCMSegmentationLib.phantoms import SHIFTED_RANGES, TRAINING_RANGES

    _, _, ranges_name, osem, _ = SHIFTS[name]
    ranges = SHIFTED_RANGES if ranges_name == "shifted" else TRAINING_RANGES
    if quick:
        ranges = dataclasses.replace(ranges, field_width_mm=(260.0, 280.0), field_length_mm=(90.0, 110.0),
                                     ct_spacing_mm=(3.0, 3.0), ct_slice_mm=(3.0, 3.0))
    return dataclasses.replace(ranges, osem_probability=1.0) if osem else ranges


def score(labels, truth) -> Dict[str, float]:
    """Bone and lesion Dice and the false lesions of a label image against the truth."""
    from FCMSegmentationLib.metrics import evaluate_images, evaluate_lesions

    dice = evaluate_images(labels, truth)
    return {"bone": dice["bone"], "lesion": dice["lesion"],
            "false_lesions": evaluate_lesions(labels, truth)["false_lesions"]}


def run_input(phantom, with_ct: bool, gain: float, model) -> Dict[str, Any]:
    """Segment, then Adapt three times in a row, on one phantom (with or without its CT)."""
    from FCMSegmentationLib.refinement import RefinementSession

    with normalisation_moved(gain):  # the SPECT is normalised when the session prepares the case
        session = RefinementSession(phantom.spect, phantom.ct if with_ct else None, model, device="cpu")
    stages = {"segment": score(session.segment().labels, phantom.truth)}
    seconds = []
    for number in range(1, 4):
        start = time.perf_counter()
        result = session.adapt()
        seconds.append(round(time.perf_counter() - start, 3))
        if f"adapt{number}" in STAGES:
            stages[f"adapt{number}"] = score(result.labels, phantom.truth)
    return {"stages": stages, "adapt_seconds": seconds}


def run_case(name: str, entry: Dict[str, Any], model, real_ct, real_labels, quick: bool) -> Dict[str, Any]:
    from FCMSegmentationLib.validation import plan_phantoms

    (_, _, phantom), = plan_phantoms([(entry["kind"], entry["seed"])], real_ct, real_labels,
                                     simulation_ranges(name, quick))
    gain = SHIFTS[name][4]
    return {"shift": name, "kind": entry["kind"], "seed": entry["seed"],
            "inputs": {key: run_input(phantom, key == "spect_ct", gain, model) for key in INPUTS}}


def summarise(cases: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per shift and input: mean Dice and false lesions at each stage, paired differences (each Adapt stage
    minus Segment) with 95 % bootstrap intervals, and the median seconds of one Adapt call."""
    import numpy as np

    from FCMSegmentationLib.validation import paired_difference

    summary: Dict[str, Dict[str, Any]] = {}
    for name in SHIFTS:
        for key in INPUTS:
            runs = [case["inputs"][key] for case in cases if case["shift"] == name]
            if runs:
                summary[f"{name}/{key}"] = {
                    "shift": name, "input": key, "cases": len(runs),
                    "mean": {stage: {measure: _mean(_values(runs, stage, measure))
                                     for measure in CLASSES + ("false_lesions",)} for stage in STAGES},
                    "change": {stage: {cls: paired_difference(_values(runs, "segment", cls), _values(runs, stage, cls))
                                       for cls in CLASSES} for stage in ADAPTS},
                    "adapt_seconds": float(np.median([s for run in runs for s in run["adapt_seconds"]])),
                }
    return summary


def _values(runs: Sequence[Dict[str, Any]], stage: str, measure: str) -> List[float]:
    return [run["stages"][stage][measure] for run in runs]


def _mean(values: Sequence[float]) -> Optional[float]:
    kept = finite(values)
    return sum(kept) / len(kept) if kept else None


def _number(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _change(entry: Dict[str, Any]) -> str:
    if entry["mean"] is None:
        return "n/a"
    return f"{entry['mean']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]"


def table(summary: Dict[str, Dict[str, Any]]) -> str:
    rows = []
    for row in summary.values():
        for cls in CLASSES:
            means = row["mean"]
            rows.append([
                row["shift"], INPUTS[row["input"]], row["cases"], cls,
                " → ".join(_number(means[stage][cls]) for stage in STAGES),
                _change(row["change"]["adapt1"][cls]), _change(row["change"]["adapt3"][cls]),
                " → ".join(f"{means[stage]['false_lesions']:.2f}" for stage in STAGES) if cls == "lesion" else "",
                f"{row['adapt_seconds']:.1f}" if cls == "bone" else "",
            ])
    return markdown_table(["shift", "input", "cases", "class", "Dice: Segment → 1 Adapt → 3 Adapts",
                           "change after 1 Adapt [95 % CI]", "after 3 Adapts [95 % CI]",
                           "false lesions per case", "s per Adapt"], rows)


def change_figure(summary: Dict[str, Dict[str, Any]], path: Path, title: str) -> Path:
    """Mean Dice change (with its interval) after one and three Adapt calls, per shift and input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = [f"{row['shift']}, {INPUTS[row['input']]}" for row in summary.values()]
    figure, axes = plt.subplots(1, len(CLASSES), figsize=(10, 0.45 * len(labels) + 1.6), sharey=True)
    for axis, cls in zip(axes, CLASSES):
        for offset, (stage, marker) in zip((-0.15, 0.15), (("adapt1", "o"), ("adapt3", "s"))):
            for y, row in enumerate(summary.values()):
                entry = row["change"][stage][cls]
                if entry["mean"] is None:
                    continue
                axis.errorbar(entry["mean"], y + offset, xerr=[[entry["mean"] - entry["low"]],
                                                               [entry["high"] - entry["mean"]]],
                              fmt=marker, color="C0" if stage == "adapt1" else "C3", capsize=2,
                              label=ADAPTS[stage] if y == 0 else None)
        axis.axvline(0.0, color="grey", linewidth=0.8)
        axis.set_title(f"{cls} Dice change")
        axis.set_xlabel("after − Segment")
        axis.xaxis.set_major_locator(MaxNLocator(5))
    axes[0].set_yticks(range(len(labels)))
    axes[0].set_yticklabels(labels)
    axes[0].invert_yaxis()
    axes[-1].legend(loc="lower right", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    saved = save_figure(figure, path)
    plt.close(figure)
    return saved


def report(docs: Path, data: Dict[str, Any], figure: Path, json_path: Path) -> str:
    shifts = "\n".join(f"- `{name}`: {SHIFTS[name][0]}" for name in SHIFTS)
    return "\n".join([
        "## Label-free adaptation (`scripts/bench_adapt.py`)",
        "",
        f"Machine: {data['machine']}. Command: `{data['command']}`. Model: {data['model']}.",
        "",
        "Adapt fine-tunes the network on the image with the unsupervised RFCM loss alone (no strokes), with "
        "the session's default settings. Held-out phantoms (seeds never used in training), each segmented "
        "with and without its CT:",
        "",
        shifts,
        "",
        "Dice means over the cases (lesion Dice over those where it is defined); changes are paired case by "
        "case (after minus Segment), with 95 % bootstrap intervals; an interval that straddles 0 means these "
        "cases cannot tell Adapt from no Adapt.",
        "",
        table(data["summary"]),
        "",
        f"![Dice change after Adapt]({relative_to_docs(figure, docs)})",
        "",
        f"Raw results: `{relative_to_docs(json_path, docs)}`; {data['total_seconds'] / 60:.1f} min in all.",
    ])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=None,
                        help="cases per shift, a third CT-derived (default 6; 1 with --quick)")
    parser.add_argument("--shifts", nargs="+", choices=list(SHIFTS), default=list(SHIFTS),
                        help="which shifts to run (default all)")
    add_model_run_arguments(parser)
    args = parser.parse_args(argv)

    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    count = args.cases if args.cases is not None else (1 if args.quick else 6)
    docs = docs_folder(args)
    model, model_description = load_benchmark_model(args.model, args.random_weights)
    real_ct, real_labels = read_real_ct()
    started = time.perf_counter()
    plan = [(name, entry) for name in args.shifts
            for entry in held_out_plan(count, real_ct is not None, SHIFTS[name][1])]
    cases = []
    for name, entry in tqdm(plan, desc="adapt cases", unit="case"):
        cases.append(run_case(name, entry, model, real_ct, real_labels, args.quick))
        trace = "; ".join(f"{INPUTS[key]} bone/lesion " + " -> ".join(
            f"{run['stages'][stage]['bone']:.3f}/{run['stages'][stage]['lesion']:.3f}" for stage in STAGES)
            for key, run in cases[-1]["inputs"].items())
        tqdm.write(f"{name} {entry['kind']} {entry['seed']}: {trace}")
    summary = summarise(cases)
    data = {"benchmark": SECTION, "machine": machine_line(), "command": command_line(), "model": model_description,
            "quick": args.quick, "total_seconds": time.perf_counter() - started, "summary": summary, "cases": cases}
    json_path = write_json(docs / "results" / "bench_adapt.json", data)
    figure = change_figure(summary, docs / "figures" / "adapt_dice_change.png",
                           f"Adapt (RFCM alone, no strokes) on {count} held-out phantoms per shift")
    write_section(docs / "benchmarks.md", SECTION, report(docs, data, figure, json_path))
    print(f"wrote {docs / 'benchmarks.md'} ({SECTION}), {figure}, {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
