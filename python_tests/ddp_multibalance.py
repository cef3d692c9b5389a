"""Helper of test_multibalance.py (not a test module): MultiBalance under torch.distributed.

``python ddp_multibalance.py PORT OUTDIR`` spawns 2 gloo processes on 127.0.0.1 that train the
same small model for a few steps, each on its half of every batch, with the trunk wrapped in
DistributedDataParallel, and write their task weights and final parameters to
OUTDIR/rank{r}.json. :func:`train` with ``world=1`` is the one-process reference.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
from helpers import gloo_group
from torch import nn

from pub_native.balancers import MultiBalance

STEPS = 3
BATCH = 64


def _data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 6, generator=g)
    y = torch.stack([x[:, 0] - x[:, 1], 10 * torch.sin(x[:, 2])], dim=1)
    return x, y + 0.1 * torch.randn(BATCH, 2, generator=g)


def train(world: int, rank: int) -> dict:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
    heads = nn.ModuleList(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1))
                          for _ in range(2))
    params = list(trunk.parameters()) + list(heads.parameters())
    names = [f"trunk.{n}" for n, _ in trunk.named_parameters()] + \
        [f"heads.{n}" for n, _ in heads.named_parameters()]
    model_trunk = trunk
    if world > 1:
        model_trunk = nn.parallel.DistributedDataParallel(trunk)
    bal = MultiBalance(params, ema=0.5)
    opt = torch.optim.Adam(params, lr=0.05)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    weights = []
    for step in range(STEPS):
        x, y = _data(step)
        x, y = x[rows], y[rows]
        z = model_trunk(x)
        losses = [nn.functional.mse_loss(h(z).squeeze(1), y[:, k]) for k, h in enumerate(heads)]
        opt.zero_grad()
        bal.backward(losses, z)
        opt.step()
        weights.append(bal.weights.tolist())
    return {"weights": weights, "gram_00": float(bal.gram[0, 0]),
            "params": {n: p.detach().reshape(-1).tolist() for n, p in zip(names, params)}}


def misused(rank: int, mode: str) -> dict:
    """The misuses the first backward must refuse: trunk and heads in one DDP module
    (``whole``), no DDP module at all (``unwrapped``: the trunk's gradients would stay
    each process's own), or the trunk's DDP module inside its ``join()`` context for uneven
    inputs (``join``: a joined process does not stand in for MultiBalance's collectives)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"trunk": nn.Sequential(nn.Linear(6, 8), nn.ReLU()),
                           "heads": nn.ModuleList(nn.Linear(8, 1) for _ in range(2))})
    ddp = {"whole": lambda: nn.parallel.DistributedDataParallel(model),
           "join": lambda: nn.parallel.DistributedDataParallel(model["trunk"])}.get(
               mode, lambda: None)()  # kept
    bal = MultiBalance(list(model.parameters()))
    x, y = _data(0)
    try:
        with ddp.join() if mode == "join" else contextlib.nullcontext():
            z = (ddp if mode == "join" else model["trunk"])(x[rank::2])
            losses = [nn.functional.mse_loss(h(z).squeeze(1), y[rank::2, k])
                      for k, h in enumerate(model["heads"])]
            bal.backward(losses, z)
    except (ValueError, NotImplementedError) as exc:
        return {"error": str(exc)}
    return {"error": None, "ddp": ddp is not None}


def _worker(rank: int, port: int, out: str, mode: str = "trunk") -> None:
    with gloo_group(rank, 2, port):
        result = train(world=2, rank=rank) if mode == "trunk" else misused(rank, mode)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    mode = sys.argv[3] if len(sys.argv) > 3 else "trunk"
    torch.multiprocessing.spawn(_worker, args=(int(sys.argv[1]), sys.argv[2], mode), nprocs=2)
