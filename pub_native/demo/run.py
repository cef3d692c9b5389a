"""``python -m pub_native demo``: PUB against the multi-task methods of its paper and
MultiBalance, on real data (UCI Adult, two tasks) with MMoE/PLE backbones — quality and cost
side by side, as differences from LS with 95% intervals.

Demo layer on top of ``pub_native.demo.data``, ``.models``, ``.methods`` and ``.stats``. Every
method runs through the same training loop with the same seeds (the same initial model and
batch order per seed), in lockstep (each batch goes through every method before the next batch,
so step times share the machine's load); the epoch is selected by validation average AUC; test
AUCs are compared with LS's, paired by seed. ``--csv``/``--task`` run the same comparison on
another table; ``--loss-scale`` multiplies the task losses (the loss-scale benchmark).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from .._platform import cpu_name
from .data import MultiTaskData, NotBinaryTask, Split, load_adult, load_csv
from .methods import FAMILIES, METHODS, Method, MethodOptions, check_methods
from .models import MODELS, build_model
from .stats import mean_std, paired_difference

__all__ = ["DemoConfig", "METHODS", "MODEL_KWARGS", "evaluate", "format_table", "main",
           "roc_auc", "run_demo", "summarize"]

#: The demo's model size (small experts keep the default run within its time budget).
MODEL_KWARGS = dict(embed_dim=8, expert_dim=32, tower_dims=(16,))
#: How the models are named in tables and figures.
MODEL_NAMES = {"mmoe": "MMoE", "ple": "PLE"}
#: Where the full study lives (in the source repository).
FULL_STUDY = "docs/BENCHMARKS.md (5 seeds; loss-scale sweep, MMoE-paper synthetic tasks, " \
             "two-objective toy problem, step cost)"


@dataclass
class DemoConfig:
    """What to run. Defaults: the full comparison in about a minute and a half on 2 CPU cores
    (at most 5 minutes on a busy machine)."""

    models: tuple[str, ...] = ("mmoe",)
    methods: tuple[str, ...] = tuple(METHODS)
    seeds: int = 5
    epochs: int = 4
    batch_size: int = 512
    # The paper (section VI-A3): lr 1e-3, weight decay 1e-6, batch 4096 on 22M rows. On Adult's
    # 34k training rows lr 1e-3 needs ~8 epochs to level off; 3e-3 gets there in ~4.
    lr: float = 3e-3
    weight_decay: float = 1e-6
    update_weights_every: int = 1  # NashMTL and PUB; the paper used 10
    clippy_preset: str = "paper"  # PUB+Clippy: "paper" (0.5, 1e-2) or "tfrs" (0.1, 1e-7)
    model_kwargs: dict = field(default_factory=lambda: dict(MODEL_KWARGS))
    # One torch thread: these small models gain little from a second one, and two threads
    # slow down by 5-40x when another process keeps a core of a 2-core machine busy (measured).
    threads: int | None = 1
    train_rows: int | None = None  # use only the first n training rows
    eval_rows: int | None = None  # use only the first n validation and test rows
    out: str | None = "pub_demo"
    progress: bool = True
    # Another data set instead of Adult: a CSV file with a header row, its binary tasks
    # ("column" if already 0/1, "column=positive value" otherwise) and columns to leave out.
    csv: str | None = None
    tasks: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    # Multipliers of the task losses (one per task; empty: all 1).
    loss_scale: tuple[float, ...] = ()
    # A smoke test: its numbers are not results (set by --quick).
    quick: bool = False

    def check(self) -> None:
        for m in self.models:
            if m not in MODELS:
                raise ValueError(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
        check_methods(self.methods)
        if not self.models or not self.methods:
            raise ValueError("models and methods must not be empty")
        for name in ("models", "methods"):
            names = getattr(self, name)
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:  # each run would be counted twice in the intervals
                raise ValueError(f"{name} lists {', '.join(map(repr, twice))} more than once")
        for name in ("seeds", "epochs", "batch_size", "update_weights_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.clippy_preset not in ("paper", "tfrs"):
            raise ValueError(f"clippy_preset must be 'paper' or 'tfrs', got {self.clippy_preset!r}")
        for name in ("threads", "train_rows", "eval_rows"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if (self.csv is None) != (not self.tasks):
            raise ValueError("a CSV file (--csv) and its tasks (--task) go together")
        columns = [t.partition("=")[0].strip() for t in self.tasks]
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise ValueError(f"--task names the column {twice[0]!r} more than once: each task is "
                             "one column")
        if self.drop and self.csv is None:
            raise ValueError("--drop goes with --csv (the Adult data has its own inputs)")
        if self.csv is not None and len(self.tasks) < 2:
            raise ValueError(f"a multi-task comparison needs at least two tasks, got "
                             f"{len(self.tasks)} (--task {' --task '.join(self.tasks)}); "
                             "repeat --task for each task column")
        if any(not (isinstance(s, (int, float)) and 0 < s < math.inf) for s in self.loss_scale):
            raise ValueError(f"loss_scale must hold positive numbers, got {self.loss_scale!r}")

    def task_specs(self) -> dict:
        """``tasks`` as the mapping :func:`pub_native.demo.data.load_csv` takes."""
        specs = {}
        for task in self.tasks:
            name, sep, positive = task.partition("=")
            specs[name.strip()] = positive.strip() if sep else None
        return specs


QUICK = dict(models=("mmoe",), seeds=2, epochs=2, batch_size=512, train_rows=8192,
             eval_rows=4096, quick=True)
def quick_note(cfg, train_rows: int | None = None) -> str:
    """The smoke test's warning, with the seeds, epochs and rows it ran (options given with
    --quick override its own). ``train_rows``: the training rows the run used (fewer than the
    preset's cap where the data has fewer); without it, the cap."""
    get = cfg.get if isinstance(cfg, dict) else lambda name: getattr(cfg, name)
    rows = get("train_rows") if train_rows is None else train_rows
    return (f"SMOKE TEST (--quick): {get('seeds')} seed(s), {get('epochs')} epoch(s) on "
            f"{'all' if rows is None else f'{rows:,}'} training rows. It checks that everything "
            "runs; its numbers are noise and must not be used to compare methods.")


# -- metrics -------------------------------------------------------------------------------------

def roc_auc(labels, scores) -> float:
    """Area under the ROC curve: P(score of a random positive > that of a random negative),
    ties counting ½ — the rank-sum (Mann–Whitney U) formula with average ranks for ties.
    NaN when one class is absent."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in shape: {y.shape} vs {s.shape}")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = avg_rank[inverse.ravel()][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, chunk: int = 16384) -> list[float]:
    """Per-task ROC AUC of ``model`` on ``split``."""
    was_training = model.training
    model.eval()
    logits = torch.cat([model(b) for b in split.batches(chunk)])
    model.train(was_training)
    if not torch.isfinite(logits).all():  # a diverged model, not an AUC of 0.5
        raise FloatingPointError("the model's outputs are not finite (training diverged)")
    labels = split.labels.numpy()
    return [roc_auc(labels[:, k], logits[:, k].numpy()) for k in range(labels.shape[1])]


# -- one training run ----------------------------------------------------------------------------

def _options(cfg: DemoConfig) -> MethodOptions:
    return MethodOptions(lr=cfg.lr, weight_decay=cfg.weight_decay,
                         update_weights_every=cfg.update_weights_every,
                         clippy_preset=cfg.clippy_preset)


def _loss_fn(model, batch, scale: Sequence[float]):
    def loss_fn(with_representation: bool):
        out = model.task_losses(batch, with_representation=with_representation)
        if not scale:
            return out
        losses, rep = out if with_representation else (out, None)
        losses = [s * loss for s, loss in zip(scale, losses, strict=True)]
        return (losses, rep) if with_representation else losses

    return loss_fn


class _Run:
    """One (model, method, seed) training run: its model, method and measurements."""

    def __init__(self, model_name: str, method: str, seed: int, data: MultiTaskData,
                 cfg: DemoConfig):
        self.model_name, self.method, self.seed = model_name, method, seed
        torch.manual_seed(seed)  # the same initial model for every method
        self.model = build_model(model_name, data, **cfg.model_kwargs)
        self.runner = Method(method, self.model.parameters(), data.n_tasks, _options(cfg),
                             seed=seed)
        self.scale = tuple(float(s) for s in cfg.loss_scale)
        self.step_times: list[float] = []
        self.solve_times: list[float] = []
        self.val_auc: list[list[float]] = []
        self.test_auc: list[list[float]] = []

    def step(self, batch) -> None:
        self.model.train()
        t0 = time.perf_counter()
        self.runner.step(_loss_fn(self.model, batch, self.scale))
        self.step_times.append(time.perf_counter() - t0)
        solve = self.runner.solve_ms()
        if solve is not None:
            self.solve_times.append(solve)

    def end_epoch(self, data: MultiTaskData) -> float:
        self.val_auc.append(evaluate(self.model, data.validation))
        self.test_auc.append(evaluate(self.model, data.test))
        return float(np.mean(self.val_auc[-1]))

    def result(self) -> dict:
        best = int(np.argmax([np.mean(v) for v in self.val_auc]))
        # Medians: robust to the other processes of a shared machine and to the first step's
        # set-up (shared-parameter detection, state allocation).
        return {
            "model": self.model_name, "method": self.method, "seed": self.seed,
            "val_auc": self.val_auc, "test_auc": self.test_auc, "best_epoch": best + 1,
            "selected_test_auc": self.test_auc[best], "selected_val_auc": self.val_auc[best],
            "steps": len(self.step_times), "step_ms": 1e3 * float(np.median(self.step_times)),
            "solve_ms": float(np.median(self.solve_times)) if self.solve_times else None,
            "solve_calls": len(self.solve_times), "final_weights": self.runner.weights,
        }


def _train_seed(model_name: str, seed: int, methods: list[str], data: MultiTaskData,
                cfg: DemoConfig, bars: dict, errors: dict) -> list[dict]:
    """Train every method on one seed in lockstep: each batch goes through all methods before
    the next one, so the machine's load (and the batch order) is the same for all of them."""
    runs: dict[str, _Run] = {}

    def fail(method: str, exc: Exception) -> None:
        errors[f"{model_name}/{method}"] = f"{type(exc).__name__}: {exc}"
        bars[method].close(f"FAILED: {type(exc).__name__}: {exc}")
        runs.pop(method, None)

    for method in methods:
        try:
            runs[method] = _Run(model_name, method, seed, data, cfg)
        except Exception as exc:  # noqa: BLE001 - reported; the other methods go on
            fail(method, exc)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(cfg.epochs):
        for batch in data.train.batches(cfg.batch_size, shuffle=True, generator=gen):
            for method, run in list(runs.items()):
                try:
                    run.step(batch)
                except Exception as exc:  # noqa: BLE001
                    fail(method, exc)
                    continue
                bars[method].update(1)
        for method, run in list(runs.items()):
            try:
                val = run.end_epoch(data)
            except Exception as exc:  # noqa: BLE001
                fail(method, exc)
                continue
            bars[method].epoch_done(seed, epoch, val)
    return [run.result() for run in runs.values()]


# -- progress ------------------------------------------------------------------------------------

class _Progress:
    """A tqdm bar per (model, method) when tqdm is installed and stderr is a terminal (the
    methods train in lockstep, so their bars advance together), else one line per method and
    epoch on stderr."""

    def __init__(self, desc: str, total: int, seeds: int, epochs: int, enabled: bool,
                 position: int = 0, start: float | None = None):
        self.desc, self.seeds, self.epochs, self.enabled = desc, seeds, epochs, enabled
        self.start = time.perf_counter() if start is None else start
        self.closed = False
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=desc, unit="step", leave=True,
                                position=position, file=sys.stderr, dynamic_ncols=True,
                                mininterval=0.5)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def epoch_done(self, seed: int, epoch: int, val: float) -> None:
        text = f"seed {seed + 1}/{self.seeds} epoch {epoch + 1}/{self.epochs} val AUC {val:.4f}"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)
        elif self.enabled:
            print(f"[{time.perf_counter() - self.start:5.0f} s] {self.desc}  {text}",
                  file=sys.stderr, flush=True)

    def close(self, note: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=True)
            self.bar.close()
        elif self.enabled and note:
            print(f"{self.desc}  {note}", file=sys.stderr, flush=True)


