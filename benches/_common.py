"""What the benchmark scripts share: argparse types that refuse values a run cannot use (before
anything is measured), the check of a --json path, strict JSON, and the paired ratio of two
methods timed in turn.

The scripts run as ``python benches/<name>.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path


def int_at_least(least: int) -> Callable[[str], int]:
    """An argparse type for an integer >= ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def list_of(item: Callable[[str], object]) -> Callable[[str], list]:
    """An argparse type for a comma-separated list of ``item``s (no empty item)."""

    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"an empty item in {text!r}")
        return [item(part) for part in parts]

    return parse


def json_path_problem(path: Path) -> str | None:
    """Make the folder of a JSON output and check that the file can be written, before anything
    is measured, so that a run does not end on an error. What is wrong, or None. A file made by
    the check is removed again."""
    for folder in path.parents:
        if folder.exists():
            if not folder.is_dir():
                return f"{str(folder)!r} is a file, not a folder"
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        with open(path, "a"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_json_path(ap: argparse.ArgumentParser, path: Path | None) -> Path | None:
    """``path`` with ~ expanded, or an argparse error (exit status 2) when it cannot be
    written."""
    if path is None:
        return None
    path = Path(path).expanduser()
    problem = json_path_problem(path)
    if problem is not None:
        ap.error(f"argument --json: cannot write {str(path)!r}: {problem}")
    return path


def _no_nan(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


def write_json(path: Path, results: dict, indent: int = 2) -> None:
    """Strict JSON: a value that was not measured (NaN) or is infinite is written as null."""
    Path(path).write_text(json.dumps(_no_nan(results), indent=indent, allow_nan=False) + "\n")


def paired_ratio(times, base) -> float:
    """The median over the rounds of a step's time over the base step's time in the same round
    (the two timed in turn, so that a change of the machine's load hits both alike)."""
    return statistics.median(t / b for t, b in zip(times, base, strict=True))
