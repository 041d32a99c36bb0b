"""The compiled extension (csrc/): the ``cuda`` backend of the decode/inference ops.

Importing this package registers the ``cuda`` backend implementations and compiles nothing; the
extension is built on first use (one line on stderr while it compiles, then cached) or ahead of
time with ``python -m attnkit.native --build``. CPU tensors run the C++ kernels in
``csrc/cpu``; CUDA tensors run ``csrc/cuda`` when torch has CUDA. See ``docs/native.md``.

Ops served (contract signatures of ``docs/contracts.md``): ``attention_decode``,
``loki_attention_decode``, ``linear_attention_step``, ``qk_norm`` (forward only), plus the extra
in-place :func:`qk_norm_rope_`.
"""

from __future__ import annotations

import os

import torch

from .. import dispatch
from . import _build
from ._ops import qk_norm_rope_

__all__ = ["is_built", "load", "qk_norm_rope_", "unavailable_reasons"]

# Below the Triton backend (20) on CUDA, above the reference (0) on the CPU, where the native CPU
# kernels are the fast path (Triton runs CPU tensors only in its interpreter, never automatically).
PRIORITY = 10
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICES = ("cpu", "cuda")


def unavailable_reasons(inputs: dispatch.Inputs) -> list[str]:
    """Why the extension cannot serve this input's device, or ``[]``.

    Cheap: never compiles. "Not built yet" is an accepting state when the sources and the
    compilers exist; the first call that runs the backend builds it. A build that failed (in
    this process or an earlier one) is reported with the path of its log.
    """
    device = inputs.device.type
    if device not in DEVICES:
        return [f"runs on CPU and CUDA tensors, got {device}"]
    if os.environ.get("ATTNKIT_DISABLE_NATIVE") == "1":
        return ["disabled by ATTNKIT_DISABLE_NATIVE=1"]
    return _build.static_reasons(device)


def load(*, verbose: bool = False):
    """Build (if needed) and return the extension module; raises RuntimeError if the build fails."""
    return _build.module(verbose=verbose)


def is_built() -> bool:
    """Whether the extension is loaded or cached on disk (so that using it will not compile)."""
    return _build.is_built()


# --------------------------------------------------------------------------------- registrations


def _cuda_head_dims(inputs: dispatch.Inputs, most: int, vector_loads: bool = False) -> list[str]:
    """Head-dim limits of the CUDA kernels (16-byte vector loads); the CPU kernels take any."""
    if inputs.device.type != "cuda":
        return []
    step = 4 if inputs.dtype == torch.float32 else 8
    if all(d <= most and not (vector_loads and d % step) for d in inputs.head_dims):
        return []
    what = f"up to {most}" + (f" and multiples of {step} for {str(inputs.dtype).replace('torch.', '')}"
                              if vector_loads else "")
    return [f"the CUDA kernel supports head dims {what}, got {list(inputs.head_dims)}"]


def _check_attention_decode(inputs: dispatch.Inputs) -> list[str]:
    return _cuda_head_dims(inputs, 256, vector_loads=True)


def _check_loki(inputs: dispatch.Inputs) -> list[str]:
    return _cuda_head_dims(inputs, 256, vector_loads=True)


def _check_linear_step(inputs: dispatch.Inputs) -> list[str]:
    return _cuda_head_dims(inputs, 512)


def _check_qk_norm(inputs: dispatch.Inputs) -> list[str]:
    if inputs.has("grad"):
        return ["the native qk_norm is forward-only (inference) and an input requires grad; "
                "use backend='reference' or 'triton', or run under torch.no_grad()"]
    return []


_COMMON = dict(priority=PRIORITY, devices=DEVICES, dtypes=DTYPES)
dispatch.register("attention_decode", "cuda", "attnkit.native._ops:attention_decode",
                  check=_check_attention_decode, **_COMMON)
dispatch.register("loki_attention_decode", "cuda", "attnkit.native._ops:loki_attention_decode",
                  check=_check_loki, **_COMMON)
dispatch.register("linear_attention_step", "cuda", "attnkit.native._ops:linear_attention_step",
                  check=_check_linear_step, **_COMMON)
dispatch.register("qk_norm", "cuda", "attnkit.native._ops:qk_norm", check=_check_qk_norm, **_COMMON)
