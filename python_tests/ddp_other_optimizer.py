"""Worker of test_training_loop.py's DDP test of parameters on another optimizer: 2 gloo
processes, a DistributedDataParallel MMoE whose embedding table trains on torch's Adam and the
rest on PUB, each process on its half of every batch. Writes the parameters after 3 steps to
rank<r>.pt."""

from __future__ import annotations

import argparse
import datetime
import os
import warnings

import torch
import torch.distributed as dist
from helpers import MMoE, mmoe_batch, mmoe_losses

import pub_native


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=args.rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(MMoE())
    table = model.module.embedding.weight
    opt = pub_native.Adam([p for p in model.parameters() if p is not table], lr=1e-2)
    table_opt = torch.optim.Adam([table], lr=1e-2)
    half = 8 // args.world
    for t in range(3):
        idx, y = mmoe_batch(t)
        rows = slice(args.rank * half, (args.rank + 1) * half)
        opt.zero_grad()
        table_opt.zero_grad()
        opt.backward(mmoe_losses(model, (idx[rows], y[rows])))
        opt.step()
        table_opt.step()
    torch.save([p.detach().clone() for p in model.module.parameters()],
               os.path.join(args.out, f"rank{args.rank}.pt"))
    # Neither process leaves while the other still talks to it (gloo aborts the one left).
    dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
