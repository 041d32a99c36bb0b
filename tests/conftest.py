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
