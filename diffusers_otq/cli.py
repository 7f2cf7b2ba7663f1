"""The ``diffusers-otq`` command: ``demo``, ``quantize`` and ``generate``.

diffusers-otq demo                                   # the bundled models: ours (data-free, calibrated) vs peers
diffusers-otq quantize otq/fashion-mnist-unet out/ --bits 3
diffusers-otq quantize otq/fashion-mnist-dit out/ --bits-per-weight 2.5 --calibrate   # calibrated, mixed precision
diffusers-otq quantize otq/fashion-mnist-dit out/ --bits 2 --calibrate --refine-steps 600  # + refinement
diffusers-otq quantize path/to/sd3 out/ --bits 3 --calibrate --prompts prompts.txt
diffusers-otq quantize path/to/sd3 out/ --bits 3 --components transformer --push-to-hub me/sd3-otq3
diffusers-otq generate out/ --num-images 20 --class-labels 0 1 2 --output samples/
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import torch
from PIL import Image, ImageDraw

from . import __version__
from .calibration import CalibrationConfig, CalibrationStatistics, quantize_model, quantize_pipeline
from .config import OTQConfig
from .convert import LayerReport
from .evaluation.demo import DEMO_MODELS, DEMO_PEERS, DemoSettings, demo_models, demo_summary, demo_table, model_label
from .evaluation.peers import PEER_FORMATS
from .evaluation.plots import DemoPoint, plot_demo
from .options import DEFAULT_METHOD, GRANULARITIES, METHODS
from .pipeline import FlowMatchPipeline
from .reference import reference_models, resolve_reference


logger = logging.getLogger("diffusers_otq.cli")

DEFAULT_MODEL = "otq/fashion-mnist-unet"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------- helpers


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CLIError(
            f"cannot write to output folder {str(path)!r}: {err.strerror or err}. Choose another path."
        ) from None
    return path


def _folder_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*.safetensors"))


def _grid(rows: list[tuple[str, list[Image.Image]]], scale: int = 3) -> Image.Image:
    """Rows of equally sized images with a text label on the left of each row."""
    cell_w, cell_h = (d * scale for d in rows[0][1][0].size)
    label_w, pad = 150, 2
    columns = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_w + columns * (cell_w + pad), len(rows) * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = r * (cell_h + pad)
        draw.text((4, y + cell_h // 2 - 6 * (label.count("\n") + 1)), label, fill="black")
        for c, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((cell_w, cell_h), Image.NEAREST), (label_w + c * (cell_w + pad), y))
    return grid


def _load_pipeline(source: str, **kwargs: Any) -> FlowMatchPipeline:
    try:
        pipe = FlowMatchPipeline.from_pretrained(source, **kwargs)
    except (ValueError, OSError) as err:
        raise CLIError(str(err)) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------- demo


def _demo_settings(args: argparse.Namespace) -> DemoSettings:
    base = DemoSettings.full() if args.full else DemoSettings()
    chosen = {
        "num_images": args.num_images,
        "steps": args.steps,
        "refine_steps": args.refine_steps,
        "calibration_samples": args.calibration_samples,
        "budgets": None if args.budgets is None else tuple(args.budgets),
        "peers": None if args.peers is None else tuple(args.peers),
        "seed": args.seed,
    }
    for name in ("num_images", "steps", "calibration_samples"):
        if chosen[name] is not None and chosen[name] < 1:
            raise CLIError(f"--{name.replace('_', '-')} {chosen[name]} must be >= 1.")
    if chosen["refine_steps"] is not None and chosen["refine_steps"] < 0:
        raise CLIError(f"--refine-steps {chosen['refine_steps']} must be >= 0.")
    if any(b <= 0 or b > 16 for b in chosen["budgets"] or ()):
        raise CLIError(f"--budgets {list(chosen['budgets'])} must be bits/weight in (0, 16], e.g. 2 2.5 3 4.")
    unknown = sorted(set(chosen["peers"] or ()) - set(PEER_FORMATS))
    if unknown:
        raise CLIError(f"--peers {unknown} are not peer formats; choose from {sorted(PEER_FORMATS)}.")
    return replace(base, **{k: v for k, v in chosen.items() if v is not None})


def _to_pil(images: torch.Tensor, count: int) -> list[Image.Image]:
    return FlowMatchPipeline.numpy_to_pil(images[:count].permute(0, 2, 3, 1).numpy())


def run_demo(args: argparse.Namespace) -> str:
    """The bundled models quantized the recommended way, the data-free default and the peers; grid, plot, table."""
    settings = _demo_settings(args)
    for model in args.models:
        try:
            resolve_reference(model)
        except ValueError as err:
            raise CLIError(str(err)) from None
    if args.jobs is not None and args.jobs < 1:
        raise CLIError(f"--jobs {args.jobs} must be >= 1.")
    output = _writable_dir(Path(args.output))
    start = time.perf_counter()
    rows, records, panels = [], {}, {}
    jobs = args.jobs if args.jobs is not None else min(len(args.models), os.cpu_count() or 1)
    results = demo_models(args.models, settings, cache=output / "cache", jobs=jobs)
    for model, (model_rows, records[model]) in zip(args.models, results, strict=True):
        rows += model_rows
        name = model_label(model)
        grid = [
            (f"{r.variant}\n{r.bits_per_weight:.2f} b/w", _to_pil(r.images, args.grid_columns)) for r in model_rows
        ]
        _grid(grid).save(output / f"demo_grid_{name}.png")
        panels[name] = [
            DemoPoint(
                series={
                    "data-free": "OTQ data-free (ot-vp, per channel)",
                    "best": "OTQ calibrated + budget + refined",
                }.get(r.kind, r.variant.split()[0]),
                label=r.variant.split(" ", 1)[-1] if r.kind == "peer" else "",
                bits_per_weight=r.bits_per_weight,
                psnr=r.psnr,
                line=r.kind in ("data-free", "best"),
            )
            for r in model_rows
            if r.kind != "float"
        ]
    seconds = time.perf_counter() - start
    plotted = plot_demo(panels, output / "demo_rd.png")
    notes = _demo_notes(settings, records, seconds, args.full)
    table, summary = demo_table(rows), demo_summary(rows)
    images = [f"demo_grid_{model_label(m)}.png" for m in args.models] + (["demo_rd.png"] if plotted else [])
    (output / "demo_table.md").write_text(
        "# diffusers-otq demo\n\n"
        + "\n".join(notes)
        + f"\n\n## Sample PSNR (dB) against float32, bits/weight in brackets\n\n{summary}\n\n## Every variant\n\n{table}\n\n"
        + "\n".join(f"![{i}]({i})" for i in images)
        + "\n"
    )
    return (
        f"{table}\n\n{summary}\n\n"
        + "\n".join(notes)
        + f"\n\nWrote {', '.join(images)} and demo_table.md to {output}."
    )


def _demo_notes(settings: DemoSettings, records: dict[str, dict], seconds: float, full: bool) -> list[str]:
    s = settings
    lines = [
        f"{s.num_images} samples per variant from the same noise (seed {s.seed}), {s.steps} Euler steps, guidance "
        f"{s.guidance_scale:g}; PSNR/SSIM against the float32 samples; class agreement = samples the bundled "
        "classifier puts in the class of the float32 sample from the same noise; class acc. = against the labels.",
        f"**OTQ B b/w** = calibrated on {s.calibration_samples} of the model's own samples, per-layer bits under the "
        f"budget B (every stored bit counted), refined {s.refine_steps} steps on {s.refine_samples} trajectories. "
        "Peers: their own formats on the same Linear/Conv2d weights; weights a format cannot store count at 16 bits.",
    ]
    shortened = s.shortened()
    if shortened and not full:
        lines.append(f"Shortened for a quick run: {'; '.join(shortened)}. `diffusers-otq demo --full` runs it all.")
    for model, record in records.items():
        parts = [
            f"{key.removesuffix('_s')} {record[key]:.0f} s"
            for key in ("calibrate_s", "teacher_s", "candidates_s")
            if key in record
        ]
        if parts:
            lines.append(f"{model_label(model)}: shared one-off work (not in quantize s): {', '.join(parts)}.")
        if record.get("peers_missing"):
            missing = " ".join(record["peers_missing"])
            lines.append(
                f"Peers not installed, left out: {missing} (`pip install {missing}` or `diffusers-otq[demo]`)."
            )
    lines.append(f"Took {seconds:.0f} s on {os.cpu_count()} CPU cores.")
    return lines


def _mean_w2(reports: list[LayerReport]) -> float:
    values = [r.w2 for r in reports if not math.isnan(r.w2)]
    return sum(values) / max(len(values), 1)


# ------------------------------------------------------------------------------------------------ quantize


def _config_from_args(args: argparse.Namespace) -> OTQConfig:
    try:
        return OTQConfig(
            bits=args.bits,
            method=args.method,
            granularity=args.granularity,
            group_size=args.group_size,
            vector_dim=args.vector_dim,
            modules_to_not_convert=args.modules_to_not_convert or None,
            bits_per_weight=args.bits_per_weight,
            rank=args.rank,
            rotation=args.rotate,
            rotation_block=args.rotation_block,
        )
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from None


def _read_prompts(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise CLIError(f"cannot read --prompts file {path!r}: {err.strerror or err}.") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CLIError(f"--prompts file {path!r} has no prompts; write one prompt per line.")
    return prompts


def _calibration_from_args(args: argparse.Namespace) -> CalibrationConfig | None:
    """The calibration settings, or None for a data-free run; checked before anything is loaded."""
    calibration_flags = {
        "--prompts": args.prompts,
        "--calibration-labels": args.calibration_labels,
        "--num-samples": args.num_samples,
        "--calibration-steps": args.calibration_steps,
        "--save-statistics": args.save_statistics,
        "--refine-steps": args.refine_steps,
        "--refine-blocks": args.refine_blocks or None,
        "--refine-float-params": args.refine_float_params or None,
        "--noise-bands": args.noise_bands,
        "--work-dir": args.work_dir,
        "--whole-model": args.whole_model or None,
    }
    given = [flag for flag, value in calibration_flags.items() if value is not None]
    if not args.calibrate:
        if given:
            raise CLIError(f"{', '.join(given)} only apply with --calibrate; add --calibrate.")
        return None
    for flag, value in (("--refine-blocks", args.refine_blocks), ("--refine-float-params", args.refine_float_params),
                        ("--noise-bands", args.noise_bands)):  # fmt: skip
        if value and not args.refine_steps:
            raise CLIError(f"{flag} sets how refinement runs; add --refine-steps N (e.g. 600).")
    try:
        return CalibrationConfig(
            num_samples=args.num_samples,
            class_labels=args.calibration_labels,
            prompts=None if args.prompts is None else _read_prompts(args.prompts),
            num_inference_steps=args.calibration_steps,
            seed=args.seed,
            error_feedback=not args.no_error_feedback,
            refine_steps=args.refine_steps or 0,
            refine_scope="blocks" if args.refine_blocks else "model",
            refine_float_params=args.refine_float_params,
            noise_bands=1 if args.noise_bands is None else args.noise_bands,
            sequential=not (
                args.whole_model or args.save_statistics or args.statistics or (args.noise_bands or 1) > 1
            ),
            work_dir=args.work_dir,
        )
    except ValueError as err:
        raise CLIError(str(err)) from None


def _source_kind(source: str) -> tuple[str, Path]:
    path = Path(resolve_reference(source))
    if not path.is_dir():
        raise CLIError(f"{source!r} is not a local folder or a bundled name (bundled: {reference_models()}).")
    if (path / "model_index.json").is_file():
        return "pipeline", path
    if (path / "config.json").is_file() and "_class_name" in json.loads((path / "config.json").read_text()):
        return "model", path
    raise CLIError(
        f"{str(path)!r} is not a diffusers model or pipeline folder (no model_index.json, no config.json with "
        "_class_name)."
    )


def _quantize_module(
    module: torch.nn.Module, config: OTQConfig, name: str, statistics: CalibrationStatistics | None = None
) -> list[LayerReport]:
    logger.info("Quantizing %s (%s)", name, type(module).__name__)
    try:
        return quantize_model(module, config, statistics=statistics, progress=True)
    except ValueError as err:
        raise CLIError(f"{name}: {err}") from None


def _load_statistics(path: str | None) -> CalibrationStatistics | None:
    if path is None:
        return None
    try:
        return CalibrationStatistics.load(path)
    except ValueError as err:
        raise CLIError(str(err)) from None


def _check_weights_fit_class(source: Path, class_name: str, info: dict) -> None:
    """The weights in ``source`` must be exactly those of ``class_name``: diffusers only warns about missing keys
    (left randomly initialised) and unused ones, and quantizing that model would save noise."""
    problems = {k: list(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        found = "; ".join(f"{len(v)} {k.replace('_', ' ')} (e.g. {v[0]!r})" for k, v in problems.items() if v)
        raise CLIError(
            f"{source}: the weights do not fit {class_name}, the class config.json names: {found}. Fix _class_name "
            "in config.json, or pass the folder of the model these weights belong to."
        )


def run_quantize(args: argparse.Namespace) -> str:
    """Load SRC, quantize its denoiser (or the named components) post-hoc, save to OUT, print a summary."""
    import diffusers

    config = _config_from_args(args)
    calibration = _calibration_from_args(args)
    kind, source = _source_kind(args.source)
    if kind == "model" and calibration is not None:
        raise CLIError(
            f"--calibrate samples with the whole pipeline, but {str(source)!r} is a single model folder; pass its "
            "pipeline folder, or --statistics FILE saved from an earlier calibration."
        )
    statistics = _load_statistics(args.statistics)
    target = Path(args.output).resolve()
    if target == source.resolve() or source.resolve() in target.parents:
        raise CLIError(
            f"OUT {args.output!r} is the source folder {str(source)!r} (or inside it); quantizing would overwrite the "
            "float model. Give another output folder."
        )
    output = _writable_dir(Path(args.output))
    dtype = getattr(torch, args.dtype)
    if kind == "model":
        class_name = json.loads((source / "config.json").read_text())["_class_name"]
        cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
        if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
            raise CLIError(
                f"{source}/config.json names {class_name!r}, which is not a diffusers model class; fix _class_name "
                "(e.g. 'SD3Transformer2DModel')."
            )
        obj, info = cls.from_pretrained(source, torch_dtype=dtype, output_loading_info=True)
        _check_weights_fit_class(source, class_name, info)
        reports = _quantize_module(obj, config, class_name, statistics)
        denoiser = obj
    else:
        index = json.loads((source / "model_index.json").read_text())
        cls = FlowMatchPipeline if index.get("_class_name") == "FlowMatchPipeline" else diffusers.DiffusionPipeline
        obj = cls.from_pretrained(source, dtype=dtype)
        components = args.components or [c for c in ("transformer", "unet") if c in obj.components]
        unknown = [c for c in components if not isinstance(obj.components.get(c), torch.nn.Module)]
        if unknown or not components:
            modules = [k for k, v in obj.components.items() if isinstance(v, torch.nn.Module)]
            raise CLIError(
                f"components {unknown or components} are not torch modules of this pipeline; choose from {modules}."
            )
        denoiser = obj.components[components[0]]
        reports = _quantize_denoiser(obj, denoiser, config, calibration, statistics, args.save_statistics)
        reports += [r for c in components[1:] for r in _quantize_module(obj.components[c], config, c)]
    obj.save_pretrained(output)
    if args.push_to_hub:
        from .hub import push_to_hub

        push_to_hub(obj, args.push_to_hub)
    before, after = _folder_bytes(source), _folder_bytes(output)
    params = sum(r.parameters for r in reports)
    bpw = sum(r.bits_per_weight * r.parameters for r in reports) / max(params, 1)
    saved = denoiser.config.get("quantization_config") if hasattr(denoiser, "config") else None
    if isinstance(saved, OTQConfig):  # save_pretrained leaves the config entry as a plain dict
        saved = saved.to_dict()
    record = (saved or {}).get("provenance") or {}
    lines = [
        f"Quantized {len(reports)} layers ({params:,} weights) of {source} with {config.as_code()}",
        *_record_lines(record),
        f"  bits/weight of quantized layers: {bpw:.3f}",
        f"  size on disk: {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB ({before / max(after, 1):.2f}x smaller)",
        f"  mean W2 per layer: {_mean_w2(reports):.3e}",
        f"  saved to {output}" + (f", pushed to {args.push_to_hub}" if args.push_to_hub else ""),
    ]
    return "\n".join(lines)


def _quantize_denoiser(
    pipe: Any,
    denoiser: torch.nn.Module,
    config: OTQConfig,
    calibration: CalibrationConfig | None,
    statistics: CalibrationStatistics | None,
    save_statistics: str | None,
) -> list[LayerReport]:
    """The pipeline's denoiser, calibrated on the pipeline's own samples when asked."""
    if calibration is None:
        return _quantize_module(denoiser, config, type(denoiser).__name__, statistics)
    from .calibration import calibrate

    try:
        if statistics is None and calibration.sequential and not save_statistics:
            return quantize_pipeline(pipe, config, calibration)  # block by block: no whole-model statistics
        if statistics is None:
            statistics = calibrate(pipe, config, calibration)
            if save_statistics:
                statistics.save(save_statistics)
                logger.info("Saved the calibration statistics to %s", save_statistics)
        return quantize_pipeline(pipe, config, calibration, statistics=statistics)
    except ValueError as err:
        raise CLIError(str(err)) from None


def _record_lines(record: dict) -> list[str]:
    """Summary lines for the calibration and the bits plan recorded in the saved config."""
    lines = []
    if "calibration" in record:
        c = record["calibration"]
        how = f"block by block, {c.get('blocks')} blocks" if c.get("sequential") else "whole model"
        lines.append(
            f"  calibration: {c.get('num_batches')} batches ({c.get('source')}), {how}; "
            f"error feedback {'on' if c.get('error_feedback') else 'off'}"
        )
    if "bits_per_weight" in record:
        plan = record["bits_per_weight"]
        settings = ", ".join(f"{n} x {label}" for label, n in plan["layers"].items())
        lines.append(f"  bits budget {plan['budget']}: reached {plan['reached']:.3f} ({settings})")
    if "refinement" in record:
        r = record["refinement"]
        stopped = f"; stopped: {r['stopped']}" if r.get("stopped") else ""
        scope = f" ({r['blocks']} blocks one at a time)" if r.get("scope") in ("blocks", "sequential blocks") else ""
        loss = "mean block error" if r.get("scope") == "sequential blocks" else "teacher loss"
        lines.append(
            f"  refinement{scope}: {r['steps']} steps, {loss} {r['loss_before']:.4g} -> {r['loss_after']:.4g}{stopped}"
        )
    return lines


# ------------------------------------------------------------------------------------------------ generate


def run_generate(args: argparse.Namespace) -> str:
    """Sample from a (quantized) FlowMatchPipeline to PNG files."""
    for flag, value in (("--num-images", args.num_images), ("--steps", args.steps)):
        if value < 1:
            raise CLIError(f"{flag} {value} must be >= 1.")
    labels = args.class_labels
    if labels is not None:
        if any(label < 0 for label in labels):
            raise CLIError(f"--class-labels {labels} must be class indices >= 0.")
        labels = [labels[i % len(labels)] for i in range(args.num_images)]  # cycle: 0 1 2 0 1 2 ...
    output = _writable_dir(Path(args.output))
    pipe = _load_pipeline(args.source)
    pipe.set_progress_bar_config(disable=False)
    try:
        images = pipe(
            batch_size=args.num_images,
            class_labels=labels,
            guidance_scale=args.guidance_scale,
            num_inference_steps=args.steps,
            generator=torch.Generator().manual_seed(args.seed),
        ).images
    except ValueError as err:
        raise CLIError(str(err)) from None
    for i, image in enumerate(images):
        image.save(output / f"sample_{i:04d}.png")
    columns = min(10, len(images))
    grid_rows = [("", images[r : r + columns]) for r in range(0, len(images), columns)]
    _grid(grid_rows).save(output / "grid.png")
    return f"Wrote {len(images)} images and grid.png to {output}"


# ---------------------------------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (``diffusers-otq quantize: error: ...``, exit 2) like every
    other error of the command; ``--help`` still prints the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}. See {self.prog} --help.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusers-otq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"diffusers-otq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="the bundled models: float, data-free, calibrated + budget + refined, and the peers; grid, plot, table",
    )
    demo.add_argument("--models", nargs="+", default=list(DEMO_MODELS), help="bundled names or pipeline folders")
    demo.add_argument("--full", action="store_true", help="the complete version (more samples, 600 refinement steps)")
    demo.add_argument("--budgets", type=float, nargs="+", default=None, help="bits/weight budgets (default 2 2.5 3 4)")
    demo.add_argument("--refine-steps", type=int, default=None, help="refinement steps per budget")
    demo.add_argument("--calibration-samples", type=int, default=None, help="samples of the calibration run")
    demo.add_argument("--peers", nargs="*", default=None, help=f"peer formats (default {' '.join(DEMO_PEERS)})")
    demo.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="models quantized side by side, one process each (default: one per core)",
    )
    demo.add_argument("--num-images", type=int, default=None)
    demo.add_argument("--grid-columns", type=int, default=8)
    demo.add_argument("--steps", type=int, default=None)
    demo.add_argument("--seed", type=int, default=None)
    demo.add_argument("--output", default="otq-demo", help="folder for the grids, demo_rd.png and demo_table.md")
    demo.set_defaults(run=run_demo)

    quantize = sub.add_parser("quantize", help="quantize a diffusers model or pipeline folder and save it")
    quantize.add_argument("source", help="local model/pipeline folder or bundled name")
    quantize.add_argument("output", help="folder to save the quantized model/pipeline to")
    quantize.add_argument("--bits", type=int, default=3)
    quantize.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS)
    quantize.add_argument("--granularity", default="channel", choices=GRANULARITIES)
    quantize.add_argument("--group-size", type=int, default=None)
    quantize.add_argument(
        "--vector-dim",
        type=int,
        default=1,
        choices=(1, 2, 4, 8),
        help="codeword dimension: D consecutive inputs share one bits*D-bit code (vector codebooks; default 1)",
    )
    quantize.add_argument("--modules-to-not-convert", nargs="*", default=None)
    quantize.add_argument(
        "--components", nargs="+", default=None, help="pipeline components (default: transformer/unet)"
    )
    quantize.add_argument(
        "--bits-per-weight",
        type=float,
        default=None,
        metavar="B",
        help="a bits budget instead of --bits: per-layer bits and granularity chosen to meet B bits/weight",
    )
    structure = quantize.add_argument_group("structure beyond rounding")
    structure.add_argument("--rank", type=int, default=0, help="16-bit low-rank branch of this rank per layer")
    structure.add_argument("--rotate", action="store_true", help="randomized Hadamard rotation of layer inputs")
    structure.add_argument("--rotation-block", type=int, default=None, help="Hadamard block (default: per layer)")
    calibrate = quantize.add_argument_group("calibration (fit each layer to its output on the model's own samples)")
    calibrate.add_argument("--calibrate", action="store_true", help="sample with the full-precision pipeline first")
    calibrate.add_argument("--prompts", default=None, metavar="FILE", help="text prompts, one per line (SD3, Flux)")
    calibrate.add_argument(
        "--calibration-labels", type=int, nargs="+", default=None, help="class labels (default: every class)"
    )
    calibrate.add_argument(
        "--num-samples", type=int, default=None, help="calibration samples (default 64, or #prompts)"
    )
    calibrate.add_argument("--calibration-steps", type=int, default=None, help="sampler steps while calibrating")
    calibrate.add_argument("--seed", type=int, default=1234, help="noise seed of the calibration samples")
    calibrate.add_argument("--no-error-feedback", action="store_true", help="activation-weighted codebooks only")
    calibrate.add_argument("--save-statistics", default=None, metavar="FILE", help="keep the statistics for reuse")
    calibrate.add_argument(
        "--refine-steps", type=int, default=None, help="train codebooks/biases against the fp velocity (e.g. 600)"
    )
    calibrate.add_argument(
        "--refine-blocks",
        action="store_true",
        help="refine one block at a time (memory of one block; for models whose backward does not fit)",
    )
    calibrate.add_argument(
        "--refine-float-params",
        action="store_true",
        help="refinement also trains the float parameters outside the quantized layers (embeddings, norms; no "
        "stored bit changes); helps the bundled DiT, hurts the bundled UNet at 3 bits: docs/calibration.md",
    )
    calibrate.add_argument(
        "--noise-bands",
        type=int,
        default=None,
        metavar="B",
        help="B sets of codebooks over the same codes, one per noise-level band of timesteps, each refined on its "
        "band's calls (needs --refine-steps; implies --whole-model); docs/calibration.md",
    )
    calibrate.add_argument(
        "--statistics", default=None, metavar="FILE", help="reuse saved statistics instead of sampling"
    )
    calibrate.add_argument(
        "--work-dir",
        default=None,
        metavar="DIR",
        help="write each finished block here; rerunning the same command resumes after the last one",
    )
    calibrate.add_argument(
        "--whole-model",
        action="store_true",
        help="collect every layer's statistics in one run, then fit (default: block by block, bounded memory)",
    )
    quantize.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    quantize.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload (needs `hf auth login`)")
    quantize.set_defaults(run=run_quantize)

    generate = sub.add_parser("generate", help="sample PNGs from a (quantized) FlowMatchPipeline")
    generate.add_argument("source", help="pipeline folder or bundled name")
    generate.add_argument("--output", default="otq-samples")
    generate.add_argument("--num-images", type=int, default=10)
    generate.add_argument("--class-labels", type=int, nargs="+", default=None)
    generate.add_argument("--steps", type=int, default=30)
    generate.add_argument("--guidance-scale", type=float, default=2.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(run=run_generate)
    return parser


def _new_folders(path: Path) -> list[Path]:
    """The folders that creating ``path`` would add, deepest first."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; stops at the first one that holds something
        try:
            folder.rmdir()
        except OSError:
            return


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    created = _new_folders(Path(args.output)) if getattr(args, "output", None) else []
    try:
        print(args.run(args))  # the command's result goes to stdout; progress and logs go to stderr
    except CLIError as err:
        _remove_if_empty(created)  # a failed command leaves no empty output folder behind
        print(f"diffusers-otq {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BaseException:
        _remove_if_empty(created)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
