"""Cost of one training step (forward + backward + optimizer step) of every multi-task method
on the demo's census-income MMoE, side by side, as a ratio to LS.

Every method trains its own copy of the same initial model on the same batches; the methods
take turns step by step (round robin), so a change of the machine's load hits all of them
alike. Reported: the median step time over all timed steps and its ratio to LS's median, and
the median of the per-round ratios (each round: the same batch for every method).

    python benches/bench_balancer_cost.py                       # batch 512 and 4096
    python benches/bench_balancer_cost.py --json docs/balancer_cost.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import pub_native
from pub_native._platform import cpu_name
from pub_native.demo.data import load_adult
from pub_native.demo.methods import METHODS, Method, MethodOptions, check_methods
from pub_native.demo.models import build_model
from pub_native.demo.run import MODEL_KWARGS, MODEL_NAMES


def measure(batch_size: int, methods: list[str], steps: int, warmup: int, model: str,
            data) -> dict:
    opts = MethodOptions(lr=3e-3, weight_decay=1e-6)
    runs = {}
    for key in methods:
        torch.manual_seed(0)
        m = build_model(model, data, **MODEL_KWARGS)
        runs[key] = (m, Method(key, m.parameters(), data.n_tasks, opts))
    gen = torch.Generator().manual_seed(0)
    batches = list(data.train.batches(batch_size, shuffle=True, generator=gen, drop_last=True))
    times = {key: [] for key in methods}
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        for key, (m, method) in runs.items():
            def loss_fn(with_rep, m=m, batch=batch):
                return m.task_losses(batch, with_representation=with_rep)

            t0 = time.perf_counter()
            method.step(loss_fn)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[key].append(dt)
    ls = np.asarray(times["ls"])
    rows = []
    for key in methods:
        t = np.asarray(times[key])
        rows.append({
            "method": key, "label": METHODS[key], "median_ms": 1e3 * float(np.median(t)),
            "q25_ms": 1e3 * float(np.percentile(t, 25)),
            "q75_ms": 1e3 * float(np.percentile(t, 75)),
            "ratio_of_medians": float(np.median(t) / np.median(ls)),
            "median_paired_ratio": float(np.median(t / ls)),
        })
    return {"batch_size": batch_size, "steps": steps, "warmup": warmup, "rows": rows}


def format_result(result: dict) -> str:
    lines = [f"batch {result['batch_size']}: {result['steps']} timed steps per method "
             f"(after {result['warmup']} warm-up steps), round robin",
             f"{'method':<13} {'median ms':>10} {'IQR ms':>15} {'x LS':>7} {'paired x LS':>12}",
             "-" * 61]
    for r in result["rows"]:
        lines.append(f"{r['label']:<13} {r['median_ms']:>10.3f} "
                     f"{r['q25_ms']:>7.3f}-{r['q75_ms']:<7.3f} {r['ratio_of_medians']:>7.3f} "
                     f"{r['median_paired_ratio']:>12.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="512,4096")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--model", default="mmoe", choices=("mmoe", "ple"))
    p.add_argument("--steps", type=int, default=200, help="timed steps per method and batch size")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_methods(methods)
    if "ls" not in methods:
        methods.insert(0, "ls")
    torch.set_num_threads(args.threads)
    data = load_adult()
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "processor": cpu_name(), "python": platform.python_version(),
           "torch": torch.__version__, "pub_native": pub_native.__version__,
           "torch_threads": torch.get_num_threads()}
    print(f"step cost on the census {MODEL_NAMES[args.model]} (forward + backward + step), "
          f"{env['processor']}, {env['torch_threads']} torch thread(s), torch {env['torch']}")
    results = []
    t0 = time.perf_counter()
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        result = measure(bs, methods, args.steps, args.warmup, args.model, data)
        results.append(result)
        print(format_result(result), flush=True)
        print()
    out = {"environment": env, "model": args.model, "results": results,
           "command": "python benches/bench_balancer_cost.py " + " ".join(sys.argv[1:]),
           "wall_s": time.perf_counter() - t0}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
