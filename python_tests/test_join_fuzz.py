"""Random joins of three heads' outputs against autograd's own answer: the shared-parameter
detection (pub_native._autograd.task_reach) may route a task to one input of a join only where
no batch could make it read another. Each case stacks or concatenates the heads' (batch, 1)
outputs, masks all but one head on the first batch (a ReLU after the join, so that the
measuring pass sees one input with a non-zero gradient wherever a task reads a single column
or row), applies random squeezes, unsqueezes, sums, means and element-wise operations, and
lets each task read one index along a random dimension. A task's true reach is every head that
gives it a non-zero gradient on later batches with every head alive; the detection must reach
all of them."""

from __future__ import annotations

import random
import warnings

import torch

from pub_native import _autograd


def _join(rng: random.Random, z, heads, dead=()):
    outs = [h(z) for h in heads]
    if rng.random() < 0.5:
        dim = rng.choice([0, 1, 2, -1, -2, -3])
        t = torch.stack(outs, dim)
    else:
        dim = rng.choice([1, -1])
        t = torch.cat(outs, dim)
    mask = torch.zeros_like(t)
    if dead:  # (the dead heads' places along the join's dimension)
        mask = mask.index_fill(dim % t.dim(), torch.tensor(list(dead)), -100.0)
    t = torch.relu(t + mask)
    for _ in range(rng.randint(0, 3)):
        op = rng.choice(["squeeze", "squeeze_all", "unsqueeze", "mean", "sum", "sigmoid"])
        if op == "squeeze":
            t = t.squeeze(rng.randrange(-t.dim(), t.dim()))
        elif op == "squeeze_all":
            t = t.squeeze()
        elif op == "unsqueeze":
            t = t.unsqueeze(rng.randrange(-t.dim() - 1, t.dim() + 1))
        elif op in ("mean", "sum") and t.dim() > 1:
            t = getattr(t, op)(rng.randrange(-t.dim(), t.dim()), keepdim=rng.random() < 0.5)
        elif op == "sigmoid":
            t = torch.sigmoid(t)
    return t


def _losses(rng: random.Random, t, k: int):
    dim = rng.randrange(t.dim())
    out = []
    for i in range(k):
        index = i % t.shape[dim]
        read = t.select(dim, index) if rng.random() < 0.5 else t.unbind(dim)[index]
        out.append(read.sum())
    return out


def test_routes_at_random_joins_never_miss_a_head_a_task_reads():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        misses, routed, cases = _fuzz(300)
    assert not misses, misses[:10]
    assert routed > 0.1 * cases, (routed, cases)  # (the routes were taken, not only walks)


def _fuzz(n: int):
    """(misses as (seed, task, head parameter indices), cases routed, cases) over n seeds."""
    misses, routed, cases = [], 0, 0
    for seed in range(300):
        torch.manual_seed(seed)
        trunk, heads = torch.nn.Linear(4, 4), [torch.nn.Linear(4, 1) for _ in range(3)]
        alive = seed % 3
        t = _join(random.Random(seed), trunk(torch.randn(6, 4)), heads,
                  dead=[j for j in range(3) if j != alive])
        if t.dim() == 0:
            continue
        cases += 1
        losses = _losses(random.Random(-seed - 1), t, 3)
        roots = _autograd.task_roots(losses, losses)
        reach = _autograd.task_reach(roots, losses)
        routed += reach != _autograd.walked_reach(roots, losses)
        params = [p for h in heads for p in h.parameters()]
        for _ in range(2):
            later = _losses(random.Random(-seed - 1),
                            _join(random.Random(seed), trunk(torch.randn(6, 4)), heads), 3)
            for i, loss in enumerate(later):
                grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                missed = [j for j, (p, g) in enumerate(zip(params, grads))
                          if g is not None and bool(g.count_nonzero()) and id(p) not in reach[i]]
                if missed:
                    misses.append((seed, i, missed))
    return misses, routed, cases
