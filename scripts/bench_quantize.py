#!/usr/bin/env python
"""Benchmark quantize_tensor on a Flux-MLP-sized matrix against a row-wise torch.sort timed in the same run.

    python scripts/bench_quantize.py                       # 3072 x 12288 fp32, bits 2/3/4, every method/granularity
    python scripts/bench_quantize.py --dist t5 --bits 4    # Student-t(5) weights
    python scripts/bench_quantize.py --rows 512 --cols 2048 --methods ot uniform

Columns: seconds, Mparams/s, relative MSE, W2, bits/weight (every stored byte), time / sort time, and the peak extra
resident memory during the call as a multiple of the matrix size (Linux only: VmHWM reset through /proc/self/clear_refs).
Targets (issue 2): "ot" per-channel at 3 bits <= 4x the sort time and <= 3x extra memory. bitsandbytes NF4 (block 64,
double quantization) is measured at 4 bits as the reference users already pick.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffusers_otq import METHODS, quantize_tensor, relative_mse


logger = logging.getLogger("bench_quantize")
LAYOUTS = {  # name -> quantize_tensor kwargs
    "tensor": dict(granularity="tensor"),
    "channel": dict(granularity="channel"),
    "group64/ch-codebook": dict(granularity="group", group_size=64, codebook_scope="channel"),
    "group64/tensor-codebook": dict(granularity="group", group_size=64, codebook_scope="tensor"),
}


def _rss_kib(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(fn: Callable[[], object]) -> tuple[object, float, float | None]:
    """Run ``fn`` once; return (result, seconds, peak extra resident MiB or None)."""
    gc.collect()
    base = _rss_kib("VmRSS")
    can_peak = _reset_peak()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    extra = (peak - base) / 1024 if (can_peak and peak is not None and base is not None) else None
    return result, seconds, extra


def sorted_w2(reference_sorted: torch.Tensor, other: torch.Tensor) -> float:
    """W2 between two equally sized empirical measures given the first one already sorted (float64)."""
    b = other.reshape(-1).to(torch.float64).sort().values
    return (reference_sorted - b).square().mean().sqrt().item()


def make_weight(rows: int, cols: int, dist: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dist == "gaussian":
        return torch.randn(rows, cols, generator=generator) * 0.02
    if dist == "t5":
        torch.manual_seed(seed)
        return torch.distributions.StudentT(5.0).sample((rows, cols)) * 0.02
    raise ValueError(f"--dist {dist!r} is unknown; expected 'gaussian' or 't5'.")


def nf4_row(weight: torch.Tensor) -> tuple[float, float, float] | None:
    """(seconds, relative MSE, bits/weight) of bitsandbytes NF4, block 64, double quantization."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        logger.warning("bitsandbytes is not installed; skipping the NF4 reference row.")
        return None
    (packed, state), seconds, _ = measure(
        lambda: bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    )
    restored = bnb_functional.dequantize_4bit(packed, state)
    stored_bytes = packed.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel() + 4
    return seconds, relative_mse(weight, restored), stored_bytes * 8 / weight.numel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3072)
    parser.add_argument("--cols", type=int, default=12288)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--dist", default="gaussian", choices=["gaussian", "t5"])
    parser.add_argument("--no-w2", action="store_true", help="skip the W2 column (one full sort per row of the table)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    weight = make_weight(args.rows, args.cols, args.dist, args.seed)
    matrix_mib = weight.numel() * weight.element_size() / 2**20
    _, sort_seconds, sort_extra = measure(lambda: torch.sort(weight, dim=1))
    reference_sorted = None if args.no_w2 else weight.reshape(-1).to(torch.float64).sort().values
    print(
        f"matrix {args.rows}x{args.cols} fp32 ({args.dist}), {matrix_mib:.0f} MiB, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; row-wise torch.sort: {sort_seconds:.2f} s"
        + (f", extra memory {sort_extra / matrix_mib:.2f}x" if sort_extra is not None else "")
    )
    header = f"{'method':<14} {'layout':<24} {'bits':>4} {'seconds':>8} {'Mparam/s':>9} {'rel.MSE':>9} {'W2':>10} {'bits/w':>7} {'x sort':>7} {'x mem':>6}"
    print(header)
    print("-" * len(header))
    for bits in args.bits:
        for method in args.methods:
            for layout in args.layouts:
                kwargs = LAYOUTS[layout]
                q, seconds, extra = measure(lambda: quantize_tensor(weight, bits, method, **kwargs))  # noqa: B023
                restored = q.dequantize()
                w2 = float("nan") if reference_sorted is None else sorted_w2(reference_sorted, restored)
                mem = f"{extra / matrix_mib:6.2f}" if extra is not None else "   n/a"
                print(
                    f"{method:<14} {layout:<24} {bits:>4} {seconds:8.2f} {weight.numel() / seconds / 1e6:9.2f} "
                    f"{relative_mse(weight, restored):9.5f} {w2:10.3e} {q.bits_per_weight:7.3f} "
                    f"{seconds / sort_seconds:7.2f} {mem}",
                    flush=True,
                )
                del q, restored
        if bits == 4:
            row = nf4_row(weight)
            if row is not None:
                seconds, rel, bpw = row
                print(
                    f"{'bnb-nf4':<14} {'block64+DQ':<24} {4:>4} {seconds:8.2f} {weight.numel() / seconds / 1e6:9.2f} "
                    f"{rel:9.5f} {'':>10} {bpw:7.3f} {seconds / sort_seconds:7.2f} {'':>6}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
