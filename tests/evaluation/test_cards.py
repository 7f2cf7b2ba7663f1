"""Reference model cards: the quantized-quality summary of evaluation rows, written into a real pipeline's card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from diffusers_otq.evaluation.cards import quantized_summary, render_reference_card, update_reference_card
from diffusers_otq.reference import resolve_reference


REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "diffusers_otq" / "model_cards" / "reference_model.md"
MODEL = "otq/fashion-mnist-unet"


def _row(method: str, family: str, granularity: str, bits: int, metric_set: str, seed: int, **metrics: Any) -> dict:
    return {
        "key": "|".join(map(str, (MODEL, method, granularity, bits, "deploy", metric_set, seed))),
        "model": MODEL,
        "method": method,
        "family": family,
        "granularity": granularity,
        "bits": bits,
        "scope": "deploy",
        "metric_set": metric_set,
        "seed": seed,
        "status": "ok",
        "metrics": metrics,
    }


@pytest.fixture
def rows() -> list[dict]:
    rows = [
        _row("fp", "reference", "none", 32, "fid", 0, fid_vs_test=50.0),
        _row("fp", "reference", "none", 32, "samples", 0, class_accuracy=0.98),
        # ot at 3 bits ran per channel and per group; group has the lower FID and must be the one shown
        _row("ot", "otq", "channel", 3, "weights", 0, bits_per_weight=3.33, model_bytes=448_000),
        _row("ot", "otq", "channel", 3, "fid", 0, fid_vs_fp=77.0, fid_vs_test=72.0),
        _row("ot", "otq", "group", 3, "weights", 0, bits_per_weight=3.38, model_bytes=452_000),
        _row("ot", "otq", "group", 3, "fid", 0, fid_vs_fp=40.0, fid_vs_test=60.0),
        *(_row("ot", "otq", "group", 3, "samples", s, psnr=22.0 + s, class_accuracy=0.9) for s in (0, 1, 2)),
        _row("hqq-3", "peer", "native", 3, "weights", 0, bits_per_weight=3.5, model_bytes=460_000),
        _row("hqq-3", "peer", "native", 3, "fid", 0, fid_vs_fp=45.0, fid_vs_test=61.0),
        # no FID: left out of the card
        _row("log2", "paper", "channel", 3, "samples", 0, psnr=11.0),
    ]
    return rows


def test_summary_keeps_fid_measured_configurations_best_granularity_fp_last(rows: list[dict]) -> None:
    entries = quantized_summary(rows, MODEL)
    assert [(e["method"], e["granularity"]) for e in entries] == [("ot", "group"), ("hqq-3", "native"), ("fp", "none")]
    ot = entries[0]
    assert ot["fid_vs_fp"] == 40.0 and ot["bits_per_weight"] == 3.38 and ot["seeds"] == [0, 1, 2]
    assert ot["sample_psnr"] == 23.0 and ot["sample_psnr_std"] == 1.0 and ot["class_accuracy"] == 90.0
    assert "sample_psnr" not in entries[1] and entries[2]["fid_vs_test"] == 50.0


def test_summary_is_empty_without_fid_rows(rows: list[dict]) -> None:
    assert quantized_summary([r for r in rows if r["metric_set"] != "fid" or r["method"] == "fp"], MODEL) == []
    assert quantized_summary(rows, "otq/other-model") == []


@pytest.fixture
def pipeline(tmp_path: Path) -> Path:
    folder = tmp_path / "pipelines" / "fashion-mnist-unet"
    shutil.copytree(resolve_reference(MODEL), folder)
    return folder


def test_update_writes_reference_json_and_card_and_rerender_keeps_it(
    rows: list[dict], pipeline: Path, tmp_path: Path
) -> None:
    cards = tmp_path / "cards"
    cards.mkdir()
    kwargs = dict(command="accelerate launch scripts/evaluate.py --config c.yaml", report="results/report.md")
    assert update_reference_card(pipeline, rows, description="Protocol.", template=TEMPLATE, cards_dir=cards, **kwargs)
    info = json.loads((pipeline / "reference.json").read_text())
    assert info["quantized"]["command"] == kwargs["command"] and len(info["quantized"]["entries"]) == 3
    assert info["metrics"]["class_accuracy"] > 0.9  # the full-precision measurement is kept
    card = (pipeline / "README.md").read_text()
    assert card == (cards / "fashion-mnist-unet.md").read_text()
    assert "| **ot** | group | 3 | 3.38 | 441 | 23.00 ± 1.00 | 90.0 ± 0.0 | 40.0 | 60.0 |" in card
    assert "| hqq-3 | native | 3 |" in card and "Protocol." in card and kwargs["command"] in card
    assert "98.0%" in card  # the full-precision table is still there

    # re-measuring the full-precision model re-renders the card from reference.json alone
    (pipeline / "README.md").unlink()
    render_reference_card(pipeline, TEMPLATE)
    assert (pipeline / "README.md").read_text() == card


def test_update_without_fid_rows_changes_nothing(rows: list[dict], pipeline: Path) -> None:
    before = (pipeline / "reference.json").read_text(), (pipeline / "README.md").read_text()
    fp_only = [r for r in rows if r["method"] == "fp"]
    kwargs = dict(command="c", report="r", description="d", template=TEMPLATE)
    assert not update_reference_card(pipeline, fp_only, **kwargs)
    assert ((pipeline / "reference.json").read_text(), (pipeline / "README.md").read_text()) == before


def test_card_without_quantized_metrics_says_how_to_measure(pipeline: Path) -> None:
    info = json.loads((pipeline / "reference.json").read_text())
    info.pop("quantized", None)
    (pipeline / "reference.json").write_text(json.dumps(info))
    card = render_reference_card(pipeline, TEMPLATE)
    assert "Not measured yet" in str(card) and "--update-cards" in str(card)


def test_budget_entries_keep_one_row_per_budget_and_read_as_budgets(rows: list[dict], pipeline: Path) -> None:
    for budget, fid in ((2.5, 41.0), (3.0, 38.0)):  # bits of a mixed row is its bits/weight budget (a float)
        rows.append(_row("ot-vp+cal", "otq", "mixed", budget, "weights", 0, bits_per_weight=budget - 0.002))
        rows.append(_row("ot-vp+cal", "otq", "mixed", budget, "fid", 0, fid_vs_fp=fid, fid_vs_test=55.0))
    entries = quantized_summary(rows, MODEL)
    assert [(e["method"], e["bits"]) for e in entries] == [
        ("ot-vp+cal", 2.5),
        ("ot-vp+cal", 3.0),
        ("ot", 3),
        ("hqq-3", 3),
        ("fp", 32),
    ]
    kwargs = dict(command="c", report="r", description="d", template=TEMPLATE)
    assert update_reference_card(pipeline, rows, **kwargs)
    card = (pipeline / "README.md").read_text()
    assert "| **ot-vp+cal** | mixed | budget 2.5 | 2.50 |" in card and "| **ot-vp+cal** | mixed | budget 3 |" in card
