"""Shared test helpers: toy problems and models, comparisons of parameters and optimizer state.

A Problem is K task losses over shared tensors (quadratics with task-specific linear terms, so the
tasks conflict) plus one task-specific head per task; it can be cloned and moved to a device so
that the same problem runs on several backends.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import faulthandler
import inspect
import os
import socket
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

import pub_native

F64, F32 = torch.float64, torch.float32

NATIVE = {"adam": pub_native.Adam, "adagrad": pub_native.AdaGrad, "rmsprop": pub_native.RMSProp}

TORCH_ADAM_DECOUPLED = "decoupled_weight_decay" in inspect.signature(torch.optim.Adam).parameters


def _torch_takes_named_parameters() -> bool:
    """Whether torch's optimizers take model.named_parameters() (torch >= 2.6)."""
    try:
        torch.optim.SGD([("w", torch.zeros(1, requires_grad=True))], lr=0.1)
    except TypeError:
        return False
    return True


# torch's optimizers (so the PUB optimizers, their subclasses) take (name, tensor) pairs
TORCH_NAMED_PARAMS = _torch_takes_named_parameters()


def torch_adam(params, decoupled_weight_decay=False, **options):
    """torch.optim.Adam; with decoupled_weight_decay on a torch whose Adam lacks it (< 2.6),
    torch.optim.AdamW, which takes the same step."""
    if decoupled_weight_decay and not TORCH_ADAM_DECOUPLED:
        return torch.optim.AdamW(params, **{"weight_decay": 0.0, **options})
    if decoupled_weight_decay:
        options["decoupled_weight_decay"] = True
    return torch.optim.Adam(params, **options)


TORCH = {"adam": torch_adam, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}

SHAPES = {
    "small": [(5, 3), (3,)],
    "odd": [(1,), (4097,), (3, 5, 7), (2, 1, 3)],
    "many": [((i % 7) + 1, (i % 5) + 1) for i in range(100)] + [(1,), (33,)],
}


def assert_close(actual, expected, tol, what=""):
    """max |actual − expected| ≤ tol · max |expected| (float64 comparison, any device)."""
    actual = actual.detach().cpu().to(F64)
    expected = expected.detach().cpu().to(F64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if expected.numel() == 0:
        return
    scale = max(expected.abs().max().item(), 1e-30)
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:g} × {scale:.3e}"


def assert_states_close(opt_a, params_a, opt_b, params_b, tol):
    """Parameters and every state entry (same keys on both sides) agree."""
    for j, (pa, pb) in enumerate(zip(params_a, params_b)):
        assert_close(pa, pb, tol, f"param {j}")
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert set(sa) == set(sb), f"param {j}: state keys {sorted(sa)} != {sorted(sb)}"
        for key in sb:
            assert_close(sa[key], sb[key], tol, f"param {j} state {key!r}")


def assert_states_equal(opt_a, params_a, opt_b, params_b):
    """Parameters and every state entry are bitwise equal."""
    for j, (pa, pb) in enumerate(zip(params_a, params_b)):
        assert torch.equal(pa, pb), f"param {j}"
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert set(sa) == set(sb), f"param {j}: state keys {sorted(sa)} != {sorted(sb)}"
        for key in sb:
            assert torch.equal(sa[key], sb[key]), (j, key)


def snapshot(opt, params):
    """Parameters and state, deep-copied, to compare after a step that must change nothing."""
    return ([p.detach().clone() for p in params],
            {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                     for k, v in opt.state.get(p, {}).items()} for p in params})


def assert_unchanged(opt, params, snap):
    before_params, before_state = snap
    for j, (p, b) in enumerate(zip(params, before_params)):
        assert torch.equal(p, b), f"param {j} changed"
        now = opt.state.get(p, {})
        assert set(now) == set(before_state[id(p)]), f"param {j}: state keys changed"
        for k, v in before_state[id(p)].items():
            assert torch.equal(now[k], v), f"param {j} state {k!r} changed"


