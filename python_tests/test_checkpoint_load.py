"""load_state_dict of the PUB optimizers (SPEC sections 7 and 9): the "pub" entry checked whole
before anything is loaded, a failed load that changes nothing, torch's load hooks, state entries
the step does not read, AdaTask's shared parameters and pending task gradients across a load."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import BF16, F32
from helpers import NATIVE, SHAPES, Problem, run_pub

import pub_native


def _pub_attributes(opt):
    return (opt._k, opt._t, opt._solved, opt._pending, dict(opt._decided),
            None if opt._shared is None else [id(p) for p in opt._shared],
            opt._grads, opt.task_weights, opt.options)


def _snapshot(opt, params):
    """Parameters, param groups, state (the tensors and their values) and PUB's attributes."""
    state = {id(p): {k: (v, v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                     for k, v in opt.state.get(p, {}).items()} for p in params}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return ([p.detach().clone() for p in params], groups, state, _pub_attributes(opt))


def _assert_unchanged(opt, params, snap):
    values, groups, state, pub = snap
    for j, (p, v) in enumerate(zip(params, values)):
        assert torch.equal(p, v), f"param {j} changed"
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    for j, p in enumerate(params):
        now = opt.state.get(p, {})
        assert set(now) == set(state[id(p)]), f"param {j}: state keys changed"
        for key, (obj, value) in state[id(p)].items():
            assert now[key] is obj, f"param {j}: state {key!r} replaced"
            if isinstance(value, torch.Tensor):
                assert now[key].dtype == value.dtype and now[key].stride() == value.stride()
                assert torch.equal(now[key], value), f"param {j}: state {key!r} changed"
    now = _pub_attributes(opt)
    assert now[:6] == pub[:6] and now[6] is pub[6] and now[8] is pub[8]
    assert (now[7] is None) == (pub[7] is None)
    if pub[7] is not None:
        assert torch.equal(now[7], pub[7])


def _trained(steps=3, **options):
    problem = Problem(SHAPES["small"], 2, dtype=F32, seed=31)
    opt = run_pub(pub_native.Adam, problem, steps, **options)
    return problem, opt


# ---- the "pub" entry -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), [
    (name, value) for name in ("task_weights", "warm_start")
    for value in (float("nan"), float("inf"), -5.0)] + [("task_weights", "huge")])
def test_non_finite_or_negative_loaded_weights_raise_and_change_nothing(name, value):
    # update_weights_every > 1: the steps after the load reuse the loaded α̂ as it is, and a NaN,
    # an Inf or a negative weight would go into the parameters.
    problem, opt = _trained(update_weights_every=10)
    sd = copy.deepcopy(opt.state_dict())
    if value != "huge":
        sd["pub"][name] = torch.tensor([value, 1.0], dtype=torch.float64)
    else:  # finite, but far from the sum of 1 of weight_norm="sum": overflows
        sd["pub"][name] = torch.tensor([1e300, 1e300], dtype=torch.float64)
    fresh_problem = problem.clone()
    fresh = pub_native.Adam(fresh_problem.groups(), update_weights_every=10)
    run_pub(None, fresh_problem, 1, opt=fresh)
    params = fresh_problem.params()
    snap = _snapshot(fresh, params)
    with pytest.raises(ValueError, match=rf"pub\['{name}'\].*(finite and >= 0|sum to 1)"):
        fresh.load_state_dict(sd)
    _assert_unchanged(fresh, params, snap)
    run_pub(None, fresh_problem, 2, start=1, opt=fresh)
    assert all(bool(torch.isfinite(p).all()) for p in params)


def test_a_checkpoint_of_another_weight_norm_is_refused_and_bfloat16_weights_taken():
    problem, opt = _trained(update_weights_every=10)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["pub"]["weight_norm"] == "sum"
    raw = pub_native.Adam(problem.clone().groups(), update_weights_every=10, weight_norm="none")
    with pytest.raises(ValueError, match="weight_norm='sum'"):
        raw.load_state_dict(sd)
    sd["pub"]["task_weights"] = sd["pub"]["task_weights"].to(torch.bfloat16)  # a tool's copy
    fresh = pub_native.Adam(problem.clone().groups(), update_weights_every=10)
    fresh.load_state_dict(sd)
    assert fresh.task_weights is not None


