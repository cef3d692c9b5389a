"""Helper of test_balancers.py (not a test module): FAMO under DistributedDataParallel with
gradient accumulation (two backward calls before each step).

``python ddp_accumulate.py PORT OUTFILE`` forks 2 gloo processes on 127.0.0.1; each trains the
same small model with DDP (``gradient_as_bucket_view`` off and on) and FAMO (``max_norm`` 0, and
100, which never clips), and rank 0 writes the largest difference of each run's ``.grad`` from
the run without clipping to OUTFILE (JSON).
"""

from __future__ import annotations

import datetime
import json
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import TrunkHeads

from pub_native.balancers import FAMO


def _work(rank: int, world: int, port: int, out: str) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    grads = {}
    for bucket_view, max_norm in ((False, 0.0), (False, 100.0), (True, 100.0)):
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(
            TrunkHeads(4, 8), gradient_as_bucket_view=bucket_view)
        bal = FAMO(model.parameters(), 2, max_norm=max_norm)
        for step in range(2):
            model.zero_grad()
            for micro in range(2):
                g = torch.Generator().manual_seed(100 * step + 10 * micro + rank)
                x, y = torch.randn(6, 4, generator=g), torch.randn(2, 6, generator=g)
                bal.backward([((o - y[i]) ** 2).mean() for i, o in enumerate(model(x))])
        grads[(bucket_view, max_norm)] = [p.grad.clone() for p in model.parameters()]
    if rank == 0:
        ref = grads[(False, 0.0)]
        diffs = {f"bucket_view={bv}": max((a - b).abs().max().item()
                                          for a, b in zip(grads[(bv, 100.0)], ref))
                 for bv in (False, True)}
        with open(out, "w") as f:
            json.dump(diffs, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.start_processes(_work, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2,
                       start_method="fork")
