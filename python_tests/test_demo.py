"""pub_native.demo: the rank-based AUC, and an end-to-end run of the comparison (Python API and
``python -m pub_native demo``) on a tiny slice of Adult."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

import pub_native
from pub_native import demo
from pub_native.demo import METHODS, DemoConfig, roc_auc, run_demo


def _auc_by_pairs(y, s):
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(4))
def test_roc_auc_matches_pair_counting(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + 0.7 * y, 1)  # rounding makes many ties
    assert roc_auc(y, s) == pytest.approx(_auc_by_pairs(y, s), abs=1e-12)


def test_roc_auc_edge_cases():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert math.isnan(roc_auc([1, 1], [0.1, 0.2]))
    with pytest.raises(ValueError, match="shape"):
        roc_auc([0, 1], [0.1, 0.2, 0.3])


def test_demo_end_to_end(tmp_path):
    cfg = DemoConfig(models=("mmoe", "ple"), seeds=2, epochs=2, batch_size=128, lr=1e-2,
                     train_rows=512, eval_rows=512, out=str(tmp_path), progress=False)
    results = run_demo(cfg)
    assert results["errors"] == {}
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["model"], r["method"]) for r in saved["summary"]}
    assert rows == {(m, k) for m in ("mmoe", "ple") for k in METHODS}
    for row in saved["summary"]:
        values = [*row["task_auc_mean"], row["avg_auc_mean"], row["step_ms"]]
        assert all(math.isfinite(v) for v in values), row
        assert 0.55 < row["avg_auc_mean"] <= 1.0, row  # 8 steps: better than chance
        assert row["seeds"] == 2 and len(row["task_auc_std"]) == 2
        if row["method"] == "ls":
            assert row["overhead_vs_ls"] == 1.0 and row["solve_ms"] is None
        else:
            assert row["solve_ms"] > 0 and row["overhead_vs_ls"] > 0
    for run in saved["runs"]:
        assert len(run["val_auc"]) == 2 and 1 <= run["best_epoch"] <= 2
        assert run["selected_test_auc"] == run["test_auc"][run["best_epoch"] - 1]
    # Same seed -> same initial model and batches: LS reproduces itself exactly.
    again = run_demo(DemoConfig(models=("mmoe",), methods=("ls",), seeds=1, epochs=2,
                                batch_size=128, lr=1e-2, train_rows=512, eval_rows=512,
                                out=None, progress=False))
    first = next(r for r in saved["runs"] if r["method"] == "ls" and r["model"] == "mmoe")
    assert again["runs"][0]["val_auc"] == first["val_auc"]
    table = demo.format_table(results)
    for label in METHODS.values():
        assert label in table
    pytest.importorskip("matplotlib")
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_demo_reports_a_failing_method_and_runs_the_others(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("PUB optimizer unavailable in this test")

    monkeypatch.setattr(pub_native.optim, "Adam", broken)
    results = run_demo(DemoConfig(models=("mmoe",), methods=("ls", "pub"), seeds=1, epochs=1,
                                  train_rows=256, eval_rows=256, out=None, progress=False))
    assert "unavailable in this test" in results["errors"]["mmoe/pub"]
    assert [r["method"] for r in results["summary"]] == ["ls"]


def test_cli(tmp_path):
    cmd = [sys.executable, "-m", "pub_native", "demo", "--quick", "--methods", "ls,pcgrad,pub",
           "--seeds", "1", "--epochs", "1", "--train-rows", "1024", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "PCGrad" in proc.stdout and "ms/step" in proc.stdout and "vs LS" in proc.stdout
    assert "epoch 1/1 val AUC" in proc.stderr  # the progress lines (stderr is not a terminal)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in saved["summary"]] == ["ls", "pcgrad", "pub"]
    assert saved["config"]["train_rows"] == 1024


def test_import_pub_native_does_not_load_the_demo():
    code = ("import sys, pub_native; "
            "print(sorted(m for m in sys.modules if m.startswith('pub_native')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = eval(proc.stdout)  # a printed list of module names
    assert "pub_native.balancers" in loaded and "pub_native.optim" in loaded
    assert not [m for m in loaded if m.startswith("pub_native.demo")], loaded
    assert "pub_native.baselines" not in loaded


def test_version_flag(capsys):
    from pub_native.__main__ import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"pub_native {pub_native.__version__}"


def test_data_files_ship_with_the_package():
    """The wheel takes every file under pub_native/ that git does not ignore (scikit-build-core,
    wheel.packages): the data and its licence must be tracked and not ignored."""
    from pathlib import Path

    from pub_native.demo.data import ADULT_PATH

    root = Path(__file__).resolve().parents[1]
    files = [ADULT_PATH, ADULT_PATH.with_name("ADULT_LICENSE.md")]
    assert all(f.is_file() for f in files)
    try:
        ignored = subprocess.run(["git", "-C", str(root), "check-ignore", *map(str, files)],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("git is not available")
    if ignored.returncode not in (0, 1):
        pytest.skip("not a git checkout")
    assert ignored.stdout == "", f"ignored by git, so left out of the wheel: {ignored.stdout}"


def test_cli_errors_and_build_report(capsys):
    from pub_native.__main__ import main

    assert main(["demo", "--methods", "ls,sgd"]) == 2
    assert "unknown method 'sgd'" in capsys.readouterr().err
    assert main(["demo", "--seeds", "0"]) == 2
    assert "seeds must be a positive integer" in capsys.readouterr().err
    assert main([]) == 0  # no argument: the build report, as before
    assert "build_type" in capsys.readouterr().out


def test_cli_on_a_csv_file(tmp_path, capsys):
    from pub_native.__main__ import main

    rng = np.random.default_rng(0)
    n = 900
    x = rng.normal(size=n)
    kind = rng.choice(["a", "b", "c"], size=n)
    lines = ["x,kind,noise,clicked,plan"]
    for i in range(n):
        clicked = int(x[i] + 0.5 * rng.normal() > 0)
        plan = "pro" if (kind[i] == "a") ^ (rng.random() < 0.1) else "free"
        lines.append(f"{x[i]:.4f},{kind[i]},{rng.normal():.3f},{clicked},{plan}")
    path = tmp_path / "mine.csv"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = ["demo", "--csv", str(path), "--task", "clicked", "--task", "plan=pro",
            "--drop", "noise", "--methods", "ls,nashmtl,pub", "--seeds", "1", "--epochs", "6",
            "--models", "mmoe", "--batch-size", "64", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mine.csv" in printed and "clicked AUC" in printed and "plan AUC" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["data"]["tasks"] == ["clicked", "plan"]
    for row in saved["summary"]:
        assert row["task_auc_mean"][0] > 0.8 and row["task_auc_mean"][1] > 0.65, row
    assert main(["demo", "--csv", str(path), "--task", "converted"]) == 2
    assert "task column 'converted' not found" in capsys.readouterr().err
