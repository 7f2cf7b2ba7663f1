"""Calibrated quantization at scale: random SD3-style transformers, widths 1024/1536, 2-24 blocks, one process each.

Every grid point (width x blocks) is a seeded ``SD3Transformer2DModel`` with default init
(:mod:`diffusers_otq.evaluation.scale_models`). A reference process records the float model's velocity on the
calls of held-out Euler trajectories (other seeds than calibration) and checks it is finite and non-trivial;
then each variant runs in its own process with ``--threads`` torch threads:

1. ``data-free``: ``quantize_model(model, OTQConfig(bits=3))``
2. ``calibrated-3bit``: 3 bits, calibrated on ``forward_fn`` Euler trajectories
3. ``budget-2.5``: ``OTQConfig(bits_per_weight=2.5)``, calibrated
4. ``budget-2.5+refine50``: the budget plus 50 refinement steps per block (one-call API only)

Calibrated variants go through one function, ``quantize_scale_variant``: ``--api two-step`` calls
``calibrate`` then ``quantize_model(statistics=...)``; ``--api one-call`` calls
``quantize_model(model, config, calibration=CalibrationConfig(forward_fn=..., num_batches=...))``. Without
``--api`` the one-call API is used when a probe shows that ``quantize_model`` calibrates by itself.

Columns: seconds (quantization only; calibration included), peak RSS and its excess over the loaded float model
(also as a multiple of the float32 model's size), bits/weight (every stored bit of the OTQ layers), relative
velocity error ``sum ||v_q - v_fp||^2 / sum ||v_fp||^2`` on the held-out calls. Then time per weight against
depth and width, ratios to data-free, memory against the float32 size, and an extrapolation to SD3.5-large and
Flux.1 from the measured time per weight. Read ratios, not absolute times: the machine is shared.

    python scripts/bench_scale.py --output results/bench_scale.md                    # the "hour" grid
    python scripts/bench_scale.py --grid depth --output results/bench_scale_depth.md # 6, 12, 24 blocks
    python scripts/bench_scale.py --grid 1024x2 --api two-step --output results/bench_scale.md
    python scripts/bench_scale.py --grid 1024x24:data-free+calibrated-3bit           # some variants only
    python scripts/bench_scale.py --render results/bench_scale.jsonl --output results/bench_scale.md

Grid (``GRIDS``): time, not memory, bounds it on 2 cores. The largest SD3-style model that fits this machine's 24
GiB is SD3-medium's size itself (width 1536, 24 blocks: 2.0B parameters, 4 GiB in bfloat16, 8 GiB in float32,
plus at most 0.5x for quantization), but at ~5.6 µs per weight for the four variants it alone would take ~3 hours.
The default ``hour`` grid runs every variant at 1024 x 2/6 and 1536 x 2 and the two cheap variants at 1024 x 12;
``depth`` sweeps 6/12/24 blocks for the depth target; ``full`` is the whole 2-24 x 1024/1536 grid.

Models are float32 by default (``--dtype bfloat16`` is there): on this CPU a bfloat16 ``nn.Linear`` ran 4x slower
than float32 (7 vs 30 GFLOP/s for 666 x 1024 x 4096 with 2 threads), so in bfloat16 the calibration sampling alone
would cost more than the data-free quantization.

Every finished process appends a line to ``--log`` (default: the output with ``.jsonl``), and the markdown is
rewritten after every grid point, so a long run that is stopped keeps what it measured.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


logger = logging.getLogger("bench_scale")

REPO = Path(__file__).resolve().parent.parent
VARIANTS: tuple[str, ...] = ("data-free", "calibrated-3bit", "budget-2.5", "budget-2.5+refine50")
CHEAP = "data-free+calibrated-3bit"
GRIDS = {
    "hour": f"1024x2,1536x2,1024x6,1024x12:{CHEAP}",
    "depth": f"1024x6:{CHEAP},1024x12:{CHEAP},1024x24:{CHEAP}",
    "full": "1024x2,1024x6,1024x12,1024x24,1536x2,1536x6,1536x12",
}
"""Named grids. ``hour``: every variant where it fits in about an hour of 2 uncontended cores if the one-call API meets
the issue's targets (about 5.6 µs per weight per grid point: data-free ~0.4, calibrated <= 2x, budget ~3x, budget +
refinement <= 5x, five held-out evaluations ~1.0), plus 12 blocks for the two cheap variants; ``depth``: the 6 -> 24
block sweep of the depth target for the cheap variants (~50 min); ``full``: every variant at 2-24 blocks at width
1024 and 2-12 at 1536 (several hours)."""
COLUMNS: tuple[str, ...] = (
    "width",
    "blocks",
    "params (M)",
    "variant",
    "API",
    "sampling s (calls)",
    "quantize s",
    "total s",
    "CPU s",
    "vs data-free",
    "µs/weight",
    "peak RSS (MiB)",
    "peak extra (MiB)",
    "extra / fp32",
    "bits/weight",
    "velocity error",
)
TARGETS = {"calibrated-3bit": 2.0, "budget-2.5+refine50": 5.0}  # total time / data-free, the targets
MEMORY_TARGET = 0.5  # peak extra RSS / float32 model size
DEPTH_TOLERANCE = 0.2  # time per weight constant within +-20% from 6 blocks up


@dataclass(frozen=True)
class GridPoint:
    """One model size and the variants measured on it."""

    width: int
    depth: int
    variants: tuple[str, ...]


def parse_grid(text: str, variants: tuple[str, ...]) -> list[GridPoint]:
    """``"1024x2,1536x6:data-free+calibrated-3bit"`` (or a :data:`GRIDS` name) -> grid points (``variants`` where
    a point names none)."""
    points = []
    for entry in filter(None, (e.strip() for e in GRIDS.get(text, text).split(","))):
        size, _, names = entry.partition(":")
        width, _, depth = size.partition("x")
        chosen = tuple(names.split("+")) if names else variants
        unknown = [v for v in chosen if v not in VARIANTS]
        if unknown or not width.isdigit() or not depth.isdigit():
            raise SystemExit(f"bad grid entry {entry!r}: expected WIDTHxBLOCKS[:variant+variant] with {VARIANTS}")
        points.append(GridPoint(int(width), int(depth), chosen))
    return points


# ------------------------------------------------------------------------------------------------- workers


def _exit_with(parent_pid: int, every: float = 5.0) -> None:
    """Exit this process soon after ``parent_pid`` has gone (a stopped benchmark leaves no worker running on)."""
    while True:
        time.sleep(every)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(3)


def _entry(
    kind: str, spec: dict[str, Any] | None, threads: int, level: int, connection: Any, parent_pid: int | None = None
) -> None:
    """The worker process: imports the package (already loaded in the fork server) and runs ``kind``; with
    ``parent_pid``, a watchdog thread ends it when that process (the benchmark) has gone. Forked from the fork server,
    the worker would otherwise outlive a stopped benchmark."""
    import threading

    from diffusers_otq.evaluation.scale_models import run_worker as entry

    if parent_pid is not None:
        threading.Thread(target=_exit_with, args=(parent_pid,), daemon=True).start()
    entry(kind, spec, threads, level, connection)


def run_worker(kind: str, spec: dict[str, Any] | None, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """Run ``scale_models.run_worker(kind, spec)`` in a fresh process, forked from a server that imported torch,
    diffusers and diffusers_otq once (this process never imports them); returns ``{"ok": ...}``, ``{"error":
    ...}`` or ``{"timed_out": seconds}``."""
    context = multiprocessing.get_context("forkserver")
    receive, send = context.Pipe(duplex=False)
    level = logging.INFO if args.verbose else logging.WARNING
    process = context.Process(target=_entry, args=(kind, spec, args.threads, level, send, os.getpid()), daemon=True)
    start = time.perf_counter()
    process.start()
    send.close()
    try:
        if not receive.poll(timeout):
            process.kill()
            return {"timed_out": time.perf_counter() - start}
        return receive.recv()
    except EOFError:
        process.join()
        return {"error": f"the process died (exit code {process.exitcode}; -9 is the OOM killer or a kill)"}
    finally:
        process.join(timeout=60)
        receive.close()


def _machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    mem_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line
    )
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_kib / 2**20,
        "torch": importlib.metadata.version("torch"),
        "diffusers": importlib.metadata.version("diffusers"),
        "python": platform.python_version(),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_start": os.getloadavg()[0],
    }


def _append(log: Path, record: dict[str, Any]) -> None:
    with log.open("a") as f:
        f.write(json.dumps(record) + "\n")


def measure(args: argparse.Namespace, grid: list[GridPoint], log: Path) -> None:
    """Run the grid, appending every record to ``log`` and re-rendering the markdown after each grid point."""
    multiprocessing.set_forkserver_preload(["torch", "diffusers", "diffusers_otq"])
    api = args.api
    if api is None:
        probe = run_worker("probe", None, args, 600)
        if "ok" not in probe:
            logger.warning("the API probe failed, using the two-step API: %s", probe)
        api = probe.get("ok", {}).get("api", "two-step")
    logger.info("API: %s", api)
    meta = {
        "kind": "meta",
        "command": "python scripts/bench_scale.py " + shlex.join(sys.argv[1:]),
        "api": api,
        "api_source": "--api" if args.api else "probe (quantize_model calibrates by itself?)",
        "threads": args.threads,
        "dtype": args.dtype,
        "calibration": {"batches": args.calibration_batches, "steps": args.calibration_steps,
                        "batch_size": args.calibration_batch_size},
        "heldout": {"trajectories": args.heldout_trajectories, "steps": args.heldout_steps, "batch_size": 1},
        "sample_size": args.sample_size,
        "variant_timeout": args.variant_timeout,
        "note": args.note,
        "machine": _machine(),
    }  # fmt: skip
    _append(log, meta)
    targets = run_worker("targets", None, args, 600)
    if "ok" in targets:
        _append(log, {"kind": "targets", "targets": targets["ok"]})
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as folder:
        for point in grid:
            spec = {  # scale_models.ProcessSpec's fields
                "width": point.width,
                "depth": point.depth,
                "variant": "data-free",
                "api": api,
                "reference": str(Path(folder) / f"heldout_{point.width}x{point.depth}.pt"),
                "dtype": args.dtype,
                "threads": args.threads,
                "sample_size": args.sample_size,
                "calibration_batches": args.calibration_batches,
                "calibration": {"steps": args.calibration_steps, "batch_size": args.calibration_batch_size},
                "heldout_trajectories": args.heldout_trajectories,
                "heldout": {"steps": args.heldout_steps, "batch_size": 1},
            }
            logger.info("%d x %d: recording the float model's held-out velocities", point.width, point.depth)
            reference = run_worker("reference", spec, args, args.variant_timeout)
            _append(log, {"kind": "reference", "width": point.width, "depth": point.depth, **reference})
            if "ok" not in reference:
                logger.error("%d x %d reference failed: %s", point.width, point.depth, reference)
                continue
            for variant in point.variants:
                logger.info("%d x %d: %s", point.width, point.depth, variant)
                result = run_worker("variant", {**spec, "variant": variant}, args, args.variant_timeout)
                record = {"kind": "variant", "width": point.width, "depth": point.depth, "variant": variant, **result}
                _append(log, {**record, "api": api})
                logger.info("%s", {k: v for k, v in record.items() if k != "traceback"})
            _append(log, {"kind": "load", "load": os.getloadavg()[0]})
            if args.output:
                args.output.write_text(render(read_log(log), args.basis))


# ------------------------------------------------------------------------------------------------- report


def read_log(log: Path) -> dict[str, Any]:
    """The records of a run: ``meta``, ``targets``, ``references`` and ``variants`` keyed by (width, depth[, name])."""
    run: dict[str, Any] = {"meta": {}, "targets": {}, "references": {}, "variants": {}, "loads": []}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        kind = record.pop("kind")
        if kind == "meta":
            run["meta"] = record
        elif kind == "targets":
            run["targets"] = record["targets"]
        elif kind == "reference":
            run["references"][(record["width"], record["depth"])] = record
        elif kind == "variant":
            run["variants"][(record["width"], record["depth"], record["variant"])] = record
        elif kind == "load":
            run["loads"].append(record["load"])
    return run


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:,.{digits}f}"


def _status(record: dict[str, Any]) -> str | None:
    """Why a variant has no numbers (unavailable, timed out, failed), or None."""
    if "ok" in record and "unavailable" in record["ok"]:
        return f"not available: {record['ok']['unavailable']}"
    if "timed_out" in record:
        return f"did not finish in {record['timed_out']:.0f} s (stopped)"
    if "error" in record:
        return f"failed: {record['error'][:200]}"
    return None


BASES = {
    "wall": ("seconds", "wall-clock seconds"),
    "cpu": ("cpu_s", "CPU seconds (every thread of the process: on an oversubscribed machine wall-clock time mostly "
            "measures waiting for a core)"),
}  # fmt: skip


def _results(run: dict[str, Any], basis: str = "wall") -> dict[tuple[int, int, str], dict[str, Any]]:
    """(width, depth, variant) -> the measured dict, with ``us_per_weight`` and ``vs_data_free`` added, both from
    the ``basis`` seconds (:data:`BASES`; None where the log has no such field)."""
    field = BASES[basis][0]
    out = {}
    for key, record in run["variants"].items():
        if _status(record) is None:
            out[key] = dict(record["ok"])
    for (width, depth, _variant), r in out.items():
        seconds = r.get(field)
        base = (out.get((width, depth, "data-free")) or {}).get(field)
        r["us_per_weight"] = None if seconds is None else seconds / r["weights"] * 1e6
        r["vs_data_free"] = None if seconds is None or not base else seconds / base
        r["extra_over_fp32"] = r["peak_extra_mib"] / r["float32_mib"]
    return out


def _timed(results: dict) -> dict:
    """The results that have a time per weight in the report's basis."""
    return {key: r for key, r in results.items() if r["us_per_weight"] is not None}