# -- the plan ------------------------------------------------------------------------------------

def _load(cfg: DemoConfig, data: MultiTaskData | None) -> tuple[MultiTaskData, str]:
    if data is not None:
        name = "given data"
    elif cfg.csv is not None:
        try:
            data = load_csv(cfg.csv, tasks=cfg.task_specs(), drop=cfg.drop)
        except NotBinaryTask as exc:  # the advice in the terms of --task (cfg.tasks)
            raise ValueError(f"task column {exc.column!r} is not binary (values {exc.values}, "
                             f"...); give its positive class, e.g. --task "
                             f"{exc.column}=VALUE") from None
        name = Path(cfg.csv).name
    else:
        data = load_adult()
        name = "UCI Adult (census income)"
    if cfg.loss_scale and len(cfg.loss_scale) != data.n_tasks:
        raise ValueError(f"loss_scale has {len(cfg.loss_scale)} values for {data.n_tasks} tasks")
    data = _subset(data, cfg.train_rows, cfg.eval_rows)
    _check_splits(data)
    return data, name


def _check_splits(data: MultiTaskData) -> None:
    """Every split must have rows, and the validation and test splits both classes of every
    task: their AUCs (the model selection and the table) are not defined otherwise (a table of
    a few rows, or --eval-rows 1, gave NaN in every cell, or torch's error on an empty split)."""
    for split_name in ("train", "validation", "test"):
        split = getattr(data, split_name)
        if len(split) == 0:
            raise ValueError(f"the {split_name} split has no rows (the table is too small to "
                             "split, or --train-rows/--eval-rows is 0)")
        if split_name == "train":
            continue
        rates = split.label_rates.tolist()
        for task, rate in zip(data.task_names, rates, strict=True):
            if rate in (0.0, 1.0):
                raise ValueError(
                    f"task {task!r} has only {'positive' if rate else 'negative'} rows in the "
                    f"{split_name} split ({len(split)} rows): its AUC is not defined; use more "
                    "rows (a larger table or --eval-rows)")


