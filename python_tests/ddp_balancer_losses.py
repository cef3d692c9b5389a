"""Worker of test_balancer_ddp_weighting.py's non-finite-loss and PCGrad tests: 2 gloo processes.
MGDA-UB on a DistributedDataParallel model, a good first step, then a step whose loss is
non-finite on the last process only: NaN without a GradScaler, Inf with a finite gradient under
one. PCGrad with 4 conflicting tasks, seed=None (a different seed drawn on each process) or an
explicit seed that differs between the processes. Writes what each case did (the error, or the
parameters or gradients after the steps) to rank<r>.pt."""

from __future__ import annotations

import os

import torch
from helpers import gloo_worker
from torch import nn

from pub_native import balancers


def case(rank: int, world: int, scaled: bool):
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))
    params = list(model.parameters())
    bal = balancers.MGDAUB(params)
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0) if scaled else None

    def losses(bad: bool):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(rank))
        out = model(x)
        items = [out[:, 0].pow(2).mean(), out[:, 1].pow(2).mean()]
        if bad and rank == world - 1:  # a finite gradient, a non-finite value
            items[1] = items[1] + (float("inf") if scaled else float("nan"))
        return items

    for bad in (False, True):
        opt.zero_grad()
        try:
            if scaler is None:
                bal.backward(losses(bad))
                opt.step()
            else:
                bal.backward([scaler.scale(loss) for loss in losses(bad)], scaler=scaler)
                scaler.step(opt)
                scaler.update()
        except FloatingPointError as exc:
            return {"error": str(exc)}
    return {"params": [p.detach().clone() for p in params]}


def pcgrad_case(rank: int, seed):
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)).double())
    params = list(model.parameters())
    bal = balancers.PCGrad(params, seed=seed)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64)  # tasks that conflict
    grads = []
    for _ in range(4):
        for p in params:
            p.grad = None
        out = model(x)
        losses = [(out[:, i] - signs[i] * x.sum(1)).pow(2).mean() for i in range(4)]
        try:
            bal.backward(losses)
        except ValueError as exc:
            return {"error": str(exc), "grads": [p.grad for p in params]}
        grads.append([p.grad.clone() for p in params])
    return {"grads": grads, "weights": bal.weights}


def main() -> None:
    with gloo_worker() as args:
        result = {scaled: case(args.rank, args.world, scaled) for scaled in (False, True)}
        result["pcgrad"] = {seed: pcgrad_case(args.rank, None if seed is None else
                                              seed + args.rank) for seed in (None, 3)}
        torch.save(result, os.path.join(args.out, f"rank{args.rank}.pt"))


if __name__ == "__main__":
    main()
