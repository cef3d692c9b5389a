"""How the PUB optimizers report a step whose result stays on the device (the CUDA backend:
``lazy`` results, read back only when ``task_weights``/``stats`` are read), exercised on this
machine through the real Python layer with the CPU backend's results handed over lazily, and
through the real DeviceStepResult over device buffers held in CPU tensors."""

from __future__ import annotations

import copy
import io
import pickle
import types

import pytest
import torch

import pub_native
from pub_native import _native
from pub_native.optim import _pub
from pub_native.optim._backends import CpuBackend


class _LazyCpu(CpuBackend):
    """The CPU backend whose results the optimizer must treat as the device's: not read at
    the step."""

    lazy = True

    def step(self, plan, **kw):
        result = super().step(plan, **kw)
        result.lazy = True
        result._plan = plan
        return result


def _skipped_step(monkeypatch):
    """An optimizer whose last step the (lazy) backend skipped for a NaN gradient of task 0,
    not yet read back."""
    monkeypatch.setattr(_pub, "CpuBackend", _LazyCpu)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    opt = pub_native.Adam([w], lr=1e-2, shared=[w])
    opt.backward([(w ** 2).sum(), ((w - 1) ** 2).sum()])
    opt.step()
    assert opt.task_weights is not None  # (read back: nothing pending)
    opt.zero_grad()
    opt.backward([(w ** 2).sum() * float("nan"), ((w - 1) ** 2).sum()])
    opt.step()
    return opt, w


def _saved(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    return buffer


@pytest.mark.parametrize("between", ["nothing", "state_dict", "deepcopy", "pickle"])
def test_a_skipped_device_step_is_reported_after_a_checkpoint_or_a_copy(monkeypatch, between):
    # state_dict() and copies read the device's result without raising: they dropped the
    # skipped step's error, and the next read of task_weights reported nothing.
    opt, _ = _skipped_step(monkeypatch)
    twin = {"nothing": lambda: None, "state_dict": lambda: _saved(opt),
            "deepcopy": lambda: copy.deepcopy(opt),
            "pickle": lambda: pickle.loads(pickle.dumps(opt))}[between]()
    with pytest.raises(FloatingPointError, match=r"non-finite gradient .*task\(s\) \[0\].*"
                                                 "skipped on the device"):
        _ = opt.task_weights
    assert opt.task_weights is not None  # reported once
    if between in ("deepcopy", "pickle"):  # the copy has the same history to report
        with pytest.raises(FloatingPointError, match="skipped on the device"):
            _ = twin.stats


@pytest.mark.skipif(getattr(_native, "_C_cuda", None) is None,
                    reason="built without CUDA (the flags' layout is the CUDA module's)")
def test_an_error_of_an_earlier_step_does_not_name_the_latest_steps_flags():
    # Step N skipped for a NaN (the device's sticky flag), step N + 1 taken: the read named
    # step N + 1's (empty) list of culprits and said parameters and state were unchanged.
    from pub_native.optim import StepOutcome
    from pub_native.optim._cuda import DeviceStepResult
    from pub_native.optim._plan import build_plan

    cm = _native._C_cuda
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    opt = pub_native.Adam([w], lr=1e-2, shared=[w])
    opt.backward([(w ** 2).sum(), ((w - 1) ** 2).sum()])
    plan = build_plan(opt, True)

    def read(latest):
        flags = torch.zeros(cm.FLAG_COUNT, dtype=torch.int32)
        flags[cm.FLAG_OUTCOME] = int(latest)
        flags[cm.FLAG_STICKY_ERROR] = int(StepOutcome.NONFINITE_GRAD)
        flags[cm.FLAG_HAS_WEIGHTS] = 1
        backend = types.SimpleNamespace(cmod=cm, flags=flags, residual=torch.zeros(1),
                                        task_sq=torch.ones(2))
        bad = [types.SimpleNamespace(
            bad=torch.zeros(len(s.params), s.k, dtype=torch.int32) if latest ==
            StepOutcome.APPLIED else torch.ones(len(s.params), s.k, dtype=torch.int32),
            edited=torch.zeros(len(s.params), dtype=torch.int32)) for s in plan.segments]
        opt._unread = (DeviceStepResult(backend, plan, True, bad), False)
        with pytest.raises(FloatingPointError) as info:
            _ = opt.stats
        assert int(flags[cm.FLAG_STICKY_ERROR]) == 0  # cleared on the device once read
        return str(info.value)

    earlier = read(StepOutcome.APPLIED)
    assert "since the last read" in earlier and "steps after it were taken" in earlier
    assert "unchanged" not in earlier and "for ;" not in earlier
    latest = read(StepOutcome.NONFINITE_GRAD)  # this step's own flags name the tasks
    assert "task(s) [0, 1]" in latest and "skipped on the device" in latest
