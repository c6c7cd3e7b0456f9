"""docs/nnx.md: every Python code block runs, in order, in one namespace (the blocks assert what
the page claims: the Linen and NNX twins compute the same logits, training lowers the loss)."""

import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "docs" / "nnx.md"


def test_every_code_block_of_the_nnx_page_runs():
    blocks = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)
    assert len(blocks) >= 5
    namespace: dict = {"__name__": "docs_nnx"}
    for index, block in enumerate(blocks):
        exec(compile(block, f"{PAGE.name}, block {index}", "exec"), namespace)  # noqa: S102
