"""Interactive refinement and label-free adaptation of a pretrained model on one image.

Speed comes from the network's split (see :mod:`networks`): the body's per-voxel features are computed
once per image; a refine round fine-tunes only the 1x1 head on them — the semi-supervised loss
``L_RFCM`` (on random crops of the image, biased towards the strokes) ``+ alpha * L_label`` (on the painted
voxels) — so a step costs milliseconds. ``mode="full"`` fine-tunes the whole network instead (slower; the
features are recomputed afterwards).

Every change (refine, adapt, reset) pushes the previous state onto an undo stack. A call that raises,
including a cancel, leaves the session exactly as it was: training works on a copy that is committed only
at the end.
"""
import copy
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from .errors import FCMError, InputError
from .inference import DEFAULT_PATCH, describe_device, resolve_device, sliding_window
from .losses import fcm_label_loss, rfcm_loss
from .modelfile import LoadedModel, PathLike, load_model, save_model
from .networks import UNet, pointwise_head_memberships
from .preprocessing import WorkingCase, prepare_case
from .progress import CancelToken, ProgressCallback, check_cancel, report, scaled
from .scribbles import UNLABELLED, require_strokes, scribbles_to_labels, stroke_counts
from .segmentation import SegmentationResult, mask_outside_field_of_view, result_from_working

MAX_LABELLED_PER_STEP = 20000
HEAD_CHUNK_VOXELS = 2 ** 21


@dataclass
class RefineSettings:
    """Fine-tuning hyper-parameters (the Slicer module's Advanced section exposes the main ones).

    steps / adapt_steps: optimiser steps per refine / adapt call (early stopping may end sooner).
    learning_rate: Adam's step for the head. The head reads batch-normalised features of order 1, so 0.01
    moved the logits by ~10 in 60 steps and flipped whole classes; 1e-3 keeps rounds stable.
    alpha: weight of the label loss on painted voxels (larger than the paper's 0.1: strokes are few).
    anchor: weight of the mean squared change of the memberships from the start of the round. Without
    it the whole-image RFCM term pulls the head to plain SPECT-intensity clusters, which on an image
    unlike the training data are not the anatomical classes (measured: bone Dice 0.74 -> 0.00 in one
    round); with it a round changes what the strokes ask for and little else.
    beta, q: RFCM spatial weight and fuzzifier. crop: side of the random crops for RFCM (voxels).
    rfcm_channels / channel_weights: which input channels are the RFCM intensities (0 SPECT, 1 CT; CT
    is used only when present) and their weights. Default SPECT alone, as in training: CT's air /
    tissue / bone clusters do not match the classes. mode: "head" (fast) or "full" (whole network).
    """

    steps: int = 60
    adapt_steps: int = 30
    learning_rate: float = 1e-3
    full_learning_rate: float = 2e-4
    alpha: float = 1.0
    anchor: float = 5.0
    beta: float = 0.0008
    q: float = 2.0
    crop: int = 48
    stroke_crop_fraction: float = 0.5
    rfcm_channels: Tuple[int, ...] = (0,)
    channel_weights: Tuple[float, ...] = (1.0,)
    patience: int = 20
    mode: str = "head"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("head", "full"):
            raise InputError(f"refinement mode must be 'head' or 'full', not {self.mode!r}")
        if self.steps < 1 or self.adapt_steps < 1:
            raise InputError("steps must be at least 1")
        if self.alpha < 0 or self.beta < 0 or self.anchor < 0:
            raise InputError("alpha, beta and anchor must be non-negative")


@dataclass
class _State:
    """A committed model state: weights and the body features computed with them."""

    weights: Dict[str, torch.Tensor]
    features: torch.Tensor  # (1, F, Z, Y, X) on the session's device


@dataclass
class RoundRecord:
    action: str
    steps: int
    final_loss: float
    seconds: float
    strokes: Dict[str, int] = field(default_factory=dict)


