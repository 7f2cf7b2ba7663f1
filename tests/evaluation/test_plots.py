"""The evaluation report's plots, drawn directly from points, rows and step series."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from diffusers_otq.evaluation import plots, rows
from diffusers_otq.evaluation.plots import HEATMAP_BITS, plot_rate_distortion, plot_steps, plot_w2_heatmap, w2_matrix
from diffusers_otq.evaluation.rows import REL_MSE, SAMPLE_PSNR, Point, Stat, StepSeries


def _point(method: str, family: str, granularity: str, bits: int, psnr: float | None, bpw: float) -> Point:
    stats = {("weights", "bits_per_weight"): Stat(bpw, None, 1)}
    if psnr is not None:
        stats[("samples", "psnr")] = Stat(psnr, 0.5, 2)
    return Point(method=method, family=family, granularity=granularity, bits=bits, seeds=(0, 1), stats=stats)


def _weights_row(method: str, family: str, w2: list[float | None], **fields: Any) -> dict[str, Any]:
    row = {
        "model": "m",
        "method": method,
        "family": family,
        "granularity": "channel",
        "bits": HEATMAP_BITS,
        "scope": "deploy",
        "metric_set": "weights",
        "seed": 0,
        "status": "ok",
        "metrics": {"layers": [{"name": f"layer.{i}", "w2": v} for i, v in enumerate(w2)]},
    } | fields
    row["key"] = "|".join(str(row[f]) for f in ("model", "method", "granularity", "bits", "scope", "seed"))
    return row


def _assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()


POINTS = [
    _point("ot", "otq", "channel", 2, 20.0, 2.1),
    _point("ot", "otq", "channel", 3, 25.0, 3.1),
    _point("uniform", "paper", "channel", 3, 22.0, 3.1),
    _point("bnb-nf4", "peer", "native", 4, 27.0, 4.6),
    _point("fp", "reference", "none", 32, 30.0, 32.0),
]


def test_rate_distortion_writes_deterministic_png(tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "rd.png", tmp_path / "b" / "rd.png"
    assert plot_rate_distortion(POINTS, SAMPLE_PSNR, log_y=False, title="m", path=first)
    assert plot_rate_distortion(list(POINTS), SAMPLE_PSNR, log_y=False, title="m", path=second)
    _assert_png(first)
    assert first.read_bytes() == second.read_bytes()


def test_rate_distortion_skips_a_metric_no_quantized_point_has(tmp_path: Path) -> None:
    path = tmp_path / "rd.png"
    assert not plot_rate_distortion(POINTS, REL_MSE, log_y=True, title="m", path=path)
    assert not plot_rate_distortion(POINTS[-1:], SAMPLE_PSNR, log_y=False, title="fp only", path=path)
    assert not path.exists()


def test_rate_distortion_zoom_leaves_out_wider_codes(tmp_path: Path) -> None:
    full, zoom, none = tmp_path / "full.png", tmp_path / "zoom.png", tmp_path / "none.png"
    assert plot_rate_distortion(POINTS, SAMPLE_PSNR, log_y=False, title="m", path=full)
    assert plot_rate_distortion(POINTS, SAMPLE_PSNR, log_y=False, title="m", path=zoom, max_bits=3)
    assert full.read_bytes() != zoom.read_bytes()  # the 4-bit peer is gone from the zoom
    assert plot_rate_distortion(POINTS, SAMPLE_PSNR, log_y=False, title="m", path=tmp_path / "same.png", max_bits=4)
    assert (tmp_path / "same.png").read_bytes() == full.read_bytes()
    assert not plot_rate_distortion(POINTS, SAMPLE_PSNR, log_y=False, title="m", path=none, max_bits=1)
    assert not none.exists()


def test_budgets_are_a_curve_of_their_own_with_square_markers(tmp_path: Path, monkeypatch) -> None:
    drawn: dict[str, tuple[str, list[float]]] = {}
    original = plots._errorbar

    def record(axes: Any, series: Any, metric: Any, **style: Any) -> None:
        drawn[style["label"]] = (style["fmt"], [p.bits_per_weight for p in series])
        original(axes, series, metric, **style)

    monkeypatch.setattr(plots, "_errorbar", record)
    budgets = [_point("ot-vp+cal", "otq", "mixed", b, 20.0 + b, b - 0.25) for b in (3.0, 2.1, 2.5)]
    calibrated = _point("ot-vp+cal", "otq", "channel", 2, 21.0, 2.2)
    assert plot_rate_distortion(
        [*POINTS, *budgets, calibrated], SAMPLE_PSNR, log_y=False, title="m", path=tmp_path / "rd.png", max_bits=2
    )
    assert drawn["ot-vp+cal (mixed)"] == ("s", [1.85, 2.25]), "budgets up to max_bits, by bits/weight"
    assert drawn["ot-vp+cal (channel)"] == ("o", [2.2]) and drawn["ot (channel)"] == ("o", [2.1])


def test_w2_matrix_averages_selected_rows_only() -> None:
    selected = [
        _weights_row("uniform", "paper", [1e-2, 2e-2]),
        _weights_row("ot", "otq", [1e-3, None, 3e-3]),
        _weights_row("ot", "otq", [3e-3, 5e-3], seed=1),
    ]
    ignored = [
        _weights_row("fp", "reference", [1.0]),
        _weights_row("ot", "otq", [9.0], granularity="group"),
        _weights_row("ot", "otq", [9.0], bits=HEATMAP_BITS + 1),
        _weights_row("ot", "otq", [9.0], scope="paper"),
        _weights_row("ot", "otq", [9.0], seed=2, status="error"),
        _weights_row("ot", "otq", [9.0], model="other"),
    ]
    layers, methods, matrix = w2_matrix(ignored + selected, "m")
    assert methods == ["ot", "uniform"], "ours before the paper's methods"
    assert layers == ["layer.0", "layer.2", "layer.1"], "first appearance in key order (seed 0 before seed 1)"
    assert matrix[0] == [pytest.approx(2e-3), 1e-2]
    assert matrix[1][0] == 3e-3 and math.isnan(matrix[1][1]), "uniform reported no layer.2"
    assert matrix[2] == [5e-3, 2e-2]


def test_w2_heatmap_needs_a_positive_distance(tmp_path: Path) -> None:
    path = tmp_path / "heat.png"
    assert not plot_w2_heatmap([_weights_row("ot", "otq", [0.0, None])], "m", path)
    assert not plot_w2_heatmap([], "m", path)
    assert not path.exists()
    assert plot_w2_heatmap([_weights_row("ot", "otq", [0.0, 1e-3])], "m", path)
    _assert_png(path)


def test_steps_plot_skips_missing_values(tmp_path: Path) -> None:
    path = tmp_path / "steps.png"
    assert not plot_steps([], "m", path)
    series = StepSeries(
        label="ot channel 3-bit (deploy)",
        steps=[4, 8, 16],
        psnr=[Stat(20.0, None, 1), None, Stat(30.0, 1.0, 2)],
        ssim=[None, None, Stat(0.9, None, 1)],
    )
    assert plot_steps([series], "m", path)
    _assert_png(path)


@pytest.mark.parametrize("module", [plots, rows])
def test_plots_and_rows_do_not_import_the_report(module: Any) -> None:
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "diffusers_otq.evaluation.report" not in imported
