"""Context-parallel softmax attention: all-gather of K/V (with `Hk` heads) and a log-sum-exp merge.

Design (the one Llama 3 trains with; see `docs/distributed.md` for the comparison with ring
attention): every rank starts one async all-gather of its packed `[K | V]` shard (`Hk` heads,
never repeated to `H`) and, while it travels, attends its query chunks to the keys of the same
chunk (the diagonal block, `causal` as given). Once the gather is done each query chunk attends to
every other key it may see (fully visible, no mask) and the two partial results are merged with
their log-sum-exps (`return_lse=True` of the local op). The backward of the all-gather is one
reduce-scatter of the same size that returns dK/dV to the ranks that own them; everything else is
the local op's autograd.

With a sliding window the blocks are not fully visible, so each query chunk makes a single call
over the key range its window can reach, with the window shifted to the chunk's global position
(the local op aligns queries bottom-right).
"""

from __future__ import annotations

import inspect

import torch

from .._validation import check_softcap, check_window
from ..ops.softmax import api as _api
from . import _comm
from .sequence import check_layout, check_local_length, chunk_ranges, reassemble

__all__ = ["attention"]


def _local_supports(name: str) -> bool:
    return name in inspect.signature(_api.attention).parameters


def _merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Softmax over the union of two key sets from the two partial results (compute dtype).

    `o [B, t, H, Dv]`, `lse [B, H, t]`. A row neither part sees (both lse -inf) gives zeros, without
    NaN in the forward or the backward.
    """
    m = torch.maximum(l1, l2).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e1, e2 = torch.exp(l1 - m), torch.exp(l2 - m)
    s = e1 + e2
    s = torch.where(s == 0, torch.ones_like(s), s)
    w1 = (e1 / s).transpose(1, 2)[..., None]  # [B, t, H, 1]
    w2 = (e2 / s).transpose(1, 2)[..., None]
    return w1 * o1.to(l1.dtype) + w2 * o2.to(l1.dtype)


class _Tie(torch.autograd.Function):
    """`out` unchanged, with a zero gradient to `dep`: keeps a gathered tensor in the graph on a rank
    that does not read it, so that its backward collective runs on every rank."""

    @staticmethod
    def forward(ctx, out, dep):
        ctx.shape, ctx.dtype, ctx.device = dep.shape, dep.dtype, dep.device
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, causal: bool = False,
              scale=None, qk_norm: str | None = None, q_norm_weight: torch.Tensor | None = None,
              k_norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6, window=None, softcap=None,
              layout: str = "contiguous", backend: str | None = None) -> torch.Tensor:
    """Context-parallel `attnkit.attention`: `q`, `k`, `v` are this rank's shard of one sequence batch.

    The result is this rank's shard (in `layout`) of the single-process op over the whole sequence.
    K/V travel with their `Hk` heads: one all-gather of `B·T/P·Hk·(D + Dv)` elements per rank in the
    forward and one reduce-scatter of the same size in the backward.

    Args:
        q: `[B, L, H, D]`; k: `[B, L, Hk, D]`; v: `[B, L, Hk, Dv]`, `L = T / P` on every rank, in
            `layout` (see `shard_sequence`).
        group: process group (default: the whole world).
        causal, scale, qk_norm, q_norm_weight, k_norm_weight, norm_eps: as in `attnkit.attention`
            (a tensor `scale` and the norm weights are replicated inputs: each rank's `.grad` is its
            own contribution).
        window: `(left, right)` sliding window in whole-sequence positions (needs a local op with
            window support). softcap: logit softcap (needs a local op with softcap support).
        layout: `"contiguous"` or `"zigzag"` (balances the causal work; the local length must be even).
        backend: backend of the local op (None: automatic).

    Returns:
        `o [B, L, H, Dv]` in q's dtype.

    Example:
        >>> q_l, k_l, v_l = (akd.shard_sequence(x, layout="zigzag") for x in (q, k, v))
        >>> o_l = akd.attention(q_l, k_l, v_l, causal=True, layout="zigzag")
    """
    call = _api._prepare_attention(q, k, v, causal=causal, scale=scale, qk_norm=qk_norm,
                                   q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps)
    kw = call.kwargs
    layout = check_layout(layout)
    window, softcap = check_window(window, kw["causal"]), check_softcap(softcap)  # (-1, -1) / 0.0: off
    window, softcap = (None if window == (-1, -1) else window), (softcap or None)
    for name, on in (("window", window is not None), ("softcap", softcap is not None)):
        if on and not _local_supports(name):
            raise NotImplementedError(f"{name} needs attnkit.attention with {name} support, which this build "
                                      f"lacks; call without {name}")
    group, world, rank = _comm.resolve_group(group)
    B, L, H, D = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    if k.shape[1] != L:
        raise ValueError(f"k and v must hold the same tokens as q (self-attention over one sequence): "
                         f"length {L}, got {k.shape[1]}")
    check_local_length("q", L, layout)
    scale_t = kw["scale"]
    grad_flags = [int(torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad)
                  for x in (q, k, v, q_norm_weight, k_norm_weight, scale_t)]
    _comm.check_same_everywhere(
        "the shard shapes, dtype, options and requires_grad of q, k, v",
        [B, L, H, Hk, D, Dv, {torch.float64: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4}.get(q.dtype, 0),
         int(kw["causal"]), int(layout == "zigzag"), ["rms", "l2", None].index(kw["qk_norm"]),
         *(window or (-2, -2)), int(softcap is not None), *grad_flags],
        group, world, q.device, q, k, v)

    local = dict(scale=scale_t, qk_norm=kw["qk_norm"], q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight,
                 norm_eps=kw["norm_eps"], backend=backend)
    if softcap is not None:
        local["softcap"] = softcap
    causal = kw["causal"]
    T = L * world
    ranges = chunk_ranges(layout, world, rank, T)
    n_chunks = len(ranges)
    Lc = L // n_chunks
    q_chunks = q.split(Lc, dim=1)

    kv = torch.cat([k, v], dim=-1)  # [B, L, Hk, D + Dv]: one collective for both
    pending = _comm.gather_start(kv, group, world)

    if window is not None:
        full = reassemble(_comm.gather_finish(kv, pending), layout, dim=1)  # [B, T, Hk, D + Dv]
        outs = []
        left, right = window
        for qc, (c, _) in zip(q_chunks, ranges):
            e = c + Lc if causal else (T if right == -1 else min(T, c + Lc + right))
            a = 0 if left == -1 else max(0, c - left)
            shift = e - Lc - c
            win = (-1 if left == -1 else left + shift, -1 if right == -1 else right - shift)
            outs.append(_api.attention(qc, full[:, a:e, :, :D], full[:, a:e, :, D:], causal=causal, window=win,
                                       **local))
        return torch.cat(outs, dim=1) if n_chunks > 1 else outs[0]

    # the diagonal blocks (this rank's own keys) while K/V travel
    k_chunks, v_chunks = k.split(Lc, dim=1), v.split(Lc, dim=1)
    diag = [_api.attention(qc, kc, vc, causal=causal, return_lse=True, **local)
            for qc, kc, vc in zip(q_chunks, k_chunks, v_chunks)]
    gathered = _comm.gather_finish(kv, pending)  # [P, B, L, Hk, D + Dv]
    # a fully visible block is order-free: gather the other visible chunks straight from the
    # received buffer (one copy), never reassembling the whole sequence
    units = [(j, u, chunk_ranges(layout, world, j, T)[u][0]) for j in range(world) for u in range(n_chunks)]
    outs, used = [], False
    for (o1, l1), qc, (c, _) in zip(diag, q_chunks, ranges):
        pieces = [gathered[j][:, u * Lc:(u + 1) * Lc] for j, u, start in units
                  if start != c and (start < c or not causal)]
        if not pieces:
            outs.append(o1)
            continue
        used = True
        kv_other = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        o2, l2 = _api.attention(qc, kv_other[..., :D], kv_other[..., D:], causal=False, return_lse=True, **local)
        outs.append(_merge(o1, l1, o2, l2).to(q.dtype))
    o = torch.cat(outs, dim=1) if n_chunks > 1 else outs[0]
    if not used and gathered.requires_grad:
        o = _Tie.apply(o, gathered)
    return o
