"""Markdown report, flat CSV and PNG plots from the evaluation harness's JSONL result rows.

The harness appends one JSON object per line (fields in :data:`REQUIRED_FIELDS`, metrics under ``"metrics"``).
:func:`write_report` turns a list of such rows into ``report.md``, ``results.csv`` and ``plots/*.png`` inside one
output directory; :func:`headline_table` renders the per-model summary table alone (e.g. for a model card).

Rows that differ only in ``seed`` form one *configuration*; its metrics are shown as ``mean ± std`` with the
sample standard deviation (``n - 1`` denominator) when several seeds succeeded, else as the single value. Only
rows with ``status == "ok"`` contribute numbers; every other row is listed with its error. The output depends
on the set of rows only, never on their order.

>>> row = {"key": "m|ot|channel|3|deploy|samples|0", "model": "m", "method": "ot", "family": "otq",
...        "granularity": "channel", "bits": 3, "scope": "deploy", "metric_set": "samples", "seed": 0,
...        "status": "ok", "metrics": {"psnr": 30.0, "ssim": 0.9}}
>>> print(headline_table([row], "m").splitlines()[2])
| ot | channel | 3 | — | — | 30.00 | 0.9000 | — | — | — | — | — |
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


__all__ = ["REQUIRED_FIELDS", "Stat", "headline_table", "load_rows", "write_report"]

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("key", "model", "method", "family", "granularity", "bits", "scope", "metric_set", "seed", "status")
FP_METHOD = "fp"
MISSING = "—"
PARITY_BITS = tuple(range(2, 9))  # the paper's tables run from 2 to 8 code bits
HEATMAP_BITS = 3
_FAMILY_ORDER = {"otq": 0, "paper": 1, "peer": 2, "reference": 3}
_GRANULARITY_ORDER = {"channel": 0, "group": 1, "tensor": 2, "native": 3, "none": 4}
_CSV_IDENTITY = (*REQUIRED_FIELDS, "error", "elapsed_s")
_MAX_ERROR_CHARS = 400  # keeps a traceback-sized error from swamping the failed-rows table


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
class _Metric:
    """How one scalar metric is looked up (``metric_set``, ``name``), labelled and formatted."""

    metric_set: str
    name: str
    label: str
    fmt: str
    scale: float = 1.0  # applied for display only, e.g. bytes -> KiB
    lower_is_better: bool = False


BPW = _Metric("weights", "bits_per_weight", "Bits/weight", ".3f")
SIZE = _Metric("weights", "model_bytes", "Size (KiB)", ".1f", scale=1 / 1024)
QUANT_TIME = _Metric("weights", "quantize_s", "Quant. time (s)", ".2f")
REL_MSE = _Metric("weights", "rel_mse_mean", "Rel. MSE", ".3e", lower_is_better=True)
W2 = _Metric("weights", "w2_mean", "W2", ".3e", lower_is_better=True)
VEL_PSNR = _Metric("probe", "velocity_psnr", "t=0 vel. PSNR (dB)", ".2f")
VEL_SSIM = _Metric("probe", "velocity_ssim", "t=0 vel. SSIM", ".4f")
PCA_MEAN_VAR = _Metric("probe", "pca_mean_var", "Latent PCA-20 mean variance", ".4g")
PCA_COLLAPSED = _Metric("probe", "pca_collapsed", "Collapsed PCA-20 components", ".3g")
LATENT_COSINE = _Metric("probe", "latent_cosine", "Latent cosine vs fp", ".4f")
SAMPLE_PSNR = _Metric("samples", "psnr", "Sample PSNR (dB)", ".2f")
SAMPLE_SSIM = _Metric("samples", "ssim", "Sample SSIM", ".4f")
CLASS_ACC = _Metric("samples", "class_accuracy", "Class acc. (%)", ".1f", scale=100)
FID_FP = _Metric("fid", "fid_vs_fp", "FID vs fp", ".2f", lower_is_better=True)
FID_TEST = _Metric("fid", "fid_vs_test", "FID vs test", ".2f", lower_is_better=True)

HEADLINE_METRICS = (BPW, SIZE, SAMPLE_PSNR, SAMPLE_SSIM, CLASS_ACC, FID_FP, FID_TEST, VEL_PSNR, QUANT_TIME)
GRID_METRICS = (BPW, REL_MSE, W2, VEL_PSNR, SAMPLE_PSNR, SAMPLE_SSIM, CLASS_ACC)
PARITY_METRICS = (VEL_PSNR, VEL_SSIM, PCA_MEAN_VAR, PCA_COLLAPSED, LATENT_COSINE)
RD_PLOTS = (  # (file-name part, metric, log y axis)
    ("sample-psnr", SAMPLE_PSNR, False),
    ("sample-ssim", SAMPLE_SSIM, False),
    ("velocity-psnr", VEL_PSNR, False),
    ("rel-mse", REL_MSE, True),
    ("class-accuracy", CLASS_ACC, False),
    ("fid-vs-fp", FID_FP, False),
)
# The metric that picks a method's granularity in the headline table, keyed by headline_table's metric_set.
_RANK_METRICS = {"samples": SAMPLE_PSNR, "probe": VEL_PSNR, "fid": FID_FP, "weights": REL_MSE}


@dataclass
class _Point:
    """One configuration (method, granularity, bits) of one model in one scope, with its aggregated metrics."""

    method: str
    family: str
    granularity: str
    bits: int
    seeds: tuple[int, ...]
    stats: dict[tuple[str, str], Stat] = field(default_factory=dict)

    def get(self, metric: _Metric) -> Stat | None:
        return self.stats.get((metric.metric_set, metric.name))

    @property
    def bits_per_weight(self) -> float:
        """Effective bits/weight from the weights row, or the nominal bits when that row is missing."""
        stat = self.get(BPW)
        return stat.mean if stat is not None else float(self.bits)

    def sort_key(self) -> tuple[Any, ...]:
        return (_FAMILY_ORDER.get(self.family, 9), self.method, _GRANULARITY_ORDER.get(self.granularity, 9), self.bits)


# --------------------------------------------------------------------------------------------------- loading


def _row_problem(row: Any) -> str | None:
    """Why ``row`` is not a usable result row, or ``None`` when it is."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    missing = [name for name in REQUIRED_FIELDS if name not in row]
    if missing:
        return f"missing field(s) {', '.join(repr(m) for m in missing)} (required: {', '.join(REQUIRED_FIELDS)})"
    if not isinstance(row.get("metrics", {}), dict):
        return f"'metrics' must be an object, got {type(row['metrics']).__name__}"
    return None


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Read a results JSONL file; a later row with an already-seen ``key`` replaces the earlier one (a rerun).

    Args:
        path: the JSONL file the harness appends to. Blank lines are skipped.

    Returns:
        The rows in file order (a replaced row takes the position of its replacement).

    Raises:
        ValueError: a line is not valid JSON or not a result row; the message names the file and line number.
    """
    path = Path(path)
    rows: dict[str, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({err.msg}, column {err.colno}).") from err
            problem = _row_problem(row)
            if problem is not None:
                raise ValueError(f"{path}, line {lineno}: {problem}.")
            if row["key"] in rows:
                logger.warning(
                    "%s, line %d: key %r repeats an earlier row; keeping this one", path, lineno, row["key"]
                )
                del rows[row["key"]]
            rows[row["key"]] = row
    return list(rows.values())


def _validate(rows: Sequence[dict[str, Any]]) -> None:
    """Raise ``ValueError`` for a malformed row or a repeated key (which would make the output order-dependent)."""
    seen: set[str] = set()
    for index, row in enumerate(rows):
        problem = _row_problem(row)
        if problem is not None:
            raise ValueError(f"row {index}: {problem}.")
        if row["key"] in seen:
            raise ValueError(
                f"row {index}: key {row['key']!r} occurs twice; load rows with load_rows() to deduplicate."
            )
        seen.add(row["key"])


# ----------------------------------------------------------------------------------------------- aggregation


def _scalar(value: Any) -> float | None:
    """A metric value as float, or ``None`` for strings, lists, nulls and NaN."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    return None


