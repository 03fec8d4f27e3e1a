"""Training on simulated phantoms with the (semi-)supervised fuzzy C-means loss; DDP via torchrun.

Loss: ``L_RFCM + alpha * L_label`` (semi-supervised, default) or ``L_RFCM`` alone (``unsupervised``);
RFCM runs on the SPECT channel.
L_label is class-balanced: the FCM label loss of each class present in the crop, averaged over classes,
so the rare lesion class is not drowned by background. After unsupervised training the clusters are put
in class order (background < bone < lesion by mean SPECT) by permuting the head's output rows.

Data: procedural (and, when a real CT with bone labels is given, CT-derived) phantoms from
:mod:`phantoms`, prepared as at inference (:func:`preprocessing.prepare_case`, on the axes as stored),
cropped at random (half the crops centred on lesions), with the CT channel dropped at random so the model
works on SPECT alone, and, with ``spect_truncation``, the SPECT cut off at a random axial plane so the
model segments bone from the CT alone where a SPECT ends before its CT. Seeds: training phantoms use
``seed .. seed+n-1``; validation phantoms (procedural and, when a real CT is given, CT-derived) use
:mod:`validation`'s seeds; benchmarks use seeds from :data:`BENCHMARK_SEED_BASE` — never used in training.

Speed: ``workers`` processes make the phantoms; a background thread cuts each next batch while the device
trains on the current one (:func:`prefetched`).

Distributed: run under ``torchrun --nproc_per_node=N`` (gloo on CPU, NCCL on GPUs); each rank builds its
own shard of phantoms and DistributedDataParallel averages gradients; rank 0 writes the checkpoint.
"""
import json
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from queue import Queue
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import SimpleITK as sitk
import torch
import torch.distributed as dist
from scipy import ndimage

from .errors import InputError, require_probability
from .lesion_core import CONNECTIVITY
from .losses import fcm_label_loss, rfcm_loss
from .modelfile import LoadedModel, load_model, new_card, save_model
from .networks import UNet, count_parameters
from .phantoms import TRAINING_RANGES
from .phantoms.slicing import random_thick_slice_ct
from .preprocessing import DEFAULT_SPACING_MM, LESION, prepare_case, resample_to
from .progress import ProgressCallback, report
from .validation import plan_phantoms, score_models, summarise, validation_plan

