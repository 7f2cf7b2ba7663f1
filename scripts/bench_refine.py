"""What refinement costs in memory and time: the whole model at once against one block at a time, same run.

An SD3-style transformer (the model of results/bench_load.md; ``--layers``/``--width``) is quantized data-free to
2 bits, then refined for ``--steps`` Adam steps with ``refine_scope="model"`` and with ``refine_scope="blocks"``
on the same teacher: ``--trajectories`` Euler trajectories of ``--euler-steps`` steps from noise with random text
embeddings (no text encoders), batch ``--batch-size``. Each scope runs in a fresh subprocess with one torch
thread. The table reports the teacher's recorded bytes, the peak resident memory added while refining (peak RSS
reset before refining: the autograd graph, optimizer state and scratch), seconds, and the reported teacher loss
before and after. Read the ratios of the two rows (machines differ and are often shared).

    python scripts/bench_refine.py --output results/bench_refine.md
    python scripts/bench_refine.py --layers 2 --width 512 --steps 5      # quick look
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


logger = logging.getLogger("bench_refine")

_CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from diffusers import SD3Transformer2DModel
from diffusers_otq import CalibrationConfig, OTQConfig, quantize_model
from diffusers_otq.calibration import ProbeInputs, TeacherCalls, refine_model

spec = json.loads(sys.argv[1])

def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

torch.manual_seed(0)
cfg = spec["config"]
model = SD3Transformer2DModel(**cfg).eval()
params = sum(p.numel() for p in model.parameters())
calls = ProbeInputs()
with torch.no_grad():
    for index in range(spec["trajectories"]):
        g = torch.Generator().manual_seed(10_000 + index)
        b, side, steps = spec["batch_size"], cfg["sample_size"], spec["euler_steps"]
        x = torch.randn(b, cfg["in_channels"], side, side, generator=g)
        context = torch.randn(b, 77, cfg["joint_attention_dim"], generator=g)
        pooled = torch.randn(b, cfg["pooled_projection_dim"], generator=g)
        for k in range(steps):
            kwargs = {"hidden_states": x, "encoder_hidden_states": context, "pooled_projections": pooled,
                      "timestep": torch.full((b,), 1000.0 * (1.0 - k / steps))}
            calls.record((), kwargs)
            x = x - model(**kwargs).sample / steps
blocks = spec["scope"] == "blocks"
teacher = TeacherCalls.record(model, calls, blocks=blocks)
recorded = sum(o.numel() * o.element_size() for o in teacher.outputs)
recorded += sum(v.nbytes() for v in (teacher.blocks or {}).values())
quantize_model(model, OTQConfig(bits=2), progress=False, compute_metrics=False)
calibration = CalibrationConfig(refine_steps=spec["steps"], refine_batch_size=spec["batch_size"],
                                refine_eval_every=spec["steps"], refine_scope=spec["scope"], progress=False)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS to the current RSS
base = status_kb("VmRSS")
start = time.perf_counter()
report = refine_model(model, teacher, calibration)
print(json.dumps({"params": params, "recorded_mb": recorded / 2**20,
                  "peak_extra_mb": (status_kb("VmHWM") - base) / 1024, "seconds": time.perf_counter() - start,
                  **report.describe()}))
"""


def _run(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{spec['scope']} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--trajectories", type=int, default=1)
    parser.add_argument("--euler-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="Adam steps (per block with scope 'blocks')")
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = {"config": _sd3_config(args.layers, args.width), "trajectories": args.trajectories,
            "euler_steps": args.euler_steps, "batch_size": args.batch_size, "steps": args.steps}  # fmt: skip
    results = {}
    for scope in ("model", "blocks"):
        results[scope] = _run({**spec, "scope": scope})
        logger.info("%s: %s", scope, results[scope])
    base = results["model"]
    lines = [
        f"SD3-style transformer, {args.layers} layers, width {args.width} "
        f"({base['params'] / 1e6:.1f}M parameters), 2 bits data-free; teacher: {args.trajectories} trajectories x "
        f"{args.euler_steps} Euler steps, batch {args.batch_size}; {args.steps} Adam steps per scope unit",
        "",
        "| scope | blocks | steps | teacher recorded MiB | peak extra RSS while refining MiB | peak / model | "
        "seconds | seconds / model | teacher loss before → after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scope, r in results.items():
        lines.append(
            f"| {scope} | {r['blocks'] or ''} | {r['steps']} | {r['recorded_mb']:.0f} | {r['peak_extra_mb']:.0f} | "
            f"{r['peak_extra_mb'] / base['peak_extra_mb']:.2f} | {r['seconds']:.1f} | "
            f"{r['seconds'] / base['seconds']:.2f} | {r['loss_before']:.4g} → {r['loss_after']:.4g} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.write_text(
            "# Refinement memory benchmark: whole model against block by block\n\n"
            f"Command: `python scripts/bench_refine.py {' '.join(sys.argv[1:])}`\n\n"
            "One torch thread per scope, each in a fresh process; peak RSS is reset just before refining, so the "
            "peak column is what refinement itself adds (autograd graph, Adam state, scratch). The teacher's "
            "recorded calls live on the CPU in both scopes; block scope also keeps every block's inputs and "
            "outputs there.\n\n"
            f"{table}\n"
        )


if __name__ == "__main__":
    main()
