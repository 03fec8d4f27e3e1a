"""Weight averaging (fcmseg average): the mean of relatives' weights, refused for unlike models, traceable card."""
import pytest
import torch

from FCMSegmentationLib.averaging import average_models, write_average
from FCMSegmentationLib.cli import main
from FCMSegmentationLib.errors import ModelError
from FCMSegmentationLib.modelfile import load_model, random_model, save_model
from FCMSegmentationLib.validation import VALIDATION_SEED_BASE


def saved(tmp_path, name, model, **card):
    """``model`` written to ``tmp_path/name`` with extra card fields, loaded back (so it has a SHA256)."""
    path = tmp_path / name
    save_model(path, model.network, dict(model.card, **card))
    return path, load_model(path)


def test_average_is_the_mean_of_float_weights_and_keeps_the_last_cards_record(tmp_path):
    _, first = saved(tmp_path, "a.pt", random_model(seed=1), decision={"spect_ct": [2.0, 1.0, 0.5]})
    _, last = saved(tmp_path, "b.pt", random_model(seed=2), training={"steps": 7}, validation={"x": 1})
    with torch.no_grad():  # batch norm counters differ, so that "from the last" can be seen
        for buffer in last.network.buffers():
            if not buffer.is_floating_point():
                buffer.fill_(5)
    averaged = average_models([first, last])
    state, a, b = averaged.network.state_dict(), first.network.state_dict(), last.network.state_dict()
    floats = [key for key in state if state[key].is_floating_point()]
    assert floats and all(torch.allclose(state[k], (a[k] + b[k]) / 2, atol=1e-6) for k in floats)
    assert not torch.equal(state[floats[0]], a[floats[0]])
    assert all(torch.equal(state[k], b[k]) for k in state if k not in floats)
    assert averaged.card["averaged_from"] == [first.card["weights_sha256"], last.card["weights_sha256"]]
    assert averaged.card["training"] == {"steps": 7}
    assert "decision" not in averaged.card and "validation" not in averaged.card  # they described one parent
    assert averaged.decision_weights(True) == (1.0, 1.0, 1.0)


def test_averaging_a_model_with_itself_changes_nothing():
    model = random_model(seed=3, norm="instance")
    averaged = average_models([model, model])
    features = torch.rand(1, 3, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(averaged.network(features), model.network(features), atol=1e-6)


def test_unlike_models_and_single_models_are_refused():
    batch, instance = random_model(seed=0, norm="batch"), random_model(seed=0, norm="instance")
    with pytest.raises(ModelError, match="architecture"):
        average_models([batch, instance])
    with pytest.raises(ModelError, match="at least two"):
        average_models([batch])


def test_write_average_validates_the_mean_as_training_does(tmp_path):
    record = {"config": {"validation_phantoms": 1, "ct_path": None, "bone_labels_path": None}}
    a, _ = saved(tmp_path, "a.pt", random_model(seed=1, norm="instance"), validation={"parent": 1})
    b, _ = saved(tmp_path, "b.pt", random_model(seed=2, norm="instance"), training=record, validation={"parent": 2})
    card = write_average([a, b], tmp_path / "mean.pt")
    assert card["validation"]["seeds"] == [VALIDATION_SEED_BASE]  # one procedural phantom, no CT-derived one
    assert 0.0 <= card["validation"]["spect_ct_bone_dice"] <= 1.0
    assert load_model(tmp_path / "mean.pt").card["validation"] == card["validation"]


def test_write_average_and_the_command_line(tmp_path, capsys):
    a, _ = saved(tmp_path, "a.pt", random_model(seed=1))
    b, _ = saved(tmp_path, "b.pt", random_model(seed=2))
    card = write_average([a, b], tmp_path / "mean.pt")
    assert card["validation"] == {}  # no training record to validate as
    assert load_model(tmp_path / "mean.pt").card["weights_sha256"] == card["weights_sha256"]
    assert main(["average", str(a), str(b), "--out", str(tmp_path / "cli.pt")]) == 0
    assert load_model(tmp_path / "cli.pt").card["averaged_from"] == card["averaged_from"]
    printed = capsys.readouterr().out
    assert "calibrate" in printed and "validation (none: the last model has no training record)" in printed
    assert main(["average", str(a), "--out", str(tmp_path / "one.pt")]) != 0
    assert "at least two" in capsys.readouterr().err
    assert not (tmp_path / "one.pt").exists()
