"""One process of a data-parallel training run, for test_distributed.py (gloo on 127.0.0.1).

    python ddp_worker.py --rank R --world N --port P --out DIR [--optimizer adam] [--umm ...]

Every process builds the same model (seeded), wraps it in DistributedDataParallel, trains on its
slice of each global batch with a PUB optimizer (or a gradient balancer + torch's Adam), and
writes its parameters, task weights and bytes sent to DIR/rank{R}.pt. The test trains the same
model on the whole batches in one process and compares.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pub_native  # noqa: E402

BATCH = 12  # divisible by 2 and 3 processes: the processes' mean losses average to the batch's


class Uneven(torch.nn.Module):
    """Shared tensors of odd sizes, so that equal shards split tensors."""

    def __init__(self, k=2):
        super().__init__()
        self.a = torch.nn.Linear(7, 13)
        self.b = torch.nn.Linear(13, 5)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(5, 1) for _ in range(k))

    def forward(self, x):
        z = torch.tanh(self.b(torch.tanh(self.a(x))))
        return [h(z).squeeze(-1) for h in self.heads]


class SparseHead(torch.nn.Module):
    """Task 0's head holds rows of a sparse embedding that each example picks (its gradient is
    sparse, and the processes' slices pick different rows)."""

    def __init__(self, k=2):
        super().__init__()
        self.a = torch.nn.Linear(7, 5)
        self.table = torch.nn.Embedding(10, 5, sparse=True)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(5, 1) for _ in range(k - 1))

    def forward(self, x):
        z = torch.tanh(self.a(x))
        rows = (x[:, 0].abs() * 3).long() % 10
        return [(z * self.table(rows)).sum(-1), *(h(z).squeeze(-1) for h in self.heads)]


