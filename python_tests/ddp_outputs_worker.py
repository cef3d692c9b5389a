"""Worker of test_distributed.py's test of detection through DistributedDataParallel's output
node: 2 gloo processes. A trunk, two heads and a user tower whose model returns (``mode``) a
dict holding None between its tensors ("dict"), the per-head losses ("losses"; "stacked": given
to backward as torch.stack of them), or the losses unbound from a vector computed from the
heads' joined outputs ("joined-losses"), wrapped with
``find_unused_parameters`` or ``static_graph`` (which pass every output through that node).
Writes, per case, the names of the parameters that pub_native.Adam and MGDA-UB found shared,
and those MultiBalance found in a trunk returning a dict with None before its representation
(and gave a gradient), to rank<r>.pt."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from helpers import gloo_worker
from torch import nn

import pub_native

CASES = [("dict", "find_unused"), ("dict", "static"), ("losses", "find_unused"),
         ("losses", "static"), ("joined-losses", "find_unused"), ("stacked", "find_unused")]


class Model(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.trunk, self.user = nn.Linear(5, 8), nn.Linear(5, 3)
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(2))

    def forward(self, x, y):
        z = torch.relu(self.trunk(x))
        if self.mode == "dict":  # (the None and the user tower shifted the output numbers)
            return {"ctr": self.heads[0](z)[:, 0], "aux_loss": None,
                    "cvr": self.heads[1](z)[:, 0], "user_emb": self.user(x)}
        if self.mode in ("losses", "stacked"):
            return tuple(F.mse_loss(h(z)[:, 0], y[:, i]) for i, h in enumerate(self.heads))
        out = torch.cat([h(z) for h in self.heads], 1)
        return tuple(F.mse_loss(out, y, reduction="none").mean(0).unbind())


def losses(mode, out, y):
    if mode == "dict":
        return [F.mse_loss(out["ctr"], y[:, 0]), F.mse_loss(out["cvr"], y[:, 1])]
    return torch.stack(out) if mode == "stacked" else list(out)


def shared_names(model, wrapped, mode, x, y) -> list:
    names = {id(p): n for n, p in model.named_parameters()}
    found = []
    for make in (pub_native.Adam, pub_native.balancers.MGDAUB):
        method = make(wrapped.parameters())
        method.backward(losses(mode, wrapped(x, y), y))
        shared = method.shared_parameters if make is pub_native.Adam else method.shared
        found.append(sorted(names[id(p)] for p in shared))
        model.zero_grad(set_to_none=True)
    return found


class Trunk(nn.Module):
    """MultiBalance's trunk (inside DDP, the heads outside), returning z between None and
    another tensor."""

    def __init__(self):
        super().__init__()
        self.enc, self.aux_head = nn.Linear(5, 6), nn.Linear(5, 6)

    def forward(self, x):
        return {"mask": None, "z": torch.tanh(self.enc(x)), "aux": self.aux_head(x)}


def multibalance_split(wrap: str | None, x, y) -> list:
    """The names of the trunk parameters MultiBalance found, and of those given a gradient."""
    torch.manual_seed(0)
    trunk, heads = Trunk(), nn.ModuleList(nn.Linear(6, 1) for _ in range(2))
    model = trunk if wrap is None else nn.parallel.DistributedDataParallel(
        trunk, find_unused_parameters=wrap == "find_unused", static_graph=wrap == "static")
    bal = pub_native.balancers.MultiBalance([*trunk.parameters(), *heads.parameters()],
                                            **({"process_group": None} if wrap is None else {}))
    z = model(x)["z"]
    bal.backward([F.mse_loss(h(z)[:, 0], y[:, i]) for i, h in enumerate(heads)], z)
    names = {id(p): n for n, p in trunk.named_parameters()}
    return [[names[id(p)] for p in bal.trunk],
            sorted(n for n, p in trunk.named_parameters() if p.grad is not None)]


def main() -> None:
    with gloo_worker() as args:
        g = torch.Generator().manual_seed(args.rank)
        x, y = torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)
        result = {}
        for mode, how in CASES:
            torch.manual_seed(0)
            model = Model(mode)
            wrapped = nn.parallel.DistributedDataParallel(
                model, find_unused_parameters=how == "find_unused", static_graph=how == "static")
            result[(mode, how)] = {"ddp": shared_names(model, wrapped, mode, x, y),
                                   "alone": shared_names(model, model, mode, x, y)}
        for how in ("find_unused", "static"):
            result[("multibalance", how)] = {"ddp": multibalance_split(how, x, y),
                                             "alone": multibalance_split(None, x, y)}
        torch.save(result, os.path.join(args.out, f"rank{args.rank}.pt"))


if __name__ == "__main__":
    main()
