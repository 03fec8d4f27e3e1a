"""Model files: weights plus a model card, checked by SHA256 on load.

A model file is a ``torch.save`` of ``{"card": <JSON text>, "weights": <uint8 tensor>}`` where
``weights`` is the ``torch.save`` of the network's state dict. The card records the architecture,
classes, input channels, normalisation, training recipe and metrics, and ``weights_sha256`` — the SHA256
of those weight bytes — so truncation or corruption is detected before any weight is used. Both levels
load with ``weights_only=True`` (no arbitrary pickles).
"""
import datetime
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import __version__
from .errors import InputError, ModelError
from .imageio import atomic_path
from .networks import UNet, build_network
from .preprocessing import CHANNELS, CLASS_NAMES, CT_CLIP, CT_WINDOW, DEFAULT_SPACING_MM, SPECT_CLIP, SPECT_PERCENTILE

FORMAT_VERSION = 1
DEFAULT_MODEL_NAME = "fcmseg_default.pt"
MODEL_ENV_VAR = "FCMSEG_MODEL"
LESION_CORE_KEY = "lesion_core"  # the card's decision entry for it: {input: fraction}
WORKING_SPACING_KEY = "working_spacing_mm"  # the card's decision entry for the working grid: {input: mm}

PathLike = Union[str, os.PathLike]


@dataclass
class LoadedModel:
    """A network in eval mode on its device, with its card."""

    network: UNet
    card: Dict[str, Any]

    @property
    def spacing_mm(self) -> float:
        return float(self.card["normalisation"]["spacing_mm"])

    @property
    def segments_beyond_spect(self) -> bool:
        """Whether the model was trained to segment bone where only the CT sees it (older models were not)."""
        return bool(self.card.get("segments_beyond_spect", False))

    def decision_weights(self, with_ct: bool) -> Tuple[float, ...]:
        """Per-class weights on the memberships before the argmax that gives labels, for SPECT+CT or
        SPECT-only input: the card's calibration (see :mod:`calibration`), all 1 for an uncalibrated model."""
        decision = self.card.get("decision") or {}
        return tuple(decision.get(decision_key(with_ct), (1.0,) * len(CLASS_NAMES)))

    def lesion_core(self, with_ct: bool) -> float:
        """The fraction of its peak lesion membership that a voxel needs to stay in its lesion
        (:mod:`lesion_core`), for SPECT+CT or SPECT-only input: the card's calibration, 0 (lesions as the
        weighted argmax draws them) for a model calibrated before it existed or not at all."""
        decision = self.card.get("decision") or {}
        return float((decision.get(LESION_CORE_KEY) or {}).get(decision_key(with_ct), 0.0))

    def working_spacing_mm(self, with_ct: bool) -> float:
        """The voxel size (mm) of the grid the network runs on for SPECT+CT or SPECT-only input: the card's
        calibration (:mod:`calibration` may choose a finer grid than the network learnt on, with the decision
        suited to it), else the training grid (:attr:`spacing_mm`)."""
        decision = self.card.get("decision") or {}
        return float((decision.get(WORKING_SPACING_KEY) or {}).get(decision_key(with_ct), self.spacing_mm))

    def with_lesion_core(self, fraction: float) -> "LoadedModel":
        """The same network with the user's lesion core in place of the calibrated one, for both inputs
        (0: lesions as the weighted argmax draws them). The card records it, so that a fine-tuned model
        saved from it labels as it did. Raises InputError unless 0 <= fraction < 1."""
        if not 0.0 <= fraction < 1.0:
            raise InputError(f"the lesion core is a fraction of each lesion's peak membership in [0, 1), got "
                             f"{fraction}; 0 turns it off")
        decision = dict(self.card.get("decision") or {})
        decision[LESION_CORE_KEY] = {decision_key(with_ct): float(fraction) for with_ct in (True, False)}
        return LoadedModel(self.network, dict(self.card, decision=decision))


def decision_key(with_ct: bool) -> str:
    """The card's ``decision`` entry for SPECT+CT (``spect_ct``) or SPECT-only (``spect_only``) input."""
    return "spect_ct" if with_ct else "spect_only"


def normalisation_card(spacing_mm: float = DEFAULT_SPACING_MM) -> Dict[str, Any]:
    """The preprocessing conventions a model was trained with (see :mod:`preprocessing`)."""
    return {
        "spacing_mm": spacing_mm,
        "spect": f"counts / percentile{SPECT_PERCENTILE}(positive voxels), clipped to [0, {SPECT_CLIP}]",
        "ct": f"(HU - {CT_WINDOW[0]}) / {CT_WINDOW[1]}, clipped to [0, {CT_CLIP}]",
    }


def new_card(network: UNet, spacing_mm: float = DEFAULT_SPACING_MM, **extra: Any) -> Dict[str, Any]:
    """A model card for ``network``; ``extra`` adds fields such as ``training`` and ``validation``."""
    card: Dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": "FCMSegmentation U-Net",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fcmsegmentation_version": __version__,
        "torch_version": torch.__version__,
        "architecture": dict(network.config),
        "classes": list(CLASS_NAMES),
        "input_channels": list(CHANNELS),
        "normalisation": normalisation_card(spacing_mm),
    }
    card.update(extra)
    return card


