"""Random cases at the boundary between torch and the native core, for test_boundary_fuzz.py.

``python boundary_cases.py FIRST COUNT`` runs cases FIRST .. FIRST+COUNT-1 and prints one JSON
line per case: {"seed", "result": "ok" | "error", "type", "message"}. Each case builds a few
parameters of random dtypes and layouts (contiguous, channels_last, transposed, permuted, sliced
with gaps), random PUB options, optionally state made by torch's own optimizer and loaded from
its checkpoint, and optionally a dtype or layout change of the model mid-run; it trains the same
setup with the native backend and with the reference backend. A case passes when both end in the
same clear error, or both step and agree. Anything else, an abort included, fails the test.
"""

from __future__ import annotations

import copy
import json
import sys
import traceback

import numpy as np
import torch

import pub_native

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CLEAR_ERRORS = (TypeError, ValueError, RuntimeError, NotImplementedError, FloatingPointError)
# Relative agreement of native and reference after a few steps, by the parameters' dtype.
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def make_param(rng, dtype, layout):
    if layout == "channels_last":
        t = torch.randn(2, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        t = torch.randn(5, 3).t()
    elif layout == "permuted":
        t = torch.randn(2, 3, 4).permute(2, 0, 1)
    elif layout == "sliced":
        t = torch.randn(4, 6)[:, ::2]  # gaps: must be refused
    else:
        t = torch.randn(int(rng.integers(1, 9)))
    return torch.nn.Parameter(t.to(dtype))


def build(seed):
    """The case's parameters (built the same way for each backend: a copy could change their
    layout), targets and plan."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 4))
    layouts = ["contiguous", "channels_last", "transposed", "permuted"]
    if rng.random() < 0.1:
        layouts.append("sliced")
    shared_dtype = DTYPES[rng.integers(len(DTYPES))]
    shared = []
    for _ in range(int(rng.integers(1, 4))):
        dtype = shared_dtype if rng.random() > 0.05 else DTYPES[rng.integers(len(DTYPES))]
        shared.append(make_param(rng, dtype, layouts[rng.integers(len(layouts))]))
    heads = [make_param(rng, DTYPES[rng.integers(len(DTYPES))],
                        layouts[rng.integers(len(layouts))]) for _ in range(k)]
    name = ["adam", "adagrad", "rmsprop"][rng.integers(3)]
    options = {}
    if name == "adam":
        options = dict(amsgrad=bool(rng.random() < 0.3), weight_decay=float(rng.random() < 0.3)
                       * 0.01)
    elif name == "rmsprop":
        options = dict(momentum=float(rng.random() < 0.5) * 0.9,
                       centered=bool(rng.random() < 0.3))
    else:
        options = dict(initial_accumulator_value=float(rng.random() < 0.5) * 0.1)
    pub = dict(umm=[None, "clippy", "adatask"][rng.integers(3)],
               update_weights_every=int(rng.integers(1, 3)))
    plan = dict(k=k, name=name, options=options, pub=pub,
                torch_steps=int(rng.integers(0, 3)) if rng.random() < 0.4 else 0,
                change_at=int(rng.integers(1, 4)) if rng.random() < 0.3 else None,
                change_dtype=DTYPES[rng.integers(len(DTYPES))],
                change_layout=bool(rng.random() < 0.5),
                seed=seed)
    targets = [[torch.randn(p.shape) for p in shared + heads] for _ in range(k)]
    return shared, heads, targets, plan


def losses(shared, heads, targets, step):
    out = []
    for i, head in enumerate(heads):
        total = sum(((p.float() - t * (1 + 0.1 * step)) ** 2).mean()
                    for p, t in zip(shared, targets[i]))
        out.append(total * (1 + i) + (head.float() ** 2).mean() * (1 + 0.1 * i))
    return out


def train(shared, heads, targets, plan, backend):
    classes = {"adam": pub_native.Adam, "adagrad": pub_native.AdaGrad,
               "rmsprop": pub_native.RMSProp}
    torch_classes = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad,
                     "rmsprop": torch.optim.RMSprop}
    params = shared + heads
    opt = classes[plan["name"]](params, lr=1e-2, shared=shared, backend=backend,
                                **plan["options"], **plan["pub"])
    if plan["torch_steps"]:
        # State made by torch's own step (parameter dtype and layout), through its checkpoint.
        # AdaTask needs per-task state, which torch's optimizer has none of: load the torch
        # checkpoint only into the plain PUB configuration.
        theirs = torch_classes[plan["name"]](params, lr=1e-2, **plan["options"])
        for t in range(plan["torch_steps"]):
            theirs.zero_grad()
            sum(losses(shared, heads, targets, t)).backward()
            theirs.step()
        if plan["pub"]["umm"] != "adatask":
            opt.load_state_dict(copy.deepcopy(theirs.state_dict()) | {"pub": {
                "num_tasks": None, "shared": None, "step": 0, "task_weights": None,
                "warm_start": None, "umm": plan["pub"]["umm"]}})
    for t in range(4):
        if t == plan["change_at"]:
            with torch.no_grad():
                for p in params:
                    p.data = p.data.to(plan["change_dtype"])
                    if plan["change_layout"] and p.dim() == 4:
                        p.data = p.data.contiguous()
        opt.zero_grad()
        opt.backward(losses(shared, heads, targets, t))
        opt.step()
    return opt


def run_case(seed):
    outcomes = []
    for backend in ("native", "reference"):
        s, h, tg, plan = build(seed)
        before = [p.dtype for p in s + h]
        try:
            opt = train(s, h, tg, plan, backend)
            outcomes.append(("ok", opt, s + h))
        except CLEAR_ERRORS as exc:
            outcomes.append(("error", type(exc).__name__, str(exc)))
    (a, *ra), (b, *rb) = outcomes
    if a == "error" or b == "error":
        if (a, ra[0] if a == "error" else None) != (b, rb[0] if b == "error" else None):
            return {"result": "mismatch", "native": [a, str(ra[-1])[:300]],
                    "reference": [b, str(rb[-1])[:300]]}
        return {"result": "error", "type": ra[0], "message": ra[1][:300]}
    opt, params = ra
    ref, ref_params = rb
    # Steps taken in a 16-bit or float32 dtype before a change leave their rounding behind.
    for p, q, dtype0 in zip(params, ref_params, before):
        if p.dtype != q.dtype or p.stride() != q.stride():
            return {"result": "mismatch", "why": f"{p.dtype}/{q.dtype} {p.stride()}"}
        expected = q.detach().double()
        err = (p.detach().double() - expected).abs().max().item()
        tol = max(TOL[p.dtype], TOL[dtype0] if plan["change_at"] else 0.0)
        if not err <= tol * max(expected.abs().max().item(), 1.0):
            return {"result": "mismatch", "why": f"error {err} for {p.dtype} {tuple(p.shape)}"}
        if p.dtype in (torch.bfloat16, torch.float16):
            for key, v in opt.state[p].items():
                if key != "step" and v.dtype != torch.float32:
                    return {"result": "mismatch", "why": f"16-bit state {key} is {v.dtype}"}
    return {"result": "ok"}


def main(first: int, count: int) -> None:
    for seed in range(first, first + count):
        try:
            out = run_case(seed)
        except Exception as exc:  # an unclear error: report it, the test fails on it
            out = {"result": "unclear", "type": type(exc).__name__,
                   "message": "".join(traceback.format_exception(exc))[-1500:]}
        print(json.dumps({"seed": seed, **out}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