_BAD_PUB = [
    # (what, change of the "pub" entry, error, message)
    ("step str", {"step": "x"}, TypeError, r"pub\['step'\] is 'x'"),
    ("step None", {"step": None}, TypeError, r"pub\['step'\] is None"),
    ("step negative", {"step": -1}, ValueError, r"pub\['step'\] is -1"),
    ("num_tasks str", {"num_tasks": "2"}, TypeError, r"pub\['num_tasks'\] is '2'"),
    ("num_tasks 0", {"num_tasks": 0}, ValueError, r"pub\['num_tasks'\] is 0"),
    ("num_tasks bool", {"num_tasks": True}, TypeError, r"pub\['num_tasks'\] is True"),
    ("shared int", {"shared": 1}, TypeError, r"pub\['shared'\] is of type int"),
    ("shared str item", {"shared": [0, "1"]}, TypeError, r"pub\['shared'\] holds '1'"),
    ("shared out of range", {"shared": [0, 99]}, ValueError, r"pub\['shared'\] names parameter 99"),
    ("undecided str", {"undecided": "x"}, TypeError, r"pub\['undecided'\] is of type str"),
    ("decided_shared str item", {"decided_shared": [0, "1"]}, TypeError,
     r"pub\['decided_shared'\] holds '1'"),
    ("decided_shared out of range", {"decided_shared": [0, 99]}, ValueError,
     r"pub\['decided_shared'\] names parameter 99"),
    ("task_weights list", {"task_weights": [0.5, 0.5]}, TypeError,
     r"pub\['task_weights'\] is of type list"),
    ("task_weights complex", {"task_weights": torch.ones(2, dtype=torch.complex64)}, TypeError,
     r"pub\['task_weights'\] is a torch.complex64 tensor"),
    ("task_weights shape", {"task_weights": torch.ones(3)}, ValueError,
     r"pub\['task_weights'\] has shape \(3,\), expected \(2,\)"),
    ("warm_start list", {"warm_start": [1.0, 1.0]}, TypeError,
     r"pub\['warm_start'\] is of type list"),
    ("umm", {"umm": "clippy"}, ValueError, "umm='clippy'"),
]


@pytest.mark.parametrize("what,change,error,match", _BAD_PUB, ids=[c[0] for c in _BAD_PUB])
def test_a_malformed_pub_entry_raises_naming_it_before_anything_is_loaded(what, change, error,
                                                                         match):
    problem, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    sd["pub"].update(change)
    for state in sd["state"].values():  # what torch's part would load, were it reached
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = state[key] + 1.0
    run_pub(None, problem, 1, start=3, opt=opt)
    params = problem.params()
    snap = _snapshot(opt, params)
    with pytest.raises(error, match=match):
        opt.load_state_dict(sd)
    _assert_unchanged(opt, params, snap)


def test_a_pub_entry_that_is_not_a_dict_raises():
    problem, opt = _trained()
    sd = {**opt.state_dict(), "pub": [2]}
    snap = _snapshot(opt, problem.params())
    with pytest.raises(TypeError, match="'pub' entry is of type list"):
        opt.load_state_dict(sd)
    _assert_unchanged(opt, problem.params(), snap)



@pytest.mark.parametrize("change,match", [
    ({"state": [1]}, "'state' is a list"),
    ({"param_groups": {}}, "'param_groups' must be a list"),
    ({"param_groups": [3]}, "'param_groups' must be a list"),
    ({"param_groups": [{"lr": 0.1}]}, "each with its 'params'"),
], ids=["state-list", "groups-dict", "group-int", "group-without-params"])
def test_a_state_dict_whose_state_or_groups_are_malformed_is_a_type_error(change, match):
    # torch's own load gives AttributeError or KeyError here, after nothing or part of it.
    problem, opt = _trained()
    sd = {**opt.state_dict(), **change}
    snap = _snapshot(opt, problem.params())
    with pytest.raises(TypeError, match=match):
        opt.load_state_dict(sd)
    _assert_unchanged(opt, problem.params(), snap)

_BAD_STATE = [
    # (what, change of param 0's state, raised by torch.optim.Adam's load too: its __setstate__
    # reads 'step' after the new state is in place)
    ("step missing", lambda st: st.pop("step"), True),
    ("step None", lambda st: st.update(step=None), True),
    ("step str", lambda st: st.update(step="3"), True),
    ("exp_avg list", lambda st: st.update(exp_avg=st["exp_avg"].tolist()), False),
]


