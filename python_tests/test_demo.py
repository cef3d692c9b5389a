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


@pytest.mark.slow  # the README's first command runs the demo; test_cli runs it from the CLI
def test_demo_end_to_end(tmp_path):
    cfg = DemoConfig(models=("mmoe", "ple"), seeds=3, epochs=2, batch_size=128, lr=1e-2,
                     train_rows=512, eval_rows=512, out=str(tmp_path), progress=False)
    plan = []
    results = run_demo(cfg, report=plan.append)
    assert results["errors"] == {}
    # The plan comes first and says what will run and for how long.
    assert len(plan) == 1 and "expected about" in plan[0] and "MultiBalance" in plan[0]
    assert "income" in plan[0] and "full study" in plan[0]
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["model"], r["method"]) for r in saved["summary"]}
    assert rows == {(m, k) for m in ("mmoe", "ple") for k in METHODS}
    for row in saved["summary"]:
        values = [*row["task_auc_mean"], row["avg_auc_mean"], row["step_ms"]]
        assert all(math.isfinite(v) for v in values), row
        assert 0.55 < row["avg_auc_mean"] <= 1.0, row  # 8 steps: better than chance
        assert row["seeds"] == 3 and len(row["task_auc_std"]) == 2
        if row["method"] == "ls":
            assert row["overhead_vs_ls"] == 1.0 and row["solve_ms"] is None
            assert row["diff_vs_ls"] is None
            continue
        assert row["overhead_vs_ls"] > 0
        if row["method"] in ("uncertainty", "famo"):
            assert row["solve_ms"] is None  # loss weightings solve nothing
        else:
            assert row["solve_ms"] > 0
        # The paired difference from LS, recomputed from the runs.
        mine = {r["seed"]: r for r in saved["runs"]
                if (r["model"], r["method"]) == (row["model"], row["method"])}
        ls = {r["seed"]: r for r in saved["runs"]
              if (r["model"], r["method"]) == (row["model"], "ls")}
        d = np.array([np.mean(mine[s]["selected_test_auc"]) - np.mean(ls[s]["selected_test_auc"])
                      for s in range(3)])
        avg = row["diff_vs_ls"]["avg"]
        assert avg["mean"] == pytest.approx(d.mean(), abs=1e-12)
        half = 4.302652729911275 * d.std(ddof=1) / math.sqrt(3)  # t_{0.975, 2}
        assert avg["half_width"] == pytest.approx(half, rel=1e-4)
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
    assert "95% t-interval" in table and "Δ avg AUC" in table
    pytest.importorskip("matplotlib")
    assert (tmp_path / "results.png").stat().st_size > 10_000


def _fake_results(diff_means, quick=False):
    """A results dict with given average differences from LS (5 seeds, tight intervals)."""
    from pub_native.demo.stats import paired_difference

    rows = [{"model": "mmoe", "method": "ls", "label": "LS", "seeds": 5,
             "task_auc_mean": [0.9, 0.9], "task_auc_std": [0.0, 0.0], "avg_auc_mean": 0.9,
             "avg_auc_std": 0.0, "step_ms": 1.0, "overhead_vs_ls": 1.0, "solve_ms": None,
             "diff_vs_ls": None}]
    base = np.zeros(5)
    for (key, label), mean in zip([("pub", "PUB"), ("famo", "FAMO")], diff_means):
        d = paired_difference(mean + 1e-4 * (np.arange(5) - 2), base)
        rows.append({**rows[0], "method": key, "label": label,
                     "diff_vs_ls": {"tasks": [d, d], "avg": d}})
    return {"data": {"tasks": ["a", "b"]}, "summary": rows, "errors": {},
            "config": {"seeds": 5, "update_weights_every": 1, "quick": quick}}


