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
                     batch_name: str = "q", *, values: bool = True) -> int | None:
    """Validate packed-sequence offsets. Returns the number of sequences N (or None).

    `values=False`: shape/dtype checks only (the caller runs :func:`cu_seqlens_values` itself)."""
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
    if values and value_checks_enabled(cu):
        cu_seqlens_values(name, cu, total)
    return cu.numel() - 1


def cu_seqlens_values(name: str, cu: torch.Tensor, total: int) -> None:
    """The value checks of packed-sequence offsets (one read of `cu`): 0 first, non-decreasing,
    `total` last."""
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    if any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {vals}")
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] must equal the packed length {total}, got {vals[-1]}")


# Value checks read small tensors with one `tolist()` (about a µs on CPU; one transfer on CUDA)
# and reduce larger ones on the device first (one transfer of the reduced values).
SMALL_READ = 256


def int_range(t: torch.Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty integer tensor, read in one transfer."""
    flat = t if t.dim() == 1 else t.reshape(-1)
    if t.numel() <= SMALL_READ:
        vals = flat.tolist()
        return min(vals), max(vals)
    lo, hi = torch.stack(torch.aminmax(flat)).tolist()
    return lo, hi


def check_index(name: str, idx: torch.Tensor, length: int, limit: int, limit_name: str,
                dtypes: Sequence[torch.dtype] = (torch.int32,), *, values: bool = True) -> None:
    """An integer index tensor `[length]` whose values must lie in `0..limit-1`.

    `values=False`: dtype/shape checks only (the caller runs :func:`index_values` itself)."""
    expect_tensor(name, idx)
    if idx.dtype not in dtypes:
        names = " or ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} must be {names}, got {dtype_name(idx.dtype)}")
    if idx.dim() != 1 or idx.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {shape_str(idx)}")
    if values and value_checks_enabled(idx):
        index_values(name, idx, limit, limit_name)


def index_values(name: str, idx: torch.Tensor, limit: int, limit_name: str) -> tuple[int, int] | None:
    """The value check of :func:`check_index`; returns (min, max), None for an empty index."""
    if idx.numel() == 0:
        return None
    lo, hi = int_range(idx)
    if lo < 0 or hi >= limit:
        raise ValueError(f"{name} values must be in 0..{limit - 1} ({limit_name}), "
                         f"got values in {lo}..{hi}")
    return lo, hi


def check_window(window: Any, causal: bool) -> tuple[int, int]:
    """`window=(left, right)` of the softmax ops -> a pair of Python ints, `-1` = unbounded side.

    `None` means `(-1, -1)`. With `causal`, a right bound is redundant (`s <= p` already holds),
    so it is normalised to `-1`, and `(-1, *)` becomes `(-1, -1)` (no window).
    """
    if window is None:
        return (-1, -1)
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) for w in window)):
        got = type(window).__name__ if not isinstance(window, (tuple, list)) else repr(tuple(window))
        raise TypeError(f"window must be None or a pair of ints (left, right), got {got}")
    left, right = int(window[0]), int(window[1])
    if left < -1 or right < -1:
        raise ValueError(f"window must be (left, right) with each side >= 0, or -1 for unbounded, "
                         f"got ({left}, {right})")
    if causal:
        right = -1
    return (left, right)


def check_softcap(softcap: Any) -> float:
    """`softcap=c`: None or 0 -> 0.0 (off); else a finite float > 0."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be None or a float > 0, got {type(softcap).__name__}")
    value = float(softcap)
    if not 0 <= value < float("inf"):
        raise ValueError(f"softcap must be None, 0 (off) or a finite float > 0, got {softcap}")
    return value


def check_block_table(block_table: Any, batch: int, num_blocks: int, block_size: int,
                      lengths: torch.Tensor | None, new_tokens: int) -> torch.Tensor:
    """A paged-cache `block_table`: int32 `[B, max_blocks]`; returns it contiguous.

    Value checks (where :func:`value_checks_enabled`): every entry a row uses (blocks holding its
    first `lengths[b] + new_tokens` tokens) is in `0..num_blocks - 1`, the lengths fit the
    table's capacity, and no two rows append into the same cache slot. Entries a row does not
    use are never read and may hold anything (e.g. -1). `lengths=None`: shape checks only.
    """
    expect_tensor("block_table", block_table)
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {dtype_name(block_table.dtype)}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must have shape [B, max_blocks] with B = {batch} (q's batch "
                         f"size), got {shape_str(block_table)}")
    if lengths is not None and batch > 0 and value_checks_enabled(block_table, lengths):
        block_table_values(block_table, num_blocks, block_size, lengths, new_tokens)
    return block_table.contiguous()