@pytest.mark.parametrize("what,change,torch_raises", _BAD_STATE, ids=[c[0] for c in _BAD_STATE])
def test_a_failed_load_of_per_parameter_state_changes_nothing(what, change, torch_raises):
    problem, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    change(sd["state"][0])
    params = problem.params()
    twin = problem.clone()
    theirs = torch.optim.Adam(twin.groups())
    theirs.load_state_dict({k: v for k, v in copy.deepcopy(opt.state_dict()).items()
                            if k != "pub"})
    try:
        theirs.load_state_dict({k: v for k, v in sd.items() if k != "pub"})
        raised = None
    except Exception as exc:  # noqa: BLE001 - the type is compared below
        raised = type(exc)
    assert (raised is not None) == torch_raises
    snap = _snapshot(opt, params)
    with pytest.raises((KeyError, TypeError, ValueError)) as info:
        opt.load_state_dict(sd)
    if raised is KeyError:
        assert info.type is KeyError  # torch's own error, the optimizer put back as it was
    _assert_unchanged(opt, params, snap)
    run_pub(None, problem, 1, start=3, opt=opt)


# ---- torch's load hooks ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [torch.optim.Adam, pub_native.Adam], ids=["torch", "pub"])
def test_a_pre_hook_replaces_the_dict_that_is_checked_and_loaded(cls):
    problem = Problem(SHAPES["small"], 1, dtype=BF16, seed=32)
    source = torch.optim.Adam(problem.params(), lr=1e-2)
    source.zero_grad()
    problem.losses(0)[0].backward()
    source.step()
    sd = copy.deepcopy(source.state_dict())

    def zero_exp_avg(opt, state_dict):
        state_dict = copy.deepcopy(state_dict)
        for st in state_dict["state"].values():
            st["exp_avg"].zero_()
        return state_dict

    def repair(opt, state_dict):  # the checkpoint holds one entry flattened
        state_dict = copy.deepcopy(state_dict)
        entry = state_dict["state"][0]
        entry["exp_avg_sq"] = entry["exp_avg_sq"].view(problem.shared[0].shape)
        return state_dict

    sd["state"][0]["exp_avg_sq"] = sd["state"][0]["exp_avg_sq"].flatten()
    opt = cls(problem.clone().params(), lr=1e-2)
    opt.register_load_state_dict_pre_hook(repair)
    opt.register_load_state_dict_pre_hook(zero_exp_avg)
    opt.load_state_dict(sd)
    for st in opt.state.values():
        assert not st["exp_avg"].any()
        assert st["exp_avg_sq"].shape == st["exp_avg"].shape
        if cls is pub_native.Adam:
            assert st["exp_avg"].dtype == torch.float32  # 16-bit parameters' state


def test_load_hooks_see_the_pub_entry_and_the_restored_optimizer():
    problem, opt = _trained()
    sd = opt.state_dict()
    fresh = pub_native.Adam(problem.clone().groups())
    seen = []

    def pre(o, state_dict):
        seen.append(("pre", sorted(state_dict), o.num_tasks))
        state_dict["pub"] = {**state_dict["pub"],
                             "task_weights": torch.tensor([0.25, 0.75], dtype=torch.float64)}

    def post(o):
        seen.append(("post", o.num_tasks, o.task_weights.tolist(), o._t,
                     len(o.shared_parameters)))

    fresh.register_load_state_dict_pre_hook(pre)
    fresh.register_load_state_dict_post_hook(post)
    fresh.load_state_dict(sd)
    assert seen == [("pre", ["param_groups", "pub", "state"], None),
                    ("post", 2, [0.25, 0.75], 3, len(problem.shared))]
    assert sd["pub"]["task_weights"].tolist() != [0.25, 0.75]  # the caller's dict is its own


def test_state_dict_post_hooks_see_the_pub_entry_and_may_replace_the_dict():
    # As on torch's optimizers, the post-hooks get the finished dict; "pub" was added after
    # them, so a hook could neither see nor change it, and a dict it returned lost it.
    problem, opt = _trained()
    seen = []

    def post(o, state_dict):
        seen.append(sorted(state_dict))
        return {**state_dict, "pub": {**state_dict["pub"], "note": "hooked"}}

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert seen == [["param_groups", "pub", "state"]]
    assert sd["pub"]["note"] == "hooked" and sd["pub"]["num_tasks"] == 2


