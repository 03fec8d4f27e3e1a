#!/usr/bin/env python3
"""Interactive refinement benchmark: speed against Slicer's Grow-from-seeds, and accuracy with a
simulated user on domain-shifted phantoms.

Speed: one procedural phantom resampled onto a 128^3 grid of 3 mm voxels (so the refinement session's
working grid is exactly 128^3); the same strokes for both tools; medians of ``--repeats`` runs of
GrowCut initialisation, GrowCut incremental update after more strokes, our session construction (the
feature cache, once per image) and our default refine round.

Accuracy: held-out phantoms from ``SHIFTED_RANGES`` (PSF, counts and lesion contrast outside the training
ranges; a third CT-derived), round 0 = the pretrained model, then ``--rounds`` rounds in which the
simulated user (``benchlib/simulated_user.py``) paints ``--strokes`` short strokes inside the largest
wrongly-labelled regions and the session refines on all strokes so far. Grow-from-seeds is run on the same
cumulative strokes (and, for reference, in its own workflow: seeds first, then corrections of its own errors).
The same is repeated on the accuracy benchmark's first ``--in-range-cases`` cases (training ranges: images
like those the model was trained for), and on its first ``--confirming-cases`` cases with a user who also
confirms: each round one of the strokes goes inside the largest lesion the result already labels right.

Writes the ``bench_refine`` section of <docs>/benchmarks.md, <docs>/figures/refine_dice_per_round.png and
<docs>/results/bench_refine.json.

    python scripts/bench_refine.py             # full run (6 shifted + 6 in-range cases, 3 rounds, 128^3)
    python scripts/bench_refine.py --quick     # smoke test (1 + 1 case, 1 round, 64^3, to out/bench-quick)
"""
import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from benchlib import classical  # noqa: E402
from benchlib.common import (  # noqa: E402
    ACCURACY_SEED_OFFSETS, CLASSES, SHIFTED_SEED_OFFSETS, add_model_run_arguments, command_line, docs_folder,
    fmt_mean_sd, held_out_plan, load_benchmark_model, machine_line, markdown_table, mean_sd, read_real_ct,
    relative_to_docs, save_figure, write_json, write_section,
)
from benchlib.simulated_user import SEEDS_PER_CLASS, codes_image, paint_strokes, seed_strokes  # noqa: E402
from benchlib.speed_case import SPEED_SEED_OFFSET, speed_case  # noqa: E402

SECTION = "bench_refine"
SHIFTED_SEED_OFFSET, SHIFTED_CT_SEED_OFFSET = SHIFTED_SEED_OFFSETS
CORRECTS, CONFIRMS = "corrects", "confirms"  # the simulated users: strokes on errors only, or one confirming
GAIN_TARGET = 0.10
REGRESSION_LIMIT = 0.01
GROWCUT_MARGIN = 0.10

OURS = "FCMSegmentation refine"
GC_SAME = "GrowCut, same strokes"
GC_OWN = "GrowCut, own workflow"
SERIES = (OURS, GC_SAME, GC_OWN)


def dice(labels, truth) -> Dict[str, float]:
    from FCMSegmentationLib.metrics import evaluate_images

    return evaluate_images(labels, truth)


def as_array(image) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image)


# ----------------------------------------------------------------------------------------------- speed

def median(values: List[float]) -> float:
    return float(statistics.median(values))


