"""Checkpoints that pass through other tools: torch.distributed.checkpoint's
get/set_optimizer_state_dict and dcp.save/dcp.load, which rebuild an optimizer's state dict from
its "state" and "param_groups" only, and torch's own optimizers, which keep the group keys they
do not know. PUB's entry travels in the first param group too; a copy that no longer describes
the state is dropped."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from helpers import TrunkHeads

import pub_native

dcp_state = pytest.importorskip("torch.distributed.checkpoint.state_dict")


def _losses(model, t: int):
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 3, generator=g)
    scale = [1.0, 30.0, 0.1]
    return [scale[i] * ((o - y[:, i]) ** 2).mean() for i, o in enumerate(model(x))]


def _step(model, opt, t: int) -> None:
    opt.zero_grad()
    opt.backward(_losses(model, t))
    opt.step()


def _pair(**options):
    torch.manual_seed(0)
    model = TrunkHeads(k=3)
    ref = copy.deepcopy(model)
    opt = pub_native.Adam(model.parameters(), lr=1e-2, **options)
    ref_opt = pub_native.Adam(ref.parameters(), lr=1e-2, **options)
    for t in range(4):
        _step(model, opt, t)
        _step(ref, ref_opt, t)
    return model, opt, ref, ref_opt


def _continue_and_compare(model, opt, ref, ref_opt) -> None:
    assert opt.num_tasks == ref_opt.num_tasks == 3
    assert torch.equal(opt.task_weights, ref_opt.task_weights)
    for t in range(4, 9):
        _step(model, opt, t)
        _step(ref, ref_opt, t)
        assert torch.equal(opt.task_weights, ref_opt.task_weights), t
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert all("pub" not in g for g in opt.param_groups)


@pytest.mark.parametrize("how", ["default", "full_state_dict", "cpu_offload"])
@pytest.mark.parametrize("options", [dict(update_weights_every=3), dict(umm="adatask"),
                                     dict(update_weights_every=2, solver="ccp")],
                         ids=["every3", "adatask", "every2-ccp"])
def test_get_set_optimizer_state_dict_resume_bit_for_bit(options, how):
    model, opt, ref, ref_opt = _pair(**options)
    so = dcp_state.StateDictOptions(**({} if how == "default" else {how: True}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: one process" and the like
        osd = dcp_state.get_optimizer_state_dict(model, opt, options=so)
    assert "pub" not in osd  # the tool keeps "state" and "param_groups" only
    resumed = copy.deepcopy(model)
    resumed_opt = pub_native.Adam(resumed.parameters(), lr=1e-2, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_state.set_optimizer_state_dict(resumed, resumed_opt, osd, options=so)
    assert resumed_opt.state_dict()["pub"]["step"] == opt.state_dict()["pub"]["step"] == 4
    _continue_and_compare(resumed, resumed_opt, ref, ref_opt)


def test_dcp_save_and_load_on_disk_resume_bit_for_bit(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    model, opt, ref, ref_opt = _pair(update_weights_every=3)
    fresh = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: one process" and the like
        dcp.save({"model": dcp_state.get_model_state_dict(model),
                  "optim": dcp_state.get_optimizer_state_dict(model, opt)},
                 checkpoint_id=str(tmp_path))
        for p in fresh.parameters():
            p.data.normal_()  # the load must bring the values back
        fresh_opt = pub_native.Adam(fresh.parameters(), lr=1e-2, update_weights_every=3)
        # A new optimizer's dict (K not known yet) is what dcp.load fills.
        sd = {"model": dcp_state.get_model_state_dict(fresh),
              "optim": dcp_state.get_optimizer_state_dict(fresh, fresh_opt)}
        dcp.load(sd, checkpoint_id=str(tmp_path))
        dcp_state.set_model_state_dict(fresh, sd["model"])
        dcp_state.set_optimizer_state_dict(fresh, fresh_opt, sd["optim"])
    _continue_and_compare(fresh, fresh_opt, ref, ref_opt)


def test_a_torch_optimizer_carries_the_entry_and_a_step_of_its_own_makes_it_stale():
    model, opt, ref, ref_opt = _pair(update_weights_every=3)
    torch_opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch_opt.load_state_dict(opt.state_dict())
    # Back without a step of torch's: the entry still describes the state.
    back = pub_native.Adam(model.parameters(), lr=1e-2, update_weights_every=3)
    back.load_state_dict(torch_opt.state_dict())
    assert back.num_tasks == 3 and back.state_dict()["pub"]["step"] == 4
    # After one: the dict loads as torch's own checkpoint (K found again by the next backward,
    # the step counter from 0), exactly as the same dict without the group's copy.
    sum(_losses(model, 9)).backward()
    torch_opt.step()
    stale = torch_opt.state_dict()
    assert "pub" in stale["param_groups"][0]
    plain = copy.deepcopy(stale)
    del plain["param_groups"][0]["pub"]
    twin = copy.deepcopy(model)
    a = pub_native.Adam(model.parameters(), lr=1e-2, update_weights_every=3)
    b = pub_native.Adam(twin.parameters(), lr=1e-2, update_weights_every=3)
    a.load_state_dict(stale)
    b.load_state_dict(plain)
    assert a.num_tasks is None and a.state_dict()["pub"]["step"] == 0
    for t in range(10, 14):
        _step(model, a, t)
        _step(twin, b, t)
    for x, y in zip(model.parameters(), twin.parameters()):
        assert torch.equal(x, y)
    assert torch.equal(a.task_weights, b.task_weights)


def test_the_entry_in_the_first_group_is_checked_as_the_top_one():
    model, opt, _, _ = _pair()
    sd = opt.state_dict()
    del sd["pub"]
    entry = json.loads(sd["param_groups"][0]["pub"])
    entry["task_weights"] = [0.5, 1e300, 0.5]
    sd["param_groups"][0]["pub"] = json.dumps(entry)
    fresh = pub_native.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="task_weights"):
        fresh.load_state_dict(sd)
    sd["param_groups"][0]["pub"] = "{not json"
    with pytest.raises(ValueError, match="JSON"):
        fresh.load_state_dict(sd)
    assert fresh.num_tasks is None and not fresh.state


def test_parameters_in_another_order_are_refused_not_misbalanced():
    # The tools map the state by parameter name, while the entry names the shared parameters
    # by position: heads first and trunk last would balance the heads.
    model, opt, _, _ = _pair()
    osd = dcp_state.get_optimizer_state_dict(model, opt)
    other = copy.deepcopy(model)
    fresh = pub_native.Adam([{"params": other.heads.parameters()},
                             {"params": other.trunk.parameters()}], lr=1e-2)
    with pytest.raises(ValueError, match="another order"):
        dcp_state.set_optimizer_state_dict(other, fresh, osd)
    assert fresh.num_tasks is None


def test_adatask_state_without_the_entry_names_what_is_missing():
    model, opt, _, _ = _pair(umm="adatask")
    sd = opt.state_dict()
    del sd["pub"], sd["param_groups"][0]["pub"]
    fresh = pub_native.Adam(model.parameters(), lr=1e-2, umm="adatask")
    with pytest.raises(ValueError, match=r"task_exp_avg.*trunk|no \"pub\" entry"):
        fresh.load_state_dict(sd)
    assert not fresh.state


@pytest.mark.slow
def test_get_set_optimizer_state_dict_under_ddp_with_sharded_state(tmp_path):
    from pathlib import Path

    from helpers import run_workers

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    ranks = run_workers(Path(__file__).parent / "ddp_checkpoint_tools.py", 2, tmp_path)
    for r in ranks:
        assert r["sharded"] and r["k"] == 2
        assert r["diff"] == 0.0
