"""Benchmark: the training step a user pays for — forward + backward + optimizer step — on the
census-income MMoE and PLE of the demo, for LS, PUB, MultiBalance and our NashMTL (and the
floor of K backward passes without balancing), and side by
side in the same run the peers a user would pick instead: TorchJD's NashMTL and UPGrad
(``torchjd``, in the ``bench`` extra).

Every method trains its own copy of the same initial model on the same batches, round robin
(each batch goes through every method before the next one, so the machine's load hits all of
them alike). Reported per method: the median step time, and the median over the rounds of its
ratio to LS in that round. Targets: PUB at most 1.2× LS (update_weights_every = 1), and at
least 6× faster than TorchJD's NashMTL, both on these paired ratios (the median over the rounds
of the ratio within a round), compared as printed (two decimals); each model and batch size gets
a PASS or FAIL line. TorchJD and its extras (cvxpy and ECOS for its NashMTL, quadprog for its
UPGrad) are tried on a tiny matrix before anything is measured; a peer that cannot run is left
out, with the reason, and its target is reported as not measured.

Exit status: 0 when the run completes, whatever the verdicts (the speed targets are printed,
not checked: a busy machine must not fail a CI job); 2 for invalid options (including a --json
path that cannot be written, checked before anything is measured); 1 when the run itself fails.

The steps allocate and free megabytes of activations. With its default settings glibc's malloc
hands the top of the heap back to the system when enough of it is free and takes it back on the
next allocation, and each page taken back costs a page fault: on the 2-core development machine
~2000-4000 faults and 3-10 ms per step at batch 4096, landing on whichever methods the heap's
layout happens to disfavour (the same method ran at 21 or 31 ms in two processes). On glibc the
benchmark therefore turns that off (mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD at 1 GiB, as
the environment variables MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ would), for every
method alike, and reports the minor page faults per step, which show whether it took (another
allocator preloaded in glibc's place may accept mallopt and ignore it); ``--malloc-defaults``
keeps glibc's defaults.

    python benches/bench_train_step.py                          # MMoE and PLE, batch 512, 4096
    python benches/bench_train_step.py --quick                  # MMoE, batch 512, 20 steps
    python benches/bench_train_step.py --quick --steps 5        # --quick keeps options given
    python benches/bench_train_step.py --device cuda --json out.json
    python benches/bench_train_step.py --malloc-defaults        # glibc's heap trimming left on
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

try:
    import resource
except ImportError:  # not on Windows
    resource = None

from _common import (
    check_json_path,
    list_of,
    non_negative_int,
    paired_ratio,
    positive_int,
    write_json,
)

import pub_native
from pub_native._platform import cpu_name
from pub_native.demo.data import load_adult
from pub_native.demo.methods import Method, MethodOptions
from pub_native.demo.models import MODELS, build_model
from pub_native.demo.run import MODEL_KWARGS

OURS = ["ls", "k-backward", "pub", "multibalance", "nashmtl"]
PEERS = ["torchjd-nashmtl", "torchjd-upgrad"]
LABELS = {"ls": "LS", "k-backward": "K backward", "pub": "PUB", "multibalance": "MultiBalance",
          "nashmtl": "NashMTL", "torchjd-nashmtl": "TorchJD NashMTL",
          "torchjd-upgrad": "TorchJD UPGrad"}
TARGETS = {"pub_over_ls_max": 1.2, "torchjd_nashmtl_over_pub_min": 6.0}
# Defaults of the options that --quick changes (only where the option is not given).
DEFAULTS = {"models": ["mmoe", "ple"], "batch_sizes": [512, 4096], "steps": 60}
QUICK = {"models": ["mmoe"], "batch_sizes": [512], "steps": 20}
PEER_HINT = "pip install -e '.[bench]'"
PEER_NEEDS = {"torchjd-nashmtl": "torchjd with cvxpy and ecos",
              "torchjd-upgrad": "torchjd with quadprog and qpsolvers"}


class TorchJD:
    """A TorchJD aggregator with torch's Adam, as TorchJD's documentation trains multi-task
    models: mtl_backward on the shared representation, then jac_to_grad on the shared
    parameters."""

    def __init__(self, key: str, params, n_tasks: int, lr: float, weight_decay: float):
        from torchjd.aggregation import NashMTL, UPGrad

        self.aggregator = NashMTL(n_tasks=n_tasks) if key == "torchjd-nashmtl" else UPGrad()
        self.params = list(params)
        self.opt = torch.optim.Adam(self.params, lr=lr, weight_decay=weight_decay)

    def step(self, loss_fn) -> None:
        from torchjd.autojac import jac_to_grad, mtl_backward

        self.opt.zero_grad(set_to_none=True)
        losses, representation = loss_fn(True)
        # The demo models' representation is [experts' output, gates' input], the second an
        # ancestor of the first: TorchJD differentiates each feature in its own pass, so the
        # graph between them must outlive the first pass.
        mtl_backward(losses, features=representation, retain_graph=True)
        shared = [p for p in self.params if getattr(p, "jac", None) is not None]
        jac_to_grad(shared, self.aggregator)
        self.opt.step()


class KBackward:
    """The floor of every method that needs each task's gradient of the shared parameters
    (PUB, NashMTL, TorchJD): forward, one ``autograd.grad`` per task over every parameter, their
    sum into ``.grad`` and torch's Adam; no balancing. PUB's cost over this row is what PUB
    itself adds; this row's cost over LS is the K − 1 extra passes through the shared trunk."""

    def __init__(self, params, lr: float, weight_decay: float):
        self.params = [p for p in params if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=lr, weight_decay=weight_decay)

    def step(self, loss_fn) -> None:
        self.opt.zero_grad(set_to_none=True)
        losses = loss_fn(False)
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, self.params, retain_graph=i + 1 < len(losses),
                                        allow_unused=True)
            for p, g in zip(self.params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        self.opt.step()


def keep_heap() -> bool:
    """Stop glibc's malloc from returning the top of the heap to the system and from mapping
    large blocks of its own, so that freed activations are reused instead of faulted in again at
    every step: the mmap threshold at 1 GiB (or 32 MiB, the most older glibc versions take), then
    the trim threshold at 1 GiB. Returns whether both took (glibc only; elsewhere nothing
    changes). Setting either turns off glibc's own adjustment of both, so the trim threshold is
    set only once the mmap threshold has taken."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except Exception:  # no C library by that name (Windows), or no mallopt (macOS, musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (mallopt(m_mmap_threshold, 1 << 30) or mallopt(m_mmap_threshold, 32 << 20)):
        return False
    return bool(mallopt(m_trim_threshold, 1 << 30))


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where the resource module is missing)."""
    return 0 if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peer_problems() -> dict:
    """Why each TorchJD peer cannot run here, or None for one that can. Each aggregator is built
    and applied once to a tiny matrix, so that a missing extra (cvxpy and ECOS for NashMTL,
    quadprog for UPGrad) shows here rather than as an error inside TorchJD mid-run."""
    try:
        from torchjd.aggregation import NashMTL, UPGrad
    except ImportError as exc:
        reason = ("torchjd not installed" if getattr(exc, "name", None) == "torchjd"
                  else f"torchjd could not be imported ({exc})")
        return {key: reason for key in PEERS}
    make = {"torchjd-nashmtl": lambda: NashMTL(n_tasks=2), "torchjd-upgrad": UPGrad}
    jacobian = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    problems = {}
    for key in PEERS:
        try:
            make[key]()(jacobian)
            problems[key] = None
        except Exception as exc:  # ImportError, NameError, cvxpy's or qpsolvers' own errors
            # The first clause of the message says what is wrong; the rest can be long.
            text = (str(exc).strip().splitlines() or [""])[0].split("; ")[0]
            text = text if len(text) <= 160 else text[:157] + "..."
            problems[key] = f"{type(exc).__name__}: {text}; it needs {PEER_NEEDS[key]}"
    return problems


def model_names(text: str) -> list:
    names = [t.strip().lower() for t in text.split(",")]
    for name in names:
        if name not in MODELS:
            raise argparse.ArgumentTypeError(
                f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return names


def measure(model_name, batch_size, methods, steps, warmup, data, device) -> dict:
    opts = MethodOptions(lr=3e-3, weight_decay=1e-6)
    runs = {}
    for key in methods:
        torch.manual_seed(0)
        model = build_model(model_name, data, **MODEL_KWARGS).to(device)
        if key in PEERS:
            runs[key] = (model, TorchJD(key, model.parameters(), data.n_tasks, opts.lr,
                                        opts.weight_decay))
        elif key == "k-backward":
            runs[key] = (model, KBackward(model.parameters(), opts.lr, opts.weight_decay))
        else:
            runs[key] = (model, Method(key, model.parameters(), data.n_tasks, opts))
    gen = torch.Generator().manual_seed(0)
    batches = [type(b)(*(t.to(device) for t in b)) for b in
               data.train.batches(batch_size, shuffle=True, generator=gen, drop_last=True)]
    times = {key: [] for key in methods}
    faults = {key: [] for key in methods}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        for key, (model, method) in runs.items():
            def loss_fn(with_rep, model=model, batch=batch):
                return model.task_losses(batch, with_representation=with_rep)

            sync()
            f0 = minor_faults()
            t0 = time.perf_counter()
            method.step(loss_fn)
            sync()
            if i >= warmup:
                times[key].append(time.perf_counter() - t0)
                faults[key].append(minor_faults() - f0)
    rows = {}
    for key in methods:
        rows[key] = {"label": LABELS[key], "median_ms": 1e3 * float(np.median(times[key])),
                     "paired_over_ls": paired_ratio(times[key], times["ls"]),
                     "page_faults_per_step": float(np.mean(faults[key]))}
    result = {"model": model_name, "batch_size": batch_size, "steps": steps, "rows": rows,
              "pub_over_k_backward": paired_ratio(times["pub"], times["k-backward"])}
    if "torchjd-nashmtl" in times:
        result["torchjd_nashmtl_over_pub"] = paired_ratio(times["torchjd-nashmtl"], times["pub"])
    return result


def verdicts(results, problems) -> list:
    """One line per model, batch size and target: the paired ratio rounded to two decimals (as
    printed), compared with the target; passed is None where the ratio was not measured."""
    lines = []
    for r in results:
        value = float(f"{r['rows']['pub']['paired_over_ls']:.2f}")
        lines.append({"model": r["model"], "batch_size": r["batch_size"], "target": "PUB / LS",
                      "value": value, "limit": TARGETS["pub_over_ls_max"], "relation": "<=",
                      "passed": value <= TARGETS["pub_over_ls_max"], "reason": None})
        line = {"model": r["model"], "batch_size": r["batch_size"],
                "target": "TorchJD NashMTL / PUB", "value": None,
                "limit": TARGETS["torchjd_nashmtl_over_pub_min"], "relation": ">=",
                "passed": None, "reason": problems.get("torchjd-nashmtl")}
        if "torchjd_nashmtl_over_pub" in r:
            line["value"] = float(f"{r['torchjd_nashmtl_over_pub']:.2f}")
            line["passed"] = line["value"] >= TARGETS["torchjd_nashmtl_over_pub_min"]
        lines.append(line)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="MMoE, batch 512, 20 steps (options given with it are kept)")
    ap.add_argument("--models", type=model_names, default=None,
                    help="comma-separated, of mmoe, ple (default mmoe,ple; mmoe with --quick)")
    ap.add_argument("--batch-sizes", type=list_of(positive_int), default=None,
                    help="comma-separated, each at most the training set's rows (default "
                         "512,4096; 512 with --quick)")
    ap.add_argument("--steps", type=positive_int, default=None,
                    help="timed steps per method (default 60; 20 with --quick)")
    ap.add_argument("--warmup", type=non_negative_int, default=5,
                    help="untimed steps per method first (default 5)")
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None,
                    help="write the results here (its folder is created)")
    ap.add_argument("--malloc-defaults", action="store_true",
                    help="leave glibc's heap trimming on (see the module's docstring)")
    args = ap.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.json = check_json_path(ap, args.json)
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as exc:
        ap.error(f"argument --device: {exc}")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"argument --device: cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_train_step: no CUDA device; nothing measured")
        return 0
    data = load_adult()
    too_large = [b for b in args.batch_sizes if b > len(data.train)]
    if too_large:
        ap.error(f"argument --batch-sizes: {too_large[0]} is larger than the training set "
                 f"({len(data.train)} rows)")
    torch.set_num_threads(args.threads)
    heap_kept = False if args.malloc_defaults else keep_heap()
    warnings.filterwarnings("ignore", module="torchjd")
    warnings.filterwarnings("ignore", message=".*DPP.*")
    warnings.filterwarnings("ignore", message=".*inaccurate.*")
    np.seterr(divide="ignore", invalid="ignore")  # TorchJD's NashMTL on a singular Gramian
    problems = peer_problems()
    methods = OURS + [key for key in PEERS if problems[key] is None]
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "processor": cpu_name(), "device": str(device), "python": platform.python_version(),
           "torch": torch.__version__, "pub_native": pub_native.__version__,
           "torch_threads": torch.get_num_threads(),
           "malloc": "heap kept (mallopt trim and mmap thresholds)" if heap_kept
           else "defaults",
           "peers_skipped": {key: reason for key, reason in problems.items() if reason}}
    no_torchjd = all(r == "torchjd not installed" for r in problems.values())
    print(f"training step (forward + backward + step) on census income, {env['processor']}, "
          f"{env['device']}, {env['torch_threads']} torch thread(s), torch {env['torch']}; "
          f"medians of {args.steps} round-robin steps; malloc: {env['malloc']}"
          + (f" (torchjd not installed: peers skipped; {PEER_HINT})" if no_torchjd else ""))
    if not no_torchjd:
        for key, reason in env["peers_skipped"].items():
            print(f"{LABELS[key]} skipped: {reason}: {PEER_HINT}")
    header = f"{'model':<5} {'batch':>5} | " + " | ".join(f"{LABELS[m]:>15}" for m in methods)
    print(header + "\n" + "-" * len(header))
    results = []
    for model_name in args.models:
        for bs in args.batch_sizes:
            r = measure(model_name, bs, methods, args.steps, args.warmup, data, device)
            results.append(r)
            cells = [f"{r['rows'][m]['median_ms']:>6.2f}ms {r['rows'][m]['paired_over_ls']:>5.2f}x"
                     for m in methods]
            print(f"{model_name:<5} {bs:>5} | " + " | ".join(f"{c:>15}" for c in cells),
                  flush=True)
    print("\n(ms: median step; x: median over rounds of the time relative to LS's; the ratios "
          "below are paired the same way)")
    print("minor page faults per step: " + "; ".join(
        f"{r['model']} {r['batch_size']} " + " ".join(
            f"{LABELS[m]} {r['rows'][m]['page_faults_per_step']:.0f}" for m in methods)
        for r in results))
    for r in results:
        pub = r["rows"]["pub"]
        floor = r["rows"]["k-backward"]
        line = (f"{r['model']} batch {r['batch_size']}: PUB {pub['paired_over_ls']:.2f}x LS "
                f"(target ≤ {TARGETS['pub_over_ls_max']}x; K backward passes alone "
                f"{floor['paired_over_ls']:.2f}x, PUB over them "
                f"{r['pub_over_k_backward']:.2f}x)")
        if "torchjd_nashmtl_over_pub" in r:
            line += (f"; {r['torchjd_nashmtl_over_pub']:.2f}x faster than TorchJD NashMTL "
                     f"(target ≥ {TARGETS['torchjd_nashmtl_over_pub_min']}x)")
        print(line)
    verdict = verdicts(results, problems)
    print("\ntargets (paired ratios as printed; PASS/FAIL is reported, not in the exit status):")
    for v in verdict:
        rel = "≤" if v["relation"] == "<=" else "≥"
        where = f"  {v['model']:<5} {v['batch_size']:>5}  {v['target']:<21}"
        if v["passed"] is None:
            print(f"{where}  not measured ({v['reason']}: {PEER_HINT})")
        else:
            print(f"{where} {v['value']:6.2f}x  (target {rel} {v['limit']}x)  "
                  f"{'PASS' if v['passed'] else 'FAIL'}")
    if args.json:
        write_json(args.json, {"environment": env, "results": results, "targets": TARGETS,
                               "verdict": verdict, "warmup": args.warmup}, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
