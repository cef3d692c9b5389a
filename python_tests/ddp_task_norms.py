"""Worker of test_distributed.py's per-task norm test: 2 gloo processes, sharded PUB state, a
shared parameter of one element, so that one process holds no piece of it. Writes each norm
type's per-task norms to rank<r>.pt."""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from helpers import gloo_worker

import pub_native

NORM_TYPES = (2.0, 1.0, 0.0, math.inf, -math.inf, -1.5)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Parameter(torch.tensor([1.5]))
        self.h1, self.h2 = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.h1(x * self.a), self.h2(x * self.a)


def main() -> None:
    with gloo_worker() as args:
        run(args)


def run(args) -> None:
    model = torch.nn.parallel.DistributedDataParallel(Model())
    opt = pub_native.Adam(model.parameters(), lr=1e-2, shared=[model.module.a])
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(args.rank))
    # The reference: each task's gradient of `a`, averaged over the processes.
    m = model.module
    y1, y2 = m(x)
    ref = torch.cat([torch.autograd.grad(loss, m.a)[0]
                     for loss in (y1.pow(2).mean(), (y2 - 1).pow(2).mean())]).double()
    dist.all_reduce(ref)
    y1, y2 = model(x)
    opt.backward([y1.pow(2).mean(), (y2 - 1).pow(2).mean()])
    norms = {n: opt.task_grad_norms(n) for n in NORM_TYPES}
    pieces = [hi - lo for lo, hi, _ in opt._dp.pieces]
    torch.save({"norms": norms, "pieces": pieces, "grads": ref / 2},
               os.path.join(args.out, f"rank{args.rank}.pt"))


if __name__ == "__main__":
    main()
