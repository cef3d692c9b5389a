"""Benchmark: one PUB optimizer step on the CPU versus torch's fused Adam and the reference PUB.

For P shared parameters (four tensors) and K tasks, times ``opt.step()`` of pub_native.Adam on a
weight-update step (Gram pass + K×K solve + apply pass) and on a reuse step
(update_weights_every > 1: finiteness check + apply pass), torch.optim.Adam(fused=True) on the
same P, and the plain-PyTorch reference PUB (``backend="reference"``). Fused Adam and the two PUB
steps are timed in turn, round after round, so that each row's ratios come from steps that saw
the same state of the machine (each the median over the rounds of the ratio within a round); the
backward that fills the per-task gradients is not timed.
Achieved bandwidth uses SPEC section 6's byte model (2K + 8)·4·P for a weight-update step,
against the copy bandwidth measured here.

    python benches/bench_step.py            # P ∈ {1M, 16M}, K ∈ {2, 4, 8}
    python benches/bench_step.py --quick    # P = 1M, K = 2
    python benches/bench_step.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import pub_native
from pub_native._platform import cpu_name

M = 2**20
N_TENSORS = 4

# Targets at P = 16M (checked for the rows measured): a weight-update step at most this many
# times torch's fused Adam, per K; a reuse step at K = 2; the reference at K = 2.
TARGETS = {"vs_fused_adam_max": {2: 1.8, 4: 3.0, 8: 6.0}, "reuse_vs_fused_adam_max": 1.3,
           "vs_reference_min": 5.0}


def copy_bandwidth(n: int, rounds: int) -> float:
    src = torch.randn(n)
    dst = torch.empty(n)
    times = []
    for r in range(2 + rounds):
        t0 = time.perf_counter()
        dst.copy_(src)
        if r >= 2:  # two warm-up copies
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return 2 * 4 * n / t


def make_shared(p_total: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [p_total // N_TENSORS] * N_TENSORS
    sizes[-1] += p_total - sum(sizes)
    return [torch.randn(n, generator=g).requires_grad_() for n in sizes]


def task_directions(shared, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) for p in shared] for _ in range(k)]


def losses_for(shared, dirs):
    return [sum((p * d).sum() for p, d in zip(shared, ds)) for ds in dirs]


class PubStep:
    """pub_native.Adam (or ``cls`` with ``options``) on P shared parameters and K tasks; setup()
    runs the (untimed) backward."""

    def __init__(self, p_total, k, every, backend=None, cls=None, options=None):
        self.shared = make_shared(p_total, 0)
        self.dirs = task_directions(self.shared, k, 1)
        options = dict(options or {})
        if backend is not None:
            options["backend"] = backend
        self.opt = (cls or pub_native.Adam)(self.shared, lr=1e-3, shared=self.shared,
                                            update_weights_every=every, **options)
        self.setup()
        self.opt.step()  # first step: state allocation and the first solve

    def setup(self):
        self.opt.zero_grad()
        self.opt.backward(losses_for(self.shared, self.dirs))

    def step(self):
        self.opt.step()


class PlainStep:
    """One optimizer without tasks on the same P, gradients set once: torch's (fused where torch
    has a fused version for the CPU, else foreach) or pub_native's (K = 1, the base step)."""

    def __init__(self, p_total, cls, options, torch_impl=False):
        self.shared = make_shared(p_total, 0)
        for p in self.shared:
            p.grad = torch.randn_like(p)
        self.impl = ""
        if torch_impl:
            try:
                self.opt = cls(self.shared, lr=1e-3, fused=True, **options)
                self.impl = "fused"
            except TypeError:  # no fused version
                self.opt = cls(self.shared, lr=1e-3, foreach=True, **options)
                self.impl = "foreach"
        else:
            self.opt = cls(self.shared, lr=1e-3, **options)
        self.opt.step()

    def setup(self):
        pass

    def step(self):
        self.opt.step()


def fused_adam_step(p_total):
    """torch.optim.Adam(fused=True) on the same P, gradients set once."""
    return PlainStep(p_total, torch.optim.Adam, {}, torch_impl=True)


# Option sets of the other rules (the table above is Adam's default): torch's step, the base
# step of pub_native (K = 1) and a PUB weight-update step at K = 2, timed in turn.
OPTION_SETS = [
    ("Adam amsgrad", torch.optim.Adam, pub_native.Adam, {"amsgrad": True}),
    ("AdaGrad", torch.optim.Adagrad, pub_native.Adagrad, {}),
    ("RMSProp", torch.optim.RMSprop, pub_native.RMSprop, {}),
    ("RMSProp centered+momentum", torch.optim.RMSprop, pub_native.RMSprop,
     {"centered": True, "momentum": 0.9}),
]


