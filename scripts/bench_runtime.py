"""Layer latency of OTQLinear against nn.Linear of the same dtype, measured side by side in one run.

For each weight shape, token count, bit width and granularity: nn.Linear, OTQLinear eager (the fused CPU kernel:
tile-by-tile dequantization into a reused scratch + matmul), OTQLinear compiled (``torch.compile(fullgraph=True)``,
3 bits only: compiling every variant takes minutes), and the pure-PyTorch reference path (what runs where the
kernel cannot be built). One torch thread, medians; the machine is shared, so read the ratios.

    python scripts/bench_runtime.py --output results/bench_runtime.md
    python scripts/bench_runtime.py --shapes 1024x1024 --tokens 1 64 --bits 3     # quick look
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from diffusers_otq import OTQLinear
from diffusers_otq.functional.dequant_ops import fast_path_available, reference_dequantize


logger = logging.getLogger("bench_runtime")


def _median_ms(fn: Callable[..., torch.Tensor], *args: object, budget_s: float = 0.6) -> float:
    """Median milliseconds of ``fn(*args)`` over as many repeats (3-25) as fit ``budget_s``, after a warm-up."""
    fn(*args)  # warm-up (and compilation)
    start = time.perf_counter()
    fn(*args)
    first = time.perf_counter() - start
    repeats = max(3, min(25, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _reference(layer: OTQLinear, x: torch.Tensor) -> torch.Tensor:
    q = layer.quantized_weight()
    rows, n = q.rows
    weight = reference_dequantize(q.packed, q.codebook, q.decoded_scales(), rows, n, q.bits, x.dtype)
    return torch.nn.functional.linear(x, weight.reshape(q.shape), layer.bias)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["3072x3072", "3072x12288", "12288x3072"],
                        help="out x in")  # fmt: skip
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    fused = fast_path_available(torch.device("cpu"))
    lines = [
        f"One thread, {args.dtype}, medians; ratios against nn.Linear of the same shape and dtype in the same run. "
        f"Fused CPU kernel {'loaded' if fused else 'NOT available: eager = reference path'}.",
        "",
        "| shape (out x in) | tokens | bits | granularity | nn.Linear ms | OTQ eager ms | eager / linear | "
        "OTQ compiled / linear | reference / linear |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in args.shapes:
        out_features, in_features = map(int, shape.split("x"))
        torch.manual_seed(0)
        linear = nn.Linear(in_features, out_features).to(dtype)
        for bits in args.bits:
            for granularity in ("channel", "group"):
                layer = OTQLinear.from_module(linear, bits=bits, granularity=granularity,
                                              group_size=64 if granularity == "group" else None).to(dtype)  # fmt: skip
                compiled = None
                if bits == 3 and not args.no_compile:
                    compiled = torch.compile(layer, fullgraph=True)
                for tokens in args.tokens:
                    x = torch.randn(tokens, in_features, dtype=dtype)
                    with torch.no_grad():
                        base = _median_ms(linear, x)
                        eager = _median_ms(layer, x)
                        reference = _median_ms(_reference, layer, x)
                        comp = _median_ms(compiled, x) if compiled is not None else None
                    lines.append(
                        f"| {shape} | {tokens} | {bits} | {granularity} | {base:.2f} | {eager:.2f} | "
                        f"{eager / base:.2f} | {'' if comp is None else f'{comp / base:.2f}'} | {reference / base:.2f} |"
                    )
                    logger.info(lines[-1])
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.write_text(
            "# Runtime benchmark: OTQLinear against nn.Linear (CPU)\n\n"
            f"Command: `python scripts/bench_runtime.py {' '.join(sys.argv[1:])}`\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
