"""The README's Python examples run as written (all ```python blocks, in order, one namespace,
in a temporary directory)."""
import pathlib
import re

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_readme_examples_run(capsys, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "salcompile plan" in out and "weight" in out
    assert (tmp_path / "artifacts" / "checkpoint").exists() and (tmp_path / "step.onnx").exists()
    assert 0 < namespace["loss"] < 10
