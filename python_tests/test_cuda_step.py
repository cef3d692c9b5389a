"""The CUDA PUB step (tests marked ``cuda`` need a GPU and the _C_cuda module; they are skipped
otherwise) and the CPU-side guarantees it relies on.

CUDA == CPU native == reference per dtype; K = 1 == torch.optim.Adam(fused=True) on CUDA; a
captured CUDA graph replays like eager steps; a non-default stream after an event-gated producer;
bitwise determinism; a tensor of more than 2^31 elements (``slow``).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from test_optim import NATIVE, REFERENCE, SHAPES, Problem, assert_close, run_pub

import pub_native
from pub_native import _native
from pub_native.reference import ReferenceAdam

F32 = torch.float32

TOL = {
    # CUDA vs CPU, float32: same per-element math; the device divides and rounds sqrt
    # correctly too, but fuses multiply-adds differently, and G is summed in another order.
    F32: 2e-5,
    # 16-bit parameters: one rounding of the 16-bit type, at most two ulps at the largest.
    torch.bfloat16: 2 ** -6,
    torch.float16: 2 ** -9,
}


def to_cuda(problem):
    out = copy.deepcopy(problem)
    with torch.no_grad():
        out.shared = [p.detach().cuda().requires_grad_() for p in problem.shared]
        out.heads = [p.detach().cuda().requires_grad_() for p in problem.heads]
    out.a = [[a.cuda() for a in row] for row in problem.a]
    out.b = [[b.cuda() for b in row] for row in problem.b]
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name,options", [
    ("adam", {}), ("adam", dict(amsgrad=True, weight_decay=0.01, update_weights_every=3)),
    ("adam", dict(umm="clippy")), ("adam", dict(umm="adatask", solver="ccp")),
    ("adagrad", dict(lr_decay=0.01)), ("rmsprop", dict(momentum=0.9, centered=True)),
])
def test_cuda_equals_cpu_and_reference(name, options, dtype):
    cpu = Problem(SHAPES["odd"], 3, dtype=dtype, seed=51)
    gpu = to_cuda(cpu)
    ref = copy.deepcopy(cpu)
    o_cpu = run_pub(NATIVE[name], cpu, 8, **options)
    o_gpu = run_pub(NATIVE[name], gpu, 8, **options)
    o_ref = run_pub(REFERENCE[name], ref, 8, **options)
    tol = TOL[dtype]
    assert_close(o_gpu.task_weights, o_cpu.task_weights, tol, "α̂ CUDA vs CPU")
    assert_close(o_gpu.task_weights, o_ref.task_weights, tol, "α̂ CUDA vs reference")
    for j, (pg, pc, pr) in enumerate(zip(gpu.params(), cpu.params(), ref.params())):
        assert_close(pg.cpu(), pc, tol, f"param {j} CUDA vs CPU")
        assert_close(pg.cpu(), pr, tol, f"param {j} CUDA vs reference")
        for key, value in o_cpu.state[pc].items():
            assert_close(o_gpu.state[pg][key].cpu(), value, tol, f"param {j} state {key}")


@pytest.mark.cuda
def test_one_task_equals_fused_adam_on_cuda():
    problem = to_cuda(Problem(SHAPES["odd"], 1, dtype=F32, seed=52, identical=True))
    twin = copy.deepcopy(problem)
    opt = pub_native.Adam(problem.groups(), shared=problem.shared)
    ref = torch.optim.Adam(twin.groups(), fused=True)
    for t in range(7):
        opt.zero_grad()
        opt.backward(problem.losses(t))
        opt.step()
        ref.zero_grad()
        twin.losses(t)[0].backward()
        ref.step()
    for pa, pb in zip(problem.params(), twin.params()):
        assert_close(pa.cpu(), pb.cpu(), 2e-6)


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
        assert_close(a.detach().cpu(), b.detach().cpu(), 1e-6)


@pytest.mark.cuda
def test_non_default_stream_after_event_gated_producer():
    problem = to_cuda(Problem(SHAPES["odd"], 2, dtype=F32, seed=53))
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
        problem = to_cuda(Problem(SHAPES["many"], 3, dtype=F32, seed=54))
        opt = run_pub(pub_native.Adam, problem, 5)
        results.append(([p.detach().cpu() for p in problem.params()], opt.task_weights))
    (pa, wa), (pb, wb) = results
    assert torch.equal(wa, wb)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))


@pytest.mark.cuda
def test_nan_on_cuda_skips_on_device_and_raises_on_read():
    problem = to_cuda(Problem(SHAPES["odd"], 3, dtype=F32, seed=55))
    opt = run_pub(pub_native.Adam, problem, 2)
    before = [p.detach().clone() for p in problem.params()[:len(problem.shared)]]
    state = {k: v.clone() for k, v in opt.state[problem.shared[0]].items()}
    losses = problem.losses(3)
    losses[1] = losses[1] + problem.shared[1].sum() * float("nan")
    opt.zero_grad()
    opt.backward(losses)
    opt.step()
    with pytest.raises(FloatingPointError):
        opt.task_weights  # noqa: B018 - reading raises
    for a, b in zip(before, problem.shared):
        assert torch.equal(a, b)
    for key, value in state.items():
        assert torch.equal(opt.state[problem.shared[0]][key], value)


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


def test_cpu_gram_is_bitwise_independent_of_thread_count():
    code = (
        "import sys, torch, pub_native; sys.path.insert(0, 'python_tests');"
        "from test_optim import Problem, SHAPES, run_pub;"
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
                                   capture_output=True, text=True).stdout)
    assert outs[0] == outs[1]


def test_reference_is_importable_for_cuda_comparisons():
    assert ReferenceAdam is REFERENCE["adam"]