def estimate_seconds(cfg: DemoConfig, data: MultiTaskData, steps: int = 4) -> dict:
    """Expected wall time, from a few timed steps of every method and one timed evaluation
    on this machine (under its current load)."""
    batch = next(data.train.batches(cfg.batch_size))
    per_step = {}
    eval_s = 0.0
    scale = tuple(float(s) for s in cfg.loss_scale)
    for model_name in cfg.models:
        for method in cfg.methods:
            torch.manual_seed(0)
            model = build_model(model_name, data, **cfg.model_kwargs)
            try:
                runner = Method(method, model.parameters(), data.n_tasks, _options(cfg))
                loss_fn = _loss_fn(model, batch, scale)
                runner.step(loss_fn)  # set-up (detection, state) is not what a step costs
                t0 = time.perf_counter()
                for _ in range(steps):
                    runner.step(loss_fn)
                per_step[(model_name, method)] = (time.perf_counter() - t0) / steps
            except Exception:  # noqa: BLE001 - the training loop reports it
                per_step[(model_name, method)] = 0.0
        t0 = time.perf_counter()
        evaluate(model, data.validation)
        evaluate(model, data.test)
        eval_s = max(eval_s, time.perf_counter() - t0)
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    train_s = sum(per_step.values()) * steps_per_epoch * cfg.epochs * cfg.seeds
    total_eval = eval_s * len(cfg.models) * len(cfg.methods) * cfg.epochs * cfg.seeds
    return {"seconds": train_s + total_eval, "step_s": {f"{m}/{k}": v
                                                       for (m, k), v in per_step.items()}}


