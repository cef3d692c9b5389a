"""Worker of test_ddp_subsets.py (not a test module): 2 gloo processes whose optimizers hold
subsets of a DistributedDataParallel module's parameters — each its own partition, as
torch.distributed.optim.ZeroRedundancyOptimizer makes them, or the same subset on every process —
and processes that train models of their own. Writes what each case saw to OUT/rank<r>.pt;
an error the case expects is recorded (type and message), not raised, so that an aborted or
failed process is what fails the test."""

from __future__ import annotations

import functools
import os

import torch
from helpers import gloo_worker
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

import pub_native
from pub_native.balancers import IMTLG


class Model(nn.Module):
    """A trunk and two heads of one shape. ``big``: a first layer far larger than the rest, so
    that ZeRO's partition gives one process one parameter and the other three."""

    def __init__(self, big: bool = False):
        super().__init__()
        torch.manual_seed(0)
        width = 64 if big else 16
        self.l1 = nn.Linear(8, width, bias=False)
        self.l2 = nn.Linear(width, 16, bias=False)
        self.heads = nn.ModuleList(nn.Linear(16, 8, bias=False) for _ in range(2))

    def forward(self, x):
        z = torch.tanh(self.l2(torch.tanh(self.l1(x))))
        return [h(z).mean(-1) for h in self.heads]


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(100 * step + rank)  # each process its own slice
    return torch.randn(16, 8, generator=g), [torch.randn(16, generator=g) for _ in range(2)]


def losses(model, rank: int, step: int) -> list[torch.Tensor]:
    x, ys = batch(rank, step)
    return [((o - y) ** 2).mean() for o, y in zip(model(x), ys)]


def attempt(fn) -> tuple[str, str] | None:
    """(type, message) of the error ``fn`` raised, None if it returned."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded for the test to judge
        return type(e).__name__, str(e)
    return None


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def case_zero_pub(rank: int, big: bool) -> dict:
    """ZeRO over pub_native.Adam: the PUB step, zero.optim.backward(losses), is refused."""
    model = DDP(Model(big))
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=pub_native.Adam, lr=1e-2)
    before = params_of(model)
    zero.zero_grad()
    error = attempt(lambda: zero.optim.backward(losses(model, rank, 0)))
    local = sum(len(g["params"]) for g in zero.optim.param_groups)
    return {"error": error, "local": local, "before": before, "after": params_of(model)}


def case_zero_plain(rank: int) -> dict:
    """Plain ZeRO steps over pub_native.Adam and over torch.optim.Adam, before and after a
    refused PUB step."""
    runs = {}
    for name, cls in (("pub", pub_native.Adam), ("torch", torch.optim.Adam)):
        model = DDP(Model())
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, lr=1e-2)
        for step in range(4):
            if step == 2 and name == "pub":
                zero.zero_grad()
                before = params_of(model)
                error = attempt(lambda zero=zero, model=model:
                                zero.optim.backward(losses(model, rank, 99)))
                unchanged = all(torch.equal(a, b) for a, b in zip(before, params_of(model)))
            zero.zero_grad()
            sum(losses(model, rank, step)).backward()
            zero.step()
        runs[name] = params_of(model)
    return {"error": error, "unchanged": unchanged, **runs}


def case_subset(rank: int) -> dict:
    """Optimizers over subsets of equal shapes but different parameters per process (refused,
    a balancer's too), then over the same subset on every process (trains)."""
    model = DDP(Model())
    m = model.module
    own = [m.l1.weight, m.l2.weight, m.heads[rank].weight]
    before = params_of(model)
    opt = pub_native.Adam(own, lr=1e-2)
    error = attempt(lambda: opt.backward(losses(model, rank, 0)))
    balancer_error = attempt(lambda: IMTLG(own).backward(losses(model, rank, 0)))
    unchanged = all(torch.equal(a, b) for a, b in zip(before, params_of(model)))
    same = pub_native.Adam([m.l2.weight, m.heads[0].weight, m.heads[1].weight], lr=1e-2)
    for step in range(3):
        same.zero_grad()
        same.backward(losses(model, rank, step))
        same.step()
    return {"error": error, "balancer_error": balancer_error, "unchanged": unchanged,
            "before": before, "after": params_of(model)}


def case_own_models(rank: int) -> dict:
    """No DDP module, and a model of its own on each process (another number of parameters):
    each trains alone."""
    torch.manual_seed(rank)
    layers = [nn.Linear(8, 8) for _ in range(rank + 1)]
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(2))
    trunk = nn.Sequential(*layers)
    params = [*trunk.parameters(), *heads.parameters()]
    before = [p.detach().clone() for p in params]
    opt = pub_native.Adam(params, lr=1e-2)
    for step in range(2):
        x, ys = batch(rank, step)
        z = torch.tanh(trunk(x))
        opt.zero_grad()
        opt.backward([((h(z).squeeze(-1) - y) ** 2).mean() for h, y in zip(heads, ys)])
        opt.step()
    return {"before": before, "after": [p.detach().clone() for p in params]}


def case_outside_on_one(rank: int) -> dict:
    """The last process also gives the optimizer (and a balancer) a tensor outside the DDP
    module: it refuses that set-up, and the other must not wait for it in the set-up check."""
    errors = {}
    for kind in ("pub", "balancer"):
        torch.manual_seed(0)
        model = DDP(Model())
        params = list(model.parameters())
        if rank == 1:
            params.append(nn.Parameter(torch.zeros(())))
        taker = pub_native.Adam(params, lr=1e-2) if kind == "pub" else IMTLG(params)
        errors[kind] = attempt(functools.partial(taker.backward, losses(model, rank, 0)))
    return errors


def main() -> None:
    def add_case(parser):
        parser.add_argument("--case", required=True,
                            choices=("zero_pub", "zero_pub_big", "zero_plain", "subset",
                                     "own_models", "outside_on_one"))

    with gloo_worker(add_case) as args:
        if args.case.startswith("zero_pub"):
            result = case_zero_pub(args.rank, big=args.case == "zero_pub_big")
        else:
            result = globals()[f"case_{args.case}"](args.rank)
        torch.save(result, os.path.join(args.out, f"rank{args.rank}.pt"))


if __name__ == "__main__":
    main()
