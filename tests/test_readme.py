"""The README's usage example runs exactly as written.

Blocks fenced ```python run here; ```py blocks need a real pipeline and are illustrations.
"""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})
    assert "torch.Size([1, 1536, 2, 64])" in capsys.readouterr().out
