"""What the sampled candidate estimate of a bits budget costs and loses against the exhaustive one, same run.

For each bundled model (``otq/fashion-mnist-unet``, ``otq/fashion-mnist-dit``): calibration statistics as
``calibrate(pipe, OTQConfig(bits=3), CalibrationConfig(num_samples=64))`` (cached in ``--cache``), then the candidate
table of the demo's budget config (``ot-vp``, group candidates of 64) measured twice in this process with one
torch thread, ``estimate="exhaustive"`` (every candidate fitted on the whole layer) and ``estimate="sampled"``
(the default: 64-row samples). At each budget both tables are allocated and compared on

* the summed *true* relative output error of the plan: every chosen setting's error read from the exhaustive
  table (the exhaustive plan minimises it; the ratio says what the estimate lost);
* sample PSNR of the quantized model (allocation + calibrated fits, no refinement) against the float32 model's
  samples from the same noise: 16 samples, 15 Euler steps, guidance 2, labels cycling over the classes (as the demo).

Seconds are the wall-clock and process CPU seconds of each measurement (the machine is shared: the CPU seconds of
one thread are the steadier measure, and the speed-up is their ratio). ``--sd3 LAYERSxWIDTH`` adds the SD3-style
transformer of results/bench_load.md (calibrated through 2 of its own Euler trajectories with random text
embeddings, no pipeline): summed errors and seconds only; ``LAYERSxWIDTH:sampled`` measures only the sampled
estimate (``6x1024:sampled`` is the 220M-parameter model whose exhaustive measurement did not finish in 24 minutes).

    python scripts/bench_allocation.py --sd3 1x512 6x1024:sampled --output results/bench_allocation.md
    python scripts/bench_allocation.py --models otq/fashion-mnist-dit          # one model
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffusers_otq import CalibrationConfig, CalibrationStatistics, FlowMatchPipeline, OTQConfig, calibrate
from diffusers_otq.calibration import CandidateTable, measure_candidates, quantize_model
from diffusers_otq.evaluation.image_metrics import psnr
from diffusers_otq.functional.cpu_kernels import load as load_cpu_kernels


logger = logging.getLogger("bench_allocation")

BUDGETS: tuple[float, ...] = (2.0, 2.5, 3.0)
ESTIMATES: tuple[str, ...] = ("exhaustive", "sampled")


def budget_config(budget: float | None = None) -> OTQConfig:
    """The demo's budget config (``otq_config`` of a mixed ``ot-vp`` variant): group candidates of 64 values."""
    return OTQConfig(method="ot-vp", granularity="group", group_size=64, bits_per_weight=budget)


@dataclass(frozen=True)
class Measured:
    """One candidate table and what measuring it took."""

    table: CandidateTable
    wall_s: float
    cpu_s: float


def measure(
    model: nn.Module,
    statistics: CalibrationStatistics,
    calibration: CalibrationConfig,
    estimates: Sequence[str] = ESTIMATES,
) -> dict[str, Measured]:
    """The candidate tables of ``model``, by estimate."""
    out = {}
    for estimate in estimates:
        wall, cpu = time.perf_counter(), time.process_time()
        table = measure_candidates(model, budget_config(), statistics, calibration, progress=False, estimate=estimate)
        out[estimate] = Measured(table, time.perf_counter() - wall, time.process_time() - cpu)
        logger.info("%s candidates: %.1f s (CPU %.1f s)", estimate, out[estimate].wall_s, out[estimate].cpu_s)
    return out


def true_error(plan_table: CandidateTable, exact: CandidateTable, budget: float) -> tuple[float, float]:
    """``(summed true error, reached bits/weight)`` of ``plan_table``'s plan at ``budget``: each chosen setting's
    error read from the exhaustive table ``exact``."""
    plan = plan_table.allocate(budget)
    total = 0.0
    for options, errors, choice in zip(exact.options, exact.errors, plan.choices, strict=True):
        total += errors[options.index(choice.spec)]
    return total, plan.bits_per_weight


