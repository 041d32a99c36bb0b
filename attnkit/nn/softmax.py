"""Softmax-attention layers: GQA/MQA with QK-norm and RoPE (Llama/Qwen3), a KV cache, and a drop-in
`torch.nn.MultiheadAttention`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validation as V
from ..distributed._comm import resolve_group
from ..distributed.sequence import check_layout, check_local_length, chunk_ranges
from ..distributed.softmax import attention as cp_attention
from ..ops.loki import LokiBasis, loki_rotate
from ..ops.loki.cache import loki_attention_decode_lowrank, loki_cache_append
from ..ops.softmax import attention, attention_decode, qk_norm

# --------------------------------------------------------------------------------------- RoPE


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin `[..., head_dim]` for integer `positions`, as Llama / Qwen3 build them in transformers
    (`inv_freq = 1 / theta^(2i/d)` in float32, frequencies repeated over the two halves)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
                                / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x [B, T, H, D]`, `cos/sin [B, T, D]`: `x·cos + rotate_half(x)·sin` (the Llama convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


# ------------------------------------------------------------------------------------ KV cache


class KVCache:
    """A preallocated KV cache for one attention layer.

    `k [B, max_seqlen, Hk, D]`, `v [B, max_seqlen, Hk, Dv]` and `seqlens` int32 `[B]` (tokens cached
    per row). `GroupedQueryAttention.forward(x, cache=...)` appends to it in place and advances
    `seqlens` on the device (no host synchronisation).

    With `loki_basis` (a :class:`attnkit.LokiBasis`) it is a Loki cache: `k` holds the keys rotated
    into the basis, and `k_lowrank [B, Hk, max_seqlen, R]` their first `R = loki_max_rank`
    rotated dims (default `head_dim`), the layout the Loki scoring kernel reads
    (`attnkit/ops/loki/cache.py`). `KVCache.for_module` builds one when the layer has a Loki
    basis set (:meth:`GroupedQueryAttention.set_loki_basis`).

    Example:
        >>> cache = KVCache.for_module(layer, batch_size=4, max_seqlen=4096)
        >>> y = layer(prompt, cache=cache)          # prefill
        >>> y = layer(next_token, cache=cache)      # decode, one token per row
    """

    def __init__(self, batch_size: int, max_seqlen: int, num_kv_heads: int, head_dim: int,
                 v_head_dim: int | None = None, *, device=None, dtype=torch.float32,
                 loki_basis: LokiBasis | None = None, loki_max_rank: int | None = None) -> None:
        self.k = torch.zeros(batch_size, max_seqlen, num_kv_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(batch_size, max_seqlen, num_kv_heads, v_head_dim or head_dim, device=device,
                             dtype=dtype)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self._empty = True  # host-side: nothing appended yet (lets prefill use the prefill kernel)
        self.loki_basis: LokiBasis | None = None
        self.k_lowrank: torch.Tensor | None = None
        if loki_basis is not None:
            _check_layer_basis(loki_basis, num_kv_heads, head_dim)
            R = head_dim if loki_max_rank is None else V.expect_int("loki_max_rank", loki_max_rank, 1, head_dim)
            self.loki_basis = loki_basis.to(self.k.device)
            self.k_lowrank = torch.zeros(batch_size, num_kv_heads, max_seqlen, R, device=device, dtype=dtype)
        elif loki_max_rank is not None:
            raise ValueError("loki_max_rank needs loki_basis (the basis the cached keys are rotated with)")

    @classmethod
    def for_module(cls, module: GroupedQueryAttention, batch_size: int, max_seqlen: int, *, device=None,
                   dtype=None, loki_max_rank: int | None = None) -> KVCache:
        """A cache for `module`; a Loki cache (rotated keys, low-rank buffer of `loki_max_rank`
        dims, default the layer's Loki `rank`) when the layer has a Loki basis set."""
        w = module.k_proj.weight
        loki = module.loki
        return cls(batch_size, max_seqlen, module.num_kv_heads, module.head_dim, device=device or w.device,
                   dtype=dtype or w.dtype, loki_basis=loki.basis if loki is not None else None,
                   loki_max_rank=(loki_max_rank or loki.rank) if loki is not None else loki_max_rank)

    @property
    def max_seqlen(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        self.seqlens.zero_()
        self._empty = True


# --------------------------------------------------------------------------------------- Loki


@dataclass(frozen=True)
class LokiDecoding:
    """Loki settings of a layer (:meth:`GroupedQueryAttention.set_loki_basis`): the per-KV-head
    key basis, the scoring `rank`, the positions attended `top_k` and the `selection` mode of
    :func:`attnkit.loki_attention_decode`."""

    basis: LokiBasis
    rank: int
    top_k: int
    selection: str = "head"


def _check_layer_basis(basis, num_kv_heads: int, head_dim: int) -> None:
    if not isinstance(basis, LokiBasis):
        raise TypeError(f"basis must be a LokiBasis (from attnkit.loki_calibrate or "
                        f"attnkit.nn.calibrate_loki), got {type(basis).__name__}")
    if (basis.num_kv_heads, basis.head_dim) != (num_kv_heads, head_dim):
        raise ValueError(f"basis must have components of shape [Hk, D, D] = [{num_kv_heads}, {head_dim}, "
                         f"{head_dim}] (the layer's KV heads and head dim), got {V.shape_str(basis.components)}")


def _rotate_query_heads(q: torch.Tensor, basis: LokiBasis) -> torch.Tensor:
    """`q [B, T, H, D]`, each query head rotated with the basis of its KV head (`h // (H // Hk)`)."""
    B, T, H, D = q.shape
    Hk = basis.num_kv_heads
    grouped = q.reshape(B, T, Hk, H // Hk, D).transpose(2, 3)  # [B, T, G, Hk, D]
    return loki_rotate(grouped, basis).transpose(2, 3).reshape(B, T, H, D)


# ------------------------------------------------------------------------------- GQA / MQA layer


class _HeadRMSNorm(nn.Module):
    """`q_norm`/`k_norm` of Qwen3 attention: a `weight [head_dim]`, computed by `attnkit.qk_norm`."""

    def __init__(self, head_dim: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qk_norm(x, self.weight, mode="rms", eps=self.variance_epsilon)


class GroupedQueryAttention(nn.Module):
    """Grouped-query self-attention with the parameters and computation of Llama / Qwen3 attention.

    `q_proj`, `k_proj`, `v_proj`, `o_proj` (and `q_norm`, `k_norm` with a `weight [head_dim]` when
    `qk_norm="rms"`) have the names and shapes of transformers' `LlamaAttention` / `Qwen3Attention`,
    so their weights load unchanged. The computation is theirs: per-head RMS norm of q and k, then
    RoPE (rotate-half convention, `rope_theta`), then causal softmax attention with scale
    `head_dim ** -0.5`, then `o_proj`. Without RoPE, the QK-norm is fused into the attention kernel.

    Args:
        hidden_size: model width. num_heads: query heads `H`. num_kv_heads: KV heads (`None`: `H`).
        head_dim: default `hidden_size // num_heads`.
        bias: biases on all four projections (Llama/Qwen3 `attention_bias`).
        qk_norm: `None`, `"rms"` (Qwen3/OLMo2-style per-head norm with weights) or `"l2"` (QKNorm;
            no weights, see `attnkit.attention`).
        causal: causal self-attention (default).
        rope_theta: RoPE base; `None` means no rotary embedding.
        norm_eps: epsilon of the QK-norm.
        window: sliding window `(left, right)` as in `attnkit.attention` (a query at position `p`
            sees keys `p - left <= s <= p + right`, `-1` = unbounded); Mistral / Qwen2 / Gemma's
            `sliding_window=W` is `(W - 1, 0)`. Applies to prefill and to cache decoding.
        softcap: logit softcap `c` (`c * tanh(scale * q.k / c)`, Gemma 2's
            `attn_logit_softcapping`); `None` = off.
        backend: attnkit backend for the ops (`None`: automatic).
        process_group: context parallelism: a `torch.distributed` process group; `forward` then takes
            this rank's shard of the sequence in `cp_layout` (`attnkit.distributed.attention`), and
            the default RoPE positions are the shard's positions in the whole sequence.
        cp_layout: `"contiguous"` or `"zigzag"` (see `attnkit.distributed.shard_sequence`).

    Example:
        >>> layer = attnkit.nn.GroupedQueryAttention(2048, 16, 4, qk_norm="rms", rope_theta=1e6)
        >>> y = layer(x)   # [B, T, 2048]
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 *, bias: bool = False, qk_norm: str | None = None, causal: bool = True,
                 rope_theta: float | None = None, norm_eps: float = 1e-6, backend: str | None = None,
                 window: tuple[int, int] | None = None, softcap: float | None = None,
                 process_group=None, cp_layout: str = "contiguous", device=None, dtype=None) -> None:
        super().__init__()
        V.check_window(window, causal)  # validated now; the ops normalise it per call
        softcap = V.check_softcap(softcap) or None
        self.process_group, self.cp_layout = process_group, check_layout(cp_layout)
        if qk_norm not in (None, "rms", "l2"):
            raise ValueError(f"qk_norm must be None, 'rms' or 'l2', got {qk_norm!r}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.qk_norm = qk_norm
        self.causal = causal
        self.rope_theta = rope_theta
        self.norm_eps = norm_eps
        self.scaling = self.head_dim ** -0.5
        self.backend = backend
        self.window = None if window is None else (int(window[0]), int(window[1]))
        self.softcap = softcap
        kw = dict(device=device, dtype=dtype)
        D = self.head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * D, bias=bias, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * D, bias=bias, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * D, bias=bias, **kw)
        self.o_proj = nn.Linear(num_heads * D, hidden_size, bias=bias, **kw)
        if qk_norm == "rms":
            self.q_norm = _HeadRMSNorm(D, norm_eps, **kw)
            self.k_norm = _HeadRMSNorm(D, norm_eps, **kw)
        self.loki: LokiDecoding | None = None  # set_loki_basis; not part of the state_dict

    def set_loki_basis(self, basis: LokiBasis | None, *, rank: int | None = None, top_k: int | None = None,
                       selection: str = "head") -> None:
        """Decode with Loki sparse attention (or, with ``basis=None``, stop doing so).

        Once set, single-token steps through a :class:`KVCache` run
        :func:`attnkit.loki_attention_decode` (scores from the cache's low-rank key buffer);
        prefill and multi-token chunks stay dense and exact. The cache stores keys rotated into
        the basis, which keeps every dot product: build it with :meth:`KVCache.for_module` *after*
        this call. The basis is a plain attribute (not in the `state_dict`) moved to the layer's
        device now; save it with ``basis.state_dict()``.

        Args:
            basis: a :class:`attnkit.LokiBasis` for this layer's `Hk` KV heads and head dim (e.g.
                from :func:`attnkit.nn.calibrate_loki`), or ``None`` to turn Loki off.
            rank: leading rotated dims used for scoring, `1..head_dim`.
            top_k: positions attended per row and head (more than a row has: dense).
            selection: ``"head"`` or ``"group"``, as in :func:`attnkit.loki_attention_decode`.

        Example:
            >>> bases = attnkit.nn.calibrate_loki(model, batches)
            >>> layer.set_loki_basis(bases["layers.0.attn"], rank=32, top_k=256)
            >>> cache = KVCache.for_module(layer, batch_size=1, max_seqlen=8192)
        """
        if basis is None:
            self.loki = None
            return
        _check_layer_basis(basis, self.num_kv_heads, self.head_dim)
        rank = V.expect_int("rank", rank, 1, self.head_dim)
        top_k = V.expect_int("top_k", top_k, 1)
        V.expect_choice("selection", selection, ("head", "group"))
        self.loki = LokiDecoding(basis.to(self.k_proj.weight.device), rank, top_k, selection)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"qk_norm={self.qk_norm}, causal={self.causal}, rope_theta={self.rope_theta}"
                + (f", window={self.window}" if self.window is not None else "")
                + (f", softcap={self.softcap}" if self.softcap is not None else ""))

    def project_qkv(self, x: torch.Tensor, positions: torch.Tensor | None = None):
        """q `[B, T, H, D]`, k/v `[B, T, Hk, D]` after QK-norm and RoPE, or with the norm left for the
        attention kernel to fuse (returned as the `attention` keyword arguments)."""
        B, T, _ = x.shape
        D = self.head_dim
        q = self.q_proj(x).view(B, T, self.num_heads, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, D)
        fused = {}
        if self.qk_norm is not None:
            if self.rope_theta is None:
                fused = dict(qk_norm=self.qk_norm, norm_eps=self.norm_eps)
                if self.qk_norm == "rms":
                    fused.update(q_norm_weight=self.q_norm.weight, k_norm_weight=self.k_norm.weight)
            else:  # RoPE after the norm: the norm cannot be fused into attention
                if self.qk_norm == "rms":
                    q, k = self.q_norm(q), self.k_norm(k)
                else:
                    q = qk_norm(q, mode="l2", eps=self.norm_eps, backend=self.backend)
                    k = qk_norm(k, mode="l2", eps=self.norm_eps, backend=self.backend)
        if self.rope_theta is not None:
            if positions is None:
                positions = torch.arange(T, device=x.device)[None].expand(B, T)
            cos, sin = rope_cos_sin(positions, D, self.rope_theta, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v, fused

    def cached_keys(self, x: torch.Tensor, cache: KVCache | None = None,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The keys `[B, T, Hk, D]` that `forward(x, cache, position_ids)` would attend with and
        cache (after QK-norm and RoPE, not rotated into a Loki basis); reads the cache's lengths
        only. What :func:`attnkit.nn.calibrate_loki` records."""
        q, k, _, fused = self.project_qkv(x, self._positions(x, cache, position_ids))
        return self._norm_unfused(q, k, fused)[1] if fused else k

    @staticmethod
    def _positions(x: torch.Tensor, cache: KVCache | None, position_ids: torch.Tensor | None):
        if cache is not None and position_ids is None:  # continue each row's cache
            position_ids = cache.seqlens[:, None].long() + torch.arange(x.shape[1], device=x.device)[None]
        return position_ids

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, process_group=None) -> torch.Tensor:
        """Args:
            x: `[B, T, hidden_size]`.
            cache: a :class:`KVCache`; the new tokens are appended and attend to everything cached
                (prefill then token-by-token decode equals one forward over the whole sequence).
                With a Loki basis set (:meth:`set_loki_basis`), single-token steps attend to the
                `top_k` positions Loki selects.
            position_ids: `[B, T]` RoPE positions; default `0..T-1`, or continuing each row's cache
                (with `attention_mask`: each row's real tokens count from 0).
            attention_mask: `[B, T]` padding mask of a ragged batch (transformers' 2-D
                `attention_mask`: 1/True = token, 0/False = padding; left, right or anywhere).
                Each row then computes exactly what it would alone without its padding; padded
                positions output zeros. With a cache it is accepted for the prefill of an empty
                cache (row `b` caches its `sum(mask[b])` tokens) or when it is all ones.
            process_group: overrides the constructor's; with a group, `x` is this rank's shard of
                the sequence (no `cache`, no `attention_mask`).

        Returns:
            `y [B, T, hidden_size]`.
        """
        B, T, _ = x.shape
        group = process_group if process_group is not None else self.process_group
        if group is not None:
            if attention_mask is not None:
                raise ValueError("attention_mask cannot be combined with process_group (context parallelism "
                                 "takes unpadded shards); pass one or the other")
            return self._forward_context_parallel(x, group, position_ids, cache)
        if attention_mask is not None:
            valid = self._padding(x, attention_mask)
            if not bool(valid.all()):
                return self._forward_padded(x, valid, cache, position_ids)
        position_ids = self._positions(x, cache, position_ids)
        q, k, v, fused = self.project_qkv(x, position_ids)
        if cache is None:
            o = attention(q, k, v, causal=self.causal, scale=self.scaling, window=self.window,
                          softcap=self.softcap, backend=self.backend, **fused)
        else:
            if not self.causal:
                raise ValueError("cache decoding needs a causal layer (causal=True)")
            if fused:  # decoding reads normalised keys from the cache: normalise before appending
                q, k = self._norm_unfused(q, k, fused)
            if cache.loki_basis is not None or self.loki is not None:
                self._no_window_with_loki()
                o = self._attend_loki_cache(q, k, v, cache)
            elif cache._empty and T > 1:
                o = attention(q, k, v, causal=True, scale=self.scaling, window=self.window, softcap=self.softcap,
                              backend=self.backend)
                if T > cache.max_seqlen:
                    raise ValueError(f"cache holds at most {cache.max_seqlen} tokens per row, got a prefill of {T}")
                cache.k[:, :T] = k.detach()  # the cache holds values, not autograd history
                cache.v[:, :T] = v.detach()
            else:
                with torch.no_grad():
                    o = attention_decode(q, cache.k, cache.v, cache.seqlens, k_new=k, v_new=v, scale=self.scaling,
                                         window=self.window, softcap=self.softcap, backend=self.backend)
            cache.seqlens += T
            cache._empty = False
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))

    def _no_window_with_loki(self) -> None:
        if self.window is not None or self.softcap is not None:
            raise ValueError("Loki decoding does not support window/softcap layers: build the cache without a "
                             "Loki basis (set_loki_basis(None)) for this layer")

    @staticmethod
    def _padding(x: torch.Tensor, attention_mask) -> torch.Tensor:
        """The `[B, T]` bool mask of real tokens from a 2-D padding mask."""
        V.expect_tensor("attention_mask", attention_mask)
        B, T = x.shape[:2]
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask must have shape [B, T] = [{B}, {T}] (1 = token, 0 = padding), "
                             f"got {V.shape_str(attention_mask)}")
        if attention_mask.device != x.device:
            raise ValueError(f"attention_mask must be on x's device ({x.device}), got {attention_mask.device}")
        if attention_mask.dtype == torch.bool:
            return attention_mask
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError(f"attention_mask must be bool or integer (1 = token, 0 = padding), "
                            f"got {V.dtype_name(attention_mask.dtype)}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        return attention_mask == 1

    def _forward_padded(self, x, valid, cache, position_ids):
        """A ragged batch: the real tokens of every row packed into one varlen call."""
        B, T, _ = x.shape
        if cache is not None and not cache._empty:
            raise ValueError("attention_mask with padding needs an empty cache (a ragged prefill); later steps "
                             "follow each row's cache length: pass attention_mask=None")
        if cache is not None and (cache.loki_basis is not None or self.loki is not None):
            raise ValueError("a padded prefill into a Loki cache is not supported; prefill each row alone")
        if position_ids is None:  # each row's real tokens count from 0
            position_ids = (valid.long().cumsum(1) - 1).clamp_min(0)
        q, k, v, fused = self.project_qkv(x, position_ids)
        if cache is not None and fused:  # the cache holds normalised keys
            q, k = self._norm_unfused(q, k, fused)
            fused = {}
        n = valid.sum(1, dtype=torch.int32)
        cu = F.pad(torch.cumsum(n, 0, dtype=torch.int32), (1, 0))
        o = attention(q[valid][None], k[valid][None], v[valid][None], causal=self.causal, scale=self.scaling,
                      cu_seqlens_q=cu, cu_seqlens_k=cu, window=self.window, softcap=self.softcap,
                      backend=self.backend, **fused)
        out = o.new_zeros(B, T, self.num_heads, o.shape[-1])
        out[valid] = o[0]
        if cache is not None:
            if not self.causal:
                raise ValueError("cache decoding needs a causal layer (causal=True)")
            if int(n.max()) > cache.max_seqlen:
                raise ValueError(f"cache holds at most {cache.max_seqlen} tokens per row, got a prefill of "
                                 f"{int(n.max())}")
            rows = torch.arange(B, device=x.device)[:, None].expand(B, T)[valid]
            slots = (valid.long().cumsum(1) - 1)[valid]
            with torch.no_grad():
                cache.k[rows, slots] = k[valid].to(cache.k.dtype)
                cache.v[rows, slots] = v[valid].to(cache.v.dtype)
            cache.seqlens += n
            cache._empty = False
        return self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim))

    def _forward_context_parallel(self, x, group, position_ids, cache) -> torch.Tensor:
        if cache is not None:
            raise ValueError("a KV cache cannot be combined with process_group (context parallelism is for "
                             "training and prefill over a sharded sequence); pass one or the other")
        B, T, _ = x.shape
        if position_ids is None and self.rope_theta is not None:  # the shard's positions in the whole sequence
            _, world, rank = resolve_group(group)
            check_local_length("x", T, self.cp_layout)
            ranges = chunk_ranges(self.cp_layout, world, rank, T * world)
            position_ids = torch.cat([torch.arange(a, b, device=x.device) for a, b in ranges])[None].expand(B, T)
        q, k, v, fused = self.project_qkv(x, position_ids)
        o = cp_attention(q, k, v, group=group, causal=self.causal, scale=self.scaling, layout=self.cp_layout,
                         window=self.window, softcap=self.softcap, backend=self.backend, **fused)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))

    def _attend_loki_cache(self, q, k, v, cache: KVCache) -> torch.Tensor:
        """Attention through a cache of keys rotated into a Loki basis: dense prefill on the
        unrotated q/k; then the new keys are rotated and appended (with the low-rank buffer), and
        a single-token step runs Loki while several tokens at once (or a layer with Loki off)
        attend densely with rotated queries (rotation keeps every dot product)."""
        basis = cache.loki_basis
        if basis is None or (self.loki is not None and basis is not self.loki.basis):
            raise ValueError("Loki decoding needs a KV cache of keys rotated with this layer's basis; build it "
                             "with KVCache.for_module(layer, ...) after layer.set_loki_basis(...)")
        T = q.shape[1]
        prefill = cache._empty and T > 1
        if prefill:
            if T > cache.max_seqlen:
                raise ValueError(f"cache holds at most {cache.max_seqlen} tokens per row, got a prefill of {T}")
            o = attention(q, k, v, causal=True, scale=self.scaling, backend=self.backend)
        with torch.no_grad():
            loki_cache_append(k, v, cache.k, cache.v, cache.seqlens, basis, k_lowrank=cache.k_lowrank,
                              backend=self.backend)
            if prefill:
                return o
            lens = cache.seqlens + T  # advanced by the caller after this step
            if self.loki is not None and T == 1:
                s = self.loki
                return loki_attention_decode_lowrank(q, cache.k_lowrank, cache.k, cache.v, lens, basis, rank=s.rank,
                                                     top_k=s.top_k, scale=self.scaling, selection=s.selection,
                                                     backend=self.backend)
            return attention_decode(_rotate_query_heads(q, basis), cache.k, cache.v, lens, scale=self.scaling,
                                    backend=self.backend)

    def _norm_unfused(self, q, k, fused):
        mode, eps = fused["qk_norm"], fused["norm_eps"]
        return (qk_norm(q, fused.get("q_norm_weight"), mode=mode, eps=eps, backend=self.backend),
                qk_norm(k, fused.get("k_norm_weight"), mode=mode, eps=eps, backend=self.backend))


