"""The README's examples run as written: every ```python block is executed on the CPU in a fresh
interpreter (a new user's `python`, without the test suite's TRITON_INTERPRET), and `import
attnkit` alone makes `attnkit.nn` available (issue 9, defect 4)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _run(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ATTNKIT_BACKEND")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, as on a machine without a GPU
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_readme_has_python_blocks():
    blocks = python_blocks(README.read_text())
    assert blocks, "the README has no ```python block"
    assert all("import" in b for b in blocks), "every README python block is complete (imports what it uses)"


@pytest.mark.parametrize("index", range(len(python_blocks(README.read_text()))))
def test_readme_python_block_runs_on_cpu(index):
    block = python_blocks(README.read_text())[index]
    r = _run(block)
    assert r.returncode == 0, f"README python block {index} failed:\n{block}\n--- stderr:\n{r.stderr[-3000:]}"


def test_import_attnkit_exposes_nn():
    # A fresh interpreter: in this process some other test may already have imported attnkit.nn.
    r = _run("import attnkit, sys\n"
             "assert 'attnkit.nn' not in sys.modules, 'attnkit.nn is imported lazily'\n"
             "assert attnkit.nn.MultiheadAttention.__name__ == 'MultiheadAttention'\n"
             "assert 'nn' in dir(attnkit)\n"
             "from attnkit import nn; assert nn is attnkit.nn\n"
             "try:\n    attnkit.no_such_thing\nexcept AttributeError as e:\n    assert 'no_such_thing' in str(e)\n"
             "else:\n    raise AssertionError('no AttributeError')\n")
    assert r.returncode == 0, r.stderr[-3000:]
