"""Helper of test_multibalance.py (not a test module): MultiBalance under torch.distributed where
the processes' slices of a batch reach different parts of the graph, and its process_group.

``python ddp_multibalance_cases.py PORT OUTDIR CASE`` spawns 2 gloo processes on 127.0.0.1 that
train a small float64 model for a few steps, each on its half of every batch, and write their
task weights and parameters to OUTDIR/rank{r}.json. :func:`train` with ``world=1`` is the one
process on the whole batch: its losses are the mean over the halves of the losses each process
computes on its half (each half's loss takes the branch that half takes), so that N processes
and one are the same training (losses averaged per process, as DDP assumes). Cases:

- ``branch``: head 1 multiplies by a parameter ``extra`` only on a half with a flagged row:
  unused by both halves at the first step, by half 0 from the second, by both at the third
  (a head parameter with a gradient on one process only).
- ``swap``: head 1 has two parameters of one size, A and B; both halves use both at the first
  step, then half 0 uses A alone and half 1 B alone.
- ``absent``: task 1 has no labelled row in half 1 at the first and third steps: its loss there
  is a penalty on its head alone, which does not reach the representation.
- ``group``: ``process_group`` given (the world) and no DDP module: MultiBalance averages the
  trunk's gradients too.
- ``alone``: ``process_group=None``: each process trains a model of its own (its own seed) on
  its own whole batch, as one process would (``train(world=1, rank=r)``).
- ``norep``: at the second step no task loss of half 1 reaches the representation (both
  are penalties on the heads alone): the process of that half takes part all the same.
- ``sparse``: head 1 adds an ``nn.Embedding(sparse=True)`` lookup, of rows that differ
  between the halves: its gradient is sparse after the all-reduce, as in one process.
- ``around``: at the last step, half 0's task 0 adds a penalty on a trunk parameter, reached
  around the representation (after a first call that split without it): every process
  raises, the one whose graph does so naming the parameter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from helpers import gloo_group
from torch import nn

from pub_native.balancers import MultiBalance

STEPS = 3
BATCH = 16
CASES = ("branch", "swap", "absent", "group", "alone", "around", "norep", "sparse")


def _data(step: int, seed: int = 0):
    g = torch.Generator().manual_seed(100 * seed + step)
    x = torch.randn(BATCH, 4, generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, 2, generator=g, dtype=torch.float64)
    return x, y


def _half_losses(case: str, model: dict, z, y, half: int, step: int) -> list:
    """The two task losses of one half of the batch (means over its rows)."""
    heads = model["heads"]
    l0 = ((heads[0](z).squeeze(1) - y[:, 0]) ** 2).mean()
    p1 = heads[1](z).squeeze(1)
    if case == "branch" and ((half == 0 and step >= 1) or step == 2):
        p1 = p1 * model["extra"]
    if case == "swap":
        if step == 0 or half == 0:
            p1 = p1 * model["A"]
        if step == 0 or half == 1:
            p1 = p1 + model["B"]
    l1 = ((p1 - y[:, 1]) ** 2).mean()
    if case == "sparse":
        rows = torch.arange(len(z)) % 3 + 2 * half
        l1 = l1 + (model["emb"](rows).squeeze(1) * y[:, 1]).mean()
    if case == "absent" and half == 1 and step != 1:
        l1 = 1e-3 * (heads[1].weight ** 2).sum()  # no labels: a penalty that does not reach z
    if case == "norep" and half == 1 and step == 1:
        l0 = 1e-3 * (heads[0].weight ** 2).sum()
        l1 = 1e-3 * (heads[1].weight ** 2).sum()
    if case == "around" and half == 0 and step == STEPS - 1:
        l0 = l0 + 1e-3 * (model["trunk"][0].weight ** 2).sum()
    return [l0, l1]


def _model(seed: int) -> dict:
    torch.manual_seed(seed)
    return {"trunk": nn.Sequential(nn.Linear(4, 8), nn.Tanh()).double(),
            "heads": nn.ModuleList(nn.Linear(8, 1) for _ in range(2)).double(),
            "extra": nn.Parameter(torch.full((1,), 1.5, dtype=torch.float64)),
            "A": nn.Parameter(torch.full((1,), 0.5, dtype=torch.float64)),
            "B": nn.Parameter(torch.full((1,), 2.0, dtype=torch.float64)),
            "emb": nn.Embedding(5, 1, sparse=True).double()}


def train(case: str, world: int, rank: int) -> dict:
    seed = rank if case == "alone" else 0
    model = _model(seed)
    named = [(f"trunk.{n}", p) for n, p in model["trunk"].named_parameters()] + \
        [(f"heads.{n}", p) for n, p in model["heads"].named_parameters()] + \
        [(n, model[n]) for n in (() if case in ("around", "norep") else ("extra", "A", "B"))] + \
        ([("emb", model["emb"].weight)] if case == "sparse" else [])
    params = [p for _, p in named]  # ("around", "norep": every one placed by the first split)
    trunk = model["trunk"]
    kwargs = {}
    if world > 1 and case in ("group", "alone"):
        kwargs["process_group"] = torch.distributed.group.WORLD if case == "group" else None
    elif world > 1:
        trunk = nn.parallel.DistributedDataParallel(trunk)
    bal = MultiBalance(params, ema=0.5, **kwargs)
    opt = torch.optim.SGD(params, lr=0.1)
    weights, grams = [], []
    split = world > 1 and case != "alone"
    for step in range(STEPS):
        x, y = _data(step, seed)
        opt.zero_grad()
        if split:
            rows = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
            z = trunk(x[rows])
            losses = _half_losses(case, model, z, y[rows], rank, step)
        elif case == "alone":
            z = trunk(x)
            losses = _half_losses(case, model, z, y, 0, step)
        else:
            z = trunk(x)
            halves = [_half_losses(case, model, z[h * BATCH // 2:(h + 1) * BATCH // 2],
                                   y[h * BATCH // 2:(h + 1) * BATCH // 2], h, step)
                      for h in range(2)]
            losses = [0.5 * (a + b) for a, b in zip(*halves)]
        bal.backward(losses, z)
        opt.step()
        weights.append(bal.weights.tolist())
        grams.append(bal.gram.tolist())
    return {"weights": weights, "grams": grams,
            "sparse": case == "sparse" and model["emb"].weight.grad.is_sparse,
            "params": {n: p.detach().reshape(-1).tolist() for n, p in named}}


def _worker(rank: int, port: int, out: str, case: str) -> None:
    with gloo_group(rank, 2, port):
        try:
            result = train(case, world=2, rank=rank)
        except Exception as exc:  # reported to the test, which names it
            result = {"error": f"{type(exc).__name__}: {exc}"}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.multiprocessing.spawn(_worker, args=(int(sys.argv[1]), sys.argv[2], sys.argv[3]),
                                nprocs=2)
