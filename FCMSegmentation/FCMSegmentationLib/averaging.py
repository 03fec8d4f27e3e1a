"""Weight averaging of fine-tuned relatives (a "model soup", Wortsman et al., ICML 2022).

Models continued from one another (``fcmseg train --init``) sit in one basin of the loss, and the mean of
their weights often segments at least as well as either, at no cost at inference. Only models with the
same architecture, channels and normalisation can be averaged. The result carries the last model's card
(its training record, so that the recipe stays traceable) with ``averaged_from`` listing every parent's
weights SHA256, and its own validation Dice, measured as ``fcmseg train`` measures it. The decision
weights are dropped, since they were calibrated for one parent only (calibrate the average again with
``fcmseg calibrate``).
"""
import copy
import datetime
from pathlib import Path
from typing import Any, Dict, Sequence

import torch

from .errors import ModelError
from .modelfile import LoadedModel, PathLike, load_model, save_model

MUST_MATCH = ("architecture", "classes", "input_channels", "normalisation")


def average_models(models: Sequence[LoadedModel]) -> LoadedModel:
    """A new model whose floating-point weights and buffers are the mean of ``models``' (integer buffers,
    such as batch norm's batch counter, come from the last model). Raises ModelError if they differ in
    architecture, classes, channels or normalisation, or if fewer than two are given."""
    if len(models) < 2:
        raise ModelError("averaging needs at least two models")
    last = models[-1]
    for model in models[:-1]:
        differing = [key for key in MUST_MATCH if model.card.get(key) != last.card.get(key)]
        if differing:
            raise ModelError(f"cannot average models that differ in {', '.join(differing)}; average only "
                             "models trained from one another (fcmseg train --init)")
    states = [model.network.state_dict() for model in models]
    mean = {}
    for key, value in states[-1].items():
        if value.is_floating_point():
            stacked = torch.stack([state[key].detach().cpu().float() for state in states])
            mean[key] = stacked.mean(dim=0).to(value.dtype)
        else:
            mean[key] = value.detach().cpu().clone()
    network = copy.deepcopy(last.network).cpu()
    network.load_state_dict(mean)
    card = {key: value for key, value in last.card.items() if key not in ("decision", "validation")}
    card["averaged_from"] = [model.card.get("weights_sha256") for model in models]  # None: never saved
    card["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return LoadedModel(network.eval(), card)


def validate_as_trained(model: LoadedModel, device: str = "cpu") -> Dict[str, Any]:
    """The validation Dice ``fcmseg train`` records, measured for ``model`` on the validation phantoms its
    training record names (CT-derived ones too when the recorded real CT can be read from here); empty
    without a training record."""
    from .training import TrainConfig, read_real_ct, validate

    recorded = model.card.get("training", {}).get("config", {})
    count = int(recorded.get("validation_phantoms", 0))
    if not count:
        return {}
    paths = (recorded.get("ct_path"), recorded.get("bone_labels_path"))
    readable = all(path and Path(path).exists() for path in paths)
    real_ct = read_real_ct(TrainConfig(out="unused", ct_path=paths[0], bone_labels_path=paths[1])) if readable \
        else (None, None)
    return validate(model, count, device, real_ct)


def write_average(paths: Sequence[PathLike], out: PathLike) -> Dict[str, Any]:
    """``fcmseg average``: load the model files at ``paths``, average them, validate the mean (see
    :func:`validate_as_trained`), write it to ``out`` (atomically) and return its card."""
    averaged = average_models([load_model(path) for path in paths])
    averaged.card["validation"] = validate_as_trained(averaged)
    return save_model(out, averaged.network, averaged.card)
