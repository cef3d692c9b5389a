"""The CUDA PUB step (tests marked ``cuda`` need a GPU and the _C_cuda module; they are skipped
otherwise) and the CPU-side guarantees it relies on. Parity of CUDA with the CPU core and the
reference is in test_parity.py (its ``cuda`` parametrizations).

K = 1 == torch.optim.Adam(fused=True) on CUDA; no host synchronization inside step(); a captured
CUDA graph replays like eager steps; a non-default stream after an event-gated producer; bitwise
determinism; a NaN skips the whole step on the device; a tensor past 2^31 elements (``slow``).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import F32
from helpers import (
    SHAPES,
    Problem,
    assert_close,
    assert_unchanged,
    run_pub,
    run_torch,
    snapshot,
)

import pub_native
from pub_native import _native


@pytest.mark.cuda
def test_one_task_equals_fused_adam_on_cuda():
    problem = Problem(SHAPES["odd"], 1, dtype=F32, seed=52, identical=True, device="cuda")
    twin = copy.deepcopy(problem)
    opt = pub_native.Adam(problem.groups(), shared=problem.shared)
    ref = torch.optim.Adam(twin.groups(), fused=True)
    run_pub(None, problem, 7, opt=opt)
    run_torch(ref, twin, 7)
    for pa, pb in zip(problem.params(), twin.params()):
        assert_close(pa, pb, 2e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("every", [1, 2])
def test_step_never_synchronizes(every):
    problem = Problem(SHAPES["odd"], 3, dtype=F32, seed=57, device="cuda")
    opt = run_pub(pub_native.Adam, problem, 2, update_weights_every=every)
    opt.zero_grad()
    opt.backward(problem.losses(2))
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()  # raises if anything inside waits for the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.task_weights.shape == (3,)


@pytest.mark.cuda
def test_graph_replay_equals_eager():
    def build():
        torch.manual_seed(0)
        shared = [torch.randn(1000, device="cuda", requires_grad=True),
                  torch.randn(37, 5, device="cuda", requires_grad=True)]
        dirs = [[torch.randn_like(p) for p in shared] for _ in range(2)]
        return shared, dirs

    def losses(shared, dirs):
        return [sum(((p * d).sum() + 0.5 * (p * p).sum()) for p, d in zip(shared, ds))
                for ds in dirs]

    shared_e, dirs_e = build()
    eager = pub_native.Adam(shared_e, lr=1e-2, shared=shared_e)
    shared_g, dirs_g = build()
    graphed = pub_native.Adam(shared_g, lr=1e-2, shared=shared_g)
    # Warm up (state allocation, first solve) eagerly on a side stream, as torch recommends.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for opt, sh, di in ((eager, shared_e, dirs_e), (graphed, shared_g, dirs_g)):
            opt.zero_grad()
            opt.backward(losses(sh, di))
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    graphed.zero_grad()
    graphed.backward(losses(shared_g, dirs_g))
    with torch.cuda.graph(graph):
        graphed.step()
    for _ in range(5):
        graphed.zero_grad()
        graphed.backward(losses(shared_g, dirs_g))  # refills the same K×P buffer
        graph.replay()
        eager.zero_grad()
        eager.backward(losses(shared_e, dirs_e))
        eager.step()
    torch.cuda.synchronize()
    for a, b in zip(shared_g, shared_e):
        assert_close(a, b, 1e-6)


@pytest.mark.cuda
def test_non_default_stream_after_event_gated_producer():
    problem = Problem(SHAPES["odd"], 2, dtype=F32, seed=53, device="cuda")
    twin = copy.deepcopy(problem)
    opt = pub_native.Adam(problem.groups())
    ref = pub_native.Adam(twin.groups())
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    for t in range(4):
        with torch.cuda.stream(producer):
            opt.zero_grad()
            opt.backward(problem.losses(t))
            ready = torch.cuda.Event()
            ready.record(producer)
        consumer.wait_event(ready)
        with torch.cuda.stream(consumer):
            opt.step()
        torch.cuda.current_stream().wait_stream(consumer)
        ref.zero_grad()
        ref.backward(twin.losses(t))
        ref.step()
    torch.cuda.synchronize()
    for a, b in zip(problem.params(), twin.params()):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_step_is_bitwise_deterministic():
    results = []
    for _ in range(2):
        problem = Problem(SHAPES["many"], 3, dtype=F32, seed=54, device="cuda")
        opt = run_pub(pub_native.Adam, problem, 5)
        results.append(([p.detach().cpu() for p in problem.params()], opt.task_weights))
    (pa, wa), (pb, wb) = results
    assert torch.equal(wa, wb)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))


@pytest.mark.cuda
@pytest.mark.parametrize("where", ["shared", "head"])
def test_nan_on_cuda_skips_the_whole_step_on_device_and_raises_on_read(where):
    problem = Problem(SHAPES["odd"], 3, dtype=F32, seed=55, device="cuda")
    opt = run_pub(pub_native.Adam, problem, 2)
    snap = snapshot(opt, problem.params())
    losses = problem.losses(3)
    culprit = problem.shared[1] if where == "shared" else problem.heads[1]
    losses[1] = losses[1] + culprit.sum() * float("nan")
    opt.zero_grad()
    opt.backward(losses)
    opt.step()  # no host synchronization: the device skips
    with pytest.raises(FloatingPointError, match="skipped on the device"):
        opt.task_weights  # noqa: B018 - reading raises
    assert_unchanged(opt, problem.params(), snap)  # task-specific parameters included


@pytest.mark.cuda
@pytest.mark.slow
def test_tensor_past_2_31_elements():
    n = 2**31 + 1000
    p = torch.zeros(n, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    opt = pub_native.Adam([p], lr=1e-2, shared=[p])
    opt.backward([p[-10:].float().sum(), -(p[-5:].float().sum())])
    opt.step()
    torch.cuda.synchronize()
    tail = p.detach()[-10:].float().cpu()
    assert (tail != 0).all(), "the elements past 2^31 were not updated"
    assert p.detach()[: 2**31 - 10].abs().max().item() == 0.0


# ---- CPU side: runs everywhere ------------------------------------------------------------


def test_cuda_path_without_module_names_the_rebuild_flag(monkeypatch):
    monkeypatch.setattr(_native, "_C_cuda", None)
    with pytest.raises(RuntimeError, match="PUB_NATIVE_CUDA=ON"):
        _native.cuda_module()


@pytest.mark.slow  # test_cpu_loops.py covers every loop at 1 and 3 threads in the quick suite
def test_cpu_gram_is_bitwise_independent_of_thread_count():
    code = (
        "import sys, torch, pub_native; sys.path.insert(0, 'python_tests');"
        "from helpers import Problem, run_pub;"
        "p = Problem([(300000,), (70001,)], 3, dtype=torch.float32, seed=56);"
        "o = run_pub(pub_native.Adam, p, 3);"
        "print(o.task_weights.numpy().tobytes().hex(),"
        " p.shared[0].detach().numpy().tobytes().hex()[:4000])"
    )
    outs = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        outs.append(subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True,
                                   capture_output=True, text=True, timeout=120).stdout)
    assert outs[0] == outs[1]
