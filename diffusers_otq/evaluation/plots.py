"""PNG plots of the evaluation report: rate–distortion curves, the per-layer W2 heatmap and the steps sweep.

Every function draws on a fresh matplotlib :class:`~matplotlib.figure.Figure` with its own Agg canvas (pyplot's
global backend and state are never touched), writes one PNG without the ``Software`` metadata entry, and returns
whether it wrote the file: ``False`` when there is nothing to plot, so the caller links only existing plots.
Output bytes depend only on the inputs. matplotlib is imported on first use.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from diffusers_otq.evaluation.rows import (
    FAMILY_ORDER,
    FP_METHOD,
    MIXED,
    SAMPLE_PSNR,
    SAMPLE_SSIM,
    Metric,
    Point,
    StepSeries,
    ok_rows,
    row_bits,
    scalar,
    summarize,
)


__all__ = [
    "HEATMAP_BITS",
    "DemoPoint",
    "plot_demo",
    "plot_rate_distortion",
    "plot_steps",
    "plot_w2_heatmap",
    "w2_matrix",
]

HEATMAP_BITS = 3


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


def plot_rate_distortion(
    points: Sequence[Point], metric: Metric, *, log_y: bool, title: str, path: Path, max_bits: int | None = None
) -> bool:
    """Plot ``metric`` against effective bits/weight.

    One line per (method, granularity) of our and the paper's methods (mixed-precision budgets are a line of
    their own per method, square markers), one marker series per peer library (method name up to the first
    ``-``, each point annotated with its method), fp as a dashed horizontal line. Error bars show the standard
    deviation over seeds.

    Args:
        points: configurations of one model and scope (e.g. from :func:`~diffusers_otq.evaluation.rows.build_points`).
        metric: the y-axis metric; points without it are left out.
        log_y: use a logarithmic y axis.
        title: the axes' title.
        path: the PNG to write (parent folders are created).
        max_bits: leave out configurations of more nominal code bits (a zoom on the low-bit end); a bits/weight
            budget ``b`` counts as ``floor(b)`` code bits, as in the headline table.

    Returns:
        Whether the PNG was written: ``False`` when no non-fp point has the metric.
    """
    import matplotlib

    lines: dict[str, list[Point]] = defaultdict(list)
    peers: dict[str, list[Point]] = defaultdict(list)
    fp_stat = None
    for point in points:
        if point.get(metric) is None:
            continue
        nominal = math.floor(point.bits) if point.granularity == MIXED else point.bits
        if max_bits is not None and point.method != FP_METHOD and nominal > max_bits:
            continue
        if point.method == FP_METHOD:
            fp_stat = point.get(metric)
        elif point.family == "peer":
            peers[point.method.split("-")[0]].append(point)
        else:
            lines[f"{point.method} ({point.granularity})"].append(point)
    if not lines and not peers:
        return False
    figure = _new_figure(8.5, 4.5)
    axes = figure.add_subplot()
    colours = matplotlib.colormaps["tab10"]
    for index, (label, series) in enumerate(lines.items()):
        series = sorted(series, key=lambda p: p.bits_per_weight)
        style = {"color": colours(index % 10), "linestyle": ("-", "--", ":", "-.")[index // 10 % 4]}
        marker = "s" if series[0].granularity == MIXED else "o"
        _errorbar(axes, series, metric, label=label, fmt=marker, **style)
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
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the low-bit end is crowded
    _save(figure, path)
    return True


class DemoPoint(NamedTuple):
    """One variant of the demo's rate-distortion plot: ``series`` groups points into a line (ours) or a marker
    series (a peer library); ``label`` annotates peer points."""

    series: str
    label: str
    bits_per_weight: float
    psnr: float
    line: bool


def plot_demo(panels: dict[str, Sequence[DemoPoint]], path: Path) -> bool:
    """Sample PSNR against bits/weight, one panel per model: lines for our series, open markers per peer library.

    Args:
        panels: model name -> its points (the float model is left out: its PSNR is infinite).
        path: the PNG to write.

    Returns:
        Whether the PNG was written (``False`` without any finite point).
    """
    import matplotlib

    panels = {name: [p for p in points if math.isfinite(p.psnr)] for name, points in panels.items()}
    panels = {name: points for name, points in panels.items() if points}
    if not panels:
        return False
    figure = _new_figure(5.2 * len(panels) + 1.6, 4.2)
    colours = matplotlib.colormaps["tab10"]
    series_names = list(dict.fromkeys(p.series for points in panels.values() for p in points))
    for index, (name, points) in enumerate(panels.items()):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for number, series in enumerate(series_names):
            chosen = sorted((p for p in points if p.series == series), key=lambda p: p.bits_per_weight)
            if not chosen:
                continue
            xs, ys = [p.bits_per_weight for p in chosen], [p.psnr for p in chosen]
            if chosen[0].line:
                axes.plot(xs, ys, marker="o", color=colours(number % 10), label=series, linewidth=2)
            else:
                marker = "sDv^<>pP*X"[number % 10]
                axes.plot(xs, ys, linestyle="none", marker=marker, fillstyle="none", color="black", label=series)
                for p in chosen:
                    axes.annotate(p.label, (p.bits_per_weight, p.psnr), xytext=(3, 3), textcoords="offset points",
                                  fontsize=6)  # fmt: skip
        axes.set(xlabel="bits/weight (every stored bit)", ylabel="sample PSNR vs float32 (dB)", title=name)
        axes.grid(alpha=0.3)
    handles, labels = figure.axes[-1].get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    for axes in figure.axes[:-1]:
        for handle, label in zip(*axes.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    figure.axes[-1].legend(seen.values(), seen.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(figure, path)
    return True


def _errorbar(axes: Any, series: Sequence[Point], metric: Metric, **style: Any) -> None:
    stats = [p.get(metric) for p in series]
    axes.errorbar(
        [p.bits_per_weight for p in series],
        [s.mean * metric.scale for s in stats],
        yerr=[(s.std or 0.0) * metric.scale for s in stats],
        capsize=2,
        **style,
    )


def w2_matrix(rows: Sequence[dict[str, Any]], model: str) -> tuple[list[str], list[str], list[list[float]]]:
    """Per-layer mean W2 of ``model``'s ok :data:`HEATMAP_BITS`-bit deploy-scope per-channel weights rows.

    Args:
        rows: result rows of any models and statuses; a weights row lists its layers under ``metrics["layers"]``.
        model: the model to tabulate.

    Returns:
        ``(layers, methods, matrix)``: layers in order of first appearance (rows sorted by key), methods by family
        then name, and ``matrix[layer][method]`` the mean W2 over seeds (NaN where none was reported).
    """
    selected = sorted(
        (
            r
            for r in ok_rows(rows, model)
            if r["metric_set"] == "weights"
            and r["scope"] == "deploy"
            and r["granularity"] == "channel"
            and row_bits(r) == HEATMAP_BITS
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
            value = scalar(layer.get("w2"))
            if value is None:
                continue
            if layer["name"] not in layers:
                layers.append(layer["name"])
            values[(layer["name"], row["method"])].append(value)
    methods = sorted(families, key=lambda m: (FAMILY_ORDER.get(families[m], 9), m))
    matrix = [[summarize(values[(n, m)]).mean if values[(n, m)] else math.nan for m in methods] for n in layers]
    return layers, methods, matrix


def plot_w2_heatmap(rows: Sequence[dict[str, Any]], model: str, path: Path) -> bool:
    """Plot the :func:`w2_matrix` of ``model`` as a layers × methods heatmap on a log colour scale.

    Args:
        rows: result rows of any models and statuses.
        model: the model to plot; it also heads the title.
        path: the PNG to write (parent folders are created).

    Returns:
        Whether the PNG was written: ``False`` when no positive, finite W2 was reported.
    """
    import numpy as np
    from matplotlib.colors import LogNorm

    layers, methods, matrix = w2_matrix(rows, model)
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


def plot_steps(series: Sequence[StepSeries], title: str, path: Path) -> bool:
    """Plot sample PSNR and SSIM against solver steps (log2 x axis), one line per configuration.

    Args:
        series: one entry per configuration; steps without a value are skipped.
        title: title of both panels.
        path: the PNG to write (parent folders are created).

    Returns:
        Whether the PNG was written: ``False`` when ``series`` is empty.
    """
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