def _main_table(run: dict[str, Any], results: dict) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    notes = []
    for key, record in sorted(run["variants"].items(), key=lambda kv: (kv[0][0], kv[0][1], VARIANTS.index(kv[0][2]))):
        width, depth, variant = key
        ref = run["references"].get((width, depth), {}).get("ok", {})
        params = _fmt(ref.get("parameters", math.nan) / 1e6, 1)
        api = record.get("api", run["meta"].get("api", "?")) if variant != "data-free" else "—"
        r = results.get(key)
        if r is None:
            status = _status(record)
            notes.append(f"{width} x {depth} {variant}: {status}")
            cells = [str(width), str(depth), params, variant, api, *(["—"] * (len(COLUMNS) - 5))]
            if "timed_out" in record:
                cells[COLUMNS.index("total s")] = f"> {record['timed_out']:.0f}"
            if "unavailable" in status:
                cells[COLUMNS.index("quantize s")] = "n/a"
        else:
            cells = [
                str(width),
                str(depth),
                params,
                variant,
                api,
                f"{r['calibrate_s']:.1f} ({r.get('forward_calls', '?')})" if variant != "data-free" else "—",
                _fmt(r["quantize_s"], 1),
                _fmt(r["seconds"], 1),
                _fmt(r.get("cpu_s"), 1),
                _fmt(r["vs_data_free"]) + "x" if r["vs_data_free"] else "—",
                _fmt(r["us_per_weight"], 3),
                _fmt(r["peak_rss_mib"], 0),
                _fmt(r["peak_extra_mib"], 0),
                _fmt(r["extra_over_fp32"], 3) + "x",
                _fmt(r["bits_per_weight"], 3),
                f"{r['velocity_error']:.4g}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", *(f"- {note}" for note in notes), ""]