def _weights_bytes(network: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    torch.save(state, buffer)
    return buffer.getvalue()


def save_model(path: PathLike, network: UNet, card: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``network`` and ``card`` to ``path`` atomically; returns the card as saved (with SHA256)."""
    weights = _weights_bytes(network)
    card = dict(card, architecture=dict(network.config), weights_sha256=hashlib.sha256(weights).hexdigest())
    payload = {
        "card": json.dumps(card, sort_keys=True),
        "weights": torch.frombuffer(bytearray(weights), dtype=torch.uint8),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return card


def read_card(path: PathLike) -> Dict[str, Any]:
    """The card of a model file, after checking it is complete and compatible (weights unchecked)."""
    return _read_payload(Path(path))[0]


def _read_payload(path: Path):
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        card = json.loads(payload["card"])
        weights = payload["weights"]
        if not isinstance(card, dict) or not isinstance(weights, torch.Tensor):
            raise TypeError("unexpected payload")
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise ModelError(
            f"{path}: not a readable FCMSegmentation model (truncated or corrupt: {type(err).__name__}); "
            "download or save it again"
        ) from None
    _check_card(path, card)
    return card, weights


def _check_card(path: Path, card: Dict[str, Any]) -> None:
    version = card.get("format_version")
    if not isinstance(version, int):
        raise ModelError(f"{path}: model card has no format_version; not an FCMSegmentation model")
    if version > FORMAT_VERSION:
        raise ModelError(
            f"{path}: model was saved by a newer FCMSegmentation (format {version} > {FORMAT_VERSION}); "
            "update the extension"
        )
    arch = card.get("architecture")
    if not isinstance(arch, dict):
        raise ModelError(f"{path}: model card has no architecture; not an FCMSegmentation model")
    if arch.get("num_classes") != len(CLASS_NAMES):
        raise ModelError(
            f"{path}: model predicts {arch.get('num_classes')} classes; this version needs "
            f"{len(CLASS_NAMES)} ({', '.join(CLASS_NAMES)})"
        )
    if arch.get("in_channels") != len(CHANNELS):
        raise ModelError(
            f"{path}: model takes {arch.get('in_channels')} input channels; this version gives "
            f"{len(CHANNELS)} ({', '.join(CHANNELS)})"
        )
    _check_decision(path, card.get("decision"))


def _check_decision(path: Path, decision: Any) -> None:
    if decision is None:
        return
    if not isinstance(decision, dict):
        raise ModelError(f"{path}: model card's decision entry is not a mapping; calibrate the model again "
                         "(fcmseg calibrate)")
    for with_ct in (True, False):
        weights = decision.get(decision_key(with_ct))
        if weights is None:
            continue
        if (not isinstance(weights, list) or len(weights) != len(CLASS_NAMES)
                or not all(isinstance(w, (int, float)) and math.isfinite(w) and w > 0 for w in weights)):
            raise ModelError(f"{path}: model card's decision weights {weights!r} are not {len(CLASS_NAMES)} positive "
                             "numbers; calibrate the model again (fcmseg calibrate)")
    cores = decision.get(LESION_CORE_KEY, {})
    if not isinstance(cores, dict) or not all(
            isinstance(core, (int, float)) and 0.0 <= core < 1.0 for core in cores.values()):
        raise ModelError(f"{path}: model card's lesion core {cores!r} is not a fraction in [0, 1) per input; "
                         "calibrate the model again (fcmseg calibrate)")
    spacings = decision.get(WORKING_SPACING_KEY, {})
    if not isinstance(spacings, dict) or not all(
            isinstance(mm, (int, float)) and math.isfinite(mm) and mm > 0 for mm in spacings.values()):
        raise ModelError(f"{path}: model card's working grid {spacings!r} is not a positive voxel size in mm per "
                         "input; calibrate the model again (fcmseg calibrate)")


def load_model(path: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu") -> LoadedModel:
    """Load and verify a model file (the default model when ``path`` is None) onto ``device``."""
    path = Path(path) if path is not None else default_model_path()
    card, weights = _read_payload(path)
    raw = weights.numpy().tobytes()
    if hashlib.sha256(raw).hexdigest() != card.get("weights_sha256"):
        raise ModelError(
            f"{path}: weights do not match the SHA256 in the model card (corrupt or edited file); "
            "download or save the model again"
        )
    try:
        network = build_network(card["architecture"])
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        network.load_state_dict(state)
    except Exception as err:
        raise ModelError(
            f"{path}: weights do not fit the architecture in the card ({type(err).__name__}); the file was not "
            "written by FCMSegmentation's save_model: save or download it again"
        ) from None
    return LoadedModel(network.to(device).eval(), card)


def random_model(device: Union[str, torch.device] = "cpu", seed: int = 0, norm: str = "batch") -> LoadedModel:
    """An untrained network (for tests and smoke runs only: its output is meaningless).

    ``norm="instance"`` gives informative random features (an untrained batch norm has no statistics).
    """
    torch.manual_seed(seed)
    network = UNet(norm=norm)
    return LoadedModel(network.to(device).eval(), new_card(network, name="untrained (random weights)"))


def bundled_models_dir() -> Path:
    """``<module>/Resources/Models`` — where the extension and the source tree keep shipped models."""
    return Path(__file__).resolve().parent.parent / "Resources" / "Models"


def default_model_path() -> Path:
    """The default model: ``$FCMSEG_MODEL`` if set, else the shipped one. Raises if none is installed."""
    override = os.environ.get(MODEL_ENV_VAR)
    path = Path(override) if override else bundled_models_dir() / DEFAULT_MODEL_NAME
    if not path.is_file():
        raise ModelError(
            f"no trained model found at {path}; pass --model PATH (or set {MODEL_ENV_VAR}). "
            "For a smoke test only, --random-weights runs an untrained network"
        )
    return path
