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


ROOT = README.parent


def _project_texts() -> list[Path]:
    return (
        [README]
        + sorted((ROOT / "docs").rglob("*.md"))
        + sorted((ROOT / "configs").rglob("*.yaml"))
        + sorted((ROOT / "src").rglob("*.md"))
        + sorted((ROOT / "src").rglob("*.py"))
    )


def test_docs_cite_only_the_repository_and_method_md_has_each_cited_section():
    headings = re.findall(r"^#+ (.*)$", (ROOT / "docs" / "method.md").read_text(), flags=re.M)
    for path in _project_texts():
        text = path.read_text()
        # The method's spec is docs/method.md; no file outside the repository is cited.
        assert not re.search(r"\bSPEC\b", text), f"{path} cites a SPEC outside the repository"
        for section in re.findall(r'docs/method\.md[,:]? *\(?"([^"]+)"', text):
            assert any(h.startswith(section) for h in headings), (path, section)


def test_readme_numbers_name_the_machine_they_were_measured_on():
    text = " ".join(README.read_text().split())
    assert "Intel Xeon with 2 logical CPUs and torch 2.13.0+cpu" in text
    assert "differ in the third decimal" in text
    digits = " ".join((ROOT / "docs" / "digits-task.md").read_text().split())
    assert "reproduces the shipped files exactly" not in digits
    assert "same torch build and CPU type gives byte-identical files" in digits