def describe_plan(cfg: DemoConfig, data: MultiTaskData, data_name: str,
                  estimate: dict | None) -> str:
    """What the run will do, printed before it starts."""
    n = len(data.train) + len(data.validation) + len(data.test)
    rates = data.train.label_rates.tolist()
    tasks = ", ".join(f"{t} ({100 * r:.0f}% positive)"
                      for t, r in zip(data.task_names, rates, strict=True))
    steps = math.ceil(len(data.train) / cfg.batch_size)
    labels = [METHODS[m] for m in cfg.methods]
    lines = []
    if cfg.quick:
        lines += [quick_note(cfg, len(data.train)), ""]
    lines += [
        f"pub_native {__version__} demo — {len(cfg.methods)} multi-task methods compared on "
        f"{data_name}",
        f"  data     {n:,} rows: train {len(data.train):,} / validation "
        f"{len(data.validation):,} / test {len(data.test):,} (fixed split)",
        f"  inputs   {len(data.categorical_columns)} categorical: "
        f"{', '.join(data.categorical_columns) or '—'}",
        f"           {len(data.numerical_columns)} numerical: "
        f"{', '.join(data.numerical_columns) or '—'}",
    ]
    for col, reason in data.dropped_columns:
        lines.append(f"  left out {col} ({reason}; name it with --drop to silence this, or "
                     "rename it if it is a real feature)")
    for col, task in data.label_copies:
        lines.append(f"  warning  input {col} determines task {task} on every row: a copy of "
                     f"its label? Every method will look perfect; --drop {col} unless it is "
                     "a real feature")
    lines.append(f"  tasks    {tasks}; binary cross-entropy each"
                 + (f", multiplied by {', '.join(f'{s:g}' for s in cfg.loss_scale)}"
                    if cfg.loss_scale else ""))
    lines.append(f"  models   {', '.join(MODEL_NAMES.get(m, m) for m in cfg.models)} "
                 f"(embedding {cfg.model_kwargs.get('embed_dim')}, experts of "
                 f"{cfg.model_kwargs.get('expert_dim')}, towers "
                 f"{tuple(cfg.model_kwargs.get('tower_dims', ()))})")
    lines.append("  methods  " + ", ".join(labels))
    width = max(len(lbl) for lbl in labels)
    for m in cfg.methods:
        lines.append(f"           {METHODS[m]:<{width}}  {FAMILIES[m]}")
    lines += [
        f"  training Adam (lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}) under every method, "
        f"batch {cfg.batch_size}, {cfg.epochs} epochs ({steps} steps each), the same initial "
        "weights and batches for every method",
        f"  seeds    {cfg.seeds}; each run's epoch is chosen by validation average AUC; test AUC "
        "is reported as each method's difference from LS, paired by seed, with a 95% interval",
    ]
    if estimate is not None:
        lines.append(f"  expected about {_duration(estimate['seconds'])} on this machine "
                     f"({cfg.threads or torch.get_num_threads()} torch thread(s); from a few "
                     "timed steps of every method)")
    if cfg.out:
        lines.append(f"  output   {Path(cfg.out) / 'results.json'}, "
                     f"{Path(cfg.out) / 'results.png'}")
    lines.append(f"  full study: {FULL_STUDY}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    return f"{seconds / 60:.1f} min"


# -- the whole comparison ------------------------------------------------------------------------

def run_demo(cfg: DemoConfig, data: MultiTaskData | None = None, *,
             report: Callable[[str], None] | None = None) -> dict:
    """Train every (model, method, seed), summarize, and write JSON + PNG to ``cfg.out``.

    ``report``, when given, receives the plan before training starts (e.g. ``print``).
    Returns the results dict (the JSON content). A method that raises is recorded with its
    error message and left out of the summary; the others still run.
    """
    cfg.check()
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_demo(cfg, data, report)
    finally:
        torch.set_num_threads(threads)


def _check_out(folder: str) -> None:
    """Make the output folder and check that files can be written in it, before any training
    (an error at the end would lose the run)."""
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".pub_demo_write_check"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"the output folder (--out) {folder!r} cannot be written: "
                      f"{exc.strerror or exc}") from None


