"""Test configuration.

Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET=1 must be set before
triton is imported, so it is set here, at collection, before anything imports attnkit's kernels.
With a GPU the same tests run on CUDA.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed_and_isolate(monkeypatch):
    # Fresh random inputs per test, reproducible from the test id's position; no leakage of
    # backend overrides from the caller's environment into tests that rely on the automatic choice.
    torch.manual_seed(0x5EED)
    monkeypatch.delenv("ATTNKIT_BACKEND", raising=False)
    monkeypatch.delenv("ATTNKIT_CHECKS", raising=False)
    yield


@pytest.fixture
def nan_empty(monkeypatch):
    """Every torch.empty / Tensor.new_empty buffer starts as NaN: an element a kernel forgets to
    write shows up as a NaN the golden run does not have."""
    empty, new_empty = torch.empty, torch.Tensor.new_empty

    def nan_fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan_fill(empty(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: nan_fill(new_empty(self, *a, **kw)))
