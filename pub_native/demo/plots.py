"""Figures of the demo and the benchmarks (matplotlib, imported only when a figure is drawn).

Demo layer. Every comparison is drawn as differences from LS with their 95% intervals around a
zero line, so that a tie looks like a tie whatever the axis range; every method has its own
color, marker and line style.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .methods import METHODS  # noqa: E402

__all__ = ["difference_and_cost_figure", "forest_panel", "lines_panel", "method_style"]

_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "h", "*", "p")
_LINES = ("-", "--", "-.", ":")
_SERIES = (("tab:blue", "o"), ("tab:orange", "s"), ("tab:green", "^"), ("tab:red", "D"))


def method_style(key: str) -> dict:
    """A distinct color, marker and line style per method (stable across figures)."""
    i = list(METHODS).index(key) if key in METHODS else len(METHODS)
    cmap = plt.get_cmap("tab20")
    return {"color": cmap((2 * i) % 20 + (i // 10)), "marker": _MARKERS[i % len(_MARKERS)],
            "linestyle": _LINES[i % len(_LINES)]}


def forest_panel(ax, labels: list[str], series: list[tuple[str, list[dict | None]]],
                 xlabel: str) -> None:
    """Rows = methods (``labels``), one point with a 95% interval per series (e.g. per task);
    each entry a :func:`pub_native.demo.stats.paired_difference` dict or None (drawn as a
    reference row)."""
    n_series = len(series)
    offsets = [(j - (n_series - 1) / 2) * 0.22 for j in range(n_series)]
    for j, (name, diffs) in enumerate(series):
        color, marker = _SERIES[j % len(_SERIES)]
        ys, xs, lo, hi = [], [], [], []
        for i, d in enumerate(diffs):
            if d is None:
                continue
            ys.append(i + offsets[j])
            xs.append(d["mean"])
            half = d["half_width"] if math.isfinite(d["half_width"]) else 0.0
            lo.append(half)
            hi.append(half)
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt=marker, color=color, capsize=3, ms=5,
                    label=name, lw=1.2)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def difference_and_cost_figure(panels: list[tuple[str, list[dict]]], tasks: list[str],
                               title: str, path: Path) -> str:
    """One row per model: the test-AUC difference from LS per task and on the average (95%
    intervals over seeds), and the cost per step relative to LS."""
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, 0.45 * max(len(r) for _, r in panels)
                                                        * len(panels) + 2.2),
                             squeeze=False, gridspec_kw={"width_ratios": [3, 1]})
    for (model, rows), (ax_d, ax_c) in zip(panels, axes, strict=True):
        labels = []
        for r in rows:
            if r["diff_vs_ls"] is None:
                means = " / ".join(f"{m:.4f}" for m in r["task_auc_mean"])
                labels.append(f"{r['label']} (AUC {means})")
            else:
                labels.append(r["label"])
        series = []
        for k, task in enumerate(tasks):
            series.append((task, [None if r["diff_vs_ls"] is None else r["diff_vs_ls"]["tasks"][k]
                                  for r in rows]))
        series.append(("average", [None if r["diff_vs_ls"] is None else r["diff_vs_ls"]["avg"]
                                   for r in rows]))
        forest_panel(ax_d, labels, series,
                     "test AUC − LS's (same seed); bars: 95% interval over seeds")
        ax_d.set_title(f"{model}: difference from LS per task", fontsize=10)
        ratios = [r["overhead_vs_ls"] or math.nan for r in rows]
        colors = [method_style(r["method"])["color"] for r in rows]
        ax_c.barh(range(len(rows)), ratios, color=colors)
        for i, (ratio, r) in enumerate(zip(ratios, rows, strict=True)):
            if math.isfinite(ratio):
                ax_c.text(ratio, i, f" {ratio:.2f}x ({r['step_ms']:.1f} ms)", va="center",
                          fontsize=7)
        ax_c.axvline(1.0, color="k", lw=0.8)
        ax_c.set_yticks(range(len(rows)), [r["label"] for r in rows])
        ax_c.invert_yaxis()
        finite = [x for x in ratios if math.isfinite(x)]
        ax_c.set_xlim(0, 1.45 * max(finite, default=1.0))
        ax_c.set_xlabel("time per step / LS's")
        ax_c.set_title(f"{model}: cost per step", fontsize=10)
        ax_c.grid(axis="x", alpha=0.3)
    save_figure(fig, title, path)
    return str(path)


def save_figure(fig, title: str, path, dpi: int = 110) -> None:
    """Title a figure, lay it out, write it to ``path`` and free it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def lines_panel(ax, xs: list, series: dict, *, key: str = "mean", half: str = "half_width",
                log_x: bool = False, xlabel: str = "", ylabel: str = "") -> None:
    """One line per method over ``xs``: ``series[method]`` holds, per x, a
    :func:`pub_native.demo.stats.paired_difference` dict (or None); points at ``d[key]`` with
    error bars ± ``d[half]``, nudged sideways so that the intervals do not hide each other."""
    n = len(series)
    positions = list(range(len(xs)))
    for j, (method, diffs) in enumerate(series.items()):
        style = method_style(method)
        shift = (j - (n - 1) / 2) * (0.6 / max(n, 1))
        px, py, err = [], [], []
        for pos, d in zip(positions, diffs, strict=True):
            if d is None:
                continue
            px.append(pos + shift)
            py.append(d[key])
            h = d.get(half, math.nan)
            err.append(h if math.isfinite(h) else 0.0)
        ax.errorbar(px, py, yerr=err, label=METHODS.get(method, method), capsize=2, ms=5,
                    lw=1.0, elinewidth=0.8, **style)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(positions, [f"{x:g}" for x in xs])
    ax.set_xlabel(xlabel + (" (log scale)" if log_x else ""))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
