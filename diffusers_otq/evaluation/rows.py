"""Result rows aggregated into configurations: the types and metric catalogue shared by the report and its plots.

:func:`build_points` groups the ok rows of one model and scope into :class:`Point` s, one per (method,
granularity, bits), whose metrics are :class:`Stat` s over seeds. ``bits`` is the code width (an int), except
for granularity ``"mixed"`` where it is the bits/weight budget (a float; :func:`row_bits`, :func:`format_bits`).
A :class:`Metric` names one scalar metric of one ``metric_set`` together with its display label and format.
:mod:`~diffusers_otq.evaluation.report` and :mod:`~diffusers_otq.evaluation.plots` both import from here; this
module imports neither.

>>> rows = [{"model": "m", "method": "ot", "family": "otq", "granularity": "channel", "bits": 3, "scope": "deploy",
...          "metric_set": "samples", "seed": s, "status": "ok", "metrics": {"psnr": 30.0 + s}} for s in (0, 1)]
>>> point = build_points(rows, "m", "deploy")[0]
>>> point.get(SAMPLE_PSNR)
Stat(mean=30.5, std=0.7071067811865476, n=2)
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


__all__ = [
    "ABLATION_METHODS",
    "BPW",
    "CALIB_TIME",
    "CLASS_ACC",
    "CLASS_ACC_PLAIN",
    "CLASS_AGREE",
    "CLASS_AGREE_PLAIN",
    "FAMILY_ORDER",
    "FID_FP",
    "FID_TEST",
    "FP_METHOD",
    "GRANULARITY_ORDER",
    "LATENT_COSINE",
    "MIXED",
    "PCA_COLLAPSED",
    "PCA_MEAN_VAR",
    "QUANT_TIME",
    "REL_MSE",
    "SAMPLE_PSNR",
    "SAMPLE_SSIM",
    "SIZE",
    "VEL_PSNR",
    "VEL_SSIM",
    "W2",
    "Metric",
    "Point",
    "Stat",
    "StepSeries",
    "build_points",
    "format_bits",
    "ok_rows",
    "row_bits",
    "scalar",
    "step_series",
    "summarize",
]

logger = logging.getLogger(__name__)

FP_METHOD = "fp"
MIXED = "mixed"  # per-layer bits under a bits/weight budget; the row's bits is the budget
FAMILY_ORDER = {"otq": 0, "paper": 1, "calibrated-peer": 2, "peer": 3, "reference": 4}
GRANULARITY_ORDER = {"channel": 0, "group": 1, MIXED: 2, "tensor": 3, "native": 4, "none": 5}
# The calibration ablation in order: data-free ot-vp, then its calibrated fits (evaluation.variants.CALIBRATED).
ABLATION_METHODS: tuple[str, ...] = (
    "ot-vp",
    "ot-vp+aw",
    "ot-vp+ef",
    "ot-vp+cal",
    "ot-vp+ref",
    "ot-vp+bands",
    "ot-vp+ref+t128",
)


@dataclass(frozen=True)
class Stat:
    """One metric of one configuration over its successful seeds.

    Attributes:
        mean: arithmetic mean over seeds.
        std: sample standard deviation (``n - 1``), or ``None`` for a single seed.
        n: number of seeds that reported the metric.
    """

    mean: float
    std: float | None
    n: int


@dataclass(frozen=True)
class Metric:
    """How one scalar metric is looked up (``metric_set``, ``name``), labelled and formatted."""

    metric_set: str
    name: str
    label: str
    fmt: str
    scale: float = 1.0  # applied for display only, e.g. bytes -> KiB
    lower_is_better: bool = False


BPW = Metric("weights", "bits_per_weight", "Bits/weight", ".3f")
SIZE = Metric("weights", "model_bytes", "Size (KiB)", ".1f", scale=1 / 1024)
QUANT_TIME = Metric("weights", "quantize_s", "Quant. time (s)", ".2f")
CALIB_TIME = Metric("weights", "calibrate_s", "Calib. time (s)", ".2f")  # the model's statistics, collected once
REL_MSE = Metric("weights", "rel_mse_mean", "Rel. MSE", ".3e", lower_is_better=True)
W2 = Metric("weights", "w2_mean", "W2", ".3e", lower_is_better=True)
VEL_PSNR = Metric("probe", "velocity_psnr", "t=0 vel. PSNR (dB)", ".2f")
VEL_SSIM = Metric("probe", "velocity_ssim", "t=0 vel. SSIM", ".4f")
PCA_MEAN_VAR = Metric("probe", "pca_mean_var", "Latent PCA-20 mean variance", ".4g")
PCA_COLLAPSED = Metric("probe", "pca_collapsed", "Collapsed PCA-20 components", ".3g")
LATENT_COSINE = Metric("probe", "latent_cosine", "Latent cosine vs fp", ".4f")
SAMPLE_PSNR = Metric("samples", "psnr", "Sample PSNR (dB)", ".2f")
SAMPLE_SSIM = Metric("samples", "ssim", "Sample SSIM", ".4f")
CLASS_ACC = Metric("samples", "class_accuracy", "Class acc. (%)", ".1f", scale=100)
CLASS_AGREE = Metric("samples", "class_agreement", "Class agreement w/ fp (%)", ".1f", scale=100)
CLASS_ACC_PLAIN = Metric("samples", "class_accuracy_plain", "Class acc., plain judge (%)", ".1f", scale=100)
CLASS_AGREE_PLAIN = Metric("samples", "class_agreement_plain", "Agreement, plain judge (%)", ".1f", scale=100)
FID_FP = Metric("fid", "fid_vs_fp", "FID vs fp", ".2f", lower_is_better=True)
FID_TEST = Metric("fid", "fid_vs_test", "FID vs test", ".2f", lower_is_better=True)


def row_bits(row: dict[str, Any]) -> int | float:
    """A row's ``bits``: the code width as an int, or for granularity ``"mixed"`` the budget as a float."""
    return float(row["bits"]) if row["granularity"] == MIXED else int(row["bits"])