def _depth_section(results: dict) -> list[str]:
    results = _timed(results)
    lines = [
        "### Time per weight against depth and width",
        "",
        f"µs per quantized weight (total seconds in the report's basis, calibration included); in brackets the ratio "
        "to the same width's "
        f"6-block value. Target: constant within ±{DEPTH_TOLERANCE:.0%} from 6 to 24 blocks, and at most linear in "
        "width (1536 / 1024 ≤ 1.5x at the same depth).",
        "",
    ]
    widths = sorted({w for w, _, _ in results})
    depths = sorted({d for _, d, _ in results})
    lines += ["| variant | width | " + " | ".join(f"{d} blocks" for d in depths) + " | depth target |",
              "|---|---|" + "---|" * len(depths) + "---|"]  # fmt: skip
    for variant in VARIANTS:
        for width in widths:
            row = {d: results[(width, d, variant)]["us_per_weight"] for d in depths if (width, d, variant) in results}
            if not row:
                continue
            anchor = row.get(min((d for d in row if d >= 6), default=-1))
            cells = []
            for d in depths:
                if d not in row:
                    cells.append("")
                elif anchor and d >= 6:
                    cells.append(f"{row[d]:.3f} ({row[d] / anchor:.2f})")
                else:
                    cells.append(f"{row[d]:.3f}")
            deep = [row[d] / anchor for d in row if d >= 6] if anchor else []
            if len(deep) < 2:
                verdict = "— (needs two depths ≥ 6)"
            else:
                spread = max(abs(x - 1) for x in deep)
                verdict = f"{'met' if spread <= DEPTH_TOLERANCE else '**missed**'} (±{spread:.0%})"
            lines.append(f"| {variant} | {width} | " + " | ".join(cells) + f" | {verdict} |")
    lines.append("")
    if len(widths) >= 2:
        lo, hi = widths[0], widths[-1]
        lines += [f"Width: µs/weight at {hi} over {lo} (linear would be {hi / lo:.2f}x):", ""]
        for variant in VARIANTS:
            pairs = [
                (d, results[(hi, d, variant)]["us_per_weight"] / results[(lo, d, variant)]["us_per_weight"])
                for d in depths
                if (hi, d, variant) in results and (lo, d, variant) in results
            ]
            if pairs:
                text = ", ".join(
                    f"{d} blocks {ratio:.2f}x ({'met' if ratio <= hi / lo else '**missed**'})" for d, ratio in pairs
                )
                lines.append(f"- {variant}: {text}")
        lines.append("")
    return lines