# ---- state entries the step does not read ------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_unknown_state_entries_are_kept_as_torch_keeps_them(dtype):
    problem = Problem(SHAPES["small"], 2, dtype=dtype, seed=33)
    opt = run_pub(pub_native.Adam, problem, 2)
    sd = copy.deepcopy(opt.state_dict())
    extra = {"foo": torch.tensor(1.5), "bar": 3, "task_foo": torch.ones(7),
             "max_exp_avg_sq": torch.ones(3)}  # amsgrad=False: not read
    sd["state"][0].update(extra)
    twin = problem.clone()
    theirs = torch.optim.Adam(twin.groups())
    theirs.load_state_dict({k: v for k, v in sd.items() if k != "pub"})
    opt.load_state_dict(sd)
    p = problem.params()[0]
    for key, value in theirs.state[twin.params()[0]].items():
        if key in extra:
            mine = opt.state[p][key]
            if isinstance(value, torch.Tensor):
                assert mine.dtype == value.dtype and torch.equal(mine, value), key
            else:
                assert mine == value
    run_pub(None, problem, 2, start=2, opt=opt)
    assert opt.state[p]["bar"] == 3
    bad = copy.deepcopy(sd)
    bad["state"][0]["exp_avg"] = torch.ones(3)  # read by the step: still checked
    with pytest.raises(ValueError, match=r"'exp_avg' of .* has shape \(3,\)"):
        opt.load_state_dict(bad)


# ---- AdaTask's shared parameters ---------------------------------------------------------------


def test_adatask_plain_step_after_a_load_raises_as_the_saved_optimizer_does():
    problem, opt = _trained(umm="adatask")
    sd = copy.deepcopy(opt.state_dict())
    twin = problem.clone()
    loaded = pub_native.Adam(twin.groups(), umm="adatask")
    loaded.load_state_dict(sd)
    match = r"umm='adatask' keeps per-task state for the shared parameters: call opt.backward"
    copied = copy.deepcopy({"problem": twin, "opt": loaded})
    for o, pr in ((opt, problem), (loaded, twin), (copied["opt"], copied["problem"])):
        o.zero_grad()
        pr.losses(3)[0].backward()
        params = pr.params()
        snap = _snapshot(o, params)
        with pytest.raises(RuntimeError, match=match):
            o.step()
        _assert_unchanged(o, params, snap)
    assert [id(p) for p in loaded.shared_parameters] == [id(p) for p in twin.shared]
    run_pub(None, problem, 2, start=3, opt=opt)
    run_pub(None, twin, 2, start=3, opt=loaded)
    for p, q in zip(problem.params(), twin.params()):
        assert torch.equal(p, q)


# ---- task gradients pending across a load ------------------------------------------------------


@pytest.mark.parametrize("source", ["pub", "torch"])
def test_task_gradients_pending_across_a_load_are_stepped(source):
    # torch keeps .grad across load_state_dict; PUB keeps the task gradients of a backward not
    # yet stepped: backward → load → step is load → backward → step.
    problem, opt = _trained()
    if source == "pub":
        sd = copy.deepcopy(opt.state_dict())
    else:
        trained = problem.clone()
        theirs = torch.optim.Adam(trained.groups())
        for t in range(2):
            theirs.zero_grad()
            sum(trained.losses(t)).backward()
            theirs.step()
        sd = copy.deepcopy(theirs.state_dict())
    ref = problem.clone()
    ref_opt = pub_native.Adam(ref.groups())
    ref_opt.load_state_dict(sd)
    for o, pr, load_first in ((opt, problem, False), (ref_opt, ref, True)):
        o.zero_grad()
        if load_first:
            o.backward(pr.losses(3))
        else:
            o.backward(pr.losses(3))
            o.load_state_dict(sd)
        o.step()
        assert o.num_tasks == 2 and o.stats["updated"]
    for p, q in zip(problem.params(), ref.params()):
        assert torch.equal(p, q)
    assert torch.equal(opt.task_weights, ref_opt.task_weights)


