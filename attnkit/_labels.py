"""What a backend name means on a given device, in words.

Backend names are about where the code comes from, not where it runs: the ``cuda`` backend is the
compiled extension (``csrc/``), which has C++ kernels for CPU tensors as well as CUDA kernels; the
``triton`` backend runs on CPU tensors only in Triton's interpreter. ``explain`` and the benchmark
tables say what actually runs.
"""

from __future__ import annotations

import torch

_WHAT = {
    ("reference", "cpu"): "PyTorch ops on the CPU",
    ("reference", "cuda"): "PyTorch ops on the GPU",
    ("triton", "cpu"): "Triton kernels in the interpreter on the CPU, for tests (TRITON_INTERPRET=1)",
    ("triton", "cuda"): "Triton kernels on the GPU",
    ("cuda", "cpu"): "compiled C++ CPU kernels",
    ("cuda", "cuda"): "compiled CUDA kernels",
}

# Short tags for table cells and plot legends, where the name alone would mislead.
_TAG = {("cuda", "cpu"): "C++ CPU", ("triton", "cpu"): "interpreter"}


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type if not isinstance(device, torch.device) else device.type


def what_runs(backend: str, device: torch.device | str) -> str:
    """``"compiled C++ CPU kernels"`` for ``("cuda", "cpu")``, and so on."""
    dev = _device_type(device)
    return _WHAT.get((backend, dev), f"{backend} kernels on {dev}")


def backend_label(backend: str, device: torch.device | str) -> str:
    """``"cuda backend: compiled C++ CPU kernels"``: the backend's name and what runs."""
    return f"{backend} backend: {what_runs(backend, device)}"


def short_tag(backend: str, device: torch.device | str) -> str | None:
    """A few words to put after a backend's name where it would mislead (None: the name says it)."""
    return _TAG.get((backend, _device_type(device)))
