"""The demo's pieces: its settings, labels and table (the whole run is tested through the CLI, tests/test_cli.py)."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_otq.evaluation.demo import (
    DEMO_PEERS,
    DemoRow,
    DemoSettings,
    demo_summary,
    demo_table,
    model_label,
    peer_label,
)
from diffusers_otq.evaluation.peers import PEER_FORMATS


def test_the_quick_settings_say_what_they_shorten_and_the_full_ones_shorten_nothing() -> None:
    quick, full = DemoSettings(), DemoSettings.full()
    assert full.shortened() == []
    shortened = quick.shortened()
    assert f"refinement steps {quick.refine_steps} (full: 600)" in shortened
    assert all("(full:" in phrase for phrase in shortened) and len(shortened) == 4
    assert quick.budgets == full.budgets == (2.0, 2.5, 3.0, 4.0)
    calibration = full.calibration()
    assert (calibration.num_samples, calibration.refine_steps, calibration.refine_samples) == (64, 600, 32)


@pytest.mark.parametrize(
    "name,label",
    [("hqq-3", "HQQ 3-bit g64"), ("bnb-nf4", "bnb NF4"), ("quanto-int2", "quanto int2"),
     ("sdnq-uint3-codebook", "SDNQ uint3 codebook")],
)  # fmt: skip
def test_peer_labels(name: str, label: str) -> None:
    assert peer_label(name) == label


def test_every_default_peer_is_a_known_format_and_models_have_short_labels() -> None:
    assert set(DEMO_PEERS) <= set(PEER_FORMATS)
    assert {"hqq", "optimum-quanto", "bitsandbytes", "sdnq"} <= {PEER_FORMATS[n].library for n in DEMO_PEERS}
    assert model_label("otq/fashion-mnist-dit") == "fashion-mnist-dit"
    assert model_label("/tmp/x/my-pipe") == "my-pipe"


def test_the_table_marks_the_best_rows_and_leaves_missing_metrics_readable() -> None:
    image = torch.zeros(1, 1, 2, 2)
    rows = [
        DemoRow("otq/m", "float32", "float", 32, 32.0, 4.0, math.inf, 1.0, 1.0, 0.9, 0.0, image),
        DemoRow("otq/m", "OTQ 2.5 b/w", "best", 2.5, 2.4987, 0.5, 24.123, 0.91, 0.95, 0.9, 12.34, image),
        DemoRow("otq/m", "HQQ 3-bit g64", "peer", 3, 3.75, 0.7, 20.0, 0.8, math.nan, math.nan, 1.0, image),
    ]
    lines = demo_table(rows).splitlines()
    assert lines[2] == "| m | float32 | 32.000 | 4.00 | inf | 1.0000 | 100% | 90% |  |"
    assert lines[3] == "| m | **OTQ 2.5 b/w** | 2.499 | 0.50 | 24.12 | 0.9100 | 95% | 90% | 12.3 |"
    assert lines[4].endswith("| 20.00 | 0.8000 | n/a | n/a | 1.0 |")
    summary = demo_summary(rows).splitlines()
    assert summary[0] == "| m | 2.5 bits | 3 bits |"
    assert summary[2] == "| **OTQ calibrated + budget + refined** | 24.1 (2.50) |  |"
    assert summary[3] == "| HQQ |  | 20.0 (3.75) |"