BENCHMARK_SEED_BASE = 10_000_000
IGNORE = -1


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored in the model card)."""

    out: str
    phantoms: int = 48
    ct_phantoms: int = 0
    ct_path: Optional[str] = None
    bone_labels_path: Optional[str] = None
    validation_phantoms: int = 4
    seed: int = 1000
    steps: int = 1500
    batch: int = 2
    crop: int = 64
    learning_rate: float = 2e-3
    alpha: float = 1.0
    beta: float = 0.0008
    q: float = 2.0
    unsupervised: bool = False
    class_balance: float = 0.5
    ct_dropout: float = 0.3
    spect_truncation: float = 0.0  # > 0: learn bone beyond the SPECT field (see prepare_training_case)
    spect_gain_sd: float = 0.1  # SD of the log of a crop's random SPECT gain (see random_crop)
    lesion_crop_fraction: float = 0.5
    per_lesion_crops: bool = False  # lesion-centred crops pick a lesion first, each equally (lesion_voxel)
    align: bool = False  # undo each phantom's SPECT/CT misregistration first, as segmenting does (alignment.py)
    thick_ct: float = 0.0  # probability that a phantom's CT is re-sliced at 3-6 mm (phantoms/slicing.py)
    osem_spect: float = 0.0  # probability that a phantom's SPECT is reconstructed by OS-EM (phantoms/reconstruction.py)
    channels: Tuple[int, ...] = (16, 32, 64, 128)
    norm: str = "batch"
    spacing_mm: float = DEFAULT_SPACING_MM
    checkpoint_every: int = 250
    device: str = "auto"
    threads: int = 0
    workers: int = 1  # processes that generate and prepare the phantoms (the phantoms do not depend on it)
    init: Optional[str] = None  # start from this model file's weights (same architecture) instead of random

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.phantoms + self.ct_phantoms < 1:
            raise InputError("steps, batch and the number of phantoms must be at least 1")
        if self.ct_phantoms and not (self.ct_path and self.bone_labels_path):
            raise InputError("CT-derived phantoms need --from-ct and --bone-labels")
        if self.workers < 1:
            raise InputError(f"workers must be at least 1, got {self.workers}")
        if self.crop % 8:
            raise InputError("crop must be a multiple of 8")
        if not self.spacing_mm > 0:
            raise InputError(f"spacing must be a positive number of mm, got {self.spacing_mm}")
        require_probability(self.spect_truncation, "spect truncation")
        if not 0.0 <= self.spect_gain_sd <= 1.0:
            raise InputError(f"spect gain SD is the SD of a log gain, in [0, 1], got {self.spect_gain_sd}")
        require_probability(self.thick_ct, "thick CT")
        require_probability(self.osem_spect, "OS-EM SPECT")

    @property
    def beyond_spect(self) -> bool:
        return self.spect_truncation > 0


@dataclass
class TrainingCase:
    """A prepared phantom on the working grid: network input, FOV mask, labels (-1 outside the FOV)."""

    features: np.ndarray
    valid: np.ndarray
    labels: np.ndarray
    lesion_voxels: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))
    lesion_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # lesion of each, 0..n-1
    valid_voxels: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))


def prepare_training_case(spect: sitk.Image, ct: sitk.Image, truth: sitk.Image,
                          spacing_mm: float = DEFAULT_SPACING_MM, beyond_spect: bool = False,
                          align: bool = False) -> TrainingCase:
    """A phantom's images brought onto the working grid as at inference, truth by nearest neighbour.

    beyond_spect: the grid covers the whole CT; outside the SPECT field bone and background keep their
    labels (learnt from the CT alone) and lesions are ignored (without uptake they cannot be seen).
    align: first undo the SPECT/CT misregistration as segmenting does, so that the network learns from
    images registered as well as those it will segment (the truth stays on the CT, which does not move).
    The grid keeps the phantom's axes as stored, so that a CT-derived phantom stored x-reversed shows the
    network its anatomy mirrored (an augmentation; at inference the axes are reordered to LPS).
    """
    case = prepare_case(spect, ct, spacing_mm, beyond_spect, align=align, stored_axes=True)
    labels = resample_to(sitk.Cast(truth, sitk.sitkUInt8), case.grid, linear=False).astype(np.int64)
    labels[~case.segmented | (~case.valid & (labels == LESION))] = IGNORE
    lesion_voxels = np.argwhere(labels == LESION)
    components, _ = ndimage.label(labels == LESION, CONNECTIVITY)
    lesion_ids = components[tuple(lesion_voxels.T)].astype(np.int64) - 1
    return TrainingCase(case.features, case.valid, labels, lesion_voxels, lesion_ids, np.argwhere(case.valid))


# ----- distributed context ------------------------------------------------------------------------
@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Distributed:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA)."""
    from .inference import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return Distributed(0, 1, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Distributed(dist.get_rank(), dist.get_world_size(), device)


# ----- data -----------------------------------------------------------------------------------------
def phantom_plan(config: TrainConfig) -> List[Tuple[str, int]]:
    """(kind, seed) of every training phantom, in a fixed order."""
    plan = [("procedural", config.seed + i) for i in range(config.phantoms)]
    plan += [("ct", config.seed + config.phantoms + i) for i in range(config.ct_phantoms)]
    return plan


RealCT = Tuple[Optional[sitk.Image], Optional[sitk.Image]]


def read_real_ct(config: TrainConfig) -> RealCT:
    """(CT, bone labels) that CT-derived phantoms are built on, or (None, None) if the run has none."""
    from .imageio import read_image

    if not (config.ct_path and config.bone_labels_path):
        return None, None
    return read_image(config.ct_path), read_image(config.bone_labels_path)


def build_cases(plan: Sequence[Tuple[str, int]], config: TrainConfig, real_ct: RealCT = (None, None),
                progress: Optional[ProgressCallback] = None) -> List[TrainingCase]:
    """Generate and prepare the phantoms of ``plan`` (CT-derived ones on ``real_ct``), an ``osem_spect``
    fraction of them with their SPECT reconstructed by OS-EM, a ``thick_ct`` fraction with their CT re-sliced
    thicker (the truth stays on the original CT's grid).

    With ``config.workers`` > 1 they are made by that many processes (each reads the real CT itself), in
    the same order and with the same content: a phantom depends on its seed alone.
    """
    if config.workers == 1 or len(plan) < 2:
        made = (_prepare_phantom(entry, config, real_ct) for entry in plan)
        return _collect(made, plan, progress)
    context = multiprocessing.get_context("spawn")  # no forked copies of torch's thread pools
    with ProcessPoolExecutor(min(config.workers, len(plan)), mp_context=context,
                             initializer=_start_phantom_worker, initargs=(config,)) as pool:
        return _collect(pool.map(_prepare_phantom_in_worker, plan), plan, progress)


def _collect(made: Iterable[TrainingCase], plan: Sequence[Tuple[str, int]],
             progress: Optional[ProgressCallback]) -> List[TrainingCase]:
    cases = []
    for number, ((kind, seed), case) in enumerate(zip(plan, made), start=1):
        cases.append(case)
        report(progress, number / len(plan), f"phantom {number}/{len(plan)} ({kind}, seed {seed})")
    return cases


def _prepare_phantom(entry: Tuple[str, int], config: TrainConfig, real_ct: RealCT) -> TrainingCase:
    ranges = replace(TRAINING_RANGES, osem_probability=config.osem_spect)
    ((_, seed, phantom),) = plan_phantoms([entry], *real_ct, ranges=ranges)
    ct = random_thick_slice_ct(phantom.ct, seed, config.thick_ct)
    return prepare_training_case(phantom.spect, ct, phantom.truth, config.spacing_mm, config.beyond_spect,
                                 config.align)


_WORKER_STATE: Dict[str, Any] = {}


def _start_phantom_worker(config: TrainConfig) -> None:
    torch.set_num_threads(1)  # the processes share the cores
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    _WORKER_STATE.update(config=config, real_ct=read_real_ct(config))


def _prepare_phantom_in_worker(entry: Tuple[str, int]) -> TrainingCase:
    return _prepare_phantom(entry, _WORKER_STATE["config"], _WORKER_STATE["real_ct"])


def lesion_voxel(case: TrainingCase, rng: np.random.Generator, per_lesion: bool) -> np.ndarray:
    """A random lesion voxel (z, y, x) of ``case``, which must have one.

    per_lesion False: every lesion voxel equally likely, so a 20 mm lesion (about 150 voxels on the 3 mm
    grid) is chosen 40 times as often as a 6 mm one (about 4). True: a lesion first, each equally likely,
    then one of its voxels, so that the small lesions the model misses are seen as often as large ones.
    """
    if not per_lesion:
        return case.lesion_voxels[rng.integers(len(case.lesion_voxels))]
    members = np.flatnonzero(case.lesion_ids == rng.integers(case.lesion_ids.max() + 1))
    return case.lesion_voxels[members[rng.integers(len(members))]]


def random_crop(case: TrainingCase, crop: int, rng: np.random.Generator, lesion_fraction: float,
                ct_dropout: float, spect_truncation: float = 0.0, spect_gain_sd: float = 0.1,
                per_lesion: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A (features, valid, labels) crop of side ``crop``, zero/ignore-padded, with augmentation.

    lesion_fraction: probability that the crop is centred near a lesion voxel (:func:`lesion_voxel`, with
    ``per_lesion``), else near any voxel of the SPECT field.

    spect_truncation: probability that the SPECT ends at a random axial plane of the crop, as where a
    SPECT field is shorter than the CT: beyond it the SPECT is 0 and lesions are ignored. A cut that
    would leave the crop no SPECT voxel is not made (the RFCM term needs some).
    spect_gain_sd: the SPECT channel is multiplied by ``exp(N(0, spect_gain_sd))``: the reference that
    normalises the SPECT (its 99.5th percentile) sits at another multiple of the bone uptake in every
    image (noise, hot organs, field of view), and the model should not depend on where.
    """
    shape = np.array(case.valid.shape)
    if len(case.lesion_voxels) and rng.random() < lesion_fraction:
        centre = lesion_voxel(case, rng, per_lesion) + rng.integers(-crop // 4, crop // 4 + 1, 3)
    else:
        centre = case.valid_voxels[rng.integers(len(case.valid_voxels))]
    begin = centre - crop // 2
    src = [slice(max(b, 0), min(b + crop, n)) for b, n in zip(begin, shape)]
    dst = [slice(s.start - b, s.stop - b) for s, b in zip(src, begin)]
    features = np.zeros((case.features.shape[0], crop, crop, crop), dtype=np.float32)
    valid = np.zeros((crop, crop, crop), dtype=bool)
    labels = np.full((crop, crop, crop), IGNORE, dtype=np.int64)
    features[(slice(None),) + tuple(dst)] = case.features[(slice(None),) + tuple(src)]
    valid[tuple(dst)] = case.valid[tuple(src)]
    labels[tuple(dst)] = case.labels[tuple(src)]
    if rng.random() < spect_truncation:
        cut = int(rng.integers(crop // 4, 3 * crop // 4 + 1))
        kept, beyond = ((slice(0, cut), slice(cut, None)) if rng.random() < 0.5
                        else (slice(cut, None), slice(0, cut)))
        if valid[kept].any():
            features[0, beyond] = 0.0
            valid[beyond] = False
            labels[beyond][labels[beyond] == LESION] = IGNORE
    if rng.random() < ct_dropout:
        features[1:] = 0.0
        labels[~valid] = IGNORE  # with neither SPECT nor CT there is nothing to learn from
    if rng.random() < 0.5:  # left-right mirror: anatomy is roughly symmetric
        features, valid, labels = features[..., ::-1], valid[..., ::-1], labels[..., ::-1]
    gain = float(np.exp(rng.normal(0.0, spect_gain_sd)))
    features = features.copy()
    features[0] *= gain
    return features, valid.copy(), labels.copy()


def make_batch(cases: Sequence[TrainingCase], config: TrainConfig, rng: np.random.Generator,
               device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    crops = [random_crop(cases[rng.integers(len(cases))], config.crop, rng, config.lesion_crop_fraction,
                         config.ct_dropout, config.spect_truncation, config.spect_gain_sd,
                         config.per_lesion_crops)
             for _ in range(config.batch)]
    features, valid, labels = (torch.from_numpy(np.stack(parts)).to(device) for parts in zip(*crops))
    return features, valid[:, None], labels


Item = TypeVar("Item")


def prefetched(make: Callable[[], Item], count: int, depth: int = 2) -> Iterator[Item]:
    """The results of ``count`` calls of ``make``, in order, made by a background thread up to ``depth``
    ahead, so that the CPU cuts the next batch while the GPU trains on this one. A failure in ``make`` is
    raised here."""
    made: "Queue[Tuple[Optional[Item], Optional[BaseException]]]" = Queue(maxsize=depth)

    def produce() -> None:
        try:
            for _ in range(count):
                made.put((make(), None))
        except BaseException as error:  # handed to the consumer, which raises it
            made.put((None, error))

    threading.Thread(target=produce, daemon=True).start()
    for _ in range(count):
        item, error = made.get()
        if error is not None:
            raise error
        yield item  # type: ignore[misc]


# ----- loss -----------------------------------------------------------------------------------------
def balanced_label_loss(memberships: torch.Tensor, labels: torch.Tensor, q: float,
                        balance: float = 0.5) -> torch.Tensor:
    """FCM label loss with class k's voxels weighted by ``N_k ** -balance``.

    balance 0: the plain mean over labelled voxels (the rare lesion class barely counts); 1: the mean of
    per-class means (a false-positive voxel in the huge background is almost free, so bone and lesions
    are over-predicted — measured 4x too much bone); 0.5, the default, sits between.
    """
    means, weights = [], []
    for k in range(memberships.shape[1]):
        selected = labels == k
        count = int(selected.sum())
        if count:
            only_this_class = torch.where(selected, labels, torch.full_like(labels, IGNORE))
            means.append(fcm_label_loss(memberships, only_this_class, q=q))
            weights.append(float(count) ** (1.0 - balance))
    if not means:
        return memberships.sum() * 0.0
    weight = torch.tensor(weights, dtype=means[0].dtype, device=means[0].device)
    return (torch.stack(means) * weight).sum() / weight.sum()


def training_loss(memberships: torch.Tensor, features: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor,
                  config: TrainConfig) -> torch.Tensor:
    """RFCM on the SPECT intensities (+ alpha * balanced label loss unless unsupervised).

    SPECT only, as in the paper: its low / mid / high uptake clusters match background / bone / lesion,
    whereas CT's natural clusters (air / soft tissue / bone) split the background class in two and
    fight the labels (measured: bone Dice 0.05 after 250 steps with CT in the RFCM term).
    """
    intensities = features[:, :1] * valid
    loss = rfcm_loss(memberships, intensities, q=config.q, beta=config.beta, mask=valid)
    if config.unsupervised or config.alpha == 0:
        return loss
    return loss + config.alpha * balanced_label_loss(memberships, labels, config.q, config.class_balance)


def order_clusters_by_spect(network: UNet, cases: Sequence[TrainingCase], device: torch.device) -> List[int]:
    """Permute the head's outputs so clusters run background < bone < lesion by mean SPECT."""
    means = torch.zeros(network.config["num_classes"])
    weights = torch.zeros_like(means)
    network.eval()
    with torch.no_grad():
        for case in cases[:4]:
            crop = tuple(slice(0, n // 8 * 8) for n in case.valid.shape)
            x = torch.from_numpy(case.features[(slice(None),) + crop][None]).to(device)
            u = network(x)[0].cpu()
            spect = x[0, 0].cpu()
            means += (u * spect).flatten(1).sum(1)
            weights += u.flatten(1).sum(1)
    order = torch.argsort(means / weights.clamp_min(1e-8)).tolist()
    last = network.head[-1]
    with torch.no_grad():
        last.weight.copy_(last.weight[order].clone())
        last.bias.copy_(last.bias[order].clone())
    return order


# ----- validation -----------------------------------------------------------------------------------
def validate(model: LoadedModel, count: int, device: str = "cpu", real_ct: RealCT = (None, None)) -> Dict[str, Any]:
    """Mean per-class Dice of ``model``, with and without CT, on ``count`` held-out procedural phantoms and,
    when ``real_ct`` is given, ``max(1, count // 2)`` CT-derived ones (see :func:`validation.summarise`)."""
    ct_derived = max(1, count // 2) if count and real_ct[0] is not None else 0
    scores = score_models({"model": model}, validation_plan(count, ct_derived), *real_ct, device=device)
    return summarise(scores["model"])


# ----- the loop ---------------------------------------------------------------------------------------
def _load_initial_weights(network: UNet, path: str) -> str:
    """Copy a model file's weights into ``network`` (continued training); returns their SHA256."""
    start = load_model(path, "cpu")
    if start.network.config != network.config:
        raise InputError(f"--init {path}: its architecture {start.network.config} differs from this run's "
                         f"{network.config}; pass the same --channels")
    network.load_state_dict(start.network.state_dict())
    return str(start.card.get("weights_sha256"))


def train(config: TrainConfig, progress: Optional[ProgressCallback] = None,
          log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train a model as ``config`` says and write it (with its card) to ``config.out``; returns the card."""
    context = init_distributed(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.backends.cudnn.benchmark = context.device.type == "cuda"  # one crop size: pick the fastest kernels once
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    network = UNet(channels=config.channels, norm=config.norm)
    init_sha256 = _load_initial_weights(network, config.init) if config.init else None
    network = network.to(context.device)
    plan = phantom_plan(config)[context.rank::context.world]
    started = time.monotonic()
    real_ct = read_real_ct(config)
    cases = build_cases(plan, config, real_ct, progress if context.is_main else None)
    if context.is_main:
        log(f"prepared {len(cases)} phantoms per rank in {time.monotonic() - started:.0f} s; "
            f"{count_parameters(network)} parameters; world size {context.world}")
    trainee = network
    if context.world > 1:
        trainee = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[context.device.index] if context.device.type == "cuda" else None)
    optimiser = torch.optim.AdamW(trainee.parameters(), lr=config.learning_rate, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.learning_rate, total_steps=config.steps,
                                                   pct_start=0.1)
    rng = np.random.default_rng([config.seed, context.rank])
    use_amp = context.device.type == "cuda"
    losses: List[float] = []
    card: Dict[str, Any] = {}
    batches = prefetched(lambda: make_batch(cases, config, rng, context.device), config.steps)
    for step, (features, valid, labels) in enumerate(batches, start=1):
        trainee.train()
        with torch.autocast(context.device.type, dtype=torch.bfloat16, enabled=use_amp):
            memberships = trainee(features)
        loss = training_loss(memberships.float(), features, valid, labels, config)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainee.parameters(), 5.0)
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if context.is_main:
            report(progress, step / config.steps, f"step {step}/{config.steps} loss {np.mean(losses[-50:]):.4f}")
            if step % config.checkpoint_every == 0 and step < config.steps:
                card = _save(network, config, step, losses, started, context, None, init_sha256=init_sha256)
    order = order_clusters_by_spect(network, cases, context.device) if config.unsupervised else None
    if context.is_main:
        network.eval()
        validation = {}
        if config.validation_phantoms:
            trained = LoadedModel(network, new_card(network, config.spacing_mm,
                                                    segments_beyond_spect=config.beyond_spect))
            validation = validate(trained, config.validation_phantoms, str(context.device), real_ct)
        card = _save(network, config, config.steps, losses, started, context, validation, order, init_sha256)
        log(f"wrote {config.out}; validation {json.dumps(validation)}")
    if context.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return card


def _save(network: UNet, config: TrainConfig, step: int, losses: List[float], started: float,
          context: Distributed, validation: Optional[Dict[str, Any]], order: Optional[List[int]] = None,
          init_sha256: Optional[str] = None) -> Dict[str, Any]:
    training = {
        "config": asdict(config),
        "loss": "RFCM only (unsupervised)" if config.unsupervised else
                f"RFCM(q={config.q}, beta={config.beta}) on SPECT + {config.alpha} * FCM label loss "
                f"(class weight N_k^-{config.class_balance})",
        "phantom_seeds": {"procedural": [config.seed, config.seed + config.phantoms - 1],
                          "ct_derived": config.ct_phantoms},
        "steps": step,
        "final_loss": float(np.mean(losses[-50:])),
        "seconds": round(time.monotonic() - started, 1),
        "world_size": context.world,
        "device": str(context.device),
        "cluster_order": order,
        "init_weights_sha256": init_sha256,
    }
    card = new_card(network, config.spacing_mm, training=training, validation=validation or {},
                    segments_beyond_spect=config.beyond_spect)
    return save_model(config.out, network, card)
