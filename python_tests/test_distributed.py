"""Data parallelism (SPEC section 10) on the CPU with the gloo backend: 2 and 3 processes that
the tests spawn themselves on 127.0.0.1 (a free port, bounded time) train a DistributedDataParallel
model with a PUB optimizer or a gradient balancer. The processes must stay bitwise identical and
equal one process trained on the whole batches (ddp_worker.py runs both)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_workers

HERE = Path(__file__).parent
WORKER = HERE / "ddp_worker.py"
TOL = 1e-5  # the bound: one process on the global batch, to float rounding



def _run(out: Path, world: int, args: list[str], timeout: float = 120.0) -> list[dict]:
    return run_workers(WORKER, world, out, args, timeout)


def _single(out: Path, args: list[str]) -> dict:
    subprocess.run([sys.executable, str(WORKER), "--mode", "single", "--out", str(out), *args],
                   check=True, capture_output=True, timeout=120, env=dict(os.environ,
                                                                           OMP_NUM_THREADS="1"))
    return torch.load(out / "single.pt", weights_only=False)


def _assert_identical_and_exact(ranks: list[dict], single: dict) -> None:
    for r in ranks:
        assert "error" not in r, r.get("error")
    for r in ranks[1:]:
        for a, b in zip(ranks[0]["params"], r["params"]):
            assert torch.equal(a, b), "the processes are not bitwise identical"
    for a, b in zip(ranks[0]["params"], single["params"]):
        err = (a - b).abs().max().item()
        assert err <= TOL * max(b.abs().max().item(), 1.0), f"off one process by {err:.3e}"
    if single["weights"] is not None:
        assert torch.allclose(ranks[0]["weights"], single["weights"], atol=TOL)


def _case(world, args, slow=True):
    name = ",".join(f"{k.lstrip('-')}={v}" for k, v in zip(args[::2], args[1::2]))
    return pytest.param(world, args, id=f"{world}proc-{name}",
                        marks=[pytest.mark.slow] if slow else [])


CASES = [
    # world, worker arguments
    _case(2, ["--optimizer", "adam"]),  # the find_unused case below runs it in the quick suite
    _case(2, ["--optimizer", "adagrad", "--umm", "adatask"]),
    _case(2, ["--optimizer", "rmsprop", "--umm", "clippy"]),
    _case(2, ["--optimizer", "adam", "--every", "3"]),
    _case(2, ["--optimizer", "adam", "--shard", "0"]),
    _case(3, ["--optimizer", "adam", "--model", "uneven"]),  # shards split tensors
    _case(3, ["--optimizer", "rmsprop", "--model", "uneven", "--umm", "adatask", "--tasks",
              "3"]),
    _case(2, ["--optimizer", "adam", "--absent", "1"]),
    _case(3, ["--optimizer", "adam", "--model", "uneven", "--tools", "1"]),  # clipping tools
    _case(2, ["--optimizer", "adam", "--tools", "1", "--shard", "0"]),
    # Two synced backward calls (micro-batches) before one step.
    _case(2, ["--optimizer", "adam", "--shard", "0", "--accumulate", "2"]),
    _case(3, ["--optimizer", "rmsprop", "--model", "uneven", "--accumulate", "2"]),
    # A synced backward, one inside no_sync(), a synced one (replicated: the first average
    # was counted N times before; Clippy always takes the replicated scheme).
    _case(2, ["--optimizer", "adam", "--shard", "0", "--accumulate", "3", "--no-sync-at", "1"]),
    _case(2, ["--optimizer", "rmsprop", "--umm", "clippy", "--accumulate", "3",
              "--no-sync-at", "1"]),
    _case(2, ["--optimizer", "adam", "--model", "uneven", "--accumulate", "3",
              "--no-sync-at", "1"]),  # (sharded; 3 processes would split 4 rows unevenly)
    # DDP's options that pass every output through one node (detection must see through it).
    _case(2, ["--optimizer", "adam", "--ddp", "find_unused"], slow=False),
    _case(2, ["--optimizer", "adagrad", "--ddp", "static_graph"]),
    # Processes whose own graphs detect different shared parameters: they agree (the union).
    _case(2, ["--optimizer", "adam", "--diverge", "1"]),
]


@pytest.mark.parametrize("world,args", CASES)
def test_ddp_trains_like_one_process_on_the_whole_batch(tmp_path, world, args):
    ranks = _run(tmp_path, world, args)
    _assert_identical_and_exact(ranks, _single(tmp_path, args))
    # The communication the processes reported, against the (K + 2)/2 (sharded) or K
    # (replicated) × DDP model: within the model plus the small collectives.
    assert ranks[0]["bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    pytest.param(["--model", "uneven"], id="plain"),
    pytest.param(["--model", "uneven", "--umm", "adatask"], id="adatask",
                 marks=pytest.mark.slow)])
def test_checkpoint_resumes_on_another_world_size(tmp_path, args):
    # 2 processes train 2 steps and save (a collective state_dict of the sharded state); 3
    # processes load it and train 2 more: as one process trained 4 steps without a break.
    first = tmp_path / "first"
    _run(first, 2, ["--steps", "2", "--save-at", "1", *args])
    ranks = _run(tmp_path / "second", 3, ["--start", "2", "--steps", "2", "--load",
                                          str(first / "checkpoint.pt"), *args])
    single = _single(tmp_path, ["--steps", "4", *args])
    _assert_identical_and_exact(ranks, single)
    full, ref = ranks[0]["state"], single["state"]
    for key, entries in ref["state"].items():
        for name, value in entries.items():
            mine = full["state"][key][name]
            assert mine.shape == value.shape, (key, name)
            assert torch.allclose(mine.double(), value.double(), rtol=1e-4, atol=1e-6), \
                (key, name)


@pytest.mark.slow
@pytest.mark.parametrize("balancer,ddp", [("nashmtl", ""), ("mgda-ub", ""), ("imtl-g", ""),
                                         ("pcgrad", ""), ("cagrad", ""),
                                         ("nashmtl", "find_unused"), ("mgda-ub", "diverge"),
                                         ("imtl-g", "every"), ("nashmtl", "sparse-head")])
def test_gradient_balancers_under_ddp(tmp_path, balancer, ddp):
    # diverge: the processes' own graphs detect different shared parameters (they agree);
    # every: steps that reuse the weights (and one that routes task 1 into task 0's tower);
    # sparse-head: a head of sparse embedding rows, whose gradient travels dense in the
    # average (reshape raised).
    args = ["--balancer", balancer] + (["--diverge", "1"] if ddp == "diverge" else
                                       ["--every", "2", "--route", "0.5"] if ddp == "every"
                                       else ["--model", ddp] if ddp == "sparse-head"
                                       else ["--ddp", ddp])
    ranks = _run(tmp_path, 2, args)
    _assert_identical_and_exact(ranks, _single(tmp_path, args))


@pytest.mark.slow
@pytest.mark.parametrize("balancer", ["mgda-ub", "nashmtl"])
def test_a_task_routed_later_to_another_tasks_tower_is_weighted_alike_everywhere(tmp_path,
                                                                                 balancer):
    # From the second step, task 1 reaches task 0's tower on the first process only: its
    # gradient there is kept apart, averaged over the processes in the same all-reduce as the
    # tower's own, and weighted by task 1's weight, as in one process on the whole batch.
    args = ["--balancer", balancer, "--route", "0.5"]
    ranks = _run(tmp_path, 2, args)
    _assert_identical_and_exact(ranks, _single(tmp_path, args))


@pytest.mark.slow
def test_famo_clipping_inside_no_sync_keeps_the_replicas_identical(tmp_path):
    # FAMO clips each call's gradient (max_norm=1): inside ddp.no_sync() each process clipped
    # its own, and the synced call averaged only its own part, adding back the un-averaged
    # rest: the replicas drifted apart (0.2 in .grad). Each call's gradient is now averaged
    # before the clip, as the other clipping balancers average theirs.
    ranks = _run(tmp_path, 2, ["--balancer", "famo", "--accumulate", "3", "--no-sync-at", "1",
                               "--steps", "3"])
    for r in ranks:
        assert "error" not in r, r.get("error")
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b), "the processes are not bitwise identical"


@pytest.mark.slow
def test_gradient_balancer_with_an_explicit_process_group(tmp_path):
    # No DDP wrapper: process_group= names the group over which the balancer averages the task
    # gradients (the task-specific ones too), and two processes train like one.
    args = ["--balancer", "nashmtl"]
    ranks = _run(tmp_path, 2, ["--mode", "explicit-group", *args])
    _assert_identical_and_exact(ranks, _single(tmp_path, args))


@pytest.mark.slow
def test_explicit_process_group_of_one_exercises_the_data_parallel_path(tmp_path):
    # process_group=<group>: the collectives run even with one process (what a GPU check with
    # NCCL and one device can run), and the result is the single-process one.
    args = ["--model", "uneven"]
    ranks = _run(tmp_path, 1, ["--mode", "explicit-group", *args])
    _assert_identical_and_exact(ranks, _single(tmp_path, args))


@pytest.mark.cuda
def test_nccl_world_of_one_on_cuda(tmp_path):
    args = ["--model", "uneven", "--device", "cuda"]
    ranks = _run(tmp_path, 1, ["--mode", "explicit-group", "--backend", "nccl", *args])
    _assert_identical_and_exact(ranks, _single(tmp_path, args))


@pytest.mark.parametrize("mode,match", [
    pytest.param("no-sync-misuse", "no_sync", marks=pytest.mark.slow),
    pytest.param("different-k", "same number of losses",  # an error everywhere, not a hang
                 marks=pytest.mark.slow),
    pytest.param("no-wrapper", "not wrapped in DistributedDataParallel",
                 marks=pytest.mark.slow),
    pytest.param("sharded-parameter", "sharded \\(FSDP or DTensor\\)",
                 marks=pytest.mark.slow),
    # Uneven inputs: a joined process stands in for DDP's all-reduce only; gloo aborted the
    # others at PUB's own collectives.
    pytest.param("join", "join\\(\\).*not supported", marks=pytest.mark.slow),
])
def test_set_ups_that_cannot_be_exact_raise(tmp_path, mode, match):
    ranks = _run(tmp_path, 2, ["--mode", mode])
    for r in ranks:
        assert "error" in r and re.search(match, r["error"]), r


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--shard", "1"], ["--balancer", "nashmtl"]],
                         ids=["pub", "nashmtl"])
def test_a_ddp_communication_hook_is_not_run_and_says_so(tmp_path, args):
    # PUB and the balancers on per-task gradients average those themselves (exactly): an
    # fp16-compression hook on the DDP module was ignored without a word.
    ranks = _run(tmp_path, 2, ["--mode", "comm-hook", *args])
    _assert_identical_and_exact(ranks, _single(tmp_path, args))
    for r in ranks:
        assert any("communication hook (fp16_compress_hook)" in w for w in r["warnings"]), r


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["late-hook", "rewrap-hook"])
@pytest.mark.parametrize("args", [["--shard", "1"], ["--balancer", "mgda-ub"]],
                         ids=["pub", "mgda-ub"])
def test_a_communication_hook_registered_later_is_reported_at_the_next_call(tmp_path, args,
                                                                            mode):
    # (rewrap-hook: on a wrapper made after the first call, the earlier one gone, which is
    # found and checked as the first was.)
    ranks = _run(tmp_path, 2, ["--mode", mode, *args])
    for r in ranks:
        assert "error" not in r, r["error"]
        hooks = [w for w in r["warnings"] if "communication hook (fp16_compress_hook)" in w]
        assert hooks and all(w.startswith("1: ") for w in hooks), r["warnings"]


@pytest.mark.parametrize("mode,args,match", [
    # A parameter DDP leaves alone: its gradient was averaged all the same (two processes'
    # different towers mixed).
    pytest.param("ignored", ["--shard", "0"],
                 r"told to ignore parameter\(s\) \['towers.0.weight'\]", id="ignored-pub"),
    pytest.param("ignored", ["--balancer", "nashmtl"], "told to ignore", id="ignored-nashmtl",
                 marks=pytest.mark.slow),
    pytest.param("ignored", ["--balancer", "famo"], "told to ignore", id="ignored-famo",
                 marks=pytest.mark.slow),
    # The loss weightings fell back to each process's own losses (log-variances and logits
    # then differed between the processes).
    pytest.param("two-ddp", ["--balancer", "uncertainty"], "belong to 2 DistributedDataParallel",
                 id="two-ddp-uncertainty", marks=pytest.mark.slow),
    pytest.param("two-ddp", ["--balancer", "famo"], "belong to 2 DistributedDataParallel",
                 id="two-ddp-famo", marks=pytest.mark.slow),
    # The model wrapped again (as DDP asks after unfreezing): the earlier wrapper's join state
    # was read, and gloo aborted both processes.
    pytest.param("rewrap-join", ["--shard", "0"], r"join\(\).*not supported", id="rewrap-pub",
                 marks=pytest.mark.slow),
    pytest.param("rewrap-join", ["--balancer", "nashmtl"], r"join\(\).*not supported",
                 id="rewrap-nashmtl", marks=pytest.mark.slow),
    pytest.param("rewrap-join", ["--balancer", "uncertainty"], r"join\(\).*not supported",
                 id="rewrap-uncertainty", marks=pytest.mark.slow),
])
def test_ddp_set_ups_a_method_cannot_honour_raise_on_every_process(tmp_path, mode, args, match):
    ranks = _run(tmp_path, 2, ["--mode", mode, *args])
    for r in ranks:
        assert "error" in r and re.search(match, r["error"]), r


@pytest.mark.slow  # (refuse_join itself runs in the quick suite: the PUB optimizers' "join")
@pytest.mark.parametrize("balancer", ["nashmtl", "famo", "uncertainty"])
def test_balancers_refuse_ddp_join_on_every_process(tmp_path, balancer):
    # Their own collectives (task gradients, loss values), which a joined process does not
    # shadow: gloo aborted the interpreter, as for the PUB optimizers.
    ranks = _run(tmp_path, 2, ["--mode", "join", "--balancer", balancer])
    for r in ranks:
        assert "error" in r and re.search("join\\(\\).*not supported", r["error"]), r


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--shard", "0"], ["--balancer", "nashmtl"]],
                         ids=["replicated", "nashmtl"])
def test_a_shared_parameter_frozen_at_detection_is_balanced_once_unfrozen(tmp_path, args):
    args = ["--freeze-until", "2", *args]
    _assert_identical_and_exact(_run(tmp_path, 2, args), _single(tmp_path, args))


@pytest.mark.slow
def test_unfreezing_a_shared_parameter_under_sharded_state_says_what_to_do(tmp_path):
    # The sharded state is split by the old layout: a clear error on every process, and
    # nothing decided (before, the optimizer kept the new shared set with the old layout, and
    # state_dict(), which the message advised, failed).
    for r in _run(tmp_path, 2, ["--freeze-until", "2"]):
        assert "changed under sharded data parallelism" in r.get("error", ""), r
        assert "shared= naming every parameter" in r["error"]


@pytest.mark.slow
@pytest.mark.parametrize("balancer", ["", "nashmtl"])
def test_a_parameter_frozen_on_one_process_only_raises_everywhere(tmp_path, balancer):
    # Before, a balancer's all-reduce of differently sized buffers aborted the interpreter
    # (gloo), and the PUB optimizers' states drifted apart.
    ranks = _run(tmp_path, 2, ["--mode", "frozen-on-one"] +
                 (["--balancer", balancer] if balancer else []))
    for r in ranks:
        assert "error" in r and "requires grad on some processes" in r["error"], r


@pytest.mark.slow
def test_a_different_number_of_losses_under_a_balancer_raises_everywhere(tmp_path):
    ranks = _run(tmp_path, 2, ["--mode", "different-k", "--balancer", "imtl-g"])
    for r in ranks:
        assert "error" in r and "same number of losses" in r["error"], r


@pytest.mark.parametrize("mode,match", [
    pytest.param("absent-first", "no loss graph in this batch", marks=pytest.mark.slow),
    pytest.param("all-absent-first", "no task loss requires grad", marks=pytest.mark.slow)])
def test_a_task_absent_from_one_first_batch_raises_everywhere(tmp_path, mode, match):
    # Shared parameters cannot be detected from a first batch that lacks a task on one process,
    # nor anything done with a batch that lacks every task: that process says so, and the
    # others that it failed (rather than "connection closed by peer" when it exits, or a hang
    # while it lives on).
    first, last = _run(tmp_path, 2, ["--mode", mode])
    assert "failed on another process" in first.get("error", ""), first
    assert match in last.get("error", ""), last


@pytest.mark.slow
def test_per_task_norms_agree_on_a_process_that_holds_no_piece(tmp_path):
    # A shared parameter of one element: under sharded state one process holds none of it. Its
    # norms took a shortcut (no root, a sum where the others took a max or min): the processes
    # disagreed, and the norms were wrong there. Every norm is |g_i| of the averaged gradient.
    ranks = run_workers(HERE / "ddp_task_norms.py", 2, tmp_path)
    assert sorted(sum(r["pieces"]) for r in ranks) == [0, 1]  # one process holds nothing
    g = ranks[0]["grads"]  # (K,): each task's gradient, averaged over the processes
    for norm_type, norms in ranks[0]["norms"].items():
        assert torch.equal(norms, ranks[1]["norms"][norm_type]), norm_type
        expected = (g != 0).double() if norm_type == 0 else g.abs()
        torch.testing.assert_close(norms, expected, rtol=1e-6, atol=0,
                                   msg=f"norm_type={norm_type}")


@pytest.mark.slow
def test_detection_sees_through_ddps_output_node_as_one_process_does(tmp_path):
    # With find_unused_parameters or static_graph, DDP passes the model's flattened outputs,
    # non-tensors included, through one node whose inputs count tensors alone: a None among
    # the outputs made the detection follow another output's branch (the trunk found shared
    # by no task, silently; MultiBalance's trunk got no gradient), and a model returning its
    # losses had every head shared.
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    ranks = run_workers(HERE / "ddp_outputs_worker.py", 2, tmp_path, timeout=120)
    trunk = ["trunk.bias", "trunk.weight"]
    encoder = ["enc.weight", "enc.bias"]  # (MultiBalance's trunk, and those given a gradient)
    for r in ranks:
        for case, found in r.items():
            expected = [encoder, sorted(encoder)] if case[0] == "multibalance" else [trunk, trunk]
            assert found["alone"] == expected, case
            assert found["ddp"] == found["alone"], case
