"""Markdown report, flat CSV and PNG plots from the evaluation harness's JSONL result rows.

The harness appends one JSON object per line (fields in :data:`REQUIRED_FIELDS`, metrics under ``"metrics"``).
:func:`write_report` turns a list of such rows into ``report.md``, ``results.csv`` and ``plots/*.png`` inside one
output directory; :func:`headline_table` renders the per-model summary table alone (e.g. for a model card).

A row's ``bits`` is the code width, or for granularity ``"mixed"`` (per-layer bits chosen by the allocator) the
bits/weight budget as a float; tables show a budget as ``budget 2.5``. Calibrated methods (``ot-vp+aw``,
``ot-vp+ef``, ``ot-vp+cal``) also get a per-model ablation table against data-free ``ot-vp``.

Rows that differ only in ``seed`` form one *configuration*; its metrics are shown as ``mean ± std`` with the
sample standard deviation (``n - 1`` denominator) when several seeds succeeded, else as the single value. Only
rows with ``status == "ok"`` contribute numbers; every other row is listed with its error. The output depends
on the set of rows only, never on their order. Rows are aggregated by :mod:`~diffusers_otq.evaluation.rows`
and plotted by :mod:`~diffusers_otq.evaluation.plots`; this module writes the tables, markdown and CSV.

>>> row = {"key": "m|ot|channel|3|deploy|samples|0", "model": "m", "method": "ot", "family": "otq",
...        "granularity": "channel", "bits": 3, "scope": "deploy", "metric_set": "samples", "seed": 0,
...        "status": "ok", "metrics": {"psnr": 30.0, "ssim": 0.9}}
>>> print(headline_table([row], "m").splitlines()[2])
| ot | channel | 3 | — | — | 30.00 | 0.9000 | — | — | — | — | — | — | — | — |
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from diffusers_otq.evaluation.plots import HEATMAP_BITS, plot_rate_distortion, plot_steps, plot_w2_heatmap
from diffusers_otq.evaluation.rows import (
    ABLATION_METHODS,
    BPW,
    CALIB_TIME,
    CLASS_ACC,
    CLASS_ACC_PLAIN,
    CLASS_AGREE,
    CLASS_AGREE_PLAIN,
    FAMILY_ORDER,
    FID_FP,
    FID_TEST,
    FP_METHOD,
    GRANULARITY_ORDER,
    LATENT_COSINE,
    MIXED,
    PCA_COLLAPSED,
    PCA_MEAN_VAR,
    QUANT_TIME,
    REL_MSE,
    SAMPLE_PSNR,
    SAMPLE_SSIM,
    SIZE,
    VEL_PSNR,
    VEL_SSIM,
    W2,
    Metric,
    Point,
    Stat,
    StepSeries,
    build_points,
    format_bits,
    ok_rows,
    row_bits,
    step_series,
)
from diffusers_otq.evaluation.store import read_jsonl


__all__ = [
    "REQUIRED_FIELDS",
    "Stat",
    "ablation_table",
    "headline_points",
    "headline_table",
    "load_rows",
    "plans_table",
    "write_report",
]

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("key", "model", "method", "family", "granularity", "bits", "scope", "metric_set", "seed", "status")
MISSING = "—"
PARITY_BITS = tuple(range(2, 9))  # the paper's tables run from 2 to 8 code bits
_CSV_IDENTITY = (*REQUIRED_FIELDS, "error", "elapsed_s")
_MAX_ERROR_CHARS = 400  # keeps a traceback-sized error from swamping the failed-rows table

HEADLINE_METRICS = (BPW, SIZE, SAMPLE_PSNR, SAMPLE_SSIM, CLASS_AGREE, CLASS_AGREE_PLAIN, CLASS_ACC, CLASS_ACC_PLAIN,
                    FID_FP, FID_TEST, VEL_PSNR, QUANT_TIME)  # fmt: skip
GRID_METRICS = (BPW, REL_MSE, W2, VEL_PSNR, SAMPLE_PSNR, SAMPLE_SSIM, CLASS_ACC)
ABLATION_METRICS = (BPW, SAMPLE_PSNR, CLASS_AGREE, CLASS_AGREE_PLAIN, CLASS_ACC, FID_FP, VEL_PSNR, CALIB_TIME,
                    QUANT_TIME)  # fmt: skip
PARITY_METRICS = (VEL_PSNR, VEL_SSIM, PCA_MEAN_VAR, PCA_COLLAPSED, LATENT_COSINE)
RD_PLOTS = (  # (file-name part, metric, log y axis, largest nominal code bits plotted or None for all)
    ("sample-psnr-2-4bit", SAMPLE_PSNR, False, 4),  # the headline region, where the methods differ
    ("fid-vs-fp", FID_FP, False, None),
    ("sample-psnr", SAMPLE_PSNR, False, None),
    ("sample-ssim", SAMPLE_SSIM, False, None),
    ("velocity-psnr", VEL_PSNR, False, None),
    ("rel-mse", REL_MSE, True, None),
    ("class-accuracy", CLASS_ACC, False, None),
    ("class-agreement", CLASS_AGREE, False, None),
)
# The metric that picks a method's granularity in the headline table, keyed by headline_table's metric_set.
_RANK_METRICS = {"samples": SAMPLE_PSNR, "probe": VEL_PSNR, "fid": FID_FP, "weights": REL_MSE}


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

    Parsing is :func:`~diffusers_otq.evaluation.store.read_jsonl`'s: blank lines are skipped and an unfinished
    last line (no newline, not valid JSON: a writer killed mid-row) is dropped. Each row must then be a result row.

    Args:
        path: the JSONL file the harness appends to.

    Returns:
        The rows in file order (a replaced row takes the position of its replacement).

    Raises:
        ValueError: a line is not valid JSON or not a JSON object (the message names ``path:line``), or a row is
            not a result row (the message names the file and the row's number, counted from 1 without blank lines).
    """
    rows: dict[str, dict[str, Any]] = {}
    for number, row in enumerate(read_jsonl(path), start=1):
        problem = _row_problem(row)
        if problem is not None:
            raise ValueError(f"{path}, row {number}: {problem}.")
        if row["key"] in rows:
            logger.warning("%s, row %d: key %r repeats an earlier row; keeping this one", path, number, row["key"])
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