def format_bits(granularity: str, bits: float) -> str:
    """``"3"`` for a code width, ``"budget 2.5"`` for a mixed variant's bits/weight budget.

    >>> format_bits("channel", 3), format_bits("mixed", 2.0), format_bits("mixed", 2.25)
    ('3', 'budget 2', 'budget 2.25')
    """
    return f"budget {bits:g}" if granularity == MIXED else str(bits)


@dataclass
class Point:
    """One configuration (method, granularity, bits) of one model in one scope, with its aggregated metrics.

    ``bits`` is the code width, or for granularity ``"mixed"`` the bits/weight budget (a float).
    """

    method: str
    family: str
    granularity: str
    bits: int | float
    seeds: tuple[int, ...]
    stats: dict[tuple[str, str], Stat] = field(default_factory=dict)

    def get(self, metric: Metric) -> Stat | None:
        """The metric's statistics, or ``None`` when no ok row of this configuration reported it."""
        return self.stats.get((metric.metric_set, metric.name))

    @property
    def bits_per_weight(self) -> float:
        """Effective bits/weight from the weights row, or the nominal bits when that row is missing."""
        stat = self.get(BPW)
        return stat.mean if stat is not None else float(self.bits)

    def sort_key(self) -> tuple[Any, ...]:
        """Family (ours, paper, peers, reference), then method, granularity and bits."""
        return (FAMILY_ORDER.get(self.family, 9), self.method, GRANULARITY_ORDER.get(self.granularity, 9), self.bits)


@dataclass
class StepSeries:
    """Sample PSNR/SSIM against solver steps for one configuration, aggregated over seeds."""

    label: str
    steps: list[int]
    psnr: list[Stat | None]
    ssim: list[Stat | None]


def scalar(value: Any) -> float | None:
    """A metric value as float, or ``None`` for strings, lists, nulls and NaN."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    return None


def summarize(values: Iterable[float]) -> Stat:
    """Mean and sample std; sorted first so the result does not depend on the seeds' order."""
    ordered = sorted(values)
    finite = all(map(math.isfinite, ordered))
    mean = (math.fsum(ordered) if finite else sum(ordered)) / len(ordered)  # fsum raises on inf - inf
    std = statistics.stdev(ordered) if len(ordered) > 1 and finite else None
    return Stat(mean=mean, std=std, n=len(ordered))