def _run_demo(cfg: DemoConfig, data: MultiTaskData | None, report) -> dict:
    t_start = time.perf_counter()
    if cfg.out:
        _check_out(cfg.out)
    data, data_name = _load(cfg, data)
    estimate = None
    if report is not None:
        estimate = estimate_seconds(cfg, data)
        report(describe_plan(cfg, data, data_name, estimate))
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    runs: list[dict] = []
    errors: dict[str, str] = {}
    width = max(len(METHODS[m]) for m in cfg.methods)
    t_train = time.perf_counter()
    for model_name in cfg.models:
        bars = {m: _Progress(f"{model_name:<4} {METHODS[m]:<{width}}",
                             cfg.seeds * cfg.epochs * steps_per_epoch, cfg.seeds, cfg.epochs,
                             cfg.progress, position=i, start=t_train)
                for i, m in enumerate(cfg.methods)}
        for seed in range(cfg.seeds):
            methods = [m for m in cfg.methods if f"{model_name}/{m}" not in errors]
            runs += _train_seed(model_name, seed, methods, data, cfg, bars, errors)
        runs = [r for r in runs if f"{r['model']}/{r['method']}" not in errors]
        for bar in bars.values():
            bar.close()
    results = {
        "config": asdict(cfg),
        "data": {"name": data_name, "tasks": list(data.task_names),
                 "label_copies": [list(c) for c in data.label_copies],
                 "train": len(data.train), "validation": len(data.validation),
                 "test": len(data.test), "categorical": list(data.categorical_columns),
                 "numerical": list(data.numerical_columns),
                 "dropped": [list(d) for d in data.dropped_columns],
                 "train_label_rates": data.train.label_rates.tolist()},
        "environment": _environment(cfg),
        "runs": runs,
        "summary": summarize(runs, cfg),
        "errors": errors,
        "estimated_s": None if estimate is None else estimate["seconds"],
        "wall_s": time.perf_counter() - t_start,
    }
    if cfg.out:
        # A file that cannot be written is reported (results["write_errors"]: its path and the
        # error), not raised, so that the caller still has the results to show.
        out = Path(cfg.out)
        results["write_errors"] = []
        try:
            (out / "results.json").write_text(json.dumps(results, indent=1,
                                                         default=_json_default))
        except OSError as exc:
            results["write_errors"].append((out / "results.json", exc))
        try:
            results["figure"], results["figure_note"] = _figure(results, out / "results.png")
        except OSError as exc:
            results["figure"], results["figure_note"] = None, "no figure"
            results["write_errors"].append((out / "results.png", exc))
        if results["figure"] is None and (out / "results.png").is_file():
            (out / "results.png").unlink()  # an earlier run's figure, not of these results
    return results


