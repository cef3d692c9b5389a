"""Benchmark: PUB under DistributedDataParallel against DDP + torch Adam, on gloo processes.

For K tasks on a shared MLP trunk (P shared parameters) with one head per task, each process
trains on its slice of the batch. Per step: the bytes each process sends (ring model: an
all-reduce of n bytes sends 2(N−1)/N·n, a reduce-scatter or all-gather (N−1)/N·n; DDP's are
counted by a communication hook on its buckets, PUB's by its own collectives), the step time
(forward + backward + step, median), and the memory per process of the per-task gradient
buffer and the optimizer state. PUB's sharded scheme against the (K + 2)/2 model (the SPEC's
(K + 1)/2 plus the all-gather of the shared .grad), its replicated scheme against K.

    python benches/bench_distributed.py                 # K = 2, 4, 8, 2 processes
    python benches/bench_distributed.py --quick         # K = 2, small trunk
    python benches/bench_distributed.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pub_native


class Model(torch.nn.Module):
    def __init__(self, k: int, width: int, depth: int):
        super().__init__()
        layers = []
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        self.trunk = torch.nn.Sequential(*layers)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, 1) for _ in range(k))

    def forward(self, x):
        z = self.trunk(x)
        return [h(z).squeeze(-1) for h in self.heads]


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def worker(rank: int, world: int, port: int, args, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    results = []
    ring = 2 * (world - 1) / world
    for k in args.tasks:
        for method in ("ddp-adam", "pub-sharded", "pub-replicated"):
            torch.manual_seed(0)
            model = Model(k, args.width, args.depth)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            counted = [0.0]

            def hook(state, bucket, counted=counted):
                counted[0] += ring * _bytes(bucket.buffer())
                fut = dist.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()
                return fut.then(lambda f: f.value()[0])

            if method == "ddp-adam":
                ddp.register_comm_hook(None, hook)
                opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
            else:
                opt = pub_native.Adam(ddp.parameters(), lr=1e-3,
                                      shard_state=method == "pub-sharded")
            g = torch.Generator().manual_seed(rank)
            times = []
            for step in range(args.warmup + args.rounds):
                x = torch.randn(args.batch, args.width, generator=g)
                y = torch.randn(k, args.batch, generator=g)
                dist.barrier()
                t0 = time.perf_counter()
                opt.zero_grad()
                losses = [((o - y[i]) ** 2).mean() for i, o in enumerate(ddp(x))]
                if method == "ddp-adam":
                    sum(losses).backward()
                else:
                    if step == args.warmup:
                        opt._dp.bytes_sent = 0.0
                    opt.backward(losses)
                opt.step()
                times.append(time.perf_counter() - t0)
                if step == args.warmup - 1:
                    counted[0] = 0.0
            measured = args.rounds
            sent = counted[0] if method == "ddp-adam" else opt._dp.bytes_sent
            shared_p = sum(p.numel() for p in model.trunk.parameters())
            if method == "ddp-adam":
                buffer_bytes = 0
                state_bytes = sum(_bytes(v) for st in opt.state.values() for v in st.values()
                                  if isinstance(v, torch.Tensor))
            else:
                buffer_bytes = _bytes(opt._grads.buffer)
                if opt._dp.shard:
                    buffer_bytes += _bytes(opt._dp.shard_rows) + _bytes(opt._dp.gathered)
                state_bytes = sum(_bytes(v) for st in opt.state.values() for v in st.values()
                                  if isinstance(v, torch.Tensor))
                state_bytes += sum(_bytes(v) for st in opt._shard_state.values()
                                   for v in st.values())
            results.append({
                "K": k, "method": method, "shared_params": shared_p,
                "step_s": statistics.median(times[args.warmup:]),
                "bytes_per_step": sent / measured, "buffer_bytes": buffer_bytes,
                "state_bytes": state_bytes,
            })
            del opt, ddp, model
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.tasks = [2] if args.quick else [2, 4, 8]
    args.width, args.depth = (256, 2) if args.quick else (512, 4)
    args.batch, args.warmup, args.rounds = 64, 2, 3 if args.quick else 7
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(worker, args=(args.world, port, args, queue), nprocs=args.world, join=True)
    rows = queue.get()
    by = {(r["K"], r["method"]): r for r in rows}
    print(f"pub_native {pub_native.__version__}, torch {torch.__version__}, {args.world} gloo "
          f"processes on 127.0.0.1, 1 thread each; trunk {args.depth}×Linear({args.width}) = "
          f"{rows[0]['shared_params'] / 1e6:.2f}M shared parameters; medians of {args.rounds} "
          "steps")
    header = (f"{'K':>2} | {'DDP+Adam':>9} {'PUB shard':>9} {'PUB repl':>9} | "
              f"{'DDP MB':>7} {'shard MB':>8} {'ratio':>6} {'(K+2)/2':>7} {'(K+1)/2':>7} | "
              f"{'repl MB':>7} {'ratio':>6} | {'state MB/rank: DDP':>18} {'shard':>6} "
              f"{'repl':>6} | {'buffers MB: shard':>17} {'repl':>6}")
    print(header)
    print("-" * len(header))
    for k in args.tasks:
        d, s, r = by[(k, "ddp-adam")], by[(k, "pub-sharded")], by[(k, "pub-replicated")]
        state = [x["state_bytes"] / 2**20 for x in (d, s, r)]
        buffers = [x["buffer_bytes"] / 2**20 for x in (s, r)]
        s_ratio = s["bytes_per_step"] / d["bytes_per_step"]
        print(f"{k:>2} | {d['step_s'] * 1e3:>7.1f}ms {s['step_s'] * 1e3:>7.1f}ms "
              f"{r['step_s'] * 1e3:>7.1f}ms | {d['bytes_per_step'] / 2**20:>7.2f} "
              f"{s['bytes_per_step'] / 2**20:>8.2f} {s_ratio:>6.2f}"
              f" {(k + 2) / 2:>7.1f} {(k + 1) / 2:>7.1f} | {r['bytes_per_step'] / 2**20:>7.2f} "
              f"{r['bytes_per_step'] / d['bytes_per_step']:>6.2f} | {state[0]:>18.2f} "
              f"{state[1]:>6.2f} {state[2]:>6.2f} | {buffers[0]:>17.2f} {buffers[1]:>6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"world": args.world, "rows": rows, "torch": torch.__version__}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
