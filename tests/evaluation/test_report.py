"""The evaluation report: markdown tables, CSV, plots and JSONL loading, on synthetic result rows."""

from __future__ import annotations

import csv
import json
import random
import re
import statistics
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from diffusers_otq.evaluation.report import headline_table, load_rows, write_report


UNET = "otq/fashion-mnist-unet"
DIT = "otq/digits-dit"
COMMAND = "python scripts/evaluate.py --models otq/fashion-mnist-unet otq/digits-dit --seeds 0 1 --out results"
SEEDS = (0, 1)
GRID_BITS = (2, 3, 4)
# (method, family, granularity): the configurations swept in deploy scope
CONFIGS = (("ot", "otq", "channel"), ("ot", "otq", "group"), ("uniform", "paper", "channel"))
OOM_ERROR = "CUDA out of memory | while quantizing down.0.conv"


def _row(
    model: str,
    method: str,
    family: str,
    granularity: str,
    bits: int,
    scope: str,
    metric_set: str,
    seed: int,
    metrics: dict[str, Any],
    status: str = "ok",
    error: str | None = None,
) -> dict[str, Any]:
    key = "|".join(map(str, (model, method, granularity, bits, scope, metric_set, seed)))
    row = {
        "key": key,
        "model": model,
        "method": method,
        "family": family,
        "granularity": granularity,
        "bits": bits,
        "scope": scope,
        "metric_set": metric_set,
        "seed": seed,
        "status": status,
        "metrics": metrics,
        "elapsed_s": 1.5,
    }
    if error is not None:
        row["error"] = error
    return row


def _bpw(granularity: str, bits: int) -> float:
    return bits + {"channel": 0.125, "group": 0.5, "tensor": 0.01}[granularity]


def _sample_psnr(method: str, granularity: str, bits: int, seed: int) -> float:
    """Distinct per configuration and per seed, so mean and std are checkable."""
    return 10.0 + 5.0 * bits + (1.0 if method == "ot" else 0.0) + (0.5 if granularity == "group" else 0.0) + seed


def _weights(granularity: str, bits: int, layers: int = 4) -> dict[str, Any]:
    return {
        "bits_per_weight": _bpw(granularity, bits),
        "model_bytes": 1024 * 10 * bits,
        "quantize_s": 0.25 * bits,
        "quantized_layers": layers,
        "skipped_layers": 1,
        "rel_mse_mean": 4.0**-bits,
        "w2_mean": 2.0**-bits,
        "layers": [
            {"name": f"block.{i}.weight", "numel": 100, "rel_mse": 4.0**-bits, "w2": 2.0 ** -(bits + i)}
            for i in range(layers)
        ],
    }


def _grid_path(model: str) -> str:
    return f"samples/{model.replace('/', '-')}/ot-group-3-deploy.png"


def _model_rows(model: str, with_fid: bool) -> list[dict[str, Any]]:
    rows = []
    for method, family, granularity in CONFIGS:
        for bits in GRID_BITS:
            common = (model, method, family, granularity, bits, "deploy")
            rows.append(_row(*common, "weights", 0, _weights(granularity, bits)))
            rows.append(_row(*common, "probe", 0, {"velocity_psnr": 20.0 + bits, "velocity_ssim": 0.5}))
            for seed in SEEDS:
                psnr = _sample_psnr(method, granularity, bits, seed)
                metrics = {"psnr": psnr, "ssim": psnr / 100, "class_accuracy": 0.5 + bits / 10, "num_samples": 8}
                if (method, granularity, bits) == ("ot", "group", 3):
                    metrics["grid"] = _grid_path(model)
                rows.append(_row(*common, "samples", seed, metrics))
            if with_fid and method == "ot":
                rows.append(_row(*common, "fid", 0, {"fid_vs_fp": 10.0 / bits, "fid_vs_test": 20.0 / bits}))
    for method, family in (("ot", "otq"), ("uniform", "paper")):
        for bits in range(2, 9):
            metrics = {"velocity_psnr": 15.0 + bits, "velocity_ssim": 0.1 * bits, "pca_mean_var": 0.01 * bits}
            metrics |= {"pca_collapsed": 8 - bits, "latent_cosine": 0.9, "num_images": 64}
            rows.append(_row(model, method, family, "channel", bits, "paper", "probe", 0, metrics))
    fp = (model, "fp", "reference", "none", 32, "deploy")
    rows.append(_row(*fp, "weights", 0, {"bits_per_weight": 32.0, "model_bytes": 1024 * 320}))
    rows.append(_row(*fp, "samples", 0, {"class_accuracy": 0.95, "num_samples": 8}))
    rows.append(_row(model, "fp", "reference", "none", 32, "paper", "probe", 0, {"pca_mean_var": 0.123}))
    peer = (model, "bnb-nf4", "peer", "native", 4, "deploy")
    rows.append(_row(*peer, "weights", 0, {"bits_per_weight": 4.6, "model_bytes": 50000, "rel_mse_mean": 0.01}))
    rows.append(_row(*peer, "samples", 0, {"psnr": 29.0, "ssim": 0.8, "class_accuracy": 0.9}))
    rows.append(_row(model, "hqq-3", "peer", "native", 3, "deploy", "weights", 0, {}, "unavailable", "hqq missing"))
    return rows


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    rows = _model_rows(UNET, with_fid=True) + _model_rows(DIT, with_fid=False)
    rows.append(_row(UNET, "ot", "otq", "tensor", 2, "deploy", "samples", 0, {}, "error", OOM_ERROR))
    steps = {"steps": [4, 8, 16], "psnr": [20.0, 25.0, 30.0], "ssim": [0.5, 0.7, 0.9]}
    for seed in SEEDS:
        rows.append(_row(UNET, "ot", "otq", "channel", 3, "deploy", "steps", seed, steps))
    return rows