def summarize(runs: list[dict], cfg: DemoConfig) -> list[dict]:
    """Per (model, method): test AUC mean ± std over seeds at the selected epoch, the paired
    difference from LS per task and on the average (mean, std, 95% t-interval), costs."""
    rows = []
    for model_name in cfg.models:
        ls_runs = {r["seed"]: r for r in runs if r["model"] == model_name and r["method"] == "ls"}
        ls_ms = None
        if ls_runs:
            ls_ms = float(np.mean([r["step_ms"] for r in ls_runs.values()]))
        for method in cfg.methods:
            rs = sorted((r for r in runs if r["model"] == model_name and r["method"] == method),
                        key=lambda r: r["seed"])
            if not rs:
                continue
            test = np.array([r["selected_test_auc"] for r in rs])  # (seeds, K)
            avg = test.mean(axis=1)
            step_ms = float(np.mean([r["step_ms"] for r in rs]))
            solve = [r["solve_ms"] for r in rs if r["solve_ms"] is not None]
            row = {
                "model": model_name, "method": method, "label": METHODS[method],
                "seeds": len(rs),
                "task_auc_mean": test.mean(axis=0).tolist(), "task_auc_std": _std(test).tolist(),
                "avg_auc_mean": float(avg.mean()), "avg_auc_std": float(mean_std(avg)[1]),
                "best_epochs": [r["best_epoch"] for r in rs],
                "step_ms": step_ms,
                "overhead_vs_ls": step_ms / ls_ms if ls_ms else None,
                "solve_ms": float(np.mean(solve)) if solve else None,
                "diff_vs_ls": None,
            }
            paired = [r for r in rs if r["seed"] in ls_runs]
            if ls_runs and method != "ls" and paired:
                mine = np.array([r["selected_test_auc"] for r in paired])
                base = np.array([ls_runs[r["seed"]]["selected_test_auc"] for r in paired])
                row["diff_vs_ls"] = {
                    "tasks": [paired_difference(mine[:, k], base[:, k])
                              for k in range(mine.shape[1])],
                    "avg": paired_difference(mine.mean(1), base.mean(1)),
                }
            rows.append(row)
    return rows


def _std(x: np.ndarray) -> np.ndarray:
    return x.std(axis=0, ddof=1) if len(x) > 1 else np.zeros(x.shape[1:])


def _diff_cell(d: dict | None) -> str:
    if d is None:
        return "—"
    if not math.isfinite(d["half_width"]):
        return f"{d['mean']:+.4f} (1 seed)"
    mark = "*" if d["ci_low"] > 0 or d["ci_high"] < 0 else " "
    return f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]{mark}"


def format_table(results: dict) -> str:
    """The summary as text: test AUC (mean ± std over seeds) and costs; then each method's
    paired difference from LS with its 95% interval; then what that allows one to say."""
    tasks = results["data"]["tasks"]
    cfg = results["config"]
    heads = [f"{t} AUC" for t in tasks] + ["avg AUC"]
    lines = []
    used = results["data"].get("train")  # (the training rows the run used)
    if cfg.get("quick"):
        lines += [quick_note(cfg, used), ""]
    header = (f"{'model':<5} {'method':<12} " + " ".join(f"{h:>17}" for h in heads)
              + f" {'ms/step':>8} {'vs LS':>6} {'solve ms':>9}")
    lines += [header, "-" * len(header)]
    for row in results["summary"]:
        cells = [f"{m:.4f} ± {s:.4f}"
                 for m, s in zip(row["task_auc_mean"], row["task_auc_std"], strict=True)]
        cells.append(f"{row['avg_auc_mean']:.4f} ± {row['avg_auc_std']:.4f}")
        ratio = "" if row["overhead_vs_ls"] is None else f"{row['overhead_vs_ls']:.2f}x"
        solve = "—" if row["solve_ms"] is None else f"{row['solve_ms']:.3f}"
        lines.append(f"{MODEL_NAMES.get(row['model'], row['model']):<5} {row['label']:<12} "
                     + " ".join(f"{c:>17}" for c in cells)
                     + f" {row['step_ms']:>8.2f} {ratio:>6} {solve:>9}")
    lines.append(
        f"test AUC at the epoch of best validation average AUC, mean ± std over "
        f"{cfg['seeds']} seed(s); ms/step: forward + backward + optimizer step (median over "
        f"a run's steps, mean over seeds); vs LS: its ratio to LS; solve ms: computing the "
        f"task weights from the Gram matrix, median per call (NashMTL and PUB: the native "
        f"solver); weights recomputed every {cfg['update_weights_every']} step(s)")
    diffs = [r for r in results["summary"] if r["diff_vs_ls"] is not None]
    if diffs:
        heads = [f"Δ {t} AUC" for t in tasks] + ["Δ avg AUC"]
        header = f"{'model':<5} {'method':<12} " + " ".join(f"{h:>27}" for h in heads)
        lines += ["", header, "-" * len(header)]
        for row in diffs:
            d = row["diff_vs_ls"]
            cells = [_diff_cell(x) for x in d["tasks"]] + [_diff_cell(d["avg"])]
            lines.append(f"{MODEL_NAMES.get(row['model'], row['model']):<5} {row['label']:<12} "
                         + " ".join(f"{c:>27}" for c in cells))
        lines.append("difference from LS on the same seed (same initial model and batches): "
                     "mean [95% t-interval over seeds]; * = the interval excludes 0")
        lines += [quick_note(cfg, used)] if cfg.get("quick") else _verdict(diffs, tasks)
    for key, err in results.get("errors", {}).items():
        lines.append(f"FAILED {key}: {err}")
    return "\n".join(lines)