@dataclass
class Sampler:
    """16 samples of any denoiser from the demo's noise, labels and solver."""

    pipe: FlowMatchPipeline
    num_images: int = 16
    steps: int = 15

    def __call__(self, denoiser: nn.Module) -> torch.Tensor:
        variant = FlowMatchPipeline(transformer=denoiser, scheduler=self.pipe.scheduler)
        variant.set_progress_bar_config(disable=True)
        labels = [i % self.pipe.num_classes for i in range(self.num_images)] if self.pipe.num_classes else None
        return variant(
            batch_size=self.num_images,
            class_labels=labels,
            guidance_scale=2.0,
            num_inference_steps=self.steps,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images


def statistics_of(pipe: FlowMatchPipeline, name: str, cache: Path) -> CalibrationStatistics:
    """The issue's calibration statistics of a bundled model (``CalibrationConfig(num_samples=64)``, whose pipeline
    defaults are 15 steps and guidance 2: given explicitly so that a cached copy can be matched), from ``cache``
    when it holds them."""
    calibration = CalibrationConfig(num_samples=64, num_inference_steps=15, guidance_scale=2.0, progress=False)
    path = cache / f"{name.split('/')[-1]}-statistics.safetensors"
    if path.is_file():
        statistics = CalibrationStatistics.load(path)
        if statistics.collected_with(calibration):
            return statistics
    statistics = calibrate(pipe, OTQConfig(bits=3), calibration)
    path.parent.mkdir(parents=True, exist_ok=True)
    statistics.save(path)
    return statistics


def bundled_rows(name: str, cache: Path, budgets: Sequence[float]) -> list[dict]:
    """Measure both tables of a bundled model, then quantize and sample it at every budget with each."""
    pipe = FlowMatchPipeline.from_pretrained(name, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    fp = pipe.transformer.eval()
    statistics = statistics_of(pipe, name, cache)
    calibration = CalibrationConfig(progress=False)  # refine_steps=0: allocation + calibrated fits only
    tables = measure(fp, statistics, calibration)
    sample = Sampler(pipe)
    reference = sample(fp)
    rows = []
    for budget in budgets:
        row = {"model": name.split("/")[-1], "budget": budget}
        for estimate, measured in tables.items():
            error, reached = true_error(measured.table, tables["exhaustive"].table, budget)
            quantized = copy.deepcopy(fp)
            quantize_model(quantized, budget_config(budget), statistics=statistics, calibration=calibration,
                           candidates=measured.table, progress=False, compute_metrics=False)  # fmt: skip
            row[estimate] = {
                "error": error,
                "bits": reached,
                "psnr": psnr(sample(quantized), reference).mean().item(),
                "wall_s": measured.wall_s,
                "cpu_s": measured.cpu_s,
            }
            logger.info("%s %.1f b/w %s: %s", name, budget, estimate, row[estimate])
        rows.append(row)
    return rows


def sd3_rows(spec: str, budgets: Sequence[float]) -> list[dict]:
    """The SD3-style transformer ``spec`` (``"LAYERSxWIDTH"``, ``":sampled"``: that estimate only), calibrated
    through ``forward_fn`` (2 trajectories x 8 Euler steps, batch 2): summed errors and seconds."""
    from bench_load import _model_config  # the SD3-style model of results/bench_load.md
    from diffusers import SD3Transformer2DModel

    shape, _, only = spec.partition(":")
    layers, width = (int(v) for v in shape.split("x"))
    config = _model_config(layers, width)
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**config).eval()
    statistics = calibrate(model, OTQConfig(bits=3), CalibrationConfig(forward_fn=_trajectory(model, config),
                                                                       num_batches=2, progress=False))  # fmt: skip
    tables = measure(model, statistics, CalibrationConfig(progress=False), (only,) if only else ESTIMATES)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    exact = tables.get("exhaustive")
    rows = []
    for budget in budgets:
        row = {"model": f"SD3-style {layers}x{width} ({params:.0f}M)", "budget": budget}
        for estimate, measured in tables.items():
            if exact is None:  # no exhaustive table: the estimate's own summed error
                plan = measured.table.allocate(budget)
                error, reached = sum(c.relative_error for c in plan.choices), plan.bits_per_weight
            else:
                error, reached = true_error(measured.table, exact.table, budget)
            row[estimate] = {"error": error, "bits": reached, "psnr": math.nan, "wall_s": measured.wall_s,
                             "cpu_s": measured.cpu_s}  # fmt: skip
        rows.append(row)
    return rows


def _trajectory(model: nn.Module, config: dict, batch: int = 2, steps: int = 8) -> Callable[[int], None]:
    """``forward_fn``: one Euler trajectory of ``model`` from noise with random text embeddings."""

    @torch.no_grad()
    def run(index: int) -> None:
        generator = torch.Generator().manual_seed(10_000 + index)
        side = config["sample_size"]
        x = torch.randn(batch, config["in_channels"], side, side, generator=generator)
        context = torch.randn(batch, 77, config["joint_attention_dim"], generator=generator)
        pooled = torch.randn(batch, config["pooled_projection_dim"], generator=generator)
        for k in range(steps):
            timestep = torch.full((batch,), 1000.0 * (1.0 - k / steps))
            velocity = model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                             timestep=timestep).sample  # fmt: skip
            x = x - velocity / steps

    return run