@pytest.fixture(scope="module")
def report(rows: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("report")
    _save_grid(output)
    return write_report(rows, output, command=COMMAND)


def _save_grid(output: Path) -> None:
    """The sample grid of the UNet only; the DiT's row names a grid that was never written."""
    path = output / _grid_path(UNET)
    path.parent.mkdir(parents=True)
    Image.new("L", (8, 4)).save(path)


def _section(text: str, heading: str) -> str:
    """The text from ``heading`` up to the next heading of the same or a higher level."""
    start = text.index(heading)
    level = heading.split(" ")[0]
    following = re.compile(rf"^#{{1,{len(level)}}} ", re.MULTILINE)
    match = following.search(text, start + len(heading))
    return text[start : match.start() if match else len(text)]


def _table_rows(section: str) -> list[list[str]]:
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def test_report_quotes_command_and_counts(rows: list[dict[str, Any]], report: Path) -> None:
    text = report.read_text()
    assert report.name == "report.md"
    assert COMMAND in text
    assert f"{len(rows)} rows: {len(rows) - 3} ok, 3 not ok (1 error, 2 unavailable)." in text
    assert text.index(f"## {DIT}") < text.index(f"## {UNET}"), "models are sorted by name"


def test_headline_rows_sorted_by_bits_per_weight_with_mean_and_std(report: Path) -> None:
    section = _section(_section(report.read_text(), f"## {UNET}"), "### Headline")
    table = _table_rows(section)
    labels = [(r[0], r[1], r[2]) for r in table]
    # ot ran per-channel and per-group; per-group has the higher sample PSNR, so it represents ot.
    # bits/weight: uniform channel b + 0.125, ot group b + 0.5, bnb-nf4 4.6, fp 32.
    expected = [(m, g, str(b)) for b in GRID_BITS for m, g in (("uniform", "channel"), ("ot", "group"))]
    assert labels == [*expected, ("bnb-nf4", "native", "4"), ("fp", "none", "32")]
    bpw = [float(r[3]) for r in table]
    assert bpw == sorted(bpw)

    ot3 = next(r for r in table if r[:3] == ["ot", "group", "3"])
    values = [_sample_psnr("ot", "group", 3, seed) for seed in SEEDS]
    assert ot3[5] == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    assert ot3[4] == f"{10 * 3:.1f}", "size in KiB"
    assert ot3[7] == ot3[8] == "—", "no class agreement in these rows (either judge)"
    assert ot3[9] == f"{100 * (0.5 + 0.3):.1f} ± 0.0", "class accuracy in percent, identical over seeds"
    assert ot3[11] == f"{10 / 3:.2f}"
    uniform3 = next(r for r in table if r[:3] == ["uniform", "channel", "3"])
    assert uniform3[11] == uniform3[12] == "—", "no FID rows for uniform"
    peer = next(r for r in table if r[0] == "bnb-nf4")
    assert peer[5] == "29.00" and "±" not in peer[5], "a single seed shows the bare value"


def test_headline_table_rejects_unknown_metric_set(rows: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match="metric_set must be one of"):
        headline_table(rows, UNET, metric_set="steps")
    assert headline_table(rows, "no/such-model").startswith("_No ok")


def test_paper_parity_and_grid_tables(report: Path) -> None:
    model = _section(report.read_text(), f"## {UNET}")
    parity = _section(model, "### Paper parity")
    assert "(fp: 0.123)" in parity, "fp's PCA mean variance in the caption"
    velocity = _table_rows(parity.split("**t=0 vel. PSNR (dB)**")[1].split("**")[0])
    assert velocity[0] == ["ot", *(f"{15.0 + b:.2f}" for b in range(2, 9))]
    grid = _table_rows(_section(model, "### Full grid"))
    keys = {(r[0], r[2], r[3]) for r in grid}
    assert {(m, g, str(b)) for m, _, g in CONFIGS for b in GRID_BITS} <= keys
    ot_channel_2 = next(r for r in grid if r[0] == "ot" and r[2] == "channel" and r[3] == "2")
    assert ot_channel_2[4] == "2" and ot_channel_2[6] == f"{4.0**-2:.3e}"


def test_failed_rows_and_steps_are_listed(report: Path) -> None:
    model = _section(report.read_text(), f"## {UNET}")
    failed = _section(model, "### Rows not ok")
    assert OOM_ERROR.replace("|", "\\|") in failed
    assert "hqq missing" in failed and "unavailable" in failed
    steps = _section(model, "### Steps sweep")
    assert "| ot channel 3-bit (deploy) | 20.00 ± 0.00 | 25.00 ± 0.00 | 30.00 ± 0.00 |" in steps


def test_every_linked_png_exists_and_is_valid(report: Path) -> None:
    text = report.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for slug in ("otq-fashion-mnist-unet", "otq-digits-dit"):
        for name in ("rd-sample-psnr", "rd-sample-ssim", "rd-velocity-psnr", "rd-rel-mse", "rd-class-accuracy"):
            assert f"plots/{slug}-{name}.png" in links
        assert f"plots/{slug}-w2-heatmap.png" in links
    assert "plots/otq-fashion-mnist-unet-rd-fid-vs-fp.png" in links
    assert "plots/otq-digits-dit-rd-fid-vs-fp.png" not in links, "no FID rows for the DiT: no empty plot"
    assert "plots/otq-fashion-mnist-unet-steps.png" in links
    assert links.count(_grid_path(UNET)) == 1 and _grid_path(DIT) not in links, "only existing grids are linked"
    for link in links:
        with Image.open(report.parent / link) as image:
            assert image.format == "PNG"
            image.verify()


def test_csv_has_one_line_per_row(rows: list[dict[str, Any]], report: Path) -> None:
    lines = (report.parent / "results.csv").read_text().splitlines()
    assert len(lines) == len(rows) + 1
    with (report.parent / "results.csv").open(newline="") as handle:
        records = list(csv.DictReader(handle))
    assert "metrics.layers" not in records[0] and "metrics.quantized_layers" in records[0]
    failed = next(r for r in records if r["status"] == "error")
    assert failed["error"] == OOM_ERROR
    weights = next(r for r in records if r["key"] == f"{UNET}|ot|channel|3|deploy|weights|0")
    assert float(weights["metrics.bits_per_weight"]) == _bpw("channel", 3)


def test_output_does_not_depend_on_row_order(rows: list[dict[str, Any]], report: Path, tmp_path: Path) -> None:
    shuffled = list(rows)
    random.Random(1).shuffle(shuffled)
    _save_grid(tmp_path)
    again = write_report(shuffled, tmp_path, command=COMMAND)
    assert again.read_text() == report.read_text()
    assert (tmp_path / "results.csv").read_bytes() == (report.parent / "results.csv").read_bytes()
    for png in sorted((report.parent / "plots").glob("*.png")):
        assert (tmp_path / "plots" / png.name).read_bytes() == png.read_bytes(), png.name


def test_write_report_rejects_duplicate_keys(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="occurs twice"):
        write_report([rows[0], rows[0]], tmp_path, command=COMMAND)


def test_load_rows_round_trips_and_rejects_corrupt_line(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n")
    assert load_rows(path) == rows

    path.write_text(json.dumps(rows[0]) + "\n" + '{"key": "truncated", "model"\n' + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match=r"results\.jsonl:2 is not valid JSON"):
        load_rows(path)
    path.write_text(json.dumps(rows[0]) + "\n" + "[1, 2]\n")
    with pytest.raises(ValueError, match=r"results\.jsonl:2 is not a JSON object"):
        load_rows(path)
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"key": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"results\.jsonl, row 2: missing field"):
        load_rows(path)


def test_load_rows_drops_the_unfinished_last_line_of_a_killed_writer(
    rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2])[:25])
    assert load_rows(path) == rows[:2]


