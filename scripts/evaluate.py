#!/usr/bin/env python
"""Evaluate OT codebooks against the paper's baselines and the peer backends on the bundled reference models.

    accelerate launch --multi_gpu --num_processes 2 scripts/evaluate.py --config scripts/configs/evaluate-full.yaml \
        --output results/evaluation
    python scripts/evaluate.py --quick --output /tmp/otq-eval          # tiny grid, a few minutes, used by the tests

On a CPU-only host ``--multi_gpu`` starts that many CPU processes (gloo); accelerate's ``--cpu`` flag would run
a single process. Work is sharded over the processes (reference sample batches first, then the calibration
statistics of the models with calibrated variants, then quantized variants), every process
appends its rows to ``<output>/rows/rank<i>.jsonl``, and the main process merges them into
``<output>/results.jsonl`` and writes ``report.md``, ``results.csv`` and ``plots/``. Rerunning the same command
skips finished cells, so an interrupted run resumes where it stopped (with any number of processes). Each
process runs torch with ``threads`` threads (config), so results do not depend on the number of processes.

``--update-cards`` then writes each bundled reference model's quantized quality (the FID-measured headline
configurations) into its ``reference.json`` and model card (``diffusers_otq/model_cards/`` and the pipeline's README.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from diffusers_otq.evaluation.config import EvalConfig, Unit


REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "scripts" / "configs"
logger = logging.getLogger("evaluate")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", type=Path, help="evaluation YAML (see scripts/configs/)")
    which.add_argument("--quick", action="store_true", help=f"the tiny CI grid, {CONFIGS / 'evaluate-quick.yaml'}")
    parser.add_argument("--output", type=Path, required=True, help="results directory (created; reruns resume)")
    parser.add_argument(
        "--stats-cache",
        type=Path,
        default=REPO / "runs" / "fid-stats",
        help="cache of the test sets' Inception statistics (shared between runs)",
    )
    parser.add_argument(
        "--models", nargs="+", default=None, help="run only these models of the config (the report covers all rows)"
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the rows on disk")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop starting new units after this")
    parser.add_argument(
        "--update-cards",
        action="store_true",
        help="write the measured quantized quality into the bundled reference models' cards",
    )
    return parser.parse_args()


_NOT_QUOTED = {"--report-only": 0, "--update-cards": 0, "--max-minutes": 1}  # flag -> values it takes


def _command(world: int) -> str:
    """The command line that reproduces this run's rows (repository paths made relative).

    Flags that do not change the rows (``--report-only``, ``--update-cards``, ``--max-minutes``) are left out,
    so the report regenerated from a resumed or report-only pass quotes the run's command.
    """
    launcher = f"accelerate launch --multi_gpu --num_processes {world}" if world > 1 else "python"
    args, skip = [], 0
    for arg in sys.argv:
        if skip:
            skip -= 1
            continue
        if arg.split("=", 1)[0] in _NOT_QUOTED:
            skip = 0 if "=" in arg else _NOT_QUOTED[arg]
            continue
        args.append(os.path.relpath(arg, REPO) if arg.startswith(str(REPO)) else arg)
    return f"{launcher} {shlex.join(args)}"


def _missing_cells(units: list[Unit], done: set[str]) -> list[str]:
    """A note per model whose cells of the config are not all in ``done`` (empty when the run is complete)."""
    from collections import Counter

    missing: Counter[str] = Counter()
    for unit in units:
        missing[unit.model] += len(unit.pending(done))
    return [
        f"**Unfinished:** {count} cells of {model} in this config are not measured yet; rerun the command above "
        "to continue (finished cells are kept)."
        for model, count in sorted(missing.items())
        if count
    ]


def _update_cards(rows: list[dict], models: list[str], config: EvalConfig, output: Path, command: str) -> None:
    """Write each bundled model's quantized quality into its reference.json and card."""
    from diffusers_otq.evaluation.cards import update_reference_card
    from diffusers_otq.reference import PREFIX, resolve_reference

    sampling, sizes = config.sampling, config.sizes
    description = (
        "Every Linear/Conv2d weight quantized as `OTQConfig` does (deploy scope); everything else in fp16. "
        f"Euler {sampling.steps} steps, guidance {sampling.guidance_scale}. Sample PSNR and class accuracy: "
        f"{sizes.samples} samples per seed against the full-precision model's samples from the same noise "
        f"(mean ± std over the seeds run); FID: {sizes.fid_samples} samples of seed 0 against the full-precision "
        f"samples and against the {sizes.fid_test_images} test images. Bits/weight count every code, codebook, "
        "scale and zero-point. Per method the granularity with the lower FID vs fp is shown; `mixed` rows choose "
        "per-layer bits under a bits/weight budget (the code bits column shows the budget); **bold** = ours."
    )
    report = os.path.relpath(output.resolve() / "report.md", REPO)
    for model in models:
        if not model.startswith(PREFIX):
            logger.info("%s is not a bundled reference model; no card to update", model)
            continue
        update_reference_card(
            Path(resolve_reference(model)),
            rows,
            command=command,
            report=report,
            description=description,
            template=REPO / "diffusers_otq" / "model_cards" / "reference_model.md",
            cards_dir=REPO / "diffusers_otq" / "model_cards",
        )