def _ratio_section(run: dict[str, Any], results: dict) -> list[str]:
    lines = [
        "### Ratios to data-free (same size, same run)",
        "",
        "Targets: calibrated 3-bit ≤ 2.0x, budget + refinement ≤ 5x the data-free time; peak extra RSS ≤ "
        f"{MEMORY_TARGET}x the float32 model.",
        "",
        "| width | blocks | " + " | ".join(VARIANTS[1:]) + " | worst peak extra / fp32 |",
        "|---|---|" + "---|" * len(VARIANTS),
    ]
    for width, depth in sorted(run["references"]):
        cells = []
        for variant in VARIANTS[1:]:
            r = results.get((width, depth, variant))
            record = run["variants"].get((width, depth, variant))
            if r is None or r["vs_data_free"] is None:
                base = results.get((width, depth, "data-free"))
                if record is not None and "timed_out" in record and base:
                    cells.append(f"> {record['timed_out'] / base['seconds']:.1f}x wall-clock (stopped)")
                else:
                    cells.append("n/a" if record is not None else "")
                continue
            ratio = r["vs_data_free"]
            target = TARGETS.get(variant)
            verdict = "" if target is None else (" met" if ratio <= target else " **missed**")
            cells.append(f"{ratio:.2f}x{verdict}")
        extras = [r["extra_over_fp32"] for (w, d, _), r in results.items() if (w, d) == (width, depth)]
        worst = max(extras, default=None)
        mem = "" if worst is None else f"{worst:.3f}x {'met' if worst <= MEMORY_TARGET else '**missed**'}"
        lines.append(f"| {width} | {depth} | " + " | ".join(cells) + f" | {mem} |")
    return [*lines, ""]


