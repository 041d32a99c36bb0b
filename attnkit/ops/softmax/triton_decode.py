"""Triton decoding attention over a padded KV cache: flash-decoding (split-KV) with native GQA.

* `_kv_append_kernel` writes `k_new`/`v_new` into the caches at `cache_seqlens[b] + t` (in place,
  before the attention reads them; stream order makes that safe).
* `_attention_decode_fwd_kernel`: program = (KV split, batch row x KV head, block of packed query
  rows). Packed row `r` is query step `t = r // G` of query head `hk * G + r % G`, so all query
  heads of a group and all `Tq` steps (up to `BM` packed rows) share every K/V tile: each cache
  byte is read once per group. Each program writes its split's normalised partial output and
  log-sum-exp.
* `_attention_decode_reduce_kernel` merges the splits (a log-sum-exp weighted sum).

The grid comes from shapes only (`Smax`, never the `cache_seqlens` values): the lengths are read
inside the kernels, so there is no host synchronisation and the op can be captured in a CUDA
graph. Splits that lie past a row's length write an empty partial (`lse = -inf`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common.triton_utils import device_guard, dot_precision, interpreted
from .triton_attention import head_block, load_rows, sm_count, strides4

MAX_SPLITS = 64


def _decode_configs() -> list[triton.Config]:
    """Tile sizes are fixed by `_decode_blocks` (the split layout depends on them); only warps and
    stages are tuned."""
    if interpreted():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]


def _decode_blocks(rows: int, bd: int, bdv: int) -> tuple[int, int]:
    """(packed query rows, keys) per tile: all `Tq * G` rows of a group in one tile up to 64."""
    bm = min(max(16, triton.next_power_of_2(rows)), 64)
    if interpreted():
        return bm, 32
    return bm, 64 if max(bd, bdv) <= 128 else 32


def _num_splits(programs: int, smax: int, bn: int, device: torch.device) -> int:
    """Splits of the cache so that about two waves of programs fill the device (shapes only)."""
    return max(1, min(triton.cdiv(2 * sm_count(device), programs), triton.cdiv(smax, bn), MAX_SPLITS))


# ---------------------------------------------------------------------------------------- kernels


@triton.jit
def _kv_append_kernel(
    k_new, v_new, k_cache, v_cache, cache_seqlens, Smax,
    s_nkb, s_nkt, s_nkh, s_nkd, s_nvb, s_nvt, s_nvh, s_nvd,
    s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd,
    HK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    # program = (new token t, batch row b); writes all HK heads of token t at cache_seqlens[b] + t
    i_t, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    pos = tl.load(cache_seqlens + i_b).to(tl.int64) + i_t
    o_h = tl.arange(0, BH)
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    # positions past Smax are never written (the public op refuses them where it can check)
    m_h = o_h < tl.where(pos < Smax, HK, 0)
    m_k = m_h[:, None] & (o_d < D)[None, :]
    m_v = m_h[:, None] & (o_dv < DV)[None, :]
    # [BH, BD], [BH, BDV]
    b_k = tl.load(k_new + i_b * s_nkb + i_t * s_nkt + o_h[:, None] * s_nkh + o_d[None, :] * s_nkd, mask=m_k)
    b_v = tl.load(v_new + i_b * s_nvb + i_t * s_nvt + o_h[:, None] * s_nvh + o_dv[None, :] * s_nvd, mask=m_v)
    tl.store(k_cache + i_b * s_kb + pos * s_kt + o_h[:, None] * s_kh + o_d[None, :] * s_kd, b_k, mask=m_k)
    tl.store(v_cache + i_b * s_vb + pos * s_vt + o_h[:, None] * s_vh + o_dv[None, :] * s_vd, b_v, mask=m_v)


@triton.autotune(configs=_decode_configs(), key=["BD", "BDV", "G", "BM"])
@triton.jit(do_not_specialize=["Tq", "Smax", "chunk"])
def _attention_decode_fwd_kernel(
    q, k_cache, v_cache, cache_seqlens, o_part, lse_part, scale, Tq, Smax, chunk,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    APPENDED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # program = (split of `chunk` cache positions, batch row x KV head, block of packed query rows)
    i_s, i_bh, i_m = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_b, i_hk = i_bh // HK, i_bh % HK
    n_rows = Tq * G
    seq_len = tl.load(cache_seqlens + i_b).to(tl.int64)
    if APPENDED:
        seq_len += Tq
    seq_len = tl.minimum(seq_len, Smax)
    shift = seq_len - Tq  # query t sits at position shift + t and sees the keys s <= shift + t
    qk_scale = scale * 1.4426950408889634  # log2(e)

    rows = i_m * BM + tl.arange(0, BM)
    t = rows // G
    h = i_hk * G + rows % G
    m_row = rows < n_rows
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_d, m_dv = o_d < D, o_dv < DV
    zero_h = tl.zeros([BN], dtype=tl.int64)
    k_base = k_cache + i_b * s_kb + i_hk * s_kh
    v_base = v_cache + i_b * s_vb + i_hk * s_vh
    # [BM, BD]
    b_q = load_rows(q + i_b * s_qb, t, h, o_d, m_row, m_d, s_qt, s_qh, s_qd)

    n_start = i_s * chunk
    t_last = tl.minimum(Tq - 1, (i_m * BM + BM - 1) // G)
    n_end = tl.minimum(n_start + chunk, shift + t_last + 1)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    for n0 in range(n_start, n_end, BN):
        cols = n0 + tl.arange(0, BN)
        m_col = cols < n_end
        # [BN, BD], [BN, BDV]
        b_k = load_rows(k_base, cols, zero_h, o_d, m_col, m_d, s_kt, s_kh, s_kd)
        b_v = load_rows(v_base, cols, zero_h, o_dv, m_col, m_dv, s_vt, s_vh, s_vd)
        # [BM, BD] @ [BD, BN] -> [BM, BN], in log2 units
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale
        visible = m_col[None, :] & (cols[None, :] <= (shift + t)[:, None])
        b_s = tl.where(visible, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0., m_new)
        b_p = tl.exp2(b_s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(b_p, 1)
        # [BM, BN] @ [BN, BDV] -> [BM, BDV]
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.
    acc = acc / tl.where(empty, 1., l_i)[:, None]
    b_lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1., l_i)))  # log2 units
    p_part = (i_bh * tl.num_programs(0) + i_s) * n_rows + rows
    tl.store(o_part + p_part[:, None] * DV + o_dv[None, :], acc, mask=m_row[:, None] & m_dv[None, :])
    tl.store(lse_part + p_part, b_lse, mask=m_row)


@triton.jit(do_not_specialize=["Tq", "n_splits"])
def _attention_decode_reduce_kernel(
    o_part, lse_part, o, Tq, n_splits,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
):
    # program = (block of packed query rows, batch row x KV head): o = Σ_s 2^(lse_s - m) o_s / Σ_s 2^(lse_s - m)
    i_m, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_hk = i_bh // HK, i_bh % HK
    n_rows = Tq * G
    rows = i_m * BM + tl.arange(0, BM)
    m_row = rows < n_rows
    o_dv = tl.arange(0, BDV)
    m_o = m_row[:, None] & (o_dv < DV)[None, :]
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    for i_s in range(0, n_splits):
        p_part = (i_bh * n_splits + i_s) * n_rows + rows
        # [BM], [BM, BDV]
        b_lse = tl.load(lse_part + p_part, mask=m_row, other=float("-inf"))
        b_o = tl.load(o_part + p_part[:, None] * DV + o_dv[None, :], mask=m_o, other=0.)
        m_new = tl.maximum(m_i, b_lse)
        m_safe = tl.where(m_new == float("-inf"), 0., m_new)
        alpha = tl.exp2(m_i - m_safe)
        w = tl.exp2(b_lse - m_safe)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + b_o * w[:, None]
        m_i = m_new
    acc = acc / tl.where(l_i == 0., 1., l_i)[:, None]  # rows that see no key: 0
    t = rows // G
    h = i_hk * G + rows % G
    p_o = ((i_b * Tq + t) * H + h)[:, None] * DV + o_dv[None, :]
    tl.store(o + p_o, acc.to(o.dtype.element_ty), mask=m_o)


# -------------------------------------------------------------------------------- host launchers


def kv_append(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
              k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """Writes `k_new [B, Tq, Hk, D]`/`v_new` into the caches at `cache_seqlens[b] + t`, in place."""
    B, Tq, HK, D = k_new.shape
    DV = v_new.shape[3]
    if B == 0 or Tq == 0:
        return
    with device_guard(k_cache):
        _kv_append_kernel[(Tq, B)](
            k_new, v_new, k_cache, v_cache, cache_seqlens, k_cache.shape[1],
            *strides4(k_new), *strides4(v_new), *strides4(k_cache), *strides4(v_cache),
            HK=HK, D=D, DV=DV, BH=triton.next_power_of_2(HK), BD=triton.next_power_of_2(D),
            BDV=triton.next_power_of_2(DV))


def attention_decode_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cache_seqlens: torch.Tensor, *, scale: float, appended: bool) -> torch.Tensor:
    """Split-KV attention of `q [B, Tq, H, D]` over the caches (no append here). Any strides.

    `appended=True` means the last `Tq` valid positions of each row are `cache_seqlens[b] ..
    cache_seqlens[b] + Tq - 1` (just appended); otherwise they end at `cache_seqlens[b]`.
    Returns `o [B, Tq, H, Dv]` in q's dtype.
    """
    B, Tq, H, D = q.shape
    Smax, HK, DV = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    G = H // HK
    o = torch.empty(B, Tq, H, DV, device=q.device, dtype=q.dtype)
    if o.numel() == 0:
        return o
    BD, BDV = head_block(D), head_block(DV)
    n_rows = Tq * G
    BM, BN = _decode_blocks(n_rows, BD, BDV)
    row_blocks = triton.cdiv(n_rows, BM)
    n_splits = _num_splits(B * HK * row_blocks, Smax, BN, q.device)
    chunk = max(BN, triton.cdiv(triton.cdiv(Smax, n_splits), BN) * BN)
    n_splits = max(1, triton.cdiv(Smax, chunk))
    o_part = torch.empty(B * HK, n_splits, n_rows, DV, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B * HK, n_splits, n_rows, device=q.device, dtype=torch.float32)
    with device_guard(q):
        _attention_decode_fwd_kernel[(n_splits, B * HK, row_blocks)](
            q, k_cache, v_cache, cache_seqlens, o_part, lse_part, float(scale), Tq, Smax, chunk,
            *strides4(q), *strides4(k_cache), *strides4(v_cache),
            H=H, HK=HK, G=G, D=D, DV=DV, BD=BD, BDV=BDV, BM=BM, BN=BN, APPENDED=appended,
            DOT_PRECISION=dot_precision(q))
        _attention_decode_reduce_kernel[(row_blocks, B * HK)](
            o_part, lse_part, o, Tq, n_splits, H=H, HK=HK, G=G, DV=DV, BDV=BDV, BM=BM)
    return o


# ------------------------------------------------------------------------ backend entry point


@torch.no_grad()
def attention_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale):
    """Triton backend of `attnkit.attention_decode` (see docs/contracts.md); appends in place."""
    if k_new is not None:
        kv_append(k_cache, v_cache, cache_seqlens, k_new, v_new)
    return attention_decode_fwd(q, k_cache, v_cache, cache_seqlens, scale=scale, appended=k_new is not None)