def test_task_gradients_that_do_not_fit_the_loaded_shared_parameters_raise_at_step():
    problem, opt = _trained()
    other = problem.clone()
    fewer = pub_native.Adam(other.groups(), shared=other.shared[:1])
    run_pub(None, other, 1, opt=fewer)
    sd = copy.deepcopy(fewer.state_dict())
    opt.zero_grad()
    opt.backward(problem.losses(3))
    opt.load_state_dict(sd)
    params = problem.params()
    for loads in range(2):  # a second load of it does not make them fit
        if loads:
            opt.load_state_dict(sd)
        snap = _snapshot(opt, params)
        with pytest.raises(RuntimeError, match=r"backward\(losses\) ran before load_state_dict"):
            opt.step()
        _assert_unchanged(opt, params, snap)
    run_pub(None, problem, 1, start=3, opt=opt)  # zero_grad and backward start over
    assert [id(p) for p in opt.shared_parameters] == [id(problem.shared[0])]


# ---- shared-parameter decisions across a checkpoint --------------------------------------------


class _Net(torch.nn.Module):
    """A trunk and an extra block both tasks go through, and one head per task."""

    def __init__(self):
        super().__init__()
        self.trunk, self.extra = torch.nn.Linear(4, 6), torch.nn.Linear(6, 6)
        self.h1, self.h2 = torch.nn.Linear(6, 1), torch.nn.Linear(6, 1)

    def forward(self, x):
        z = torch.tanh(self.trunk(x))
        z = z + torch.tanh(self.extra(z))
        return self.h1(z), self.h2(z)


def _net_losses(model, t):
    g = torch.Generator().manual_seed(100 + t)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
    a, b = model(x)
    return [((a - y) ** 2).mean(), (b + 3 * y).abs().mean()]


def _net_steps(opt, model, start, stop):
    for t in range(start, stop):
        opt.zero_grad()
        opt.backward(_net_losses(model, t))
        opt.step()


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


_OPTIMIZERS = [
    (pub_native.Adam, {}), (pub_native.Adam, {"umm": "adatask"}),
    (pub_native.AdaGrad, {}), (pub_native.AdaGrad, {"umm": "adatask"}),
    (pub_native.RMSProp, {"momentum": 0.9}),
    (pub_native.RMSProp, {"momentum": 0.9, "centered": True, "umm": "adatask"})]
_OPTIMIZER_IDS = ["adam", "adam-adatask", "adagrad", "adagrad-adatask", "rmsprop",
                  "rmsprop-adatask"]


@pytest.mark.parametrize("explicit", [False, True], ids=["detected", "shared="])
@pytest.mark.parametrize("steps_before", [2, 0], ids=["after-steps", "before-any-backward"])
@pytest.mark.parametrize(("cls", "options"), _OPTIMIZERS, ids=_OPTIMIZER_IDS)
def test_a_group_added_with_the_shared_flag_stays_balanced_after_a_resume(cls, options,
                                                                         steps_before,
                                                                         explicit):
    # add_param_group({"shared": True}) decides at once, and the next backward balances the
    # group. A checkpoint taken before that backward recorded only the last backward's shared
    # parameters and loaded the new group as "not shared", overriding its flag (the resumed run
    # balanced 2 parameters, the uninterrupted one 4); with shared=, the optimizer refused its
    # own checkpoint (it compared with the shared= argument alone). Resumed = uninterrupted.
    def build(seed):
        torch.manual_seed(seed)
        model = _Net()
        base = [*model.trunk.parameters(), *model.h1.parameters(), *model.h2.parameters()]
        shared = list(model.trunk.parameters()) if explicit else None
        return model, cls(base, lr=1e-2, shared=shared, **options)

    def add_group(opt, model):
        opt.add_param_group({"params": list(model.extra.parameters()), "lr": 5e-3,
                             "shared": True})

    model, opt = build(0)
    _net_steps(opt, model, 0, steps_before)
    add_group(opt, model)
    saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    _net_steps(opt, model, steps_before, steps_before + 3)

    twin, twin_opt = build(1)
    add_group(twin_opt, twin)
    twin.load_state_dict(saved["model"])
    twin_opt.load_state_dict(saved["opt"])
    _net_steps(twin_opt, twin, steps_before, steps_before + 3)

    assert len(opt.shared_parameters) == 4
    assert [n for n, p in twin.named_parameters()
            if any(p is q for q in twin_opt.shared_parameters)] == [
        "trunk.weight", "trunk.bias", "extra.weight", "extra.bias"]
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(opt.task_weights, twin_opt.task_weights)
    mine, theirs = opt.state_dict()["pub"], twin_opt.state_dict()["pub"]
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        same = torch.equal(value, theirs[key]) if isinstance(value, torch.Tensor) \
            else value == theirs[key]
        assert same, key


