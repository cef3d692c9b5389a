"""The float16 conversions of the native core (numeric.h) against the processor's, bitwise, for
every float32 and every float16 value: compiled with the system C++ compiler as the CPU kernels
are (x86-64-v3 and the x86-64 baseline), in a subprocess. Slow (about 25 s): CI runs it."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "python_tests", "native", "half_exhaustive.cpp")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


FLAGS = _cpu_flags()
V3 = pytest.param(["-O2", "-ftree-vectorize", "-march=x86-64-v3"], id="x86-64-v3",
                  marks=pytest.mark.skipif(not {"avx2", "fma", "bmi2"} <= FLAGS,
                                           reason="an x86-64-v3 binary needs AVX2, FMA, BMI2"))
BASELINE = pytest.param(["-O1", "-ftree-vectorize", "-march=x86-64"], id="baseline")


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or "f16c" not in FLAGS
                    or shutil.which("c++") is None,
                    reason="needs an x86-64 processor with F16C and a C++ compiler")
@pytest.mark.parametrize("flags", [V3, BASELINE])
def test_every_value_converts_as_the_processor_does(tmp_path, flags):
    exe = tmp_path / "half_exhaustive"
    subprocess.run(["c++", "-std=gnu++17", *flags, "-I", os.path.join(ROOT, "csrc", "include"),
                    SOURCE, "-o", str(exe)], check=True, capture_output=True, timeout=120)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "mismatches: 0" in out.stdout, out.stdout
