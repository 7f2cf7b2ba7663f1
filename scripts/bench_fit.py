"""What the calibrated fit of one layer costs against its data-free fit: the code before and after a change, same run.

For each layer, ``quantize_calibrated`` (stage 1 activation-weighted codebooks, stage 2 error feedback with
codebook refits, bias correction) and ``fit_data_free`` are timed with 1 and 2 torch threads, for two versions of
the package: ``--base`` (a git revision, extracted with ``git archive``; default: the commit before the fit was
made parallel) and the working tree. Each (version, threads) pair is a persistent worker subprocess with its own
``PYTHONPATH``; the measurements are interleaved layer by layer (alternating which version goes first), so a busy
machine slows both alike: read the ratios. Every measurement of the fit starts with an empty sweep-operator cache.

Layers, all 3-bit per-channel ``ot-vp`` (``OTQConfig(bits=3)``):

* SD3-like widths (``--shapes``; default 1536x1536, 6144x1536, 1536x6144 as out x in): Gaussian weights, and
  statistics collected (``StatisticsCollector``, Gram blocks of at most 2048 as ``CalibrationConfig`` uses) from
  ``--samples`` random correlated inputs: per-channel scales from 0.2 to 3, 32 shared latent factors, a mean offset.
* Every layer of the bundled models (``--models``), with statistics from
  ``calibrate(pipe, OTQConfig(bits=3), CalibrationConfig(num_samples=16))``.

The output error is relative, ``sum tr(D H D^T) / sum tr(W H W^T)`` over the layer's input groups with
``D = W - W_hat`` and ``H`` the statistics' Gram blocks (the covariance for layers whose bias is corrected).
"codes 1t = 2t" says whether the working tree's packed codes, codebooks and bias are the same bits with 1 and 2
threads. "CPU s" ratios use the process CPU time (all threads), less sensitive to other work on a shared machine
than the wall-clock seconds. "without the stall stop" is the working tree's error with the alternation continuing
after a refit that gains less than ``refit_tolerance`` (``fit.STOP_WHEN_REFIT_STALLS = False``), to show what that
stop costs.

    python scripts/bench_fit.py --output results/bench_fit.md
    python scripts/bench_fit.py --shapes 1536x1536 --models          # one shape, no bundled models
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench_fit")

DEFAULT_BASE = "39a2b6e"  # main before the calibrated fit was made parallel (issue 22)
DEFAULT_MODELS = ("otq/fashion-mnist-dit", "otq/fashion-mnist-unet")

_WORKER = r"""
import hashlib, json, sys, time
import torch
from torch import nn

torch.set_num_threads(int(sys.argv[1]))
import diffusers_otq
assert diffusers_otq.__file__.startswith(sys.argv[2]), (diffusers_otq.__file__, sys.argv[2])
from diffusers_otq import CalibrationConfig, FlowMatchPipeline, OTQConfig
from diffusers_otq.calibration import fit as fit_module
from diffusers_otq.calibration.statistics import CalibrationStatistics
from diffusers_otq.convert import plan_layers
from diffusers_otq.fitting import effective_weight, fit_data_free

config = OTQConfig(bits=3)
calibration = CalibrationConfig(progress=False)
cache = {}

def cached(key, make):
    if key not in cache:
        cache[key] = make()
    return cache[key]

def planned_layer(spec):
    if spec["kind"] == "synthetic":
        out, n = spec["shape"]
        g = torch.Generator().manual_seed(spec["seed"])
        module = nn.Linear(n, out, bias=False)
        with torch.no_grad():
            module.weight.copy_(torch.randn(out, n, generator=g) / n**0.5)
        container = nn.ModuleDict({"layer": module})
        return plan_layers(container, config.layer_spec)[0]
    pipe = cached(spec["model"], lambda: FlowMatchPipeline.from_pretrained(spec["model"], dtype=torch.float32))
    plan = cached(("plan", spec["model"]), lambda: {p.name: p for p in plan_layers(pipe.transformer, config.layer_spec)})
    return plan[spec["layer"]]

