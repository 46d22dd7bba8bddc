import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md shows a Python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert set(scope["stats"]) >= {"ratio_mean", "kl_mean", "masked_fraction"}
    assert scope["loss"].shape == (4,)
