"""GPU benchmark: the PUB step on CUDA versus torch's fused Adam, the device weight solver versus
the cvxpy NashMTL reference, and achieved bandwidth versus the device's copy bandwidth.

Times with CUDA events (medians); the per-task gradients are computed outside the timed region.
Bandwidth uses SPEC section 6's byte model (2K + 8)·4·P for a weight-update step, against
``dst.copy_(src)`` measured on the same device. Targets (H100/H200): ≥ 70% of copy bandwidth at
P ≥ 64M and a K = 2 weight-update step ≤ 2.0× torch's fused Adam.

    python benches/bench_step_cuda.py [--sizes 64,256] [--tasks 2,4,8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

import pub_native

M = 2**20
TARGETS = {"vs_fused_adam_max": 2.0, "bandwidth_fraction_min": 0.70}


def cuda_median_ms(fn, rounds, setup=None, warmup=2):
    times = []
    for r in range(warmup + rounds):
        if setup is not None:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if r >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(n, rounds):
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    return 2 * 4 * n / (cuda_median_ms(lambda: dst.copy_(src), rounds) / 1e3)


def bench_pub(p_total, k, rounds, every):
    torch.manual_seed(0)
    shared = [torch.randn(p_total // 4, device="cuda", requires_grad=True) for _ in range(4)]
    dirs = [[torch.randn_like(p) for p in shared] for _ in range(k)]
    opt = pub_native.Adam(shared, lr=1e-3, shared=shared, update_weights_every=every)

    def setup():
        opt.zero_grad()
        opt.backward([sum((p * d).sum() for p, d in zip(shared, ds)) for ds in dirs])

    setup()
    opt.step()
    return cuda_median_ms(opt.step, rounds, setup=setup)


def bench_fused(p_total, rounds):
    shared = [torch.randn(p_total // 4, device="cuda", requires_grad=True) for _ in range(4)]
    for p in shared:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(shared, lr=1e-3, fused=True)
    opt.step()
    return cuda_median_ms(opt.step, rounds)


def bench_solver(ks, rounds):
    rows = []
    try:
        from pub_native.reference import nash_weights_cvxpy
    except ImportError:
        nash_weights_cvxpy = None
    for k in ks:
        rng = np.random.default_rng(k)
        U = rng.standard_normal((k, 64))
        G = torch.tensor(U @ U.T, device="cuda")
        t_dev = cuda_median_ms(lambda G=G: pub_native.solve_weights(G), rounds)
        t_ref = float("nan")
        if nash_weights_cvxpy is not None:
            t0 = time.perf_counter()
            nash_weights_cvxpy(U @ U.T, warm_start=np.ones(k))
            t_ref = 1e3 * (time.perf_counter() - t0)
        rows.append({"K": k, "device_ms": t_dev, "cvxpy_ms": t_ref})
        print(f"solver K={k:>2}: device {t_dev * 1e3:8.1f} µs (incl. validation), cvxpy "
              f"{t_ref:8.1f} ms, {t_ref / t_dev:8.0f}x")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,256", help="P in millions")
    ap.add_argument("--tasks", default="2,4,8")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not pub_native.cuda_available():
        print("bench_step_cuda: needs a CUDA device and the _C_cuda module; nothing measured")
        return 0
    props = torch.cuda.get_device_properties(0)
    sizes = [int(s) for s in args.sizes.split(",")]
    tasks = [int(s) for s in args.tasks.split(",")]
    bw = copy_bandwidth(max(sizes) * M, args.rounds)
    print(f"{props.name}, torch {torch.__version__}, pub_native {pub_native.__version__}")
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s; medians of {args.rounds} steps\n")
    solver_rows = bench_solver([2, 3, 5, 10, 20, 40], args.rounds)
    print(f"\n{'P':>5} {'K':>2} | {'fused Adam':>10} {'PUB solve':>10} {'PUB reuse':>10} | "
          f"{'PUB/fused':>9} | {'GB/s':>6} {'of copy':>7}")
    rows = []
    for p_m in sizes:
        t_fused = bench_fused(p_m * M, args.rounds)
        for k in tasks:
            t_pub = bench_pub(p_m * M, k, args.rounds, 1)
            t_reuse = bench_pub(p_m * M, k, args.rounds, 10**9)
            achieved = (2 * k + 8) * 4 * p_m * M / (t_pub / 1e3)
            rows.append({"P": p_m * M, "K": k, "fused_adam_ms": t_fused, "pub_step_ms": t_pub,
                         "pub_reuse_step_ms": t_reuse, "pub_over_fused": t_pub / t_fused,
                         "achieved_bandwidth": achieved, "bandwidth_fraction": achieved / bw})
            print(f"{p_m:>4}M {k:>2} | {t_fused:>8.2f}ms {t_pub:>8.2f}ms {t_reuse:>8.2f}ms | "
                  f"{t_pub / t_fused:>8.2f}x | {achieved / 1e9:>6.0f} {achieved / bw:>6.0%}")
    target = next((r for r in rows if r["K"] == 2), None)
    if target is not None:
        print(f"\nK = 2, P = {target['P'] // M}M: {target['pub_over_fused']:.2f}x fused Adam "
              f"(target ≤ {TARGETS['vs_fused_adam_max']}x), {target['bandwidth_fraction']:.0%} "
              f"of copy bandwidth (target ≥ {TARGETS['bandwidth_fraction_min']:.0%})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "copy_bandwidth": bw, "solver": solver_rows,
                       "rows": rows, "targets": TARGETS}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