def _summarize(values: Iterable[float]) -> Stat:
    """Mean and sample std; sorted first so the result does not depend on the seeds' order."""
    ordered = sorted(values)
    finite = all(map(math.isfinite, ordered))
    mean = (math.fsum(ordered) if finite else sum(ordered)) / len(ordered)  # fsum raises on inf - inf
    std = statistics.stdev(ordered) if len(ordered) > 1 and finite else None
    return Stat(mean=mean, std=std, n=len(ordered))


def _ok_rows(rows: Iterable[dict[str, Any]], model: str) -> list[dict[str, Any]]:
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


def _build_points(rows: Iterable[dict[str, Any]], model: str, scope: str) -> list[_Point]:
    """Aggregate the ok, non-steps rows of ``model`` in ``scope`` (plus its fp rows) into configurations."""
    ok = [r for r in _ok_rows(rows, model) if r["metric_set"] != "steps"]
    selected = [r for r in ok if r["method"] != FP_METHOD and r["scope"] == scope]
    selected += _fp_rows([r for r in ok if r["method"] == FP_METHOD], scope)
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in selected:
        groups[(row["method"], row["granularity"], int(row["bits"]))].append(row)
    points = []
    for (method, granularity, bits), group in groups.items():
        values: dict[tuple[str, str], list[float]] = defaultdict(list)
        for row in group:
            for name, raw in row.get("metrics", {}).items():
                value = _scalar(raw)
                if value is not None:
                    values[(row["metric_set"], name)].append(value)
        points.append(
            _Point(
                method=method,
                family=sorted(r["family"] for r in group)[0],
                granularity=granularity,
                bits=bits,
                seeds=tuple(sorted({int(r["seed"]) for r in group})),
                stats={key: _summarize(vals) for key, vals in values.items()},
            )
        )
    return sorted(points, key=_Point.sort_key)


