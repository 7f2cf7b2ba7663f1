"""What calibration costs: data-free quantization against calibration + calibrated quantization, same run.

Each measurement runs in a fresh subprocess with one torch thread; the table reports seconds and the ratio of
every calibrated path to the data-free quantization of the same model measured in the same run (machines
differ and are often shared: read the ratios).

* Bundled reference models (``otq/fashion-mnist-unet``, ``otq/fashion-mnist-dit``): calibration with
  ``CalibrationConfig()`` defaults on the pipeline's own samples (64 samples, 15 steps, guidance 2), then
  3-bit calibrated codebooks (weighted + error feedback + bias correction), and a 2.5 bits/weight budget
  (sensitivities + allocation + calibrated fit).
* An SD3-style transformer (``--layers 6 --width 1024``: the 220M-parameter model of results/bench_load.md):
  calibration through ``forward_fn`` (the model's own Euler trajectories from noise with random text
  embeddings; no text encoders), then the same fits.

    python scripts/bench_calibration.py --output results/bench_calibration.md
    python scripts/bench_calibration.py --skip-bundled --layers 2 --width 512      # quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from bench_load import _model_config as _sd3_config  # the SD3-style model of results/bench_load.md


logger = logging.getLogger("bench_calibration")

_CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
import diffusers_otq
from diffusers_otq import CalibrationConfig, FlowMatchPipeline, OTQConfig, calibrate, quantize_model

spec = json.loads(sys.argv[1])

def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

def build():
    if spec["kind"] == "bundled":
        pipe = FlowMatchPipeline.from_pretrained(spec["model"], dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return pipe, pipe.transformer, CalibrationConfig(progress=False)
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**spec["config"]).eval()
    cfg, steps, batch = spec["config"], spec["steps"], spec["batch_size"]
    side = cfg["sample_size"]

    @torch.no_grad()
    def trajectory(index):
        g = torch.Generator().manual_seed(10_000 + index)
        x = torch.randn(batch, cfg["in_channels"], side, side, generator=g)
        context = torch.randn(batch, 77, cfg["joint_attention_dim"], generator=g)
        pooled = torch.randn(batch, cfg["pooled_projection_dim"], generator=g)
        for k in range(steps):
            sigma = 1.0 - k / steps
            v = model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                      timestep=torch.full((batch,), 1000.0 * sigma)).sample
            x = x - v / steps

    calibration = CalibrationConfig(forward_fn=trajectory, num_batches=spec["batches"], progress=False)
    return None, model, calibration

pipe, model, calibration = build()
base = status_kb("VmRSS")
start = time.perf_counter()
result = {"params": sum(p.numel() for p in model.parameters())}
if spec["mode"] == "data-free":
    quantize_model(model, OTQConfig(bits=3), progress=False, compute_metrics=False)
else:
    stats = calibrate(pipe if pipe is not None else model, OTQConfig(bits=3), calibration)
    result["calibrate_s"] = time.perf_counter() - start
    config = OTQConfig(bits=3) if spec["mode"] == "calibrated-3bit" else OTQConfig(bits_per_weight=2.5)
    tic = time.perf_counter()
    quantize_model(model, config, statistics=stats, calibration=calibration, progress=False, compute_metrics=False)
    result["quantize_s"] = time.perf_counter() - tic
result["seconds"] = time.perf_counter() - start
result["peak_extra_mb"] = (status_kb("VmHWM") - base) / 1024
layers = [m for m in model.modules() if hasattr(m, "quantized_weight")]
result["bits_per_weight"] = sum(m.nbytes for m in layers) * 8 / sum(m.weight_shape.numel() for m in layers)
print(json.dumps(result))
"""

MODES = ("data-free", "calibrated-3bit", "calibrated-budget-2.5")


def _run(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _table(title: str, results: dict[str, dict]) -> list[str]:
    base = results["data-free"]["seconds"]
    lines = [
        f"### {title}",
        "",
        "| path | bits/weight | calibrate s | quantize s | total s | total / data-free | peak extra RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, r in results.items():
        calibrate_s = f"{r['calibrate_s']:.1f}" if "calibrate_s" in r else ""
        quantize_s = f"{r['quantize_s']:.1f}" if "quantize_s" in r else f"{r['seconds']:.1f}"
        lines.append(
            f"| {mode} | {r['bits_per_weight']:.3f} | {calibrate_s} | {quantize_s} | {r['seconds']:.1f} | "
            f"{r['seconds'] / base:.2f} | {r['peak_extra_mb']:.0f} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=2, help="calibration trajectories of the SD3-style model")
    parser.add_argument("--steps", type=int, default=8, help="Euler steps per trajectory")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--skip-bundled", action="store_true")
    parser.add_argument("--skip-sd3", action="store_true")
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown tables here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    lines: list[str] = []
    if not args.skip_bundled:
        for model in ("otq/fashion-mnist-unet", "otq/fashion-mnist-dit"):
            results = {}
            for mode in MODES:
                results[mode] = _run({"kind": "bundled", "model": model, "mode": mode})
                logger.info("%s %s: %s", model, mode, results[mode])
            lines += _table(f"`{model}` (bundled, 64 calibration samples x 15 steps)", results)
    if not args.skip_sd3:
        spec = {
            "kind": "sd3",
            "config": _sd3_config(args.layers, args.width),
            "batches": args.batches,
            "steps": args.steps,
            "batch_size": args.batch_size,
        }
        results = {}
        for mode in MODES:
            results[mode] = _run({**spec, "mode": mode})
            logger.info("sd3 %s: %s", mode, results[mode])
        params = results["data-free"]["params"] / 1e6
        title = (
            f"SD3-style transformer, {args.layers} layers, width {args.width} ({params:.1f}M parameters); "
            f"calibration: {args.batches} trajectories x {args.steps} Euler steps, batch {args.batch_size}"
        )
        lines += _table(title, results)
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.write_text(
            "# Calibration cost benchmark\n\n"
            f"Command: `python scripts/bench_calibration.py {' '.join(sys.argv[1:])}`\n\n"
            "One torch thread per measurement, each in a fresh process. `total / data-free` is the ratio to the "
            "data-free 3-bit quantization of the same model in the same run.\n\n"
            f"{table}\n"
        )


if __name__ == "__main__":
    main()
