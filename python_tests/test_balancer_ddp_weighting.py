"""The loss weightings (Uncertainty, FAMO) under torch.distributed: 2 gloo processes that the
test spawns on 127.0.0.1 (a free port, bounded time) train on equal slices of each batch
(ddp_loss_weighting.py). Their state — Uncertainty's log-variances, FAMO's logits and weights —
must stay bitwise identical across the processes and equal one process on the whole batches (to
rounding): Uncertainty's log_vars live outside the DDP module, so DDP never averaged their
gradients, and FAMO took its weights and its logit update from each process's own losses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import run_workers

HERE = Path(__file__).parent
WORKER = HERE / "ddp_loss_weighting.py"
WORLD = 2
TOL = 1e-10  # float64: one process on the whole batch, to rounding


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(per process: {(kind, mode): result}, {(kind, mode): one process's result})."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    ranks = run_workers(WORKER, WORLD, tmp_path_factory.mktemp("ddp_loss_weighting"),
                        timeout=90)
    for r in ranks:
        assert "error" not in r, r.get("error")
    sys.path.insert(0, str(HERE))
    try:
        import ddp_loss_weighting as worker
    finally:
        sys.path.remove(str(HERE))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {(kind, mode): worker.train(kind, mode)
                  for kind in worker.KINDS for mode in worker.MODES}
    finally:
        torch.set_num_threads(threads)
    return ranks, single


def _mismatches(ranks, single, kind, mode) -> list[str]:
    """What differs between the processes, or from one process on the whole batches (to
    rounding), or shows the run vacuous; empty when nothing does."""
    key = (kind, mode)
    first, ref = ranks[0][key], single[key]
    found = []
    for other in ranks[1:]:
        got = other[key]
        if not (torch.equal(got["state"], first["state"])
                and torch.equal(got["weights"], first["weights"])
                and all(torch.equal(a, b) for a, b in zip(got["params"], first["params"],
                                                          strict=True))):
            found.append("the processes differ")
    close = [torch.allclose(first["state"], ref["state"], rtol=TOL, atol=TOL),
             torch.allclose(first["weights"], ref["weights"], rtol=TOL, atol=TOL),
             *(torch.allclose(a, b, rtol=TOL, atol=TOL)
               for a, b in zip(first["params"], ref["params"], strict=True))]
    if not all(close):
        found.append("not one process on the whole batch")
    # Not vacuous: the state moved, and the balancer found the group (and averaged the
    # parameters' gradients itself only without a DDP module).
    if not first["state"].abs().max() > 1e-3:
        found.append("the state did not move")
    if not (first["group"] and first["own"] == (mode == "group") and not ref["group"]):
        found.append("the group was not found as expected")
    return found


@pytest.mark.parametrize("mode", ["ddp", "group"])
def test_uncertainty_log_vars_are_those_of_one_process_on_the_whole_batch(runs, mode):
    ranks, single = runs
    assert _mismatches(ranks, single, "uncertainty", mode) == []


@pytest.mark.parametrize("mode", ["ddp", "group"])
def test_famo_weights_and_logits_are_those_of_one_process_on_the_whole_batch(runs, mode):
    # Updated by update() after some steps and from the next batch's losses after the others.
    ranks, single = runs
    assert _mismatches(ranks, single, "famo", mode) == []
    assert ranks[0][("famo", mode)]["updates"] == single[("famo", mode)]["updates"]
    assert {"explicit", "next batch"} <= set(ranks[0][("famo", mode)]["updates"])


@pytest.mark.parametrize("kind", ["uncertainty", "famo"])
def test_a_loss_weighting_without_a_ddp_module_trains_each_process_on_its_own(runs, kind):
    # process_group="auto" without a DDP module (a model each process trains alone, gradients
    # the user all-reduces, FSDP): no group, no error (it raised "not wrapped in
    # DistributedDataParallel"), each process as one process on its own slice.
    ranks, _ = runs
    sys.path.insert(0, str(HERE))
    try:
        import ddp_loss_weighting as worker
    finally:
        sys.path.remove(str(HERE))
    for r, result in enumerate(ranks):
        got = result[(kind, "alone")]
        assert not got["group"]
        alone = worker.train(kind, "alone", WORLD, r)
        assert torch.equal(got["state"], alone["state"])
        assert torch.equal(got["weights"], alone["weights"])
    assert not torch.equal(ranks[0][(kind, "alone")]["state"], ranks[1][(kind, "alone")]["state"])


@pytest.mark.slow
def test_loss_weightings_refuse_fsdp2_parameters_by_name(tmp_path):
    # Under FSDP2 the forward runs on unsharded copies of the parameters, so no loss reaches the
    # sharded ones the balancer was given: a NotImplementedError naming FSDP2, not the error of
    # a balancer built on a stale copy of the model, and no .grad written.
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (fully_shard)")
    ranks = run_workers(HERE / "fsdp2_loss_weighting.py", WORLD, tmp_path, timeout=90)
    for raised in ranks:
        assert {name for name, _ in raised} == {"LS", "Uncertainty", "FAMO", "FAMO clipped"}
        assert {part for _, part in raised} == {"model", "trunk"}
        for name, got in raised.items():
            assert got is not None, f"{name} took sharded parameters it does not reach"
            kind, message, no_grad = got
            assert kind == "NotImplementedError" and "FSDP2" in message, (name, message)
            assert all(no_grad), name


@pytest.fixture(scope="module")
def balancer_runs(tmp_path_factory):
    """Per process, what ddp_balancer_losses.py's cases did."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    return run_workers(HERE / "ddp_balancer_losses.py", WORLD,
                       tmp_path_factory.mktemp("ddp_balancer_losses"), timeout=90)


def test_a_loss_non_finite_on_one_process_is_decided_alike_on_every_process(balancer_runs):
    # A NaN loss on one process's slice: every process raises FloatingPointError (one that
    # raised alone would leave the others waiting in the next collective). An Inf loss with a
    # finite gradient under a GradScaler: every process takes the same step (the processes do
    # not drift apart).
    ranks = balancer_runs
    for r in ranks:
        assert "non-finite loss in task(s) [1]" in r[False].get("error", ""), r[False]
        assert "params" in r[True], r[True]
    for a, b in zip(ranks[0][True]["params"], ranks[1][True]["params"]):
        assert torch.equal(a, b)


def test_pcgrad_draws_the_same_task_orders_on_every_process(balancer_runs):
    ranks = balancer_runs
    # PCGrad(seed=None) drew a different seed on each process, so their task orders and
    # shared gradients differed (the replicas drifted apart): every process now draws from one
    # seed. Explicit seeds that differ are refused on every process, .grad untouched.
    drawn = [r["pcgrad"][None] for r in ranks]
    for a, b in zip(drawn[0]["grads"], drawn[1]["grads"], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.equal(drawn[0]["weights"], drawn[1]["weights"])
    assert float((drawn[0]["weights"] - 1).abs().max()) > 1e-3  # (projections took place)
    for r in ranks:
        refused = r["pcgrad"][3]
        assert "random generator differs between the processes" in refused.get("error", ""), \
            refused
        assert all(g is None for g in refused["grads"])
