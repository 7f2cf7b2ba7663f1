"""scripts/evaluate.py end to end on the bundled model: --quick with 1 and 2 processes, resume, report."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_otq.evaluation.store import read_jsonl


REPO = Path(__file__).resolve().parent.parent
TIMINGS = ("elapsed_s", "quantize_s", "calibrate_s")


def _run(args: list[str], launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = (launcher or [sys.executable]) + [str(REPO / "scripts" / "evaluate.py"), *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _without_timings(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for row in rows:
        row = {k: v for k, v in row.items() if k not in TIMINGS}
        row["metrics"] = {k: v for k, v in row["metrics"].items() if k not in TIMINGS}
        out[row["key"]] = row
    return out


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    stats = root / "stats"
    _run(["--quick", "--output", str(root / "one"), "--stats-cache", str(stats)])
    return root, stats


def test_quick_run_writes_rows_report_and_plots(quick_run):
    root, _ = quick_run
    out = root / "one"
    rows = read_jsonl(out / "results.jsonl")
    assert rows and all(row["status"] == "ok" for row in rows), [r for r in rows if r["status"] != "ok"]
    by_key = {row["key"]: row for row in rows}
    model = "otq/fashion-mnist-unet"
    # every metric set of the quick config ran
    assert {row["metric_set"] for row in rows} == {"weights", "probe", "samples", "fid", "steps"}
    assert {row["scope"] for row in rows} == {"deploy", "paper"}
    ot2 = by_key[f"{model}|ot|channel|2|deploy|weights|0"]["metrics"]
    ot4 = by_key[f"{model}|ot|channel|4|deploy|weights|0"]["metrics"]
    assert ot2["bits_per_weight"] < ot4["bits_per_weight"] and ot4["rel_mse_mean"] < ot2["rel_mse_mean"]
    paper2 = by_key[f"{model}|ot|channel|2|paper|weights|0"]["metrics"]
    assert len(paper2["layers"]) > len(ot2["layers"])  # the paper scope also quantizes biases and norms
    samples4 = by_key[f"{model}|ot|channel|4|deploy|samples|0"]["metrics"]
    samples2 = by_key[f"{model}|ot|channel|2|deploy|samples|0"]["metrics"]
    assert samples4["psnr"] > samples2["psnr"] and 0 < samples2["ssim"] < samples4["ssim"] <= 1
    assert (out / samples4["grid"]).is_file()
    peer = by_key[f"{model}|bnb-nf4|native|4|deploy|weights|0"]["metrics"]
    assert 4.0 < peer["bits_per_weight"] < 4.3 and "Linear" in peer["native_coverage"]
    fid = [by_key[f"{model}|bnb-nf4|native|4|deploy|fid|{seed}"]["metrics"] for seed in (0, 1)]
    assert all(f["fid_vs_fp"] > 0 and f["fid_vs_test"] > 0 for f in fid) and fid[0] != fid[1]
    # the calibrated variant: statistics collected once (cached), both timings recorded; the bits budget is met
    calibrated = by_key[f"{model}|ot-vp+cal|group|3|deploy|weights|0"]["metrics"]
    assert calibrated["calibrate_s"] > 0 and calibrated["quantize_s"] > 0
    assert (out / "cache" / "otq-fashion-mnist-unet" / "calibration.safetensors").is_file()
    assert by_key[f"{model}|ot-vp+cal|group|3|deploy|samples|0"]["metrics"]["psnr"] > samples2["psnr"]
    budget = by_key[f"{model}|ot-vp|mixed|2.5|deploy|weights|0"]["metrics"]
    assert budget["bits_per_weight"] <= 2.5 + 0.01 and budget["plan"]["budget"] == 2.5
    steps = by_key[f"{model}|ot|channel|2|deploy|steps|0"]["metrics"]
    assert steps["steps"] == [2, 4] and len(steps["psnr"]) == 2
    report = (out / "report.md").read_text()
    assert "scripts/evaluate.py --quick" in report and "| bnb-nf4 |" in report
    assert "### Calibration ablation" in report and "| ot-vp | mixed | budget 2.5 |" in report
    assert "Unfinished" not in report
    for link in [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (out / link).is_file(), link
    assert (out / "results.csv").read_text().count("\n") == len(rows) + 1


@pytest.mark.slow  # 90 s: two more runs of the quick grid; tests/calibration/test_api.py covers 2 processes in CI
def test_two_processes_give_the_same_rows_and_a_rerun_resumes(quick_run):
    root, stats = quick_run
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate launcher is not installed next to this python")
    launcher = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        "0",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    _run(["--quick", "--output", str(root / "two"), "--stats-cache", str(stats)], launcher=launcher)
    assert sorted(p.name for p in (root / "two" / "rows").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    one = _without_timings(read_jsonl(root / "one" / "results.jsonl"))
    two = _without_timings(read_jsonl(root / "two" / "results.jsonl"))
    assert one.keys() == two.keys()
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)

    # rerunning with everything done computes nothing new
    shard = root / "two" / "rows" / "rank0.jsonl"
    before = shard.read_text()
    _run(["--quick", "--output", str(root / "two"), "--stats-cache", str(stats)])
    assert shard.read_text() == before
    assert len(read_jsonl(root / "two" / "results.jsonl")) == len(one)


def test_bad_config_is_a_clear_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("models: [otq/fashion-mnist-unet]\nblocks:\n  - {name: b, methods: [ot], bits: [12]}\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--config", str(config), "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert (
        result.returncode != 0
        and "bits" in result.stderr
        and "12" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_quoted_command_leaves_out_flags_that_do_not_change_rows(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = [str(REPO / "scripts" / "evaluate.py"), "--config", "full.yaml", "--max-minutes", "90", "--report-only"]
    monkeypatch.setattr(sys, "argv", [*argv, "--update-cards", "--output", str(REPO / "results" / "x")])
    assert module._command(2) == (
        "accelerate launch --multi_gpu --num_processes 2 scripts/evaluate.py --config full.yaml --output results/x"
    )
    monkeypatch.setattr(sys, "argv", [argv[0], "--max-minutes=5", "--quick", "--output", "out"])
    assert module._command(1) == "python scripts/evaluate.py --quick --output out"


def test_report_of_an_unfinished_run_says_what_is_missing(tmp_path):
    _run(["--quick", "--output", str(tmp_path), "--report-only"])
    report = (tmp_path / "report.md").read_text()
    assert "0 rows" in report
    assert re.search(r"\*\*Unfinished:\*\* [1-9]\d* cells of otq/fashion-mnist-unet", report), report[:500]
