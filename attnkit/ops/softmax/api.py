"""Public softmax-attention ops: validation, normalisation and dispatch.

Each op is a *prepare* function (registered with :func:`attnkit.dispatch.op`) that checks the
public arguments and returns the normalised keyword arguments of ``docs/contracts.md``, plus the
public function, which hands them to the chosen backend. Semantics: ``docs/softmax.md``.
"""

from __future__ import annotations

from typing import Any

import torch

from ... import dispatch
from ..._validation import (
    REFERENCE_DTYPES,
    block_table_values,
    check_block_table,
    check_cu_seqlens,
    cu_seqlens_values,
    check_float_scale,
    check_index,
    check_scale,
    check_softcap,
    check_window,
    dtype_name,
    expect_bool,
    expect_choice,
    expect_float,
    expect_heads,
    expect_ndim,
    expect_same_device,
    expect_same_dtype,
    expect_shape,
    expect_tensor,
    index_values,
    shape_str,
    value_checks_enabled,
)
from . import reference

__all__ = ["attention", "attention_decode", "qk_norm"]

NORM_MODES = ("rms", "l2")


# ------------------------------------------------------------------------------------ helpers


def _expect_size(name: str, x: torch.Tensor, dim: int, size: int, meaning: str) -> None:
    if x.shape[dim] != size:
        raise ValueError(f"{name} must have {meaning} = {size} in dim {dim}, got shape {shape_str(x)}")


def _check_kv_against_q(q: torch.Tensor, k_name: str, k: torch.Tensor, v_name: str, v: torch.Tensor,
                        length_meaning: str) -> tuple[int, int, int]:
    """Keys `[B, S, Hk, D]` and values `[B, S, Hk, Dv]` that fit the query `[B, *, H, D]`; returns (S, Hk, Dv)."""
    B, _, H, D = q.shape
    S, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if D < 1:
        raise ValueError(f"q must have a head dim D >= 1, got shape {shape_str(q)}")
    _expect_size(k_name, k, 0, B, "the batch size of q (B)")
    _expect_size(k_name, k, 3, D, "the head dim of q (D)")
    _expect_size(v_name, v, 0, B, "the batch size of q (B)")
    _expect_size(v_name, v, 1, S, length_meaning)
    _expect_size(v_name, v, 2, Hk, f"the number of heads of {k_name} (Hk)")
    expect_heads("q", H, k_name, Hk)
    return S, Hk, Dv


def _check_eps(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite float >= 0, got {value}")
    return float(value)


def _check_mode(name: str, value: Any, choices: tuple) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be one of {list(choices)}, got {type(value).__name__}")
    expect_choice(name, value, choices)


def _check_norm_weight(name: str, w: Any, x_name: str, x: torch.Tensor) -> None:
    """A norm weight: `[D]` (D = `x`'s last dim), float32 or `x`'s dtype, on `x`'s device."""
    if w is None:
        return
    expect_tensor(name, w)
    expect_shape(name, w, (x.shape[-1],), f"[D] (D = {x_name}'s head dim)")
    allowed = (torch.float32, x.dtype)
    if w.dtype not in allowed:
        raise TypeError(f"{name} must be float32 or {x_name}'s dtype ({dtype_name(x.dtype)}), "
                        f"got {dtype_name(w.dtype)}")
    expect_same_device((x_name, name), (x, w))


def _needs_grad(*xs: Any) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs)


# ---------------------------------------------------------------------------------- attention


