"""Device selection and sliding-window (patch-wise) inference with Gaussian blending.

Patches bound memory on any volume size. On CUDA the forward pass runs under float16 autocast; an
out-of-memory error retries with half the patch size, then on the CPU, and says so through ``notify``.
"""
import math
import time
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import InputError
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
        raise InputError("device 'cuda' requested but no CUDA GPU is available to torch; choose the CPU (device 'cpu') or 'auto'")
    if name == "mps" and not mps_ok:
        raise InputError("device 'mps' requested but Apple MPS is not available; choose the CPU (device 'cpu') or 'auto'")
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
    """Per-axis patch size: ``patch`` or the (rounded-up) axis size if smaller, a multiple of ``multiple``."""
    return tuple(int(math.ceil(min(patch, n) / multiple) * multiple) for n in shape)


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


def run_with_fallback(
    run: Callable[[torch.device, int], np.ndarray],
    device: torch.device,
    patch: int = DEFAULT_PATCH,
    notify: Optional[Callable[[str], None]] = None,
) -> Tuple[np.ndarray, torch.device]:
    """Call ``run(device, patch)``; on CUDA out-of-memory halve the patch down to 32, then use the CPU."""
    while True:
        try:
            return run(device, patch), device
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if patch // 2 >= MIN_PATCH:
                patch //= 2
                message = f"GPU out of memory: retrying with {patch}-voxel patches"
            else:
                device = torch.device("cpu")
                message = "GPU out of memory even with small patches: continuing on the CPU (slower)"
            if notify is not None:
                notify(message)


def estimate_patches(shape: Sequence[int], patch: int = DEFAULT_PATCH, overlap: float = DEFAULT_OVERLAP,
                     multiple: int = 8) -> int:
    """How many patches :func:`sliding_window` will run on a volume of ``shape`` (spatial only)."""
    patch_size = fit_patch(shape, patch, multiple)
    return int(np.prod([len(patch_starts(max(n, p), p, overlap)) for n, p in zip(shape, patch_size)]))
