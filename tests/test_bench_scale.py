"""scripts/bench_scale.py end to end at its smallest size: a 64-wide, 1-block model, data-free and calibrated."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "bench_scale.py"
# One torch thread: 64-wide layers gain nothing from a second one, and on a busy 2-core machine the calibrated fit's
# many small steps ran 5x slower with two. The one-call API (quantize_model drives forward_fn itself), as the
# script's default picks it; test_scale_models covers the two-step path.
TINY = [
    "--grid", "64x1", "--variants", "data-free,calibrated-3bit", "--api", "one-call", "--threads", "1",
    "--sample-size", "8", "--calibration-batches", "1", "--calibration-steps", "2", "--calibration-batch-size", "1",
    "--heldout-trajectories", "1", "--heldout-steps", "2",
]  # fmt: skip


def _script():
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench_scale") / "bench_scale.md"
    _run([*TINY, "--output", str(out)])
    return out


def _rows(markdown: str, header: str) -> list[dict[str, str]]:
    lines = markdown.splitlines()
    start = lines.index(header)
    names = [c.strip() for c in header.strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(names, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


def test_markdown_has_every_column_and_sane_values(tiny_run):
    script = _script()
    markdown = tiny_run.read_text()
    header = "| " + " | ".join(script.COLUMNS) + " |"
    rows = {row["variant"]: row for row in _rows(markdown, header)}
    assert set(rows) == {"data-free", "calibrated-3bit"}
    for name, row in rows.items():
        assert (row["width"], row["blocks"]) == ("64", "1")
        assert 0 < float(row["quantize s"]) <= float(row["total s"])
        assert float(row["µs/weight"]) > 0
        assert float(row["peak RSS (MiB)"]) >= float(row["peak extra (MiB)"]) >= 0
        assert float(row["extra / fp32"].rstrip("x")) >= 0
        assert 2.0 < float(row["bits/weight"]) < 5.0  # 3-bit codes plus per-row codebooks of 64-wide rows
        assert 0 < float(row["velocity error"]) < 1
        assert row["API"] == ("—" if name == "data-free" else "one-call")
    assert rows["data-free"]["vs data-free"] == "1.00x"
    assert float(rows["calibrated-3bit"]["vs data-free"].rstrip("x")) > 0
    assert float(rows["calibrated-3bit"]["total s"]) >= float(rows["calibrated-3bit"]["quantize s"])  # + sampling
    sampling, calls = rows["calibrated-3bit"]["sampling s (calls)"].split()
    assert float(sampling) >= 0 and calls == "(1)"  # the one forward_fn trajectory of --calibration-batches 1, once
    assert rows["data-free"]["sampling s (calls)"] == "—"
    for section in ("Ratios to data-free", "Time per weight against depth", "Extrapolation to SD3.5-large"):
        assert f"### {section}" in markdown
    assert "torch threads = 1" in markdown and "one-call API" in markdown and "Old two-step" not in markdown
    assert re.search(r"velocity RMS \d", markdown)


def test_log_rerenders_the_same_report(tiny_run):
    log = tiny_run.with_suffix(".jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds[:3] == ["meta", "targets", "reference"] and kinds.count("variant") == 2
    variants = [r["ok"] for r in records if r["kind"] == "variant"]
    assert all(v["threads"] == 1 and math.isfinite(v["velocity_error"]) for v in variants)
    again = tiny_run.with_name("again.md")
    _run(["--render", str(log), "--output", str(again)])
    assert again.read_text() == tiny_run.read_text()


def test_grid_parsing():
    script = _script()
    grid = script.parse_grid("1024x2, 1536x6:data-free+budget-2.5", ("data-free", "calibrated-3bit"))
    assert [(p.width, p.depth, p.variants) for p in grid] == [
        (1024, 2, ("data-free", "calibrated-3bit")),
        (1536, 6, ("data-free", "budget-2.5")),
    ]
    with pytest.raises(SystemExit, match="bad grid entry"):
        script.parse_grid("1024x2:quantize-harder", script.VARIANTS)


def _synthetic_log(path: Path) -> Path:
    """A run over 1024 x {2, 6, 24} and 1536 x 6 with made-up numbers, a stopped and an unavailable variant."""
    records = [
        {"kind": "meta", "command": "python scripts/bench_scale.py", "api": "two-step", "threads": 2,
         "calibration": {"batches": 2, "steps": 8, "batch_size": 2}, "sample_size": 32, "machine": {"cpu": "test"}},
        {"kind": "targets", "targets": {"SD3.5-large": {"width": 2432, "blocks": 38, "parameters": 8e9, "weights": 8e9}}},
    ]  # fmt: skip
    for width, depth, us in ((1024, 2, 0.5), (1024, 6, 0.4), (1024, 24, 0.44), (1536, 6, 0.7)):
        weights = 36 * width**2 * depth
        records.append({"kind": "reference", "width": width, "depth": depth, "ok": {
            "parameters": weights, "velocity_rms": 0.6, "velocity_variation": 1.2, "float_call_s": 1.0}})  # fmt: skip
        for variant, factor in (("data-free", 1.0), ("calibrated-3bit", 3.0), ("budget-2.5", None),
                                ("budget-2.5+refine50", None)):  # fmt: skip
            record = {"kind": "variant", "width": width, "depth": depth, "variant": variant, "api": "two-step"}
            if variant == "budget-2.5":
                record["timed_out"] = 100.0
            elif variant == "budget-2.5+refine50":
                record["ok"] = {"unavailable": "needs the one-call API"}
            else:
                seconds = us * factor * weights / 1e6
                record["ok"] = {"seconds": seconds, "cpu_s": seconds * factor, "calibrate_s": 0.1 * seconds, "forward_calls": 2,
                                "quantize_s": 0.9 * seconds, "weights": weights, "float32_mib": weights * 4 / 2**20,
                                "peak_rss_mib": 1000.0, "peak_extra_mib": weights * 4 / 2**20 * 0.25 * factor,
                                "bits_per_weight": 3.1, "velocity_error": 0.02 / factor}  # fmt: skip
            records.append(record)
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_report_verdicts(tmp_path):
    script = _script()
    markdown = script.render(script.read_log(_synthetic_log(tmp_path / "run.jsonl")))
    assert "**Old two-step path**" in markdown
    # depth: 0.44 / 0.4 = 1.10 within +-20%: met; width 0.7 / 0.4 = 1.75 > 1.5: missed
    assert "| data-free | 1024 | 0.500 | 0.400 (1.00) | 0.440 (1.10) | met (±10%) |" in markdown
    assert "- data-free: 6 blocks 1.75x (**missed**)" in markdown
    # calibrated 3x data-free: missed (target 2x); the stopped budget shows a lower bound, refinement n/a
    assert "| 1024 | 6 | 3.00x **missed** | > " in markdown and "(stopped) | n/a |" in markdown
    assert "0.750x **missed**" in markdown  # 0.25 * 3 of the float32 size
    assert "did not finish in 100 s (stopped)" in markdown and "not available: needs the one-call API" in markdown
    # extrapolation from the largest model, 1024 x 24 (0.44 us/weight), with alpha = log(1.75) / log(1.5) (the
    # widths' ratio at their deepest common depth, 6) and alpha = 1
    alpha = math.log(1.75) / math.log(1.5)
    hours = [0.44 * (2432 / 1024) ** a * 8e9 / 1e6 / 3600 for a in (alpha, 1.0)]
    assert f"| data-free | 1024 x 24 | {alpha:.2f} | {hours[0]:.1f} h / {hours[1]:.1f} h |" in markdown


def test_report_on_cpu_seconds(tmp_path):
    """--basis cpu: ratios and times per weight from CPU seconds (here 3x the wall ratio for the calibrated rows)."""
    script = _script()
    run = script.read_log(_synthetic_log(tmp_path / "run.jsonl"))
    markdown = script.render(run, "cpu")
    assert "use CPU seconds" in markdown
    assert "| 1024 | 6 | 9.00x **missed** | > " in markdown  # calibrated: 3x the wall time, 3x the CPU per second
    del run["variants"][(1024, 2, "data-free")]["ok"]["cpu_s"]  # a log from before CPU seconds were recorded
    rows = script._main_table(run, script._results(run, "cpu"))
    assert any(row.startswith("| 1024 | 2 | ") and "| — | — |" in row for row in rows)
