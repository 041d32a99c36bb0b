"""Loki's fast cache layout: rotated keys plus a contiguous low-rank key buffer.

The portable decode op (:func:`attnkit.loki_attention_decode`) scores from
``k_cache_rot[..., :rank]``: in the `[B, Smax, Hk, D]` layout the leading `rank` dims of
consecutive positions lie `Hk · D` elements apart, so the scoring pass reads short strided
pieces. This module keeps, next to the rotated cache, a buffer

    k_lowrank [B, Hk, Smax, R]        (R = the largest rank the cache serves)

holding ``k_cache_rot[b, s, h, :R]`` at ``[b, h, s, :]``: a block of positions of one KV head is
one contiguous span, which the scoring kernel reads with coalesced loads and nothing more.
Both buffers are written by one fused append (rotate the new keys, write the full rotated keys,
their first `R` dims and the values) so they always hold the same rounded values.

* :func:`loki_cache_append` — the in-place append (dispatched: reference and Triton).
* :func:`loki_attention_decode_lowrank` — the decode op reading scores from the buffer
  (dispatched). Its meaning is that of :func:`attnkit.loki_attention_decode`, which it validates
  identically; the buffer must mirror ``k_cache_rot[..., :R]`` (the append keeps it so). The
  reference backend scores from ``k_cache_rot``, the Triton backend from ``k_lowrank``.
* :class:`LokiCache` — the buffers and the lengths in one object.

Layout decisions and measurements: docs/loki.md.
"""

from __future__ import annotations

import torch

from ... import _validation as V
from ... import dispatch
from . import reference
from .api import (LokiBasis, _check_basis, _check_caches, _check_table_values, _loki_attention_decode_values,
                  _prepare_loki_attention_decode)

__all__ = ["LokiCache", "loki_attention_decode_lowrank", "loki_cache_append"]

_LOWRANK_LAYOUT = "[B, Hk, Smax, R]"
_PAGED_LOWRANK_LAYOUT = "[num_blocks, Hk, block_size, R]"


def _check_lowrank(k_lowrank: torch.Tensor, k_cache_rot: torch.Tensor, min_rank: int = 1, paged: bool = False) -> int:
    """`k_lowrank` must be `[B, Hk, Smax, R]` for `k_cache_rot [B, Smax, Hk, D]` (paged:
    `[num_blocks, Hk, block_size, R]` for `[num_blocks, block_size, Hk, D]`), `min_rank <= R <= D`."""
    layout = _PAGED_LOWRANK_LAYOUT if paged else _LOWRANK_LAYOUT
    V.expect_ndim("k_lowrank", k_lowrank, 4, layout)
    n0, n1, Hk, D = k_cache_rot.shape
    R = k_lowrank.shape[3]
    if tuple(k_lowrank.shape[:3]) != (n0, Hk, n1) or not min_rank <= R <= D:
        dims = "num_blocks, block_size, Hk, D" if paged else "B, Smax, Hk, D"
        raise ValueError(f"k_lowrank must have shape {layout} = [{n0}, {Hk}, {n1}, R] with "
                         f"{min_rank} <= R <= {D} ({dims} from k_cache_rot; R >= rank), got "
                         f"{V.shape_str(k_lowrank)}")
    V.expect_same_dtype(["k_cache_rot", "k_lowrank"], [k_cache_rot, k_lowrank])
    V.expect_same_device(["k_cache_rot", "k_lowrank"], [k_cache_rot, k_lowrank])
    return R


# ------------------------------------------------------------------------------------ append


