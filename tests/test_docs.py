"""The code in docs/writing-a-pass.md runs as written."""
import re
from pathlib import Path

DOC = Path(__file__).parent.parent / "docs" / "writing-a-pass.md"


def test_writing_a_pass_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(DOC), "exec"), namespace)  # asserts inside the doc must hold
    assert "fold_conv_scale" in namespace["fxforge"].available_passes()
