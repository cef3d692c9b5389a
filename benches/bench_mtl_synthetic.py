"""The synthetic regression benchmark of the MMoE paper (Ma et al., KDD 2018, section 4):
two tasks whose weight vectors have cosine similarity ρ, swept over ρ, with shared-bottom and
MMoE models, every method, several seeds; test MSE as each method's paired difference from LS
with a 95% interval.

    python benches/bench_mtl_synthetic.py --json docs/synthetic.json --png docs/synthetic.png
    python benches/bench_mtl_synthetic.py --quick          # a smoke test, not results

For each ρ and seed: a fresh data set (u_1, u_2, α, β, 10,000 train / 2,000 validation / 5,000
test rows, pub_native.demo.synthetic); every method trains the same initial model on the same
batches (Adam, lr 1e-3, batch 128) for the given epochs; the epoch with the lowest validation
average MSE is kept and its test MSE reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import pub_native
from pub_native._platform import cpu_name
from pub_native.demo.methods import METHODS, Method, MethodOptions, check_methods
from pub_native.demo.stats import compare_to_baseline
from pub_native.demo.synthetic import REGRESSORS, RegressionBatch, make_tasks

MODEL_NAMES = {"shared-bottom": "Shared-Bottom", "mmoe": "MMoE"}


@torch.no_grad()
def mse(model, part: RegressionBatch) -> list[float]:
    model.eval()
    pred = model(part.x)
    model.train()
    return ((pred - part.y) ** 2).mean(0).tolist()


def train_one(model_name: str, method: str, data, seed: int, args) -> dict:
    torch.manual_seed(seed)
    model = REGRESSORS[model_name]()
    runner = Method(method, model.parameters(), 2, MethodOptions(lr=args.lr), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(data.train.x)
    best, times = None, []
    for _ in range(args.epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, args.batch_size):
            idx = perm[start:start + args.batch_size]
            batch = RegressionBatch(data.train.x[idx], data.train.y[idx])
            t0 = time.perf_counter()
            runner.step(lambda rep, b=batch: model.task_losses(b, with_representation=rep))
            times.append(time.perf_counter() - t0)
        val = mse(model, data.validation)
        if not all(math.isfinite(v) for v in val):
            break
        if best is None or np.mean(val) < np.mean(best[0]):
            best = (val, mse(model, data.test))
    if best is None:
        return {"test_mse": [math.nan, math.nan], "val_mse": [math.nan, math.nan],
                "step_ms": 1e3 * float(np.median(times))}
    return {"val_mse": best[0], "test_mse": best[1], "step_ms": 1e3 * float(np.median(times))}


def fmt_diff(d: dict | None) -> str:
    if d is None:
        return "—"
    mark = "*" if d["ci_low"] > 0 or d["ci_high"] < 0 else " "
    return f"{d['relative_pct']:+6.1f}% ±{d['relative_half_width_pct']:5.1f}{mark}"


def table(summary: dict, rhos: list[float], methods: list[str], model: str) -> str:
    head = f"{'method':<13}" + "".join(f"{'ρ = ' + format(r, 'g'):>31}" for r in rhos)
    lines = [f"{MODEL_NAMES[model]}: test MSE (average of the 2 tasks), mean ± std; "
             "below: Δ vs LS in % of LS's MSE ± 95% half-interval (* excludes 0)", head,
             "-" * len(head)]
    for m in methods:
        cells = []
        for r in rhos:
            row = summary[model][f"{r:g}"][m]
            cell = f"{row['avg_mean']:.4f} ± {row['avg_std']:.4f}"
            if row["diff"] is not None:
                cell += " " + fmt_diff(row["diff"]["avg"]).strip()
            cells.append(f"{cell:>31}")
        lines.append(f"{METHODS[m]:<13}" + "".join(cells))
    return "\n".join(lines)


def figure(summary: dict, runs: list, rhos: list[float], methods: list[str],
           models: list[str], title: str, path: str) -> None:
    """Top: LS's test MSE per seed (the scale, and how much the data draw matters). Bottom:
    every method's paired difference from LS with its 95% interval (means alone would make
    ties look like differences)."""
    import matplotlib.pyplot as plt

    from pub_native.demo.plots import lines_panel, method_style, save_figure

    fig, axes = plt.subplots(2, len(models), figsize=(7 * len(models), 9), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 2]})
    for j, model in enumerate(models):
        ax_abs, ax = axes[0][j], axes[1][j]
        style = method_style("ls")
        for i, r in enumerate(rhos):
            vals = [float(np.mean(x["test_mse"])) for x in runs if x["model"] == model
                    and x["rho"] == r and x["method"] == "ls"]
            ax_abs.plot([i] * len(vals), vals, "o", color=style["color"], alpha=0.6, ms=5)
            ax_abs.plot([i - 0.2, i + 0.2], [np.mean(vals)] * 2, color="k", lw=1.5)
        ax_abs.set_xticks(range(len(rhos)), [f"{r:g}" for r in rhos])
        ax_abs.set(xlabel="task correlation ρ", ylabel="LS: test MSE (avg of 2 tasks)",
                   title=f"{MODEL_NAMES[model]}: LS, one dot per seed (bar: mean)")
        ax_abs.grid(alpha=0.3)
        series = {m: [summary[model][f"{r:g}"][m]["diff"]["avg"] for r in rhos]
                  for m in methods if m != "ls"}
        lines_panel(ax, rhos, series, key="relative_pct", half="relative_half_width_pct",
                    xlabel="task correlation ρ (cosine of the weight vectors)",
                    ylabel="test MSE − LS's, % of LS's (95% interval; below 0 = better)")
        ax.set_title(f"{MODEL_NAMES[model]}: difference from LS (paired by seed)")
    axes[1][0].legend(fontsize=7, ncol=3)
    save_figure(fig, title, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rhos", default="1.0,0.9,0.5,0.0")
    p.add_argument("--models", default="shared-bottom,mmoe")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 seeds, 2 epochs, 2,000 rows; not results")
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="draw --png from the results in JSON (no training)")
    args = p.parse_args(argv)
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        cfg = saved["config"]
        title = (f"MMoE-paper synthetic regression (2 tasks, cos(w1, w2) = ρ): {cfg['seeds']} "
                 f"seeds, {cfg['epochs']} epochs of {cfg['n_train']} rows, Adam lr {cfg['lr']}"
                 + ("  [SMOKE TEST: not results]" if cfg.get("quick") else ""))
        figure(saved["summary"], saved["runs"], saved["rhos"], saved["methods"],
               saved["models"], title, args.png)
        return 0
    if args.quick:
        args.seeds, args.epochs, args.n_train = 2, 2, 2000
    rhos = [float(r) for r in args.rhos.split(",")]
    models = [m.strip() for m in args.models.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    check_methods(methods)
    if "ls" not in methods:
        methods.insert(0, "ls")
    for m in models:
        if m not in REGRESSORS:
            raise SystemExit(f"unknown model {m!r}; choose from {', '.join(REGRESSORS)}")
    torch.set_num_threads(args.threads)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "processor": cpu_name(), "python": platform.python_version(),
           "torch": torch.__version__, "pub_native": pub_native.__version__,
           "torch_threads": torch.get_num_threads()}
    if args.quick:
        print("SMOKE TEST (--quick): its numbers are not results.")
    print(f"MMoE-paper synthetic tasks: ρ in {rhos}, models {models}, {len(methods)} methods, "
          f"{args.seeds} seeds, {args.epochs} epochs of {args.n_train} rows, batch "
          f"{args.batch_size}, Adam lr {args.lr}; {env['processor']}, "
          f"{env['torch_threads']} thread(s)", flush=True)
    t_start = time.perf_counter()
    runs = []
    total = len(models) * len(rhos) * args.seeds
    done = 0
    for rho in rhos:
        for seed in range(args.seeds):
            data = make_tasks(rho, n_train=args.n_train, seed=seed)
            for model in models:
                for method in methods:
                    r = train_one(model, method, data, seed, args)
                    runs.append({"model": model, "rho": rho, "seed": seed, "method": method,
                                 **r})
                done += 1
                el = time.perf_counter() - t_start
                print(f"[{el:6.0f} s] ρ {rho:g} seed {seed + 1}/{args.seeds} {model}: done "
                      f"({done}/{total}, about {el / done * (total - done) / 60:.1f} min left)",
                      file=sys.stderr, flush=True)
    summary = {}
    for model in models:
        summary[model] = {}
        for rho in rhos:
            values = {m: np.array([[*r["test_mse"]] for r in sorted(
                (r for r in runs if r["model"] == model and r["rho"] == rho
                 and r["method"] == m), key=lambda r: r["seed"])]) for m in methods}
            summary[model][f"{rho:g}"] = compare_to_baseline(values, "ls")
    for model in models:
        print()
        print(table(summary, rhos, methods, model))
    wall = time.perf_counter() - t_start
    title = (f"MMoE-paper synthetic regression (2 tasks, cos(w1, w2) = ρ): {args.seeds} seeds, "
             f"{args.epochs} epochs of {args.n_train} rows, Adam lr {args.lr}"
             + ("  [SMOKE TEST: not results]" if args.quick else ""))
    out = {"environment": env, "config": vars(args), "rhos": rhos, "models": models,
           "methods": methods, "runs": runs, "summary": summary, "wall_s": wall,
           "command": "python benches/bench_mtl_synthetic.py " + " ".join(sys.argv[1:])}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.png:
        figure(summary, runs, rhos, methods, models, title, args.png)
    print(f"\ntotal {wall / 60:.1f} min" + (f"; wrote {args.json}" if args.json else "")
          + (f", {args.png}" if args.png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
