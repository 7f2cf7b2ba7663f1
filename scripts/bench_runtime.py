"""Runtime of OTQ models against nn.Linear and the peer backends, measured side by side in one run.

Sections (each a table in the output):

1. Layer latency, per dtype: for each weight shape, token count, bit width and granularity, nn.Linear, OTQLinear
   eager (the fused CPU kernel: tile-by-tile dequantization into a reused scratch + matmul), OTQLinear compiled
   (``torch.compile(fullgraph=True)``, 3 bits only: compiling every variant takes minutes) with compiled / eager
   measured in alternating pairs, and the pure-PyTorch reference path (what runs where the kernel cannot be built).
   Token counts of 4096 and more run at 3 bits only, without the reference (minutes per row otherwise).
2. The peers' own quantized layers (bitsandbytes, quanto, HQQ, torchao, aten int4pack, SDNQ) on one shape.
3. Quantization throughput: every Linear of the SD3-style model at 1 and 2 threads, OTQ and two peers, in child
   processes.
4. Model forward time and peak RSS of that model, fp32 against OTQ 2/3/4 bits, each in its own process.

One torch thread for latency, medians; the machine is shared, so read the ratios.

    python scripts/bench_runtime.py --output results/bench_runtime.md
    python scripts/bench_runtime.py --shapes 1024x1024 --tokens 1 64 --bits 3 --dtypes float32 \
        --skip-peers --skip-throughput --skip-model                                # quick look
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
from runtime_peers import PEER_LAYERS, build_peer
from torch import nn

from diffusers_otq import OTQLinear
from diffusers_otq.functional.dequant_ops import fused_linear_available, reference_dequantize


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
        "### Model forward: time and peak memory",
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


DEVICE = torch.device("cpu")


def _run(fn: Callable[..., torch.Tensor], *args: object) -> None:
    fn(*args)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _median_ms(fn: Callable[..., torch.Tensor], *args: object, budget_s: float = 0.6) -> float:
    """Median milliseconds of ``fn(*args)`` over as many repeats (3-25) as fit ``budget_s``, after a warm-up."""
    _run(fn, *args)  # warm-up (and compilation)
    start = time.perf_counter()
    _run(fn, *args)
    first = time.perf_counter() - start
    repeats = max(3, min(25, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _run(fn, *args)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _reference(layer: OTQLinear, x: torch.Tensor) -> torch.Tensor:
    q = layer.quantized_weight()
    rows, n = q.rows
    weight = reference_dequantize(q.packed, q.codebook, q.decoded_scales(), rows, n, q.bits, x.dtype)
    return torch.nn.functional.linear(x, weight.reshape(q.shape), layer.bias)


def _paired_ratio(numerator: Callable[..., torch.Tensor], denominator: Callable[..., torch.Tensor],
                  x: torch.Tensor, budget_s: float = 1.0) -> float:  # fmt: skip
    """Median of ``time(numerator) / time(denominator)`` over alternating calls: both see the same machine load."""
    _run(numerator, x), _run(denominator, x)
    ratios, spent = [], 0.0
    while len(ratios) < 3 or (spent < budget_s and len(ratios) < 25):
        start = time.perf_counter()
        _run(numerator, x)
        middle = time.perf_counter()
        _run(denominator, x)
        end = time.perf_counter()
        ratios.append((middle - start) / max(end - middle, 1e-9))
        spent += end - start
    return statistics.median(ratios)


def _layer_rows(args: argparse.Namespace, dtype: torch.dtype) -> list[str]:
    fused = fused_linear_available(DEVICE)
    lines = [
        "",
        f"### Layer latency, {str(dtype).removeprefix('torch.')}",
        "",
        f"One thread, medians; ratios against nn.Linear of the same shape and dtype in the same run. Fused kernel "
        f"({DEVICE.type}) {'loaded' if fused else 'NOT available: eager = reference path'}. compiled / eager: median "
        "over alternating calls.",
        "",
        "| shape (out x in) | tokens | bits | granularity | nn.Linear ms | OTQ eager ms | eager / linear | "
        "OTQ compiled / linear | compiled / eager | reference / linear |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in args.shapes:
        out_features, in_features = map(int, shape.split("x"))
        torch.manual_seed(0)
        linear = nn.Linear(in_features, out_features)
        for bits in args.bits:
            for granularity in ("channel", "group"):
                layer = OTQLinear.from_module(linear, bits=bits, granularity=granularity,
                                              group_size=64 if granularity == "group" else None).to(DEVICE, dtype)  # fmt: skip
                base_layer = linear.to(DEVICE, dtype)
                compiled = None
                if bits == 3 and not args.no_compile:
                    torch._dynamo.reset()  # a fresh cache per layer: the layers share one forward code object
                    compiled = torch.compile(layer, fullgraph=True)
                for tokens in args.tokens:
                    long = tokens >= 4096
                    if long and bits != 3:
                        continue
                    x = torch.randn(tokens, in_features, dtype=dtype, device=DEVICE)
                    with torch.no_grad():
                        base = _median_ms(base_layer, x)
                        eager = _median_ms(layer, x)
                        reference = None if long else _median_ms(_reference, layer, x)
                        comp = _median_ms(compiled, x) if compiled is not None else None
                        paired = _paired_ratio(compiled, layer, x) if compiled is not None else None
                    cells = [shape, tokens, bits, granularity, f"{base:.2f}", f"{eager:.2f}", f"{eager / base:.2f}",
                             "" if comp is None else f"{comp / base:.2f}", "" if paired is None else f"{paired:.2f}",
                             "" if reference is None else f"{reference / base:.2f}"]  # fmt: skip
                    lines.append("| " + " | ".join(map(str, cells)) + " |")
                    logger.info(lines[-1])
                linear = linear.float()
    return lines


def _peer_rows(shape: str, tokens_list: list[int], dtype: torch.dtype) -> list[str]:
    out_features, in_features = map(int, shape.split("x"))
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features).to(dtype)
    layers = {"otq-3 channel": OTQLinear.from_module(linear.float(), bits=3).to(dtype)}
    linear = linear.to(dtype)
    notes = []
    for name in PEER_LAYERS:
        module, reason = build_peer(name, linear)
        if module is None:
            notes.append(f"{name}: n/a ({reason})")
        else:
            layers[name] = module
    lines = [
        "",
        f"### Peers' own quantized layers, {shape}, {str(dtype).removeprefix('torch.')}",
        "",
        "Time / nn.Linear of the same dtype, one thread, medians, same run. " + ("; ".join(notes)),
        "",
        "| layer | " + " | ".join(f"{t} tokens" for t in tokens_list) + " |",
        "|---|" + "---|" * len(tokens_list),
    ]
    inputs = {t: torch.randn(t, in_features, dtype=dtype) for t in tokens_list}
    with torch.no_grad():
        base = {t: _median_ms(linear, x) for t, x in inputs.items()}
        for name, module in layers.items():
            ratios = [_median_ms(module, x) / base[t] for t, x in inputs.items()]
            lines.append(f"| {name} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
            logger.info(lines[-1])
    return lines


_THROUGHPUT_CHILD = r"""
import json, sys, time
import torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
sys.path.insert(0, spec["scripts"])
from diffusers import SD3Transformer2DModel
from diffusers_otq import OTQConfig, quantize_model
from runtime_peers import PEER_LAYERS
torch.manual_seed(0)
model = SD3Transformer2DModel(**spec["config"]).eval()
linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
params = sum(m.weight.numel() for m in linears)
wall, cpu = time.perf_counter(), time.process_time()
if spec["variant"].startswith("otq"):
    kwargs = {"granularity": "group", "group_size": 64} if "group" in spec["variant"] else {}
    quantize_model(model, OTQConfig(bits=3, **kwargs), progress=False, compute_metrics=False)
