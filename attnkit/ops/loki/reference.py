"""Loki in plain PyTorch: the meaning of every op of the family (see docs/loki.md).

Maths in float32 (float64 for float64 inputs, for golden runs); no validation here: the public
functions in ``api.py`` validate and normalise first.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (golden runs); every other float dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def key_covariance(keys: torch.Tensor, center: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-head second moment of `keys [N, Hk, D]` (of the centred keys if `center`), in
    float64: ``(cov [Hk, D, D], mean [Hk, D] or None)``."""
    x = keys.detach().to(torch.float64)
    mean = x.mean(dim=0) if center else None  # [Hk, D]
    if mean is not None:
        x = x - mean
    # [N, Hk, D] x [N, Hk, D] -> [Hk, D, D]
    cov = torch.einsum("nhd,nhe->hde", x, x) / x.shape[0]
    return 0.5 * (cov + cov.transpose(-1, -2)), mean  # exactly symmetric for eigh


def eigh_descending(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA from a symmetric `cov [Hk, D, D]`: ``(components [Hk, D, D], ratio [Hk, D])``.

    Eigenvector columns sorted by eigenvalue, descending, each with its largest-magnitude entry
    positive (the first such entry on ties); ratios of the eigenvalues clamped at 0. A head
    with zero variance gets all-zero ratios (0/0 explains nothing).
    """
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals = evals.flip(-1).clamp_min(0.0)
    evecs = evecs.flip(-1)
    # Sign convention: the largest-|.| entry of each column is positive.
    pivot = evecs.abs().argmax(dim=-2, keepdim=True)  # [Hk, 1, D]
    sign = torch.where(evecs.gather(-2, pivot) < 0, -1.0, 1.0).to(evecs.dtype)
    evecs = evecs * sign
    total = evals.sum(dim=-1, keepdim=True)
    ratio = torch.where(total > 0, evals / total.clamp_min(torch.finfo(evals.dtype).tiny),
                        torch.zeros_like(evals))
    return evecs, ratio


def rotate(x: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """`x [..., Hk, D] @ components[h]` per head, computed in float32 (float64 for float64 x),
    returned in x's dtype."""
    cd = compute_dtype(x.dtype)
    # [..., Hk, D] x [Hk, D, E] -> [..., Hk, E]
    y = torch.einsum("...hd,hde->...he", x.to(cd), components.to(cd))
    return y.to(x.dtype)


def cache_slots(block_table: torch.Tensor | None, block_size: int, rows: torch.Tensor,
                pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) index into a cache of token `pos` of row `rows` (same shapes): `(row, pos)`
    for a contiguous cache, `(block_table[row, pos // block_size], pos % block_size)` for a paged
    `[num_blocks, block_size, ...]` one."""
    if block_table is None:
        return rows, pos
    return block_table[rows, pos // block_size].long(), pos % block_size


def unpage(cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
    """A paged cache `[num_blocks, block_size, Hk, X]` as the padded `[B, Smax, Hk, X]` it stands for
    (`Smax = max_blocks * block_size`): positions `< cache_seqlens[b]` are gathered through the
    table, every other slot is zero. Only the table entries and blocks of valid tokens are read."""
    B, max_blocks = block_table.shape
    block_size = cache.shape[1]
    Smax = max_blocks * block_size
    out = cache.new_zeros(B, Smax, *cache.shape[2:])
    pos = torch.arange(Smax, device=cache.device)
    valid = pos[None] < cache_seqlens.long()[:, None]  # [B, Smax]
    rows = torch.arange(B, device=cache.device)[:, None].expand(B, Smax)[valid]
    i0, i1 = cache_slots(block_table, block_size, rows, pos[None].expand(B, Smax)[valid])
    out[valid] = cache[i0, i1]
    return out


def loki_attention_decode(*, q: torch.Tensor, k_cache_rot: torch.Tensor, v_cache: torch.Tensor,
                          cache_seqlens: torch.Tensor, components: torch.Tensor, rank: int,
                          top_k: int, scale: float, selection: str,
                          block_table: torch.Tensor | None = None) -> torch.Tensor:
    """Reference Loki decode (contract in docs/contracts.md): `q [B, 1, H, D]` unrotated,
    caches `[B, Smax, Hk, D/Dv]` (or paged `[num_blocks, block_size, Hk, D/Dv]` through
    `block_table [B, max_blocks]`), `components [Hk, D, D]` -> `o [B, 1, H, Dv]` in q's dtype.

    Positions at or past ``cache_seqlens[b]`` are never read into the result: their scores are
    replaced before selection and their gathered keys/values are masked out afterwards, so
    garbage (even NaN) in the unused part of the caches cannot leak into the output. A paged
    cache is first gathered into the padded layout, reading only the blocks of valid tokens.
    """
    if block_table is not None:
        with torch.no_grad():
            k_cache_rot = unpage(k_cache_rot, block_table, cache_seqlens)
            v_cache = unpage(v_cache, block_table, cache_seqlens)
    B, _, H, D = q.shape
    Smax, Hk, Dv = v_cache.shape[1], v_cache.shape[2], v_cache.shape[3]
    G = H // Hk
    out_shape = (B, 1, H, Dv)
    if B == 0 or H == 0 or Smax == 0:
        return torch.zeros(out_shape, dtype=q.dtype, device=q.device)
    cd = compute_dtype(q.dtype)
    with torch.no_grad():
        lens = cache_seqlens.to(torch.int64)  # [B]
        # Query head h = i_hk * G + g reads KV head i_hk: [B, H, D] -> [B, Hk, G, D]
        q_rot = torch.einsum("bkgd,kde->bkge", q[:, 0].to(cd).reshape(B, Hk, G, D), components.to(cd))
        k = k_cache_rot.to(cd).transpose(1, 2)  # [B, Hk, Smax, D]
        v = v_cache.to(cd).transpose(1, 2)  # [B, Hk, Smax, Dv]

        # Approximate scores from the leading `rank` rotated dims: [B, Hk, G, Smax]
        approx = torch.einsum("bkgr,bksr->bkgs", q_rot[..., :rank], k[..., :rank])
        if selection == "group":
            approx = approx.amax(dim=2, keepdim=True)  # [B, Hk, 1, Smax]: one choice per KV head
        # Invalid positions must rank strictly below every valid one, even a valid -inf score.
        valid = torch.arange(Smax, device=q.device) < lens[:, None]  # [B, Smax]
        lowest = torch.finfo(cd).min
        approx = torch.where(approx == float("-inf"), lowest, approx)
        approx = approx.masked_fill(~valid[:, None, None, :], float("-inf"))
        idx = approx.topk(min(top_k, Smax), dim=-1).indices  # [B, Hk, G or 1, kk]
        # A row shorter than top_k selected some invalid positions: drop them by index.
        keep = idx < lens[:, None, None, None]  # [B, Hk, G or 1, kk]

        # Gather the selected keys and values: [B, Hk, G or 1, kk, D/Dv]. Dropped values are
        # zeroed (0 * NaN would be NaN); dropped logits are masked below.
        b_i = torch.arange(B, device=q.device)[:, None, None, None]
        h_i = torch.arange(Hk, device=q.device)[None, :, None, None]
        k_sel = k[b_i, h_i, idx]
        v_sel = v[b_i, h_i, idx].masked_fill(~keep[..., None], 0.0)
        keep = keep.expand(B, Hk, G, keep.shape[-1])
        k_sel = k_sel.expand(B, Hk, G, *k_sel.shape[-2:])
        v_sel = v_sel.expand(B, Hk, G, *v_sel.shape[-2:])

        # Exact softmax attention over the kept positions, full-dimension rotated keys.
        logits = scale * torch.einsum("bkgd,bkgjd->bkgj", q_rot, k_sel)  # [B, Hk, G, kk]
        logits = logits.masked_fill(~keep, float("-inf"))
        m = logits.amax(dim=-1, keepdim=True)
        m = torch.where(m == float("-inf"), 0.0, m)  # rows with nothing kept
        p = torch.exp(logits - m)  # masked entries: exp(-inf) = 0
        o = torch.einsum("bkgj,bkgjd->bkgd", p, v_sel) / p.sum(dim=-1, keepdim=True)
        # A row of length 0 attends to nothing and outputs zeros.
        o = o.masked_fill((lens == 0)[:, None, None, None], 0.0)
        return o.reshape(out_shape).to(q.dtype)