def test_load_rows_keeps_the_last_of_repeated_keys(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    retried = rows[0] | {"status": "error", "error": "first try"}
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in (retried, rows[1], rows[0])) + "\n")
    assert load_rows(path) == [rows[1], rows[0]]


def test_model_with_only_failed_rows_is_still_reported(tmp_path: Path) -> None:
    failed = _row(DIT, "ot", "otq", "channel", 3, "deploy", "weights", 0, {}, "error", "boom")
    text = write_report([failed], tmp_path, command=COMMAND).read_text()
    assert "1 rows: 0 ok, 1 not ok (1 error)." in text
    assert f"_No ok deploy-scope rows for {DIT} at 2, 3, 4 bits._" in text
    assert "| boom |" in text
    assert "![" not in text and not (tmp_path / "plots").exists()


# ------------------------------------------------------------------------------------ calibrated and mixed

ABLATION = ("ot-vp", "ot-vp+aw", "ot-vp+ef", "ot-vp+cal")
BUDGETS = (2.0, 2.1, 2.5, 3.0)
CAL_SECONDS = 20.0


def _calibrated_rows(model: str) -> list[dict[str, Any]]:
    """ot-vp and its calibrated fits at channel/group x 2/3 bits (plus ot-vp channel 4 with no calibrated
    counterpart), and data-free ot-vp and ot-vp+cal under four bits budgets (granularity mixed, bits = budget)."""
    rows = []
    cells = [(g, b) for g in ("channel", "group") for b in (2, 3)] + [("channel", 4)]
    for index, method in enumerate(ABLATION):
        for granularity, bits in cells if index == 0 else cells[:-1]:
            common = (model, method, "otq", granularity, bits, "deploy")
            weights = _weights(granularity, bits) | ({"calibrate_s": CAL_SECONDS} if index else {})
            rows.append(_row(*common, "weights", 0, weights))
            rows.append(_row(*common, "probe", 0, {"velocity_psnr": 20.0 + bits + index}))
            for seed in SEEDS:
                psnr = 10.0 + 5.0 * bits + index + seed
                rows.append(_row(*common, "samples", seed, {"psnr": psnr, "class_accuracy": 0.5 + index / 10}))
            if method == "ot-vp+cal":
                rows.append(_row(*common, "fid", 0, {"fid_vs_fp": 5.0 / bits, "fid_vs_test": 9.0}))
    for method in ("ot-vp", "ot-vp+cal"):
        calibrated = method == "ot-vp+cal"
        for budget in BUDGETS:
            common = (model, method, "otq", "mixed", budget, "deploy")
            plan = {
                "budget": budget,
                "reached": budget - 0.001,
                "sensitivity": "velocity" if calibrated else "weights",
                "layers": {"3-bit channel": 1, "2-bit tensor": 3},
            }
            weights = {"bits_per_weight": budget - 0.001, "quantize_s": 5.0, "plan": plan}
            rows.append(_row(*common, "weights", 0, weights | ({"calibrate_s": CAL_SECONDS} if calibrated else {})))
            rows.append(_row(*common, "probe", 0, {"velocity_psnr": 20.0 + budget}))
            for seed in SEEDS:
                psnr = 10.0 + 5.0 * budget + calibrated + seed
                rows.append(_row(*common, "samples", seed, {"psnr": psnr, "class_accuracy": 0.8}))
            if calibrated:
                rows.append(_row(*common, "fid", 0, {"fid_vs_fp": 4.0 / budget, "fid_vs_test": 8.0}))
    fp = (model, "fp", "reference", "none", 32, "deploy")
    rows.append(_row(*fp, "samples", 0, {"class_accuracy": 0.95, "num_samples": 8}))
    return rows