def _extrapolation_section(run: dict[str, Any], results: dict) -> list[str]:
    results = _timed(results)
    targets = run["targets"]
    if not targets or not results:
        return []
    widths = sorted({w for w, _, _ in results})
    lines = [
        "### Extrapolation to SD3.5-large and Flux.1 on this CPU",
        "",
        "From the measured µs per weight of the largest model measured (most weights), scaled to the target's "
        "width as `(width / measured width)^alpha` and multiplied by the target's quantized weights (counted on the "
        "meta device). `alpha` is measured between the two widths at their deepest common depth where both were "
        "run; the issue's bound is alpha = 1 (time per weight at most linear in width). The sampling part assumes "
        "the calibration set here (tokens per call as above); real 1024² calibration images have ~13x more tokens "
        "per call.",
        "",
        "| variant | from | alpha | " + " | ".join(f"{n} ({t['weights'] / 1e9:.1f}B weights, width {t['width']})"
                                             for n, t in targets.items()) + " |",
        "|---|---|---|" + "---|" * len(targets),
    ]  # fmt: skip
    for variant in VARIANTS:
        measured = [(w, d) for (w, d, v) in results if v == variant]
        if not measured:
            continue
        width, depth = max(measured, key=lambda size: results[(*size, variant)]["weights"])
        base = results[(width, depth, variant)]["us_per_weight"]
        alpha = None
        common = (
            [d for (w, d) in measured if w == widths[0] and (widths[-1], d) in measured] if len(widths) > 1 else []
        )
        if common:
            d = max(common)
            hi, lo = results[(widths[-1], d, variant)], results[(widths[0], d, variant)]
            alpha = math.log(hi["us_per_weight"] / lo["us_per_weight"]) / math.log(widths[-1] / widths[0])
        cells = []
        for target in targets.values():
            scale = target["width"] / width
            hours = [
                base * scale**a * target["weights"] / 1e6 / 3600
                for a in ([alpha] if alpha is not None else []) + [1.0]
            ]
            cells.append(" / ".join(f"{h:.1f} h" for h in hours))
        alpha_text = "—" if alpha is None else f"{alpha:.2f}"
        lines.append(f"| {variant} | {width} x {depth} | {alpha_text} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cells: hours at the measured alpha / at alpha = 1 (only the latter where one width was measured).",
        "",
    ]
    return lines


