"""What a LoRA costs on an OTQ layer: the adapter's added forward time on a quantized layer against on nn.Linear.

One ``width x width`` layer, float32, one torch thread: nn.Linear and its 3-bit OTQLinear, each with a peft LoRA of
rank ``--rank`` (unmerged, as on a quantized model), at 1 and ``--tokens`` tokens; every repeat times the forward
with the adapter off, then on, and the table gives the medians of the base time and of the paired difference. The target: the LoRA adds no more to the quantized
layer than to nn.Linear (``LoRA cost on OTQ / LoRA cost on nn.Linear`` about 1; machines are shared, read ratios).

    python scripts/bench_lora.py --output results/bench_lora.md
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from diffusers_otq import OTQConfig, quantize_model


logger = logging.getLogger("bench_lora")


def _paired_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median forward ms without and with the adapter, measured alternately on the same layer (the adapter is
    switched off and on between calls), so machine noise hits both alike; and the median paired difference."""
    lora = next(m for m in model.modules() if hasattr(m, "enable_adapters"))
    base, added = [], []
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(repeats):
            times = []
            for enabled in (False, True):
                lora.enable_adapters(enabled)
                start = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - start) * 1e3)
            base.append(times[0])
            added.append(times[1] - times[0])
    return statistics.median(base), statistics.median(added)


def _layer(width: int, quantized: bool, rank: int) -> nn.Module:
    """A one-layer model (``proj``), optionally 3-bit OTQ, with a LoRA of ``rank`` on it."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(width, width))
    if quantized:
        quantize_model(model, OTQConfig(bits=3), progress=False, compute_metrics=False)
    if rank:
        inject_adapter_in_model(LoraConfig(r=rank, target_modules=["proj"], init_lora_weights=False), model)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=3072)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    lines = [
        f"Layer {args.width}x{args.width}, float32, LoRA rank {args.rank} (unmerged), one thread, median of "
        f"{args.repeats}.",
        "",
        "| tokens | nn.Linear ms | OTQ 3-bit ms | LoRA cost on nn.Linear ms | LoRA cost on OTQ ms | "
        "OTQ / nn.Linear LoRA cost |",
        "|---|---|---|---|---|---|",
    ]
    for tokens in (1, args.tokens):
        x = torch.randn(tokens, args.width)
        (linear, plain), (quantized, otq) = (_paired_ms(_layer(args.width, q, args.rank), x, args.repeats)
                                             for q in (False, True))  # fmt: skip
        lines.append(f"| {tokens} | {linear:.2f} | {quantized:.2f} | {plain:.2f} | {otq:.2f} | {otq / plain:.2f} |")
        logger.info(lines[-1])
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.write_text(
            "# LoRA on an OTQ layer: the adapter's cost\n\n"
            f"Command: `python scripts/bench_lora.py {' '.join(sys.argv[1:])}`\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
