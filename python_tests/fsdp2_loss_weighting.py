"""Worker of test_balancer_ddp_weighting.py's FSDP2 test: 2 gloo processes, a model under
torch.distributed.fsdp.fully_shard (on the whole model or on its trunk alone), and each
one-backward loss weighting (LS, Uncertainty, FAMO
with and without max_norm) called on its sharded parameters. Writes what each call raised to
rank<r>.pt."""

from __future__ import annotations

import itertools
import os

import torch
from helpers import TrunkHeads, gloo_worker

from pub_native import balancers

MAKERS = {
    "LS": lambda p: balancers.LS(p),
    "Uncertainty": lambda p: balancers.Uncertainty(p, n_tasks=2),
    "FAMO": lambda p: balancers.FAMO(p, n_tasks=2, max_norm=0.0),
    "FAMO clipped": lambda p: balancers.FAMO(p, n_tasks=2),
}


def main() -> None:
    with gloo_worker() as args:
        run(args)


def run(args) -> None:
    from torch.distributed.fsdp import fully_shard

    x, ys = torch.randn(16, 8), [torch.randn(16), torch.randn(16)]
    raised = {}
    for (name, make), part in itertools.product(MAKERS.items(), ("model", "trunk")):
        torch.manual_seed(0)
        model = TrunkHeads()
        fully_shard(model if part == "model" else model.trunk)  # all or part of it sharded
        bal = make(list(model.parameters()))
        try:
            bal.backward([((o - y) ** 2).mean() for o, y in zip(model(x), ys)])
            raised[name, part] = None
        except Exception as exc:  # what the test checks
            raised[name, part] = (type(exc).__name__, str(exc),
                                  [p.grad is None for p in model.parameters()])
    torch.save(raised, os.path.join(args.out, f"rank{args.rank}.pt"))


if __name__ == "__main__":
    main()