@dispatch.op("loki_cache_append")
def _prepare_loki_cache_append(k_new, v_new, k_cache_rot, v_cache, cache_seqlens, basis, *,
                               k_lowrank=None, block_table=None) -> dispatch.Call:
    V.expect_ndim("k_new", k_new, 4, "[B, T, Hk, D]")
    V.expect_ndim("v_new", v_new, 4, "[B, T, Hk, Dv]")
    B, T, Hk, D = k_new.shape
    Dv = v_new.shape[3]
    V.expect_shape("v_new", v_new, (B, T, Hk, Dv), "[B, T, Hk, Dv] (B, T, Hk from k_new)")
    Smax, cache_hk, cache_dv, page = _check_caches(k_cache_rot, v_cache, B, D, block_table, against="k_new")
    if cache_hk != Hk or cache_dv != Dv:
        raise ValueError(f"k_cache_rot and v_cache must have Hk = {Hk} heads (from k_new) and v_cache a head dim "
                         f"Dv = {Dv} (from v_new), got shapes {V.shape_str(k_cache_rot)} and {V.shape_str(v_cache)}")
    V.expect_float("k_new", k_new)
    V.expect_same_dtype(["k_cache_rot", "k_new", "v_new", "v_cache"], [k_cache_rot, k_new, v_new, v_cache])
    V.expect_same_device(["k_cache_rot", "k_new", "v_new", "v_cache", "cache_seqlens", "block_table"],
                         [k_cache_rot, k_new, v_new, v_cache, V.expect_tensor("cache_seqlens", cache_seqlens),
                          block_table])
    V.check_index("cache_seqlens", cache_seqlens, B, Smax + 1, "", values=False)  # values: below
    _check_basis(basis, Hk, D, k_new.device, against="k_new")
    features = set()
    if k_lowrank is not None:
        _check_lowrank(k_lowrank, k_cache_rot, paged=bool(page))
        features.add("lowrank")
    if page:
        block_table = block_table.contiguous()
        features.update(("paged", f"block_size={page}"))
    inputs = dispatch.Inputs(op="loki_cache_append", device=k_new.device, dtype=k_new.dtype, head_dims=(D, Dv),
                             features=frozenset(features))
    components = basis.components.to(reference.compute_dtype(k_new.dtype))
    kwargs = dict(k_new=k_new, v_new=v_new, k_cache_rot=k_cache_rot, v_cache=v_cache, cache_seqlens=cache_seqlens,
                  components=components, k_lowrank=k_lowrank)
    if block_table is not None:
        kwargs["block_table"] = block_table
    if V.value_checks_enabled(cache_seqlens, block_table):
        _loki_cache_append_values(kwargs)
    return dispatch.Call(inputs=inputs, kwargs=kwargs)


def _loki_cache_append_values(kw: dict) -> None:
    """The checks of `loki_cache_append` that read tensor values: `cache_seqlens` in `0..Smax`,
    room for the `T` new tokens and, paged, the `block_table` entries the rows write (they are
    blocks of the cache, rows fit the table, no two rows write one slot)."""
    lens, k_cache_rot, block_table = kw["cache_seqlens"], kw["k_cache_rot"], kw.get("block_table")
    T = kw["k_new"].shape[1]
    if block_table is not None:
        Smax = block_table.shape[1] * k_cache_rot.shape[1]
        capacity = "max_blocks * block_size, the capacity of block_table"
    else:
        Smax, capacity = k_cache_rot.shape[1], "the capacity of k_cache_rot"
    got = V.index_values("cache_seqlens", lens, Smax + 1, f"Smax = {Smax}, {capacity}")
    if block_table is not None:
        _check_table_values(block_table, k_cache_rot, lens, T)
    elif T > 0 and got is not None and got[1] + T > Smax:
        room, b = got[1], int(lens.argmax())
        raise ValueError(f"cache_seqlens[b] + T must be <= Smax = {Smax} to append k_new/v_new, got "
                         f"cache_seqlens[{b}] = {room} and T = {T}: the cache is too small")


_LOKI_CACHE_APPEND = dispatch.fast("loki_cache_append", _prepare_loki_cache_append, _loki_cache_append_values)