def run_speed(model, seed: int, size: int, repeats: int, correction_strokes: int, progress) -> Dict[str, Any]:
    from FCMSegmentationLib.refinement import RefinementSession

    spect, ct, truth = speed_case(seed, size, 3.0)
    truth_array = as_array(truth)
    rng = np.random.default_rng(seed)
    body = classical.on_reference(ct, truth, default=-1000.0) > classical.BODY_HU
    first, first_strokes = seed_strokes(truth_array, truth.GetSpacing(), SEEDS_PER_CLASS, rng, class_allowed={0: body})
    timings: Dict[str, List[float]] = {k: [] for k in ("growcut_init", "growcut_update", "session", "refine",
                                                       "refine_more", "intensity")}
    working_shape = None
    second = None
    steps = None
    for repeat in range(repeats):
        start = time.perf_counter()
        session = RefinementSession(spect, ct, model, device="auto")
        timings["session"].append(time.perf_counter() - start)
        working_shape = tuple(int(n) for n in session.case.features.shape[1:])
        start = time.perf_counter()
        refined = session.refine(codes_image(first, truth))
        timings["refine"].append(time.perf_counter() - start)
        steps = session.settings.steps
        if second is None:  # the user's next strokes, on the errors left after the first round
            more, _ = paint_strokes(truth_array, as_array(refined.labels), truth.GetSpacing(), correction_strokes,
                                    rng, painted_codes=first)
            second = np.where(more > 0, more, first).astype(np.uint8)
        start = time.perf_counter()
        session.refine(codes_image(second, truth))
        timings["refine_more"].append(time.perf_counter() - start)

        start = time.perf_counter()
        intensity = classical.growcut_intensity(spect, ct, truth)
        timings["intensity"].append(time.perf_counter() - start)
        growcut = classical.GrowCut(intensity, truth)
        growcut.segment(first)
        timings["growcut_init"].append(growcut.last_seconds)
        growcut.segment(second)
        timings["growcut_update"].append(growcut.last_seconds)
        del session, growcut
        progress.update(1)
    return {
        "seed": seed, "grid": [size] * 3, "spacing_mm": 3.0, "working_grid_zyx": working_shape,
        "repeats": repeats, "refine_steps": steps,
        "strokes_first": int(len(first_strokes)), "painted_voxels_first": int((first > 0).sum()),
        "painted_voxels_second": int((second > 0).sum()),
        "seconds": {k: [round(v, 4) for v in values] for k, values in timings.items()},
        "median_seconds": {k: round(median(values), 4) for k, values in timings.items() if values},
    }


# -------------------------------------------------------------------------------------------- accuracy

def case_plans(shifted: int, in_range: int, have_ct: bool, confirming: int = 0) -> List[Dict[str, Any]]:
    """The accuracy cases: ``shifted`` phantoms from ``SHIFTED_RANGES``, then the first ``in_range`` cases
    of the accuracy benchmark (training ranges, the same seeds), then its first ``confirming`` cases again
    for the user who also confirms; each entry names its ``ranges`` and its ``user``."""
    plan = [dict(entry, ranges="shifted", user=CORRECTS)
            for entry in held_out_plan(shifted, have_ct, (SHIFTED_SEED_OFFSET, SHIFTED_CT_SEED_OFFSET))]
    plan += [dict(entry, ranges="training", user=CORRECTS)
             for entry in held_out_plan(in_range, have_ct, ACCURACY_SEED_OFFSETS)]
    return plan + [dict(entry, ranges="training", user=CONFIRMS)
                   for entry in held_out_plan(confirming, have_ct, ACCURACY_SEED_OFFSETS)]


