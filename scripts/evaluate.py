#!/usr/bin/env python
"""Evaluate OT codebooks against the paper's baselines and the peer backends on the bundled reference models.

    accelerate launch --multi_gpu --num_processes 2 scripts/evaluate.py --config scripts/configs/evaluate-full.yaml \
        --output results/evaluation
    python scripts/evaluate.py --quick --output /tmp/otq-eval          # tiny grid, a few minutes, used by the tests

On a CPU-only host ``--multi_gpu`` starts that many CPU processes (gloo); accelerate's ``--cpu`` flag would run
a single process. Work is sharded over the processes (reference sample batches first, then quantized variants), every process
appends its rows to ``<output>/rows/rank<i>.jsonl``, and the main process merges them into
``<output>/results.jsonl`` and writes ``report.md``, ``results.csv`` and ``plots/``. Rerunning the same command
skips finished cells, so an interrupted run resumes where it stopped (with any number of processes). Each
process runs torch with ``threads`` threads (config), so results do not depend on the number of processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path


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
    return parser.parse_args()


def _command(world: int) -> str:
    """The command line that reproduces this run (paths inside the repository made relative)."""
    launcher = f"accelerate launch --multi_gpu --num_processes {world}" if world > 1 else "python"
    args = [os.path.relpath(a, REPO) if a.startswith(str(REPO)) else a for a in sys.argv]
    return f"{launcher} {shlex.join(args)}"


def main() -> None:
    args = _parse()
    config_path = CONFIGS / "evaluate-quick.yaml" if args.quick else args.config
    import torch
    from accelerate import PartialState

    from diffusers_otq.evaluation.config import expand_units, load_config
    from diffusers_otq.evaluation.report import write_report
    from diffusers_otq.evaluation.runner import Evaluator, reference_jobs
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
    for noisy in ("diffusers_otq.convert", "diffusers_otq.api", "diffusers_otq.quantizer"):
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
        report = write_report(rows, args.output, command=_command(world))
        logger.info("%d rows in %s; report %s", len(rows), merged, report)


if __name__ == "__main__":
    main()