def relative_output_error(planned, stats, fit):
    weight = planned.module.weight.detach().to(torch.float64)
    rows = weight.shape[0]
    w = weight.reshape(rows, -1)
    d = w - effective_weight(fit, torch.float64).reshape(rows, -1)
    centered = fit_module.corrects_bias(planned, stats, calibration)
    per_group = rows // stats.groups
    err = ref = 0.0
    for group in range(stats.groups):
        r = slice(group * per_group, (group + 1) * per_group)
        start = 0
        for block in stats.gram_blocks(group, centered):
            end = start + block.shape[0]
            err += float(((d[r, start:end] @ block) * d[r, start:end]).sum())
            ref += float(((w[r, start:end] @ block) * w[r, start:end]).sum())
            start = end
    return err / ref

for line in sys.stdin:
    spec = json.loads(line)
    stats_file = cached(spec["statistics"], lambda: CalibrationStatistics.load(spec["statistics"]))
    stats = stats_file[spec.get("layer", "layer")]
    planned = planned_layer(spec)
    weight = planned.module.weight
    if "stall_stop" in spec:
        fit_module.STOP_WHEN_REFIT_STALLS = spec["stall_stop"]
    start, cpu = time.perf_counter(), time.process_time()
    fit_data_free(weight, planned.spec, planned.name)
    data_free, cpu_data_free = time.perf_counter() - start, time.process_time() - cpu
    fit_module._last_operators = None  # no reuse of the sweep factors across measurements
    start, cpu = time.perf_counter(), time.process_time()
    fit = fit_module.quantize_calibrated(weight, planned, stats, calibration)
    calibrated, cpu_calibrated = time.perf_counter() - start, time.process_time() - cpu
    if "stall_stop" in spec:
        fit_module.STOP_WHEN_REFIT_STALLS = True
    digest = hashlib.sha1()
    for tensor in (fit.quantized.packed, fit.quantized.codebook, fit.bias):
        if tensor is not None:
            digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    print(json.dumps({"data_free": data_free, "calibrated": calibrated, "digest": digest.hexdigest(),
                      "cpu_data_free": cpu_data_free, "cpu_calibrated": cpu_calibrated,
                      "error": relative_output_error(planned, stats, fit), "shape": list(weight.shape)}), flush=True)
"""


class Worker:
    """One persistent measurement subprocess: a package version (tree) and a torch thread count."""

    def __init__(self, version: str, tree: Path, threads: int) -> None:
        self.version, self.threads = version, threads
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(threads), str(tree)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=tree, text=True,
        )  # fmt: skip

    def measure(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Fit the layer ``spec`` describes once; seconds, relative output error and the result's digest."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.version}/{self.threads}t died on {spec}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def _synthetic_statistics(n: int, samples: int, path: Path) -> None:
    """Statistics of ``samples`` correlated random inputs of width ``n``, collected as calibration does."""
    import torch
    from torch import nn

    from diffusers_otq.calibration.statistics import CalibrationStatistics, StatisticsCollector
    from diffusers_otq.functional.moments import gram_block_sizes

    g = torch.Generator().manual_seed(n)
    scale = torch.linspace(0.2, 3.0, n)[torch.randperm(n, generator=g)]
    loadings = 0.5 * torch.randn(32, n, generator=g)
    mean = 0.3 * torch.randn(n, generator=g)
    layer = nn.Linear(n, 1, bias=False)
    collector = StatisticsCollector({"layer": layer}, {"layer": gram_block_sizes(n, 2048)}, 10**9)
    with collector.attached(), torch.no_grad():
        collector.start_batch()
        for _ in range(0, samples, 1024):
            x = (torch.randn(1024, n, generator=g) + torch.randn(1024, 32, generator=g) @ loadings) * scale + mean
            layer(x)
    CalibrationStatistics({"layer": collector.batch()["layer"]}).save(path)


def _model_statistics(model: str, path: Path) -> list[str]:
    """Calibrate a bundled model (16 samples) into ``path``; return its quantized layers' names."""
    import torch

    from diffusers_otq import CalibrationConfig, FlowMatchPipeline, OTQConfig, calibrate
    from diffusers_otq.convert import plan_layers

    pipe = FlowMatchPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    config = OTQConfig(bits=3)
    calibrate(pipe, config, CalibrationConfig(num_samples=16, progress=False)).save(path)
    return [planned.name for planned in plan_layers(pipe.transformer, config.layer_spec)]