def test_a_checkpoint_whose_group_flag_differs_from_this_optimizers_shared_is_refused():
    # shared= plus a group flagged shared: the checkpoint balances trunk and extra. Loaded into
    # an optimizer told shared=trunk whose added group is flagged not shared, it would silently
    # balance extra: refused, nothing changed. Without shared=, the checkpoint's set is taken.
    def build(flag, explicit=True):
        torch.manual_seed(0)
        model = _Net()
        base = [*model.trunk.parameters(), *model.h1.parameters(), *model.h2.parameters()]
        opt = pub_native.Adam(base, lr=1e-2,
                              shared=list(model.trunk.parameters()) if explicit else None)
        opt.add_param_group({"params": list(model.extra.parameters()), "shared": flag})
        return model, opt

    sds = {}
    for flag in (True, False):
        model, opt = build(flag)
        _net_steps(opt, model, 0, 2)
        sds[flag] = _roundtrip(opt.state_dict())
    sd = sds[True]
    assert sorted(sd["pub"]["decided_shared"]) == [0, 1, 6, 7]
    assert sorted(sds[False]["pub"]["decided_shared"]) == [0, 1]
    for flag, match in (
            (False, r"balances 4 shared parameter\(s\), the shared= argument of this optimizer "
                    r"names 2 \(shared in the checkpoint but not in shared=: "
                    r"param_groups\[1\]\['params'\]\[0\]"),
            (True, r"balances 2 shared parameter\(s\), this optimizer's shared= argument and "
                   r"param-group 'shared' flags name 4 \(shared here but not in the checkpoint: "
                   r"param_groups\[1\]\['params'\]\[0\]")):
        other, other_opt = build(flag)
        _net_steps(other_opt, other, 0, 1)
        params = list(other_opt._all_params())
        snap = _snapshot(other_opt, params)
        with pytest.raises(ValueError, match=match):
            other_opt.load_state_dict(sds[not flag])
        _assert_unchanged(other_opt, params, snap)
    older = {**sds[False], "pub": dict(sds[False]["pub"])}  # a checkpoint of before the key
    del older["pub"]["decided_shared"]
    same, same_opt = build(False)
    same_opt.load_state_dict(older)
    _net_steps(same_opt, same, 2, 3)
    assert len(same_opt.shared_parameters) == 2
    free, free_opt = build(False, explicit=False)
    free_opt.load_state_dict(sd)
    _net_steps(free_opt, free, 2, 3)
    assert len(free_opt.shared_parameters) == 4


def test_task_gradients_pending_across_a_load_that_decided_an_added_group_alike_are_stepped():
    # The checkpoint was saved after add_param_group({"shared": True}), before the backward that
    # balances the group; this optimizer, built the same way, ran that backward: its task
    # gradients fit what the checkpoint decided and are stepped (they were refused: the
    # checkpoint's last backward had balanced fewer parameters).
    def build():
        torch.manual_seed(0)
        model = _Net()
        base = [*model.trunk.parameters(), *model.h1.parameters(), *model.h2.parameters()]
        return model, pub_native.Adam(base, lr=1e-2)

    model, opt = build()
    _net_steps(opt, model, 0, 2)
    opt.add_param_group({"params": list(model.extra.parameters()), "shared": True})
    sd = _roundtrip(opt.state_dict())
    twin = copy.deepcopy({"model": model, "opt": opt})
    opt.zero_grad()
    opt.backward(_net_losses(model, 2))
    opt.load_state_dict(sd)
    opt.step()
    _net_steps(twin["opt"], twin["model"], 2, 3)
    assert len(opt.shared_parameters) == len(twin["opt"].shared_parameters) == 4
    for p, q in zip(model.parameters(), twin["model"].parameters()):
        assert torch.equal(p, q)


def _flagged_groups(model, flags=True):
    groups = [{"params": [*model.trunk.parameters(), *model.extra.parameters(),
                          *model.h1.parameters()]},
              {"params": list(model.h2.parameters())}]
    if flags:  # h1 balanced too (autograd would find trunk and extra only)
        groups[0]["shared"], groups[1]["shared"] = True, False
    return groups