# ---------------------------------------------------------------------------------------------- aggregation


def _rank_key(point: Point, metric: Metric) -> tuple[Any, ...]:
    """Smaller is better: points that have the metric first, then by its mean, then by granularity."""
    granularity = (GRANULARITY_ORDER.get(point.granularity, 9), point.granularity)
    stat = point.get(metric)
    if stat is None:
        return (1, 0.0, *granularity)
    return (0, stat.mean if metric.lower_is_better else -stat.mean, *granularity)


def _in_headline(point: Point, bits: Sequence[int]) -> bool:
    """fp always; a code width when it is in ``bits``; a budget ``b`` when ``floor(b)`` is (2.0-2.9 count as 2)."""
    if point.method == FP_METHOD:
        return True
    if point.granularity == MIXED:
        return math.floor(point.bits) in bits
    return point.bits in bits


def headline_points(
    rows: Sequence[dict[str, Any]], model: str, metric_set: str, bits: Sequence[int], scope: str
) -> list[Point]:
    """One :class:`Point` per (method, nominal bits in ``bits``) of ``model`` in ``scope``, plus fp.

    Where a method ran at several granularities the one best by ``metric_set``'s ranking metric is kept (see
    :func:`headline_table`). Mixed-precision points keep one row per budget; a budget ``b`` belongs to the
    nominal bits ``floor(b)``. Sorted by effective bits/weight, then family, method and granularity.

    Raises:
        ValueError: ``metric_set`` has no ranking metric.
    """
    if metric_set not in _RANK_METRICS:
        raise ValueError(f"metric_set must be one of {sorted(_RANK_METRICS)}, got {metric_set!r}.")
    rank = _RANK_METRICS[metric_set]
    best: dict[tuple[str, int | float, bool], Point] = {}
    for point in build_points(rows, model, scope):
        if not _in_headline(point, bits):
            continue
        slot = (point.method, point.bits, point.granularity == MIXED)  # a budget never competes with a code width
        if slot not in best or _rank_key(point, rank) < _rank_key(best[slot], rank):
            best[slot] = point
    return sorted(best.values(), key=lambda p: (p.bits_per_weight, *p.sort_key()))


