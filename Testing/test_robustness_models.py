"""Robustness of model files: missing, truncated, corrupt, foreign, wrong classes/channels, newer format.

Every case is a ModelError whose message names the file and says what to do; the CLI prints it as one
``error:`` line and exits 2 without writing an output.
"""
import hashlib
import io
import json
import re

import pytest
import SimpleITK as sitk
import torch

from FCMSegmentationLib.errors import ModelError
from FCMSegmentationLib.modelfile import FORMAT_VERSION, load_model, new_card, read_card, save_model
from FCMSegmentationLib.networks import UNet
from FCMSegmentationLib.refinement import RefinementSession
from robust_helpers import error_lines, run_cli, tiny_model


@pytest.fixture()
def model_file(tmp_path):
    model = tiny_model()
    path = tmp_path / "model.pt"
    save_model(path, model.network, model.card)
    return path


def rewrite_payload(path, card_edit=None, weights=None):
    payload = torch.load(path, weights_only=True)
    card = json.loads(payload["card"])
    if card_edit is not None:
        card_edit(card)
    payload["card"] = json.dumps(card)
    if weights is not None:
        payload["weights"] = weights
    torch.save(payload, path)


def cli_segment_with(model_path, tiny_case, tmp_path):
    spect_path = tmp_path / "spect.nrrd"
    sitk.WriteImage(tiny_case[0], str(spect_path))
    out = tmp_path / "out.nrrd"
    code, _, err = run_cli(["segment", "--spect", str(spect_path), "--output", str(out), "--model",
                            str(model_path), "--device", "cpu"])
    assert code == 2 and "Traceback" not in err
    assert not out.exists()
    [line] = error_lines(err)
    return line


def test_a_valid_model_file_loads(model_file):
    loaded = load_model(model_file)
    assert loaded.card["architecture"]["channels"] == [4, 8]


def test_missing_model_file(tmp_path, tiny_case):
    with pytest.raises(ModelError, match="model file not found"):
        load_model(tmp_path / "absent.pt")
    assert "model file not found" in cli_segment_with(tmp_path / "absent.pt", tiny_case, tmp_path)


@pytest.mark.parametrize("keep", [0, 100, 0.5, -1])
def test_truncated_model_file(model_file, keep, tiny_case, tmp_path):
    data = model_file.read_bytes()
    keep = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) - 1)
    model_file.write_bytes(data[:keep])
    with pytest.raises(ModelError, match="truncated or corrupt.*download or save it again"):
        load_model(model_file)
    assert "truncated or corrupt" in cli_segment_with(model_file, tiny_case, tmp_path)


def test_corrupt_weights_fail_the_sha256_check(model_file):
    payload = torch.load(model_file, weights_only=True)
    weights = payload["weights"].clone()
    weights[len(weights) // 2] ^= 0x10  # one flipped bit in the middle of the weights
    rewrite_payload(model_file, weights=weights)
    card = read_card(model_file)  # the card is intact, the weights are not
    assert card["weights_sha256"]
    with pytest.raises(ModelError, match="do not match the SHA256"):
        load_model(model_file)


def test_weights_that_do_not_fit_the_card(model_file):
    other = UNet(channels=(4, 8), head_channels=8)  # a different head, SHA256 recomputed to match
    buffer = io.BytesIO()
    torch.save(other.state_dict(), buffer)
    raw = buffer.getvalue()
    rewrite_payload(model_file, card_edit=lambda c: c.update(weights_sha256=hashlib.sha256(raw).hexdigest()),
                    weights=torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    with pytest.raises(ModelError, match="weights do not fit the architecture"):
        load_model(model_file)


@pytest.mark.parametrize("payload", [
    {"some": "dict"},
    {"card": "[1, 2, 3]", "weights": torch.zeros(3, dtype=torch.uint8)},
    {"card": "{}", "weights": "not a tensor"},
    {"card": "not json", "weights": torch.zeros(3, dtype=torch.uint8)},
])
def test_foreign_torch_files(tmp_path, payload):
    path = tmp_path / "foreign.pt"
    torch.save(payload, path)
    with pytest.raises(ModelError, match="not (a readable )?(an )?FCMSegmentation model"):
        load_model(path)


def test_a_bare_state_dict_is_not_a_model_file(tmp_path):
    path = tmp_path / "state.pt"
    torch.save(tiny_model().network.state_dict(), path)
    with pytest.raises(ModelError, match="not a readable FCMSegmentation model"):
        load_model(path)


@pytest.mark.parametrize("classes, channels, pattern", [
    (2, 3, "predicts 2 classes; this version needs 3 \\(background, bone, lesion\\)"),
    (4, 3, "predicts 4 classes"),
    (3, 2, "takes 2 input channels; this version gives 3 \\(spect, ct, ct_present\\)"),
])
def test_model_for_other_classes_or_channels(tmp_path, tiny_case, classes, channels, pattern):
    network = UNet(in_channels=channels, num_classes=classes, channels=(4, 8), head_channels=4)
    path = tmp_path / "other.pt"
    save_model(path, network, new_card(network))
    with pytest.raises(ModelError, match=pattern):
        load_model(path)
    with pytest.raises(ModelError, match=pattern):  # the refinement session checks the same way
        RefinementSession(tiny_case[0], None, path, "cpu")
    assert re.search(pattern, cli_segment_with(path, tiny_case, tmp_path))


def test_model_saved_by_a_newer_version(model_file, tiny_case, tmp_path):
    rewrite_payload(model_file, card_edit=lambda c: c.update(format_version=FORMAT_VERSION + 1,
                                                               fcmsegmentation_version="9.0.0"))
    with pytest.raises(ModelError, match=f"newer FCMSegmentation \\(format {FORMAT_VERSION + 1} > "
                                         f"{FORMAT_VERSION}\\); update the extension"):
        load_model(model_file)
    assert "update the extension" in cli_segment_with(model_file, tiny_case, tmp_path)


def test_card_without_version_or_architecture(model_file):
    rewrite_payload(model_file, card_edit=lambda c: c.pop("architecture"))
    with pytest.raises(ModelError, match="no architecture"):
        load_model(model_file)
    rewrite_payload(model_file, card_edit=lambda c: c.pop("format_version"))
    with pytest.raises(ModelError, match="no format_version"):
        load_model(model_file)