@pytest.mark.parametrize("name", ["adam", "adagrad", "rmsprop"])
def test_a_torch_checkpoint_keeps_the_groups_shared_flags(name):
    # torch's load puts the saved group dicts in place of the optimizer's: the "shared" flags,
    # which a checkpoint of torch's optimizer lacks, vanished and detection took over. They are
    # kept, as torch keeps the param_names a saved group lacks.
    base = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad,
            "rmsprop": torch.optim.RMSprop}[name]
    cls = {"adam": pub_native.Adam, "adagrad": pub_native.AdaGrad,
           "rmsprop": pub_native.RMSProp}[name]
    torch.manual_seed(0)
    model = _Net()
    warm = base(_flagged_groups(model, flags=False), lr=1e-2)
    warm.zero_grad()
    sum(_net_losses(model, 0)).backward()
    warm.step()
    sd = _roundtrip(warm.state_dict())
    opt = cls(_flagged_groups(model), lr=1e-2)
    opt.load_state_dict(sd)
    assert [g.get("shared") for g in opt.param_groups] == [True, False]
    _net_steps(opt, model, 1, 2)
    assert [n for n, p in model.named_parameters()
            if any(p is q for q in opt.shared_parameters)] == [
        "trunk.weight", "trunk.bias", "extra.weight", "extra.bias", "h1.weight", "h1.bias"]
    # A saved group that has the flag gives it, as it gives every option.
    pub_sd = _roundtrip(opt.state_dict())
    pub_sd["param_groups"][1]["shared"] = None
    other = cls(_flagged_groups(model), lr=1e-2)
    other.load_state_dict(pub_sd)
    assert [g.get("shared") for g in other.param_groups] == [True, None]


# ---- per-parameter state the step reads --------------------------------------------------------


_MISSING = [
    # (optimizer, options, the entry dropped from param 0's state)
    ("adam", {}, "exp_avg"),
    ("adam", {}, "exp_avg_sq"),
    ("adam", {"amsgrad": True}, "exp_avg"),
    ("adagrad", {}, "sum"),
    ("rmsprop", {}, "square_avg"),
    ("rmsprop", {"momentum": 0.9, "centered": True}, "square_avg"),
    ("adam", {"umm": "adatask"}, "task_exp_avg"),
    ("adagrad", {"umm": "adatask"}, "task_sum"),
]


@pytest.mark.parametrize(("name", "options", "entry"), _MISSING,
                         ids=[f"{n}-{e}" for n, _, e in _MISSING])
def test_state_that_lacks_an_entry_the_step_reads_is_refused_at_load(name, options, entry):
    # torch's optimizers raise KeyError at step() for it; the PUB step silently started the
    # entry again from its initial value (Adam's exp_avg from zero, a step later than the rest).
    problem = Problem(SHAPES["small"], 2, dtype=F32, seed=34)
    opt = run_pub(NATIVE[name], problem, 2, **options)
    sd = copy.deepcopy(opt.state_dict())
    assert entry in sd["state"][0]  # param 0 is shared
    del sd["state"][0][entry]
    fresh_problem = problem.clone()
    fresh = NATIVE[name](fresh_problem.groups(), **options)
    run_pub(None, fresh_problem, 1, opt=fresh)
    params = fresh_problem.params()
    snap = _snapshot(fresh, params)
    plain = entry.removeprefix("task_")
    with pytest.raises(ValueError, match=rf"state of param_groups\[0\]\['params'\]\[0\] .* "
                                         rf"lacks '{plain}', which the step reads"):
        fresh.load_state_dict(sd)
    _assert_unchanged(fresh, params, snap)



@pytest.mark.parametrize(("name", "option", "value", "entry"), [
    ("adam", "amsgrad", True, "max_exp_avg_sq"), ("rmsprop", "momentum", 0.9, "momentum_buffer"),
    ("rmsprop", "centered", True, "grad_avg")])
def test_a_checkpoint_taken_after_turning_an_option_on_resumes(name, option, value, entry):
    # The step makes the option's entry from zero when the option is turned on after the state
    # exists; a checkpoint taken before that step lacks it and must load (it was refused as
    # lacking an entry the step reads), and resume bit for bit.
    problem = Problem(SHAPES["small"], 2, dtype=F32, seed=36)
    opt = run_pub(NATIVE[name], problem, 2)
    opt.param_groups[0][option] = value
    sd = copy.deepcopy(opt.state_dict())
    assert entry not in sd["state"][0]
    twin_problem = problem.clone()
    twin = NATIVE[name](twin_problem.groups())
    twin.load_state_dict(sd)
    run_pub(None, problem, 2, start=2, opt=opt)
    run_pub(None, twin_problem, 2, start=2, opt=twin)
    for a, b in zip(problem.params(), twin_problem.params()):
        assert torch.equal(a, b)
    assert entry in twin.state[twin_problem.params()[0]]

