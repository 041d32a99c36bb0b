"""Reference (pure PyTorch) softmax attention: the meaning of `attention`, `attention_decode` and
`qk_norm`.

Maths runs in float32 for float16/bfloat16/float32 inputs and in float64 for float64 inputs;
outputs are cast back to the input dtype, `lse` stays in the compute dtype. GQA is done by
viewing the `H` query heads as `[Hk, G]` groups, never by repeating K/V. Queries are processed
in blocks so that one block's scores stay under `MAX_SCORE_ELEMENTS`; with autograd, each block
is checkpointed so that the backward pass does not keep every block's probabilities alive.
Semantics decisions are written down in `docs/softmax.md`.

These functions take the normalised keyword arguments of `docs/contracts.md` and do not
validate; call the public functions in `attnkit` instead.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# Most score elements (batch rows x heads x query rows x keys) one block may hold.
MAX_SCORE_ELEMENTS = 1 << 26


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize(x: torch.Tensor, weight: torch.Tensor | None, mode: str, eps: float) -> torch.Tensor:
    """Per-head norm over the last dim, in `x`'s dtype (callers pass the compute dtype).

    `rms`: `x * rsqrt(mean(x², -1) + eps) * w`; `l2`: `x * rsqrt(sum(x², -1) + eps) * w`.
    """
    sq = x.square()
    stat = sq.mean(-1, keepdim=True) if mode == "rms" else sq.sum(-1, keepdim=True)
    y = x * torch.rsqrt(stat + eps)
    if weight is not None:
        y = y * weight.to(x.dtype)
    return y


def _block_sizes(B: int, H: int, T: int, S: int) -> tuple[int, int]:
    """Batch rows and query rows per block so that `b * H * t * S <= MAX_SCORE_ELEMENTS`."""
    row = H * max(S, 1)  # scores of one query position of one batch row
    rows = max(1, min(B, MAX_SCORE_ELEMENTS // row))
    if rows < B:
        return rows, 1
    return max(B, 1), max(1, min(T, MAX_SCORE_ELEMENTS // (max(B, 1) * row)))


def _softmax_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   limit: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of attention.

    Args:
        q: `[b, Hk, G, t, D]` (already normalised and scaled).
        k: `[b, Hk, S, D]`; v: `[b, Hk, S, Dv]`.
        limit: `[b or 1, t]` int64; query row `i` sees keys `s <= limit[., i]`. None: all keys.

    Returns:
        `o [b, Hk, G, t, Dv]` and `lse [b, Hk, G, t]`; rows that see no key give 0 and -inf.
    """
    b, hk, g, t, d = q.shape
    s, dv = k.shape[2], v.shape[3]
    # [b, Hk, G*t, D] @ [b, Hk, D, S] -> [b, Hk, G*t, S]: the G query heads of a group share K.
    scores = (q.reshape(b, hk, g * t, d) @ k.transpose(-1, -2)).view(b, hk, g, t, s)
    if limit is not None:
        visible = torch.arange(s, device=q.device) <= limit[..., None]  # [b|1, t, S]
        scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    # Softmax is shift invariant, so the max is a constant (no gradient); a row that sees no key
    # (max -inf) is shifted by 0 so that its exps are exact zeros instead of NaN.
    if s > 0:
        m = scores.detach().amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    else:
        m = scores.new_zeros(b, hk, g, t, 1)
    e = torch.exp(scores - m)
    l = e.sum(-1)  # [b, Hk, G, t]
    empty = l == 0
    denom = torch.where(empty, torch.ones_like(l), l)
    # [b, Hk, G*t, S] @ [b, Hk, S, Dv] -> [b, Hk, G*t, Dv]
    o = (e.view(b, hk, g * t, s) @ v).view(b, hk, g, t, dv) / denom[..., None]
    lse = torch.where(empty, torch.full_like(l, float("-inf")), m.squeeze(-1) + torch.log(denom))
    return o, lse


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           limit: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked softmax attention on tensors already in the compute dtype.

    Args:
        q: `[B, T, H, D]`, normalised and multiplied by the scale.
        k: `[B, S, Hk, D]`; v: `[B, S, Hk, Dv]`.
        limit: `[B or 1, T]` int64, the last key index each query row sees; None: every key.

    Returns:
        `o [B, T, H, Dv]` and `lse [B, H, T]`.
    """
    B, T, H, D = q.shape
    S, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hk
    # Query head h = hk * G + g reads KV head hk: [B, T, H, D] -> [B, Hk, G, T, D] (a view).
    qh = q.unflatten(2, (Hk, G)).permute(0, 2, 3, 1, 4)
    kh = k.permute(0, 2, 1, 3)  # [B, Hk, S, D]
    vh = v.permute(0, 2, 1, 3)  # [B, Hk, S, Dv]
    rows, cols = _block_sizes(B, H, T, S)
    starts_b = range(0, max(B, 1), rows)
    starts_t = range(0, max(T, 1), cols)
    recompute = (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
                 and len(starts_b) * len(starts_t) > 1)
    o_rows, lse_rows = [], []
    for b0 in starts_b:
        bs = slice(b0, b0 + rows)
        o_blocks, lse_blocks = [], []
        for t0 in starts_t:
            ts = slice(t0, t0 + cols)
            lim = None
            if limit is not None:
                lim = limit[:, ts] if limit.shape[0] == 1 else limit[bs, ts]
            args = (qh[bs, :, :, ts], kh[bs], vh[bs], lim)
            if recompute:
                o_blk, lse_blk = checkpoint(_softmax_block, *args, use_reentrant=False)
            else:
                o_blk, lse_blk = _softmax_block(*args)
            o_blocks.append(o_blk)
            lse_blocks.append(lse_blk)
        o_rows.append(torch.cat(o_blocks, dim=3))
        lse_rows.append(torch.cat(lse_blocks, dim=3))
    o = torch.cat(o_rows, dim=0)  # [B, Hk, G, T, Dv]
    lse = torch.cat(lse_rows, dim=0)  # [B, Hk, G, T]
    return o.permute(0, 3, 1, 2, 4).reshape(B, T, H, Dv), lse.reshape(B, H, T)


def causal_limit(T: int, S: int, device: torch.device) -> torch.Tensor:
    """Bottom-right causal rule: query `t` sees keys `s <= t + S - T`. Returns `[1, T]` int64."""
    return (torch.arange(T, device=device) + (S - T))[None]


def attention(q, k, v, causal, scale, qk_norm, q_norm_weight, k_norm_weight, norm_eps,
              cu_seqlens_q, cu_seqlens_k, return_lse):
    """Softmax attention (see `attnkit.attention`); differentiable by autograd."""
    cdt = compute_dtype(q.dtype)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    if qk_norm is not None:
        qc = normalize(qc, q_norm_weight, qk_norm, norm_eps)
        kc = normalize(kc, k_norm_weight, qk_norm, norm_eps)
    qc = qc * (scale.to(cdt) if isinstance(scale, torch.Tensor) else scale)

    if cu_seqlens_q is None:
        limit = causal_limit(q.shape[1], k.shape[1], q.device) if causal else None
        o, lse = attend(qc, kc, vc, limit)
    else:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs, lses = [], []
        for i in range(len(cq) - 1):
            qi, ki, vi = qc[:, cq[i]:cq[i + 1]], kc[:, ck[i]:ck[i + 1]], vc[:, ck[i]:ck[i + 1]]
            limit = causal_limit(qi.shape[1], ki.shape[1], q.device) if causal else None
            o_i, lse_i = attend(qi, ki, vi, limit)
            outs.append(o_i)
            lses.append(lse_i)
        o, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=2)
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o


@torch.no_grad()
def attention_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale):
    """Decoding attention over a KV cache (see `attnkit.attention_decode`); appends in place."""
    B, Tq = q.shape[:2]
    lens = cache_seqlens.to(torch.long)  # [B]
    steps = torch.arange(Tq, device=q.device)
    if k_new is not None:
        pos = lens[:, None] + steps  # [B, Tq]: where row b's new tokens go
        rows = torch.arange(B, device=q.device)[:, None].expand(B, Tq)
        k_cache[rows, pos] = k_new
        v_cache[rows, pos] = v_new
        lens = lens + Tq
    cdt = compute_dtype(q.dtype)
    # The queries are the last Tq of the lens[b] valid positions: query t sits at lens[b] - Tq + t
    # and sees every key up to its own position (bottom-right causal); nothing past lens[b].
    limit = lens[:, None] - Tq + steps  # [B, Tq]
    o, _ = attend(q.to(cdt) * scale, k_cache.to(cdt), v_cache.to(cdt), limit)
    return o.to(q.dtype)


def qk_norm(x, weight, mode, eps):
    """Standalone per-head norm (see `attnkit.qk_norm`); differentiable by autograd."""
    return normalize(x.to(compute_dtype(x.dtype)), weight, mode, eps).to(x.dtype)
