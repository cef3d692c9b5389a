"""Helper of test_balancer_ddp_weighting.py (not a test module): Uncertainty and FAMO under
torch.distributed.

``python ddp_loss_weighting.py --rank R --world N --port P --out DIR`` is one of N gloo processes
on 127.0.0.1. Each trains the same small float64 model for a few steps on its equal slice of every
batch, with each loss weighting in two set-ups: the model wrapped in DistributedDataParallel
(``process_group="auto"``), the model unwrapped with ``process_group=<the world>`` (the
balancer averages the gradients itself), and the model unwrapped with ``"auto"`` (each process
on its own, as LS). It writes its balancer state, task weights and
parameters to DIR/rank{R}.pt. :func:`train` with ``world=1`` is the one-process reference on the
whole batches.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
from helpers import gloo_worker
from torch import nn

from pub_native.balancers import FAMO, Uncertainty

STEPS = 5
BATCH = 32  # divisible by the processes: their mean losses average to the batch's
#: The steps after which FAMO's update() is called; after the others the next backward updates
#: the logits from its own losses ("next batch").
FAMO_UPDATES = (0, 1, 3)
KINDS = ("uncertainty", "famo")
MODES = ("ddp", "group", "alone")


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(12, 1) for _ in range(2))

    def forward(self, x):
        z = self.trunk(x)
        return [h(z).squeeze(-1) for h in self.heads]


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 6, generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, 2, generator=g, dtype=torch.float64)
    # The slices differ a lot (as real shards do): task 1's targets are 5× larger in the first
    # half, so each process's own losses would give other weights.
    y[: BATCH // 2, 1] *= 5.0
    return x, y


def train(kind: str, mode: str, world: int = 1, rank: int = 0) -> dict:
    torch.manual_seed(0)
    model = Model().double()
    params = list(model.parameters())
    forward = model
    group = "auto"
    if world > 1 and mode == "ddp":
        forward = nn.parallel.DistributedDataParallel(model)
    elif world > 1 and mode == "group":
        group = torch.distributed.group.WORLD
    # "alone": unwrapped with process_group="auto": each process trains on its own slice.
    if kind == "uncertainty":
        bal = Uncertainty(params, n_tasks=2, process_group=group)
        opt = torch.optim.Adam([{"params": params}, {"params": bal.parameters(), "lr": 0.1}],
                               lr=0.02)
    else:
        bal = FAMO(params, n_tasks=2, w_lr=0.1, process_group=group)
        opt = torch.optim.Adam(params, lr=0.02)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    weights, updates = [], []

    def losses(x, y):
        return [((o - y[:, i]) ** 2).mean() for i, o in enumerate(forward(x))]

    for step in range(STEPS):
        x, y = batch(step)
        x, y = x[rows], y[rows]
        opt.zero_grad()
        bal.backward(losses(x, y))
        opt.step()
        weights.append(bal.weights.clone())
        if kind == "famo":
            updates.append(bal.stats["update"])  # None, or "next batch" (in backward)
            if step in FAMO_UPDATES:
                with torch.no_grad():
                    bal.update(losses(x, y))
                updates.append(bal.stats["update"])  # "explicit"
    state = bal.log_vars if kind == "uncertainty" else bal.logits
    return {"state": state.detach().clone(), "weights": torch.stack(weights),
            "params": [p.detach().clone() for p in params], "updates": updates,
            "group": bal._dp_group is not None, "own": bal._dp_own}


def main() -> None:
    with gloo_worker() as args:
        try:
            result = {(kind, mode): train(kind, mode, args.world, args.rank)
                      for kind in KINDS for mode in MODES}
        except Exception:  # reported by the test, which shows it
            result = {"error": traceback.format_exc()}
        torch.save(result, Path(args.out) / f"rank{args.rank}.pt")


if __name__ == "__main__":
    main()
