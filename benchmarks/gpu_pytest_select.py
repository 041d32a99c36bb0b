"""pytest plugin for `benchmarks/gpu_run.sh`: keep only the tests that matter most in a short GPU
window, chosen by parameter *values*, not by generated ids:

* every test parametrized with `torch.bfloat16` (the bf16 kernel parity cases, which the CPU
  interpreter cannot run),
* every test whose name says `recompile` (no recompilation on a new length),
* every test of `tests/test_native.py` (the CUDA kernels of `csrc/`).

    python -m pytest -p benchmarks.gpu_pytest_select tests/...
"""

from __future__ import annotations

import torch


def _selected(item) -> bool:
    if "recompile" in item.name or item.path.name == "test_native.py":
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(v is torch.bfloat16 or (isinstance(v, (tuple, list)) and torch.bfloat16 in v) for v in params.values())


def pytest_collection_modifyitems(config, items):
    keep = [i for i in items if _selected(i)]
    drop = [i for i in items if not _selected(i)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