class EarlyStopping:
    """Stop when an exponential moving average of the loss has not improved for ``patience`` steps.

    Each step's loss comes from a different random crop, so raw losses are noisy; and the anchor term
    starts at 0 and grows, so the first raw loss is rarely beaten (measured: every round stopped at
    exactly ``patience`` steps). The average smooths both out.
    """

    def __init__(self, patience: int, smoothing: float = 0.1, tolerance: float = 1e-3):
        self.patience, self.smoothing, self.tolerance = patience, smoothing, tolerance
        self.average: Optional[float] = None
        self.best = float("inf")
        self.since_best = 0

    def should_stop(self, loss: float) -> bool:
        self.average = loss if self.average is None else (1 - self.smoothing) * self.average + self.smoothing * loss
        if self.average < self.best - self.tolerance * abs(self.best) or self.best == float("inf"):
            self.best, self.since_best = self.average, 0
        else:
            self.since_best += 1
        return self.since_best >= self.patience


def _clone_weights(network: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


class RefinementSession:
    """Fine-tune a segmentation model on one SPECT(/CT) image; see the module docstring.

    Construction computes the body features (a sliding-window pass: the slow part, with progress).
    """

    def __init__(
        self,
        spect: sitk.Image,
        ct: Optional[sitk.Image] = None,
        model: Union[LoadedModel, PathLike, None] = None,
        device: str = "auto",
        settings: Optional[RefineSettings] = None,
        patch: int = DEFAULT_PATCH,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ):
        self.device = resolve_device(device)
        self.settings = settings or RefineSettings()
        loaded = model if isinstance(model, LoadedModel) else load_model(model, self.device)
        # A private copy: fine-tuning must never leak into the caller's model (or the next session's).
        self.model = LoadedModel(copy.deepcopy(loaded.network).to(self.device).eval(), copy.deepcopy(loaded.card))
        self.patch = patch
        report(progress, 0.0, "preparing images")
        self.case: WorkingCase = prepare_case(spect, ct, self.model.spacing_mm)
        self._intensities, self._mask = self._rfcm_inputs()
        self._valid_voxels = np.argwhere(self.case.valid)  # crop centres: RFCM needs voxels in the FOV
        features = self._compute_features(self.model.network, scaled(progress, 0.05, 1.0), cancel)
        torch.optim.Adam(self.model.network.head.parameters())  # first use imports torch._dynamo (~2 s): pay it here
        self._pretrained = _State(_clone_weights(self.model.network), features)
        self._state = self._pretrained
        self._undo: List[_State] = []
        self.history: List[RoundRecord] = []

    # ----- public API -------------------------------------------------------------------------
    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def device_description(self) -> str:
        return describe_device(self.device)

    def segment(self) -> SegmentationResult:
        """The current model's segmentation of the session's image."""
        return result_from_working(self.memberships_working(), self.case, self.device_description, [])

    def refine(
        self,
        scribbles: sitk.Image,
        steps: Optional[int] = None,
        alpha: Optional[float] = None,
        beta: Optional[float] = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> SegmentationResult:
        """Fine-tune on painted strokes (codes 0 none, 1 background, 2 bone, 3 lesion; any grid).

        ``steps``, ``alpha`` and ``beta`` override the session's settings for this call only.
        """
        labels = scribbles_to_labels(scribbles, self.case)
        require_strokes(labels)
        settings = self._call_settings(steps=steps, alpha=alpha, beta=beta)
        return self._fine_tune("refine", labels, settings, settings.steps, progress, cancel)

    def adapt(
        self,
        steps: Optional[int] = None,
        beta: Optional[float] = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> SegmentationResult:
        """Label-free adaptation: fine-tune with L_RFCM alone on this image (new scanner/reconstruction)."""
        labels = np.full(self.case.valid.shape, UNLABELLED, dtype=np.int64)
        settings = self._call_settings(adapt_steps=steps, alpha=0.0, beta=beta)
        return self._fine_tune("adapt", labels, settings, settings.adapt_steps, progress, cancel)

    def undo(self) -> SegmentationResult:
        """Return to the state before the last refine, adapt or reset."""
        if not self._undo:
            raise FCMError("nothing to undo")
        self._commit(self._undo.pop(), push=False)
        self.history.append(RoundRecord("undo", 0, float("nan"), 0.0))
        return self.segment()

    def reset(self) -> SegmentationResult:
        """Back to the pretrained weights (undoable)."""
        self._commit(self._pretrained, push=True)
        self.history.append(RoundRecord("reset", 0, float("nan"), 0.0))
        return self.segment()

    def save(self, path: PathLike) -> Dict[str, Any]:
        """Write the current (fine-tuned) model with its card, atomically; returns the card."""
        card = copy.deepcopy(self.model.card)
        card["name"] = f"{card.get('name', 'model')} (fine-tuned)"
        card["fine_tuning"] = {
            "settings": asdict(self.settings),
            "rounds": [asdict(r) for r in self.history],
            "base_weights_sha256": self.model.card.get("weights_sha256"),
        }
        return save_model(path, self.model.network, card)

    # ----- internals ----------------------------------------------------------------------------
    def _call_settings(self, **overrides: Any) -> RefineSettings:
        """The session's settings with this call's non-None overrides (validated)."""
        return replace(self.settings, **{k: v for k, v in overrides.items() if v is not None})

    def _rfcm_inputs(self) -> Tuple[torch.Tensor, torch.Tensor]:
        channels = [c for c in self.settings.rfcm_channels if c == 0 or self.case.has_ct]
        intensities = torch.from_numpy(self.case.features[channels][None]).to(self.device)
        mask = torch.from_numpy(self.case.valid[None, None]).to(self.device)
        return intensities, mask

    def _channel_weights(self) -> torch.Tensor:
        count = self._intensities.shape[1]
        return torch.tensor(self.settings.channel_weights[:count], dtype=torch.float32, device=self.device)

    def _compute_features(self, network: UNet, progress, cancel) -> torch.Tensor:
        width = network.config["channels"][0]
        features = sliding_window(network.features, self.case.features, width, self.device,
                                  network.size_multiple, self.patch, progress=progress, cancel=cancel)
        return torch.from_numpy(features[None]).to(self.device)

    @staticmethod
    def _head_memberships(head: torch.nn.Sequential, features: torch.Tensor) -> torch.Tensor:
        """(1, F, *spatial) cached features -> (1, K, *spatial) memberships, via matrix products."""
        flat = pointwise_head_memberships(head, features.reshape(features.shape[1], -1))
        return flat.reshape((1, -1) + tuple(features.shape[2:]))

    def memberships_working(self) -> np.ndarray:
        """Current memberships (K, Z, Y, X) on the working grid, computed from the cached features."""
        features = self._state.features
        depth = max(1, HEAD_CHUNK_VOXELS // max(1, features[0, 0, 0].numel()))
        with torch.no_grad():
            parts = [self._head_memberships(self.model.network.head, features[:, :, z:z + depth]).cpu()
                     for z in range(0, features.shape[2], depth)]
        memberships = torch.cat(parts, dim=2)[0].numpy()
        return mask_outside_field_of_view(memberships, self.case.valid)

    def _commit(self, state: _State, push: bool) -> None:
        if push:
            self._undo.append(self._state)
        self._state = state
        self.model.network.load_state_dict(state.weights)

    def _fine_tune(self, action: str, labels: np.ndarray, settings: RefineSettings, steps: int,
                   progress: Optional[ProgressCallback], cancel: Optional[CancelToken]) -> SegmentationResult:
        start = time.monotonic()
        trainee = copy.deepcopy(self.model.network).to(self.device)
        full = settings.mode == "full"
        train_progress = scaled(progress, 0.0, 0.6 if full else 0.95)
        final_loss, steps_run = self._optimise(trainee, labels, settings, steps, full, train_progress, cancel)
        features = (self._compute_features(trainee.eval(), scaled(progress, 0.6, 0.95), cancel)
                    if full else self._state.features)
        check_cancel(cancel)
        self._commit(_State(_clone_weights(trainee), features), push=True)
        self.history.append(RoundRecord(action, steps_run, final_loss, time.monotonic() - start, stroke_counts(labels)))
        report(progress, 1.0, f"{action}: done")
        return self.segment()

    def _optimise(self, trainee: UNet, labels: np.ndarray, settings: RefineSettings, steps: int, full: bool,
                  progress: Optional[ProgressCallback], cancel: Optional[CancelToken]) -> Tuple[float, int]:
        """Fine-tune ``trainee``; returns (last loss, steps run)."""
        # Seeded by the undo depth: refine -> undo -> refine repeats the first round exactly.
        rng = np.random.default_rng(settings.seed + len(self._undo))
        labelled = np.argwhere(labels != UNLABELLED)
        parameters = trainee.parameters() if full else trainee.head.parameters()
        optimiser = torch.optim.Adam(parameters, lr=settings.full_learning_rate if full else settings.learning_rate)
        trainee.eval()  # batch norm keeps its trained statistics: one image is not a batch to learn them from
        stopper = EarlyStopping(settings.patience)
        loss_value = float("nan")
        for step in range(steps):
            check_cancel(cancel)
            optimiser.zero_grad(set_to_none=True)
            loss = self._step_loss(trainee, labels, labelled, settings, full, rng)
            loss.backward()
            optimiser.step()
            loss_value = float(loss.detach())
            report(progress, (step + 1) / steps, f"step {step + 1}/{steps}, loss {loss_value:.4f}")
            if stopper.should_stop(loss_value):
                break
        return loss_value, step + 1

    def _step_loss(self, trainee: UNet, labels: np.ndarray, labelled: np.ndarray, settings: RefineSettings,
                   full: bool, rng: np.random.Generator) -> torch.Tensor:
        alpha, q = settings.alpha, settings.q
        region = self._sample_crop(labelled, rng, settings, multiple=trainee.size_multiple if full else 1)
        crop = (slice(None), slice(None)) + region
        if full:
            memberships = trainee(torch.from_numpy(self.case.features[None][crop]).to(self.device))
        else:
            memberships = self._head_memberships(trainee.head, self._state.features[crop])
        loss = rfcm_loss(memberships, self._intensities[crop], q=q, beta=settings.beta,
                         mask=self._mask[crop], channel_weights=self._channel_weights())
        if settings.anchor > 0:
            with torch.no_grad():
                before = self._head_memberships(self.model.network.head, self._state.features[crop])
            mask = self._mask[crop].to(memberships.dtype)
            change = ((memberships - before) ** 2).sum(dim=1, keepdim=True)
            loss = loss + settings.anchor * (change * mask).sum() / mask.sum().clamp_min(1.0)
        if alpha == 0 or len(labelled) == 0:
            return loss
        if full:  # label loss on the painted voxels inside this crop
            crop_labels = torch.from_numpy(labels[region][None]).to(self.device)
            if (crop_labels != UNLABELLED).any():
                loss = loss + alpha * fcm_label_loss(memberships, crop_labels, q=q)
            return loss
        chosen = labelled if len(labelled) <= MAX_LABELLED_PER_STEP else \
            labelled[rng.choice(len(labelled), MAX_LABELLED_PER_STEP, replace=False)]
        z, y, x = (torch.from_numpy(chosen[:, i]).to(self.device) for i in range(3))
        voxel_memberships = pointwise_head_memberships(trainee.head, self._state.features[0][:, z, y, x])
        target = torch.from_numpy(labels[chosen[:, 0], chosen[:, 1], chosen[:, 2]]).to(self.device)
        return loss + alpha * fcm_label_loss(voxel_memberships[None, :, :, None], target[None, :, None], q=q)

    def _sample_crop(self, labelled: np.ndarray, rng: np.random.Generator, settings: RefineSettings,
                     multiple: int) -> Tuple[slice, ...]:
        shape = np.array(self.case.valid.shape)
        size = np.minimum(shape, settings.crop)
        if multiple > 1:  # the full network needs sizes divisible by its pooling factor
            size = size // multiple * multiple
            if np.any(size == 0) or np.all(size == multiple):  # a 1-voxel bottleneck cannot be normalised
                raise InputError(f"full fine-tuning needs an image of at least {multiple} voxels per axis and "
                                 f"{2 * multiple} along one; use mode 'head'")
        if len(labelled) and rng.random() < settings.stroke_crop_fraction:
            centre = labelled[rng.integers(len(labelled))]
        else:
            centre = self._valid_voxels[rng.integers(len(self._valid_voxels))]
        begin = np.clip(centre - size // 2, 0, np.maximum(shape - size, 0))
        return tuple(slice(int(b), int(b + s)) for b, s in zip(begin, size))
