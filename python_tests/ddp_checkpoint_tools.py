"""Worker of test_checkpoint_tools.py: 2 gloo processes, a DDP model whose PUB state is
sharded over them; torch.distributed.checkpoint's get_optimizer_state_dict (a collective: the
state is gathered) and set_optimizer_state_dict into a new optimizer, then 5 steps against an
uninterrupted run. Writes the largest parameter difference and K to rank<r>.pt."""

from __future__ import annotations

import copy

import torch
from helpers import TrunkHeads, gloo_worker
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

import pub_native


def _step(model, opt, t: int, rank: int) -> None:
    g = torch.Generator().manual_seed(100 * t + rank)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 2, generator=g)
    opt.zero_grad()
    opt.backward([((o - y[:, i]) ** 2).mean() for i, o in enumerate(model(x))])
    opt.step()


def main() -> None:
    with gloo_worker() as args:
        torch.manual_seed(0)
        base = TrunkHeads()
        saved, uninterrupted, resumed = (DistributedDataParallel(copy.deepcopy(base))
                                         for _ in range(3))
        make = lambda m: pub_native.Adam(m.parameters(), lr=1e-2, update_weights_every=3)  # noqa: E731
        opt_saved, opt_ref = make(saved), make(uninterrupted)
        for t in range(4):
            _step(saved, opt_saved, t, args.rank)
            _step(uninterrupted, opt_ref, t, args.rank)
        osd = get_optimizer_state_dict(saved, opt_saved)
        resumed.module.load_state_dict(saved.module.state_dict())
        opt_resumed = make(resumed)
        set_optimizer_state_dict(resumed, opt_resumed, osd)
        k = opt_resumed.num_tasks
        for t in range(4, 9):
            _step(resumed, opt_resumed, t, args.rank)
            _step(uninterrupted, opt_ref, t, args.rank)
        diff = max((a - b).abs().max().item()
                   for a, b in zip(resumed.parameters(), uninterrupted.parameters()))
        torch.save({"diff": diff, "k": k, "sharded": opt_resumed.shard_state},
                   f"{args.out}/rank{args.rank}.pt")


if __name__ == "__main__":
    main()