class Problem:
    """K task losses over shared tensors plus one task-specific head per task."""

    def __init__(self, shapes, k, dtype=F64, seed=0, identical=False, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.k = k
        self.shared = [torch.randn(s, generator=g, dtype=F64).to(device, dtype).requires_grad_()
                       for s in shapes]
        self.heads = [torch.randn(3, generator=g, dtype=F64).to(device, dtype).requires_grad_()
                      for _ in range(k)]
        n_tasks = 1 if identical else k
        self.a = [[torch.randn(s, generator=g, dtype=F64).to(device) for s in shapes]
                  for _ in range(n_tasks)]
        self.b = [[(torch.rand(s, generator=g, dtype=F64) + 0.5).to(device) for s in shapes]
                  for _ in range(n_tasks)]
        self.identical = identical

    def params(self):
        return self.shared + self.heads

    def groups(self, lrs=(1e-2, 3e-3, 5e-3)):
        half = len(self.shared) // 2 or 1
        groups = [{"params": self.shared[:half], "lr": lrs[0]}]
        if self.shared[half:]:
            groups.append({"params": self.shared[half:], "lr": lrs[1]})
        groups.append({"params": self.heads, "lr": lrs[2]})
        return groups

    def losses(self, step):
        out = []
        for i in range(self.k):
            j = 0 if self.identical else i
            scale = 1.0 + 0.1 * step
            loss = sum(
                ((a.to(p.dtype) * p).sum() + 0.5 * (b.to(p.dtype) * p * p).sum()) * scale
                for p, a, b in zip(self.shared, self.a[j], self.b[j])
            )
            head = self.heads[0] if self.identical else self.heads[i]
            if self.identical:
                # K identical tasks share one head: each carries 1/K of its loss, so the head's
                # gradient (summed over tasks) is that of one task.
                loss = loss + (head * head).sum() / self.k
            else:
                loss = loss + (head * head).sum() * (1.0 + 0.1 * self.shared[0].reshape(-1)[0])
            out.append(loss)
        return out

    def clone(self, device=None):
        out = copy.deepcopy(self)
        if device is not None and torch.device(device) != self.shared[0].device:
            with torch.no_grad():
                out.shared = [p.detach().to(device).requires_grad_() for p in self.shared]
                out.heads = [p.detach().to(device).requires_grad_() for p in self.heads]
            out.a = [[a.to(device) for a in row] for row in self.a]
            out.b = [[b.to(device) for b in row] for row in self.b]
        return out


def run_pub(opt_cls, problem, steps, start=0, opt=None, **kw):
    """``steps`` PUB steps (backward(losses) + step) on ``problem``; returns the optimizer."""
    opt = opt_cls(problem.groups(), **kw) if opt is None else opt
    for t in range(start, start + steps):
        opt.zero_grad()
        opt.backward(problem.losses(t))
        opt.step()
    return opt


def run_torch(opt, problem, steps, start=0):
    """``steps`` plain steps (the first task's loss, backward, step): a torch optimizer's run
    on a one-task ``problem``, beside which a PUB run is compared."""
    for t in range(start, start + steps):
        opt.zero_grad()
        problem.losses(t)[0].backward()
        opt.step()
    return opt


class MMoE(nn.Module):
    """A small multi-gate mixture-of-experts: embedding and experts shared, gates and towers
    per task."""

    def __init__(self, d_in=6, n_experts=4, d_expert=5, k=2):
        super().__init__()
        self.embedding = nn.Embedding(10, d_in)
        self.experts = nn.ModuleList(nn.Linear(d_in, d_expert) for _ in range(n_experts))
        self.gates = nn.ModuleList(nn.Linear(d_in, n_experts) for _ in range(k))
        self.towers = nn.ModuleList(nn.Linear(d_expert, 1) for _ in range(k))

    def forward(self, idx):
        x = self.embedding(idx).mean(1)
        e = torch.stack([torch.relu(ex(x)) for ex in self.experts], 1)  # (B, E, D)
        outs = []
        for gate, tower in zip(self.gates, self.towers):
            w = torch.softmax(gate(x), -1).unsqueeze(-1)
            outs.append(tower((w * e).sum(1)).squeeze(-1))
        return outs

    def shared_parameters(self):
        return [*self.embedding.parameters(), *self.experts.parameters()]


class TrunkHeads(nn.Module):
    """The smallest multi-task model: one shared tanh layer and k linear heads, each giving a
    task's output of shape (batch,)."""

    def __init__(self, n_in: int = 8, width: int = 16, k: int = 2):
        super().__init__()
        self.trunk = nn.Linear(n_in, width)
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(k))

    def forward(self, x):
        z = torch.tanh(self.trunk(x))
        return [h(z).squeeze(-1) for h in self.heads]


