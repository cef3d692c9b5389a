"""Benchmark: one PUB optimizer step on the CPU versus torch's fused Adam and the reference PUB.

For P shared parameters (four tensors) and K tasks, times ``opt.step()`` of pub_native.Adam on a
weight-update step (Gram pass + K×K solve + apply pass) and on a reuse step
(update_weights_every > 1: finiteness check + apply pass), torch.optim.Adam(fused=True) on the
same P, and the plain-PyTorch reference PUB (``backend="reference"``). Fused Adam and the two PUB
steps are timed in turn, round after round, so that each row's ratios come from steps that saw
the same state of the machine (each the median over the rounds of the ratio within a round); the
backward that fills the per-task gradients is not timed. Achieved bandwidth uses the byte
model (2K + 8)·4·P of a weight-update step (the Gram pass reads the K task gradients and the
state, the apply pass reads them again with θ and writes θ and the state), against torch's
``copy_`` of P elements timed in the same rounds.

Each row is printed as soon as it is measured; the table with the reference's column follows
when the reference has been timed, last (its temporaries would disturb the other timings). The
reference needs memory: about 6 GB at P = 16M and K = 8 (``--reference-rounds 0`` skips it).
The targets (README, "Step benchmark") are checked on the rows at P = 16M and printed as PASS
or FAIL lines; the exit status is 0 unless the run itself failed, so that a busy machine does
not fail a job that runs this script.

    python benches/bench_step.py            # P ∈ {1M, 16M}, K ∈ {2, 4, 8}: ~2 min, ~6 GB
    python benches/bench_step.py --quick    # P = 1M, K = 2
    python benches/bench_step.py --sizes 16 --reference-rounds 1 --json out.json
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import (
    check_json_path,
    list_of,
    non_negative_int,
    paired_ratio,
    positive_int,
    write_json,
)

import pub_native
from pub_native._platform import cpu_name

M = 2**20
N_TENSORS = 4

# Targets at P = 16M (checked for the rows measured): a weight-update step at most this many
# times torch's fused Adam, per K; a reuse step at K = 2; the reference at K = 2.
TARGETS = {"vs_fused_adam_max": {2: 1.8, 4: 3.0, 8: 6.0}, "reuse_vs_fused_adam_max": 1.3,
           "vs_reference_min": 5.0}


def copy_bandwidth(n: int, rounds: int) -> float:
    """torch's copy_ of n float32 elements, in bytes read and written per second: the median of
    ``rounds`` copies after at least half a second of warm-up copies (the first copies of a
    process ran tens of times slower on a busy machine)."""
    src = torch.randn(n)
    dst = torch.empty(n)
    start = time.perf_counter()
    while time.perf_counter() - start < 0.5:
        dst.copy_(src)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * 4 * n / statistics.median(times)


def make_shared(p_total: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [p_total // N_TENSORS] * N_TENSORS
    sizes[-1] += p_total - sum(sizes)
    return [torch.randn(n, generator=g).requires_grad_() for n in sizes]


class CopyStep:
    """torch's ``copy_`` of P float32 elements, timed in the same rounds as the steps so that the
    bandwidth a row is compared with is that of the same state of the machine."""

    def __init__(self, p_total):
        self.src, self.dst = torch.randn(p_total), torch.empty(p_total)

    def setup(self):
        pass

    def step(self):
        self.dst.copy_(self.src)


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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--quick", action="store_true",
                    help="P = 1M, K = 2, 3 rounds, 1 reference step (options given win)")
    ap.add_argument("--sizes", type=list_of(_size), default=None,
                    help="comma-separated P in millions, e.g. 0.5,16 (default 1,16)")
    ap.add_argument("--tasks", type=list_of(positive_int), default=None,
                    help="comma-separated K >= 1 (default 2,4,8)")
    ap.add_argument("--rounds", type=positive_int, default=None,
                    help="timed steps per median (default 11)")
    ap.add_argument("--reference-rounds", type=non_negative_int, default=None,
                    help="timed steps of the reference (default 3; 0: not timed)")
    ap.add_argument("--json", type=Path, default=None,
                    help="write the results here (its folder is made)")
    args = ap.parse_args(argv)
    args.json = check_json_path(ap, args.json)

    quick = args.quick
    sizes = args.sizes or ([M] if quick else [M, 16 * M])
    tasks = args.tasks or ([2] if quick else [2, 4, 8])
    rounds = args.rounds or (3 if quick else 11)
    ref_rounds = (args.reference_rounds if args.reference_rounds is not None
                  else 1 if quick else 3)

    info = {
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "openmp_threads": pub_native._native._C.omp_max_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pub_native": pub_native.__version__,
    }
    fused_p = max(sizes)
    bw = copy_bandwidth(fused_p, rounds=max(rounds, 11))
    print(f"pub_native {info['pub_native']}, torch {info['torch']}, Python {info['python']}")
    print(f"{info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}, "
          f"OpenMP threads {info['openmp_threads']}")
    print(f"copy bandwidth (torch copy_, {_mega(fused_p)} float32, median of "
          f"{max(rounds, 11)}): {bw / 1e9:.2f} GB/s")
    fused_bw = 7 * 4 * fused_p / bench_fused_adam(fused_p, max(rounds, 5))
    print(f"fused Adam on its own byte model 7·4·P ({_mega(fused_p)}): {fused_bw / 1e9:.2f} GB/s "
          f"({fused_bw / bw:.0%} of copy)")
    print(f"medians of {rounds} rounds of fused Adam, PUB solve, PUB reuse and copy_ timed in "
          f"turn (reference: {ref_rounds} steps, last); each ratio over fused Adam, and each "
          "fraction of copy bandwidth, is the median over the rounds of the ratio within a "
          "round\n", flush=True)
    header = (f"{'P':>5} {'K':>2} | {'fused Adam':>10} {'PUB solve':>10} {'PUB reuse':>10} "
              f"{'reference':>10} | {'PUB/fused':>9} {'reuse/fused':>11} {'ref/PUB':>8} | "
              f"{'GB/s':>6} {'of copy':>7} | {'solver':>8}")
    rows = []
    results = {"machine": info, "copy_bandwidth": bw, "fused_adam_bandwidth": fused_bw,
               "rows": rows, "targets": TARGETS}
    for p_total in sizes:
        for k in tasks:
            # Fused Adam, a weight-update step, a reuse step and a copy in turn, round after
            # round.
            pub, reuse = PubStep(p_total, k, every=1), PubStep(p_total, k, every=10**9)
            times = round_robin_times([fused_adam_step(p_total), pub, reuse,
                                       CopyStep(p_total)], rounds)
            t_fused, t_pub, t_reuse, t_copy = (statistics.median(t) for t in times)
            solve = pub.opt.stats.get("solve_time", float("nan"))
            del pub, reuse
            bytes_model = (2 * k + 8) * 4 * p_total
            row = {
                "P": p_total, "K": k, "fused_adam_s": t_fused, "pub_step_s": t_pub,
                "pub_reuse_step_s": t_reuse, "copy_s": t_copy, "solve_s": solve,
                "pub_over_fused": paired_ratio(times[1], times[0]),
                "reuse_over_fused": paired_ratio(times[2], times[0]),
                "bytes_model": bytes_model, "achieved_bandwidth": bytes_model / t_pub,
                # (bytes / t_pub) / (2·4·P / t_copy), the median over the rounds
                "bandwidth_fraction": paired_ratio(times[3], times[1]) * bytes_model
                / (2 * 4 * p_total),
                "reference_step_s": float("nan"), "reference_over_pub": float("nan"),
            }
            rows.append(row)
            print(f"measured P = {_mega(p_total)}, K = {k}: fused Adam {t_fused * 1e3:.1f} ms, "
                  f"PUB {t_pub * 1e3:.1f} ms ({row['pub_over_fused']:.2f}x), reuse "
                  f"{t_reuse * 1e3:.1f} ms ({row['reuse_over_fused']:.2f}x)", flush=True)
            if args.json:  # what is measured so far, in case the run is stopped
                write_json(args.json, results)
    # The reference after every round robin: its large temporaries, freed, leave the memory that
    # the next tensors get in another state (fused Adam ran at 5.7 instead of 9 ms after them).
    for row in rows:
        row["reference_step_s"] = t_ref = bench_reference(row["P"], row["K"], ref_rounds)
        row["reference_over_pub"] = t_ref / row["pub_step_s"]
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        t_fused, t_pub, t_reuse = r["fused_adam_s"], r["pub_step_s"], r["pub_reuse_step_s"]
        timed = not math.isnan(r["reference_step_s"])
        t_ref = f"{r['reference_step_s'] * 1e3:>8.0f}ms" if timed else f"{'-':>10}"
        ref_ratio = f"{r['reference_over_pub']:>7.1f}x" if timed else f"{'-':>8}"
        print(f"{_mega(r['P']):>5} {r['K']:>2} | {t_fused * 1e3:>8.1f}ms {t_pub * 1e3:>8.1f}ms "
              f"{t_reuse * 1e3:>8.1f}ms {t_ref} | "
              f"{r['pub_over_fused']:>8.2f}x {r['reuse_over_fused']:>10.2f}x "
              f"{ref_ratio} | {r['achieved_bandwidth'] / 1e9:>6.2f} "
              f"{r['bandwidth_fraction']:>6.0%} | {r['solve_s'] * 1e6:>6.0f}µs")
    if args.json:
        write_json(args.json, results)

    p_opts = max(sizes)
    option_rows = results["option_sets"] = bench_option_sets(p_opts, rounds)
    print(f"\nother option sets at P = {_mega(p_opts)}: torch's step, pub_native's base step "
          "(K = 1) and a PUB weight-update step (K = 2), timed in turn")
    print(f"{'options':<26} | {'torch':>16} {'K = 1':>8} {'K = 2':>8} | {'K1/torch':>8} "
          f"{'K2/torch':>8}")
    for r in option_rows:
        print(f"{r['options']:<26} | {r['torch_impl']:>7} {r['torch_s'] * 1e3:>6.1f}ms "
              f"{r['k1_s'] * 1e3:>6.1f}ms {r['k2_s'] * 1e3:>6.1f}ms | "
              f"{r['k1_over_torch']:>7.2f}x {r['k2_over_torch']:>7.2f}x")

    # The verdicts compare the values as printed (two decimals), so that a printed 1.80x is
    # never a FAIL against 1.8.
    verdict = {}
    for r in rows:
        if r["P"] != 16 * M:
            continue
        k = r["K"]
        limit = TARGETS["vs_fused_adam_max"].get(k)
        if limit is not None:
            value = round(r["pub_over_fused"], 2)
            verdict[f"K={k} step"] = (value, "≤", limit, value <= limit)
        if k == 2:
            limit = TARGETS["reuse_vs_fused_adam_max"]
            value = round(r["reuse_over_fused"], 2)
            verdict["K=2 reuse"] = (value, "≤", limit, value <= limit)
            if not math.isnan(r["reference_over_pub"]):
                limit = TARGETS["vs_reference_min"]
                value = round(r["reference_over_pub"], 2)
                verdict["K=2 vs reference"] = (value, "≥", limit, value >= limit)
    if verdict:
        print("\nP = 16M, targets:")
        for name, (value, rel, limit, ok) in verdict.items():
            print(f"  {name:<18} {value:6.2f}x  (target {rel} {limit}x)  "
                  f"{'PASS' if ok else 'FAIL'}")
    else:
        print("\ntargets: none measured (they are set at P = 16M for K = 2, 4 and 8: "
              "--sizes 16 --tasks 2,4,8)")
    if args.json:
        results["verdict"] = {k: v[3] for k, v in verdict.items()}
        write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


def _mega(p: int) -> str:
    return f"{p / M:g}M"


def _size(text: str) -> int:
    """P in millions (2^20 elements), e.g. 16 or 0.5, to at least N_TENSORS elements."""
    try:
        millions = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of millions: {text!r}") from None
    p = round(millions * M) if math.isfinite(millions) else 0
    if p < N_TENSORS:
        raise argparse.ArgumentTypeError(f"P = {text}M is less than {N_TENSORS} elements")
    return p


if __name__ == "__main__":
    sys.exit(main())