def bench_option_sets(p_total, rounds):
    """Rows of (name, torch's implementation, torch s, K = 1 s, K = 2 s) for OPTION_SETS."""
    rows = []
    for name, torch_cls, pub_cls, options in OPTION_SETS:
        ref = PlainStep(p_total, torch_cls, options, torch_impl=True)
        base = PlainStep(p_total, pub_cls, options)
        pub = PubStep(p_total, 2, every=1, cls=pub_cls, options=options)
        times = round_robin_times([ref, base, pub], rounds)
        t_ref, t_base, t_pub = (statistics.median(t) for t in times)
        rows.append({"options": name, "torch_impl": ref.impl, "torch_s": t_ref, "k1_s": t_base,
                     "k2_s": t_pub, "k1_over_torch": paired_ratio(times[1], times[0]),
                     "k2_over_torch": paired_ratio(times[2], times[0])})
        del ref, base, pub
    return rows


def round_robin(steps, rounds: int, warmup: int = 1) -> list[float]:
    """Median time of each step's step(), timed in turn (one of each per round), so that every
    step sees the same state of a shared, noisy machine; setup() is not timed."""
    return [statistics.median(t) for t in round_robin_times(steps, rounds, warmup)]


def paired_ratio(times: list[float], base: list[float]) -> float:
    """The median over rounds of a step's time over the base step's time in the same round."""
    return statistics.median(t / b for t, b in zip(times, base))


def round_robin_times(steps, rounds: int, warmup: int = 1) -> list[list[float]]:
    """The times of each step's step() per round, timed in turn (see round_robin)."""
    times = [[] for _ in steps]
    for r in range(warmup + rounds):
        for s, t in zip(steps, times):
            s.setup()
            t0 = time.perf_counter()
            s.step()
            dt = time.perf_counter() - t0
            if r >= warmup:
                t.append(dt)
    return times


def bench_fused_adam(p_total, rounds):
    return round_robin([fused_adam_step(p_total)], rounds)[0]


