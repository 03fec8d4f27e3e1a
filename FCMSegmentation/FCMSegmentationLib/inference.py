"""Device selection and sliding-window (patch-wise) inference with Gaussian blending.

Patches bound memory on any volume size. On CUDA the forward pass runs under float16 autocast; an
out-of-memory error retries with half the patch size, then on the CPU, and says so through ``notify``.
"""
import math
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import FCMError, InputError
from .progress import CancelToken, ProgressCallback, check_cancel, report

DEFAULT_PATCH = 96
DEFAULT_OVERLAP = 0.25
MIN_PATCH = 32


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; an explicit device must be available."""
    name = (name or "auto").lower()
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA GPU is available to torch; "
                         "choose the CPU (device 'cpu') or 'auto'")
    if name == "mps" and not mps_ok:
        raise InputError("device 'mps' requested but Apple MPS is not available; "
                         "choose the CPU (device 'cpu') or 'auto'")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """A line for the user: the GPU's name and memory, or a warning that the CPU is slow."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GB)"
    if device.type == "mps":
        return "GPU: Apple MPS"
    return f"CPU ({torch.get_num_threads()} threads): works, but slower than a GPU"


def gaussian_weights(patch: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Blending weights peaking at the patch centre (sigma = patch/8), minimum 1e-3 of the peak."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) - (n - 1) / 2.0 for n in patch], indexing="ij")
    exponent = sum((g / max(n * sigma_scale, 1e-6)) ** 2 for g, n in zip(grids, patch))
    weights = np.exp(-0.5 * exponent)
    weights /= weights.max()
    return np.maximum(weights, 1e-3).astype(np.float32)


def patch_starts(size: int, patch: int, overlap: float) -> List[int]:
    """Start indices covering [0, size) with patches of ``patch`` overlapping by ``overlap``."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    count = math.ceil((size - patch) / step) + 1
    return sorted({min(i * step, size - patch) for i in range(count)})


def fit_patch(shape: Sequence[int], patch: int, multiple: int) -> Tuple[int, ...]:
    """Per-axis patch size: ``patch`` or the (rounded-up) axis size if smaller, a multiple of ``multiple``.

    When every axis would be a single ``multiple`` (a tiny volume, or a tiny ``patch``) the last axis is
    doubled: the U-Net's bottleneck would be one voxel, where instance normalisation is undefined.
    """
    sizes = [int(math.ceil(min(patch, n) / multiple) * multiple) for n in shape]
    if multiple > 1 and sizes and all(s <= multiple for s in sizes):
        sizes[-1] = 2 * multiple
    return tuple(sizes)


PatchFunction = Callable[[torch.Tensor], torch.Tensor]


def sliding_window(
    function: PatchFunction,
    volume: np.ndarray,
    out_channels: int,
    device: torch.device,
    multiple: int = 8,
    patch: int = DEFAULT_PATCH,
    overlap: float = DEFAULT_OVERLAP,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> np.ndarray:
    """Apply ``function`` ((1, C, *p) -> (1, out_channels, *p)) over ``volume`` (C, *spatial), blended.

    Returns float32 (out_channels, *spatial). Volumes smaller than a patch are zero-padded.
    """
    spatial = volume.shape[1:]
    patch_size = fit_patch(spatial, patch, multiple)
    padded_shape = tuple(max(n, p) for n, p in zip(spatial, patch_size))
    padded = np.zeros((volume.shape[0],) + padded_shape, dtype=np.float32)
    padded[(slice(None),) + tuple(slice(0, n) for n in spatial)] = volume
    weights = gaussian_weights(patch_size)
    output = np.zeros((out_channels,) + padded_shape, dtype=np.float32)
    total = np.zeros(padded_shape, dtype=np.float32)
    starts = [patch_starts(n, p, overlap) for n, p in zip(padded_shape, patch_size)]
    corners = [tuple(c) for c in np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, len(spatial))]
    autocast = device.type == "cuda"
    begin = time.monotonic()
    for number, corner in enumerate(corners, start=1):
        check_cancel(cancel)
        region = tuple(slice(c, c + p) for c, p in zip(corner, patch_size))
        x = torch.from_numpy(padded[(slice(None),) + region][None]).to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=autocast):
            y = function(x)[0].float().cpu().numpy()
        output[(slice(None),) + region] += y * weights
        total[region] += weights
        elapsed = time.monotonic() - begin
        remaining = elapsed / number * (len(corners) - number)
        report(progress, number / len(corners), f"patch {number}/{len(corners)}, about {remaining:.0f} s left")
    output /= total
    return output[(slice(None),) + tuple(slice(0, n) for n in spatial)]


def is_out_of_memory(err: BaseException) -> bool:
    """True for a CUDA/MPS/CPU allocation failure (torch reports some of them as plain RuntimeError)."""
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "not enough memory" in text
                                              or "can't allocate memory" in text)


def _free_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def run_with_fallback(
    run: Callable[[torch.device, int], np.ndarray],
    device: torch.device,
    patch: int = DEFAULT_PATCH,
    notify: Optional[Callable[[str], None]] = None,
) -> Tuple[np.ndarray, torch.device]:
    """Call ``run(device, patch)``; on out-of-memory halve the patch down to :data:`MIN_PATCH`, then move
    from a GPU to the CPU, saying so through ``notify``. Out of memory on the CPU with the smallest patch
    raises :class:`FCMError`. Any other error propagates unchanged."""
    while True:
        try:
            return run(device, patch), device
        except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
            _free_cached_memory(device)
            where = "on the CPU" if device.type == "cpu" else "on the GPU"
            if patch // 2 >= MIN_PATCH:
                patch //= 2
                message = f"out of memory {where}: retrying with {patch}-voxel patches"
            elif device.type != "cpu":
                device = torch.device("cpu")
                message = f"GPU out of memory even with {patch}-voxel patches: continuing on the CPU (slower)"
            else:
                raise FCMError(
                    f"out of memory on the CPU even with {patch}-voxel patches; close other programs or use a "
                    "machine with more memory"
                ) from None
            if notify is not None:
                notify(message)


def estimate_patches(shape: Sequence[int], patch: int = DEFAULT_PATCH, overlap: float = DEFAULT_OVERLAP,
                     multiple: int = 8) -> int:
    """How many patches :func:`sliding_window` will run on a volume of ``shape`` (spatial only)."""
    patch_size = fit_patch(shape, patch, multiple)
    return int(np.prod([len(patch_starts(max(n, p), p, overlap)) for n, p in zip(shape, patch_size)]))


# Effective speed of the U-Net's 3-D convolutions, FLOP/s (measured order of magnitude: a CPU thread runs
# the default network at 7-35 us per voxel; a data-centre GPU under float16 autocast is ~400x faster). A guess for
# the upfront message, not a promise: the per-patch timing in the progress messages replaces it.
FLOPS_PER_SECOND = {"cpu": 5.0e9, "cuda": 2.0e12, "mps": 2.0e11}


def flops_per_voxel(config: Optional[dict] = None) -> float:
    """Approximate forward FLOPs per input voxel of a U-Net with this config (default: the default U-Net)."""
    config = config or {}
    widths = list(config.get("channels", (16, 32, 64, 128)))
    previous = int(config.get("in_channels", 3))
    macs = 0.0
    for level, width in enumerate(widths):
        encoder = 27 * (previous * width + width * width)
        decoder = 27 * (2 * width * width + width * width) if level < len(widths) - 1 else 0
        macs += (encoder + decoder) / 8.0 ** level
        previous = width
    head = int(config.get("head_channels", 16))
    macs += widths[0] * head + head * int(config.get("num_classes", 3))
    return 2.0 * macs


@dataclass
class RunEstimate:
    """What a sliding-window run on a volume will cost, known before it starts."""

    shape: Tuple[int, ...]
    patches: int
    patch_size: Tuple[int, ...]
    seconds: float
    host_bytes: int  # padded input + blended output + weight sum, float32: bounded by the volume
    patch_bytes: int  # rough peak activations of one patch on the device: bounded by the patch size

    def message(self, device: torch.device) -> str:
        grid = "x".join(str(n) for n in self.shape)
        size = "x".join(str(n) for n in self.patch_size)
        return (
            f"working grid {grid} voxels: {self.patches} patches of {size}, roughly {format_seconds(self.seconds)} "
            f"on the {_DEVICE_WORDS.get(device.type, device.type)}; "
            f"memory about {self.host_bytes / 2**20:.0f} MB for the volume + "
            f"{self.patch_bytes / 2**20:.0f} MB per patch"
        )


_DEVICE_WORDS = {"cpu": "CPU", "cuda": "GPU", "mps": "GPU (MPS)"}


def format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1.0, seconds):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_run(
    shape: Sequence[int],
    patch: int = DEFAULT_PATCH,
    device: Union[str, torch.device] = "cpu",
    config: Optional[dict] = None,
    overlap: float = DEFAULT_OVERLAP,
    multiple: int = 8,
    in_channels: int = 3,
    out_channels: int = 3,
) -> RunEstimate:
    """Patches, time and memory of :func:`sliding_window` on a (Z, Y, X) volume, without running it."""
    device = torch.device(device)
    shape = tuple(int(n) for n in shape)
    patch_size = fit_patch(shape, patch, multiple)
    count = estimate_patches(shape, patch, overlap, multiple)
    patch_voxels = int(np.prod(patch_size))
    speed = FLOPS_PER_SECOND.get(device.type, FLOPS_PER_SECOND["cpu"])
    if device.type == "cpu":
        speed *= max(1, torch.get_num_threads())
    seconds = count * patch_voxels * flops_per_voxel(config) / speed
    padded = int(np.prod([max(n, p) for n, p in zip(shape, patch_size)]))
    host = 4 * padded * (in_channels + out_channels + 1)
    widths = list((config or {}).get("channels", (16, 32, 64, 128)))
    per_voxel = sum(6 * w / 8.0 ** level for level, w in enumerate(widths))  # conv, norm, act, skip, ...
    bytes_per_value = 2 if device.type == "cuda" else 4
    return RunEstimate(shape, count, patch_size, seconds, host, int(patch_voxels * per_voxel * bytes_per_value))