def test_verdict_is_stated_whatever_the_outcome():
    tie = demo.format_table(_fake_results([0.0, 0.0]))
    assert "cannot be told apart" in tie
    split = demo.format_table(_fake_results([0.01, -0.01]))
    assert "above LS (interval excludes 0): MMoE PUB" in split
    assert "below LS (interval excludes 0): MMoE FAMO" in split
    quick = demo.format_table(_fake_results([0.01, -0.01], quick=True))
    assert "above LS" not in quick and quick.count("SMOKE TEST") == 2


def test_demo_reports_a_failing_method_and_runs_the_others(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("PUB optimizer unavailable in this test")

    monkeypatch.setattr(pub_native.optim, "Adam", broken)
    results = run_demo(DemoConfig(models=("mmoe",), methods=("ls", "pub"), seeds=1, epochs=1,
                                  train_rows=256, eval_rows=256, out=None, progress=False))
    assert "unavailable in this test" in results["errors"]["mmoe/pub"]
    assert [r["method"] for r in results["summary"]] == ["ls"]


@pytest.mark.slow
def test_cli(tmp_path):
    cmd = [sys.executable, "-m", "pub_native", "demo", "--quick", "--methods",
           "ls,pcgrad,multibalance,pub", "--seeds", "1", "--epochs", "1", "--train-rows", "1024",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "PCGrad" in out and "MultiBalance" in out and "ms/step" in out and "vs LS" in out
    # The plan is printed before the results, and the smoke test says what it is.
    assert out.index("expected about") < out.index("ms/step")
    assert out.count("SMOKE TEST") >= 2 and "must not be used to compare" in out
    assert "the full study: docs/BENCHMARKS.md" in out
    # One progress line per method and epoch (stderr is not a terminal).
    assert proc.stderr.count("epoch 1/1 val AUC") == 4
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in saved["summary"]] == ["ls", "pcgrad", "multibalance", "pub"]
    assert saved["config"]["train_rows"] == 1024 and saved["config"]["quick"] is True


def test_import_pub_native_does_not_load_the_demo():
    # Nor torch's compiler (torch._dynamo: over a second of import time), which a compiled
    # step loads anyway.
    code = ("import sys, pub_native; "
            "print(sorted(m for m in sys.modules if m.startswith(('pub_native', 'torch._dyn'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = eval(proc.stdout)  # a printed list of module names
    assert "pub_native.balancers" in loaded and "pub_native.optim" in loaded
    assert not [m for m in loaded if m.startswith("pub_native.demo")], loaded
    assert "pub_native.baselines" not in loaded
    assert "torch._dynamo" not in loaded


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
    for rows in ("0", "-5"):  # 0 ended in a StopIteration traceback, -5 meant "all but 5"
        assert main(["demo", "--train-rows", rows]) == 2
        assert "train_rows must be a positive integer" in capsys.readouterr().err
    assert main([]) == 0  # no argument: the build report, as before
    assert "build_type" in capsys.readouterr().out


def test_cli_on_a_csv_file(tmp_path, capsys):
    from pub_native.__main__ import main

    rng = np.random.default_rng(0)
    n = 900
    x = rng.normal(size=n)
    kind = rng.choice(["a", "b", "c"], size=n)
    lines = ["user_id,x,kind,noise,clicked,plan"]
    for i in range(n):
        clicked = int(x[i] + 0.5 * rng.normal() > 0)
        plan = "pro" if (kind[i] == "a") ^ (rng.random() < 0.1) else "free"
        lines.append(f"{1000 + 7 * i},{x[i]:.4f},{kind[i]},{rng.normal():.3f},{clicked},{plan}")
    path = tmp_path / "mine.csv"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = ["demo", "--csv", str(path), "--task", "clicked", "--task", "plan=pro",
            "--drop", "noise", "--methods", "ls,nashmtl,multibalance,pub", "--seeds", "1",
            "--epochs", "6", "--models", "mmoe", "--batch-size", "64", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mine.csv" in printed and "clicked AUC" in printed and "plan AUC" in printed
    # The inputs are listed; the all-distinct integer column is left out with a note.
    assert "1 categorical: kind" in printed and "1 numerical: x" in printed
    assert "left out user_id (ID-like: all 900 values distinct" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["data"]["tasks"] == ["clicked", "plan"]
    assert saved["data"]["numerical"] == ["x"] and saved["data"]["categorical"] == ["kind"]
    # kind predicts plan but is no copy of it (10% flipped): no warning.
    assert saved["data"]["label_copies"] == [] and "a copy of its label" not in printed
    for row in saved["summary"]:
        assert row["task_auc_mean"][0] > 0.8 and row["task_auc_mean"][1] > 0.65, row
    assert main(["demo", "--csv", str(path), "--task", "converted", "--task", "clicked"]) == 2
    assert "task column 'converted' not found" in capsys.readouterr().err
    assert main(["demo", "--csv", str(path), "--task", "clicked"]) == 2
    assert "needs at least two tasks" in capsys.readouterr().err


def _small_csv(path, n=300):
    rng = np.random.default_rng(0)
    plans = rng.choice(["pro", "free", "team"], size=n)
    path.write_text("x,clicked,plan\n" + "".join(
        f"{rng.normal():.3f},{int(rng.random() < 0.5)},{plan}\n" for plan in plans))
    return str(path)


def test_the_smoke_test_banner_counts_the_training_rows_used(tmp_path):
    # On a CSV smaller than the --quick preset's 8,192 training rows the banner claimed 8,192
    # while the data line below it said "train 210": it counts the rows the run uses.
    from pub_native.demo import run

    path = _small_csv(tmp_path / "small.csv")
    cfg = run.config_from_args(["--quick", "--csv", path, "--task", "clicked", "--task",
                                "plan=pro", "--out", ""])
    data, name = run._load(cfg, None)
    plan = run.describe_plan(cfg, data, name, None)
    assert len(data.train) == 210 and cfg.train_rows == 8192
    assert "SMOKE TEST (--quick): 2 seed(s), 2 epoch(s) on 210 training rows" in plan
    assert "8,192" not in plan
    results = _fake_results([0.01, -0.01], quick=True)
    results["data"]["train"] = 2100
    results["config"]["train_rows"] = 8192
    table = demo.format_table(results)
    assert table.count("on 2,100 training rows") == 2 and "8,192" not in table


def test_cli_names_the_positive_class_of_a_task_in_the_terms_of_task(tmp_path, capsys):
    # A non-binary task column told command-line users "e.g. tasks={'plan': value}", the Python
    # API's spelling; the command line says --task plan=VALUE, load_csv keeps its own words.
    from pub_native.__main__ import main
    from pub_native.demo.data import load_csv

    path = _small_csv(tmp_path / "small.csv")
    assert main(["demo", "--csv", path, "--task", "clicked", "--task", "plan", "--out", "",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "task column 'plan' is not binary (values " in err
    assert "e.g. --task plan=VALUE" in err and "tasks={" not in err and "Traceback" not in err
    with pytest.raises(ValueError, match=r"e\.g\. tasks=\{'plan': value\}"):
        load_csv(path, tasks=["clicked", "plan"])


def test_cli_refuses_what_would_mislead_before_training(capsys, tmp_path):
    from pub_native.__main__ import main

    not_a_folder = tmp_path / "a_file"
    not_a_folder.write_text("")
    cases = [
        (["--models", "mmoe,MMOE"], "models lists 'mmoe' more than once"),  # runs counted twice
        (["--methods", "ls,pub,ls"], "methods lists 'ls' more than once"),
        (["--seed", "42"], "unrecognized arguments: --seed"),  # not --seeds 42
        (["--drop", "age"], "--drop goes with --csv"),
        (["--csv", "x.csv", "--task", "a", "--task", "a=1"], "names the column 'a' more than once"),
        (["--quick", "--out", str(not_a_folder / "sub")], "output folder (--out)"),
    ]
    def status(args):
        try:
            return main(args)
        except SystemExit as exc:  # argparse's own errors
            return exc.code

    for args, message in cases:
        assert status(["demo", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
        assert "Traceback" not in err
    assert main(["info", "junk"]) == 2 and "unexpected arguments" in capsys.readouterr().err
    assert main(["--version", "junk"]) == 2
    # Splits the AUC is not defined on, found before training: one evaluation row (every cell
    # was NaN, exit 0) and a table too small for a validation split (torch's error on an
    # empty list). The message names the split and what to change.
    small = tmp_path / "small.csv"
    small.write_text("x,a,b\n" + "".join(f"{i % 3},{i % 2},{(i // 2) % 2}\n" for i in range(7)))
    for args, message in (
            (["--eval-rows", "1", "--train-rows", "256"], "only positive rows in the validation"),
            (["--csv", str(small), "--task", "a", "--task", "b"], "split has no rows")):
        assert status(["demo", "--seeds", "1", "--epochs", "1", "--out", "", "--no-progress",
                       *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err or message.replace("positive", "negative") in err, (args, err)
        assert "Traceback" not in err


def test_a_diverged_model_fails_instead_of_scoring_half(monkeypatch):
    from pub_native.demo import run

    real = run.evaluate

    def evaluate(model, split, chunk=16384):  # the outputs of a model that diverged
        forward = type(model).forward
        with monkeypatch.context() as m:
            m.setattr(type(model), "forward", lambda self, b: forward(self, b) * float("nan"))
            return real(model, split, chunk)

    monkeypatch.setattr(run, "evaluate", evaluate)
    results = run_demo(DemoConfig(models=("mmoe",), methods=("ls",), seeds=1, epochs=1,
                                  train_rows=256, eval_rows=256, out=None, progress=False))
    assert "not finite" in results["errors"]["mmoe/ls"]
    assert results["summary"] == []


def test_one_seed_claims_no_verdict_and_a_figure_not_drawn_is_removed(tmp_path, monkeypatch):
    cfg = dict(models=("mmoe",), methods=("ls", "pub"), seeds=1, epochs=1, train_rows=256,
               eval_rows=256, out=str(tmp_path), progress=False)
    (tmp_path / "results.png").write_bytes(b"an earlier run's figure")
    from pub_native.demo import run

    monkeypatch.setattr(run, "_figure", lambda results, path: (None, "no figure: test"))
    results = run_demo(DemoConfig(**cfg))
    assert not (tmp_path / "results.png").exists()
    assert results["figure_note"] == "no figure: test" and results["write_errors"] == []
    table = demo.format_table(results)
    assert "one seed gives no interval" in table and "cannot be told apart" not in table


def test_a_file_that_cannot_be_written_at_the_end_is_reported_after_the_table(
        tmp_path, monkeypatch, capsys):
    from pub_native.__main__ import main
    from pub_native.demo import run

    def figure(results, path):
        raise IsADirectoryError(21, "Is a directory", str(path))

    monkeypatch.setattr(run, "_figure", figure)
    args = ["demo", "--models", "mmoe", "--methods", "ls,pub", "--seeds", "1", "--epochs", "1",
            "--train-rows", "256", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "ms/step" in captured.out  # the table was printed
    assert "could not write" in captured.err and "results.png" in captured.err
    assert json.loads((tmp_path / "results.json").read_text())["summary"]


def test_an_interrupted_demo_says_so_without_a_traceback(monkeypatch, capsys):
    from pub_native.__main__ import main
    from pub_native.demo import run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "run_demo", interrupted)
    assert main(["demo", "--quick", "--out", ""]) == 130
    assert "interrupted; nothing written" in capsys.readouterr().err


def test_eval_rows_overrides_the_smoke_test():
    from pub_native.demo.run import config_from_args

    assert config_from_args(["--quick"]).eval_rows == 4096
    assert config_from_args(["--quick", "--eval-rows", "512"]).eval_rows == 512
