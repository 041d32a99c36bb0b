"""Reference (pure PyTorch) softmax attention: the meaning of `attention`, `attention_decode` and
`qk_norm`.

Maths runs in float32 for float16/bfloat16/float32 inputs and in float64 for float64 inputs;
outputs are cast back to the input dtype, `lse` stays in the compute dtype. GQA is done by
viewing the `H` query heads as `[Hk, G]` groups, never by repeating K/V. Queries are processed
in blocks so that one block's scores stay under `MAX_SCORE_ELEMENTS`; a block reads only the keys
its rows' windows (causal diagonal, sliding window) reach, so windowed attention costs
`O(T · window)`; with autograd, each block is checkpointed so that the backward pass does not
keep every block's probabilities alive.
Semantics decisions are written down in `docs/softmax.md`.

These functions take the normalised keyword arguments of `docs/contracts.md` and do not
validate; call the public functions in `attnkit` instead.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# Most score elements (batch rows x heads x query rows x keys) one block may hold.
MAX_SCORE_ELEMENTS = 1 << 26
# Query rows per block when the keys are bounded (window / causal): see `_bounded_rows`.
MIN_BOUNDED_ROWS = 32
MAX_BOUNDED_ROWS = 256


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


def _softmax_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor | None,
                   hi: torch.Tensor | None, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of attention.

    Args:
        q: `[b, Hk, G, t, D]` (already normalised and scaled).
        k: `[b, Hk, S, D]`; v: `[b, Hk, S, Dv]`.
        lo, hi: `[b or 1, t]` int64; query row `i` sees keys `lo[., i] <= s <= hi[., i]`.
            None: no bound on that side.
        softcap: `c > 0` caps the (scaled) logits to `c * tanh(x / c)`; 0 = off.

    Returns:
        `o [b, Hk, G, t, Dv]` and `lse [b, Hk, G, t]`; rows that see no key give 0 and -inf.
    """
    b, hk, g, t, d = q.shape
    s, dv = k.shape[2], v.shape[3]
    # [b, Hk, G*t, D] @ [b, Hk, D, S] -> [b, Hk, G*t, S]: the G query heads of a group share K.
    scores = (q.reshape(b, hk, g * t, d) @ k.transpose(-1, -2)).view(b, hk, g, t, s)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if lo is not None or hi is not None:
        pos = torch.arange(s, device=q.device)
        visible = None
        if hi is not None:
            visible = pos <= hi[..., None]  # [b|1, t, S]
        if lo is not None:
            above = pos >= lo[..., None]
            visible = above if visible is None else visible & above
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


def _bounded_rows(lo: torch.Tensor | None, hi: torch.Tensor | None) -> int | None:
    """Query rows per block when the keys are bounded (window or causal), None when not.

    A block of `t` rows attends to the union of its rows' key ranges, about `t + W - 1` keys
    for a window of `W` keys, so the work is about `T · (t + W)` score elements: `t` is kept near
    the window (between `MIN_BOUNDED_ROWS` and `MAX_BOUNDED_ROWS`); causal without a left bound
    uses `MAX_BOUNDED_ROWS` (the blocks above the diagonal then cost about `T · t / 2` extra).
    """
    if lo is None and hi is None:
        return None
    if lo is None or hi is None or lo.numel() == 0:
        return MAX_BOUNDED_ROWS
    span = int((hi - lo).max()) + 1  # keys one row sees, at most
    return max(MIN_BOUNDED_ROWS, min(MAX_BOUNDED_ROWS, span))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor | None,
           hi: torch.Tensor | None, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked softmax attention on tensors already in the compute dtype.

    Each block of query rows reads only the keys between its rows' smallest `lo` and largest
    `hi`: key blocks entirely outside every row's window (or past the causal diagonal) are never
    touched, so a windowed call costs `O(T · W)`, not `O(T · S)`. Keys inside that range but
    outside a row's own window are masked as before; a masked key contributes an exact 0, so
    dropping the keys outside the range changes no value (docs/softmax.md, "Blocking").

    Args:
        q: `[B, T, H, D]`, normalised and multiplied by the scale.
        k: `[B, S, Hk, D]`; v: `[B, S, Hk, Dv]`.
        lo, hi: `[B or 1, T]` int64, the first and last key index each query row sees; None: no
            bound on that side.
        softcap: logit cap (0 = off).

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
    bounded = _bounded_rows(lo, hi)
    if bounded is not None:
        cols = min(cols, bounded)
    starts_b = range(0, max(B, 1), rows)
    starts_t = range(0, max(T, 1), cols)
    recompute = (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
                 and len(starts_b) * len(starts_t) > 1)
    # Per query row, the smallest first key and the largest last key over the batch rows (on
    # the host: the key range of each block is sliced with Python ints).
    lo_row = None if lo is None else lo.amin(0).cpu()
    hi_row = None if hi is None else hi.amax(0).cpu()

    def cut(lim, bs, ts, k0):
        if lim is None:
            return None
        return (lim[:, ts] if lim.shape[0] == 1 else lim[bs, ts]) - k0

    def key_range(ts) -> tuple[int, int]:
        """`[k0, k1)`: the keys some row of `ts` sees (empty when none does)."""
        k0, k1 = 0, S
        if lo_row is not None and lo_row[ts].numel():
            k0 = min(max(int(lo_row[ts].min()), 0), S)
        if hi_row is not None and hi_row[ts].numel():
            k1 = min(max(int(hi_row[ts].max()) + 1, 0), S)
        return k0, max(k0, k1)

    o_rows, lse_rows = [], []
    for b0 in starts_b:
        bs = slice(b0, b0 + rows)
        o_blocks, lse_blocks = [], []
        for t0 in starts_t:
            ts = slice(t0, t0 + cols)
            k0, k1 = key_range(ts)
            args = (qh[bs, :, :, ts], kh[bs, :, k0:k1], vh[bs, :, k0:k1], cut(lo, bs, ts, k0),
                    cut(hi, bs, ts, k0), softcap)
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


