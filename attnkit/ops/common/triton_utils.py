"""Host-side helpers shared by the Triton launchers of every family."""

from __future__ import annotations

import contextlib
import os

import torch


def interpreted() -> bool:
    """True when kernels run in the Triton CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(x: torch.Tensor) -> str:
    """`tl.dot` input precision: IEEE float32 products for float32 inputs (SPEC: no TF32) unless the
    user enabled TF32 in torch. 16-bit operands ignore it; they get Triton's default ("tf32")."""
    if x.dtype != torch.float32:
        return "tf32"
    return "tf32" if x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def device_guard(x: torch.Tensor):
    """Launch on `x`'s CUDA device (a no-op context on the CPU interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
