"""Statistics of the demo and the benchmarks: mean ± std over seeds and each method's paired
difference from LS with a 95% t-interval.

Demo layer; numpy only (scipy is not a dependency: the t quantile is tabled and, past the table,
computed by the Cornish–Fisher expansion).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["compare_to_baseline", "mean_std", "paired_difference", "t_quantile_975"]

# Two-sided 95% critical values t_{0.975, df} of Student's t for df = 1..30 (standard tables;
# e.g. Abramowitz & Stegun table 26.10), to 4 decimals.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df ≥ 1).

    Tabled for df ≤ 30; above, the Cornish–Fisher expansion in 1/df around the normal quantile
    (error below 1e-5 for df > 30)."""
    if isinstance(df, bool) or int(df) != df or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    df = int(df)
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def paired_difference(values, baseline) -> dict:
    """The paired difference ``values − baseline`` over seeds (the same seed = the same initial
    model and batches): mean, sample std, and the 95% t-interval of the mean
    mean ± t_{0.975, n−1} · std / √n. With one seed the interval is undefined (NaN)."""
    a = np.asarray(values, dtype=np.float64).ravel()
    b = np.asarray(baseline, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"values and baseline differ in length: {a.size} vs {b.size}")
    d = a - b
    n = d.size
    mean, std = mean_std(d)
    half = t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half,
            "half_width": half}


def compare_to_baseline(values: dict, baseline: str = "ls") -> dict:
    """Per method: per-task mean and std over seeds of ``values[method]`` (an array (seeds, K),
    rows in seed order, the same seeds for every method), the task average, and the paired
    difference from ``baseline`` per task and on the average (:func:`paired_difference`), also
    relative to the baseline's mean (in %)."""
    out = {}
    base = np.asarray(values[baseline], dtype=np.float64) if baseline in values else None
    for key, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        avg = v.mean(axis=1)
        row = {"seeds": int(v.shape[0]), "task_mean": v.mean(axis=0).tolist(),
               "task_std": (v.std(axis=0, ddof=1) if len(v) > 1 else np.zeros(v.shape[1])
                            ).tolist(),
               "avg_mean": float(avg.mean()), "avg_std": mean_std(avg)[1], "diff": None}
        if base is not None and key != baseline:
            diffs = [paired_difference(v[:, k], base[:, k]) for k in range(v.shape[1])]
            diffs.append(paired_difference(avg, base.mean(axis=1)))
            ref = [*base.mean(axis=0).tolist(), float(base.mean())]
            for d, r in zip(diffs, ref, strict=True):
                d["relative_pct"] = 100.0 * d["mean"] / r if r else math.nan
                d["relative_half_width_pct"] = 100.0 * d["half_width"] / abs(r) if r else math.nan
            row["diff"] = {"tasks": diffs[:-1], "avg": diffs[-1]}
        out[key] = row
    return out