def _extract(revision: str, directory: Path) -> Path:
    """``git archive`` the package at ``revision`` into ``directory``; returns the tree root."""
    directory.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", revision, "diffusers_otq"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    return directory


def _run(specs: list[dict[str, Any]], workers: dict[tuple[str, int], Worker], repeats: int) -> list[dict[str, Any]]:
    """Measure every spec with every worker, interleaved; keep the fastest of ``repeats`` per pair."""
    rows = []
    for index, spec in enumerate(specs):
        results: dict[tuple[str, int], dict[str, Any]] = {}
        for repeat in range(repeats):
            order = ("base", "new") if (index + repeat) % 2 == 0 else ("new", "base")
            for threads in sorted({t for _, t in workers}):
                for version in order:
                    if (version, threads) not in workers:
                        continue
                    result = workers[version, threads].measure(spec)
                    kept = results.get((version, threads))
                    if kept is None:
                        results[version, threads] = result
                    else:
                        for key in ("data_free", "calibrated", "cpu_data_free", "cpu_calibrated"):
                            kept[key] = min(kept[key], result[key])
        if ("new", 1) in workers:  # the working tree without the stop after a stalled refit: its errors
            results["new-nostop", 1] = workers["new", 1].measure({**spec, "stall_stop": False})
        rows.append({"spec": spec, "results": results})
        logger.info(
            "%s: %s", spec.get("layer", spec.get("shape")), {k: round(v["calibrated"], 3) for k, v in results.items()}
        )
    return rows


def _shape(row: dict[str, Any]) -> str:
    return "x".join(str(s) for s in next(iter(row["results"].values()))["shape"])


def _change(new: float, base: float) -> str:
    return f"{100 * (new / base - 1):+.2f}%" if base > 0 else ("0" if new == 0 else "n/a")


def _same_bits(results: dict[tuple[str, int], dict[str, Any]], threads: list[int]) -> str:
    return "yes" if len({results[("new", t)]["digest"] for t in threads}) == 1 else "**no**"