@pytest.fixture(scope="module")
def calibrated_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(_calibrated_rows(UNET), tmp_path_factory.mktemp("calibrated"), command=COMMAND)


def test_ablation_table_steps_from_data_free_to_full_calibration_then_budgets(calibrated_report: Path) -> None:
    section = _section(calibrated_report.read_text(), "### Calibration ablation")
    table = _table_rows(section.split("**Bits plans**")[0])
    labels = [tuple(r[:3]) for r in table]
    fixed = [(m, g, str(b)) for g in ("channel", "group") for b in (2, 3) for m in ABLATION]
    mixed = [(m, "mixed", f"budget {b:g}") for b in BUDGETS for m in ("ot-vp", "ot-vp+cal")]
    assert labels == fixed + mixed, "ot-vp channel 4 has no calibrated counterpart and is left out"
    by_label = {tuple(r[:3]): r for r in table}
    # Method | Gran. | Bits | Bits/weight | Sample PSNR | Class acc. | FID vs fp | t=0 vel. PSNR | Calib. | Quant.
    data_free, full = by_label[("ot-vp", "group", "3")], by_label[("ot-vp+cal", "group", "3")]
    assert data_free[3] == full[3] == f"{_bpw('group', 3):.3f}"
    assert full[4] == f"{10.0 + 15 + 3 + 0.5:.2f} ± 0.71" and full[7] == f"{100 * 0.8:.1f} ± 0.0"
    assert full[5] == full[6] == "—", "no class agreement in these rows (either judge)"
    assert full[8] == f"{5.0 / 3:.2f}" and data_free[8] == "—", "FID where measured"
    assert full[9] == f"{20.0 + 3 + 3:.2f}" and full[10] == f"{CAL_SECONDS:.2f}" and data_free[10] == "—"
    assert full[11] == f"{0.25 * 3:.2f}"
    budget = by_label[("ot-vp+cal", "mixed", "budget 2.1")]
    assert budget[3] == "2.099" and budget[8] == f"{4.0 / 2.1:.2f}" and budget[11] == "5.00"


