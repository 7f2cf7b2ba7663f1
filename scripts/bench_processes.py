"""One process against several: calibrated quantization of a random SD3-style transformer under ``accelerate launch``.

For each process count N (``--processes``, default 1 and 2) the same one-call quantization runs as
``accelerate launch --num_processes N`` with ``--threads`` torch threads per process (default 1, so that 2
processes use the 2 cores one process with one thread leaves idle): the model of
:mod:`diffusers_otq.evaluation.scale_models` (seeded, the same weights in every process), calibrated on its Euler
trajectories (``forward_fn``), each variant of ``--variants`` (scripts/bench_scale.py's names). Every process
times its ``quantize_model`` call between two barriers; the slowest process's seconds count. Rank 0 saves the
model; the saved safetensors and config.json of every N are compared byte for byte with N = 1's.

    python scripts/bench_processes.py --output results/bench_processes.md
    python scripts/bench_processes.py --width 1024 --depth 2 --variants calibrated-3bit budget-2.5+refine50
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench_processes")


def worker(args: argparse.Namespace) -> None:
    """One process of ``accelerate launch``: quantize, time between barriers, rank 0 saves."""
    import torch

    torch.set_num_threads(args.threads)
    from diffusers_otq.calibration.processes import barrier, rank_and_world
    from diffusers_otq.evaluation import scale_models

    rank, world = rank_and_world()
    model = scale_models.build_sd3_style_model(scale_models.sd3_style_config(args.width, args.depth))
    forward_fn = scale_models.calibration_forward_fn(model, scale_models.SamplerSettings())
    variant = scale_models.SCALE_VARIANTS[args.variant]
    barrier(world)
    started, cpu = time.perf_counter(), time.process_time()
    scale_models.quantize_scale_variant(model, variant, forward_fn, args.batches, api="one-call")
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    barrier(world)
    out = Path(args.out)
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": world, "seconds": seconds, "cpu": cpu}))
    if rank == 0:
        model.save_pretrained(out / "model")


def launch(args: argparse.Namespace, variant: str, processes: int, out: Path) -> dict:
    """Run the worker under ``accelerate launch --num_processes processes``; the slowest rank's timings."""
    out.mkdir(parents=True, exist_ok=True)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    command = [accelerate, "launch", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    if processes > 1:
        command.append("--multi_gpu")
    command += [__file__, "--worker", "--variant", variant, "--out", str(out), "--width", str(args.width),
                "--depth", str(args.depth), "--threads", str(args.threads), "--batches", str(args.batches)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    logger.info("%s, %d process(es)", variant, processes)
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{variant} with {processes} process(es) failed:\n{result.stderr[-4000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    slowest = max(ranks, key=lambda r: r["seconds"])
    return {"seconds": slowest["seconds"], "cpu": sum(r["cpu"] for r in ranks), "model": out / "model"}


def same_files(a: Path, b: Path) -> bool:
    """Whether two saved models are byte-identical (every safetensors file and config.json)."""
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".safetensors", ".json"))
    other = sorted(p.name for p in b.iterdir() if p.suffix in (".safetensors", ".json"))
    return names == other and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def render(args: argparse.Namespace, rows: list[dict], load: tuple[float, float]) -> str:
    lines = [
        "# Calibrated quantization with several processes (accelerate launch)",
        "",
        f"`python scripts/bench_processes.py {' '.join(sys.argv[1:])}`",
        "",
        f"Random SD3-style transformer {args.width} wide, {args.depth} blocks (diffusers_otq.evaluation.scale_models, "
        f"seed 0, float32), one-call API (block by block), calibrated on {args.batches} Euler trajectories "
        f"(8 steps, batch 2); {args.threads} torch thread(s) per process; torch "
        f"{__import__('torch').__version__}, {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{load[0]:.1f} at the start and {load[1]:.1f} at the end (a shared machine: read the ratios). Seconds: "
        "the slowest process's `quantize_model` call (calibration sampling included), between two barriers; "
        "CPU s: all processes together. Target (issue 22): 2 processes at least 1.7x faster than 1, "
        "bit-identical output.",
        "",
        "| variant | processes | seconds | CPU s | speed-up vs 1 | saved model = 1 process's |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['processes']} | {row['seconds']:.1f} | {row['cpu']:.1f} | "
            f"{row['speedup']:.2f}x | {'byte-identical' if row['same'] else '**differs**'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["calibrated-3bit"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--batches", type=int, default=2, help="calibration trajectories (forward_fn batches)")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_processes_") as folder:
        for variant in args.variants:
            first = None
            for processes in args.processes:
                result = launch(args, variant, processes, Path(folder) / f"{variant}-{processes}")
                first = first or result
                rows.append({"variant": variant, "processes": processes, "seconds": result["seconds"],
                             "cpu": result["cpu"], "speedup": first["seconds"] / result["seconds"],
                             "same": same_files(first["model"], result["model"])})  # fmt: skip
                logger.info("%s", rows[-1])
    report = render(args, rows, (load, os.getloadavg()[0]))
    print(report)
    if args.output is not None:
        args.output.write_text(report)


if __name__ == "__main__":
    main()