def bench_reference(p_total, k, rounds):
    if rounds <= 0:
        return float("nan")
    return round_robin([PubStep(p_total, k, every=1, backend="reference")], rounds, warmup=0)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="P = 1M, K = 2 only")
    ap.add_argument("--sizes", default=None, help="comma-separated P in millions (default 1,16)")
    ap.add_argument("--tasks", default=None, help="comma-separated K (default 2,4,8)")
    ap.add_argument("--rounds", type=int, default=11, help="timed steps per median")
    ap.add_argument("--reference-rounds", type=int, default=3,
                    help="timed steps of the reference (0: not timed)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    sizes = [1] if args.quick else [int(s) for s in (args.sizes or "1,16").split(",")]
    tasks = [2] if args.quick else [int(s) for s in (args.tasks or "2,4,8").split(",")]
    rounds = 3 if args.quick else args.rounds
    ref_rounds = 1 if args.quick else args.reference_rounds

    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "openmp_threads": pub_native._native._C.omp_max_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pub_native": pub_native.__version__,
    }
    bw = copy_bandwidth(max(sizes) * M, rounds=max(rounds, 5))
    print(f"pub_native {info['pub_native']}, torch {info['torch']}, Python {info['python']}")
    print(f"{info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}, "
          f"OpenMP threads {info['openmp_threads']}")
    print(f"copy bandwidth (torch copy_, {max(sizes)}M float32): {bw / 1e9:.2f} GB/s")
    fused_p = max(sizes) * M
    fused_bw = 7 * 4 * fused_p / bench_fused_adam(fused_p, max(rounds, 5))
    print(f"fused Adam on its own byte model 7·4·P ({max(sizes)}M): {fused_bw / 1e9:.2f} GB/s "
          f"({fused_bw / bw:.0%} of copy)")
    print(f"medians of {rounds} rounds of fused Adam, PUB solve and PUB reuse steps timed in turn "
          f"(reference: {ref_rounds} steps); each ratio over fused Adam is the median over the "
          "rounds of the ratio within a round\n")
    header = (f"{'P':>5} {'K':>2} | {'fused Adam':>10} {'PUB solve':>10} {'PUB reuse':>10} "
              f"{'reference':>10} | {'PUB/fused':>9} {'reuse/fused':>11} {'ref/PUB':>8} | "
              f"{'GB/s':>6} {'of copy':>7} | {'solver':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for p_m in sizes:
        p_total = p_m * M
        for k in tasks:
            # Fused Adam, a weight-update step and a reuse step in turn, round after round.
            pub, reuse = PubStep(p_total, k, every=1), PubStep(p_total, k, every=10**9)
            times = round_robin_times([fused_adam_step(p_total), pub, reuse], rounds)
            t_fused, t_pub, t_reuse = (statistics.median(t) for t in times)
            solve = pub.opt.stats.get("solve_time", float("nan"))
            del pub, reuse
            bytes_model = (2 * k + 8) * 4 * p_total
            achieved = bytes_model / t_pub
            rows.append({
                "P": p_total, "K": k, "fused_adam_s": t_fused, "pub_step_s": t_pub,
                "pub_reuse_step_s": t_reuse, "solve_s": solve,
                "pub_over_fused": paired_ratio(times[1], times[0]),
                "reuse_over_fused": paired_ratio(times[2], times[0]),
                "bytes_model": bytes_model, "achieved_bandwidth": achieved,
                "bandwidth_fraction": achieved / bw,
            })
    # The reference after every round robin: its large temporaries, freed, leave the memory that
    # the next tensors get in another state (fused Adam ran at 5.7 instead of 9 ms after them).
    for row in rows:
        row["reference_step_s"] = t_ref = bench_reference(row["P"], row["K"], ref_rounds)
        row["reference_over_pub"] = t_ref / row["pub_step_s"]
    for r in rows:
        t_fused, t_pub, t_reuse = r["fused_adam_s"], r["pub_step_s"], r["pub_reuse_step_s"]
        print(f"{r['P'] // M:>4}M {r['K']:>2} | {t_fused * 1e3:>8.1f}ms {t_pub * 1e3:>8.1f}ms "
              f"{t_reuse * 1e3:>8.1f}ms {r['reference_step_s'] * 1e3:>8.0f}ms | "
              f"{r['pub_over_fused']:>8.2f}x {r['reuse_over_fused']:>10.2f}x "
              f"{r['reference_over_pub']:>7.1f}x | {r['achieved_bandwidth'] / 1e9:>6.2f} "
              f"{r['bandwidth_fraction']:>6.0%} | {r['solve_s'] * 1e6:>6.0f}µs")

    p_opts = max(sizes) * M
    option_rows = bench_option_sets(p_opts, rounds)
    print(f"\nother option sets at P = {p_opts // M}M: torch's step, pub_native's base step "
          "(K = 1) and a PUB weight-update step (K = 2), timed in turn")
    print(f"{'options':<26} | {'torch':>16} {'K = 1':>8} {'K = 2':>8} | {'K1/torch':>8} "
          f"{'K2/torch':>8}")
    for r in option_rows:
        print(f"{r['options']:<26} | {r['torch_impl']:>7} {r['torch_s'] * 1e3:>6.1f}ms "
              f"{r['k1_s'] * 1e3:>6.1f}ms {r['k2_s'] * 1e3:>6.1f}ms | "
              f"{r['k1_over_torch']:>7.2f}x {r['k2_over_torch']:>7.2f}x")

    verdict = {}
    for r in rows:
        if r["P"] != 16 * M:
            continue
        k = r["K"]
        limit = TARGETS["vs_fused_adam_max"].get(k)
        if limit is not None:
            verdict[f"K={k} step"] = (r["pub_over_fused"], limit, r["pub_over_fused"] <= limit)
        if k == 2:
            limit = TARGETS["reuse_vs_fused_adam_max"]
            verdict["K=2 reuse"] = (r["reuse_over_fused"], limit, r["reuse_over_fused"] <= limit)
            if r["reference_over_pub"] == r["reference_over_pub"]:  # timed (not NaN)
                verdict["K=2 vs reference"] = (r["reference_over_pub"],
                                               TARGETS["vs_reference_min"],
                                               r["reference_over_pub"]
                                               >= TARGETS["vs_reference_min"])
    if verdict:
        print("\nP = 16M, targets:")
        for name, (value, limit, ok) in verdict.items():
            rel = "≥" if "reference" in name else "≤"
            print(f"  {name:<18} {value:6.2f}x  (target {rel} {limit}x)  "
                  f"{'PASS' if ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "copy_bandwidth": bw, "fused_adam_bandwidth": fused_bw,
                       "rows": rows, "option_sets": option_rows,
                       "targets": TARGETS,
                       "verdict": {k: v[2] for k, v in verdict.items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