@dispatch.op("attention")
def _prepare_attention(q, k, v, *, causal=False, scale=None, qk_norm=None, q_norm_weight=None,
                       k_norm_weight=None, norm_eps=1e-6, cu_seqlens_q=None, cu_seqlens_k=None,
                       return_lse=False, window=None, softcap=None) -> dispatch.Call:
    expect_ndim("q", q, 4, "[B, T, H, D]")
    expect_ndim("k", k, 4, "[B, S, Hk, D]")
    expect_ndim("v", v, 4, "[B, S, Hk, Dv]")
    expect_float("q", q, REFERENCE_DTYPES)
    expect_same_dtype(("q", "k", "v"), (q, k, v))
    expect_same_device(("q", "k", "v"), (q, k, v))
    B, T, H, D = q.shape
    S, Hk, Dv = _check_kv_against_q(q, "k", k, "v", v, "the length of k (S)")
    causal = expect_bool("causal", causal)
    return_lse = expect_bool("return_lse", return_lse)
    scale = check_scale(scale, D, q.device)
    window = check_window(window, causal)
    softcap = check_softcap(softcap)

    _check_mode("qk_norm", qk_norm, (None, *NORM_MODES))
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None and qk_norm is None:
            raise ValueError(f"{name} was given but qk_norm is None; pass qk_norm='rms' or 'l2' "
                             "to normalise q and k, or drop the weight")
    _check_norm_weight("q_norm_weight", q_norm_weight, "q", q)
    _check_norm_weight("k_norm_weight", k_norm_weight, "k", k)
    norm_eps = _check_eps("norm_eps", norm_eps)

    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        given, missing = (("cu_seqlens_q", "cu_seqlens_k") if cu_seqlens_k is None
                          else ("cu_seqlens_k", "cu_seqlens_q"))
        raise ValueError(f"{given} was given without {missing}: packed variable-length inputs need "
                         "both (pass cu_seqlens_k = cu_seqlens_q for self-attention)")
    n_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, T, B, "q", values=False)
    n_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, S, B, "k", values=False)
    if n_q != n_k:
        raise ValueError(f"cu_seqlens_k must describe as many sequences as cu_seqlens_q ({n_q}), "
                         f"got shape {shape_str(cu_seqlens_k)} ({n_k} sequences)")
    expect_same_device(("q", "cu_seqlens_q", "cu_seqlens_k"), (q, cu_seqlens_q, cu_seqlens_k))

    features = set()
    if cu_seqlens_q is not None:
        features.add("varlen")
    if causal:
        features.add("causal")
    if qk_norm is not None:
        features.add(f"qk_norm={qk_norm}")
    if return_lse:
        features.add("return_lse")
    if window != (-1, -1):
        features.add("window")
    if softcap > 0:
        features.add("softcap")
    if isinstance(scale, torch.Tensor):
        features.add("tensor_scale")
    if _needs_grad(q, k, v, q_norm_weight, k_norm_weight, scale):
        features.add("grad")
    kwargs = dict(q=q, k=k, v=v, causal=causal, scale=scale, qk_norm=qk_norm,
                  q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps,
                  cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, return_lse=return_lse,
                  window=window, softcap=softcap)
    if cu_seqlens_q is not None and value_checks_enabled(cu_seqlens_q, cu_seqlens_k):
        _attention_values(kwargs)
    return dispatch.Call(
        inputs=dispatch.Inputs("attention", q.device, q.dtype, head_dims=(D, Dv),
                               features=frozenset(features)),
        kwargs=kwargs)


def _attention_values(kw: dict) -> None:
    """The checks of `attention` that read tensor values (packed-sequence offsets)."""
    cu_q = kw["cu_seqlens_q"]
    if cu_q is not None:
        cu_seqlens_values("cu_seqlens_q", cu_q, kw["q"].shape[1])
        cu_seqlens_values("cu_seqlens_k", kw["cu_seqlens_k"], kw["k"].shape[1])