class JoinedHeads(nn.Module):
    """A trunk and three heads whose outputs are joined into one tensor (``join``: "cat" or
    "stack" along dimension 1, "stack0" along dimension 0, "split": cat read by split(1, 1),
    "weights": the heads' weights concatenated into one matrix, or "list": no join), each
    task's loss reading its own part: only the trunk is shared. In the modes of
    :data:`LOSS_VECTORS` the losses come from the joined tensor (see :func:`joined_losses`)."""

    def __init__(self, join: str, zero_head: bool = False):
        super().__init__()
        self.join = join
        self.trunk = nn.Linear(5, 8)
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
        if zero_head:
            nn.init.zeros_(self.heads[1].weight)

    def forward(self, x):
        z = torch.relu(self.trunk(x))
        if self.join == "list":
            return [torch.sigmoid(h(z)).squeeze(1) for h in self.heads]
        if self.join == "per-task-cat":  # each task joins them anew (joined_losses)
            return [h(z) for h in self.heads]
        if self.join == "stack-squeezed":  # (batch, K, 1) -> (batch, K)
            return torch.sigmoid(torch.stack([h(z) for h in self.heads], 1).squeeze(-1))
        if self.join in LOSS_VECTORS:
            return torch.sigmoid(torch.cat([h(z) for h in self.heads], 1))
        if self.join == "weights":
            w = torch.cat([h.weight for h in self.heads])
            b = torch.cat([h.bias for h in self.heads])
            out = torch.sigmoid(z @ w.T + b)
        elif self.join == "stack":
            out = torch.sigmoid(torch.stack([h(z).squeeze(1) for h in self.heads], 1))
        elif self.join == "stack0":
            return list(torch.sigmoid(torch.stack([h(z).squeeze(1) for h in self.heads])))
        elif self.join == "split":  # a full slice, then split(1, 1)
            out = torch.sigmoid(torch.cat([h(z) for h in self.heads], 1))[:, :]
            return [c.squeeze(1) for c in out.split(1, 1)]
        else:
            out = torch.sigmoid(torch.cat([h(z) for h in self.heads], 1))
        return list(out.unbind(1)) if self.join == "weights" else [out[:, i] for i in range(3)]


# JoinedHeads modes whose K losses come from one vector of per-task losses, computed from the
# joined (batch, K) output as recommendation code does: by an element-wise loss, then a mean
# over the batch (or the mean over the rows that have labels), read by index or by unbind.
LOSS_VECTORS = ("mse-mean0", "sq-mean0-unbind", "masked-mean-unbind", "unbind-stacked",
                "column-read-twice", "stack-squeezed")