else:
    with torch.no_grad():
        for m in linears:
            PEER_LAYERS[spec["variant"]](m)
print(json.dumps({"params": params, "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}))
"""


def _throughput_rows(layers: int, width: int) -> list[str]:
    """Quantization throughput of every Linear of the SD3-style model, each variant in its own process."""
    from bench_load import _model_config

    config = _model_config(layers, width)
    lines = [
        "",
        f"### Quantization throughput, every Linear of the SD3-style model ({layers} layers, width {width})",
        "",
        "Each variant in its own process; wall and CPU seconds of the quantization alone (the model is built first).",
        "",
        "| variant | threads | params M | wall s | CPU s | Mparams/s (wall) |",
        "|---|---|---|---|---|---|",
    ]
    for variant in ("otq-3 channel", "otq-3 group-64", "quanto-int4", "sdnq-uint3-codebook"):
        for threads in (1, 2):
            spec = {"config": config, "variant": variant, "threads": threads, "scripts": str(Path(__file__).parent)}
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            done = subprocess.run([sys.executable, "-c", _THROUGHPUT_CHILD, json.dumps(spec)], capture_output=True,
                                  text=True, env=env)  # fmt: skip
            if done.returncode != 0:
                lines.append(f"| {variant} | {threads} | failed: {done.stderr.strip().splitlines()[-1][:80]} | | | |")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            lines.append(f"| {variant} | {threads} | {r['params'] / 1e6:.1f} | {r['wall']:.1f} | {r['cpu']:.1f} | "
                         f"{r['params'] / 1e6 / r['wall']:.2f} |")  # fmt: skip
            logger.info(lines[-1])
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["3072x3072", "3072x12288", "12288x3072"],
                        help="out x in")  # fmt: skip
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 1024, 4096])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--peer-shape", default="3072x3072")
    parser.add_argument("--peer-tokens", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--model-layers", type=int, default=2, help="SD3-style model for the model-level rows")
    parser.add_argument("--model-width", type=int, default=1536)
    parser.add_argument("--model-batch", type=int, default=1)
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--device", default="cpu", help="cuda: layer latency on the GPU (Triton kernel), no peers")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type != "cpu":
        args.skip_peers = args.skip_throughput = args.skip_model = True
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    lines: list[str] = []
    for dtype in map(lambda name: getattr(torch, name), args.dtypes):
        if not args.skip_layers:
            lines += _layer_rows(args, dtype)
        if not args.skip_peers:
            lines += _peer_rows(args.peer_shape, args.peer_tokens, dtype)
    if not args.skip_throughput:
        lines += _throughput_rows(args.model_layers, args.model_width)
    if not args.skip_model:
        lines += _model_rows(args.model_layers, args.model_width, args.model_batch)
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.write_text(
            "# Runtime benchmark: OTQ against nn.Linear and the peers (CPU)\n\n"
            f"Command: `python scripts/bench_runtime.py {' '.join(sys.argv[1:])}`\n{table}\n"
        )


if __name__ == "__main__":
    main()