def window_limits(T: int, S: int, causal: bool, window: tuple[int, int],
                  device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Key bounds of a `[T, S]` attention: with `p = t + S - T` (bottom-right aligned), query `t`
    sees keys `p - left <= s <= p + right` (`-1`: unbounded side) and `s <= p` when causal.

    Returns `(lo, hi)`, each `[1, T]` int64 or None (no bound on that side).
    """
    left, right = window
    p = (torch.arange(T, device=device) + (S - T))[None]
    lo = p - left if left >= 0 else None
    if causal:
        hi = p + min(right, 0) if right >= 0 else p
    else:
        hi = p + right if right >= 0 else None
    return lo, hi


def attention(q, k, v, causal, scale, qk_norm, q_norm_weight, k_norm_weight, norm_eps,
              cu_seqlens_q, cu_seqlens_k, return_lse, window=(-1, -1), softcap=0.0):
    """Softmax attention (see `attnkit.attention`); differentiable by autograd."""
    cdt = compute_dtype(q.dtype)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    if qk_norm is not None:
        qc = normalize(qc, q_norm_weight, qk_norm, norm_eps)
        kc = normalize(kc, k_norm_weight, qk_norm, norm_eps)
    qc = qc * (scale.to(cdt) if isinstance(scale, torch.Tensor) else scale)

    if cu_seqlens_q is None:
        lo, hi = window_limits(q.shape[1], k.shape[1], causal, window, q.device)
        o, lse = attend(qc, kc, vc, lo, hi, softcap)
    else:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs, lses = [], []
        for i in range(len(cq) - 1):
            qi, ki, vi = qc[:, cq[i]:cq[i + 1]], kc[:, ck[i]:ck[i + 1]], vc[:, ck[i]:ck[i + 1]]
            lo, hi = window_limits(qi.shape[1], ki.shape[1], causal, window, q.device)
            o_i, lse_i = attend(qi, ki, vi, lo, hi, softcap)
            outs.append(o_i)
            lses.append(lse_i)
        o, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=2)
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o


def _cache_slots(block_table: torch.Tensor | None, block_size: int, rows: torch.Tensor,
                 pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) index into a cache for token `pos` of row `rows` (same shapes): `(row, pos)`
    for a contiguous cache, `(block_table[row, pos // bs], pos % bs)` for a paged one."""
    if block_table is None:
        return rows, pos
    return block_table[rows, pos // block_size].long(), pos % block_size


@torch.no_grad()
def attention_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, window=(-1, -1),
                     softcap=0.0, block_table=None):
    """Decoding attention over a KV cache (see `attnkit.attention_decode`); appends in place.

    Only positions `< L_b` of row `b` are read (through `block_table` when paged): they are
    gathered into a zero-padded `[B, max L_b, Hk, D]` copy, so nothing past a row's length
    (stale, NaN, another row's block) can reach the result, not even as `0 * NaN`.
    """
    B, Tq = q.shape[:2]
    block_size = k_cache.shape[1]  # tokens per block when paged
    lens = cache_seqlens.to(torch.long)  # [B]
    steps = torch.arange(Tq, device=q.device)
    if k_new is not None and B > 0 and Tq > 0:
        pos = lens[:, None] + steps  # [B, Tq]: where row b's new tokens go
        rows = torch.arange(B, device=q.device)[:, None].expand(B, Tq)
        i0, i1 = _cache_slots(block_table, block_size, rows, pos)
        k_cache[i0, i1] = k_new
        v_cache[i0, i1] = v_new
    if k_new is not None:
        lens = lens + Tq
    cdt = compute_dtype(q.dtype)
    Hk, D, Dv = k_cache.shape[2], k_cache.shape[3], v_cache.shape[3]
    L = int(lens.max()) if B > 0 else 0
    pos = torch.arange(L, device=q.device)
    valid = pos[None] < lens[:, None]  # [B, L]
    rows = torch.arange(B, device=q.device)[:, None].expand(B, L)
    i0, i1 = _cache_slots(block_table, block_size, rows[valid], pos[None].expand(B, L)[valid])
    k = torch.zeros(B, L, Hk, D, dtype=cdt, device=q.device)
    v = torch.zeros(B, L, Hk, Dv, dtype=cdt, device=q.device)
    k[valid] = k_cache[i0, i1].to(cdt)
    v[valid] = v_cache[i0, i1].to(cdt)
    # The queries are the last Tq of the lens[b] valid positions: query t sits at
    # p = lens[b] - Tq + t and sees the keys p - left <= s <= p (bottom-right causal; the window's
    # right side cannot reach past p), never anything at or past lens[b].
    p = lens[:, None] - Tq + steps  # [B, Tq]
    lo = p - window[0] if window[0] >= 0 else None
    o, _ = attend(q.to(cdt) * scale, k, v, lo, p, softcap)
    return o.to(q.dtype)


def qk_norm(x, weight, mode, eps):
    """Standalone per-head norm (see `attnkit.qk_norm`); differentiable by autograd."""
    return normalize(x.to(compute_dtype(x.dtype)), weight, mode, eps).to(x.dtype)