def _rank_key(point: _Point, metric: _Metric) -> tuple[Any, ...]:
    """Smaller is better: points that have the metric first, then by its mean, then by granularity."""
    granularity = (_GRANULARITY_ORDER.get(point.granularity, 9), point.granularity)
    stat = point.get(metric)
    if stat is None:
        return (1, 0.0, *granularity)
    return (0, stat.mean if metric.lower_is_better else -stat.mean, *granularity)


def _headline_points(
    rows: Sequence[dict[str, Any]], model: str, metric_set: str, bits: Sequence[int], scope: str
) -> list[_Point]:
    if metric_set not in _RANK_METRICS:
        raise ValueError(f"metric_set must be one of {sorted(_RANK_METRICS)}, got {metric_set!r}.")
    rank = _RANK_METRICS[metric_set]
    best: dict[tuple[str, int], _Point] = {}
    for point in _build_points(rows, model, scope):
        if point.method != FP_METHOD and point.bits not in bits:
            continue
        slot = (point.method, point.bits)
        if slot not in best or _rank_key(point, rank) < _rank_key(best[slot], rank):
            best[slot] = point
    return sorted(best.values(), key=lambda p: (p.bits_per_weight, *p.sort_key()))


# ------------------------------------------------------------------------------------------------- markdown


