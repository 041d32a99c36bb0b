"""Input checks shared by every op.

Messages name the argument, what came and what was expected. Shape, dtype and device checks
always run (at trace time under torch.compile); checks that read tensor values run only where
:func:`value_checks_enabled` says so (CPU tensors always; CUDA tensors under ``ATTNKIT_CHECKS=1``;
never while tracing, compiling, exporting or capturing a CUDA graph).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = FLOAT_DTYPES + (torch.float64,)
INDEX_DTYPES = (torch.int32,)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def shape_str(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def expect_tensor(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def expect_ndim(name: str, x: torch.Tensor, ndim: int, layout: str) -> None:
    expect_tensor(name, x)
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got {shape_str(x)}")


def expect_shape(name: str, x: torch.Tensor, shape: Sequence[int], layout: str) -> None:
    expect_tensor(name, x)
    if tuple(x.shape) != tuple(shape):
        want = "[" + ", ".join(str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {layout} = {want}, got {shape_str(x)}")


def expect_float(name: str, x: torch.Tensor, allowed: Iterable[torch.dtype] = REFERENCE_DTYPES) -> None:
    allowed = tuple(allowed)
    if x.dtype not in allowed:
        names = ", ".join(dtype_name(d) for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {dtype_name(x.dtype)}")


def expect_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    first = tensors[0].dtype
    for n, t in zip(names[1:], tensors[1:]):
        if t.dtype != first:
            raise TypeError(f"{n} must have the same dtype as {names[0]} ({dtype_name(first)}), "
                            f"got {dtype_name(t.dtype)}")


def expect_same_device(names: Sequence[str], tensors: Sequence[torch.Tensor | None]) -> None:
    ref_name, ref = names[0], tensors[0]
    for n, t in zip(names[1:], tensors[1:]):
        if t is not None and t.device != ref.device:
            raise ValueError(f"{n} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def expect_heads(q_name: str, h: int, k_name: str, hk: int) -> None:
    if hk < 1 or h % hk != 0:
        raise ValueError(f"{q_name} has {h} heads and {k_name} has {hk}: the number of query heads "
                         f"must be a multiple of the number of key/value heads (H % Hk == 0)")


def expect_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def expect_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return value


def expect_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_float_scale(scale: Any, head_dim: int) -> float:
    """`scale` for ops without a gradient for it: None -> head_dim ** -0.5, else a Python float."""
    if isinstance(scale, torch.Tensor):
        raise TypeError("scale must be a float or None for this op (it has no gradient for scale), "
                        "got a tensor; pass float(scale)")
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def expect_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


def tracing() -> bool:
    """Whether the caller is being traced (torch.compile/dynamo, torch.export, FX tracing) rather
    than run: tensor values are then unknown and must not be read."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def _symbolic(t: torch.Tensor) -> bool:
    """A tensor without readable values: meta, fake (FakeTensor, FunctionalTensor) or proxied."""
    return t.device.type == "meta" or type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter)


def value_checks_enabled(*tensors: torch.Tensor | None) -> bool:
    """Whether checks that read tensor values may run.

    Never while tracing/compiling/exporting (values are unknown; shape and dtype checks still run
    at trace time) or capturing a CUDA graph (reading values would sync); for CUDA tensors only
    under ``ATTNKIT_CHECKS=1`` (each check syncs the device); always for plain CPU tensors.
    """
    if tracing() or any(t is not None and _symbolic(t) for t in tensors):
        return False
    on_cuda = any(t is not None and t.device.type == "cuda" for t in tensors)
    if not on_cuda:
        return True
    if torch.cuda.is_current_stream_capturing():
        return False
    return os.environ.get("ATTNKIT_CHECKS", "0") == "1"


def check_scale(scale: Any, head_dim: int, device: torch.device) -> float | torch.Tensor:
    """`scale`: None -> head_dim ** -0.5; a float; or a 0-dim float tensor (gets a gradient)."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0:
            raise ValueError(f"scale must be a float or a 0-dim tensor, got a tensor of shape {shape_str(scale)}")
        if not scale.is_floating_point():
            raise TypeError(f"scale must be a floating-point tensor, got {dtype_name(scale.dtype)}")
        if scale.device != device:
            raise ValueError(f"scale must be on the same device as q ({device}), got {scale.device}")
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, a 0-dim tensor or None, got {type(scale).__name__}")
    return float(scale)


def check_cu_seqlens(name: str, cu: torch.Tensor | None, total: int, batch: int,
                     batch_name: str = "q") -> int | None:
    """Validate packed-sequence offsets. Returns the number of sequences N (or None)."""
    if cu is None:
        return None
    expect_tensor(name, cu)
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must have shape [N + 1] with N >= 1, got {shape_str(cu)}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {dtype_name(cu.dtype)}")
    if batch != 1:
        raise ValueError(f"with {name}, {batch_name} must be packed with batch size 1 "
                         f"([1, total, H, D]), got batch size {batch}")
    if value_checks_enabled(cu):
        vals = cu.tolist()
        if vals[0] != 0:
            raise ValueError(f"{name} must start at 0, got {vals[0]}")
        if any(b < a for a, b in zip(vals, vals[1:])):
            raise ValueError(f"{name} must be non-decreasing, got {vals}")
        if vals[-1] != total:
            raise ValueError(f"{name}[-1] must equal the packed length {total}, got {vals[-1]}")
    return cu.numel() - 1


def check_index(name: str, idx: torch.Tensor, length: int, limit: int, limit_name: str,
                dtypes: Sequence[torch.dtype] = (torch.int32,)) -> None:
    """An integer index tensor `[length]` whose values must lie in `0..limit-1`."""
    expect_tensor(name, idx)
    if idx.dtype not in dtypes:
        names = " or ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} must be {names}, got {dtype_name(idx.dtype)}")
    if idx.dim() != 1 or idx.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {shape_str(idx)}")
    if value_checks_enabled(idx) and length > 0:
        lo, hi = (int(t) for t in torch.aminmax(idx))
        if lo < 0 or hi >= limit:
            raise ValueError(f"{name} values must be in 0..{limit - 1} ({limit_name}), "
                             f"got values in {lo}..{hi}")
