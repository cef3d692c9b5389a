"""``python -m pub_native demo``: PUB against the gradient balancers it claims to beat, on real
data (UCI Adult, two tasks), with MMoE/PLE backbones — quality and cost side by side.

Demo layer on top of ``pub_native.demo.data``, ``pub_native.demo.models``,
``pub_native.balancers`` and the PUB optimizers. Every method runs through the same training
loop with the same seeds (the same initial model and batch order per seed), in lockstep (each
batch goes through every method before the next batch, so step times share the machine's
load); the epoch is selected by validation average AUC. ``--csv``/``--task`` run the same
comparison on another table.
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__, balancers, optim
from .._platform import cpu_name
from .data import MultiTaskData, Split, load_adult, load_csv
from .models import MODELS, build_model

__all__ = ["DemoConfig", "METHODS", "evaluate", "format_table", "main", "roc_auc", "run_demo"]

#: method key -> label in the table.
METHODS = {
    "ls": "LS",
    "nashmtl": "NashMTL",
    "mgda-ub": "MGDA-UB",
    "imtl-g": "IMTL-G",
    "pcgrad": "PCGrad",
    "cagrad": "CAGrad",
    "pub": "PUB",
    "pub+clippy": "PUB+Clippy",
    "pub+adatask": "PUB+AdaTask",
}
_PUB_UMM = {"pub": None, "pub+clippy": "clippy", "pub+adatask": "adatask"}


@dataclass
class DemoConfig:
    """What to run. Defaults: the full comparison that fits in 10 minutes on 2 CPU cores."""

    models: tuple[str, ...] = ("mmoe", "ple")
    methods: tuple[str, ...] = tuple(METHODS)
    seeds: int = 3
    epochs: int = 4
    batch_size: int = 512
    # The paper (section VI-A3): lr 1e-3, weight decay 1e-6, batch 4096 on 22M rows. On Adult's
    # 34k training rows lr 1e-3 needs ~8 epochs to level off; 3e-3 gets there in ~4.
    lr: float = 3e-3
    weight_decay: float = 1e-6
    update_weights_every: int = 1  # NashMTL and PUB; the paper used 10
    clippy_preset: str = "paper"  # PUB+Clippy: "paper" (0.5, 1e-2) or "tfrs" (0.1, 1e-7)
    # Small experts keep the default run within its time budget on 2 CPU cores.
    model_kwargs: dict = field(default_factory=lambda: dict(embed_dim=8, expert_dim=32,
                                                            tower_dims=(16,)))
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

    def check(self) -> None:
        for m in self.models:
            if m not in MODELS:
                raise ValueError(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if not self.models or not self.methods:
            raise ValueError("models and methods must not be empty")
        for name in ("seeds", "epochs", "batch_size", "update_weights_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.clippy_preset not in ("paper", "tfrs"):
            raise ValueError(f"clippy_preset must be 'paper' or 'tfrs', got {self.clippy_preset!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if (self.csv is None) != (not self.tasks):
            raise ValueError("a CSV file (--csv) and its tasks (--task) go together")

    def task_specs(self) -> dict:
        """``tasks`` as the mapping :func:`pub_native.demo.data.load_csv` takes."""
        specs = {}
        for task in self.tasks:
            name, sep, positive = task.partition("=")
            specs[name.strip()] = positive.strip() if sep else None
        return specs


QUICK = dict(models=("mmoe",), seeds=2, epochs=2, batch_size=512, train_rows=8192,
             eval_rows=4096)


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
    labels = split.labels.numpy()
    return [roc_auc(labels[:, k], logits[:, k].numpy()) for k in range(labels.shape[1])]


# -- one training run ----------------------------------------------------------------------------

class _Method:
    """One optimization method behind ``step(losses)``: an optimizer and maybe a balancer."""

    def __init__(self, key: str, model: torch.nn.Module, cfg: DemoConfig, seed: int):
        self.key = key
        params = list(model.parameters())
        hp = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.balancer = None
        if key in _PUB_UMM:
            if key == "pub+clippy":
                hp["clippy_preset"] = cfg.clippy_preset
            self.opt = optim.Adam(params, umm=_PUB_UMM[key],
                               update_weights_every=cfg.update_weights_every, **hp)
            return
        self.opt = torch.optim.Adam(params, **hp)
        kwargs = {}
        if key == "nashmtl":
            kwargs["update_weights_every"] = cfg.update_weights_every
        elif key == "pcgrad":
            kwargs["seed"] = seed
        self.balancer = balancers.BALANCERS[key](params, **kwargs)

    def step(self, losses: list[torch.Tensor]) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.balancer is None:
            self.opt.backward(losses)
        else:
            self.balancer.backward(losses)
        self.opt.step()

    @property
    def stats(self) -> dict:
        return self.balancer.stats if self.balancer is not None else self.opt.stats

    @property
    def weights(self) -> list[float]:
        w = self.balancer.weights if self.balancer is not None else self.opt.task_weights
        return [] if w is None else [float(x) for x in w]


class _Run:
    """One (model, method, seed) training run: its model, optimizer and measurements."""

    def __init__(self, model_name: str, method: str, seed: int, data: MultiTaskData,
                 cfg: DemoConfig):
        self.model_name, self.method, self.seed = model_name, method, seed
        torch.manual_seed(seed)  # the same initial model for every method
        self.model = build_model(model_name, data, **cfg.model_kwargs)
        self.runner = _Method(method, self.model, cfg, seed)
        self.step_times: list[float] = []
        self.solve_times: list[float] = []
        self.val_auc: list[list[float]] = []
        self.test_auc: list[list[float]] = []

    def step(self, batch) -> None:
        self.model.train()
        t0 = time.perf_counter()
        self.runner.step(self.model.task_losses(batch))
        self.step_times.append(time.perf_counter() - t0)
        stats = self.runner.stats
        if self.method != "ls" and stats.get("updated", False):
            self.solve_times.append(float(stats.get("solve_time", math.nan)))

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
            "solve_ms": (1e3 * float(np.median(self.solve_times)) if self.solve_times
                         else None),
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
        for method, run in runs.items():
            bars[method].epoch_done(seed, epoch, run.end_epoch(data))
    return [run.result() for run in runs.values()]


# -- progress ------------------------------------------------------------------------------------

class _Progress:
    """A tqdm bar per (model, method) when tqdm is installed and stderr is a terminal (the
    methods train in lockstep, so their bars advance together), else a line per epoch on
    stderr."""

    def __init__(self, desc: str, total: int, seeds: int, epochs: int, enabled: bool,
                 position: int = 0):
        self.desc, self.seeds, self.epochs, self.enabled = desc, seeds, epochs, enabled
        self.start = time.perf_counter()
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
            print(f"{self.desc}  {text}  ({time.perf_counter() - self.start:.0f} s)",
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


# -- the whole comparison ------------------------------------------------------------------------

def run_demo(cfg: DemoConfig, data: MultiTaskData | None = None) -> dict:
    """Train every (model, method, seed), summarize, and write JSON + PNG to ``cfg.out``.

    Returns the results dict (the JSON content). A method that raises is recorded with its
    error message and left out of the summary; the others still run.
    """
    cfg.check()
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_demo(cfg, data)
    finally:
        torch.set_num_threads(threads)


def _run_demo(cfg: DemoConfig, data: MultiTaskData | None) -> dict:
    t_start = time.perf_counter()
    if data is not None:
        data_name = "given data"
    elif cfg.csv is not None:
        data = load_csv(cfg.csv, tasks=cfg.task_specs(), drop=cfg.drop)
        data_name = Path(cfg.csv).name
    else:
        data = load_adult()
        data_name = "UCI Adult (census income)"
    data = _subset(data, cfg.train_rows, cfg.eval_rows)
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    runs: list[dict] = []
    errors: dict[str, str] = {}
    width = max(len(METHODS[m]) for m in cfg.methods)
    for model_name in cfg.models:
        bars = {m: _Progress(f"{model_name:<4} {METHODS[m]:<{width}}",
                             cfg.seeds * cfg.epochs * steps_per_epoch, cfg.seeds, cfg.epochs,
                             cfg.progress, position=i)
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
                 "train": len(data.train), "validation": len(data.validation),
                 "test": len(data.test)},
        "environment": _environment(cfg),
        "runs": runs,
        "summary": summarize(runs, cfg),
        "errors": errors,
        "wall_s": time.perf_counter() - t_start,
    }
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
        results["figure"] = _figure(results, out / "results.png")
    return results


def summarize(runs: list[dict], cfg: DemoConfig) -> list[dict]:
    """Per (model, method): test AUC mean ± std over seeds at the selected epoch, costs."""
    rows = []
    for model_name in cfg.models:
        ls_ms = None
        for method in cfg.methods:
            rs = [r for r in runs if r["model"] == model_name and r["method"] == method]
            if not rs:
                continue
            test = np.array([r["selected_test_auc"] for r in rs])  # (seeds, K)
            avg = test.mean(axis=1)
            step_ms = float(np.mean([r["step_ms"] for r in rs]))
            solve = [r["solve_ms"] for r in rs if r["solve_ms"] is not None]
            if method == "ls":
                ls_ms = step_ms
            rows.append({
                "model": model_name, "method": method, "label": METHODS[method],
                "seeds": len(rs),
                "task_auc_mean": test.mean(axis=0).tolist(), "task_auc_std": _std(test).tolist(),
                "avg_auc_mean": float(avg.mean()), "avg_auc_std": float(_std(avg)),
                "best_epochs": [r["best_epoch"] for r in rs],
                "step_ms": step_ms,
                "overhead_vs_ls": step_ms / ls_ms if ls_ms else None,
                "solve_ms": float(np.mean(solve)) if solve else None,
            })
    return rows


def _std(x: np.ndarray) -> np.ndarray:
    return x.std(axis=0, ddof=1) if len(x) > 1 else np.zeros(x.shape[1:])


def format_table(results: dict) -> str:
    """The summary as a text table: test AUC (mean ± std over seeds) and costs."""
    tasks = results["data"]["tasks"]
    heads = [f"{t} AUC" for t in tasks] + ["avg AUC"]
    lines = []
    header = (f"{'model':<5} {'method':<12} " + " ".join(f"{h:>17}" for h in heads)
              + f" {'ms/step':>8} {'vs LS':>6} {'solve ms':>9}")
    lines.append(header)
    lines.append("-" * len(header))
    for row in results["summary"]:
        cells = [f"{m:.4f} ± {s:.4f}"
                 for m, s in zip(row["task_auc_mean"], row["task_auc_std"], strict=True)]
        cells.append(f"{row['avg_auc_mean']:.4f} ± {row['avg_auc_std']:.4f}")
        ratio = "" if row["overhead_vs_ls"] is None else f"{row['overhead_vs_ls']:.2f}x"
        solve = "—" if row["solve_ms"] is None else f"{row['solve_ms']:.3f}"
        lines.append(f"{row['model']:<5} {row['label']:<12} "
                     + " ".join(f"{c:>17}" for c in cells)
                     + f" {row['step_ms']:>8.2f} {ratio:>6} {solve:>9}")
    cfg = results["config"]
    lines.append(
        f"test AUC at the epoch of best validation average AUC, mean ± std over "
        f"{cfg['seeds']} seed(s); ms/step: forward + backward + optimizer step (median over "
        f"a run's steps, mean over seeds); vs LS: its ratio to LS; solve ms: computing the "
        f"task weights from the Gram matrix, median per call (NashMTL and PUB: the native "
        f"solver); weights recomputed every {cfg['update_weights_every']} step(s)")
    for key, err in results.get("errors", {}).items():
        lines.append(f"FAILED {key}: {err}")
    return "\n".join(lines)


def _subset(data: MultiTaskData, train_rows: int | None, eval_rows: int | None) -> MultiTaskData:
    if train_rows is None and eval_rows is None:
        return data
    from dataclasses import replace

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
    }


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    return str(obj)


def _figure(results: dict, path: Path) -> str | None:
    """Validation curves per method and test AUC with error bars; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    models = [m for m in results["config"]["models"]
              if any(r["model"] == m for r in results["summary"])]
    if not models:
        return None
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4 * len(models)), squeeze=False)
    colors = plt.get_cmap("tab10")
    for row, model_name in enumerate(models):
        ax_val, ax_test = axes[row]
        summary = [s for s in results["summary"] if s["model"] == model_name]
        for i, s in enumerate(summary):
            rs = [r for r in results["runs"]
                  if r["model"] == model_name and r["method"] == s["method"]]
            curves = np.array([[np.mean(v) for v in r["val_auc"]] for r in rs])
            epochs = np.arange(1, curves.shape[1] + 1)
            mean = curves.mean(axis=0)
            ax_val.plot(epochs, mean, marker="o", ms=3, color=colors(i % 10), label=s["label"])
            if len(rs) > 1:
                sd = curves.std(axis=0, ddof=1)
                ax_val.fill_between(epochs, mean - sd, mean + sd, color=colors(i % 10), alpha=0.1)
        ax_val.set(title=f"{model_name.upper()}: validation average AUC (mean over seeds)",
                   xlabel="epoch", ylabel="average AUC")
        ax_val.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_val.legend(fontsize=8)
        ax_val.grid(alpha=0.3)
        y = np.arange(len(summary))
        ax_test.errorbar([s["avg_auc_mean"] for s in summary], y,
                         xerr=[s["avg_auc_std"] for s in summary], fmt="o", capsize=4)
        ax_test.set_yticks(y, [s["label"] for s in summary])
        ax_test.invert_yaxis()
        ax_test.set(title=f"{model_name.upper()}: test average AUC (mean ± std over seeds)",
                    xlabel="average AUC")
        ax_test.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# -- command line --------------------------------------------------------------------------------