def table(rows: Sequence[dict]) -> str:
    """The rows as one markdown table."""
    lines = [
        "| model | budget | summed error, exhaustive plan | summed true error, estimated plan | ratio | "
        "PSNR dB, exhaustive | PSNR dB, estimated | bits/weight (exh. / est.) | measure s, exhaustive (CPU) | "
        "measure s, estimated (CPU) | speed-up (CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    missing = {"error": math.nan, "bits": math.nan, "psnr": math.nan, "wall_s": math.nan, "cpu_s": math.nan}
    for row in rows:
        exh, est = row.get("exhaustive", missing), row["sampled"]
        cells = [
            row["model"],
            f"{row['budget']:.1f}",
            _number(exh["error"], ".5f"),
            _number(est["error"], ".5f") + (" (estimated)" if exh is missing else ""),
            _number(est["error"] / exh["error"], ".4f"),
            _number(exh["psnr"], ".2f"),
            _number(est["psnr"], ".2f"),
            f"{_number(exh['bits'], '.3f')} / {est['bits']:.3f}",
            f"{_number(exh['wall_s'], '.1f')} ({_number(exh['cpu_s'], '.1f')})",
            f"{est['wall_s']:.1f} ({est['cpu_s']:.1f})",
            _number(exh["cpu_s"] / est["cpu_s"], ".1f") + ("x" if exh is not missing else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: float, spec: str) -> str:
    return "" if math.isnan(value) else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["otq/fashion-mnist-unet", "otq/fashion-mnist-dit"])
    parser.add_argument("--budgets", nargs="*", type=float, default=list(BUDGETS))
    parser.add_argument("--cache", type=Path, default=Path("results/tmp/bench_allocation"), help="statistics cache")
    parser.add_argument("--sd3", nargs="*", default=[], help="SD3-style transformers: LAYERSxWIDTH[:sampled]")
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown report here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("bench_allocation", "diffusers_otq.calibration.allocation"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("diffusers_otq.calibration.allocation").addFilter(lambda r: "bits plan" not in r.getMessage())
    torch.set_num_threads(1)
    load_cpu_kernels()  # the first use on a machine builds them: before anything is timed

    rows = [row for name in args.models for row in bundled_rows(name, args.cache, args.budgets)]
    for spec in args.sd3:
        rows += sd3_rows(spec, args.budgets)
    text = table(rows)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            "# Bits budget: sampled against exhaustive candidate measurement\n\n"
            f"Command: `python scripts/bench_allocation.py {' '.join(sys.argv[1:])}`\n\n"
            "One torch thread, one process. The summed errors are relative output errors summed over the layers, "
            "each chosen setting's error read from the exhaustive table; ratio = estimated plan / exhaustive plan "
            "(1 = the same quality; the target is <= 1.05). PSNR: the quantized model's samples (allocation + "
            "calibrated fits, no refinement) against the float32 model's, same noise. The measurement is done once "
            "per model and serves every budget (its seconds repeat on each row); speed-up = exhaustive CPU "
            "seconds / estimated CPU seconds.\n\n"
            f"{text}\n"
        )


if __name__ == "__main__":
    main()