def test_bits_plans_table_lists_layers_per_setting(calibrated_report: Path) -> None:
    plans = _table_rows(_section(calibrated_report.read_text(), "### Calibration ablation").split("**Bits plans**")[1])
    assert [tuple(r[:2]) for r in plans] == [(m, f"{b:g}") for b in BUDGETS for m in ("ot-vp", "ot-vp+cal")]
    assert plans[1] == ["ot-vp+cal", "2", "1.999", "velocity", "2-bit tensor ×3, 3-bit channel ×1"]


def test_headline_shows_calibrated_methods_and_one_row_per_budget(calibrated_report: Path) -> None:
    table = _table_rows(_section(calibrated_report.read_text(), "### Headline"))
    labels = [tuple(r[:3]) for r in table]
    # budgets 2.0-2.5 count as 2 nominal bits, 3.0 as 3; each budget keeps its own row, never a code width's
    for method in ("ot-vp", "ot-vp+cal"):
        assert {(m, b) for m, g, b in labels if (m, g) == (method, "mixed")} == {
            (method, f"budget {b:g}") for b in BUDGETS
        }
    # the calibrated methods compete over granularities like the others (equal sample PSNR: channel wins ties)
    assert ("ot-vp+cal", "channel", "2") in labels and ("ot-vp+aw", "channel", "3") in labels
    assert not any(m == "ot-vp+cal" and g == "group" for m, g, _ in labels)
    bpw = [float(r[3]) for r in table if r[3] != "—"]
    assert bpw == sorted(bpw)


def test_reports_without_calibrated_rows_have_no_ablation(report: Path) -> None:
    assert "Calibration ablation" not in report.read_text()


def test_budget_rows_plot_and_render_independent_of_order(calibrated_report: Path, tmp_path: Path) -> None:
    text = calibrated_report.read_text()
    assert "plots/otq-fashion-mnist-unet-rd-sample-psnr.png" in text
    shuffled = _calibrated_rows(UNET)
    random.Random(2).shuffle(shuffled)
    assert write_report(shuffled, tmp_path, command=COMMAND).read_text() == text
    for png in sorted((calibrated_report.parent / "plots").glob("*.png")):
        assert (tmp_path / "plots" / png.name).read_bytes() == png.read_bytes(), png.name
    with (calibrated_report.parent / "results.csv").open(newline="") as handle:
        records = {r["key"]: r for r in csv.DictReader(handle)}
    budget = records[f"{UNET}|ot-vp+cal|mixed|2.5|deploy|weights|0"]
    assert budget["bits"] == "2.5" and budget["metrics.plan.layers.2-bit tensor"] == "3"