# ------------------------------------------------------------------------------------------------- markdown


def _cell(text: Any) -> str:
    """Text safe inside a markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def format_mean_std(mean: float, std: float | None, fmt: str) -> str:
    """``"mean ± std"`` with both numbers in ``fmt`` (a format spec such as ``".2f"``); just the mean if no std."""
    text = format(mean, fmt)
    return text if std is None else f"{text} ± {format(std, fmt)}"


def _fmt(stat: Stat | None, metric: Metric) -> str:
    if stat is None:
        return MISSING
    std = None if stat.std is None else stat.std * metric.scale
    return format_mean_std(stat.mean * metric.scale, std, metric.fmt)


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
    weights: relative MSE), ties broken by channel < group < tensor. Mixed-precision variants get one row per
    bits/weight budget ``b`` with ``floor(b)`` in ``bits`` (``Bits`` reads ``budget b``). Rows are sorted by
    effective bits/weight (nominal bits where no weights row succeeded); missing metrics show ``—``.

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
    points = headline_points(rows, model, metric_set, bits, scope)
    if not points:
        return f"_No ok {scope}-scope rows for {model} at {', '.join(map(str, bits))} bits._"
    header = ["Method", "Gran.", "Bits", *(m.label for m in HEADLINE_METRICS)]
    body = [
        [p.method, p.granularity, format_bits(p.granularity, p.bits), *(_fmt(p.get(m), m) for m in HEADLINE_METRICS)]
        for p in points
    ]
    return _table(header, body, text_columns=2)


def _ablation_points(points: Sequence[Point]) -> list[Point]:
    """The ablation's rows: per (granularity, code bits) where a calibrated method ran, data-free ``ot-vp`` and its
    calibrated fits in :data:`~.rows.ABLATION_METHODS` order; then every mixed-precision point by budget."""
    order = {method: i for i, method in enumerate(ABLATION_METHODS)}
    calibrated = set(ABLATION_METHODS[1:])
    cells = {(p.granularity, p.bits) for p in points if p.method in calibrated and p.granularity != MIXED}
    fixed = [p for p in points if p.method in order and (p.granularity, p.bits) in cells]
    mixed = [p for p in points if p.granularity == MIXED]

    def key(p: Point) -> tuple[Any, ...]:
        return (
            GRANULARITY_ORDER.get(p.granularity, 9),
            p.granularity,
            p.bits,
            order.get(p.method, len(order)),
            p.method,
        )

    return sorted(fixed, key=key) + sorted(mixed, key=key)


def ablation_table(rows: Sequence[dict[str, Any]], model: str, scope: str = "deploy") -> str | None:
    """The calibration ablation of one model: data-free ``ot-vp`` → ``+aw`` → ``+ef`` → ``+cal``, then budgets.

    For each (granularity, code bits) where a calibrated method ran, one row per method of
    :data:`~.rows.ABLATION_METHODS` that ran there (data-free first), then one row per mixed-precision
    (method, budget). Columns: effective bits/weight, sample PSNR, class accuracy, FID vs fp, t=0 velocity
    PSNR, calibration seconds (the model's statistics, collected once and shared by its calibrated variants) and
    quantization seconds (the fit, bits allocation included); missing metrics show ``—``.

    Args:
        rows: result rows of any models; rows whose status is not ``"ok"`` are ignored.
        model: the model whose table to render.
        scope: the scope of the rows (calibrated and mixed variants exist in ``"deploy"`` only).

    Returns:
        The markdown table, or ``None`` when ``model`` has no calibrated or mixed-precision point.
    """
    points = _ablation_points(build_points(rows, model, scope))
    if not points:
        return None
    header = ["Method", "Gran.", "Bits", *(m.label for m in ABLATION_METRICS)]
    body = [
        [p.method, p.granularity, format_bits(p.granularity, p.bits), *(_fmt(p.get(m), m) for m in ABLATION_METRICS)]
        for p in points
    ]
    return _table(header, body, text_columns=2)


def plans_table(rows: Sequence[dict[str, Any]], model: str, scope: str = "deploy") -> str | None:
    """The bits plans of ``model``'s mixed-precision variants: budget, reached bits/weight, the sensitivity the
    allocator used, and how many layers got each setting (from the weights rows' ``plan``).

    Returns:
        The markdown table (one row per method and budget), or ``None`` when no ok weights row has a plan.
    """
    plans = {
        (r["method"], row_bits(r)): r["metrics"]["plan"]
        for r in ok_rows(rows, model)
        if r["granularity"] == MIXED
        and r["scope"] == scope
        and r["metric_set"] == "weights"
        and isinstance(r.get("metrics", {}).get("plan"), dict)
    }
    if not plans:
        return None
    body = []
    for (method, budget), plan in sorted(plans.items(), key=lambda item: (item[0][1], item[0][0])):
        layers = plan.get("layers") or {}
        settings = ", ".join(f"{label} ×{count}" for label, count in sorted(layers.items()))
        reached = plan.get("reached")
        body.append(
            [
                method,
                format(budget, "g"),
                MISSING if reached is None else format(reached, ".3f"),
                str(plan.get("sensitivity", MISSING)),
                settings or MISSING,
            ]
        )
    return _table(["Method", "Budget", "Reached", "Sensitivity", "Layers per setting"], body, text_columns=5)


def _ablation_section(rows: Sequence[dict[str, Any]], model: str) -> list[str]:
    """The calibration ablation and the mixed-precision plans; nothing when the model has neither."""
    table = ablation_table(rows, model)
    if table is None:
        return []
    lines = [
        "### Calibration ablation (deploy scope)",
        "",
        "Data-free `ot-vp`, then fitted on the model's calibration statistics: activation-weighted codebooks "
        "(`ot-vp+aw`), plus GPTQ-style error feedback (`ot-vp+ef`), plus bias correction (`ot-vp+cal`, the full "
        "calibration), plus refinement of codebooks, scales and biases against the full-precision velocity with "
        "the codes frozen (`ot-vp+ref`; its time is part of the quantization time), plus a second set of "
        "codebooks over the same codes refined on the other half of the timesteps (`ot-vp+bands`: codebooks per "
        "noise-level band, both sets counted), or `ot-vp+ref` refined twice as long against four times the "
        "teacher trajectories (`ot-vp+ref+t128`: 1200 steps, 128 trajectories), at each granularity and code "
        "width a calibrated variant ran; then "
        "the `mixed` variants, "
        "whose per-layer bits and granularity are allocated under a bits/weight budget (data-free for `ot-vp`, "
        "from the statistics for the calibrated methods). Calibration time is the one-off collection of the "
        "model's statistics (shared by all its calibrated variants); quantization time is the fit, bits "
        "allocation included.",
        "",
        table,
        "",
    ]
    plans = plans_table(rows, model)
    if plans is not None:
        lines += ["**Bits plans** of the mixed-precision variants (layers per setting).", "", plans, ""]
    return lines


def _parity_section(rows: Sequence[dict[str, Any]], model: str) -> list[str]:
    points = [p for p in build_points(rows, model, "paper") if p.granularity == "channel" or p.method == FP_METHOD]
    fp = next((p for p in points if p.method == FP_METHOD), None)
    lookup = {(p.method, p.bits): p for p in points if p.method != FP_METHOD}
    families = {p.method: p.family for p in lookup.values()}
    methods = sorted(families, key=lambda m: (FAMILY_ORDER.get(families[m], 9), m))
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


def _stat(point: Point | None, metric: Metric) -> Stat | None:
    return point.get(metric) if point is not None else None


def _grid_section(points: Sequence[Point]) -> list[str]:
    lines = ["### Full grid (deploy scope)", ""]
    if not points:
        return [*lines, "_No ok deploy-scope rows._", ""]
    header = ["Method", "Family", "Gran.", "Bits", "Seeds", *(m.label for m in GRID_METRICS)]
    body = [
        [
            p.method,
            p.family,
            p.granularity,
            format_bits(p.granularity, p.bits),
            str(len(p.seeds)),
            *(_fmt(p.get(m), m) for m in GRID_METRICS),
        ]
        for p in points
    ]
    return [*lines, _table(header, body, text_columns=3), ""]


def _steps_tables(series: Sequence[StepSeries]) -> list[str]:
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


def _grid_images(rows: Sequence[dict[str, Any]], model: str, points: Sequence[Point], output_dir: Path) -> list[str]:
    """Links to the first-seed sample grid of each headline configuration whose PNG exists under output_dir."""
    images = []
    samples = sorted(
        (r for r in ok_rows(rows, model) if r["metric_set"] == "samples" and r.get("metrics", {}).get("grid")),
        key=lambda r: (int(r["seed"]), r["key"]),
    )
    for point in points:
        match = next(
            (
                r
                for r in samples
                if (r["method"], r["granularity"], row_bits(r)) == (point.method, point.granularity, point.bits)
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
        bits = format_bits(point.granularity, point.bits) + ("" if point.granularity == MIXED else "-bit")
        images.append(f"![{point.method} {point.granularity} {bits}, seed {match['seed']}]({relative})")
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
    lines += _ablation_section(rows, model)
    lines += _parity_section(rows, model)
    deploy_points = build_points(rows, model, "deploy")
    lines += _grid_section(deploy_points)
    series = step_series(rows, model)
    if series:
        lines += ["### Steps sweep", "", *_steps_tables(series)]
        if plot_steps(series, model, output_dir / "plots" / f"{slug}-steps.png"):
            lines += [f"![{model}: steps sweep](plots/{slug}-steps.png)", ""]
    lines += _failed_section(model_rows)
    lines += ["### Plots (deploy scope)", ""]
    for name, metric, log_y, max_bits in RD_PLOTS:
        file = f"plots/{slug}-rd-{name}.png"
        zoom = f", {max_bits} code bits or fewer" if max_bits else ""
        title = f"{model}: {metric.label}{zoom}"
        if plot_rate_distortion(
            deploy_points, metric, log_y=log_y, title=title, path=output_dir / file, max_bits=max_bits
        ):
            lines += [f"![{model}: {metric.label} vs bits/weight{zoom}]({file})", ""]
    if plot_w2_heatmap(rows, model, output_dir / "plots" / f"{slug}-w2-heatmap.png"):
        lines += [f"![{model}: per-layer W2 at {HEATMAP_BITS} bits](plots/{slug}-w2-heatmap.png)", ""]
    images = _grid_images(rows, model, headline_points(rows, model, "samples", (2, 3, 4), "deploy"), output_dir)
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
    rows: list[dict[str, Any]],
    output_dir: Path,
    *,
    command: str,
    title: str = "Evaluation report",
    notes: Sequence[str] = (),
) -> Path:
    """Write ``report.md``, ``results.csv`` and ``plots/*.png`` for ``rows`` into ``output_dir``.

    The report has one section per model (sorted by name): headline table, calibration ablation (when
    calibrated or mixed-precision rows exist), paper-parity tables, full deploy grid, steps sweep, rows that
    are not ok, then rate–distortion plots and the per-layer W2 heatmap, all linked relative to
    ``output_dir``. Output is identical for any order of ``rows``.

    Args:
        rows: result rows (e.g. from :func:`load_rows`); keys must be unique.
        output_dir: created if needed; existing files of the same names are overwritten.
        command: the command line that produced the rows, quoted verbatim at the top.
        title: the report's first heading.
        notes: paragraphs shown under the row counts (e.g. which cells of the config are still missing).

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: a row lacks a required field or two rows share a key.
    """
    _validate(rows)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "Produced by:", "", "```bash", command, "```", "", _status_counts(rows), ""]
    lines += [line for note in notes for line in (note, "")]
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