def build_model(kind: str, k: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "uneven":
        return Uneven(k)
    if kind == "sparse-head":
        return SparseHead(k)
    from helpers import MMoE

    return MMoE(k=k)


def global_batch(kind: str, t: int, k: int):
    g = torch.Generator().manual_seed(100 + t)
    if kind in ("uneven", "sparse-head"):
        x = torch.randn(BATCH, 7, generator=g)
    else:
        x = torch.randint(0, 10, (BATCH, 3), generator=g)
    y = torch.randn(k, BATCH, generator=g)
    return x, y


def task_losses(outs, y):
    return [((o - y[i]) ** 2).mean() for i, o in enumerate(outs)]


def make_optimizer(args, params, group="auto"):
    if args.balancer:
        from pub_native import balancers

        cls = balancers.BALANCERS[args.balancer]
        kw = {"n_tasks": args.tasks} if args.balancer in ("famo", "uncertainty") else {}
        if args.every > 1:
            kw["update_weights_every"] = args.every
        bal = cls(params, process_group=group, **kw) if group != "auto" else cls(params, **kw)
        if args.model == "sparse-head":  # (torch's Adam takes no sparse gradient)
            return bal, torch.optim.SGD(params, lr=1e-2)
        return bal, torch.optim.Adam(params, lr=1e-2)
    cls = {"adam": pub_native.Adam, "adagrad": pub_native.AdaGrad,
           "rmsprop": pub_native.RMSProp}[args.optimizer]
    kw = dict(momentum=0.5) if args.optimizer == "rmsprop" else {}
    umm = None if args.umm == "none" else args.umm
    return None, cls(params, lr=1e-2, umm=umm, update_weights_every=args.every,
                     shard_state=bool(args.shard), process_group=group, **kw)


def train(args, model, step_model, bal, opt, ranks=None):
    """Steps start .. start+steps-1 on this process's slice (or the whole batch: ranks=None)."""
    for t in range(args.start, args.start + args.steps):
        if args.freeze_until > 0:  # a warm-up with the first (shared) parameter frozen
            next(model.parameters()).requires_grad_(t >= args.freeze_until)
        x, y = global_batch(args.model, t, args.tasks)
        x, y = x.to(args.device), y.to(args.device)
        if ranks is not None:
            rank, world = ranks
            x, y = x[rank::world], y[:, rank::world]
        opt.zero_grad()
        if args.accumulate > 1:  # backward calls on micro-batches, one step
            n = args.accumulate
            for j in range(n):
                # --no-sync-at j: that micro-batch inside DDP's no_sync() (a later one syncs)
                quiet = ranks is not None and j == args.no_sync_at
                with step_model.no_sync() if quiet else contextlib.nullcontext():
                    losses = [loss / n for loss in task_losses(step_model(x[j::n]), y[:, j::n])]
                    (bal or opt).backward(losses)
            opt.step()
            continue
        losses = task_losses(step_model(x), y)
        if args.diverge and (ranks is None or ranks[0] == 0):
            # Task 1 touches task 0's tower (with weight 0) on the first process only: each
            # process's graph alone would detect different shared parameters.
            losses[1] = losses[1] + 0.0 * sum(p.sum() for p in model.towers[0].parameters())
        if args.route and t > args.start:
            # Routing after the first step: task 1 reaches task 0's tower (found task 0's
            # alone) on the first of the two processes' slices only (in one process, half of it,
            # as DDP averages the two).
            term = args.route * sum((p ** 2).sum() for p in model.towers[0].parameters())
            if ranks is None or ranks[0] == 0:
                losses[1] = losses[1] + (term / 2 if ranks is None else term)
        if args.absent and t == args.start + 1:
            losses[-1] = torch.zeros(())  # no labels for the last task in this batch
        if bal is not None:
            bal.backward(losses)
        else:
            opt.backward(losses)
            if args.tools:  # per-task clipping, then clipping over every parameter
                opt.task_grad_norms(float("inf"))  # a collective, also where a shard is empty
                opt.clip_task_grad_norm_(0.05)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.02)
        opt.step()
        if t == args.save_at:
            sd = opt.state_dict()  # collective under sharding: every process calls it
            if ranks is None or ranks[0] == 0:
                torch.save({"opt": sd, "model": model.state_dict()},
                           os.path.join(args.out, "checkpoint.pt"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="mmoe")
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--umm", default="none")
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--shard", type=int, default=1)
    ap.add_argument("--balancer", default="")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--save-at", type=int, default=-1)
    ap.add_argument("--load", default="")
    ap.add_argument("--absent", type=int, default=0)
    ap.add_argument("--freeze-until", type=int, default=0)
    ap.add_argument("--tools", type=int, default=0)
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--no-sync-at", type=int, default=-1)
    ap.add_argument("--ddp", default="")
    ap.add_argument("--diverge", type=int, default=0)
    ap.add_argument("--route", type=float, default=0.0)
    ap.add_argument("--mode", default="ddp",
                    help="ddp | single | no-wrapper | no-sync-misuse | explicit-group | "
                         "sharded-parameter | different-k | absent-first | all-absent-first | "
                         "join | rewrap-join | comm-hook | late-hook | rewrap-hook | "
                         "ignored | two-ddp")
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = build_model(args.model, args.tasks).to(args.device)
    if args.mode == "single":
        bal, opt = make_optimizer(args, list(model.parameters()))
        if args.load:
            saved = torch.load(args.load, weights_only=False)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
        train(args, model, model, bal, opt)
        rank_file = "single.pt"
    else:
        dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{args.port}",
                                rank=args.rank, world_size=args.world)
        # --ddp find_unused / static_graph: DDP then routes every output through one autograd
        # node, which shared-parameter detection must see through.
        ddp_kw = {"find_unused": {"find_unused_parameters": True},
                  "static_graph": {"static_graph": True}}.get(args.ddp, {})
        if args.mode == "ignored":  # a tower DDP leaves alone: its gradient stays local
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, ["towers.0.weight"])
        if args.mode == "two-ddp":  # the embedding in a DDP module of its own
            model.embedding = torch.nn.parallel.DistributedDataParallel(model.embedding)
        wrapped = model if args.mode in ("no-wrapper", "explicit-group") else \
            torch.nn.parallel.DistributedDataParallel(model, **ddp_kw)
        if args.mode == "comm-hook":  # compression that PUB's own averaging does not run
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            wrapped.register_comm_hook(None, default_hooks.fp16_compress_hook)
        group = dist.group.WORLD if args.mode == "explicit-group" else "auto"
        bal, opt = make_optimizer(args, list(wrapped.parameters()), group)
        if args.load:
            saved = torch.load(args.load, weights_only=False)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
        try:
            if args.mode == "sharded-parameter":
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.tensor import Shard, distribute_tensor

                mesh = init_device_mesh("cpu", (args.world,))
                w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
                opt = pub_native.Adam([w])
                opt.backward([(w * w).sum(), w.sum()])
            if args.mode == "frozen-on-one":  # the last process froze a shared parameter
                if args.rank == args.world - 1:
                    next(model.parameters()).requires_grad_(False)
                x, y = global_batch(args.model, 0, args.tasks)
                opt.zero_grad()
                (bal or opt).backward(task_losses(wrapped(x), y))
            if args.mode == "different-k":  # the last process has one task more
                x, y = global_batch(args.model, 0, args.tasks)
                losses = task_losses(wrapped(x), y)
                if args.rank == args.world - 1:
                    losses.append(losses[0] * 2)
                opt.zero_grad()
                (bal or opt).backward(losses)
            if args.mode in ("absent-first", "all-absent-first"):
                # The last process's first batch lacks a task (or every task).
                x, y = global_batch(args.model, 0, args.tasks)
                losses = task_losses(wrapped(x), y)
                if args.rank == args.world - 1:
                    for i in range(len(losses) if args.mode == "all-absent-first" else 1):
                        losses[-1 - i] = torch.zeros(())
                opt.zero_grad()
                opt.backward(losses)
            if args.mode in ("join", "rewrap-join"):  # DDP's context for uneven inputs
                x, y = global_batch(args.model, 0, args.tasks)
                if args.mode != "join":  # one step, then the model wrapped again
                    opt.zero_grad()
                    (bal or opt).backward(task_losses(wrapped(x), y))
                    opt.step()
                    wrapped = torch.nn.parallel.DistributedDataParallel(model)
                opt.zero_grad()
                with wrapped.join():
                    (bal or opt).backward(task_losses(wrapped(x), y))
            if args.mode in ("late-hook", "rewrap-hook"):  # a hook after the first backward
                import warnings

                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                x, y = global_batch(args.model, 0, args.tasks)
                args.warnings = []
                for t in range(2):
                    if t == 1:
                        if args.mode == "rewrap-hook":  # on a new wrapper, the earlier gone
                            wrapped = torch.nn.parallel.DistributedDataParallel(model)
                        wrapped.register_comm_hook(None, default_hooks.fp16_compress_hook)
                    opt.zero_grad()
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        (bal or opt).backward(task_losses(wrapped(x), y))
                    args.warnings += [f"{t}: {w.message}" for w in caught]
                    opt.step()
            elif args.mode == "no-sync-misuse":
                x, y = global_batch(args.model, 0, args.tasks)
                opt.zero_grad()
                with wrapped.no_sync():
                    opt.backward(task_losses(wrapped(x), y))
                opt.step()
            else:
                import warnings

                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    train(args, model, wrapped, bal, opt, ranks=(args.rank, args.world))
                args.warnings = [str(w.message) for w in caught]
        except Exception as exc:  # the test reads the error from the rank's file
            torch.save({"error": f"{type(exc).__name__}: {exc}"},
                       os.path.join(args.out, f"rank{args.rank}.pt"))
            _leave(args)
            return 0
        rank_file = f"rank{args.rank}.pt"
    weights = None if bal is not None else opt.task_weights
    if args.mode == "explicit-group":
        if bal is not None:
            assert bal._dp_group is not None
        else:
            assert opt._dp is not None and opt._dp.world == args.world
    dp = getattr(opt, "_dp", None)
    torch.save({"params": [p.detach().cpu().clone() for p in model.parameters()],
                "weights": weights, "bytes": None if dp is None else dp.bytes_sent,
                "warnings": getattr(args, "warnings", []),
                "state": None if bal is not None else opt.state_dict()},
               os.path.join(args.out, rank_file))
    if args.mode != "single":
        _leave(args)
    return 0


def _leave(args) -> None:
    """Leave the process group together: a rank that tears gloo down while its peer still
    talks to it can abort the peer ("terminate called without an active exception")."""
    if args.backend == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    else:
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from helpers import exit_worker
    exit_worker(main())
