"""The code in docs/writing-a-pass.md runs as written, and its custom pass stays short."""
import re
from pathlib import Path

DOC = Path(__file__).parent.parent / "docs" / "writing-a-pass.md"


def test_writing_a_pass_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 3
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(DOC), "exec"), namespace)  # asserts inside the doc must hold
    assert "fold_conv_scale" in namespace["fxforge"].available_passes()


def test_the_custom_pass_is_at_most_25_lines():
    first = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    pass_lines = [line for line in first[first.index("SCALED_CONV ="):].splitlines() if line.strip()]
    assert len(pass_lines) <= 25