def ok_rows(rows: Iterable[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """The rows of ``model`` whose status is ``"ok"``."""
    return [r for r in rows if r["model"] == model and r["status"] == "ok"]


def _fp_rows(rows: Iterable[dict[str, Any]], scope: str) -> list[dict[str, Any]]:
    """The fp rows to show in ``scope``: per metric set, that scope's rows, else those of the first scope present."""
    by_set: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_set[row["metric_set"]].append(row)
    chosen: list[dict[str, Any]] = []
    for group in by_set.values():
        scopes = sorted({r["scope"] for r in group})
        pick = scope if scope in scopes else scopes[0]
        chosen.extend(r for r in group if r["scope"] == pick)
    return chosen


def build_points(rows: Iterable[dict[str, Any]], model: str, scope: str) -> list[Point]:
    """Aggregate the ok, non-steps rows of ``model`` in ``scope`` (plus its fp rows) into configurations.

    Args:
        rows: result rows of any models and statuses.
        model: the model whose configurations to build.
        scope: ``"deploy"`` or ``"paper"``; fp rows of another scope stand in where fp has none in ``scope``.

    Returns:
        One point per (method, granularity, bits), sorted by :meth:`Point.sort_key`.
    """
    ok = [r for r in ok_rows(rows, model) if r["metric_set"] != "steps"]
    selected = [r for r in ok if r["method"] != FP_METHOD and r["scope"] == scope]
    selected += _fp_rows([r for r in ok if r["method"] == FP_METHOD], scope)
    groups: dict[tuple[str, str, int | float], list[dict[str, Any]]] = defaultdict(list)
    for row in selected:
        groups[(row["method"], row["granularity"], row_bits(row))].append(row)
    points = []
    for (method, granularity, bits), group in groups.items():
        values: dict[tuple[str, str], list[float]] = defaultdict(list)
        for row in group:
            for name, raw in row.get("metrics", {}).items():
                value = scalar(raw)
                if value is not None:
                    values[(row["metric_set"], name)].append(value)
        points.append(
            Point(
                method=method,
                family=sorted(r["family"] for r in group)[0],
                granularity=granularity,
                bits=bits,
                seeds=tuple(sorted({int(r["seed"]) for r in group})),
                stats={key: summarize(vals) for key, vals in values.items()},
            )
        )
    return sorted(points, key=Point.sort_key)


def _steps_points(row: dict[str, Any]) -> list[tuple[int, float | None, float | None]] | None:
    """``(steps, psnr, ssim)`` triples of a steps row, or ``None`` (logged) when its lists do not line up."""
    metrics = row.get("metrics", {})
    lists = [metrics.get(name) for name in ("steps", "psnr", "ssim")]
    if not all(isinstance(values, list) for values in lists) or len({len(values) for values in lists}) != 1:
        logger.warning("steps row %r: steps/psnr/ssim must be lists of one length; skipped", row["key"])
        return None
    return [(int(n), scalar(p), scalar(q)) for n, p, q in zip(*lists, strict=True)]


def step_series(rows: Sequence[dict[str, Any]], model: str) -> list[StepSeries]:
    """One series per (method, granularity, bits, scope) of the model's ok steps rows, sorted like the grid.

    A steps row lists ``steps``, ``psnr`` and ``ssim`` under ``metrics``; a row whose lists do not line up is
    skipped with a warning. Each value is summarized over the seeds that reported it.
    """
    # sort key -> steps -> "psnr"/"ssim" -> values over seeds
    groups: dict[tuple[Any, ...], dict[int, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for row in ok_rows(rows, model):
        triples = _steps_points(row) if row["metric_set"] == "steps" else None
        family, granularity = FAMILY_ORDER.get(row["family"], 9), GRANULARITY_ORDER.get(row["granularity"], 9)
        key = (family, row["method"], granularity, row["granularity"], row_bits(row), row["scope"])
        for steps, psnr, ssim in triples or []:
            for name, value in (("psnr", psnr), ("ssim", ssim)):
                if value is not None:
                    groups[key][steps][name].append(value)
    series = []
    for key in sorted(groups):
        _, method, _, granularity, bits, scope = key
        per_step = groups[key]
        steps = sorted(per_step)
        series.append(
            StepSeries(
                label=f"{method} {granularity} {_bits_label(granularity, bits)} ({scope})"
                if method != FP_METHOD
                else f"fp ({scope})",
                steps=steps,
                psnr=[summarize(per_step[n]["psnr"]) if per_step[n]["psnr"] else None for n in steps],
                ssim=[summarize(per_step[n]["ssim"]) if per_step[n]["ssim"] else None for n in steps],
            )
        )
    return series


def _bits_label(granularity: str, bits: float) -> str:
    """``"3-bit"`` or ``"budget 2.5"``."""
    return format_bits(granularity, bits) if granularity == MIXED else f"{bits}-bit"
