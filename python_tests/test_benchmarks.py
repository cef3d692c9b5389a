"""The benchmarks' problems and scripts: the MMoE-paper synthetic tasks against their
definition, the toy problem's hand-written Jacobian against autograd and its Pareto set against
the stationarity condition, and each script end to end on a tiny setting."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pub_native.demo.synthetic import MMoERegressor, SharedBottomRegressor, make_tasks
from pub_native.demo.toy import (
    STARTS,
    pareto_set,
    pareto_stationarity,
    toy_losses,
    toy_losses_fast,
)

BENCHES = Path(__file__).resolve().parents[1] / "benches"


def _bench(name):
    if str(BENCHES) not in sys.path:  # as `python benches/<name>.py` has it: their _common module
        sys.path.insert(0, str(BENCHES))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


# -- synthetic tasks -----------------------------------------------------------------------------

@pytest.mark.parametrize("rho", [1.0, 0.9, 0.5, 0.0, -0.3])
def test_synthetic_weight_vectors_have_cosine_rho(rho):
    d = make_tasks(rho, n_train=10, n_val=10, n_test=10, dim=20, c=2.0, seed=3)
    w1, w2 = d.weights
    assert np.linalg.norm(w1) == pytest.approx(2.0) and np.linalg.norm(w2) == pytest.approx(2.0)
    assert w1 @ w2 / (np.linalg.norm(w1) * np.linalg.norm(w2)) == pytest.approx(rho, abs=1e-12)


def test_synthetic_labels_follow_the_definition():
    """y_k = w_kᵀx + Σ_i sin(α_i w_kᵀx + β_i) + ε: with σ = 0 the labels are recomputed exactly
    from x, w and the (α, β) that the same seed draws."""
    d = make_tasks(0.5, n_train=200, n_val=5, n_test=5, dim=8, m=4, noise_std=0.0, seed=1)
    rng = np.random.default_rng(1)
    rng.normal(size=(8, 2))  # u_1, u_2
    a, b = rng.normal(size=4), rng.normal(size=4)
    x = d.train.x.double().numpy()
    t = x @ d.weights.T
    y = t + np.sin(a * t[..., None] + b).sum(-1)
    np.testing.assert_allclose(d.train.y.numpy(), y, rtol=1e-5, atol=1e-5)
    g = make_tasks(0.5, n_train=50, n_val=5, n_test=5, dim=8, m=3, noise_std=0.0,
                   alphas="google", seed=2)
    t = g.train.x.double().numpy() @ g.weights.T
    y = t + sum(np.sin((i + 1) * t + i * i) for i in range(3))
    np.testing.assert_allclose(g.train.y.numpy(), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rho"):
        make_tasks(1.5)


@pytest.mark.parametrize("cls", [SharedBottomRegressor, MMoERegressor])
def test_regressors(cls):
    torch.manual_seed(0)
    model = cls(dim=8)
    d = make_tasks(0.5, n_train=16, n_val=4, n_test=4, dim=8)
    losses, z = model.task_losses(d.train, with_representation=True)
    assert len(losses) == 2 and z.requires_grad
    assert model(d.train.x).shape == (16, 2)


# -- toy problem ---------------------------------------------------------------------------------

def _jacobian(fn, theta, scale):
    x = theta.clone().requires_grad_(True)
    f = fn(x, scale)
    return f.detach(), torch.stack([torch.autograd.grad(f[i], x, retain_graph=True)[0]
                                    for i in range(2)])


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_toy_fast_jacobian_matches_autograd(scale):
    g = torch.Generator().manual_seed(0)
    points = [torch.tensor(s, dtype=torch.float64) for s in STARTS]
    points += [6 * torch.randn(2, generator=g, dtype=torch.float64) for _ in range(100)]
    points += [torch.tensor([x1, x2], dtype=torch.float64)
               for x1 in (-7.0, 3.0) for x2 in (0.0, -8.3552)]  # kinks and the Pareto set
    for p in points:
        f0, j0 = _jacobian(toy_losses, p, scale)
        f1, j1 = _jacobian(toy_losses_fast, p, scale)
        torch.testing.assert_close(f1, f0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(j1, j0, rtol=1e-10, atol=1e-12, msg=str(p))


def test_toy_pareto_set_is_stationary_and_the_rest_is_not():
    P = pareto_set(101, 0.1)
    assert pareto_stationarity(P, 0.1).max() < 1e-8
    # The set does not depend on the scale of f1, and NashMTL's plot puts it at x2 = −8.3552
    # for x1 = 0.
    np.testing.assert_allclose(pareto_set(101, 1.0), P, atol=1e-6)
    assert P[50, 1] == pytest.approx(-8.3552, abs=1e-3)
    # On the set the two gradients are opposite; half a unit off it they are not.
    for point, on in ((P[25], True), (P[50], True), (P[25] + [0.0, 0.5], False),
                      (P[50] - [0.0, 0.5], False)):
        _, j = _jacobian(toy_losses, torch.tensor(point), 0.1)
        cos = float(j[0] @ j[1] / (j[0].norm() * j[1].norm()))
        assert (cos < -1 + 1e-9) if on else (cos > -1 + 1e-5), (point, cos)
    assert pareto_stationarity(np.asarray(STARTS), 0.1).min() > 1e-3
    # Shifted losses are positive (the methods that take logs need that).
    grid = torch.from_numpy(np.random.default_rng(0).uniform(-10, 10, size=(500, 2)))
    assert bool((toy_losses(grid, 0.1) > 0).all())


# -- the scripts, on tiny settings ---------------------------------------------------------------

def test_toy_script(tmp_path):
    bench = _bench("toy_pareto")
    out = tmp_path / "toy.json"
    assert bench.main(["--steps", "30", "--methods", "ls,multibalance,pub", "--record-every",
                       "10", "--json", str(out), "--png", str(tmp_path / "toy.png")]) == 0
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"ls", "multibalance", "pub"}
    for runs in saved["results"].values():
        assert len(runs) == len(STARTS)
        for r in runs:
            assert r["status"] == "ok" and len(r["trajectory"]) == 2  # JSON: start, end
            assert r["distance"] > 0.05  # 30 steps of lr 1e-3 do not get there
    assert (tmp_path / "toy.png").stat().st_size > 10_000


def test_synthetic_script(tmp_path, capsys):
    bench = _bench("bench_mtl_synthetic")
    out = tmp_path / "syn.json"
    assert bench.main(["--quick", "--rhos", "0.5", "--models", "mmoe", "--methods",
                       "famo,multibalance", "--json", str(out), "--png",
                       str(tmp_path / "syn.png")]) == 0
    assert "SMOKE TEST" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    rows = saved["summary"]["mmoe"]["0.5"]
    assert set(rows) == {"ls", "famo", "multibalance"}  # LS is always added
    assert rows["ls"]["diff"] is None and rows["famo"]["diff"]["avg"]["n"] == 2
    for r in saved["runs"]:
        assert all(math.isfinite(v) and v > 0 for v in r["test_mse"])
    assert (tmp_path / "syn.png").stat().st_size > 10_000
    again = tmp_path / "replot.png"
    assert bench.main(["--replot", str(out), "--png", str(again)]) == 0
    assert again.stat().st_size > 10_000


@pytest.mark.slow
def test_loss_scale_script(tmp_path):
    bench = _bench("bench_loss_scale")
    out = tmp_path / "ls.json"
    assert bench.main(["--quick", "--scales", "1,100", "--methods", "ls,uncertainty",
                       "--json", str(out), "--png", str(tmp_path / "ls.png")]) == 0
    saved = json.loads(out.read_text())
    assert saved["scales"] == [1.0, 100.0] and saved["configs"]["100"]["loss_scale"] == [100, 1]
    row = next(r for r in saved["summary"]["100"] if r["method"] == "uncertainty")
    assert len(row["diff_vs_ls"]["tasks"]) == 2
    assert (tmp_path / "ls.png").stat().st_size > 10_000


def test_cost_script(tmp_path, capsys):
    bench = _bench("bench_balancer_cost")
    out = tmp_path / "cost.json"
    assert bench.main(["--steps", "4", "--warmup", "1", "--batch-sizes", "64", "--methods",
                       "multibalance,pub", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    rows = {r["method"]: r for r in saved["results"][0]["rows"]}
    assert set(rows) == {"ls", "multibalance", "pub"} and rows["ls"]["ratio_of_medians"] == 1.0
    assert "x LS" in capsys.readouterr().out


def test_train_step_script(tmp_path, capsys):
    bench = _bench("bench_train_step")
    out = tmp_path / "train.json"
    # --malloc-defaults: the allocator settings would last for the rest of the test session
    # (test_train_step_keeps_the_heap runs the script as it is, in its own process).
    assert bench.main(["--models", "mmoe", "--batch-sizes", "64", "--steps", "3", "--warmup",
                       "1", "--json", str(out), "--malloc-defaults"]) == 0
    result = json.loads(out.read_text())
    rows = result["results"][0]["rows"]
    assert {"ls", "k-backward", "pub", "multibalance", "nashmtl"} <= set(rows)
    assert all(r["median_ms"] > 0 and math.isfinite(r["paired_over_ls"]) for r in rows.values())
    assert all(r["page_faults_per_step"] >= 0 for r in rows.values())
    assert result["environment"]["malloc"] == "defaults"
    assert "K backward passes alone" in capsys.readouterr().out


@pytest.mark.slow  # two processes of the benchmark's own (CI runs it)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_train_step_keeps_the_heap():
    # In a process of its own. With the heap kept, a freed 64 MiB block stays mapped (the resident
    # set does not shrink) and is taken again without page faults. With glibc's defaults each
    # block is mapped afresh and faulted in (16384 faults) and unmapped when freed. How many takes
    # the kept heap needs before it holds a free block large enough for the next one (with its
    # alignment) depends on where small allocations land between them, so the check counts takes
    # without faults over eight instead of reading one.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import bench_train_step as b, torch\n"
        "kept = sys.argv[2] == 'kept' and b.keep_heap()\n"
        "def resident(): return int(open('/proc/self/statm').read().split()[1])\n"
        "def take():\n"
        "    f0 = b.minor_faults(); t = torch.ones(16 << 20); f1 = b.minor_faults()\n"
        "    r0 = resident(); del t; return f1 - f0, r0 - resident()\n"
        "takes = [take() for _ in range(8)]\n"
        "print(kept, sum(f < 100 for f, _ in takes), min(r for _, r in takes), "
        "max(r for _, r in takes))\n")
    seen = {}
    for mode in ("kept", "defaults"):
        out = subprocess.run([sys.executable, "-c", code, str(BENCHES), mode],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        kept, *counts = out.stdout.split()
        assert kept == str(mode == "kept")
        seen[mode] = [int(c) for c in counts]
    free_takes, least_released, most_released = seen["kept"]
    assert free_takes >= 4 and most_released < 100, seen  # pages, not MiB: 64 MiB is 16384
    free_takes, least_released, most_released = seen["defaults"]
    assert free_takes == 0 and least_released >= 16000, seen


def test_benches_are_not_collected():
    assert not any(p.name.startswith("test_") for p in BENCHES.glob("*.py"))
    assert "pub_native" in sys.modules