def _verdict(diffs: list[dict], tasks: list[str]) -> list[str]:
    """Which differences the intervals support — stated whatever the outcome."""
    better, worse = [], []
    for row in diffs:
        for name, d in zip([*tasks, "average"], [*row["diff_vs_ls"]["tasks"],
                                                  row["diff_vs_ls"]["avg"]], strict=True):
            if not math.isfinite(d["half_width"]):
                continue
            tag = f"{MODEL_NAMES.get(row['model'], row['model'])} {row['label']} " \
                  f"({name} {d['mean']:+.4f})"
            if d["ci_low"] > 0:
                better.append(tag)
            elif d["ci_high"] < 0:
                worse.append(tag)
    lines = []
    intervals = [d for row in diffs for d in [*row["diff_vs_ls"]["tasks"], row["diff_vs_ls"]["avg"]]
                 if math.isfinite(d["half_width"])]
    if diffs and not intervals:
        lines.append("verdict: none: one seed gives no interval, so no method can be told apart "
                     "from LS (use --seeds 2 or more).")
    elif not better and not worse:
        lines.append("verdict: no method differs from LS beyond its 95% interval on any task; "
                     "with these seeds the methods cannot be told apart on this data.")
    else:
        if better:
            lines.append("above LS (interval excludes 0): " + "; ".join(better))
        if worse:
            lines.append("below LS (interval excludes 0): " + "; ".join(worse))
        lines.append(f"({sum(len(r['diff_vs_ls']['tasks']) + 1 for r in diffs)} intervals in "
                     "all: at 95% each, about one in twenty excludes 0 by chance alone.)")
    return lines


def _subset(data: MultiTaskData, train_rows: int | None, eval_rows: int | None) -> MultiTaskData:
    if train_rows is None and eval_rows is None:
        return data

    def cut(split: Split, n: int | None) -> Split:
        return split if n is None else split.head(n)

    return replace(data, train=cut(data.train, train_rows),
                   validation=cut(data.validation, eval_rows), test=cut(data.test, eval_rows))


def _environment(cfg: DemoConfig) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pub_native": __version__, "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "processor": cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Where PUB's steps ran (PUB_NATIVE_BACKEND=reference: the plain-PyTorch reference).
        "pub_backend": os.environ.get("PUB_NATIVE_BACKEND", "native"),
    }


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    return str(obj)


def _figure(results: dict, path: Path) -> tuple[str | None, str]:
    """Per model: each method's test-AUC difference from LS per task with 95% intervals, and
    its cost per step relative to LS. (path, "") or (None, why there is none)."""
    try:
        from .plots import difference_and_cost_figure
    except ImportError:
        return None, "no figure: matplotlib is not installed"
    cfg = results["config"]
    data = results["data"]
    title = (f"{data['name']}: tasks {', '.join(data['tasks'])} — "
             f"{cfg['seeds']} seeds, {cfg['epochs']} epochs, batch {cfg['batch_size']}"
             + (f", loss scales {', '.join(f'{s:g}' for s in cfg['loss_scale'])}"
                if cfg.get("loss_scale") else "")
             + ("  [SMOKE TEST: not results]" if cfg.get("quick") else ""))
    panels = []
    for model_name in cfg["models"]:
        rows = [r for r in results["summary"] if r["model"] == model_name]
        if rows:
            panels.append((MODEL_NAMES.get(model_name, model_name), rows))
    if not panels:
        return None, "no figure: no method has a result to draw"
    return difference_and_cost_figure(panels, data["tasks"], title, path), ""


# -- command line --------------------------------------------------------------------------------