def run_accuracy_case(entry: Dict[str, Any], model, real_ct, real_labels, rounds: int, strokes_per_round: int,
                      quick: bool) -> Dict[str, Any]:
    from FCMSegmentationLib.phantoms import SHIFTED_RANGES, TRAINING_RANGES, generate_phantom
    from FCMSegmentationLib.preprocessing import LESION
    from FCMSegmentationLib.refinement import RefinementSession

    ranges = SHIFTED_RANGES if entry["ranges"] == "shifted" else TRAINING_RANGES
    if quick:
        ranges = dataclasses.replace(ranges, field_width_mm=(260.0, 280.0), field_length_mm=(90.0, 110.0),
                                     ct_spacing_mm=(3.0, 3.0), ct_slice_mm=(3.0, 3.0))
    if entry["kind"] == "ct":
        phantom = generate_phantom(entry["seed"], kind="ct", ranges=ranges, ct=real_ct, bone_labels=real_labels)
    else:
        phantom = generate_phantom(entry["seed"], kind="procedural", ranges=ranges)
    spect, ct, truth = phantom.spect, phantom.ct, phantom.truth
    truth_array = as_array(truth)
    spacing = truth.GetSpacing()
    fov = classical.spect_field_of_view(spect, truth)
    body = classical.on_reference(ct, truth, default=-1000.0) > classical.BODY_HU
    rng = np.random.default_rng(entry["seed"])

    start = time.perf_counter()
    session = RefinementSession(spect, ct, model, device="auto")
    session_seconds = time.perf_counter() - start
    initial = session.segment().labels
    prediction = as_array(initial)
    intensity = classical.growcut_intensity(spect, ct, truth)
    growcut_same = classical.GrowCut(intensity, truth)
    growcut_own = classical.GrowCut(intensity, truth)
    # GrowCut's own workflow starts from seeds of every class (no model to start from)
    own_codes, _ = seed_strokes(truth_array, spacing, SEEDS_PER_CLASS, np.random.default_rng(entry["seed"] + 1),
                                allowed=fov, class_allowed={0: body})
    own_prediction = as_array(growcut_own.segment(own_codes))

    history: List[Dict[str, Any]] = [{
        "round": 0, OURS: dice(initial, truth), GC_SAME: None,
        GC_OWN: dice(classical.labels_image(own_prediction, truth), truth),
        "strokes": 0, "painted_voxels": 0, "refine_seconds": None,
    }]
    codes = np.zeros(truth_array.shape, np.uint8)
    stroke_log: List[Dict[str, Any]] = []
    confirms = entry["user"] == CONFIRMS
    for number in range(1, rounds + 1):
        new, strokes = paint_strokes(truth_array, prediction, spacing, strokes_per_round - int(confirms), rng,
                                     painted_codes=codes, allowed=fov)
        codes = np.where(new > 0, new, codes).astype(np.uint8)
        if confirms:
            new, confirming = paint_strokes(truth_array, prediction, spacing, 1, rng, painted_codes=codes,
                                            allowed=fov, classes=(LESION,), confirming=True)
            if not confirming:  # no lesion labelled right yet: that stroke goes on an error instead
                new, confirming = paint_strokes(truth_array, prediction, spacing, 1, rng, painted_codes=codes,
                                                allowed=fov)
            codes = np.where(new > 0, new, codes).astype(np.uint8)
            strokes += confirming
        stroke_log += [dict(s.as_dict(), round=number) for s in strokes]
        start = time.perf_counter()
        if (codes > 0).any():
            result = session.refine(codes_image(codes, truth))
            prediction = as_array(result.labels)
        refine_seconds = time.perf_counter() - start
        ours = dice(classical.labels_image(prediction, truth), truth)
        same = dice(growcut_same.segment(codes), truth) if (codes > 0).any() else None
        more, _ = paint_strokes(truth_array, own_prediction, spacing, strokes_per_round, rng,
                                painted_codes=own_codes, allowed=fov)
        own_codes = np.where(more > 0, more, own_codes).astype(np.uint8)
        own_prediction = as_array(growcut_own.segment(own_codes))
        history.append({
            "round": number, OURS: ours, GC_SAME: same,
            GC_OWN: dice(classical.labels_image(own_prediction, truth), truth),
            "strokes": len(strokes), "painted_voxels": int((codes > 0).sum()),
            "refine_seconds": round(refine_seconds, 3),
            "growcut_same_seconds": round(growcut_same.last_seconds, 3) if same is not None else None,
        })
    return {
        "kind": entry["kind"], "seed": entry["seed"], "ranges": entry["ranges"], "user": entry["user"],
        "session_seconds": round(session_seconds, 2),
        "truth_voxels": {"bone": int((truth_array == 1).sum()), "lesion": int((truth_array == 2).sum())},
        "params": {k: phantom.params.get(k) for k in ("psf_fwhm_mm", "count_density", "total_counts")},
        "rounds": history, "strokes": stroke_log,
    }


