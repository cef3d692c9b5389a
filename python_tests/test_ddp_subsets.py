"""Data parallelism (SPEC section 10) with optimizers over subsets of a DistributedDataParallel
module's parameters: ZeroRedundancyOptimizer(optimizer_class=pub_native.Adam) gives each process
its own partition, which PUB's step (per-task gradients averaged over the processes) cannot take:
every process raises a clear error before any collective whose sizes follow the parameters,
instead of a gloo abort; plain ZeRO steps, and the same subset on every process, keep working.
2 gloo processes on 127.0.0.1 (ddp_subset_worker.py), bounded in time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import run_workers

WORKER = Path(__file__).parent / "ddp_subset_worker.py"
TOL = 1e-6  # pub_native.Adam's plain step against torch.optim.Adam's, float32 rounding


def _run(tmp_path: Path, case: str) -> list[dict]:
    return run_workers(WORKER, 2, tmp_path, ["--case", case], timeout=90)


def _assert_refused(error, kind: str = "NotImplementedError") -> None:
    assert error is not None, "the processes' different parameters were not refused"
    name, message = error
    assert name == kind, f"{name}: {message}"
    assert "different parameters" in message and "ZeroRedundancyOptimizer" in message, message


@pytest.mark.parametrize("case", ["zero_pub", pytest.param("zero_pub_big",
                                                             marks=pytest.mark.slow)])
def test_zero_pub_backward_raises_on_every_process(tmp_path, case):
    # zero_pub: 2 parameters on each process (equal sizes of different tensors: gloo aborted);
    # zero_pub_big: 1 and 3 (a misleading "build the same model" error before).
    ranks = _run(tmp_path, case)
    assert sorted(r["local"] for r in ranks) == ([2, 2] if case == "zero_pub" else [1, 3])
    for r in ranks:
        _assert_refused(r["error"])
        assert "whole model's parameters" in r["error"][1]
        for a, b in zip(r["before"], r["after"]):
            assert torch.equal(a, b), "a refused backward changed a parameter"


@pytest.mark.slow
def test_zero_plain_steps_match_torch_adam_around_a_refused_pub_step(tmp_path):
    ranks = _run(tmp_path, "zero_plain")
    for r in ranks:
        _assert_refused(r["error"])
        assert r["unchanged"]
        for a, b in zip(r["pub"], r["torch"]):
            err = (a - b).abs().max().item()
            assert err <= TOL * b.abs().max().item(), f"off torch's ZeRO by {err:.3e}"
    for a, b in zip(ranks[0]["pub"], ranks[1]["pub"]):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_same_subset_on_every_process_trains_and_other_subsets_raise(tmp_path):
    # Subsets of equal shapes but other parameters (each process its own head) were taken
    # silently, averaging one process's head gradient with the other's.
    ranks = _run(tmp_path, "subset")
    for r in ranks:
        _assert_refused(r["error"])
        _assert_refused(r["balancer_error"])
        assert r["unchanged"]
        l1_before, *rest_before = r["before"]
        l1_after, *rest_after = r["after"]
        assert torch.equal(l1_before, l1_after), "a parameter outside the optimizer changed"
        assert all(not torch.equal(a, b) for a, b in zip(rest_before, rest_after))
    for a, b in zip(ranks[0]["after"], ranks[1]["after"]):
        assert torch.equal(a, b), "the processes are not bitwise identical"


@pytest.mark.slow
def test_processes_that_train_models_of_their_own_with_other_sizes(tmp_path):
    # No DDP module and another number of parameters on each process: the check for replicas
    # paired all-reduces of different sizes (gloo aborted); each process now trains alone.
    ranks = _run(tmp_path, "own_models")
    assert [len(r["after"]) for r in ranks] == [6, 8]
    for r in ranks:
        for a, b in zip(r["before"], r["after"]):
            assert torch.isfinite(b).all() and not torch.equal(a, b)


@pytest.mark.slow
def test_a_tensor_outside_the_ddp_module_on_one_process_is_refused_on_every_process(tmp_path):
    # The process that holds it raised before the set-up check, and the other waited in that
    # check's all-reduce until the timeout.
    first, last = _run(tmp_path, "outside_on_one")
    for kind in ("pub", "balancer"):
        _assert_refused(first[kind])
        assert last[kind] is not None and last[kind][0] == "NotImplementedError"
        assert "some are not" in last[kind][1], last[kind]
