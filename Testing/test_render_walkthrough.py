"""scripts/render_walkthrough.py: the README walkthrough figures, rendered from real MRML (slicer-core)."""
import struct
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML without Qt) is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML classes", allow_module_level=True)
pytest.importorskip("matplotlib")

from conftest import load_script, make_tiny_case  # noqa: E402


@pytest.fixture(scope="module")
def walkthrough():
    return load_script("render_walkthrough")


def png_size(path: Path):
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_module_constants_are_the_sample_and_gui_defaults(walkthrough):
    constants = walkthrough.module_constants()
    assert isinstance(constants["SAMPLE_SEED"], int)
    assert isinstance(constants["DEFAULT_STEPS"], int) and constants["DEFAULT_STEPS"] >= 1
    assert constants["DEFAULT_ALPHA"] > 0 and constants["DEFAULT_BETA"] >= 0


def test_simulated_strokes_fix_errors_and_stay_in_the_true_class(walkthrough):
    truth = np.zeros((30, 30), np.uint8)
    truth[10:20, 5:25] = 1  # a bone band
    truth[13:17, 13:17] = 2  # a lesion in it
    pred = np.zeros_like(truth)
    pred[10:20, 5:15] = 1  # right half of the bone and the lesion missed
    pred[2:6, 2:10] = 1  # a false bone
    strokes = walkthrough.plane_strokes(pred, truth, (2.0, 2.0))
    for key, label in (("background", 0), ("bone", 1), ("lesion", 2)):
        assert strokes[key].any(), key
        assert (truth[strokes[key]] == label).all(), f"{key} stroke leaves the true {key}"
        assert (pred[strokes[key]] != label).any(), f"{key} stroke paints no error"
    assert strokes["background"][2:6, 2:10].any()


def test_walkthrough_writes_one_png_per_step_from_mrml(walkthrough, random_model, tmp_path):
    spect, ct, truth = make_tiny_case()
    record = walkthrough.run_walkthrough(spect, ct, truth, random_model, tmp_path / "figs", steps=2, alpha=1.0,
                                         beta=0.0008, sample_name="tiny case", model_label="random weights",
                                         screenshot=tmp_path / "screenshot.png")
    assert set(record.figures) == set(walkthrough.FIGURE_NAMES) | {"screenshot"}
    for name in walkthrough.FIGURE_NAMES:
        assert record.figures[name] == tmp_path / "figs" / f"{name}.png"
    for name, path in record.figures.items():
        width, height = png_size(path)
        assert width == int(walkthrough.WIDTH_IN * walkthrough.DPI), name
        assert 300 <= height <= 1500, (name, height)
        assert 20_000 < path.stat().st_size < walkthrough.MAX_PNG_BYTES, (name, path.stat().st_size)
    # The pictures show what MRML holds: the exported segments equal the engine's labels.
    np.testing.assert_array_equal(record.mrml_labels_before, record.engine_labels_before)
    assert record.statistics_before.startswith("Bone ") and record.statistics_after.startswith("Bone ")
    assert sum(record.stroke_voxels.values()) > 0
    assert set(record.stroke_voxels) == {"Background", "Bone", "Lesion"}
    for dice in (record.dice_before, record.dice_after):
        assert set(dice) == {"bone", "lesion"}
        assert all(np.isnan(v) or 0.0 <= v <= 1.0 for v in dice.values())


def test_model_label_says_checkpoint_or_continued_training(walkthrough):
    path = Path("model.pt")
    fresh = {"training": {"steps": 1200, "config": {"steps": 1200}, "init_weights_sha256": None}}
    assert walkthrough.model_label(path, fresh) == "model.pt (1200 training steps)"
    continued = {"training": {"steps": 2400, "config": {"steps": 2400}, "init_weights_sha256": "fa4b"}}
    assert walkthrough.model_label(path, continued) == "model.pt (2400 training steps continued from another model)"
    checkpoint = {"training": {"steps": 250, "config": {"steps": 1200}}}
    assert "step 250 of 1200" in walkthrough.model_label(path, checkpoint)