def _table_capacity_error(b: int, longest: int, max_blocks: int, block_size: int) -> ValueError:
    return ValueError(f"cache_seqlens[{b}] + Tq = {longest} tokens do not fit in block_table "
                      f"row {b}: max_blocks * block_size = {max_blocks} * "
                      f"{block_size} = {max_blocks * block_size}")


def _table_entry_error(b: int, j: int, value: int, num_blocks: int) -> ValueError:
    return ValueError(f"block_table[{b}, {j}] = {value} is used by row {b} but "
                      f"is not a block of the cache: values must be in 0..{num_blocks - 1} "
                      f"(num_blocks = k_cache.shape[0])")


_SHARED_SLOT = ("block_table makes two rows append k_new/v_new into the same cache "
                "slot; rows may share blocks they only read, not blocks they write")


def block_table_values(block_table: torch.Tensor, num_blocks: int, block_size: int, lengths: torch.Tensor,
                       new_tokens: int) -> None:
    """The value checks of :func:`check_block_table` (its shape checks passed; the caller decides
    that value checks run): a small table (at most `SMALL_READ` entries) is read once and checked
    on the host, a larger one is reduced on the device first."""
    if lengths.numel() == 0:
        return
    if block_table.numel() <= SMALL_READ and lengths.numel() <= SMALL_READ:
        _block_table_values_small(block_table, num_blocks, block_size, lengths, new_tokens)
        return
    capacity = block_table.shape[1] * block_size
    batch = lengths.shape[0]
    total = lengths.long() + new_tokens
    longest = int(total.max())
    if longest > capacity:
        b = int(total.argmax())
        raise _table_capacity_error(b, longest, block_table.shape[1], block_size)
    # Row b uses its first need[b] entries: one min/max over the columns every row uses, and one
    # more, masked, only for ragged rows (no masked gather of the whole table on every call).
    dev = block_table.device
    need = total.add(block_size - 1).div_(block_size, rounding_mode="floor")
    lo_need, hi_need = int_range(need)
    out_of_range = False
    if lo_need > 0:
        lo, hi = int_range(block_table[:, :lo_need])
        out_of_range = lo < 0 or hi >= num_blocks
    if not out_of_range and hi_need > lo_need:
        tail = torch.arange(lo_need, hi_need, device=dev)[None] < need[:, None]
        lo, hi = int_range(torch.where(tail, block_table[:, lo_need:hi_need], 0))  # 0: fill, no block
        out_of_range = lo < 0 or hi >= num_blocks  # (num_blocks = 0: some used entry is bad anyway)
    if out_of_range:
        used = torch.arange(block_table.shape[1], device=dev)[None] < need[:, None]
        bad = used & ((block_table < 0) | (block_table >= num_blocks))
        b, j = (int(i) for i in bad.nonzero()[0])
        raise _table_entry_error(b, j, int(block_table[b, j]), num_blocks)
    if new_tokens > 0:
        pos = lengths.long()[:, None] + torch.arange(new_tokens, device=lengths.device)
        rows = torch.arange(batch, device=lengths.device)[:, None].expand_as(pos)
        slots = block_table[rows, pos // block_size].long() * block_size + pos % block_size
        if torch.unique(slots).numel() != slots.numel():
            raise ValueError(_SHARED_SLOT)


def _block_table_values_small(block_table: torch.Tensor, num_blocks: int, block_size: int,
                              lengths: torch.Tensor, new_tokens: int) -> None:
    """The value checks of :func:`check_block_table` for a small table (at most `SMALL_READ`
    entries): one read of the table and one of the lengths, the same checks and messages as the
    on-device version."""
    rows, totals = block_table.tolist(), [n + new_tokens for n in lengths.tolist()]
    max_blocks = block_table.shape[1]
    capacity = max_blocks * block_size
    longest = max(totals)
    if longest > capacity:
        b = totals.index(longest)
        raise _table_capacity_error(b, longest, max_blocks, block_size)
    for b, (row, total) in enumerate(zip(rows, totals)):
        for j in range(max(0, -(-total // block_size))):  # the blocks of the row's first `total` tokens
            if not 0 <= row[j] < num_blocks:
                raise _table_entry_error(b, j, row[j], num_blocks)
    if new_tokens > 0:
        slots = [row[p // block_size] * block_size + p % block_size
                 for row, total in zip(rows, totals) for p in range(total - new_tokens, total)]
        if len(set(slots)) != len(slots):
            raise ValueError(_SHARED_SLOT)
