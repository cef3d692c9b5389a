"""The two-objective toy problem of CAGrad and NashMTL (pub_native.demo.toy), optimized with Adam
from the 5 published starting points by every method: trajectories on the loss landscape with
the Pareto set, and where each run ends.

    python benches/toy_pareto.py --json docs/toy_pareto.json --png docs/toy_pareto.png
    python benches/toy_pareto.py --steps 2000            # a quick look, not the study

As in the NashMTL/FAMO toy trainers: θ ∈ R² is the shared parameter, Adam with lr 1e-3 for
35,000 steps (NashMTL's setting), f1 scaled by 0.1 (NashMTL's imbalance; --scale 1 for CAGrad's
original). A run "reaches the Pareto set" when it ends within 0.05 of it; the stationarity
measure is min_w ‖w∇f1 + (1−w)∇f2‖ / max‖∇f_i‖ (0 at a Pareto-stationary point).
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
from pub_native.demo.toy import (
    LOWER_BOUNDS,
    STARTS,
    pareto_set,
    pareto_stationarity,
    toy_losses,
    toy_losses_fast,
)

REACHED = 0.05
#: Steps between the trajectory points kept in the JSON (the figure uses every recorded one).
JSON_EVERY = 250


def run(method: str, start, args) -> dict:
    x = torch.tensor(start, dtype=torch.float32, requires_grad=True)
    runner = Method(method, [x], 2, MethodOptions(lr=args.lr))

    def loss_fn(with_rep):
        losses = list(toy_losses_fast(x, args.scale).unbind(0))
        return (losses, x) if with_rep else losses

    traj = [x.detach().tolist()]
    status = "ok"
    for step in range(1, args.steps + 1):
        try:
            runner.step(loss_fn)
        except (FloatingPointError, ValueError, RuntimeError) as exc:
            status = f"stopped at step {step}: {type(exc).__name__}: {exc}"
            break
        if not bool(torch.isfinite(x).all()):
            status = f"diverged at step {step}"
            break
        if step % args.record_every == 0:
            traj.append(x.detach().tolist())
    end = x.detach().double()
    if not bool(torch.isfinite(end).all()):
        end = torch.tensor(traj[-1], dtype=torch.float64)
    f = toy_losses(end, args.scale, shift=False).tolist()
    return {"start": list(start), "end": end.tolist(), "f_end": f, "status": status,
            "trajectory": traj}


def _compact(r: dict, args) -> dict:
    """A run for the JSON: the trajectory every ``JSON_EVERY`` steps (and its end), rounded."""
    stride = max(1, JSON_EVERY // args.record_every)
    traj = r["trajectory"]
    kept = traj[::stride] + ([traj[-1]] if (len(traj) - 1) % stride else [])
    return {**r, "trajectory": np.round(np.asarray(kept), 4).tolist(),
            "trajectory_every": stride * args.record_every}


def figure(results, pareto, args, path) -> None:
    import matplotlib.pyplot as plt

    from pub_native.demo.plots import save_figure

    methods = list(results)
    cols = 4
    rows = math.ceil(len(methods) / cols)
    g1, g2 = np.meshgrid(np.linspace(-10, 10, 201), np.linspace(-10, 10, 201))
    grid = torch.from_numpy(np.stack([g1.ravel(), g2.ravel()], 1))
    f = toy_losses(grid, args.scale).numpy()
    land = (f[:, 0] + f[:, 1]).reshape(g1.shape)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, m in zip(axes.ravel(), methods):
        ax.contourf(g1, g2, land, levels=30, cmap="Greys", alpha=0.35)
        ax.contour(g1, g2, land, levels=15, colors="grey", linewidths=0.3)
        ax.plot(pareto[:, 0], pareto[:, 1], color="#444", lw=5, alpha=0.6, solid_capstyle="round",
                label="Pareto set")
        reached = 0
        for i, r in enumerate(results[m]):
            t = np.asarray(r["trajectory"])
            ax.plot(t[:, 0], t[:, 1], color=colors(i), lw=1.2)
            ax.plot(*r["start"], "o", color="k", ms=4)
            ax.plot(*r["end"], "*", color=colors(i), ms=11, mec="k", mew=0.5)
            reached += r["distance"] <= REACHED
        ax.set(xlim=(-10, 10), ylim=(-10, 10), xticks=[-10, 0, 10], yticks=[-10, 0, 10])
        ax.set_title(f"{METHODS[m]}: {reached}/{len(results[m])} reach the Pareto set",
                     fontsize=9)
    for ax in axes.ravel()[len(methods):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7, loc="upper right")
    save_figure(fig, f"Two-objective toy problem (CAGrad/NashMTL), f1 × {args.scale:g}: Adam lr "
                f"{args.lr:g}, {args.steps} steps from 5 starts (black dots; stars: ends); "
                "background: f1 + f2 (shifted)", path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=35000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--scale", type=float, default=0.1, help="multiplier of f1 (NashMTL: 0.1)")
    p.add_argument("--record-every", type=int, default=50)
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",")]
    check_methods(methods)
    torch.set_num_threads(1)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "processor": cpu_name(), "python": platform.python_version(),
           "torch": torch.__version__, "pub_native": pub_native.__version__}
    pareto = pareto_set(801, args.scale)
    t0 = time.perf_counter()
    results = {}
    for m in methods:
        results[m] = []
        for start in STARTS:
            r = run(m, start, args)
            end = np.asarray(r["end"])
            r["distance"] = float(np.min(np.linalg.norm(pareto - end, axis=1)))
            r["stationarity"] = float(pareto_stationarity(end[None], args.scale)[0])
            results[m].append(r)
        print(f"[{time.perf_counter() - t0:6.0f} s] {METHODS[m]} done", file=sys.stderr,
              flush=True)
    head = (f"{'method':<13} {'reached':>8}  " + "  ".join(
        f"{f'({s[0]:g}, {s[1]:g})':>22}" for s in STARTS))
    lines = [f"toy problem, f1 × {args.scale:g}, Adam lr {args.lr:g}, {args.steps} steps: "
             "end point (x1, x2) per start; reached = ends within "
             f"{REACHED} of the Pareto set", head, "-" * len(head)]
    for m in methods:
        cells = []
        for r in results[m]:
            tag = "" if r["status"] == "ok" else " !"
            mark = "P" if r["distance"] <= REACHED else " "
            x1, x2 = r["end"]
            cell = f"({x1:+.2f}, {x2:+.2f}) {mark}{tag}"
            cells.append(f"{cell:>22}")
        reached = sum(r["distance"] <= REACHED for r in results[m])
        lines.append(f"{METHODS[m]:<13} {f'{reached}/5':>8}  " + "  ".join(cells))
    lines.append("P: on the Pareto set; !: the run stopped early (see the JSON)")
    print("\n".join(lines))
    wall = time.perf_counter() - t0
    out = {"environment": env, "config": vars(args), "starts": [list(s) for s in STARTS],
           "lower_bounds": LOWER_BOUNDS, "reached_within": REACHED,
           "pareto_set": np.round(pareto[::8], 4).tolist(),
           "results": {m: [_compact(r, args) for r in runs] for m, runs in results.items()},
           "wall_s": wall, "command": "python benches/toy_pareto.py " + " ".join(sys.argv[1:])}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out))
    if args.png:
        figure(results, pareto, args, args.png)
    print(f"total {wall / 60:.1f} min" + (f"; wrote {args.json}" if args.json else "")
          + (f", {args.png}" if args.png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