def render(run: dict[str, Any], basis: str = "wall") -> str:
    """The markdown report of a run (the records of :func:`read_log`), ratios and times per weight in ``basis``
    seconds (:data:`BASES`)."""
    meta = run["meta"]
    machine = meta.get("machine", {})
    results = _results(run, basis)
    cal, held = meta.get("calibration", {}), meta.get("heldout", {})
    loads = [machine.get("load_start", math.nan), *run["loads"]]
    refs = [r["ok"] for r in run["references"].values() if "ok" in r]
    lines = ["# Calibrated quantization at scale: random SD3-style transformers", ""]
    if meta.get("api") == "two-step":
        lines += [
            "**Old two-step path**: calibrated variants run `statistics = calibrate(model, config, "
            "CalibrationConfig(forward_fn=..., num_batches=...))`, then `quantize_model(model, config, "
            "statistics=statistics)` (all layers' statistics at once, then every layer's fit); refinement of a "
            "`forward_fn` calibration is not available there. This is the baseline for the block-by-block one-call "
            "API (`quantize_model(model, config, calibration=CalibrationConfig(forward_fn=...))`).",
            "",
        ]
    if meta.get("api") == "one-call":
        lines += [
            "**One-call API**: calibrated variants run `quantize_model(model, config, calibration=CalibrationConfig("
            "forward_fn=..., num_batches=..., refine_steps=...))`, which (block by block, with the library's "
            "defaults) traces the float model's trajectories once, then gives each block its statistics, bits plan, "
            "fits and refinement.",
            "",
        ]
    if meta.get("note"):
        lines += [meta["note"], ""]
    lines += [
        f"Command: `{meta.get('command', '?')}`",
        "",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, {machine.get('memory_gib', 0):.0f} GiB; "
        f"torch {machine.get('torch', '?')}, diffusers {machine.get('diffusers', '?')}, commit {machine.get('commit', '?')}, "
        f"{machine.get('date', '?')}. **torch threads = {meta.get('threads', '?')}** in every process; one process per "
        "variant (forked from a server that imported diffusers_otq once). Load average (1 min) at the start and after "
        f"each grid point: {', '.join(_fmt(x, 1) for x in loads)} — the machine is shared, so read ratios (same run), "
        "not absolute seconds.",
        "",
        f"Calibrated variants use the **{meta.get('api', '?')} API**. Model: `SD3Transformer2DModel`, head size 64, "
        f"16 latent channels, patch 2, sample size {meta.get('sample_size', '?')} ({(meta.get('sample_size', 0) // 2) ** 2} "
        f"image tokens + 77 text tokens), T5 width 4096, pooled width 2048, PyTorch's default init (seed 0), "
        f"{meta.get('dtype', '?')}. Calibration set (fixed): {cal.get('batches', '?')} Euler trajectories x "
        f"{cal.get('steps', '?')} steps x batch {cal.get('batch_size', '?')}, random latents and text states from seeds "
        f"10000+b. Held-out: {held.get('trajectories', '?')} trajectories x {held.get('steps', '?')} steps x batch 1 from "
        "seeds 20000+k, the quantized model teacher-forced on the float model's calls.",
        "",
        "Columns: `sampling s (calls)` is the time spent inside `forward_fn` (the calibration sampling the library "
        "asked for, its statistics hooks included) and how many trajectories it ran; `quantize s` is the rest, `total "
        f"s` both, `CPU s` the process's CPU time for the same span (all threads); **`vs data-free` and `µs/weight` "
        f"(seconds per quantized weight), and every ratio and time per weight below, use {BASES[basis][1]}**; "
        "`peak extra` is the process's peak "
        "RSS (VmHWM, reset after the float model is built) above its RSS at that point, and `extra / fp32` that over "
        "the float32 model's size; `bits/weight` counts every stored bit of the OTQ layers (codes, codebooks, scales); "
        "`velocity error` is `sum ||v_q - v_fp||² / sum ||v_fp||²` over the held-out calls.",
        "",
    ]
    if refs:
        lines += [
            "Float models: velocity RMS "
            + ", ".join(f"{r['velocity_rms']:.3f}" for r in refs)
            + "; relative change from the first to the last held-out call "
            + ", ".join(f"{r['velocity_variation']:.2f}" for r in refs)
            + " (finite and non-trivial: checked). Seconds per float held-out call (batch 1): "
            + ", ".join(f"{r['float_call_s']:.2f}" for r in refs)
            + ".",
            "",
        ]
    lines += _main_table(run, results)
    lines += _ratio_section(run, results)
    lines += _depth_section(results)
    lines += _extrapolation_section(run, results)
    return "\n".join(lines)