def joined_losses(model, x, y, masked=None):
    """The K mean squared errors of ``model`` (a JoinedHeads), the same numbers in every
    mode; the task ``masked`` multiplied by 0."""
    keep = [0.0 if i == masked else 1.0 for i in range(3)]
    if model.join == "mse-mean0":
        vec = torch.nn.functional.mse_loss(model(x), y, reduction="none").mean(0)
        return [vec[i] * keep[i] for i in range(3)]
    if model.join == "sq-mean0-unbind":
        return [v * k for v, k in zip(((model(x) - y) ** 2).mean(0).unbind(), keep)]
    if model.join == "stack-squeezed":
        out = model(x)
        return [((out[:, i] - y[:, i]) ** 2).mean() * keep[i] for i in range(3)]
    if model.join == "column-read-twice":  # a loss and a regularizer of the same column
        out = model(x)
        return [(((out[:, i] - y[:, i]) ** 2).mean() + 0.0 * out[:, i].mean()) * keep[i]
                for i in range(3)]
    if model.join == "unbind-stacked":  # the unbound losses stacked again: a 1-D tensor
        vec = torch.nn.functional.mse_loss(model(x), y, reduction="none").mean(0)
        return torch.stack([v if k else v * k for v, k in zip(vec.unbind(), keep)])
    if model.join == "masked-mean-unbind":  # (every row labelled here)
        labelled = torch.ones_like(y)
        vec = ((model(x) - y) ** 2 * labelled).sum(0) / labelled.sum(0).clamp(min=1)
        return [v * k for v, k in zip(vec.unbind(), keep)]
    if model.join == "per-task-cat":
        outs = model(x)
        return [((torch.sigmoid(torch.cat(outs, 1))[:, i] - y[:, i]) ** 2).mean() * keep[i]
                for i in range(3)]
    return [((o - y[:, i]) ** 2).mean() * keep[i] for i, o in enumerate(model(x))]


def mmoe_batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, (n, 3), generator=g), torch.randn(n, generator=g)


def mmoe_losses(model, batch):
    idx, y = batch
    return [((o - y) ** 2).mean() for o in model(idx)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a process group the test spawns."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_worker(add_arguments=None):
    """In a worker process that :func:`run_workers` started: parse ``--rank --world --port
    --out`` (and what ``add_arguments(parser)`` adds), and yield them inside
    :func:`gloo_group`, warnings off."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    with gloo_group(args.rank, args.world, args.port), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield args


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """In a worker process: join the gloo group on 127.0.0.1 (one thread, 60 s timeout), and,
    after the body, leave it together (a process that tears gloo down while its peer still
    talks to it can abort the peer, which a plain barrier did not prevent under load) and end
    the process (:func:`exit_worker`). Under :func:`run_workers`, a process still running near
    its timeout writes its threads' Python stacks to stderr (faulthandler)."""
    import torch.distributed as dist

    dump_after = os.environ.get("PUB_TEST_DUMP_STACKS_AFTER")
    if dump_after:
        faulthandler.dump_traceback_later(float(dump_after))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        yield
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    finally:
        dist.destroy_process_group()
    exit_worker(0)


def exit_worker(code: int) -> None:
    """End a worker process whose results are written and whose process group is destroyed,
    without the interpreter's finalization, where gloo's threads now and then abort it
    ("terminate called without an active exception", after its work was done)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_workers(script, world: int, out, args=(), timeout: float = 120.0) -> list:
    """Run ``script --rank R --world N --port P --out OUT *args`` as ``world`` processes of one
    gloo group on 127.0.0.1 (one thread each, bounded in time), and load what each wrote to
    OUT/rank<R>.pt. A process that failed, or that was still running at ``timeout``, raises
    AssertionError with every process's exit status and stderr; a process still running
    ``timeout`` - 15 s after its start first writes its threads' Python stacks there
    (:func:`gloo_group`), so that a hang says where it hung."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PUB_TEST_DUMP_STACKS_AFTER=str(max(timeout - 15, 5)))
    procs = [subprocess.Popen([sys.executable, str(script), "--rank", str(r), "--world",
                               str(world), "--port", str(port), "--out", str(out), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(world)]
    deadline = time.monotonic() + timeout
    results, late = [], []
    try:
        for r, p in enumerate(procs):
            try:
                results.append(p.communicate(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                late.append(r)
                p.kill()
                results.append(p.communicate())
    finally:
        for p in procs:
            p.kill()
    if late or any(p.returncode != 0 for p in procs):
        report = "\n".join(f"--- rank {r}: exit status {p.returncode}"
                           f"{' (killed at the timeout)' if r in late else ''}\n{err[-3000:]}"
                           for r, (p, (_, err)) in enumerate(zip(procs, results)))
        what = f"ranks {late} still ran after {timeout:g} s" if late else "a process failed"
        raise AssertionError(f"{what}:\n{report}")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
