"""scripts/bench_alignment.py: the distance it reports, and a quick run end to end."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import load_script


@pytest.fixture(scope="module")
def bench_alignment():
    return load_script("bench_alignment")


def test_misregistration_left_is_the_mean_distance_between_the_two_transforms(bench_alignment):
    points = np.array([[0.0, 0.0, 0.0], [10.0, 5.0, -3.0]])
    moved = sitk.TranslationTransform(3, (3.0, 4.0, 0.0))
    assert bench_alignment.misregistration_left(sitk.Euler3DTransform(), moved, points) == pytest.approx(5.0)
    assert bench_alignment.misregistration_left(moved, moved, points) == pytest.approx(0.0)


def test_quick_run_reports_the_misregistered_and_the_still_cases(bench_alignment, tmp_path):
    assert bench_alignment.main(["--quick", "--docs", str(tmp_path), "--threads", "1"]) == 0
    data = json.loads((tmp_path / "results" / "bench_alignment.json").read_text(encoding="utf-8"))
    assert set(data["groups"]) == {"procedural", "still"}
    moved, still = (data["groups"][key]["cases_detail"][0] for key in ("procedural", "still"))
    assert moved["seed"] == still["seed"]
    recorded = bench_alignment.RECORDED
    assert moved["methods"][recorded]["left_mm"] > 0.5  # the simulated misregistration, uncorrected
    assert still["methods"][recorded]["left_mm"] == pytest.approx(0.0, abs=1e-9)
    for case in (moved, still):
        assert set(case["methods"]) == set(bench_alignment.METHODS)
    report = (tmp_path / "benchmarks.md").read_text(encoding="utf-8")
    assert "<!-- BEGIN bench_alignment -->" in report and "without misregistration, 1 case:" in report