def _csv_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip().lower() for t in text.split(",") if t.strip())


def build_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog="python -m pub_native demo",
        description="Compare PUB with LS, NashMTL, MGDA-UB, IMTL-G, PCGrad and CAGrad on the "
                    "UCI Adult census-income data (tasks: income > 50K, never married) or on "
                    "your own CSV file (--csv, --task) with MMoE/PLE models; prints a table "
                    "and writes results.json and results.png.")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run in under a minute: MMoE, 2 seeds, 2 epochs on 8192 "
                        "training rows (other options override it)")
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
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch threads (default {d.threads}: robust on a busy 2-core machine)")
    p.add_argument("--train-rows", type=int, default=None,
                   help="use only the first n training rows")
    p.add_argument("--csv", default=None,
                   help="run on this CSV file (header row; .gz allowed) instead of Adult")
    p.add_argument("--task", action="append", dest="tasks", default=None,
                   metavar="COLUMN[=POSITIVE]",
                   help="with --csv, a binary task (repeat for each): a 0/1 column, or a "
                        "column and its positive value")
    p.add_argument("--drop", action="append", default=None, metavar="COLUMN",
                   help="with --csv, a column not to use as input (repeatable)")
    p.add_argument("--out", default=None, help=f"output folder (default ./{d.out})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(argv: Sequence[str]) -> DemoConfig:
    args = build_parser().parse_args(list(argv))
    values = dict(QUICK) if args.quick else {}
    if args.quick:
        values["out"] = "pub_demo_quick"
    for name in ("models", "methods", "seeds", "epochs", "batch_size", "lr",
                 "update_weights_every", "clippy_preset", "threads", "train_rows", "out",
                 "csv", "tasks", "drop"):
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
        results = run_demo(cfg)
    except (ValueError, OSError) as exc:
        print(f"python -m pub_native demo: error: {exc}", file=sys.stderr)
        return 2
    env = results["environment"]
    print()
    print(f"pub_native {env['pub_native']} demo — {results['data']['name']}, "
          f"tasks {', '.join(results['data']['tasks'])}; train/validation/test "
          f"{results['data']['train']}/{results['data']['validation']}/"
          f"{results['data']['test']} rows; {cfg.epochs} epochs, batch {cfg.batch_size}, "
          f"lr {cfg.lr}, {env['torch_threads']} thread(s) on {env['processor']}; "
          f"torch {env['torch']}, {env['date']}")
    print(format_table(results))
    if cfg.out:
        written = [str(Path(cfg.out) / "results.json")]
        if results.get("figure"):
            written.append(results["figure"])
        else:
            written.append("(no figure: matplotlib is not installed)")
        print("wrote " + ", ".join(written) + f"  —  total {results['wall_s']:.0f} s")
    return 1 if results["errors"] else 0

