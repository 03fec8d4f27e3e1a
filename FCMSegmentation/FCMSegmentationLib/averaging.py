"""Weight averaging of fine-tuned relatives (a "model soup", Wortsman et al., ICML 2022).

Models continued from one another (``fcmseg train --init``) sit in one basin of the loss, and the mean of
their weights often segments at least as well as either, at no cost at inference. Only models with the
same architecture, channels and normalisation can be averaged. The result carries the last model's card
(its training record, so that the recipe stays traceable) with ``averaged_from`` listing every parent's
weights SHA256; the decision weights are dropped, since they were calibrated for one parent only
(calibrate the average again with ``fcmseg calibrate``).
"""
import copy
import datetime
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


def write_average(paths: Sequence[PathLike], out: PathLike) -> Dict[str, Any]:
    """``fcmseg average``: load the model files at ``paths``, average them, write the result to ``out``
    (atomically) and return its card."""
    averaged = average_models([load_model(path) for path in paths])
    return save_model(out, averaged.network, averaged.card)
