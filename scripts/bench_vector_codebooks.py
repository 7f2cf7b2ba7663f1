"""Vector codebooks against scalar ones at equal bits: weight error, fit time and layer latency, in one run.

For each weight shape (Gaussian rows with a spread of row scales, as in trained layers), every setting is fitted
data-free and measured side by side:

* weight error: relative MSE ``||W - Q||^2 / ||W||^2`` and the stored bits per weight (every byte counted);
* fit time: ``quantize_tensor`` (weighted k-means for vectors, Lloyd-Max for scalars), one torch thread;
* layer latency: ``OTQLinear`` eager (the fused CPU kernel decodes scalar and vector codes tile by tile) against
  ``nn.Linear`` at 1 and 64 tokens, medians, one torch thread; the machine is shared, so read the ratios.

    python scripts/bench_vector_codebooks.py --output results/bench_vector_codebooks.md
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from diffusers_otq import OTQLinear, quantize_tensor
from diffusers_otq.functional.dequant_ops import fused_linear_available


logger = logging.getLogger("bench_vector_codebooks")

SETTINGS: dict[str, dict[str, object]] = {
    "scalar 2-bit channel": {"bits": 2},
    "scalar 2-bit group 64": {"bits": 2, "granularity": "group", "group_size": 64},
    "2-D 2-bit group 64": {"bits": 2, "granularity": "group", "group_size": 64, "vector_dim": 2},
    "4-D 2-bit group 64": {"bits": 2, "granularity": "group", "group_size": 64, "vector_dim": 4},
    "2-D 2-bit channel": {"bits": 2, "vector_dim": 2},
    "scalar 1-bit channel": {"bits": 1},
    "4-D 1-bit group 64": {"bits": 1, "granularity": "group", "group_size": 64, "vector_dim": 4},
    "8-D 1-bit group 64": {"bits": 1, "granularity": "group", "group_size": 64, "vector_dim": 8},
}


def _weight(rows: int, cols: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    scales = torch.exp(torch.randn(rows, 1, generator=generator) * 0.5)
    return torch.randn(rows, cols, generator=generator) * scales / cols**0.5


def _median_ms(fn, *args: object, budget_s: float = 0.5) -> float:  # noqa: ANN001 - any callable
    fn(*args)
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < budget_s or len(times) < 5:
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _rows(shape: str, tokens: list[int]) -> list[str]:
    rows, cols = map(int, shape.split("x"))
    weight = _weight(rows, cols)
    dense = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        dense.weight.copy_(weight)
    inputs = {t: torch.randn(t, cols) for t in tokens}
    dense_ms = {t: _median_ms(dense, x) for t, x in inputs.items()}
    lines = []
    for label, kwargs in SETTINGS.items():
        start = time.perf_counter()
        q = quantize_tensor(weight, method="ot", **kwargs)
        fit_s = time.perf_counter() - start
        error = float((q.dequantize() - weight).square().sum() / weight.square().sum())
        layer = OTQLinear(q, None)
        with torch.no_grad():
            latency = [f"{_median_ms(layer, inputs[t]) / dense_ms[t]:.2f}x" for t in tokens]
        lines.append(
            f"| {shape} | {label} | {q.bits_per_weight:.3f} | {error:.4f} | {fit_s:.2f} | {' | '.join(latency)} |"
        )
        logger.info(lines[-1])
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1024x1024", "3072x3072"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    fused = fused_linear_available(torch.device("cpu"))
    header = [
        '# Vector codebooks vs scalar ones (data-free, `method="ot"`)',
        "",
        f"`python scripts/bench_vector_codebooks.py --shapes {' '.join(args.shapes)} --tokens "
        f"{' '.join(map(str, args.tokens))}`; one torch thread; fused CPU kernel: {'yes' if fused else 'NO'}. "
        "Weights: Gaussian rows with log-normal row scales. Latency is OTQLinear eager over nn.Linear (fp32), medians.",
        "",
        "| shape | setting | bits/weight | rel. MSE | fit s | "
        + " | ".join(f"latency {t} tok" for t in args.tokens)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(args.tokens),
    ]
    lines = header + [row for shape in args.shapes for row in _rows(shape, args.tokens)]
    text = "\n".join(lines) + "\n"
    if args.output:
        args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
