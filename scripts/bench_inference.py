"""Time the default U-Net and the default model on one device (README performance table).

Run: ``python scripts/bench_inference.py [--device cpu|cuda] [--size 128] [--repeats 3] [--threads N]``.
Prints a Markdown table row: parameter count; one forward pass and the sliding window on a random
``size``^3 volume; then, on the refinement benchmark's ``size``^3 phantom (3 mm voxels) with the shipped
model, Segment (a refinement session's start, which runs the network, and its labels) and one Refine
round on three seed strokes per class. Each time is the median of ``repeats`` runs after one warm-up run.
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib.common import load_benchmark_model  # noqa: E402
from benchlib.simulated_user import SEEDS_PER_CLASS, codes_image, seed_strokes  # noqa: E402
from benchlib.speed_case import SPEED_SEED_OFFSET, speed_case  # noqa: E402
from FCMSegmentationLib.inference import sliding_window  # noqa: E402
from FCMSegmentationLib.networks import UNet, count_parameters  # noqa: E402
from FCMSegmentationLib.refinement import RefinementSession  # noqa: E402
from FCMSegmentationLib.training import BENCHMARK_SEED_BASE  # noqa: E402


def median_seconds(function: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``function`` over ``repeats`` runs after a warm-up (allocator, kernel selection);
    on a GPU each run ends when the device has finished its work."""
    def timed() -> float:
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()
    return statistics.median(timed() for _ in range(repeats))


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    network = UNet().eval().to(device)
    volume = torch.rand(1, 3, args.size, args.size, args.size, device=device)
    with torch.no_grad():
        whole = median_seconds(lambda: network(volume), args.repeats, device)
    patched = median_seconds(lambda: sliding_window(network, volume[0].cpu().numpy(), 3, device,
                                                    network.size_multiple), args.repeats, device)

    model, _ = load_benchmark_model(None)
    spect, ct, truth = speed_case(BENCHMARK_SEED_BASE + SPEED_SEED_OFFSET, args.size, 3.0)
    strokes, _ = seed_strokes(sitk.GetArrayFromImage(truth), truth.GetSpacing(), SEEDS_PER_CLASS,
                              np.random.default_rng(0))
    scribbles = codes_image(strokes, truth)
    segment = median_seconds(lambda: RefinementSession(spect, ct, model, device=args.device).segment(),
                             args.repeats, device)
    session = RefinementSession(spect, ct, model, device=args.device)
    refine = median_seconds(lambda: session.refine(scribbles), args.repeats, device)  # rounds, as a user's

    print(f"machine: {platform.processor() or platform.machine()}, {device_label(device)}, "
          f"torch {torch.__version__}")
    print(f"| device | parameters | one forward pass, random {args.size}³ × 3 | sliding window, 96³ patches | "
          f"Segment, {args.size}³ phantom | Refine round ({session.settings.steps} steps) |")
    print("|---|---|---|---|---|---|")
    print(f"| {device_label(device)} | {count_parameters(network):,} | {whole:.2f} s | {patched:.2f} s | "
          f"{segment:.2f} s | {refine:.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