class MultiQueryAttention(GroupedQueryAttention):
    """Multi-query attention: :class:`GroupedQueryAttention` with one KV head."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int | None = None, **kwargs) -> None:
        kwargs.pop("num_kv_heads", None)
        super().__init__(hidden_size, num_heads, 1, head_dim, **kwargs)


# ------------------------------------------------------------------------ MultiheadAttention


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in `torch.nn.MultiheadAttention` running attnkit's fused attention when it can.

    Same constructor, parameters, `state_dict` and `forward` signature and return values as
    `torch.nn.MultiheadAttention` (it is a subclass). With `need_weights=False` and no mask other
    than a causal hint on a square attention (or none), no key padding mask, no dropout in
    training, no `add_bias_kv`/`add_zero_attn`, the fused kernels run; every other case runs
    PyTorch's own implementation, so results are exact in every case.

    Inside a `torch.nn.TransformerEncoderLayer`, torch's inference fast path
    (`torch._transformer_encoder_layer_fwd`, taken in `eval()` under `no_grad`/`inference_mode`)
    reads the layer's `self_attn` weights and never calls `self_attn`. This module keeps that fast
    path off for any layer that contains it (torch skips it when a submodule has forward hooks; a
    no-op pre-hook is registered for that), so the replacement runs in inference too.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_forward_pre_hook(_bypass_torch_fast_path)

    def fused_refusal(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                      average_attn_weights=True, is_causal=False) -> str | None:
        """Why the fused path cannot serve this call (None when it can).

        Takes the arguments of :meth:`forward`, with the same defaults, positionally or by keyword.
        """
        if need_weights:
            return "need_weights=True (attention weights are not materialised by the kernels)"
        if key_padding_mask is not None:
            return "key_padding_mask is set"
        if self.training and self.dropout > 0:
            return "dropout in training"
        if self.bias_k is not None or self.add_zero_attn:
            return "add_bias_kv/add_zero_attn"
        if query.is_nested or key.is_nested or value.is_nested:
            return "nested tensors"
        if query.dim() not in (2, 3):
            return "unsupported input rank"
        tdim = 0 if (query.dim() == 2 or not self.batch_first) else 1
        if attn_mask is not None:
            if not is_causal or query.shape[tdim] != key.shape[tdim]:
                return "attn_mask other than a causal hint on square attention"
        elif is_causal:
            return "is_causal without attn_mask (PyTorch raises; defer to it)"
        return None

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        reason = self.fused_refusal(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                    attn_mask=attn_mask, is_causal=is_causal)
        if reason is not None:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # now [T, B, E] as torch's functional path uses
        E, H = self.embed_dim, self.num_heads
        hd = E // H
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        T, B = query.shape[:2]
        S = key.shape[0]
        q = F.linear(query, w_q, b_q).view(T, B, H, hd).transpose(0, 1)
        k = F.linear(key, w_k, b_k).view(S, B, H, hd).transpose(0, 1)
        v = F.linear(value, w_v, b_v).view(S, B, H, hd).transpose(0, 1)
        o = attention(q, k, v, causal=attn_mask is not None and is_causal)  # [B, T, H, hd]
        out = F.linear(o.reshape(B, T, E), self.out_proj.weight, self.out_proj.bias)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def _bypass_torch_fast_path(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that changes nothing. Its presence makes `TransformerEncoderLayer.forward`
    take its regular path ("forward pre-/hooks are attached to the module"), which calls
    `self_attn`, instead of the fused C++ fast path that would bypass attnkit."""
    return None