def _csv_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip().lower() for t in text.split(",") if t.strip())


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog="python -m pub_native demo", allow_abbrev=False,
        description="Compare PUB with LS, Uncertainty weighting, FAMO, NashMTL, MGDA-UB, "
                    "IMTL-G, PCGrad, CAGrad and MultiBalance on the UCI Adult census-income "
                    "data (tasks: income > 50K, never married) or on your own CSV file "
                    "(--csv, --task) with MMoE/PLE models. Prints the plan first, then a table "
                    "of test AUCs, each method's difference from LS with a 95% interval, and "
                    "the cost per step; writes results.json and results.png. The full study: "
                    f"{FULL_STUDY}.")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test in about 15 s (MMoE, 2 seeds, 2 epochs on 8192 training "
                        "rows): checks that everything runs; its numbers are noise, not results "
                        "(other options override it)")
    p.add_argument("--models", type=_csv_list, default=None,
                   help=f"comma-separated, from {','.join(MODELS)} (default: "
                        f"{','.join(d.models)})")
    p.add_argument("--methods", type=_csv_list, default=None,
                   help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    p.add_argument("--seeds", type=int, default=None, help=f"default {d.seeds}")
    p.add_argument("--epochs", type=int, default=None, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=None, help=f"default {d.lr}")
    p.add_argument("--update-weights-every", type=int, default=None,
                   help="NashMTL and PUB: recompute the task weights every n steps (default 1; "
                        "the paper used 10)")
    p.add_argument("--clippy-preset", choices=("paper", "tfrs"), default=None,
                   help="PUB+Clippy thresholds: paper (λ_rel 0.5, λ_abs 1e-2; default) or "
                        "tfrs (0.1, 1e-7)")
    p.add_argument("--loss-scale", type=_float_list, default=None, metavar="S1,S2,...",
                   help="multiply task i's loss by S_i (one number per task)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch threads (default {d.threads}: robust on a busy 2-core machine)")
    p.add_argument("--train-rows", type=int, default=None,
                   help="use only the first n training rows")
    p.add_argument("--eval-rows", type=int, default=None,
                   help="use only the first n validation and test rows")
    p.add_argument("--csv", default=None,
                   help="run on this CSV file (header row; .gz allowed) instead of Adult; "
                        "columns whose values are all distinct text or whole numbers (IDs) are "
                        "left out, with a note")
    p.add_argument("--task", action="append", dest="tasks", default=None,
                   metavar="COLUMN[=POSITIVE]",
                   help="with --csv, a binary task (repeat for each, at least two): a 0/1 "
                        "column, or a column and its positive value")
    p.add_argument("--drop", action="append", default=None, metavar="COLUMN",
                   help="with --csv, a column not to use as input (repeatable)")
    p.add_argument("--out", default=None,
                   help=f"output folder (default ./{d.out}, ./pub_demo_quick with --quick; "
                        "'' writes nothing)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or lines")
    return p


def config_from_args(argv: Sequence[str]) -> DemoConfig:
    args = build_parser().parse_args(list(argv))
    values = dict(QUICK) if args.quick else {}
    if args.quick:
        values["out"] = "pub_demo_quick"
    for name in ("models", "methods", "seeds", "epochs", "batch_size", "lr",
                 "update_weights_every", "clippy_preset", "threads", "train_rows", "eval_rows",
                 "out",
                 "csv", "tasks", "drop", "loss_scale"):
        value = getattr(args, name)
        if value is not None:
            values[name] = tuple(value) if isinstance(value, list) else value
    values["progress"] = not args.no_progress
    return DemoConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = config_from_args(argv)
        cfg.check()
        results = run_demo(cfg, report=lambda text: print(text + "\n", flush=True))
    except (ValueError, OSError) as exc:
        print(f"python -m pub_native demo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # nothing is written before the end of training
        print("\npython -m pub_native demo: interrupted; nothing written", file=sys.stderr)
        return 130
    env = results["environment"]
    print()
    print(f"pub_native {env['pub_native']} demo — {results['data']['name']}, "
          f"tasks {', '.join(results['data']['tasks'])}; train/validation/test "
          f"{results['data']['train']}/{results['data']['validation']}/"
          f"{results['data']['test']} rows; {cfg.epochs} epochs, batch {cfg.batch_size}, "
          f"lr {cfg.lr}, {env['torch_threads']} thread(s) on {env['processor']}; "
          f"torch {env['torch']}, {env['date']}"
          + ("" if env["pub_backend"] == "native"
             else f"; PUB on the {env['pub_backend']!r} backend (PUB_NATIVE_BACKEND)"))
    print(format_table(results))
    if cfg.out:
        failed = results["write_errors"]
        json_path = Path(cfg.out) / "results.json"
        written = [] if any(path == json_path for path, _ in failed) else [str(json_path)]
        written.append(results["figure"] or f"({results['figure_note']})")
        print("wrote " + ", ".join(written) + f"  —  total {results['wall_s']:.0f} s")
        for path, exc in failed:
            print(f"python -m pub_native demo: error: could not write {path}: {exc}",
                  file=sys.stderr)
        if failed:
            return 2
    print(f"the full study: {FULL_STUDY}")
    return 1 if results["errors"] else 0
