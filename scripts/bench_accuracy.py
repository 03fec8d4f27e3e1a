#!/usr/bin/env python3
"""Accuracy benchmark against classical peers (per-class Dice on held-out phantoms).

Cases: procedural phantoms (seeds BENCHMARK_SEED_BASE + i) and CT-derived ones built on the shared real
CT (seeds BENCHMARK_SEED_BASE + 100 + i), all from the training ranges, seeds never used in training.
Methods, each scored on the truth's (CT) grid:

* the model on SPECT + CT, and (reported separately) on SPECT alone;
* multi-class Otsu on SPECT; CT threshold (> 150 HU, closed, hole-filled) + SPECT Otsu inside bone;
  classical fuzzy C-means on SPECT + CT; Slicer's Grow-from-seeds on a SPECT/CT intensity seeded with a
  few strokes per class from the simulated user (see ``benchlib``);
* for reference, the truth passed through the model's working grid and back: the ceiling of any model
  on that grid.

Writes the ``bench_accuracy`` section of <docs>/benchmarks.md, <docs>/figures/accuracy_dice.png,
<docs>/figures/accuracy_overlay.png and <docs>/results/bench_accuracy.json. With ``--osem`` the same cases
have their SPECT reconstructed by OS-EM from noisy projections (``phantoms/reconstruction.py``) instead of
image-space noise, as a scanner makes it; that run writes the ``bench_accuracy_osem`` section,
accuracy_dice_osem.png and bench_accuracy_osem.json.

    python scripts/bench_accuracy.py                 # full run (12 cases: 8 procedural + 4 CT-derived)
    python scripts/bench_accuracy.py --osem          # the same cases with OS-EM SPECT
    python scripts/bench_accuracy.py --quick         # smoke test (2 small cases, to out/bench-quick)
"""
import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from benchlib import classical  # noqa: E402
from benchlib.common import (  # noqa: E402
    ACCURACY_SEED_OFFSETS, CLASSES, add_model_run_arguments, command_line, docs_folder, fmt_mean_sd, held_out_plan,
    load_benchmark_model, machine_line, markdown_table, mean_sd, read_real_ct, relative_to_docs, save_figure,
    write_json, write_section,
)
from benchlib.grid_bound import truth_through_working_grid  # noqa: E402
from benchlib.misregistration_bound import truth_where_spect_shows_it  # noqa: E402
from benchlib.lesions import lesions_found, sensitivity_by_group  # noqa: E402
from benchlib.simulated_user import SEEDS_PER_CLASS, seed_strokes  # noqa: E402
from FCMSegmentationLib.phantoms import TRAINING_RANGES  # noqa: E402

SECTION = "bench_accuracy"
CT_SEED_OFFSET = ACCURACY_SEED_OFFSETS[1]
TARGETS = {"bone": 0.90, "lesion": 0.70}
MARGIN = 0.15

MODEL = "FCMSegmentation (SPECT+CT)"
MODEL_SPECT_ONLY = "FCMSegmentation (SPECT only)"
MODEL_FAINT_DROPPED = "FCMSegmentation (SPECT+CT, --drop-faint-lesions)"
OTSU = "Otsu on SPECT (2 thresholds)"
OTSU4 = "Otsu on SPECT (4 thresholds, top 2 classes)"
CT_OTSU = "CT > 150 HU + SPECT Otsu in bone"
CT_OTSU_TUNED = "CT > 300 HU + SPECT Otsu in bone"
FCM = "classical FCM on SPECT+CT"
GROWCUT = "Grow-from-seeds (GrowCut)"
GRID_BOUND = "truth through the 3 mm grid (upper bound)"
UPTAKE_BOUND = "truth where the SPECT shows it (misregistration)"
METHODS = (MODEL, MODEL_SPECT_ONLY, MODEL_FAINT_DROPPED, OTSU, OTSU4, CT_OTSU, CT_OTSU_TUNED, FCM, GROWCUT, GRID_BOUND,
           UPTAKE_BOUND)