def _mha_kwargs(m: nn.MultiheadAttention) -> dict:
    return dict(embed_dim=m.embed_dim, num_heads=m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
                add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, kdim=m.kdim, vdim=m.vdim,
                batch_first=m.batch_first)


def replace_multihead_attention(model: nn.Module) -> nn.Module:
    """Swap every `torch.nn.MultiheadAttention` inside `model` for :class:`MultiheadAttention`, in place,
    keeping weights, device, dtype and training mode. Returns `model` (or the replacement if `model`
    itself is one).

    The replacement also takes effect under `torch.nn.TransformerEncoder(Layer)` in inference
    (`eval()` + `no_grad`/`inference_mode`), where torch's fused fast path would otherwise skip
    `self_attn`: see :class:`MultiheadAttention`."""
    if isinstance(model, nn.MultiheadAttention) and not isinstance(model, MultiheadAttention):
        return _swap(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.MultiheadAttention) and not isinstance(child, MultiheadAttention):
            setattr(model, name, _swap(child))
        else:
            replace_multihead_attention(child)
    return model


def _swap(m: nn.MultiheadAttention) -> MultiheadAttention:
    ref = m.out_proj.weight
    new = MultiheadAttention(**_mha_kwargs(m), device=ref.device, dtype=ref.dtype)
    new.load_state_dict(m.state_dict(), strict=True)
    new.train(m.training)
    return new


