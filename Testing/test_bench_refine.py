"""scripts/bench_refine.py end to end in its quick mode (tiny phantoms, untrained network): both case sets
run, and the report and JSON hold them apart."""
import json

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML, Grow-from-seeds) is not installed")
if not hasattr(slicer, "vtkImageGrowCutSegment"):
    pytest.skip("the installed 'slicer' package has no Grow-from-seeds", allow_module_level=True)

from conftest import load_script  # noqa: E402


@pytest.fixture(scope="module")
def bench_refine():
    return load_script("bench_refine")


def test_case_plans_put_the_shifted_cases_first_then_the_accuracy_benchmarks_own(bench_refine):
    from benchlib.common import held_out_plan

    plan = bench_refine.case_plans(3, 2, have_ct=True, confirming=1)
    assert [entry["ranges"] for entry in plan] == ["shifted"] * 3 + ["training"] * 3
    assert [entry["user"] for entry in plan] == ["corrects"] * 5 + ["confirms"]
    bare = [{k: v for k, v in entry.items() if k not in ("ranges", "user")} for entry in plan]
    assert bare[3:5] == held_out_plan(2, True) and bare[5:] == held_out_plan(1, True)
    assert not {entry["seed"] for entry in plan[:3]} & {entry["seed"] for entry in plan[3:]}


def test_quick_run_reports_shifted_and_training_range_cases_separately(bench_refine, tmp_path):
    assert bench_refine.main(["--quick", "--random-weights", "--docs", str(tmp_path), "--threads", "1"]) == 0
    data = json.loads((tmp_path / "results" / "bench_refine.json").read_text(encoding="utf-8"))
    assert [case["ranges"] for case in data["cases"]] == ["shifted"]
    assert [case["ranges"] for case in data["in_range"]["cases"]] == ["training"]
    assert [case["user"] for case in data["confirming"]["cases"]] == ["confirms"]
    for case in data["cases"] + data["in_range"]["cases"] + data["confirming"]["cases"]:
        assert [entry["round"] for entry in case["rounds"]] == [0, 1]
    report = (tmp_path / "benchmarks.md").read_text(encoding="utf-8")
    shifted = report.index("on domain-shifted phantoms (1 case)")
    in_range = report.index("with the same simulated user on training-range phantoms (1 case)")
    confirming = report.index("with a user who also confirms on training-range phantoms (1 case)")
    assert shifted < in_range < confirming < report.index("<!-- END bench_refine -->")
    assert (tmp_path / "figures" / "refine_dice_per_round.png").stat().st_size > 0