CLASSICAL = (OTSU, OTSU4, CT_OTSU, CT_OTSU_TUNED, FCM, GROWCUT)
SHORT = {MODEL: "model SPECT+CT", MODEL_SPECT_ONLY: "model SPECT", MODEL_FAINT_DROPPED: "model, faint dropped",
         OTSU: "Otsu-2", OTSU4: "Otsu-4",
         CT_OTSU: "CT150+Otsu", CT_OTSU_TUNED: "CT300+Otsu", FCM: "FCM", GROWCUT: "GrowCut",
         GRID_BOUND: "grid bound", UPTAKE_BOUND: "misregistered truth"}
TICK = {MODEL: "model\nSPECT+CT", MODEL_SPECT_ONLY: "model\nSPECT only",
        MODEL_FAINT_DROPPED: "model, faint\nlesions dropped", OTSU: "Otsu\n2 thresholds",
        OTSU4: "Otsu\n4 thresholds", CT_OTSU: "CT > 150 HU\n+ Otsu", CT_OTSU_TUNED: "CT > 300 HU\n+ Otsu",
        FCM: "classical\nFCM", GROWCUT: "Grow-from-\nseeds", GRID_BOUND: "truth via\n3 mm grid",
        UPTAKE_BOUND: "truth where\nSPECT shows it"}


def timed(function: Callable[[], Any]):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def quick_ranges():
    """Training ranges with a smaller, coarser procedural field (smoke runs only)."""
    return dataclasses.replace(TRAINING_RANGES, field_width_mm=(260.0, 280.0), field_length_mm=(90.0, 110.0),
                               ct_spacing_mm=(3.0, 3.0), ct_slice_mm=(3.0, 3.0))


def case_ranges(kind: str, quick: bool, osem: bool):
    """The ranges a case of ``kind`` is drawn from: the training ranges (a small field for quick procedural
    cases), every SPECT reconstructed by OS-EM with ``osem``."""
    ranges = quick_ranges() if quick and kind == "procedural" else TRAINING_RANGES
    return dataclasses.replace(ranges, osem_probability=1.0) if osem else ranges


def run_case(entry: Dict[str, Any], model, real_ct, real_labels, seeds_per_class: int,
             overlay_path: Optional[Path], quick: bool = False, osem: bool = False) -> Dict[str, Any]:
    import SimpleITK as sitk

    from FCMSegmentationLib.metrics import evaluate_images, evaluate_lesions
    from FCMSegmentationLib.phantoms import generate_phantom
    from FCMSegmentationLib.segmentation import segment

    ranges = case_ranges(entry["kind"], quick, osem)
    phantom, generation_seconds = timed(lambda: (
        generate_phantom(entry["seed"], kind="ct", ct=real_ct, bone_labels=real_labels, ranges=ranges)
        if entry["kind"] == "ct" else generate_phantom(entry["seed"], kind="procedural", ranges=ranges)))
    spect, ct, truth = phantom.spect, phantom.ct, phantom.truth
    truth_array = sitk.GetArrayFromImage(truth)
    fov = classical.spect_field_of_view(spect, truth)
    rng = np.random.default_rng(entry["seed"])
    body = classical.on_reference(ct, truth, default=-1000.0) > classical.BODY_HU
    seeds, strokes = seed_strokes(truth_array, truth.GetSpacing(), seeds_per_class, rng, allowed=fov,
                                  class_allowed={0: body})

    results: Dict[str, Any] = {}
    model_result = None
    recorded_lesions = [{key: lesion[key] for key in ("centre_mm", "diameter_mm", "contrast", "cold")}
                        for lesion in phantom.params.get("lesions") or []]

    def record(name: str, labels, seconds: float, extra: Optional[Dict[str, Any]] = None) -> None:
        results[name] = dict(evaluate_images(labels, truth), lesion_detection=evaluate_lesions(labels, truth),
                             lesions_found=lesions_found(recorded_lesions, truth, labels),
                             seconds=round(seconds, 3), **(extra or {}))

    model_result, seconds = timed(lambda: segment(spect, ct, model, device="auto"))
    record(MODEL, model_result.labels, seconds, {"device": model_result.device})
    only, seconds = timed(lambda: segment(spect, None, model, device="auto"))
    record(MODEL_SPECT_ONLY, only.labels, seconds)
    dropped, seconds = timed(lambda: segment(spect, ct, model, device="auto", drop_faint_lesions=True))
    record(MODEL_FAINT_DROPPED, dropped.labels, seconds)
    labels, seconds = timed(lambda: classical.otsu_spect(spect, truth))
    record(OTSU, labels, seconds)
    labels, seconds = timed(lambda: classical.otsu_spect(spect, truth, thresholds=4))
    record(OTSU4, labels, seconds)
    labels, seconds = timed(lambda: classical.ct_threshold_otsu(spect, ct, truth, threshold=classical.BONE_HU))
    record(CT_OTSU, labels, seconds)
    labels, seconds = timed(lambda: classical.ct_threshold_otsu(spect, ct, truth, threshold=classical.TUNED_BONE_HU))
    record(CT_OTSU_TUNED, labels, seconds)
    (labels, info), seconds = timed(lambda: classical.fcm_spect_ct(spect, ct, truth, seed=entry["seed"] % 2**31))
    record(FCM, labels, seconds, {"fcm": info})
    labels, seconds = timed(lambda: classical.growcut_segment(spect, ct, truth, seeds))
    record(GROWCUT, labels, seconds, {"strokes": len(strokes),
                                      "stroke_codes": {str(c): int((seeds == c).sum()) for c in (1, 2, 3)}})
    working_spacing_mm = model.working_spacing_mm(with_ct=True)
    labels, seconds = timed(lambda: truth_through_working_grid(spect, ct, truth, working_spacing_mm,
                                                               model.segments_beyond_spect))
    record(GRID_BOUND, labels, seconds)
    labels, seconds = timed(lambda: truth_where_spect_shows_it(truth, phantom.params))
    record(UPTAKE_BOUND, labels, seconds)
    if overlay_path is not None:
        from FCMSegmentationLib.overlay import write_overlay

        overlay_path.parent.mkdir(parents=True, exist_ok=True)
        write_overlay(overlay_path, model_result.labels, ct, spect, truth)
    return {
        "kind": entry["kind"], "seed": entry["seed"], "generation_seconds": round(generation_seconds, 2),
        "ct_shape_xyz": list(ct.GetSize()), "ct_spacing_mm": [round(s, 3) for s in ct.GetSpacing()],
        "truth_voxels": {"bone": int((truth_array == 1).sum()), "lesion": int((truth_array == 2).sum())},
        "lesions": recorded_lesions,
        "methods": results,
    }


