"""The README's "PUB in your training loop" examples run, in order, as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def training_loop_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("<!-- training-loop-examples:start -->")[1].split(
        "<!-- training-loop-examples:end -->")[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_training_loop_examples_run():
    blocks = training_loop_blocks()
    assert len(blocks) >= 5
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README block {i}", "exec"), namespace)  # noqa: S102
        except Exception as exc:  # name the block that failed
            raise AssertionError(f"README training-loop block {i} failed:\n{block}") from exc