def main() -> None:
    args = _parse()
    config_path = CONFIGS / "evaluate-quick.yaml" if args.quick else args.config
    import torch
    from accelerate import PartialState

    from diffusers_otq.evaluation.config import expand_units, load_config
    from diffusers_otq.evaluation.report import write_report
    from diffusers_otq.evaluation.runner import Evaluator, calibration_models, reference_jobs
    from diffusers_otq.evaluation.store import ResultStore

    try:
        config = load_config(config_path)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    state = PartialState(cpu=True) if not torch.cuda.is_available() else PartialState()
    rank, world = state.process_index, state.num_processes
    logging.basicConfig(
        level=logging.INFO if state.is_main_process else logging.WARNING,
        format=f"%(asctime)s [rank {rank}/{world}] %(name)s %(levelname)s %(message)s",
    )
    noisy_loggers = ("convert", "api", "quantizer", "calibration.api", "calibration.allocation")
    for noisy in (f"diffusers_otq.{name}" for name in noisy_loggers):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(config.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    store = ResultStore(args.output, rank)
    units = expand_units(config)
    if args.models:
        unknown = sorted(set(args.models) - set(config.models))
        if unknown:
            raise SystemExit(f"error: --models {unknown} are not in {config_path} (models: {list(config.models)}).")
        units = [unit for unit in units if unit.model in args.models]

    if not args.report_only:
        started = time.monotonic()
        evaluator = Evaluator(config, args.output, args.stats_cache)
        jobs = reference_jobs(config, units)
        logger.info(
            "%d units, %d reference batches, %d processes x %d threads", len(units), len(jobs), world, config.threads
        )
        for index, job in enumerate(jobs[rank::world]):
            evaluator.run_reference_job(job)
            logger.info("reference batch %d/%d done", index * world + rank + 1, len(jobs))
        state.wait_for_everyone()
        done = store.done_keys()
        # every process together: collecting is shared out over the processes (then cached on disk)
        for model in calibration_models(units, done):
            try:
                evaluator.calibration_statistics(model, collective=True)
            except Exception:  # its calibrated units retry and record the error in their rows
                logger.exception("calibration statistics of %s failed", model)
        mine = units[rank::world]
        for index, unit in enumerate(mine, start=1):
            if args.max_minutes is not None and time.monotonic() - started > args.max_minutes * 60:
                logger.warning("--max-minutes %.0f reached; rerun the same command to continue", args.max_minutes)
                break
            rows = evaluator.run_unit(unit, done)
            if rows:
                store.append(rows)
                logger.info("unit %d/%d %s: %d rows", index, len(mine), unit.row_fields(), len(rows))
        state.wait_for_everyone()

    if state.is_main_process:
        merged = store.merge()
        rows = store.rows()
        command = _command(world)
        notes = _missing_cells(units, store.done_keys())
        report = write_report(rows, args.output, command=command, notes=notes)
        logger.info("%d rows in %s; report %s", len(rows), merged, report)
        if args.update_cards:
            _update_cards(rows, list(config.models), config, args.output, command)


if __name__ == "__main__":
    main()