def summarise_rounds(cases: List[Dict[str, Any]], rounds: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for series in SERIES:
        out[series] = []
        for number in range(rounds + 1):
            values = [c["rounds"][number][series] for c in cases]
            out[series].append({name: mean_sd(v[name] for v in values if v is not None) for name in CLASSES})
    return out


def criteria(summary: Dict[str, Any], rounds: int) -> Dict[str, Any]:
    start = {name: summary[OURS][0][name]["mean"] for name in CLASSES}
    end = {name: summary[OURS][rounds][name]["mean"] for name in CLASSES}
    defined = [n for n in CLASSES if start[n] is not None]
    worst = min(defined, key=lambda n: start[n]) if defined else None
    gain = None if worst is None or end[worst] is None else end[worst] - start[worst]
    changes = {n: (None if start[n] is None or end[n] is None else end[n] - start[n]) for n in CLASSES}
    result = {
        "worst_class": worst, "start": start, "end": end, "gain_on_worst": gain,
        "met_gain": gain is not None and gain >= GAIN_TARGET,
        "changes": changes,
        "met_no_regression": all(c is not None and c >= -REGRESSION_LIMIT for c in changes.values()),
    }
    for series, key in ((GC_SAME, "vs_growcut_same"), (GC_OWN, "vs_growcut_own")):
        margins = {}
        for n in CLASSES:
            other = summary[series][rounds][n]["mean"]
            margins[n] = None if other is None or end[n] is None else end[n] - other
        result[key] = {"margins": margins,
                       "met": all(m is not None and m >= GROWCUT_MARGIN for m in margins.values())}
    return result


def dice_figure(summary: Dict[str, Any], rounds: int, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    styles = {OURS: ("-o", "#1f77b4"), GC_SAME: ("--s", "#ff7f0e"), GC_OWN: (":^", "#2ca02c")}
    for axis, name in zip(axes, CLASSES):
        for series in SERIES:
            points = [(r, s[name]["mean"], s[name]["sd"]) for r, s in enumerate(summary[series])
                      if s[name]["mean"] is not None]
            if not points:
                continue
            r, m, sd = (np.array(v, dtype=float) for v in zip(*points))
            marker, colour = styles[series]
            axis.errorbar(r + (0.04 * SERIES.index(series) - 0.04), m, yerr=sd, fmt=marker, color=colour,
                          capsize=3, label=series)
        axis.set_title(f"{name} Dice")
        axis.set_xlabel("round (0 = pretrained model; strokes added each round)")
        axis.set_xticks(range(rounds + 1))
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("Dice (mean ± sd over cases)")
    axes[1].legend(fontsize=8, loc="best")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)
    return path


def cases_label(cases: List[Dict[str, Any]]) -> str:
    return f"{len(cases)} case{'' if len(cases) == 1 else 's'}"


def round_table(summary: Dict[str, Any], cases: List[Dict[str, Any]], rounds: int) -> str:
    """Markdown: per round, each series' per-class Dice (mean ± sd), new strokes per case, refine seconds."""
    rows = []
    for number in range(rounds + 1):
        row = [str(number)]
        for series in SERIES:
            for name in CLASSES:
                stats = summary[series][number][name]
                row.append(fmt_mean_sd(stats) if stats["n"] else "—")
        row.append(f"{np.mean([c['rounds'][number]['strokes'] for c in cases]):.1f}")
        seconds = [c["rounds"][number]["refine_seconds"] for c in cases]
        seconds = [value for value in seconds if value is not None]
        row.append(f"{np.median(seconds):.1f}" if seconds else "—")
        rows.append(row)
    short = {series: series.replace("FCMSegmentation ", "ours: ").replace("GrowCut, ", "GrowCut ") for series in SERIES}
    header = ["round"] + [f"{short[series]} {c}" for series in SERIES for c in CLASSES]
    return markdown_table(header + ["new strokes / case", "refine s (median)"], rows)


def in_range_part(block: Dict[str, Any], rounds: int, strokes: int, confirming: bool = False) -> List[str]:
    """The report's subsection on the training-range phantoms (the accuracy benchmark's first cases), with
    the user who corrects or (``confirming``) the one who also confirms."""
    cases, summary = block["cases"], block["summary"]
    ours = summary[OURS]
    change = ", ".join(f"{name} {ours[0][name]['mean']:.3f} → {ours[rounds][name]['mean']:.3f}" for name in CLASSES
                       if ours[0][name]["mean"] is not None and ours[rounds][name]["mean"] is not None)
    user = (f"A user who also confirms: each round {strokes - 1} strokes on errors as before and 1 inside the "
            "largest lesion region the result already labels right (`paint_strokes(..., confirming=True)`; on "
            "an error instead while no lesion is labelled right), as people also paint over what is right; "
            "rounds and tools as before" if confirming else
            f"Same user ({strokes} strokes per round), rounds and tools as on the shifted phantoms")
    title = "a user who also confirms" if confirming else "the same simulated user"
    return [
        f"### Accuracy with {title} on training-range phantoms ({cases_label(cases)})",
        "",
        f"Cases: the first {sum(c['kind'] == 'procedural' for c in cases)} procedural and "
        f"{sum(c['kind'] == 'ct' for c in cases)} CT-derived cases of the accuracy benchmark above (the same "
        "seeds, training ranges): images like those the model was trained for, rather than the shifted ones. "
        f"{user}. Ours, round 0 → round {rounds}: {change}.",
        "",
        round_table(summary, cases, rounds),
        "",
    ]


def report(docs: Path, data: Dict[str, Any], figure: Path, json_path: Path) -> str:
    speed, summary, crit, rounds = data["speed"], data["summary"], data["criteria"], data["rounds"]
    med = speed["median_seconds"]
    n = speed["grid"][0]
    speed_rows = [
        ["Grow-from-seeds: first run (initialisation)", f"{med['growcut_init']:.2f}", "not measured (no GPU lent)"],
        ["Grow-from-seeds: update after adding strokes (incremental)", f"{med['growcut_update']:.2f}",
         "not measured (no GPU lent)"],
        ["FCMSegmentation: session construction (feature cache, once per image)", f"{med['session']:.2f}",
         "not measured (no GPU lent)"],
        ["FCMSegmentation: refine round (default settings)", f"{med['refine']:.2f}", "not measured (no GPU lent)"],
        ["FCMSegmentation: refine round after adding strokes", f"{med['refine_more']:.2f}",
         "not measured (no GPU lent)"],
    ]
    def yes(flag: bool) -> str:
        return "**met**" if flag else "**not met**"

    def signed(value) -> str:
        return "n/a" if value is None else f"{value:+.3f}"

    criteria_rows = [
        [f"Dice rises >= {GAIN_TARGET:.2f} on the class the pretrained model did worst on ({crit['worst_class']})",
         signed(crit["gain_on_worst"]), yes(crit["met_gain"])],
        [f"no class regresses by more than {REGRESSION_LIMIT:.2f}",
         ", ".join(f"{k} {signed(v)}" for k, v in crit["changes"].items()), yes(crit["met_no_regression"])],
        [f"beats Grow-from-seeds given the same cumulative strokes by >= {GROWCUT_MARGIN:.2f} per class",
         ", ".join(f"{k} {signed(v)}" for k, v in crit["vs_growcut_same"]["margins"].items()),
         yes(crit["vs_growcut_same"]["met"])],
        [f"(reference) beats Grow-from-seeds in its own workflow by >= {GROWCUT_MARGIN:.2f} per class",
         ", ".join(f"{k} {signed(v)}" for k, v in crit["vs_growcut_own"]["margins"].items()),
         yes(crit["vs_growcut_own"]["met"])],
    ]
    case_rows = []
    for case in data["cases"]:
        first, last = case["rounds"][0][OURS], case["rounds"][-1][OURS]
        same = case["rounds"][-1][GC_SAME] or {"bone": float("nan"), "lesion": float("nan")}

        def f(v: float) -> str:
            return "—" if v != v else f"{v:.2f}"

        case_rows.append([f"{case['kind']} {case['seed']}", case["params"].get("psf_fwhm_mm"),
                          case["params"].get("count_density"), case["truth_voxels"]["lesion"],
                          f"{f(first['bone'])} → {f(last['bone'])}", f"{f(first['lesion'])} → {f(last['lesion'])}",
                          f"{f(same['bone'])} / {f(same['lesion'])}", case["session_seconds"]])
    parts = [
        "## Interactive refinement (`scripts/bench_refine.py`)",
        "",
        f"Machine: {data['machine']}. Model: {data['model']}.",
        "",
        f"Rerun: `{data['command']}` (about {data['total_seconds'] / 60:.0f} min here).",
        "",
        f"### Speed ({n}³ SPECT/CT)",
        "",
        f"How the {n}³ volume is made: procedural phantom seed {speed['seed']} (training ranges), CT, SPECT and "
        f"truth resampled onto a {n}³ grid of 3 mm voxels centred on the CT (CT padded with −1000 HU, SPECT "
        "with 0): the SPECT covers the whole cube, so the session's working grid (the model's 3 mm) is exactly "
        f"{'×'.join(str(v) for v in speed['working_grid_zyx'])} (checked). Both tools get the same strokes on "
        f"that grid: first {speed['strokes_first']} seed strokes ({SEEDS_PER_CLASS} per class, "
        f"{speed['painted_voxels_first']} voxels), then corrections added on the errors left by our first "
        f"round ({speed['painted_voxels_second']} voxels in all). Medians of {speed['repeats']} repeats; "
        f"refine = `RefinementSession.refine` with default `RefineSettings` ({speed['refine_steps']} steps, "
        "at most; the head and the stroke-local offsets; includes producing the labels on the output grid); "
        "GrowCut = `vtkImageGrowCutSegment` "
        f"on the SPECT/CT intensity (building that intensity took a further {med['intensity']:.2f} s).",
        "",
        markdown_table(["step", "CPU seconds (median)", "GPU"], speed_rows),
        "",
        f"### Accuracy with a simulated user on domain-shifted phantoms ({cases_label(data['cases'])})",
        "",
        f"Cases: held-out phantoms from `SHIFTED_RANGES` (PSF FWHM 18–24 mm, 10–40 counts/ml, lesion contrast "
        "1.2–1.6× bone: outside the training ranges) — "
        f"{sum(c['kind'] == 'procedural' for c in data['cases'])} procedural (seeds `BENCHMARK_SEED_BASE + "
        f"{SHIFTED_SEED_OFFSET} + i`) and {sum(c['kind'] == 'ct' for c in data['cases'])} CT-derived (seeds "
        f"`BENCHMARK_SEED_BASE + {SHIFTED_CT_SEED_OFFSET} + i`). Round 0 is the pretrained model. In each of "
        f"{rounds} rounds the simulated user (`scripts/benchlib/simulated_user.py`) paints {data['strokes_per_round']} "
        "strokes — 5–15 mm lines, 3 voxels thick, on one axial/coronal/sagittal plane of the CT grid — "
        "inside the largest wrongly-labelled connected regions (components of truth = t & prediction = p, "
        "painted with the true class t; round-robin over bone and lesion, the class with the lower Dice first; "
        "at the region's deepest point, along its main axis, stopping at its edge; only inside the SPECT field, "
        "where refinement can act); then `refine` runs with default settings on all strokes so far (each "
        "round continues from the previous one). Both tools keep painted voxels as painted. Dice on the "
        "truth's (CT) grid; lesion Dice undefined "
        "(no lesion in truth and none predicted) is skipped in the means. "
        f"**{GC_SAME}**: `vtkImageGrowCutSegment` on the same cumulative strokes (one filter per case, so "
        "later rounds are incremental updates, as in Slicer). Its first rounds usually lack seeds of some "
        f"class — the strokes correct the model's errors, they are not a seeding. **{GC_OWN}** (for reference, "
        f"not a criterion): how one would use Grow-from-seeds alone — round 0 = {SEEDS_PER_CLASS} seed strokes per "
        "class (background inside the body), then each round the same number of strokes on GrowCut's own "
        "errors.",
        "",
        "Per round, per-class Dice (mean ± sd over cases):",
        "",
        round_table(summary, data["cases"], rounds),
        "",
        "Criteria of the issue (means over cases, round 0 vs round " + str(rounds) + "):",
        "",
        markdown_table(["criterion", "value", "result"], criteria_rows),
        "",
        f"![Dice per round]({relative_to_docs(figure, docs)})",
        "",
        "Per case (ours: round 0 → round " + str(rounds) + f"; GrowCut same strokes at round {rounds}; session = "
        "construction seconds):",
        "",
        markdown_table(["case", "PSF mm", "counts/ml", "lesion voxels", "bone", "lesion", "GrowCut bone / lesion",
                        "session s"], case_rows),
        "",
        *(in_range_part(data["in_range"], rounds, data["strokes_per_round"]) if data["in_range"]["cases"] else []),
        *(in_range_part(data["confirming"], rounds, data["strokes_per_round"], confirming=True)
          if data["confirming"]["cases"] else []),
        f"Raw results: `{relative_to_docs(json_path, docs)}`.",
    ]
    return "\n".join(parts) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=None,
                        help="shifted cases for accuracy (default 6; 1 with --quick)")
    parser.add_argument("--in-range-cases", type=int, default=None,
                        help="training-range cases (the accuracy benchmark's first ones; default 6, 1 with --quick)")
    parser.add_argument("--confirming-cases", type=int, default=None,
                        help="training-range cases for the user who also confirms (default 6, 1 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="refinement rounds (default 3; 1 with --quick)")
    parser.add_argument("--strokes", type=int, default=4, help="strokes per round (default 4)")
    parser.add_argument("--speed-size", type=int, default=None,
                        help="side of the speed volume (default 128; 64 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="speed repeats (default 3; 1 with --quick)")
    add_model_run_arguments(parser)
    args = parser.parse_args(argv)

    import torch
    from tqdm import tqdm

    from FCMSegmentationLib.training import BENCHMARK_SEED_BASE

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    quick = args.quick
    cases_count = args.cases if args.cases is not None else (1 if quick else 6)
    in_range_count = args.in_range_cases if args.in_range_cases is not None else (1 if quick else 6)
    confirming_count = args.confirming_cases if args.confirming_cases is not None else (1 if quick else 6)
    rounds = args.rounds if args.rounds is not None else (1 if quick else 3)
    size = args.speed_size if args.speed_size is not None else (64 if quick else 128)
    repeats = args.repeats if args.repeats is not None else (1 if quick else 3)
    docs = docs_folder(args)
    model, model_description = load_benchmark_model(args.model, args.random_weights)
    real_ct, real_labels = read_real_ct()
    started = time.perf_counter()

    with tqdm(total=repeats, desc=f"speed {size}^3", unit="repeat") as bar:
        speed = run_speed(model, BENCHMARK_SEED_BASE + SPEED_SEED_OFFSET, size, repeats, args.strokes, bar)
    if tuple(speed["working_grid_zyx"]) != (size,) * 3:
        print(f"warning: working grid is {speed['working_grid_zyx']}, not {size}^3", file=sys.stderr)
    tqdm.write(f"speed medians (s): {speed['median_seconds']}")

    plan = case_plans(cases_count, in_range_count, real_ct is not None, confirming_count)
    done = []
    for entry in tqdm(plan, desc="refine cases", unit="case"):
        done.append(run_accuracy_case(entry, model, real_ct, real_labels, rounds, args.strokes, quick))
        trace = " -> ".join(f"{r[OURS]['bone']:.2f}/{r[OURS]['lesion']:.2f}" for r in done[-1]["rounds"])
        tqdm.write(f"{entry['ranges']} {entry['kind']} {entry['seed']} (user {entry['user']}): bone/lesion {trace}")
    cases = [case for case in done if case["ranges"] == "shifted"]
    in_range = [case for case in done if case["ranges"] == "training" and case["user"] == CORRECTS]
    confirming = [case for case in done if case["user"] == CONFIRMS]
    summary = summarise_rounds(cases, rounds)
    data = {
        "benchmark": SECTION, "machine": machine_line(), "command": command_line(), "model": model_description,
        "quick": quick, "rounds": rounds, "strokes_per_round": args.strokes,
        "total_seconds": time.perf_counter() - started,
        "speed": speed, "summary": summary, "criteria": criteria(summary, rounds), "cases": cases,
        "in_range": {"summary": summarise_rounds(in_range, rounds) if in_range else None, "cases": in_range},
        "confirming": {"summary": summarise_rounds(confirming, rounds) if confirming else None, "cases": confirming},
    }
    json_path = write_json(docs / "results" / "bench_refine.json", data)
    figure = dice_figure(summary, rounds, docs / "figures" / "refine_dice_per_round.png",
                         f"Refinement with a simulated user, {len(cases)} domain-shifted phantoms "
                         f"({args.strokes} strokes per round)")
    write_section(docs / "benchmarks.md", SECTION, report(docs, data, figure, json_path))
    crit = data["criteria"]
    print(f"speed: GrowCut init {speed['median_seconds']['growcut_init']:.2f} s, update "
          f"{speed['median_seconds']['growcut_update']:.2f} s; session {speed['median_seconds']['session']:.2f} s, "
          f"refine {speed['median_seconds']['refine']:.2f} s")
    print(f"gain on worst class ({crit['worst_class']}): {crit['gain_on_worst']} -> "
          f"{'met' if crit['met_gain'] else 'NOT met'}; "
          f"no regression: {'met' if crit['met_no_regression'] else 'NOT met'} {crit['changes']}; "
          f"vs GrowCut same strokes: {'met' if crit['vs_growcut_same']['met'] else 'NOT met'} "
          f"{crit['vs_growcut_same']['margins']}")
    print(f"wrote {docs / 'benchmarks.md'} ({SECTION}), {figure}, {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