def _reference_append(*, k_new, v_new, k_cache_rot, v_cache, cache_seqlens, components, k_lowrank,
                      block_table=None) -> None:
    """Reference append: `k_cache_rot[b, L_b + t] = rotate(k_new[b, t])` (in the cache dtype),
    `v_cache[b, L_b + t] = v_new[b, t]`, `k_lowrank[b, :, L_b + t] = rotate(k_new[b, t])[:, :R]`;
    paged, slot `(b, s)` is `(block_table[b, s // block_size], s % block_size)`."""
    B, T = k_new.shape[:2]
    if B == 0 or T == 0:
        return
    with torch.no_grad():
        pos = cache_seqlens.to(torch.int64)[:, None] + torch.arange(T, device=k_new.device)  # [B, T]
        rows = torch.arange(B, device=k_new.device)[:, None].expand(B, T)
        i0, i1 = reference.cache_slots(block_table, k_cache_rot.shape[1], rows, pos)
        k_rot = reference.rotate(k_new, components)  # [B, T, Hk, D] in k_new's dtype
        k_cache_rot[i0, i1] = k_rot
        v_cache[i0, i1] = v_new
        if k_lowrank is not None:
            # advanced indices around a slice: the indexed view is [B, T, Hk, R]
            k_lowrank[i0, :, i1] = k_rot[..., :k_lowrank.shape[3]]


def loki_cache_append(k_new: torch.Tensor, v_new: torch.Tensor, k_cache_rot: torch.Tensor, v_cache: torch.Tensor,
                      cache_seqlens: torch.Tensor, basis: LokiBasis, *, k_lowrank: torch.Tensor | None = None,
                      block_table: torch.Tensor | None = None, backend: str | None = None) -> None:
    """Rotate new keys into the basis and append them (and the values) to a Loki cache, in place.

    Row `b`'s `T` new tokens go to positions ``cache_seqlens[b] .. cache_seqlens[b] + T - 1``.
    ``cache_seqlens`` is read only: the caller advances it (``cache_seqlens += T``), as for
    :func:`attnkit.attention_decode`. On the Triton backend one launch does it all.

    Args:
        k_new: `[B, T, Hk, D]` keys as the model produces them (post-RoPE), not rotated.
        v_new: `[B, T, Hk, Dv]` values.
        k_cache_rot: `[B, Smax, Hk, D]` rotated-key cache, same dtype as `k_new`.
        v_cache: `[B, Smax, Hk, Dv]` value cache.
        cache_seqlens: int32 `[B]`, tokens already cached per row; ``cache_seqlens[b] + T <= Smax``.
        basis: the :class:`LokiBasis` of the cache (`Hk` heads, dim `D`).
        k_lowrank: optional `[B, Hk, Smax, R]` low-rank key buffer (``1 <= R <= D``), same dtype;
            receives the first `R` rotated dims of each new key.
        block_table: int32 `[B, max_blocks]` for a paged cache: `k_cache_rot [num_blocks,
            block_size, Hk, D]`, `v_cache [num_blocks, block_size, Hk, Dv]`, `k_lowrank
            [num_blocks, Hk, block_size, R]`; token `s` of row `b` goes to block
            ``block_table[b, s // block_size]``, offset ``s % block_size``. Blocks not referenced
            are never written; two rows may not write one slot.
        backend: ``None`` (automatic), ``"reference"``, ``"triton"`` or ``"cuda"``.

    Example:
        >>> loki_cache_append(k, v, k_rot, v_cache, seqlens, basis, k_lowrank=k_low)
        >>> seqlens += k.shape[1]
    """
    _LOKI_CACHE_APPEND(backend, k_new, v_new, k_cache_rot, v_cache, cache_seqlens, basis, k_lowrank, block_table)


# ------------------------------------------------------------------------------------ decode


@dispatch.op("loki_attention_decode_lowrank")
def _prepare_loki_attention_decode_lowrank(q, k_lowrank, k_cache_rot, v_cache, cache_seqlens, basis, *, rank,
                                           top_k, scale=None, selection="head", block_table=None) -> dispatch.Call:
    call = _prepare_loki_attention_decode(q, k_cache_rot, v_cache, cache_seqlens, basis, rank=rank, top_k=top_k,
                                          scale=scale, selection=selection, block_table=block_table)
    _check_lowrank(k_lowrank, k_cache_rot, min_rank=call.kwargs["rank"], paged=block_table is not None)
    i = call.inputs
    inputs = dispatch.Inputs(op="loki_attention_decode_lowrank", device=i.device, dtype=i.dtype,
                             head_dims=i.head_dims, features=i.features | {"lowrank"})
    return dispatch.Call(inputs=inputs, kwargs=dict(call.kwargs, k_lowrank=k_lowrank))


