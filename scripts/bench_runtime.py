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
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from diffusers_otq import OTQLinear
from diffusers_otq.functional.dequant_ops import fast_path_available, reference_dequantize


logger = logging.getLogger("bench_runtime")

_MODEL_CHILD = r"""
import json, statistics, sys, time
import torch
torch.set_num_threads(1)
from diffusers import SD3Transformer2DModel
from diffusers_otq import OTQConfig, quantize_model
from diffusers_otq.layers import OTQLayerMixin
spec = json.loads(sys.argv[1])

def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

torch.manual_seed(0)
model = SD3Transformer2DModel(**spec["config"]).eval()
largest = max(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
if spec["variant"] != "fp32":
    quantize_model(model, OTQConfig(bits=spec["bits"]), progress=False, compute_metrics=False)
layers = [m for m in model.modules() if isinstance(m, OTQLayerMixin)]
packed = sum(m.nbytes for m in layers)
cfg, b = spec["config"], spec["batch"]
g = torch.Generator().manual_seed(1)
inputs = {"hidden_states": torch.randn(b, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], generator=g),
          "encoder_hidden_states": torch.randn(b, 77, cfg["joint_attention_dim"], generator=g),
          "pooled_projections": torch.randn(b, cfg["pooled_projection_dim"], generator=g),
          "timestep": torch.full((b,), 500.0)}
times = []
with torch.no_grad():
    model(**inputs)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kb("VmRSS")
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - start)
print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "seconds": statistics.median(times),
                  "peak_extra_mb": (status_kb("VmHWM") - base) / 1024, "packed_mb": packed / 2**20,
                  "largest_layer_mb": largest / 2**20}))
"""


def _model_rows(layers: int, width: int, batch: int) -> list[str]:
    """Forward time and peak memory of an SD3-style transformer, fp32 vs OTQ 2/3/4 bits, each in its own process."""
    from bench_load import _model_config  # the SD3-style model of results/bench_load.md

    config = _model_config(layers, width)
    results = {}
    for variant, bits in (("fp32", 0), ("otq 2-bit", 2), ("otq 3-bit", 3), ("otq 4-bit", 4)):
        spec = {"config": config, "variant": variant, "bits": bits, "batch": batch, "repeats": 3}
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-c", _MODEL_CHILD, json.dumps(spec)], capture_output=True, text=True,
                              env=env)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        logger.info("%s: %s", variant, results[variant])
    fp32 = results["fp32"]
    lines = [
        "",
        f"SD3-style transformer, {layers} layers, width {width} ({fp32['params'] / 1e6:.0f}M parameters before "
        f"quantization), batch {batch}, one thread, each variant in its own process; peak RSS reset after a warm-up "
        "forward, so 'peak extra' is what a forward adds on top of the model.",
        "",
        "| variant | forward s | / fp32 | peak extra RSS during forward MiB | packed weights MiB | largest layer fp32 MiB |",
        "|---|---|---|---|---|---|",
    ]
    for variant, r in results.items():
        lines.append(
            f"| {variant} | {r['seconds']:.2f} | {r['seconds'] / fp32['seconds']:.2f} | {r['peak_extra_mb']:.0f} | "
            f"{r['packed_mb']:.0f} | {r['largest_layer_mb']:.0f} |"
        )
    return lines


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
    parser.add_argument("--model-layers", type=int, default=2, help="SD3-style model for the model-level rows")
    parser.add_argument("--model-width", type=int, default=1536)
    parser.add_argument("--model-batch", type=int, default=1)
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
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
    for shape in [] if args.skip_layers else args.shapes:
        out_features, in_features = map(int, shape.split("x"))
        torch.manual_seed(0)
        linear = nn.Linear(in_features, out_features).to(dtype)
        for bits in args.bits:
            for granularity in ("channel", "group"):
                layer = OTQLinear.from_module(linear, bits=bits, granularity=granularity,
                                              group_size=64 if granularity == "group" else None).to(dtype)  # fmt: skip
                compiled = None
                if bits == 3 and not args.no_compile:
                    torch._dynamo.reset()  # a fresh cache per layer: the layers share one forward code object
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
    if not args.skip_model:
        lines += _model_rows(args.model_layers, args.model_width, args.model_batch)
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.write_text(
            "# Runtime benchmark: OTQLinear against nn.Linear (CPU)\n\n"
            f"Command: `python scripts/bench_runtime.py {' '.join(sys.argv[1:])}`\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
