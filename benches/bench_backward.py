"""Benchmark: how to compute the K per-task gradients of the shared parameters.

Compares, on the package's MMoE and PLE models over the embedded census data (and a wider MLP
trunk), the two ways ``opt.backward(losses)`` could fill the K×P buffer:

- loop: K calls of ``torch.autograd.grad`` (graph retained until the last), what PUB uses;
- batched: one ``torch.autograd.grad(stack(losses), ..., grad_outputs=eye(K),
  is_grads_batched=True)``, which runs the backward under vmap.

Both give the same gradients (checked); medians of repeated calls, the forward not timed.

    python benches/bench_backward.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

from pub_native.demo import models
from pub_native.demo.data import load_adult


class Trunk(nn.Module):
    """A wider shared MLP with K linear heads (a larger shared part than the tabular models)."""

    def __init__(self, d_in=256, width=1024, k=2):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width),
                                   nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(k))
        self.d_in = d_in

    def task_losses(self, x):
        h = self.trunk(x)
        return [head(h).pow(2).mean() for head in self.heads]


def loop_grads(losses, params):
    out = []
    for i, loss in enumerate(losses):
        out.append(torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1,
                                       allow_unused=True, materialize_grads=True))
    return [torch.stack([g[j] for g in out]) for j in range(len(params))]


def batched_grads(losses, params):
    k = len(losses)
    return list(torch.autograd.grad(torch.stack(losses), params,
                                    grad_outputs=torch.eye(k), is_grads_batched=True,
                                    allow_unused=True, materialize_grads=True))


def median_ms(fn, make_losses, rounds):
    times = []
    for _ in range(rounds + 1):
        losses = make_losses()
        t0 = time.perf_counter()
        fn(losses)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[1:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    data = load_adult()
    batch = next(iter(data.train.batches(512)))
    cases = []
    for name in ("mmoe", "ple"):
        model = models.build_model(name, data)
        cases.append((name, model, lambda m=model: m.task_losses(batch)))
    for k in (2, 8):
        trunk = Trunk(k=k)
        x = torch.randn(512, trunk.d_in)
        cases.append((f"mlp K={k}", trunk, lambda m=trunk, x=x: m.task_losses(x)))

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; medians of "
          f"{args.rounds} calls\n")
    print(f"{'model':>10} {'K':>2} {'params':>9} | {'loop ms':>8} {'batched ms':>10} "
          f"{'batched/loop':>12}")
    rows = []
    for name, model, make_losses in cases:
        params = list(model.parameters())
        k = len(make_losses())
        ref = loop_grads(make_losses(), params)
        try:
            got = batched_grads(make_losses(), params)
            same = all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(ref, got))
            t_batched = median_ms(lambda ls, ps=params: batched_grads(ls, ps), make_losses,
                                  args.rounds)
        except RuntimeError as exc:  # an operator without a batching rule
            same, t_batched = False, float("nan")
            print(f"  batched backward failed on {name}: {exc}")
        t_loop = median_ms(lambda ls, ps=params: loop_grads(ls, ps), make_losses, args.rounds)
        p_total = sum(p.numel() for p in params)
        rows.append({"model": name, "K": k, "P": p_total, "loop_ms": t_loop,
                     "batched_ms": t_batched, "same_gradients": same})
        print(f"{name:>10} {k:>2} {p_total:>9} | {t_loop:>8.2f} {t_batched:>10.2f} "
              f"{t_batched / t_loop:>11.2f}x{'' if same else '  (gradients differ!)'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