def test_state_entries_a_loaded_group_does_not_use_are_not_required():
    # Empty state (a parameter not stepped yet) loads; so does a checkpoint of torch's Adam
    # without amsgrad into pub_native.Adam(amsgrad=True): the saved group's amsgrad=False
    # replaces this one's, and max_exp_avg_sq is not read. AdaTask takes torch's plain entries
    # as every task's start.
    problem = Problem(SHAPES["small"], 2, dtype=F32, seed=35)
    opt = run_pub(pub_native.Adam, problem, 2)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1] = {}
    fresh = pub_native.Adam(problem.clone().groups())
    fresh.load_state_dict(sd)
    assert not fresh.state[fresh._all_params()[1]]
    trained = problem.clone()
    theirs = torch.optim.Adam(trained.groups())
    theirs.zero_grad()
    sum(trained.losses(0)).backward()
    theirs.step()
    torch_sd = copy.deepcopy(theirs.state_dict())
    for options in ({"amsgrad": True}, {"umm": "adatask"}):
        twin = problem.clone()
        mine = pub_native.Adam(twin.groups(), **options)
        mine.load_state_dict(torch_sd)
        assert not mine.param_groups[0]["amsgrad"]
        run_pub(None, twin, 1, start=1, opt=mine)
        assert all(bool(torch.isfinite(p).all()) for p in twin.params())


@pytest.mark.parametrize("step", [
    torch.tensor([2.0, 2.0, 2.0]), torch.tensor(float("nan")), torch.tensor(float("inf")),
    torch.tensor(-1.0), float("nan"), -3],
    ids=["shape-3", "nan", "inf", "negative", "float-nan", "int-negative"])
def test_a_step_counter_that_is_not_one_finite_number_is_refused_at_load(step):
    # It loaded, and every step() after it raised (or, NaN, overflowed the updates).
    problem, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step"] = step
    fresh_problem = problem.clone()
    fresh = pub_native.Adam(fresh_problem.groups())
    run_pub(None, fresh_problem, 1, opt=fresh)
    params = fresh_problem.params()
    snap = _snapshot(fresh, params)
    with pytest.raises(ValueError, match=r"loaded state 'step' of param_groups\[0\]\['params'\]"
                                         r"\[0\] .*(has shape \(3,\)|expected a finite number)"):
        fresh.load_state_dict(sd)
    _assert_unchanged(fresh, params, snap)
    run_pub(None, fresh_problem, 1, start=1, opt=fresh)
    sd["state"][0]["step"] = torch.tensor([3.0])  # one number, of shape (1,): read as 3
    fresh.load_state_dict(sd)
    run_pub(None, fresh_problem, 1, start=3, opt=fresh)
    assert fresh.state[params[0]]["step"].item() == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_state_that_requires_grad_is_kept_as_leaves(dtype):
    # The optimizer's copy of a loaded entry that requires grad was made with autograd on
    # (a clone with a grad_fn): copy.deepcopy of the optimizer, or of its state dict, raised.
    torch.manual_seed(5)
    trunk = torch.nn.Linear(4, 4).to(dtype)
    heads = [torch.nn.Linear(4, 1).to(dtype) for _ in range(2)]
    x = torch.randn(8, 4, dtype=dtype)
    params = [*trunk.parameters(), *(q for h in heads for q in h.parameters())]
    opt = pub_native.Adam(params, lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        z = torch.tanh(trunk(x))
        opt.backward([h(z).float().square().mean() for h in heads])
        opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].clone().requires_grad_()
    fresh = pub_native.Adam(params, lr=1e-2)
    fresh.load_state_dict(sd)
    assert fresh.state[params[0]]["exp_avg"].grad_fn is None
    torch.testing.assert_close(fresh.state[params[0]]["exp_avg"].float(),
                               sd["state"][0]["exp_avg"].detach().float(), rtol=0, atol=0)
    copy.deepcopy(fresh)
    copy.deepcopy(fresh.state_dict())