def _summary(run: dict[str, Any], basis: str) -> str:
    """The main table alone, for the terminal."""
    return "\n".join(_main_table(run, _results(run, basis)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--grid", default="hour", help=f"WIDTHxBLOCKS[:variant+...] entries, or one of {sorted(GRIDS)} (default: hour)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="variants of entries that name none")
    parser.add_argument(
        "--api",
        choices=("one-call", "two-step"),
        default=None,
        help="calibrated variants' API (default: one-call when quantize_model calibrates by itself)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--sample-size", type=int, default=32, help="latent side (tokens: (side / 2)^2 + 77)")
    parser.add_argument("--calibration-batches", type=int, default=2, help="Euler trajectories (forward_fn batches)")
    parser.add_argument("--calibration-steps", type=int, default=8)
    parser.add_argument("--calibration-batch-size", type=int, default=2)
    parser.add_argument("--heldout-trajectories", type=int, default=2)
    parser.add_argument("--heldout-steps", type=int, default=8)
    parser.add_argument("--variant-timeout", type=float, default=3600, help="seconds before a process is stopped")
    parser.add_argument("--output", type=Path, default=None, help="write the markdown report here")
    parser.add_argument("--log", type=Path, default=None, help="JSON lines of every process (default: output.jsonl)")
    parser.add_argument("--render", type=Path, default=None, help="only render the report of this log")
    parser.add_argument(
        "--note", default="", help="a paragraph for the report, under its title (with --render: replaces the run's)"
    )
    parser.add_argument(
        "--basis",
        choices=sorted(BASES),
        default="wall",
        help="seconds behind the ratios and times per weight: wall-clock, or CPU (a busy machine)",
    )
    parser.add_argument("--verbose", action="store_true", help="the library's INFO logs from every process")
    args = parser.parse_args()  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.render:
        run = read_log(args.render)
        if args.note:
            run["meta"]["note"] = args.note
    else:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        grid = parse_grid(args.grid, tuple(filter(None, args.variants.split(","))))
        log = args.log or (args.output.with_suffix(".jsonl") if args.output else None)
        if log is None:
            handle, name = tempfile.mkstemp(prefix="bench_scale_", suffix=".jsonl")
            os.close(handle)
            log = Path(name)
        log.write_text("")
        measure(args, grid, log)
        run = read_log(log)
    print(_summary(run, args.basis))
    if args.output:
        args.output.write_text(render(run, args.basis))
        logger.info("wrote %s", args.output)


if __name__ == "__main__":
    main()
