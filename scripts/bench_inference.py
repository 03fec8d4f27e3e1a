"""Parameter count and CPU time of one 128^3 forward pass of the default U-Net (README performance table).

Run: ``python scripts/bench_inference.py [--size 128] [--repeats 3] [--threads N]``. Prints a Markdown
table row; timings are the median of ``repeats`` passes after one warm-up pass.
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "FCMSegmentation"))
from FCMSegmentationLib.inference import sliding_window  # noqa: E402
from FCMSegmentationLib.networks import UNet, count_parameters  # noqa: E402


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up: allocator and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    network = UNet().eval()
    volume = torch.rand(1, 3, args.size, args.size, args.size)
    with torch.no_grad():
        whole = median_seconds(lambda: network(volume), args.repeats)
    patched = median_seconds(
        lambda: sliding_window(network, volume[0].numpy(), 3, torch.device("cpu"), network.size_multiple), args.repeats)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, no GPU")
    print("| parameters | input | one forward pass (CPU) | sliding window, 96^3 patches (CPU) |")
    print("|---|---|---|---|")
    print(f"| {count_parameters(network):,} | {args.size}^3 x 3 channels | {whole:.2f} s | {patched:.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
