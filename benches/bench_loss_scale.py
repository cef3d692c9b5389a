"""Loss-scale robustness on census income: one task's loss multiplied by 1, 10, 100 and 1000
(the PUB paper's claim, where its CTR loss is about 23x its CTCVR loss), every method, per-task
test AUC as each method's paired difference from LS with a 95% interval, at every scale.

    python benches/bench_loss_scale.py --json docs/loss_scale.json --png docs/loss_scale.png
    python benches/bench_loss_scale.py --quick            # a smoke test, not results

Each scale is the demo's comparison (pub_native.demo.run_demo: MMoE, Adam lr 3e-3, batch 512,
4 epochs, epoch chosen by validation average AUC) with ``loss_scale`` = (s, 1) (or (1, s) with
--scaled-task 1). LS is rerun at every scale, so every difference compares methods that saw the
same scaled losses.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from pub_native.demo.methods import METHODS, check_methods
from pub_native.demo.run import MODEL_NAMES, DemoConfig, run_demo


def fmt(d: dict | None) -> str:
    if d is None:
        return "—"
    mark = "*" if d["ci_low"] > 0 or d["ci_high"] < 0 else " "
    return f"{d['mean']:+.4f} ±{d['half_width']:.4f}{mark}"


def table(per_scale: dict, scales: list[float], methods: list[str], tasks: list[str]) -> str:
    lines = []
    for k, task in enumerate(tasks):
        head = f"{'method':<13}" + "".join(f"{'x' + format(s, 'g'):>28}" for s in scales)
        lines += [f"{task} test AUC: LS's mean ± std; others: Δ vs LS ± 95% half-interval "
                  "(* excludes 0)", head, "-" * len(head)]
        for m in methods:
            cells = []
            for s in scales:
                row = next(r for r in per_scale[f"{s:g}"] if r["method"] == m)
                if row["diff_vs_ls"] is None:
                    cell = f"{row['task_auc_mean'][k]:.4f} ± {row['task_auc_std'][k]:.4f}"
                else:
                    cell = fmt(row["diff_vs_ls"]["tasks"][k])
                cells.append(f"{cell:>28}")
            lines.append(f"{METHODS[m]:<13}" + "".join(cells))
        lines.append("")
    return "\n".join(lines)


def figure(per_scale: dict, scales, methods, tasks, title, path) -> None:
    import matplotlib.pyplot as plt

    from pub_native.demo.plots import lines_panel, method_style, save_figure

    fig, axes = plt.subplots(2, len(tasks), figsize=(7 * len(tasks), 9), squeeze=False)
    for k, task in enumerate(tasks):
        ax_abs, ax = axes[0][k], axes[1][k]
        for m in methods:
            rows = [next(r for r in per_scale[f"{s:g}"] if r["method"] == m) for s in scales]
            ax_abs.errorbar(range(len(scales)), [r["task_auc_mean"][k] for r in rows],
                            yerr=[r["task_auc_std"][k] for r in rows], label=METHODS[m],
                            capsize=2, ms=4, lw=1.0, **method_style(m))
        ax_abs.set_xticks(range(len(scales)), [f"x{s:g}" for s in scales])
        ax_abs.set(xlabel=f"multiplier of the {tasks[0]} loss", ylabel="test AUC (mean ± std)",
                   title=f"{task}: test AUC")
        ax_abs.grid(alpha=0.3)
        series = {m: [next(r for r in per_scale[f"{s:g}"] if r["method"] == m)["diff_vs_ls"]
                      ["tasks"][k] for s in scales] for m in methods if m != "ls"}
        lines_panel(ax, scales, series, xlabel="loss multiplier",
                    ylabel="test AUC − LS's (95% interval; above 0 = better)")
        ax.set_title(f"{task}: difference from LS (paired by seed)")
    axes[0][0].legend(fontsize=7, ncol=2)
    save_figure(fig, title, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scales", default="1,10,100,1000")
    p.add_argument("--scaled-task", type=int, default=0, help="index of the task to scale")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--model", default="mmoe", choices=("mmoe", "ple"))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 seeds, 1 epoch on 4,096 rows; not results")
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    scales = [float(s) for s in args.scales.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    check_methods(methods)
    if "ls" not in methods:
        methods.insert(0, "ls")
    extra = dict(seeds=2, epochs=1, train_rows=4096, eval_rows=4096, quick=True) \
        if args.quick else dict(seeds=args.seeds, epochs=args.epochs)
    if args.quick:
        print("SMOKE TEST (--quick): its numbers are not results.")
    t0 = time.perf_counter()
    per_scale, configs, env, tasks = {}, {}, None, None
    for s in scales:
        scale = [1.0, 1.0]
        scale[args.scaled_task] = s
        cfg = DemoConfig(models=(args.model,), methods=tuple(methods), out=None, progress=False,
                         loss_scale=tuple(scale), **extra)
        res = run_demo(cfg)
        if res["errors"]:
            print(f"x{s:g}: FAILED {res['errors']}", file=sys.stderr)
        per_scale[f"{s:g}"] = res["summary"]
        configs[f"{s:g}"] = res["config"]
        env, tasks = res["environment"], res["data"]["tasks"]
        print(f"[{time.perf_counter() - t0:6.0f} s] loss scale x{s:g} done "
              f"({res['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    print(f"census income, {MODEL_NAMES[args.model]}: the {tasks[args.scaled_task]} loss "
          f"multiplied by {', '.join(f'{s:g}' for s in scales)}; {extra['seeds']} seeds, "
          f"{extra['epochs']} epoch(s); {env['processor']}, torch {env['torch']}")
    print(table(per_scale, scales, methods, tasks))
    wall = time.perf_counter() - t0
    out = {"environment": env, "scales": scales, "scaled_task": args.scaled_task,
           "tasks": tasks, "methods": methods, "configs": configs, "summary": per_scale,
           "wall_s": wall, "command": "python benches/bench_loss_scale.py "
           + " ".join(sys.argv[1:])}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1,
                                              default=lambda o: None if isinstance(o, float)
                                              and math.isnan(o) else str(o)))
    if args.png:
        title = (f"Census income, {MODEL_NAMES[args.model]}: {tasks[args.scaled_task]} loss × "
                 f"{{{', '.join(f'{s:g}' for s in scales)}}} — {extra['seeds']} seeds, "
                 f"{extra['epochs']} epochs" + ("  [SMOKE TEST: not results]"
                                               if args.quick else ""))
        figure(per_scale, scales, methods, tasks, title, args.png)
    print(f"total {wall / 60:.1f} min" + (f"; wrote {args.json}" if args.json else "")
          + (f", {args.png}" if args.png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