# ----------------------------------------------------------------------------------- conversion


def _pool_heads(w: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Mean-pool the output rows of a projection `[heads*head_dim, ...]` over contiguous head groups."""
    rest = w.shape[1:]
    return w.reshape(groups, heads // groups, head_dim, *rest).mean(1).reshape(groups * head_dim, *rest)


@torch.no_grad()
def convert_mha_to_gqa(module: nn.Module, num_kv_heads: int) -> GroupedQueryAttention:
    """Convert a `torch.nn.MultiheadAttention` (self-attention) or a :class:`GroupedQueryAttention` to a
    :class:`GroupedQueryAttention` with `num_kv_heads` KV heads, mean-pooling the K/V projection heads
    (weights and biases) of each group — the GQA paper's recipe before uptraining.

    From an MHA the result is non-causal, without RoPE, with biases as the source had them; with
    `num_kv_heads == num_heads` its outputs equal the source's.
    """
    if isinstance(module, GroupedQueryAttention):
        H, src_kv, D = module.num_heads, module.num_kv_heads, module.head_dim
        if num_kv_heads < 1 or src_kv % num_kv_heads:
            raise ValueError(f"num_kv_heads must divide the source's {src_kv} KV heads, got {num_kv_heads}")
        w = module.q_proj.weight
        out = GroupedQueryAttention(module.hidden_size, H, num_kv_heads, D, bias=module.q_proj.bias is not None,
                                    qk_norm=module.qk_norm, causal=module.causal, rope_theta=module.rope_theta,
                                    norm_eps=module.norm_eps, backend=module.backend, device=w.device, dtype=w.dtype)
        sd = module.state_dict()
        for p in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                key = f"{p}.{kind}"
                if key in sd:
                    sd[key] = _pool_heads(sd[key], src_kv, num_kv_heads, D)
        out.load_state_dict(sd, strict=True)
        return out
    if not isinstance(module, nn.MultiheadAttention):
        raise TypeError(f"module must be a torch.nn.MultiheadAttention or GroupedQueryAttention, "
                        f"got {type(module).__name__}")
    if not module._qkv_same_embed_dim:
        raise ValueError("module must be a self-attention MultiheadAttention (kdim == vdim == embed_dim)")
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError("module with add_bias_kv/add_zero_attn cannot be converted")
    E, H = module.embed_dim, module.num_heads
    D = E // H
    if num_kv_heads < 1 or H % num_kv_heads:
        raise ValueError(f"num_kv_heads must divide num_heads ({H}), got {num_kv_heads}")
    w = module.in_proj_weight
    bias = module.in_proj_bias is not None
    out = GroupedQueryAttention(E, H, num_kv_heads, D, bias=bias, causal=False, device=w.device, dtype=w.dtype)
    w_q, w_k, w_v = w.chunk(3)
    out.q_proj.weight.copy_(w_q)
    out.k_proj.weight.copy_(_pool_heads(w_k, H, num_kv_heads, D))
    out.v_proj.weight.copy_(_pool_heads(w_v, H, num_kv_heads, D))
    out.o_proj.weight.copy_(module.out_proj.weight)
    if bias:
        b_q, b_k, b_v = module.in_proj_bias.chunk(3)
        out.q_proj.bias.copy_(b_q)
        out.k_proj.bias.copy_(_pool_heads(b_k, H, num_kv_heads, D))
        out.v_proj.bias.copy_(_pool_heads(b_v, H, num_kv_heads, D))
        out.o_proj.bias.copy_(module.out_proj.bias)
    return out
