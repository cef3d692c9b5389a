"""Fuzzed boundary between torch and the native core (SPEC section 7): random mixes of parameter
dtypes, state dtypes and layouts, torch-made checkpoints and dtype changes mid-run, each batch of
cases in a subprocess so that an abort fails the test instead of killing the suite. Every case
must end in a correct step (native == reference) or in the same clear error on both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
# Seeded random cases, all drawn alike: the quick suite runs the first batch, CI all three.
BATCHES = [(0, 40, []), (40, 40, [pytest.mark.slow]), (80, 40, [pytest.mark.slow])]


@pytest.mark.parametrize("first,count", [pytest.param(f, c, marks=m, id=f"cases{f}-{f + c - 1}")
                                         for f, c, m in BATCHES])
def test_boundary_cases_end_in_a_correct_step_or_a_clear_error(first, count):
    proc = subprocess.run([sys.executable, str(HERE / "boundary_cases.py"), str(first),
                           str(count)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"the case runner died (code {proc.returncode}):\n" \
                                 f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == count, proc.stderr[-3000:]
    bad = [r for r in results if r["result"] not in ("ok", "error")]
    assert not bad, json.dumps(bad, indent=1)[:4000]
    # The fuzz must exercise real steps, not only errors.
    assert sum(r["result"] == "ok" for r in results) >= count // 3
