"""scripts/bench_adapt.py: the paired summary on made-up cases, and a quick run end to end (tiny phantoms,
untrained network)."""
import json
import math

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench_adapt():
    return load_script("bench_adapt")


def made_up_run(bone, lesion, false_lesions, seconds=(1.0, 2.0, 3.0)):
    """One input's run: per-stage (Segment, 1 Adapt, 3 Adapts) bone, lesion and false lesions."""
    stages = {stage: {"bone": b, "lesion": les, "false_lesions": f}
              for stage, b, les, f in zip(("segment", "adapt1", "adapt3"), bone, lesion, false_lesions)}
    return {"stages": stages, "adapt_seconds": list(seconds)}


def test_summary_pairs_each_adapt_stage_with_segment_case_by_case(bench_adapt):
    nan = float("nan")
    cases = [
        {"shift": "osem", "kind": "procedural", "seed": 1,
         "inputs": {"spect_ct": made_up_run((0.5, 0.6, 0.7), (0.2, 0.3, 0.1), (2, 1, 0)),
                    "spect_only": made_up_run((0.4, 0.4, 0.4), (nan, nan, nan), (0, 0, 1))}},
        {"shift": "osem", "kind": "ct", "seed": 2,
         "inputs": {"spect_ct": made_up_run((0.7, 0.7, 0.6), (0.4, 0.4, 0.4), (0, 1, 0), (4.0, 5.0, 6.0)),
                    "spect_only": made_up_run((0.6, 0.5, 0.6), (0.1, 0.2, 0.3), (1, 1, 1))}},
    ]
    summary = bench_adapt.summarise(cases)
    assert list(summary) == ["osem/spect_ct", "osem/spect_only"]  # shifts without cases are left out
    with_ct = summary["osem/spect_ct"]
    assert with_ct["cases"] == 2
    assert with_ct["mean"]["adapt1"]["bone"] == pytest.approx(0.65)
    assert with_ct["mean"]["segment"]["false_lesions"] == pytest.approx(1.0)
    assert with_ct["change"]["adapt1"]["bone"]["mean"] == pytest.approx(0.05)
    assert with_ct["change"]["adapt3"]["lesion"]["mean"] == pytest.approx(-0.05)
    assert with_ct["adapt_seconds"] == pytest.approx(3.5)  # median of every call
    spect_only = summary["osem/spect_only"]
    # a lesion-free case has no lesion Dice: the mean and the pairing skip it
    assert spect_only["mean"]["segment"]["lesion"] == pytest.approx(0.1)
    assert spect_only["change"]["adapt3"]["lesion"]["cases"] == 1
    assert spect_only["change"]["adapt3"]["lesion"]["mean"] == pytest.approx(0.2)
    assert spect_only["change"]["adapt1"]["bone"]["mean"] == pytest.approx(-0.05)


def test_quick_run_scores_every_stage_of_each_shift_with_and_without_ct(bench_adapt, tmp_path):
    assert bench_adapt.main(["--quick", "--random-weights", "--shifts", "shifted", "gain2",
                             "--docs", str(tmp_path), "--threads", "1"]) == 0
    data = json.loads((tmp_path / "results" / "bench_adapt.json").read_text(encoding="utf-8"))
    assert [case["shift"] for case in data["cases"]] == ["shifted", "gain2"]
    for case in data["cases"]:
        assert set(case["inputs"]) == {"spect_ct", "spect_only"}
        for run in case["inputs"].values():
            assert set(run["stages"]) == {"segment", "adapt1", "adapt3"}
            assert len(run["adapt_seconds"]) == 3 and all(s > 0 for s in run["adapt_seconds"])
            assert all(math.isfinite(stage["bone"]) for stage in run["stages"].values())
    assert list(data["summary"]) == ["shifted/spect_ct", "shifted/spect_only", "gain2/spect_ct",
                                     "gain2/spect_only"]
    report = (tmp_path / "benchmarks.md").read_text(encoding="utf-8")
    section = report[report.index("<!-- BEGIN bench_adapt -->"):report.index("<!-- END bench_adapt -->")]
    assert "| shifted | SPECT only | 1 | bone |" in section and "| gain2 | SPECT+CT | 1 | lesion |" in section
    assert (tmp_path / "figures" / "adapt_dice_change.png").stat().st_size > 0