# the same value checks as loki_attention_decode (k_lowrank's values are not checked)
_LOKI_ATTENTION_DECODE_LOWRANK = dispatch.fast("loki_attention_decode_lowrank",
                                               _prepare_loki_attention_decode_lowrank, _loki_attention_decode_values)


def _reference_decode_lowrank(*, k_lowrank, **kwargs) -> torch.Tensor:
    """Reference: the portable op; `k_lowrank` mirrors `k_cache_rot[..., :R]`, so it is not needed."""
    return reference.loki_attention_decode(**kwargs)


def loki_attention_decode_lowrank(q: torch.Tensor, k_lowrank: torch.Tensor, k_cache_rot: torch.Tensor,
                                  v_cache: torch.Tensor, cache_seqlens: torch.Tensor, basis: LokiBasis, *,
                                  rank: int, top_k: int, scale: float | None = None, selection: str = "head",
                                  block_table: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """:func:`attnkit.loki_attention_decode` with the approximate scores read from a contiguous
    low-rank key buffer (see the module docstring).

    Args:
        q, k_cache_rot, v_cache, cache_seqlens, basis, rank, top_k, scale, selection, backend: as
            for :func:`attnkit.loki_attention_decode`.
        k_lowrank: `[B, Hk, Smax, R]`, ``rank <= R <= D``, same dtype as the caches, holding
            ``k_cache_rot[b, s, h, :R]`` at ``[b, h, s]`` for every valid position (what
            :func:`loki_cache_append` writes); paged (with `block_table`) `[num_blocks, Hk,
            block_size, R]`, holding ``k_cache_rot[blk, i, h, :R]`` at ``[blk, h, i]``.
        block_table: as for :func:`attnkit.loki_attention_decode` (int32 `[B, max_blocks]`).

    Returns:
        `o [B, 1, H, Dv]` in q's dtype.

    Example:
        >>> loki_cache_append(k, v, k_rot, v_cache, seqlens, basis, k_lowrank=k_low)
        >>> o = loki_attention_decode_lowrank(q, k_low, k_rot, v_cache, seqlens + 1, basis, rank=32, top_k=256)
    """
    return _LOKI_ATTENTION_DECODE_LOWRANK(backend, q, k_lowrank, k_cache_rot, v_cache, cache_seqlens, basis, rank,
                                          top_k, scale, selection, block_table)


dispatch.register("loki_cache_append", "reference", _reference_append, priority=0, dtypes=V.REFERENCE_DTYPES)
dispatch.register("loki_attention_decode_lowrank", "reference", _reference_decode_lowrank, priority=0,
                  dtypes=V.REFERENCE_DTYPES)


# ------------------------------------------------------------------------------------ object


class LokiCache:
    """A preallocated Loki KV cache: rotated keys, values, the low-rank key buffer and lengths.

    Contiguous (default): `k_rot [B, Smax, Hk, D]`, `v [B, Smax, Hk, Dv]`, `k_lowrank [B, Hk,
    Smax, R]`. Paged (``block_size=`` given): a pool of `num_blocks` blocks, `k_rot [num_blocks,
    block_size, Hk, D]`, `v [num_blocks, block_size, Hk, Dv]`, `k_lowrank [num_blocks, Hk,
    block_size, R]` and `block_table` int32 `[B, ceil(max_seqlen / block_size)]` (row `b` owns
    blocks `b * max_blocks ...` until the caller assigns other blocks, e.g. from a block allocator;
    blocks no row references are never read or written).

    Attributes:
        basis: the :class:`LokiBasis` keys are rotated with.
        k_rot, v, k_lowrank: the buffers above (`R = max_rank`).
        block_table: the table of a paged cache, else ``None``.
        seqlens: int32 `[B]`, tokens cached per row (advanced on the device by :meth:`append`).

    Example:
        >>> cache = LokiCache(basis, batch_size=8, max_seqlen=8192, max_rank=32, dtype=torch.float16)
        >>> cache.append(k_prompt, v_prompt)                     # [B, T, Hk, D], [B, T, Hk, Dv]
        >>> cache.append(k_step, v_step)                         # one new token
        >>> o = cache.attend(q_step, rank=32, top_k=512)         # [B, 1, H, Dv]
    """

    def __init__(self, basis: LokiBasis, batch_size: int, max_seqlen: int, *, max_rank: int,
                 v_head_dim: int | None = None, dtype: torch.dtype = torch.float32, device=None,
                 block_size: int | None = None, num_blocks: int | None = None) -> None:
        if not isinstance(basis, LokiBasis):
            raise TypeError(f"basis must be a LokiBasis (from loki_calibrate), got {type(basis).__name__}")
        Hk, D = basis.num_kv_heads, basis.head_dim
        R = V.expect_int("max_rank", max_rank, 1, D)
        B = V.expect_int("batch_size", batch_size, 0)
        Smax = V.expect_int("max_seqlen", max_seqlen, 0)
        Dv = D if v_head_dim is None else V.expect_int("v_head_dim", v_head_dim, 1)
        device = basis.device if device is None else torch.device(device)
        self.basis = basis.to(device)
        self.block_table = None
        if block_size is None:
            if num_blocks is not None:
                raise ValueError("num_blocks needs block_size (a paged cache); pass both or neither")
            n0, n1 = B, Smax
        else:
            page = V.expect_int("block_size", block_size, 1)
            max_blocks = -(-Smax // page)
            n1 = page
            n0 = B * max_blocks if num_blocks is None else V.expect_int("num_blocks", num_blocks, B * max_blocks)
            self.block_table = torch.arange(B * max_blocks, device=device, dtype=torch.int32).view(B, max_blocks)
        self.k_rot = torch.zeros(n0, n1, Hk, D, device=device, dtype=dtype)
        self.v = torch.zeros(n0, n1, Hk, Dv, device=device, dtype=dtype)
        self.k_lowrank = torch.zeros(n0, Hk, n1, R, device=device, dtype=dtype)
        self.seqlens = torch.zeros(B, device=device, dtype=torch.int32)

    @property
    def max_rank(self) -> int:
        """`R`, the largest `rank` :meth:`attend` accepts."""
        return self.k_lowrank.shape[3]

    @property
    def max_seqlen(self) -> int:
        """Tokens a row can hold (`max_blocks * block_size` when paged)."""
        if self.block_table is not None:
            return self.block_table.shape[1] * self.k_rot.shape[1]
        return self.k_rot.shape[1]

    def append(self, k: torch.Tensor, v: torch.Tensor, *, backend: str | None = None) -> None:
        """Append `k [B, T, Hk, D]` (not rotated) and `v [B, T, Hk, Dv]` to every row and advance
        :attr:`seqlens` by `T` (on the device: no host synchronisation)."""
        loki_cache_append(k, v, self.k_rot, self.v, self.seqlens, self.basis, k_lowrank=self.k_lowrank,
                          block_table=self.block_table, backend=backend)
        self.seqlens += k.shape[1]

    def attend(self, q: torch.Tensor, *, rank: int, top_k: int, scale: float | None = None,
               selection: str = "head", backend: str | None = None) -> torch.Tensor:
        """Loki attention of `q [B, 1, H, D]` (not rotated) over everything cached; `rank <= max_rank`."""
        return loki_attention_decode_lowrank(q, self.k_lowrank, self.k_rot, self.v, self.seqlens, self.basis,
                                             rank=rank, top_k=top_k, scale=scale, selection=selection,
                                             block_table=self.block_table, backend=backend)

    def reset(self) -> None:
        """Forget every cached token (the buffers are kept)."""
        self.seqlens.zero_()

    def __repr__(self) -> str:
        _, _, Hk, D = self.k_rot.shape
        paged = "" if self.block_table is None else (f", block_size={self.k_rot.shape[1]}, "
                                                      f"num_blocks={self.k_rot.shape[0]}")
        return (f"LokiCache(batch_size={self.seqlens.shape[0]}, max_seqlen={self.max_seqlen}, num_kv_heads={Hk}, "
                f"head_dim={D}, v_head_dim={self.v.shape[3]}, max_rank={self.max_rank}{paged}, "
                f"dtype={V.dtype_name(self.k_rot.dtype)})")