def summarise(cases: List[Dict[str, Any]]) -> Dict[str, Any]:
    summary: Dict[str, Any] = {}
    for kind in ("all", "procedural", "ct"):
        chosen = [c for c in cases if kind == "all" or c["kind"] == kind]
        if not chosen:
            continue
        summary[kind] = {
            method: {
                **{name: mean_sd(c["methods"][method][name] for c in chosen) for name in CLASSES},
                "seconds": mean_sd(c["methods"][method]["seconds"] for c in chosen),
            }
            for method in METHODS
        }
    return summary


def pooled_lesion_detection(cases: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Lesion-by-lesion counts of every method, pooled over all cases."""
    from FCMSegmentationLib.metrics import pool_lesion_detection

    return {method: pool_lesion_detection([c["methods"][method]["lesion_detection"] for c in cases])
            for method in METHODS}


def lesions_found_by_group(cases: List[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, int]]]:
    """``{method: {group: {"lesions", "found"}}}``: the recorded lesions each method finds, pooled over cases."""
    lesions = [lesion for c in cases for lesion in c["lesions"]]
    return {method: sensitivity_by_group(lesions, [hit for c in cases for hit in c["methods"][method]["lesions_found"]])
            for method in METHODS}


def targets(summary: Dict[str, Any]) -> List[Dict[str, Any]]:
    overall = summary["all"]
    rows = []
    for name in CLASSES:
        value = overall[MODEL][name]["mean"]
        best_method = max(CLASSICAL, key=lambda m: -1.0 if overall[m][name]["mean"] is None
                          else overall[m][name]["mean"])
        best = overall[best_method][name]["mean"]
        rows.append({
            "class": name, "model": value, "target": TARGETS[name],
            "met_absolute": value is not None and value >= TARGETS[name],
            "best_classical": best_method, "best_classical_dice": best,
            "margin": None if value is None or best is None else value - best,
            "met_margin": value is not None and best is not None and value - best >= MARGIN,
        })
    return rows


def bar_chart(summary: Dict[str, Any], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = summary["all"]
    figure, axes = plt.subplots(figsize=(10.5, 4.2))
    width = 0.38
    x = np.arange(len(METHODS))
    for offset, name, colour in ((-width / 2, "bone", "#e8c96a"), (width / 2, "lesion", "#dc143c")):
        means = [overall[m][name]["mean"] if overall[m][name]["mean"] is not None else 0.0 for m in METHODS]
        sds = [overall[m][name]["sd"] or 0.0 for m in METHODS]
        axes.bar(x + offset, means, width, yerr=sds, capsize=3, label=f"{name} Dice", color=colour,
                 edgecolor="black", linewidth=0.5)
        axes.axhline(TARGETS[name], color=colour, linestyle="--", linewidth=1.0)
    axes.set_xticks(x)
    axes.set_xticklabels([TICK[m] for m in METHODS], fontsize=8)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("Dice (mean ± sd over cases)")
    axes.set_title(title, fontsize=10)
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)
    return path


def report(docs: Path, data: Dict[str, Any], figure: Path, overlay: Optional[Path], json_path: Path) -> str:
    summary, cases = data["summary"], data["cases"]
    overall = summary["all"]
    rows = []
    for method in METHODS:
        stats = overall[method]
        rows.append([method, fmt_mean_sd(stats["bone"], show_n=True), fmt_mean_sd(stats["lesion"], show_n=True),
                     fmt_mean_sd(stats["seconds"], digits=1)])
    kinds = [k for k in ("procedural", "ct") if k in summary]
    kind_rows = []
    for method in METHODS:
        row = [method]
        for kind in kinds:
            row += [fmt_mean_sd(summary[kind][method]["bone"]),
                    fmt_mean_sd(summary[kind][method]["lesion"], show_n=True)]
        kind_rows.append(row)
    kind_header = ["method"] + [f"{'procedural' if k == 'procedural' else 'CT-derived'} {c}" for k in kinds
                                for c in ("bone", "lesion")]
    target_rows = []
    for t in data["targets"]:
        value = "n/a" if t["model"] is None else f"{t['model']:.3f}"
        best = "n/a" if t["best_classical_dice"] is None else f"{t['best_classical_dice']:.3f}"
        margin = "n/a" if t["margin"] is None else f"{t['margin']:+.3f}"
        target_rows.append([t["class"], value, f">= {t['target']:.2f}",
                            "**met**" if t["met_absolute"] else "**not met**",
                            f"{best} ({t['best_classical']})", margin, "**met**" if t["met_margin"] else "**not met**"])
    def share(value: float) -> str:
        return "n/a" if value != value else f"{value:.2f}"

    detection_rows = [[method, f"{d['found']} / {d['lesions']} ({share(d['sensitivity'])})",
                       share(d["false_lesions_per_case"]), share(d["voxel_precision"]), share(d["voxel_recall"])]
                      for method, d in data["lesion_detection"].items()]
    by_group = data["lesions_found_by_group"]
    groups = list(by_group[GRID_BOUND])
    group_rows = [[SHORT[method]]
                  + [f"{by_group[method][g]['found']} / {by_group[method][g]['lesions']}" for g in groups]
                  for method in METHODS]
    case_rows = []
    for case in cases:
        cells = [f"{case['kind']} {case['seed']}", case["truth_voxels"]["lesion"]]
        for method in METHODS:
            m = case["methods"][method]
            cells.append(f"{m['bone']:.2f} / " + ("—" if m["lesion"] != m["lesion"] else f"{m['lesion']:.2f}"))
        case_rows.append(cells)
    n_nan = sum(1 for c in cases if c["methods"][MODEL]["lesion"] != c["methods"][MODEL]["lesion"])
    osem = data.get("osem", False)
    parts = [
        "## Accuracy against classical peers, SPECT reconstructed by OS-EM (`scripts/bench_accuracy.py --osem`)"
        if osem else "## Accuracy against classical peers (`scripts/bench_accuracy.py`)",
        "",
        f"Machine: {data['machine']}. Model: {data['model']}.",
        "",
        f"Rerun: `{data['command']}` (about {data['total_seconds'] / 60:.0f} min here).",
        "",
        f"Cases: {len(cases)} held-out phantoms from the training ranges, seeds never used in training — "
        f"{sum(c['kind'] == 'procedural' for c in cases)} procedural (seeds `BENCHMARK_SEED_BASE + i`) and "
        f"{sum(c['kind'] == 'ct' for c in cases)} CT-derived on the shared real CT with its TotalSegmentator "
        f"bone labels (seeds `BENCHMARK_SEED_BASE + {CT_SEED_OFFSET} + i`). Every method is scored on the "
        "truth's (CT) grid. Lesion Dice is undefined (NaN) when a case has no lesion in the truth and none is "
        f"predicted; such cases are skipped in the lesion means (n counts the defined ones; {n_nan} case(s) "
        "skipped for the model on SPECT+CT). Seconds per case: wall time of the method on this CPU, from its "
        "inputs to labels on the CT grid (the model: `segment`, preprocessing and resampling included; "
        "model loading and the simulated user's painting excluded)."
        + (" The cases are those of *Accuracy against classical peers*, each SPECT made instead from noisy "
           "projections by OS-EM (`phantoms/reconstruction.py`: 60–120 views, Poisson noise on the projections "
           "with the same expected counts, 4–10 subsets x 2–6 iterations, half with resolution recovery), as a "
           "scanner makes it." if osem else ""),
        "",
        markdown_table(["method", "bone Dice", "lesion Dice", "seconds / case"], rows),
        "",
        "By kind of phantom (mean ± sd):",
        "",
        markdown_table(kind_header, kind_rows),
        "",
        "Targets of the issue (model on SPECT+CT, mean over cases; margin = model − best classical method "
        f"for that class, needed >= {MARGIN:.2f}):",
        "",
        markdown_table(["class", "model Dice", "target", "absolute", "best classical", "margin", "margin target"],
                       target_rows),
        "",
        f"For scale: on these cases the truth moved by each case's own SPECT/CT misregistration — every lesion "
        f"delineated perfectly where its uptake is, without blur or noise — scores a mean lesion Dice of "
        f"{fmt_mean_sd(overall[UPTAKE_BOUND]['lesion'])} (row *{UPTAKE_BOUND}*), "
        f"{'below' if (overall[UPTAKE_BOUND]['lesion']['mean'] or 0.0) < TARGETS['lesion'] else 'not below'} "
        f"the lesion target of {TARGETS['lesion']:.2f}: what the simulated misregistration alone leaves a "
        "method that places lesions by their uptake without first aligning the SPECT to the CT. The model "
        "aligns it (`alignment.py`; section *SPECT/CT alignment*) where the two overlap over 60 mm or "
        "more along every axis: on the procedural cases, not on the CT-derived slabs.",
        "",
        "Lesion by lesion, pooled over all cases (`metrics.lesion_detection`; a lesion is a 26-connected "
        "component of the lesion label): a true lesion is found when any predicted lesion voxel touches it; "
        "a false lesion is a predicted component touching no true one; voxel precision and recall pool all "
        "lesion voxels of all cases. They say why lesion Dice is low: missed lesions lower recall, a predicted "
        "lesion larger than the true one lowers precision.",
        "",
        markdown_table(["method", "lesions found", "false lesions / case", "voxel precision", "voxel recall"],
                       detection_rows),
        "",
        "Lesions found, by the simulated lesion's diameter and by hot or cold (uptake above or below its bone); "
        "`benchlib/lesions.py` matches each lesion the phantom recorded to its true lesion:",
        "",
        markdown_table(["method"] + groups, group_rows),
        "",
        "Methods:",
        "",
        "- **FCMSegmentation (SPECT+CT / SPECT only)**: `segment(spect, ct, model)` with the default model, "
        "labels by its card's calibrated decision weights and lesion core (`fcmseg calibrate`, chosen on "
        "calibration phantoms, not these cases; `lesion_core.py`), lesions outside CT bone left out and the "
        "dense bone edge that the "
        "working grid rounds off completed from the CT (`cortex.py`); the SPECT-only run passes no CT (its "
        "output is on the SPECT grid and is resampled to the truth's grid by nearest neighbour for scoring).",
        "- **FCMSegmentation (SPECT+CT, --drop-faint-lesions)**: the same with the option that leaves out "
        "predicted lesions under 0.5 ml whose lesion membership stays below 0.7 (`faint_lesions.py`; not the "
        "default: it trades a few small true lesions for fewer false ones). The targets below are the "
        "default's.",
        "- **Otsu on SPECT (2 thresholds)**: `sitk.OtsuMultipleThresholds` (2 thresholds, 256 bins) over all "
        "SPECT voxels; the thresholds are applied to the SPECT linearly resampled onto the CT grid (below t1 "
        "background, t1–t2 bone, above t2 lesion). On SPECT the two thresholds fall between air and soft "
        "tissue and between soft tissue and bone, so its 'bone' is mostly soft tissue. **(4 thresholds, top 2 "
        "classes)**: the same with 4 thresholds (128 bins), the two highest classes being bone and lesion and the "
        "three lowest (air, soft tissue, ...) background — a fairer configuration of the same method.",
        "- **CT > 150 / 300 HU + SPECT Otsu in bone**: bone = CT above the threshold, a 3-D binary closing "
        "(1 voxel, 6-connected) to bridge thin cortex gaps, then holes up to 4 cm² in each axial slice filled "
        "(marrow below the threshold inside a closed cortex becomes bone; larger holes — the chest inside the "
        "ribs — are not); lesions = bone voxels whose SPECT (linear on the CT grid) exceeds the Otsu threshold "
        "of the SPECT over the bone voxels. 150 HU is the issue's example; 300 HU was chosen among "
        "150–350 HU on 4 validation phantoms (`VALIDATION_SEED_BASE` seeds, not these cases; mean bone Dice "
        "0.73 at 150 HU, 0.82 at 300 HU): the phantoms' CT has a partial-volume halo above 150 HU around cortex.",
        "- **classical FCM**: `skfuzzy.cluster.cmeans` (3 clusters, m = 2, error 1e-5) on two features — "
        "the engine's normalised SPECT and CT on its 3 mm working grid (`prepare_case`) — over the body "
        "voxels (CT > −400 HU) inside the SPECT field, fitted on a seeded subsample of 200 000 voxels; every "
        "voxel goes to its nearest centre (= argmax of its memberships). Clusters -> classes: highest CT "
        "centroid = bone, of the other two the higher SPECT centroid = lesion, the last = background. Lesions "
        "are far too rare to form a cluster: the three clusters come out as soft tissue, hot soft tissue / "
        "organs and bone, so FCM's 'lesion' is mostly hot soft tissue (ordering by SPECT first instead gives "
        "bone Dice < 0.1). Labels go to the CT grid by nearest neighbour.",
        f"- **Grow-from-seeds**: `vtkImageGrowCutSegment` (slicer-core, seed locality 0) on the CT grid, on "
        "one intensity combining both images: clip(HU, −1000, 2000) + 1000 · clip(SPECT / p99.5, 0, 3) "
        "(the CT draws bone edges, the SPECT term lesion edges, which the CT alone mostly lacks). Seeds: "
        f"{SEEDS_PER_CLASS} strokes per class present (background, bone, lesion) from the simulated user "
        "(`scripts/benchlib/simulated_user.py`: 5–15 mm lines, 3 voxels thick, on one axial/coronal/sagittal "
        "plane, at the deepest point of the largest regions of each class, inside the SPECT field; background "
        "strokes inside the body, CT > −400 HU, where a person paints them — in the air outside they let "
        "bone leak through all soft tissue). GrowCut gets these strokes; the model gets none. With a few "
        "strokes GrowCut cannot find bones that got no seed, and a lesion seed spreads along its bone.",
        f"- **{GRID_BOUND}**: not a method but the ceiling of the model's design: the truth's one-hot classes "
        "resampled linearly onto the model's working grid (`prepare_case`) and back onto the CT grid exactly "
        "as the model's memberships are, then labelled as the model's are (argmax, then the dense bone edge "
        "completed from the CT, `cortex.py`); outside the SPECT field no lesion, and, for a model that does "
        "not segment beyond the SPECT, only background. No model on that grid can do better (a model's own "
        "edge errors can still let the completion add a voxel the ceiling does not); thin cortex, ribs and "
        "small lesions are what it loses.",
        f"- **{UPTAKE_BOUND}**: not a method either: the truth moved by the case's own simulated SPECT/CT "
        f"misregistration (up to {TRAINING_RANGES.misregistration_shift_mm[1]:g} mm and "
        f"{TRAINING_RANGES.misregistration_rotation_deg[1]:g}°, `phantoms.misregistration_transform`), "
        "i.e. every class exactly "
        "where its uptake sits in the SPECT, with no blur and no noise. Its lesion Dice is what a method that "
        "finds and delineates lesions perfectly by their uptake, with no help from the CT, would score: the "
        "misregistration alone costs a lesion of 5–15 mm, or the thin part of a lesion inside cortex, much of "
        "its Dice. The model can beat it only where the CT shows the lesion (half the lesions are sclerotic "
        "or lytic) or by aligning the SPECT's bone to the CT's, as it does. Its bone Dice is no bound for the "
        "model, which takes bone from the CT.",
        "",
        f"![Dice per class and method]({relative_to_docs(figure, docs)})",
    ]
    if overlay is not None:
        parts += ["", f"Overlay of case {cases[0]['kind']} {cases[0]['seed']} (top: model on SPECT+CT, bottom: truth; "
                      f"axial and coronal, CT then SPECT): ![overlay]({relative_to_docs(overlay, docs)})"]
    parts += ["", "Per case, Dice bone / lesion (— = undefined):", "",
              markdown_table(["case", "lesion voxels"] + [SHORT[m] for m in METHODS], case_rows),
              "", f"Raw results: `{relative_to_docs(json_path, docs)}`."]
    return "\n".join(parts) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=None, help="number of cases (default 12; 2 with --quick); "
                        "a third of them CT-derived")
    parser.add_argument("--seeds-per-class", type=int, default=SEEDS_PER_CLASS, help="GrowCut seed strokes per class")
    add_model_run_arguments(parser)
    parser.add_argument("--osem", action="store_true",
                        help="reconstruct every case's SPECT by OS-EM from noisy projections (section "
                             f"{SECTION}_osem)")
    args = parser.parse_args(argv)

    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    count = args.cases if args.cases is not None else (2 if args.quick else 12)
    docs = docs_folder(args)
    figures, results_dir = docs / "figures", docs / "results"
    model, model_description = load_benchmark_model(args.model, args.random_weights)
    real_ct, real_labels = read_real_ct()
    if real_ct is None:
        print("warning: shared real CT not found; CT-derived cases skipped", file=sys.stderr)
    plan = held_out_plan(count, real_ct is not None)
    overlay = None if args.osem else figures / "accuracy_overlay.png"
    section, suffix = (f"{SECTION}_osem", "_osem") if args.osem else (SECTION, "")
    started = time.perf_counter()
    cases = []
    for number, entry in enumerate(tqdm(plan, desc="accuracy cases", unit="case")):
        cases.append(run_case(entry, model, real_ct, real_labels, args.seeds_per_class,
                              overlay if number == 0 else None, quick=args.quick, osem=args.osem))
        model_scores = cases[-1]["methods"][MODEL]
        tqdm.write(f"{entry['kind']} {entry['seed']}: model bone {model_scores['bone']:.3f} lesion "
                   f"{model_scores['lesion']:.3f}")
    summary = summarise(cases)
    data = {
        "benchmark": section, "machine": machine_line(), "command": command_line(), "model": model_description,
        "quick": args.quick, "osem": args.osem, "total_seconds": time.perf_counter() - started,
        "summary": summary, "targets": targets(summary), "lesion_detection": pooled_lesion_detection(cases),
        "lesions_found_by_group": lesions_found_by_group(cases), "cases": cases,
    }
    json_path = write_json(results_dir / f"{section}.json", data)
    figure = bar_chart(summary, figures / f"accuracy_dice{suffix}.png",
                       f"Per-class Dice on {len(cases)} held-out phantoms{', OS-EM SPECT' if args.osem else ''} "
                       "(dashed: targets)")
    write_section(docs / "benchmarks.md", section, report(docs, data, figure, overlay, json_path))
    for t in data["targets"]:
        print(f"{t['class']}: model {t['model']}, target {t['target']} -> {'met' if t['met_absolute'] else 'NOT met'}; "
              f"best classical {t['best_classical']} {t['best_classical_dice']}, margin {t['margin']} -> "
              f"{'met' if t['met_margin'] else 'NOT met'}")
    print(f"wrote {docs / 'benchmarks.md'} ({section}), {figure}, {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