_ATTENTION = dispatch.fast("attention", _prepare_attention, _attention_values)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | torch.Tensor | None = None, qk_norm: str | None = None,
              q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
              norm_eps: float = 1e-6, cu_seqlens_q: torch.Tensor | None = None,
              cu_seqlens_k: torch.Tensor | None = None, return_lse: bool = False,
              window: tuple[int, int] | None = None, softcap: float | None = None,
              backend: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with native GQA/MQA and an optional fused per-head QK-norm.

    Query head `h` reads KV head `h // (H // Hk)` (contiguous groups, as in flash-attn); K/V are
    never repeated. With `causal=True` the mask is bottom-right aligned: query `t` sees keys
    `s <= t + (S - T)`; a query row that sees no key (possible when `T > S`) outputs zeros and has
    `lse = -inf`.

    Args:
        q: `[B, T, H, D]` queries (float32, float16, bfloat16; float64 on the reference backend).
        k: `[B, S, Hk, D]` keys, `H % Hk == 0`, same dtype and device as `q`.
        v: `[B, S, Hk, Dv]` values.
        causal: bottom-right causal mask. Default False.
        scale: softmax scale, a float or a 0-dim float tensor (gets a gradient). Default `D ** -0.5`.
        qk_norm: None, `"rms"` (`x * rsqrt(mean(x², -1) + eps) * w`) or `"l2"`
            (`x * rsqrt(sum(x², -1) + eps)`, times `w` if given), applied per head to q and k
            before the scale.
        q_norm_weight: `[D]` weight of the q norm (float32 or q's dtype); default ones.
        k_norm_weight: `[D]` weight of the k norm; default ones.
        norm_eps: `eps` of the norm. Default 1e-6.
        cu_seqlens_q: int32 `[N + 1]` offsets of packed queries (`q` is then `[1, total_q, H, D]`).
        cu_seqlens_k: int32 `[N + 1]` offsets of packed keys/values; given together with
            `cu_seqlens_q`. Each sequence attends only within itself.
        return_lse: also return the natural-log log-sum-exp of the scaled (and capped) scores.
        window: `(left, right)` sliding window (flash-attn's `window_size`): with
            `p = t + S - T`, query `t` sees keys `p - left <= s <= p + right` (and `s <= p` when
            causal); `-1` leaves a side unbounded. None = `(-1, -1)`. Mistral/Gemma's sliding
            window `W` is `(W - 1, 0)`.
        softcap: `c > 0` caps the logits to `c * tanh(scale * q.k / c)` before the softmax
            (Gemma 2). None or 0 = off.
        backend: None (automatic), `"reference"`, `"triton"` or `"cuda"`.

    Returns:
        `o [B, T, H, Dv]` in q's dtype, or `(o, lse)` with `lse [B, H, T]` float32 (float64 for
        float64 inputs; `[1, H, total_q]` for packed inputs).

    Example:
        >>> q = torch.randn(2, 128, 8, 64)
        >>> k, v = torch.randn(2, 128, 2, 64), torch.randn(2, 128, 2, 64)
        >>> o = attnkit.attention(q, k, v, causal=True, qk_norm="rms")  # [2, 128, 8, 64]
    """
    return _ATTENTION(backend, q, k, v, causal, scale, qk_norm, q_norm_weight, k_norm_weight, norm_eps,
                      cu_seqlens_q, cu_seqlens_k, return_lse, window, softcap)


# --------------------------------------------------------------------------- attention_decode


@dispatch.op("attention_decode")
def _prepare_attention_decode(q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None,
                              scale=None, window=None, softcap=None, block_table=None) -> dispatch.Call:
    paged = block_table is not None
    k_layout = "[num_blocks, block_size, Hk, D]" if paged else "[B, Smax, Hk, D]"
    v_layout = "[num_blocks, block_size, Hk, Dv]" if paged else "[B, Smax, Hk, Dv]"
    expect_ndim("q", q, 4, "[B, Tq, H, D]")
    expect_ndim("k_cache", k_cache, 4, k_layout)
    expect_ndim("v_cache", v_cache, 4, v_layout)
    expect_float("q", q, REFERENCE_DTYPES)
    expect_same_dtype(("q", "k_cache", "v_cache"), (q, k_cache, v_cache))
    expect_tensor("cache_seqlens", cache_seqlens)
    for name, x, layout in (("k_new", k_new, "[B, Tq, Hk, D]"), ("v_new", v_new, "[B, Tq, Hk, Dv]")):
        if x is not None:
            expect_ndim(name, x, 4, layout)
    expect_same_device(("q", "k_cache", "v_cache", "cache_seqlens", "k_new", "v_new", "block_table"),
                       (q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                        block_table if isinstance(block_table, torch.Tensor) else None))
    B, Tq, H, D = q.shape
    if paged:
        # Pages: the batch dim of the caches is the block pool, dim 1 the tokens of one block.
        num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
        Hk, Dv = k_cache.shape[2], v_cache.shape[3]
        if D < 1:
            raise ValueError(f"q must have a head dim D >= 1, got shape {shape_str(q)}")
        _expect_size("k_cache", k_cache, 3, D, "the head dim of q (D)")
        _expect_size("v_cache", v_cache, 0, num_blocks, "the number of blocks of k_cache (num_blocks)")
        _expect_size("v_cache", v_cache, 1, block_size, "the block size of k_cache (block_size)")
        _expect_size("v_cache", v_cache, 2, Hk, "the number of heads of k_cache (Hk)")
        expect_heads("q", H, "k_cache", Hk)
        if block_size < 1:
            raise ValueError(f"k_cache must have a block size >= 1 in dim 1 when paged, got shape "
                             f"{shape_str(k_cache)}")
        check_block_table(block_table, B, num_blocks, block_size, None, 0)  # shape and dtype
        Smax = block_table.shape[1] * block_size
    else:
        Smax, Hk, Dv = _check_kv_against_q(q, "k_cache", k_cache, "v_cache", v_cache,
                                           "the capacity of k_cache (Smax)")

    if (k_new is None) != (v_new is None):
        given, missing = ("k_new", "v_new") if v_new is None else ("v_new", "k_new")
        raise ValueError(f"{given} was given without {missing}: pass both to append new tokens, "
                         "or neither")
    if k_new is not None:
        expect_shape("k_new", k_new, (B, Tq, Hk, D), "[B, Tq, Hk, D] (Tq = q's length)")
        expect_shape("v_new", v_new, (B, Tq, Hk, Dv), "[B, Tq, Hk, Dv] (Tq = q's length)")
        expect_same_dtype(("k_cache", "k_new", "v_new"), (k_cache, k_new, v_new))

    scale = check_float_scale(scale, D)
    window = check_window(window, causal=True)  # decode queries are causal: only `left` matters
    softcap = check_softcap(softcap)

    # cache_seqlens may equal Smax (a full cache) when nothing is appended.
    check_index("cache_seqlens", cache_seqlens, B, Smax + 1, "max_blocks * block_size" if paged else "Smax",
                values=False)
    if paged:
        block_table = block_table.contiguous()

    features = {"append"} if k_new is not None else set()
    if window != (-1, -1):
        features.add("window")
    if softcap > 0:
        features.add("softcap")
    if paged:
        features.update(("paged", f"block_size={block_size}"))
    kwargs = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens,
                  k_new=k_new, v_new=v_new, scale=scale, window=window, softcap=softcap,
                  block_table=block_table)
    if value_checks_enabled(cache_seqlens, block_table):
        _attention_decode_values(kwargs)
    return dispatch.Call(
        inputs=dispatch.Inputs("attention_decode", q.device, q.dtype, head_dims=(D, Dv),
                               features=frozenset(features)),
        kwargs=kwargs)


def _attention_decode_values(kw: dict) -> None:
    """The checks of `attention_decode` that read tensor values: `cache_seqlens` in range, room
    for the appended tokens, the paged cache's `block_table` entries (one read of
    `cache_seqlens`, one of a small table; large tables are reduced on the device first)."""
    q, k_cache, lens, block_table = kw["q"], kw["k_cache"], kw["cache_seqlens"], kw["block_table"]
    Tq = q.shape[1]
    new_tokens = Tq if kw["k_new"] is not None else 0
    if block_table is not None:
        num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
        Smax = block_table.shape[1] * block_size
        index_values("cache_seqlens", lens, Smax + 1, "max_blocks * block_size")
        block_table_values(block_table, num_blocks, block_size, lens, new_tokens)
        return
    Smax = k_cache.shape[1]
    got = index_values("cache_seqlens", lens, Smax + 1, "Smax")
    if new_tokens and got is not None and got[1] + Tq > Smax:
        room, b = got[1], int(lens.argmax())
        raise ValueError(f"cache_seqlens[b] + Tq must be <= Smax = {Smax} to append k_new/v_new, "
                         f"got cache_seqlens[{b}] = {room} and Tq = {Tq}: the cache is too small")


_ATTENTION_DECODE = dispatch.fast("attention_decode", _prepare_attention_decode, _attention_decode_values)


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: torch.Tensor, *, k_new: torch.Tensor | None = None,
                     v_new: torch.Tensor | None = None, scale: float | None = None,
                     window: tuple[int, int] | None = None, softcap: float | None = None,
                     block_table: torch.Tensor | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """Decoding attention over a padded KV cache, optionally appending new tokens in place.

    Inference only (no gradients). Row `b` holds `cache_seqlens[b]` valid tokens. If `k_new`/
    `v_new` are given they are first written into the caches at positions
    `cache_seqlens[b] .. cache_seqlens[b] + Tq - 1`, and the queries attend over
    `L_b = cache_seqlens[b] + Tq` tokens; otherwise `L_b = cache_seqlens[b]`. Query `t` sits at
    position `L_b - Tq + t` and sees the keys `s <= L_b - Tq + t` (bottom-right causal, as in
    `attention(causal=True)`); a query that sees no key outputs zeros. `cache_seqlens` is never
    advanced: the caller does that.

    Args:
        q: `[B, Tq, H, D]` queries, `Tq` small (usually 1).
        k_cache: `[B, Smax, Hk, D]` key cache, `H % Hk == 0`, same dtype and device as `q`.
        v_cache: `[B, Smax, Hk, Dv]` value cache.
        cache_seqlens: int32 `[B]`, valid cached tokens per row, in `0..Smax`.
        k_new: `[B, Tq, Hk, D]` keys to append (requires `cache_seqlens[b] + Tq <= Smax`).
        v_new: `[B, Tq, Hk, Dv]` values to append, given together with `k_new`.
        scale: softmax scale (float). Default `D ** -0.5`.
        window: `(left, right)` sliding window as in `attention`: query `t` at position `p` sees
            keys `p - left <= s <= p` (queries are causal, so `right` changes nothing). None =
            unbounded.
        softcap: `c > 0` caps the logits to `c * tanh(scale * q.k / c)`. None or 0 = off.
        block_table: int32 `[B, max_blocks]` for a paged cache: `k_cache` is then
            `[num_blocks, block_size, Hk, D]` (`v_cache` likewise) and token `s` of row `b` lives
            in block `block_table[b, s // block_size]` at offset `s % block_size`; appends go
            through the table. Blocks (and table entries) a row does not use are never read or
            written. Capacity per row: `max_blocks * block_size`.
        backend: None (automatic), `"reference"`, `"triton"` or `"cuda"`.

    Returns:
        `o [B, Tq, H, Dv]` in q's dtype.

    Example:
        >>> k_cache, v_cache = torch.zeros(4, 256, 2, 64), torch.zeros(4, 256, 2, 64)
        >>> lens = torch.tensor([10, 0, 37, 255], dtype=torch.int32)
        >>> q, k1, v1 = torch.randn(4, 1, 8, 64), torch.randn(4, 1, 2, 64), torch.randn(4, 1, 2, 64)
        >>> o = attnkit.attention_decode(q, k_cache, v_cache, lens, k_new=k1, v_new=v1)
        >>> lens += 1  # the caller advances the lengths
    """
    return _ATTENTION_DECODE(backend, q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, window, softcap,
                             block_table)


# ----------------------------------------------------------------------------------- qk_norm


@dispatch.op("qk_norm")
def _prepare_qk_norm(x, weight=None, *, mode="rms", eps=1e-6) -> dispatch.Call:
    expect_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have shape [..., D] (at least 1 dim), got {shape_str(x)}")
    expect_float("x", x, REFERENCE_DTYPES)
    _check_mode("mode", mode, NORM_MODES)
    _check_norm_weight("weight", weight, "x", x)
    eps = _check_eps("eps", eps)
    features = {f"mode={mode}"}
    if _needs_grad(x, weight):
        features.add("grad")
    return dispatch.Call(
        inputs=dispatch.Inputs("qk_norm", x.device, x.dtype, head_dims=(x.shape[-1],),
                               features=frozenset(features)),
        kwargs=dict(x=x, weight=weight, mode=mode, eps=eps))


def qk_norm(x: torch.Tensor, weight: torch.Tensor | None = None, *, mode: str = "rms", eps: float = 1e-6,
            backend: str | None = None) -> torch.Tensor:
    """Per-head RMS or L2 norm over the last dim (the norm `attention(qk_norm=...)` fuses).

    `"rms"`: `y = x * rsqrt(mean(x², -1) + eps) * weight` (Qwen3 / OLMo2 q_norm, k_norm);
    `"l2"`: `y = x * rsqrt(sum(x², -1) + eps)`, times `weight` if given. Computed in float32
    (float64 for float64 inputs); differentiable with respect to `x` and `weight`.

    Args:
        x: `[..., D]`, e.g. `[B, T, H, D]`.
        weight: `[D]`, float32 or x's dtype. Default None (ones).
        mode: `"rms"` or `"l2"`. Default `"rms"`.
        eps: added to the mean (or sum) of squares. Default 1e-6.
        backend: None (automatic), `"reference"`, `"triton"` or `"cuda"`.

    Returns:
        `y`, the shape and dtype of `x`.

    Example:
        >>> x, w = torch.randn(2, 16, 8, 128), torch.ones(128)
        >>> y = attnkit.qk_norm(x, w)  # [2, 16, 8, 128]
    """
    return _QK_NORM(backend, x, weight, mode, eps)


_QK_NORM = dispatch.fast("qk_norm", _prepare_qk_norm)

_ANY_DTYPE = dict(priority=0, dtypes=REFERENCE_DTYPES)
dispatch.register("attention", "reference", reference.attention, **_ANY_DTYPE)
dispatch.register("attention_decode", "reference", reference.attention_decode, **_ANY_DTYPE)
dispatch.register("qk_norm", "reference", reference.qk_norm, **_ANY_DTYPE)
