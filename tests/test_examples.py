"""The examples users copy: every Python block of README.md, and examples/quickstart.ipynb,
executed as they are (in a fresh process, from an empty working directory)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.DOTALL)


def test_readme_has_python_blocks():
    assert readme_python_blocks()


@pytest.mark.parametrize("index", range(len(readme_python_blocks())))
def test_readme_python_block_runs(index, tmp_path):
    code = readme_python_blocks()[index]
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"README block {index} failed:\n{code}\n{result.stderr[-3000:]}"


def test_quickstart_notebook_runs(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import make_quickstart
    finally:
        sys.path.pop(0)
    import nbformat
    notebook = nbformat.read(os.path.join(ROOT, "examples", "quickstart.ipynb"), as_version=4)
    committed = [cell.source for cell in notebook.cells]
    assert committed == [source for _, source in make_quickstart.CELLS], (
        "examples/quickstart.ipynb is out of date: run examples/make_quickstart.py")
    make_quickstart.execute(notebook, str(tmp_path))  # raises on a failing cell
    outputs = [output for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs]
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 2
    assert not any(output.output_type == "error" for output in outputs)