def _synthetic_table(rows: list[dict[str, Any]], threads: list[int]) -> list[str]:
    lines = [
        "| layer (out x in) | threads | data-free s | calibrated s before | after | speed-up | before / data-free "
        "| **after / data-free** | after / data-free, CPU s | output error before | after | change "
        "| change without the stall stop | codes 1t = 2t |",
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for row in rows:
        res = row["results"]
        nostop = res.get(("new-nostop", 1))
        for t in threads:
            base, new = res[("base", t)], res[("new", t)]
            lines.append(
                f"| {_shape(row)} | {t} | {new['data_free']:.2f} | {base['calibrated']:.2f} | {new['calibrated']:.2f} "
                f"| {base['calibrated'] / new['calibrated']:.1f}x | {base['calibrated'] / base['data_free']:.2f} "
                f"| **{new['calibrated'] / new['data_free']:.2f}** "
                f"| {new['cpu_calibrated'] / new['cpu_data_free']:.2f} | {base['error']:.5f} | {new['error']:.5f} "
                f"| {_change(new['error'], base['error'])} "
                f"| {_change(nostop['error'], base['error']) if nostop else ''} | {_same_bits(res, threads)} |"
            )
    return lines


def _model_table(model: str, rows: list[dict[str, Any]], threads: list[int]) -> list[str]:
    t = max(threads)
    lines = [
        f"**{model}** ({t} threads; errors do not depend on the threads)",
        "",
        "| layer | shape | data-free s | calibrated s before | after | output error before | after | change "
        "| change without the stall stop | codes 1t = 2t |",
        "| :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    totals = {"df": 0.0, "base": 0.0, "new": 0.0, "eb": 0.0, "en": 0.0, "ens": 0.0}
    better = worse = 0
    for row in rows:
        res = row["results"]
        base, new, nostop = res[("base", t)], res[("new", t)], res.get(("new-nostop", 1))
        totals["df"] += new["data_free"]
        totals["base"] += base["calibrated"]
        totals["new"] += new["calibrated"]
        totals["eb"] += base["error"]
        totals["en"] += new["error"]
        totals["ens"] += nostop["error"] if nostop else 0.0
        better += new["error"] < base["error"] * (1 - 1e-3)
        worse += new["error"] > base["error"] * (1 + 1e-3)
        lines.append(
            f"| {row['spec']['layer']} | {_shape(row)} | {new['data_free']:.3f} | {base['calibrated']:.3f} "
            f"| {new['calibrated']:.3f} | {base['error']:.6f} | {new['error']:.6f} "
            f"| {_change(new['error'], base['error'])} | {_change(nostop['error'], base['error']) if nostop else ''} "
            f"| {_same_bits(res, threads)} |"
        )
    count = len(rows)
    lines.append(
        f"| **all {count} layers** | | {totals['df']:.2f} | {totals['base']:.2f} | {totals['new']:.2f} "
        f"| {totals['eb']:.5f} (sum) | {totals['en']:.5f} (sum) | {_change(totals['en'], totals['eb'])} "
        f"| {_change(totals['ens'], totals['eb'])} | |"
    )
    lines += ["", f"Output error lower than before on {better} layers, higher on {worse} (by more than 0.1%)."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=DEFAULT_BASE, help="git revision of the 'before' code")
    parser.add_argument("--shapes", nargs="*", default=["1536x1536", "6144x1536", "1536x6144"])
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--samples", type=int, default=4096, help="random inputs behind each synthetic Gram")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per layer and worker (fastest kept)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_fit_") as tmp:
        work = Path(tmp)
        base_tree = _extract(args.base, work / "base")
        specs: list[dict[str, Any]] = []
        for shape in args.shapes:
            out, n = (int(v) for v in shape.split("x"))
            path = work / f"synthetic-{n}.safetensors"
            if not path.exists():
                _synthetic_statistics(n, args.samples, path)
            specs.append({"kind": "synthetic", "shape": [out, n], "seed": out * 7919 + n, "statistics": str(path)})
        model_specs: dict[str, list[dict[str, Any]]] = {}
        for model in args.models:
            path = work / (model.replace("/", "_") + ".safetensors")
            names = _model_statistics(model, path)
            model_specs[model] = [
                {"kind": "model", "model": model, "layer": name, "statistics": str(path)} for name in names
            ]
        workers = {
            (version, t): Worker(version, tree, t)
            for version, tree in (("base", base_tree), ("new", ROOT))
            for t in args.threads
        }
        try:
            warmup = work / "synthetic-256.safetensors"
            _synthetic_statistics(256, 1024, warmup)
            for worker in workers.values():  # first calls pay one-time costs (imports, kernels): not timed
                worker.measure({"kind": "synthetic", "shape": [64, 256], "seed": 0, "statistics": str(warmup)})
            started = time.perf_counter()
            synthetic = _run(specs, workers, args.repeats)
            models = {model: _run(s, workers, args.repeats) for model, s in model_specs.items()}
            elapsed = time.perf_counter() - started
        finally:
            for worker in workers.values():
                worker.close()
    load_after = os.getloadavg()

    import torch

    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    lines = [
        "# The calibrated fit of one layer against its data-free fit, before and after",
        "",
        f"`python scripts/bench_fit.py {' '.join(sys.argv[1:])}`: before = `{args.base}`, after = the working tree "
        f"at `{revision.stdout.strip()}`; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} at the start and {load_after[0]:.1f} at the end "
        f"(a shared machine: compare the ratios, measured interleaved); {elapsed / 60:.1f} minutes. 3-bit "
        "per-channel `ot-vp`, `CalibrationConfig()` defaults; seconds are the fastest of "
        f"{args.repeats} run(s).",
        "",
    ]
    if synthetic:
        lines += [f"## SD3-like widths ({args.samples} correlated random inputs per Gram)", ""]
        lines += _synthetic_table(synthetic, args.threads) + [""]
    for model, rows in models.items():
        lines += _model_table(model, rows, args.threads) + [""]
    text = "\n".join(lines)
    print(text)
    if args.output is not None:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
