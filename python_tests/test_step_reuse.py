"""A step reuses the previous step's plan (PlanMemo) when nothing it was built from changed.

Every change a training loop can make between two steps (learning rates, a group's options,
parameters re-pointed with ``.data``, state entries replaced or re-pointed in place, a ``.grad``
removed, re-laid out or of the wrong dtype, a checkpoint loaded, a parameter frozen) is made to
two copies of one problem: one optimizer keeps its plan between steps, the other builds every
plan anew. They must agree bitwise; on plain (K = 1) steps both must also agree with torch's own
Adam given the same changes.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import (
    F64,
    SHAPES,
    Problem,
    assert_states_close,
    assert_states_equal,
    assert_unchanged,
    snapshot,
)

import pub_native
from pub_native._native import BaseCol


def _lr(opt, params):
    for g in opt.param_groups:
        g["lr"] *= 0.5


def _amsgrad(opt, params):
    opt.param_groups[0]["amsgrad"] = True


def _weight_decay(opt, params):
    opt.param_groups[0]["weight_decay"] = 0.1


def _maximize(opt, params):
    opt.param_groups[-1]["maximize"] = True


def _param_data(opt, params):
    for p in params:
        p.data = p.data.clone()


def _state_replaced(opt, params):
    for p in params:
        st = opt.state[p]
        st["exp_avg"] = st["exp_avg"].clone() * 0.5


def _state_set_(opt, params):
    for p in params:
        st = opt.state[p]
        st["exp_avg_sq"].set_(st["exp_avg_sq"].clone() * 2.0)


def _step_replaced(opt, params):
    opt.state[params[0]]["step"] = torch.tensor(20.0)


def _step_data_swapped(opt, params):
    opt.state[params[0]]["step"].data = torch.tensor(20.0)  # same object, new storage


def _state_reset_in_place(opt, params):
    for p in params:
        opt.state[p]["exp_avg"].zero_()


def _state_reshaped_in_place(opt, params):
    for p in params:
        opt.state[p]["exp_avg_sq"].unsqueeze_(0)  # same storage and address, another shape


def _state_data_transposed(opt, params):
    for p in params:
        t = opt.state[p]["exp_avg"]
        if t.dim() > 1:  # the same memory, another view, no version moved
            t.data = t.data.transpose(0, -1)


def _step_data_retyped(opt, params):
    st = opt.state[params[0]]
    st["step"].data = st["step"].data.view(torch.int32)  # the same memory read as int32


def _load_state_dict(opt, params):
    opt.load_state_dict(opt.state_dict())


def _state_cleared(opt, params):
    opt.state[params[-1]].clear()


# Changes made before backward (and, for the torch comparison, before the plain step's backward).
CHANGES = {"lr": _lr, "amsgrad": _amsgrad, "weight_decay": _weight_decay,
           "maximize": _maximize, "param_data": _param_data, "state_replaced": _state_replaced,
           "state_set_": _state_set_, "step_replaced": _step_replaced,
           "load_state_dict": _load_state_dict, "state_cleared": _state_cleared,
           "step_data_swapped": _step_data_swapped, "state_reset_in_place": _state_reset_in_place,
           "state_reshaped_in_place": _state_reshaped_in_place,
           "state_data_transposed": _state_data_transposed, "step_data_retyped": _step_data_retyped}


def _grad_none(params):
    params[-1].grad = None


def _grad_transposed(params):
    for p in params:
        if p.dim() == 2:
            p.grad = p.grad.t().contiguous().t()  # same values, column-major


def _grad_new_tensor(params):
    for p in params:
        p.grad = p.grad.clone()


# Changes to plain .grad made between backward and step.
GRAD_CHANGES = {"grad_none": _grad_none, "grad_transposed": _grad_transposed,
                "grad_new_tensor": _grad_new_tensor}


def _fresh_step(opt):
    """A step whose plan is built anew, every parameter and state entry checked again (the
    reference for a step that may reuse what it checked before)."""
    opt._plan_memo = None
    opt._state_memo.clear()
    opt._checked.clear()
    opt.step()


def _side_by_side(base, steps, before=None, after=None, make=None):
    """Two copies of ``base`` stepped in turn, one keeping its plan between steps and one
    building every plan anew, bitwise equal after every step. ``before(t, prob, opt)`` runs
    before zero_grad, ``after(t, prob, opt)`` between backward and step; a problem's ``extra``
    tensors are compared too. Returns the kept plan after each step."""
    probs = [base.clone(), base.clone()]
    opts = [make(p) if make else pub_native.Adam(p.groups(), lr=1e-2) for p in probs]
    plans = []
    for t in range(steps):
        for prob, opt, fresh in zip(probs, opts, (False, True)):
            if before is not None:
                before(t, prob, opt)
            opt.zero_grad()
            opt.backward(prob.losses(t))
            if after is not None:
                after(t, prob, opt)
            _fresh_step(opt) if fresh else opt.step()
        plans.append(opts[0]._plan_memo and opts[0]._plan_memo.plan)
        compared = [p.params() + getattr(p, "extra", []) for p in probs]
        assert_states_equal(opts[0], compared[0], opts[1], compared[1])
    return plans, probs, opts


def _trained(prob, steps=3):
    opt = pub_native.Adam(prob.groups(), lr=1e-2)
    for t in range(steps):
        opt.zero_grad()
        opt.backward(prob.losses(t))
        opt.step()
    return opt


# State entries of another shape (the same elements): refused by every step, kept plan or not.
RESHAPED = {"state_reshaped_in_place", "state_data_transposed"}


@pytest.mark.parametrize("change", sorted(set(CHANGES) - RESHAPED) + sorted(GRAD_CHANGES))
def test_pub_step_with_a_kept_plan_equals_a_fresh_plan(change):
    def before(t, prob, opt):
        if t == 3 and change in CHANGES:
            CHANGES[change](opt, prob.params())

    def after(t, prob, opt):
        if t == 3 and change in GRAD_CHANGES:
            GRAD_CHANGES[change](prob.heads)

    plans, _, _ = _side_by_side(Problem(SHAPES["odd"], 2, dtype=F64, seed=3), 6, before, after)
    assert plans[-1] is not None  # the kept plan was in use


@pytest.mark.parametrize("change", sorted(RESHAPED))
def test_a_state_entry_reshaped_under_a_kept_plan_is_named_and_nothing_changes(change):
    # Read in its new shape, each element would take another element's state (torch's step
    # fails on such an entry too).
    prob = Problem(SHAPES["odd"], 2, dtype=F64, seed=3)
    opt = _trained(prob)
    assert opt._plan_memo is not None  # the kept plan is in use
    CHANGES[change](opt, prob.params())
    opt.zero_grad()
    opt.backward(prob.losses(3))
    before = [p.detach().clone() for p in prob.params()]
    with pytest.raises(RuntimeError, match=r"optimizer state 'exp_avg(_sq)?' has shape"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(prob.params(), before))


def test_steady_steps_reuse_one_plan():
    plans, _, _ = _side_by_side(Problem(SHAPES["odd"], 2, dtype=F64, seed=29), 5)
    # The first step commits new state, so its plan is not kept; the second's is used from then on.
    assert plans[0] is None and plans[1] is not None
    assert all(plan is plans[1] for plan in plans[2:])


@pytest.mark.parametrize("change", sorted(set(CHANGES) - {
    "amsgrad", "state_reshaped_in_place", "state_data_transposed", "step_data_retyped"})
    + sorted(GRAD_CHANGES))
def test_plain_steps_with_a_kept_plan_equal_torch_adam(change):
    # (torch's Adam cannot take amsgrad=True once it has state without max_exp_avg_sq, nor a
    # state entry of another shape, and reads a retyped step counter its own way)
    base = Problem(SHAPES["small"] + [(4, 6)], 1, dtype=F64, seed=5, identical=True)
    ours, theirs = base.clone(), base.clone()
    opt = pub_native.Adam(ours.params(), lr=1e-2)
    ref = torch.optim.Adam(theirs.params(), lr=1e-2)
    for t in range(6):
        for prob, o in ((ours, opt), (theirs, ref)):
            params = prob.params()
            if t == 3 and change in CHANGES:
                if change == "step_replaced":
                    # torch keeps the step counter as a float32 tensor too
                    o.state[params[0]]["step"] = torch.tensor(20.0)
                else:
                    CHANGES[change](o, params)
            o.zero_grad()
            prob.losses(t)[0].backward()
            if t == 3 and change in GRAD_CHANGES:
                GRAD_CHANGES[change](params)
            o.step()
        assert_states_close(opt, ours.params(), ref, theirs.params(), 1e-12)


def test_a_kept_plan_checks_the_plain_grad_and_a_failed_step_changes_nothing():
    prob = Problem(SHAPES["small"], 2, dtype=F64, seed=7)
    opt = _trained(prob)
    assert opt._plan_memo is not None
    opt.zero_grad()
    opt.backward(prob.losses(3))
    head = prob.heads[1]
    head.grad = head.grad.to_sparse()
    snap = snapshot(opt, prob.params())
    with pytest.raises(TypeError, match=r"param_groups\[2\]\['params'\]\[1\].*sparse"):
        opt.step()
    assert_unchanged(opt, prob.params(), snap)
    head.grad = head.grad.to_dense()
    opt.step()
    assert not torch.equal(head, snap[0][len(prob.shared) + 1])


def test_a_kept_plan_follows_a_frozen_shared_parameter_and_a_new_group():
    def before(t, prob, opt):
        if t == 2:
            prob.shared[1].requires_grad_(False)
        if t == 4:
            prob.shared[1].requires_grad_(True)
            prob.extra = [torch.ones(4, dtype=F64, requires_grad=True)]
            opt.add_param_group({"params": prob.extra, "lr": 1e-3})

    def after(t, prob, opt):
        for x in getattr(prob, "extra", []):
            x.grad = torch.full_like(x, float(t))

    plans, probs, opts = _side_by_side(Problem(SHAPES["odd"], 2, dtype=F64, seed=11), 7, before,
                                       after)
    # A new plan after the freeze (t = 2) and after the new group (t = 4, whose new state is
    # committed first), each kept from then on; the new parameter was stepped three times.
    assert plans[2] is not plans[1] and plans[3] is plans[2]
    assert plans[4] is None and plans[5] is not None and plans[6] is plans[5]
    assert [float(o.state[p.extra[0]]["step"]) for o, p in zip(opts, probs)] == [3.0, 3.0]


def test_a_kept_plan_holds_no_gradient_past_zero_grad():
    prob = Problem(SHAPES["small"], 2, dtype=F64, seed=13)
    opt = _trained(prob)
    grad = weakref.ref(prob.heads[0].grad)
    opt.zero_grad()
    gc.collect()
    assert grad() is None, "the kept plan holds a plain .grad alive"
    # A new layout of the task gradients: the old K×P buffer is not kept alive by the plan.
    buffer = weakref.ref(opt._grads.buffer)
    for p in prob.shared:
        p.data = p.data.float().double().contiguous()
    prob.shared[0].data = prob.shared[0].data.t().contiguous().t()  # column-major
    opt.backward(prob.losses(3))
    gc.collect()
    assert buffer() is None, "the old task-gradient buffer is still alive"
    opt.step()


def _betas_list_mutated(opt, params):
    opt.param_groups[0]["betas"][0] = 0.5  # a list option changed in place


def _lr_tensor_filled(opt, params):
    for g in opt.param_groups:
        g["lr"].fill_(g["lr"].item() * 0.5)  # as torch's schedulers set a tensor lr


@pytest.mark.parametrize("change", [_betas_list_mutated, _lr_tensor_filled])
def test_options_changed_in_place_reach_a_kept_plan(change):
    def make(prob):
        opt = pub_native.Adam(prob.groups())
        for g in opt.param_groups:
            if change is _lr_tensor_filled:
                g["lr"] = torch.tensor(float(g["lr"]))
            else:
                g["betas"] = list(g["betas"])
        return opt

    def before(t, prob, opt):
        if t == 3:
            change(opt, prob.params())

    plans, probs, opts = _side_by_side(Problem(SHAPES["small"], 2, dtype=F64, seed=19), 6,
                                       before, make=make)
    # The plan is kept across the change, and its constants are the groups' current ones.
    assert plans[1] is not None and all(plan is plans[1] for plan in plans[2:])
    lr, beta1 = int(BaseCol.LR), int(BaseCol.BETA1)
    for row, group in zip(plans[-1].base, opts[0].param_groups):
        assert (row[lr], row[beta1]) == (float(group["lr"]), float(group["betas"][0]))


def test_a_non_finite_lr_under_a_kept_plan_raises_and_changes_nothing():
    prob = Problem(SHAPES["small"], 2, dtype=F64, seed=23)
    opt = _trained(prob)
    opt.param_groups[1]["lr"] = float("nan")
    opt.zero_grad()
    opt.backward(prob.losses(3))
    snap = snapshot(opt, prob.params())
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\] is nan"):
        opt.step()
    assert_unchanged(opt, prob.params(), snap)
    opt.param_groups[1]["lr"] = 1e-2
    opt.step()
    assert not torch.equal(prob.shared[1], snap[0][1])


def _clip(params):
    torch.nn.utils.clip_grad_norm_(params, 0.5)


def _rescaled_copies(params):
    for p in params:
        if p.grad is not None:
            p.grad = p.grad * 0.5  # a new tensor at every step


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("rescale", [_clip, _rescaled_copies])
def test_rescaling_keeps_the_plan_and_equals_a_fresh_plan(rescale, frozen, every):
    # clip_grad_norm_ rescales the shared .grad in place, or a loop replaces it by a rescaled
    # copy: such a step measures that rescaling against the task gradients (a rescan), and a
    # kept plan reads the shared .grad again; at every step or at every other one.
    def before(t, prob, opt):
        if frozen and t == 1:
            prob.shared[2].requires_grad_(False)

    def after(t, prob, opt):
        if t % every == 0:
            rescale(prob.params())

    plans, probs, opts = _side_by_side(Problem(SHAPES["odd"], 2, dtype=F64, seed=31), 7, before,
                                       after)
    assert plans[-1] is not None and all(plan is plans[-1] for plan in plans[3:])
    # a .grad that is not a rescaling is still refused under the kept plan
    opt = opts[0]
    opt.zero_grad()
    opt.backward(probs[0].losses(6))
    probs[0].shared[1].grad[0] += 1.0  # one element: not a rescaling of the tensor
    snap = snapshot(opt, probs[0].params())
    with pytest.raises(RuntimeError, match="not a rescaling"):
        opt.step()
    assert_unchanged(opt, probs[0].params(), snap)


def test_a_dropped_optimizer_is_freed_without_the_cycle_collector():
    prob = Problem(SHAPES["small"], 2, dtype=F64, seed=37)
    gc.collect()
    gc.disable()
    try:
        opt = _trained(prob)
        assert opt._plan_memo is not None
        alive = weakref.ref(opt), weakref.ref(opt.state[prob.shared[0]]["exp_avg"])
        for p in prob.params():
            p.grad = None
        del opt
        assert [r() is None for r in alive] == [True, True]
    finally:
        gc.enable()


@pytest.mark.cuda
@pytest.mark.parametrize("change", ["lr", "param_data", "state_replaced", "state_set_",
                                    "state_reset_in_place", "load_state_dict", "grad_transposed",
                                    "grad_none", "clip"])
def test_a_kept_plan_on_cuda_equals_a_fresh_plan(change):
    # The CUDA step is lazy and uploads its address tables only when they change: the kept plan
    # must hand it the same addresses as a plan built anew (float32, bitwise).
    def before(t, prob, opt):
        if t == 3 and change in CHANGES:
            CHANGES[change](opt, prob.params())

    def after(t, prob, opt):
        if change == "clip":
            _clip(prob.params())
        elif t == 3 and change in GRAD_CHANGES:
            GRAD_CHANGES[change](prob.heads)

    base = Problem(SHAPES["odd"], 2, dtype=torch.float32, seed=41, device="cuda")
    plans, _, _ = _side_by_side(base, 6, before, after)
    assert plans[-1] is not None


@pytest.mark.parametrize("k", [1, 2])
def test_steps_under_inference_mode_equal_steps_outside_it(k):
    # State made under torch.inference_mode() is made of inference tensors, which have no
    # version counter: the plan's checks must not need one.
    base = Problem(SHAPES["small"], k, dtype=F64, seed=47, identical=k == 1)
    runs = []
    for inference in (False, True):
        prob = base.clone()
        opt = pub_native.Adam(prob.groups(), lr=1e-2)
        for t in range(4):
            opt.zero_grad()
            if k == 1:
                prob.losses(t)[0].backward()
            else:
                opt.backward(prob.losses(t))
            with torch.inference_mode(inference):
                opt.step()
        runs.append((prob, opt))
    assert runs[1][0].params()[0].grad is not None and runs[1][1]._plan_memo is not None
    assert_states_equal(runs[0][1], runs[0][0].params(), runs[1][1], runs[1][0].params())
