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
TINY = [
    "--grid", "64x1", "--variants", "data-free,calibrated-3bit", "--api", "two-step", "--sample-size", "8",
    "--calibration-batches", "1", "--calibration-steps", "2", "--calibration-batch-size", "1",
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
        assert row["API"] == ("—" if name == "data-free" else "two-step")
    assert rows["data-free"]["vs data-free"] == "1.00x"
    assert float(rows["calibrated-3bit"]["vs data-free"].rstrip("x")) > 0
    assert float(rows["calibrated-3bit"]["total s"]) > float(rows["calibrated-3bit"]["quantize s"])  # sampling
    for section in ("Ratios to data-free", "Time per weight against depth", "Extrapolation to SD3.5-large"):
        assert f"### {section}" in markdown
    assert "torch threads = 2" in markdown and "two-step API" in markdown
    assert re.search(r"velocity RMS \d", markdown)


def test_log_rerenders_the_same_report(tiny_run):
    log = tiny_run.with_suffix(".jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds[:3] == ["meta", "targets", "reference"] and kinds.count("variant") == 2
    variants = [r["ok"] for r in records if r["kind"] == "variant"]
    assert all(v["threads"] == 2 and math.isfinite(v["velocity_error"]) for v in variants)
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
