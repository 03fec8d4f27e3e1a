"""Interactive refinement and label-free adaptation of a pretrained model on one image.

Speed comes from the network's split (see :mod:`networks`): the body's per-voxel features are computed
once per image; a refine round fine-tunes only the 1x1 head on them — the semi-supervised loss
``L_RFCM`` (on random crops of the image, biased towards the strokes) ``+ alpha * L_label`` (on the painted
voxels) — so a step costs milliseconds. ``mode="full"`` fine-tunes the whole network instead (slower; the
features are recomputed afterwards).

The head is one function of the features for the whole image, so on its own it cannot correct one region
without changing every region that looks alike (measured: a lesion painted on an image unlike the
training data was not learned at all, and bone got worse). Each refine round therefore also fine-tunes
*stroke-local logit offsets*: a coarse grid of per-class offsets (a node every ``offset_cell`` working
voxels, trilinear in between, zero until strokes move them) added to the head's logits. The label loss
moves them near the strokes, RFCM shapes the region around them by intensity, and the anchor keeps them at
zero elsewhere. They belong to this image: ``save`` writes the fine-tuned network, not them. Painted voxels
keep their painted class in the result, as in Slicer's Grow-from-seeds.

Every change (refine, adapt, reset) pushes the previous state onto an undo stack. A call that raises,
including a cancel, leaves the session exactly as it was: training works on a copy that is committed only
at the end.
"""
import copy
import functools
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from .errors import FCMError, InputError
from .inference import DEFAULT_PATCH, describe_device, resolve_device, sliding_window
from .lesion_filter import drop_lesions_outside_bone
from .losses import fcm_label_loss, rfcm_loss
from .modelfile import LoadedModel, PathLike, load_model, save_model
from .networks import UNet, pointwise_head_logits
from .preprocessing import LESION, WorkingCase, array_to_image, prepare_case
from .progress import CancelToken, ProgressCallback, check_cancel, report, scaled
from .scribbles import LESION_CODE, UNLABELLED, require_strokes, scribbles_to_labels, scribbles_to_output, stroke_counts
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
    anchor: weight of the mean squared change of the memberships (away from the painted voxels) from
    those the first refine round started from. Without it the whole-image RFCM term pulls the head to
    plain SPECT-intensity clusters, which on an image unlike the training data are not the anatomical
    classes (measured: bone Dice 0.74 -> 0.00 in one round); with it a round changes what the strokes ask
    for and little else. The reference stays fixed over a series of refine rounds (until adapt or
    reset): anchored to each round's start instead, small changes added up round after round
    (scripts/bench_refine.py, 3 rounds: bone -0.014 with that anchor, -0.002 with this one; on
    validation phantoms with one same model, lesion Dice also fell after round 1 instead of rising).
    Adapt calls in a row share their series' reference the same way (scripts/bench_adapt.py, images
    with the SPECT's normalisation doubled: 3 calls cost bone -0.023 anchored to each call's start).
    offset_cell / offset_learning_rate: spacing (working voxels; 2 = 6 mm) of the stroke-local logit
    offsets and their Adam step (logit units per step); offset_cell 0 fine-tunes the head alone. Cells
    of 3 (9 mm) let one stroke spill into the next structure (measured: bone Dice fell, lesion gains halved).
    beta, q: RFCM spatial weight and fuzzifier. crop: side of the random crops for RFCM (voxels); 40 and
    30 steps keep a round near Grow-from-seeds' incremental update at 128^3 on 2 CPU cores (48 and 60 steps
    did not; scripts/bench_refine.py).
    pull_confirmed: whether painted voxels that both the current result and the one this series of refine
    rounds started from (the anchor's reference) label as painted pull in the label loss even while they
    stay right. False: such confirming strokes pull only while a step's memberships label them wrong; the
    other strokes, which correct the result, pull throughout. Adam's steps do not shrink with the loss, so
    a confirmed voxel kept pushing its class up, and the head and offsets spread the push to its unpainted
    neighbours: a lesion stroke inside a lesion drawn too large grew it (scripts/render_walkthrough.py's
    sample: lesion Dice 0.43 -> 0.37; now 0.43 -> 0.55). Correcting strokes pull throughout because,
    released whenever right, they sat on the decision boundary and repeated rounds with the same strokes
    drifted ever further from the anchor (measured on the test case over 8 rounds); confirming strokes
    still pull when wrong, or the other strokes eat the region they confirm.
    rfcm_channels / channel_weights: which input channels are the RFCM intensities (0 SPECT, 1 CT; CT
    is used only when present) and their weights. Default SPECT alone, as in training: CT's air /
    tissue / bone clusters do not match the classes. mode: "head" (fast) or "full" (whole network).
    """

    steps: int = 30
    adapt_steps: int = 30
    learning_rate: float = 1e-3
    offset_cell: int = 2
    offset_learning_rate: float = 0.1
    full_learning_rate: float = 2e-4
    alpha: float = 1.0
    anchor: float = 5.0
    beta: float = 0.0008
    q: float = 2.0
    crop: int = 40
    stroke_crop_fraction: float = 0.5
    rfcm_channels: Tuple[int, ...] = (0,)
    channel_weights: Tuple[float, ...] = (1.0,)
    patience: int = 20
    pull_confirmed: bool = False
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
    offsets: Optional[torch.Tensor] = None  # (1, K, cz, cy, cx) coarse logit offsets of this image, or None
    offset_cell: int = 0  # working voxels between the offsets' nodes
    painted: Optional[np.ndarray] = None  # stroke codes on the output grid, kept in the result as painted
    anchor: Optional[torch.Tensor] = None  # memberships this series of calls started from; None: own
    series: Optional[str] = None  # the action ("refine" or "adapt") whose series this state belongs to
    memberships: Optional[torch.Tensor] = None  # (1, K, Z, Y, X) computed once, on first use


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
        keep_lesions_outside_bone: bool = False,
        complete_cortex_edge: bool = True,
        align: bool = True,
        drop_faint_lesions: bool = False,
    ):
        self.device = resolve_device(device)
        self.keep_lesions_outside_bone = keep_lesions_outside_bone
        self.complete_cortex_edge = complete_cortex_edge
        self.drop_faint_lesions = drop_faint_lesions
        self.settings = settings or RefineSettings()
        loaded = model if isinstance(model, LoadedModel) else load_model(model, self.device)
        # A private copy: fine-tuning must never leak into the caller's model (or the next session's).
        self.model = LoadedModel(copy.deepcopy(loaded.network).to(self.device).eval(), copy.deepcopy(loaded.card))
        self.patch = patch
        report(progress, 0.0, "preparing images")
        self.case: WorkingCase = prepare_case(spect, ct, self.model.working_spacing_mm(ct is not None),
                                              self.model.segments_beyond_spect, align)
        self._intensities, self._mask = self._rfcm_inputs()
        self._decision_weights = torch.tensor(self.model.decision_weights(self.case.has_ct), device=self.device)
        # the anchor holds every voxel that gets a prediction, beyond the SPECT field too
        self._anchored = torch.from_numpy(self.case.segmented[None, None]).to(self.device)
        self._valid_voxels = np.argwhere(self.case.valid)  # crop centres: RFCM needs voxels in the FOV
        features = self._compute_features(self.model.network, scaled(progress, 0.05, 1.0), cancel)
        torch.optim.Adam(self.model.network.head.parameters())  # first use imports torch._dynamo (~2 s): pay it here
        self._pretrained = _State(_clone_weights(self.model.network), features)
        self._state = self._pretrained
        self._state_memberships()  # the first segmentation and the first round's anchor read them
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
        """The current model's segmentation of the session's image; with a CT, as in :func:`segment`,
        predicted lesions not in bone are left out unless painted as lesion or ``keep_lesions_outside_bone``,
        small faint lesions are left out if ``drop_faint_lesions`` unless painted as lesion, and the dense
        edge of bone is completed from the CT unless not ``complete_cortex_edge``."""
        memberships, notes = self.memberships_working(), []
        if not self.keep_lesions_outside_bone:
            memberships, notes = drop_lesions_outside_bone(memberships, self.case, keep=self._painted_lesion())
        return result_from_working(memberships, self.case, self.device_description, notes,
                                   self.model.decision_weights(self.case.has_ct), painted=self._state.painted,
                                   complete_cortex_edge=self.complete_cortex_edge,
                                   lesion_core=self.lesion_core, drop_faint_lesions=self.drop_faint_lesions)

    @property
    def lesion_core(self) -> float:
        """The fraction of each lesion's peak membership that the labels keep as lesion, for this image's
        input (SPECT+CT or SPECT only): the model's calibrated core unless :meth:`set_lesion_core` changed it."""
        return self.model.lesion_core(self.case.has_ct)

    def set_lesion_core(self, fraction: float) -> SegmentationResult:
        """The current memberships labelled again with another lesion core (of each lesion, the voxels with at
        least ``fraction`` of its peak lesion membership; 0: lesions as wide as the decision draws them;
        :mod:`lesion_core`), without running the network. Later rounds and :meth:`save` keep it. Raises
        InputError unless 0 <= fraction < 1."""
        self.model = self.model.with_lesion_core(fraction)
        return self.segment()

    def set_drop_faint_lesions(self, drop: bool) -> SegmentationResult:
        """The current memberships labelled again with the small faint lesions dropped (with a CT;
        :mod:`faint_lesions`) or kept, without running the network. Later rounds keep the choice."""
        self.drop_faint_lesions = bool(drop)
        return self.segment()

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
        painted = scribbles_to_output(scribbles, self.case)
        return self._fine_tune("refine", labels, settings, settings.steps, progress, cancel, painted)

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
        return self._fine_tune("adapt", labels, settings, settings.adapt_steps, progress, cancel, self._state.painted)

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
    def _painted_lesion(self) -> Optional[np.ndarray]:
        """Bool (Z, Y, X): working voxels painted as lesion so far, or None."""
        painted = self._state.painted
        if painted is None or not (painted == LESION_CODE).any():
            return None
        return scribbles_to_labels(array_to_image(painted, self.case.output_reference), self.case) == LESION

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
    def _head_logits(head: torch.nn.Sequential, features: torch.Tensor) -> torch.Tensor:
        """(1, F, *spatial) cached features -> (1, K, *spatial) logits, via matrix products."""
        flat = pointwise_head_logits(head, features.reshape(features.shape[1], -1))
        return flat.reshape((1, -1) + tuple(features.shape[2:])).float()

    def _offset_grid(self, offsets: Optional[torch.Tensor], train: bool, cell: int) -> Optional[torch.Tensor]:
        """This round's coarse logit offsets: a copy of the current ones (zeros if none and ``train``)."""
        if not train:
            return offsets
        if offsets is None:
            coarse = [-(-(n - 1) // cell) + 1 for n in self.case.valid.shape]
            offsets = torch.zeros([1, self.model.network.config["num_classes"]] + coarse, device=self.device)
        return offsets.detach().clone().requires_grad_(True)

    def _logits(self, head: torch.nn.Sequential, features: torch.Tensor, offsets: Optional[torch.Tensor],
                cell: int, region: Tuple[slice, ...]) -> torch.Tensor:
        """Logits (1, K, *region) of the head on the cached features plus the upsampled offsets."""
        logits = self._head_logits(head, features[(slice(None), slice(None)) + region])
        return with_offsets(logits, offsets, cell, region)

    def _state_memberships(self) -> torch.Tensor:
        """The current state's memberships (1, K, Z, Y, X) on the device, computed once per state (the
        result and the next round's anchor both read them)."""
        state = self._state
        if state.memberships is None:
            features = state.features
            depth = max(1, HEAD_CHUNK_VOXELS // max(1, features[0, 0, 0].numel()))
            whole = tuple(slice(0, n) for n in features.shape[3:])
            with torch.no_grad():
                parts = [torch.softmax(self._logits(self.model.network.head, features, state.offsets,
                                                    state.offset_cell,
                                                    (slice(z, min(z + depth, features.shape[2])),) + whole), dim=1)
                         for z in range(0, features.shape[2], depth)]
            state.memberships = torch.cat(parts, dim=2)
        return state.memberships

    def _confirming(self, labels: np.ndarray, reference: torch.Tensor) -> np.ndarray:
        """Bool (Z, Y, X): the painted voxels that both ``reference`` (1, K, Z, Y, X) and the current
        memberships label as painted."""
        points = np.nonzero(labels != UNLABELLED)
        painted = torch.from_numpy(labels[points]).to(self.device)[None, :, None]  # (1, n, 1)
        index = (slice(None),) + tuple(torch.from_numpy(p).to(self.device) for p in points)
        right = torch.ones(painted.shape[1], dtype=torch.bool, device=self.device)
        for memberships in (reference, self._state_memberships()):
            at = memberships[0][index][None, :, :, None]  # (1, K, n, 1)
            right &= still_wrong(at, painted, self._decision_weights)[0, :, 0] == UNLABELLED
        confirming = np.zeros(labels.shape, dtype=bool)
        confirming[points] = right.cpu().numpy()
        return confirming

    def _pulling(self, memberships: torch.Tensor, labels: torch.Tensor, confirming: Optional[torch.Tensor]
                 ) -> torch.Tensor:
        """The painted ``labels`` the label loss counts this step: confirming voxels only while the
        ``memberships`` label them wrong (see ``RefineSettings.pull_confirmed``)."""
        if confirming is None:
            return labels
        return torch.where(confirming, still_wrong(memberships, labels, self._decision_weights), labels)

    def _anchor_reference(self, action: str) -> torch.Tensor:
        """(1, K, Z, Y, X) memberships the anchor term holds this call near: those before the first call of
        the series of ``action`` calls in a row (refine rounds, or adapt calls) that this one continues; the
        current ones when it starts a series (after reset, or after a call of the other action)."""
        if self._state.series == action and self._state.anchor is not None:
            return self._state.anchor
        return self._state_memberships()

    def memberships_working(self) -> np.ndarray:
        """Current memberships (K, Z, Y, X) on the working grid, computed from the cached features."""
        return mask_outside_field_of_view(self._state_memberships()[0].cpu().numpy(), self.case)

    def _commit(self, state: _State, push: bool) -> None:
        if push:
            self._state.memberships = None  # recomputed on undo: keeps the undo stack's memory to weights
            self._undo.append(self._state)
        self._state = state
        self.model.network.load_state_dict(state.weights)

    def _fine_tune(self, action: str, labels: np.ndarray, settings: RefineSettings, steps: int,
                   progress: Optional[ProgressCallback], cancel: Optional[CancelToken],
                   painted: Optional[np.ndarray]) -> SegmentationResult:
        start = time.monotonic()
        trainee = copy.deepcopy(self.model.network).to(self.device)
        # stroke-local offsets only learn from strokes: adaptation keeps them as they are
        cell = self._state.offset_cell if self._state.offsets is not None else settings.offset_cell
        train_offsets = action == "refine" and cell > 0
        offsets = self._offset_grid(self._state.offsets, train_offsets, cell)
        full = settings.mode == "full"
        train_progress = scaled(progress, 0.0, 0.6 if full else 0.95)
        reference = self._anchor_reference(action)
        confirming = self._confirming(labels, reference) if action == "refine" and not settings.pull_confirmed else None
        final_loss, steps_run = self._optimise(trainee, offsets if train_offsets else None, cell, labels, confirming,
                                               reference, settings, steps, full, train_progress, cancel)
        features = (self._compute_features(trainee.eval(), scaled(progress, 0.6, 0.95), cancel)
                    if full else self._state.features)
        check_cancel(cancel)
        kept = None if offsets is None else offsets.detach()
        self._commit(_State(_clone_weights(trainee), features, kept, cell if kept is not None else 0, painted,
                            anchor=reference, series=action), push=True)
        self.history.append(RoundRecord(action, steps_run, final_loss, time.monotonic() - start, stroke_counts(labels)))
        report(progress, 1.0, f"{action}: done")
        return self.segment()

    def _optimise(self, trainee: UNet, offsets: Optional[torch.Tensor], cell: int, labels: np.ndarray,
                  confirming: Optional[np.ndarray], reference: torch.Tensor, settings: RefineSettings,
                  steps: int, full: bool, progress: Optional[ProgressCallback], cancel: Optional[CancelToken]
                  ) -> Tuple[float, int]:
        """Fine-tune ``trainee`` (and ``offsets`` when given, in place); returns (last loss, steps run)."""
        # Seeded by the undo depth: refine -> undo -> refine repeats the first round exactly.
        rng = np.random.default_rng(settings.seed + len(self._undo))
        labelled = np.argwhere(labels != UNLABELLED)
        groups = [{"params": list(trainee.parameters() if full else trainee.head.parameters()),
                   "lr": settings.full_learning_rate if full else settings.learning_rate}]
        if offsets is not None:
            groups.append({"params": [offsets], "lr": settings.offset_learning_rate})
        optimiser = _adam(groups)
        trainee.eval()  # batch norm keeps its trained statistics: one image is not a batch to learn them from
        stopper = EarlyStopping(settings.patience)
        loss_value = float("nan")
        for step in range(steps):
            check_cancel(cancel)
            optimiser.zero_grad(set_to_none=True)
            loss = self._step_loss(trainee, offsets, cell, labels, labelled, confirming, reference, settings, full,
                                   rng)
            loss.backward()
            optimiser.step()
            loss_value = float(loss.detach())
            report(progress, (step + 1) / steps, f"step {step + 1}/{steps}, loss {loss_value:.4f}")
            if stopper.should_stop(loss_value):
                break
        return loss_value, step + 1

    def _step_loss(self, trainee: UNet, offsets: Optional[torch.Tensor], cell: int, labels: np.ndarray,
                   labelled: np.ndarray, confirming: Optional[np.ndarray], reference: torch.Tensor,
                   settings: RefineSettings, full: bool, rng: np.random.Generator) -> torch.Tensor:
        alpha, q = settings.alpha, settings.q
        region = self._sample_crop(labelled, rng, settings, multiple=trainee.size_multiple if full else 1)
        crop = (slice(None), slice(None)) + region
        if full:
            inputs = torch.from_numpy(self.case.features[None][crop]).to(self.device)
            logits = with_offsets(trainee.logits(inputs).float(), offsets, cell, region)
        else:
            logits = self._logits(trainee.head, self._state.features, offsets, cell, region)
        memberships = torch.softmax(logits, dim=1)
        loss = rfcm_loss(memberships, self._intensities[crop], q=q, beta=settings.beta,
                         mask=self._mask[crop], channel_weights=self._channel_weights())
        if settings.anchor > 0:
            before = reference[crop]
            # painted voxels are free to change: they keep their painted class in the result anyway
            mask = (self._anchored[crop] & torch.from_numpy(labels[region] == UNLABELLED)[None, None].to(self.device))
            mask = mask.to(memberships.dtype)
            change = ((memberships - before) ** 2).sum(dim=1, keepdim=True)
            loss = loss + settings.anchor * (change * mask).sum() / mask.sum().clamp_min(1.0)
        if alpha == 0 or len(labelled) == 0:
            return loss
        if full:  # label loss on the painted voxels inside this crop
            crop_confirming = None if confirming is None else torch.from_numpy(confirming[region][None]).to(self.device)
            crop_labels = self._pulling(memberships, torch.from_numpy(labels[region][None]).to(self.device),
                                        crop_confirming)
            if (crop_labels != UNLABELLED).any():
                loss = loss + alpha * balanced_label_loss(memberships, crop_labels, q)
            return loss
        chosen = labelled if len(labelled) <= MAX_LABELLED_PER_STEP else \
            labelled[rng.choice(len(labelled), MAX_LABELLED_PER_STEP, replace=False)]
        points = torch.from_numpy(chosen).to(self.device)
        voxel_logits = pointwise_head_logits(trainee.head, self._state.features[0][:, points[:, 0], points[:, 1],
                                                                                   points[:, 2]]).float()
        if offsets is not None:
            voxel_logits = voxel_logits + offsets_at(offsets, points, cell)
        where = (chosen[:, 0], chosen[:, 1], chosen[:, 2])
        target = torch.from_numpy(labels[where]).to(self.device)[None, :, None]
        chosen_confirming = (None if confirming is None
                             else torch.from_numpy(confirming[where]).to(self.device)[None, :, None])
        voxel_memberships = torch.softmax(voxel_logits, dim=0)[None, :, :, None]
        target = self._pulling(voxel_memberships, target, chosen_confirming)
        return loss + alpha * balanced_label_loss(voxel_memberships, target, q)

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


def _adam(groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
    """Adam, fused where this torch runs it on the parameters' device (several times faster on the offsets)."""
    device = groups[0]["params"][0].device
    return torch.optim.Adam(groups, fused=True) if fused_adam_runs(str(device)) else torch.optim.Adam(groups)


@functools.lru_cache(maxsize=None)
def fused_adam_runs(device: str) -> bool:
    """Whether fused Adam takes a step on ``device`` with this torch. Tried, not read off the version: torch
    before 2.4 accepts ``fused=True`` for CPU tensors and fails only at the first step (no CPU kernel)."""
    probe = torch.zeros(1, device=device, requires_grad=True)
    try:
        optimiser = torch.optim.Adam([probe], fused=True)
        probe.grad = torch.ones_like(probe)
        optimiser.step()
    except (RuntimeError, TypeError):  # NotImplementedError is a RuntimeError
        return False
    return True


def balanced_label_loss(memberships: torch.Tensor, labels: torch.Tensor, q: float) -> torch.Tensor:
    """The FCM label loss averaged per painted class, so a class painted with few voxels (a lesion stroke
    next to long background strokes) weighs as much as the others.

    memberships: (N, K, *spatial); labels: (N, *spatial) with ``UNLABELLED`` where unpainted.
    """
    present = [k for k in torch.unique(labels).tolist() if k != UNLABELLED]
    losses = [fcm_label_loss(memberships, labels, q=q, ignore_index=UNLABELLED, mask=labels == k) for k in present]
    return torch.stack(losses).mean() if losses else memberships.sum() * 0.0


def still_wrong(memberships: torch.Tensor, labels: torch.Tensor, decision_weights: torch.Tensor) -> torch.Tensor:
    """``labels`` with ``UNLABELLED`` where the painted class already wins the decision (the argmax of
    ``decision_weights[k] * memberships[k]``, ties counted as won): the painted voxels labelled wrong.

    memberships: (N, K, *spatial); labels: (N, *spatial) painted classes or ``UNLABELLED``; decision_weights: (K,).
    """
    weighted = memberships.detach() * decision_weights.reshape((1, -1) + (1,) * (memberships.dim() - 2))
    painted = labels.clamp_min(0).unsqueeze(1)
    own = weighted.gather(1, painted)
    best_other = weighted.scatter(1, painted, float("-inf")).amax(dim=1, keepdim=True)
    right = (own >= best_other).squeeze(1) & (labels != UNLABELLED)
    return labels.masked_fill(right, UNLABELLED)


def with_offsets(logits: torch.Tensor, offsets: Optional[torch.Tensor], cell: int, region: Tuple[slice, ...]
                 ) -> torch.Tensor:
    """Logits (1, K, *region) plus the stroke-local offsets upsampled on ``region`` (unchanged if none)."""
    return logits if offsets is None else logits + upsample_offsets(offsets, region, cell)


def upsample_offsets(offsets: torch.Tensor, region: Tuple[slice, ...], cell: int) -> torch.Tensor:
    """Trilinear values of coarse offsets (1, K, cz, cy, cx) on the working-grid ``region`` -> (1, K, *region).

    Coarse node ``i`` sits on working voxel ``i * cell``; only the nodes around the region are upsampled.
    """
    low = [r.start // cell for r in region]
    high = [-(-(r.stop - 1) // cell) for r in region]
    nodes = offsets[(slice(None), slice(None)) + tuple(slice(lo, hi + 1) for lo, hi in zip(low, high))]
    size = [(hi - lo) * cell + 1 for lo, hi in zip(low, high)]
    fine = torch.nn.functional.interpolate(nodes, size=size, mode="trilinear", align_corners=True)
    return fine[(slice(None), slice(None)) + tuple(slice(r.start - lo * cell, r.stop - lo * cell)
                                                   for r, lo in zip(region, low))]


def offsets_at(offsets: torch.Tensor, points: torch.Tensor, cell: int) -> torch.Tensor:
    """Trilinear values of coarse offsets (1, K, cz, cy, cx) at working-grid voxels ``points`` (n, 3) -> (K, n).

    One gather for all 8 corners: its backward fills one gradient tensor, not eight.
    """
    position = points.to(offsets.dtype) / cell
    base = position.floor().long()
    fraction = position - base
    corners = torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)], device=points.device)
    limit = torch.tensor(offsets.shape[2:], device=points.device) - 1
    index = torch.minimum(base[None] + corners[:, None], limit)                                  # (8, n, 3)
    weight = torch.where(corners[:, None].bool(), fraction[None], 1 - fraction[None]).prod(dim=2)  # (8, n)
    _, _, _, height, width = offsets.shape
    flat = (index[..., 0] * height + index[..., 1]) * width + index[..., 2]
    values = offsets[0].reshape(offsets.shape[1], -1)[:, flat.reshape(-1)].reshape(offsets.shape[1], *flat.shape)
    return (values * weight[None]).sum(dim=1)