def _cell(text: Any) -> str:
    """Text safe inside a markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _fmt(stat: Stat | None, metric: _Metric) -> str:
    if stat is None:
        return MISSING
    text = format(stat.mean * metric.scale, metric.fmt)
    if stat.std is not None:
        text += f" ± {format(stat.std * metric.scale, metric.fmt)}"
    return text


def _table(header: Sequence[str], body: Iterable[Sequence[str]], text_columns: int = 1) -> str:
    """A markdown table; the first ``text_columns`` columns are left-aligned, the rest right-aligned."""
    rule = [":---" if i < text_columns else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(_cell(c) for c in line) + " |" for line in (header, rule, *body))


def headline_table(
    rows: Sequence[dict[str, Any]],
    model: str,
    metric_set: str = "samples",
    *,
    bits: Sequence[int] = (2, 3, 4),
    scope: str = "deploy",
) -> str:
    """The headline markdown table of one model: methods and peers at ``bits`` code bits plus fp.

    Each (method, nominal bits) gets one row. When it ran at several granularities the row shows the best one
    by the ranking metric of ``metric_set`` (samples: sample PSNR; probe: t=0 velocity PSNR; fid: FID vs fp;
    weights: relative MSE), ties broken by channel < group < tensor. Rows are sorted by effective bits/weight
    (nominal bits where no weights row succeeded); missing metrics show ``—``.

    Args:
        rows: result rows of any models; rows whose status is not ``"ok"`` are ignored.
        model: the model whose table to render.
        metric_set: which metric set ranks granularities (see above).
        bits: nominal code bits to include.
        scope: ``"deploy"`` or ``"paper"``.

    Returns:
        The markdown table (no caption), or an italic note when the model has no ok rows in ``scope``.

    Raises:
        ValueError: ``metric_set`` has no ranking metric.
    """
    points = _headline_points(rows, model, metric_set, bits, scope)
    if not points:
        return f"_No ok {scope}-scope rows for {model} at {', '.join(map(str, bits))} bits._"
    header = ["Method", "Gran.", "Bits", *(m.label for m in HEADLINE_METRICS)]
    body = [[p.method, p.granularity, str(p.bits), *(_fmt(p.get(m), m) for m in HEADLINE_METRICS)] for p in points]
    return _table(header, body, text_columns=2)


def _parity_section(rows: Sequence[dict[str, Any]], model: str) -> list[str]:
    points = [p for p in _build_points(rows, model, "paper") if p.granularity == "channel" or p.method == FP_METHOD]
    fp = next((p for p in points if p.method == FP_METHOD), None)
    lookup = {(p.method, p.bits): p for p in points if p.method != FP_METHOD}
    families = {p.method: p.family for p in lookup.values()}
    methods = sorted(families, key=lambda m: (_FAMILY_ORDER.get(families[m], 9), m))
    lines = ["### Paper parity (paper scope: every floating tensor quantized; per-channel)", ""]
    if not methods:
        return [*lines, "_No ok paper-scope per-channel rows._", ""]
    header = ["Method", *(f"{b} bits" for b in PARITY_BITS)]
    for metric in PARITY_METRICS:
        fp_stat = fp.get(metric) if fp is not None else None
        caption = f"**{metric.label}** by code bits" + (f" (fp: {_fmt(fp_stat, metric)})" if fp_stat else "") + "."
        body = [[m, *(_fmt(_stat(lookup.get((m, b)), metric), metric) for b in PARITY_BITS)] for m in methods]
        lines += [caption, "", _table(header, body), ""]
    return lines


def _stat(point: _Point | None, metric: _Metric) -> Stat | None:
    return point.get(metric) if point is not None else None


def _grid_section(points: Sequence[_Point]) -> list[str]:
    lines = ["### Full grid (deploy scope)", ""]
    if not points:
        return [*lines, "_No ok deploy-scope rows._", ""]
    header = ["Method", "Family", "Gran.", "Bits", "Seeds", *(m.label for m in GRID_METRICS)]
    body = [
        [p.method, p.family, p.granularity, str(p.bits), str(len(p.seeds)), *(_fmt(p.get(m), m) for m in GRID_METRICS)]
        for p in points
    ]
    return [*lines, _table(header, body, text_columns=3), ""]


# ---------------------------------------------------------------------------------------------- steps sweep


@dataclass
class _StepSeries:
    """Sample PSNR/SSIM against solver steps for one configuration, aggregated over seeds."""

    label: str
    steps: list[int]
    psnr: list[Stat | None]
    ssim: list[Stat | None]


def _steps_points(row: dict[str, Any]) -> list[tuple[int, float | None, float | None]] | None:
    """``(steps, psnr, ssim)`` triples of a steps row, or ``None`` (logged) when its lists do not line up."""
    metrics = row.get("metrics", {})
    lists = [metrics.get(name) for name in ("steps", "psnr", "ssim")]
    if not all(isinstance(values, list) for values in lists) or len({len(values) for values in lists}) != 1:
        logger.warning("steps row %r: steps/psnr/ssim must be lists of one length; skipped", row["key"])
        return None
    return [(int(n), _scalar(p), _scalar(q)) for n, p, q in zip(*lists, strict=True)]


def _step_series(rows: Sequence[dict[str, Any]], model: str) -> list[_StepSeries]:
    """One series per (method, granularity, bits, scope) of the model's ok steps rows, sorted like the grid."""
    # sort key -> steps -> "psnr"/"ssim" -> values over seeds
    groups: dict[tuple[Any, ...], dict[int, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for row in _ok_rows(rows, model):
        triples = _steps_points(row) if row["metric_set"] == "steps" else None
        family, granularity = _FAMILY_ORDER.get(row["family"], 9), _GRANULARITY_ORDER.get(row["granularity"], 9)
        key = (family, row["method"], granularity, row["granularity"], int(row["bits"]), row["scope"])
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
            _StepSeries(
                label=f"{method} {granularity} {bits}-bit ({scope})" if method != FP_METHOD else f"fp ({scope})",
                steps=steps,
                psnr=[_summarize(per_step[n]["psnr"]) if per_step[n]["psnr"] else None for n in steps],
                ssim=[_summarize(per_step[n]["ssim"]) if per_step[n]["ssim"] else None for n in steps],
            )
        )
    return series


def _steps_tables(series: Sequence[_StepSeries]) -> list[str]:
    columns = sorted({s for one in series for s in one.steps})
    lines = []
    for metric, attr in ((SAMPLE_PSNR, "psnr"), (SAMPLE_SSIM, "ssim")):
        body = []
        for one in series:
            by_step = dict(zip(one.steps, getattr(one, attr), strict=True))
            body.append([one.label, *(_fmt(by_step.get(s), metric) for s in columns)])
        header = ["Configuration", *(f"{s} steps" for s in columns)]
        lines += [f"**{metric.label}** by solver steps.", "", _table(header, body), ""]
    return lines


# -------------------------------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib figure on the Agg canvas, without touching pyplot's global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png", metadata={"Software": None})


def _plot_rd(points: Sequence[_Point], metric: _Metric, log_y: bool, title: str, path: Path) -> bool:
    """Metric against effective bits/weight: a line per (method, granularity), a marker series per peer family."""
    import matplotlib

    lines: dict[str, list[_Point]] = defaultdict(list)
    peers: dict[str, list[_Point]] = defaultdict(list)
    fp_stat = None
    for point in points:
        if point.get(metric) is None:
            continue
        if point.method == FP_METHOD:
            fp_stat = point.get(metric)
        elif point.family == "peer":
            peers[point.method.split("-")[0]].append(point)
        else:
            lines[f"{point.method} ({point.granularity})"].append(point)
    if not lines and not peers:
        return False
    figure = _new_figure(7.0, 4.5)
    axes = figure.add_subplot()
    colours = matplotlib.colormaps["tab10"]
    for index, (label, series) in enumerate(lines.items()):
        series = sorted(series, key=lambda p: p.bits_per_weight)
        style = {"color": colours(index % 10), "linestyle": ("-", "--", ":", "-.")[index // 10 % 4]}
        _errorbar(axes, series, metric, label=label, fmt="o", **style)
    for index, (family, series) in enumerate(peers.items()):
        marker = "sDv^<>pP*X"[index % 10]
        _errorbar(axes, series, metric, label=family, color="black", fmt=marker, fillstyle="none")
        for point in series:
            xy = (point.bits_per_weight, point.get(metric).mean * metric.scale)
            axes.annotate(point.method, xy, xytext=(4, 4), textcoords="offset points", fontsize=6)
    if fp_stat is not None:
        axes.axhline(fp_stat.mean * metric.scale, color="grey", linestyle="--", label="fp")
    if log_y:
        axes.set_yscale("log")
    axes.set(xlabel="Effective bits/weight", ylabel=metric.label, title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    _save(figure, path)
    return True


def _errorbar(axes: Any, series: Sequence[_Point], metric: _Metric, **style: Any) -> None:
    stats = [p.get(metric) for p in series]
    axes.errorbar(
        [p.bits_per_weight for p in series],
        [s.mean * metric.scale for s in stats],
        yerr=[(s.std or 0.0) * metric.scale for s in stats],
        capsize=2,
        **style,
    )


def _w2_matrix(rows: Sequence[dict[str, Any]], model: str) -> tuple[list[str], list[str], list[list[float]]]:
    """Per-layer mean W2 of the 3-bit deploy per-channel weights rows: (layers, methods, matrix[layer][method])."""
    selected = sorted(
        (
            r
            for r in _ok_rows(rows, model)
            if r["metric_set"] == "weights"
            and r["scope"] == "deploy"
            and r["granularity"] == "channel"
            and int(r["bits"]) == HEATMAP_BITS
            and r["method"] != FP_METHOD
        ),
        key=lambda r: r["key"],
    )
    layers: list[str] = []
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    families: dict[str, str] = {}
    for row in selected:
        families[row["method"]] = row["family"]
        for layer in row.get("metrics", {}).get("layers") or []:
            value = _scalar(layer.get("w2"))
            if value is None:
                continue
            if layer["name"] not in layers:
                layers.append(layer["name"])
            values[(layer["name"], row["method"])].append(value)
    methods = sorted(families, key=lambda m: (_FAMILY_ORDER.get(families[m], 9), m))
    matrix = [[_summarize(values[(n, m)]).mean if values[(n, m)] else math.nan for m in methods] for n in layers]
    return layers, methods, matrix


def _plot_w2_heatmap(rows: Sequence[dict[str, Any]], model: str, path: Path) -> bool:
    import numpy as np
    from matplotlib.colors import LogNorm

    layers, methods, matrix = _w2_matrix(rows, model)
    data = np.ma.masked_invalid(np.array(matrix, dtype=float) if matrix else np.zeros((0, 0)))
    data = np.ma.masked_less_equal(data, 0.0)  # a log scale cannot show zero distance
    if data.count() == 0:
        return False
    low, high = float(data.min()), float(data.max())
    figure = _new_figure(max(6.0, 3.0 + 0.8 * len(methods)), min(max(3.5, 1.5 + 0.16 * len(layers)), 40.0))
    axes = figure.add_subplot()
    image = axes.imshow(data, aspect="auto", cmap="viridis", norm=LogNorm(vmin=low, vmax=max(high, low * 10)))
    axes.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
    if len(layers) <= 150:  # beyond that the labels overlap into a black bar
        axes.set_yticks(range(len(layers)), layers, fontsize=6)
    axes.set_title(f"{model}\nper-layer W2, {HEATMAP_BITS} bits, deploy scope, per-channel", fontsize=9)
    figure.colorbar(image, ax=axes, label="W2 (log scale)")
    _save(figure, path)
    return True


def _plot_steps(series: Sequence[_StepSeries], title: str, path: Path) -> bool:
    if not series:
        return False
    figure = _new_figure(10.0, 4.0)
    steps = sorted({s for one in series for s in one.steps})
    for index, (metric, attr) in enumerate(((SAMPLE_PSNR, "psnr"), (SAMPLE_SSIM, "ssim"))):
        axes = figure.add_subplot(1, 2, index + 1)
        for one in series:
            pairs = [(s, v) for s, v in zip(one.steps, getattr(one, attr), strict=True) if v is not None]
            axes.plot([s for s, _ in pairs], [v.mean for _, v in pairs], "-o", label=one.label)
        axes.set_xscale("log", base=2)  # step counts are usually doubled from one run to the next
        axes.set_xticks(steps, [str(s) for s in steps])
        axes.set(xlabel="Solver steps", ylabel=metric.label, title=title)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    _save(figure, path)
    return True


# ------------------------------------------------------------------------------------------------- sections


def _status_counts(rows: Sequence[dict[str, Any]]) -> str:
    not_ok: dict[str, int] = defaultdict(int)
    for row in rows:
        if row["status"] != "ok":
            not_ok[row["status"]] += 1
    detail = ", ".join(f"{n} {status}" for status, n in sorted(not_ok.items()))
    total = sum(not_ok.values())
    return f"{len(rows)} rows: {len(rows) - total} ok, {total} not ok" + (f" ({detail})." if detail else ".")


def _failed_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    failed = sorted((r for r in rows if r["status"] != "ok"), key=lambda r: r["key"])
    lines = ["### Rows not ok", ""]
    if not failed:
        return [*lines, "_None._", ""]
    body = []
    for row in failed:
        error = " ".join(str(row.get("error") or MISSING).split())
        if len(error) > _MAX_ERROR_CHARS:
            error = error[:_MAX_ERROR_CHARS] + " …"
        body.append([row["key"], row["status"], error])
    return [*lines, _table(["Key", "Status", "Error"], body, text_columns=3), ""]


def _grid_images(rows: Sequence[dict[str, Any]], model: str, points: Sequence[_Point], output_dir: Path) -> list[str]:
    """Links to the first-seed sample grid of each headline configuration whose PNG exists under output_dir."""
    images = []
    samples = sorted(
        (r for r in _ok_rows(rows, model) if r["metric_set"] == "samples" and r.get("metrics", {}).get("grid")),
        key=lambda r: (int(r["seed"]), r["key"]),
    )
    for point in points:
        match = next(
            (
                r
                for r in samples
                if (r["method"], r["granularity"], int(r["bits"])) == (point.method, point.granularity, point.bits)
                and (r["scope"] == "deploy" or point.method == FP_METHOD)
            ),
            None,
        )
        if match is None:
            continue
        relative = str(match["metrics"]["grid"])
        if not (output_dir / relative).is_file():
            logger.warning("sample grid %s of row %r does not exist; not linked", relative, match["key"])
            continue
        images.append(f"![{point.method} {point.granularity} {point.bits}-bit, seed {match['seed']}]({relative})")
    return images


def _model_section(rows: Sequence[dict[str, Any]], model: str, output_dir: Path) -> list[str]:
    slug = model.replace("/", "-")
    model_rows = [r for r in rows if r["model"] == model]
    lines = [f"## {model}", "", _status_counts(model_rows), ""]
    lines += [
        "### Headline (deploy scope, about 2, 3 and 4 bits/weight)",
        "",
        "Linear/Conv2d weights quantized at 2, 3 and 4 nominal code bits, plus the full-precision model, sorted by "
        "effective bits/weight (all metadata counted). Where a method ran at several granularities the row shows "
        "the one with the best mean sample PSNR; the full grid below lists all of them.",
        "",
        headline_table(rows, model),
        "",
    ]
    lines += _parity_section(rows, model)
    deploy_points = _build_points(rows, model, "deploy")
    lines += _grid_section(deploy_points)
    series = _step_series(rows, model)
    if series:
        lines += ["### Steps sweep", "", *_steps_tables(series)]
        if _plot_steps(series, model, output_dir / "plots" / f"{slug}-steps.png"):
            lines += [f"![{model}: steps sweep](plots/{slug}-steps.png)", ""]
    lines += _failed_section(model_rows)
    lines += ["### Plots (deploy scope)", ""]
    for name, metric, log_y in RD_PLOTS:
        file = f"plots/{slug}-rd-{name}.png"
        if _plot_rd(deploy_points, metric, log_y, f"{model}: {metric.label}", output_dir / file):
            lines += [f"![{model}: {metric.label} vs bits/weight]({file})", ""]
    if _plot_w2_heatmap(rows, model, output_dir / "plots" / f"{slug}-w2-heatmap.png"):
        lines += [f"![{model}: per-layer W2 at {HEATMAP_BITS} bits](plots/{slug}-w2-heatmap.png)", ""]
    images = _grid_images(rows, model, _headline_points(rows, model, "samples", (2, 3, 4), "deploy"), output_dir)
    if images:
        lines += ["### Sample grids (headline configurations, first seed)", "", *(f"{i}\n" for i in images)]
    return lines


# ------------------------------------------------------------------------------------------------------ csv


def _flatten(metrics: dict[str, Any], prefix: str = "metrics.") -> dict[str, Any]:
    """Scalar metrics as ``metrics.<name>`` (nested objects joined by dots); lists are left out."""
    flat: dict[str, Any] = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        elif isinstance(value, (str, int, float, bool)):
            flat[f"{prefix}{name}"] = value
    return flat


def _write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One line per row, sorted by key; newlines inside strings become spaces so each row is one line."""
    records = []
    for row in sorted(rows, key=lambda r: r["key"]):
        record = {name: row.get(name, "") for name in _CSV_IDENTITY}
        record.update(_flatten(row.get("metrics", {})))
        records.append({k: re.sub(r"\s*[\r\n]+\s*", " ", v) if isinstance(v, str) else v for k, v in record.items()})
    metric_columns = sorted({k for record in records for k in record} - set(_CSV_IDENTITY))
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*_CSV_IDENTITY, *metric_columns], lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)


# ----------------------------------------------------------------------------------------------------- main


def write_report(
    rows: list[dict[str, Any]], output_dir: Path, *, command: str, title: str = "Evaluation report"
) -> Path:
    """Write ``report.md``, ``results.csv`` and ``plots/*.png`` for ``rows`` into ``output_dir``.

    The report has one section per model (sorted by name): headline table, paper-parity tables, full deploy
    grid, steps sweep, rows that are not ok, then rate–distortion plots and the per-layer W2 heatmap, all
    linked relative to ``output_dir``. Output is identical for any order of ``rows``.

    Args:
        rows: result rows (e.g. from :func:`load_rows`); keys must be unique.
        output_dir: created if needed; existing files of the same names are overwritten.
        command: the command line that produced the rows, quoted verbatim at the top.
        title: the report's first heading.

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: a row lacks a required field or two rows share a key.
    """
    _validate(rows)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "Produced by:", "", "```bash", command, "```", "", _status_counts(rows), ""]
    lines += [
        f"Metrics over several seeds read `mean ± std` (sample standard deviation); `{MISSING}` marks a metric "
        "that was not measured or whose row is not ok. Class accuracy is in percent, sizes in KiB.",
        "",
    ]
    for model in sorted({r["model"] for r in rows}):
        lines += _model_section(rows, model, output_dir)
    report = output_dir / "report.md"
    report.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    _write_csv(rows, output_dir / "results.csv")
    logger.info("wrote %s (%d rows, %s)", report, len(rows), _status_counts(rows))
    return report
