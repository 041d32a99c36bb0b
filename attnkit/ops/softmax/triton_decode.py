"""Triton decoding attention: flash-decoding (split-KV) with native GQA, a sliding window, logit
softcapping and a paged KV cache.

* `_kv_append_kernel` writes `k_new`/`v_new` into the caches at `cache_seqlens[b] + t` (in place,
  before the attention reads them; stream order makes that safe), through `block_table` when the
  cache is paged.
* `_attention_decode_fwd_kernel`: program = (batch row x KV head, block of packed query rows, KV
  split), folded into grid axis 0. Packed row `r` is query step `t = r // G` of query head
  `hk * G + r % G`, so all query heads of a group and all `Tq` steps (up to `BM` packed rows)
  share every K/V tile: each cache byte is read once per group. Each program writes its split's
  normalised partial output and log2-sum-exp.
* `_attention_decode_reduce_kernel` merges the splits (a log-sum-exp weighted sum).

Launch configuration (docs/softmax_kernels.md, "Decode"): no autotuning. Tile sizes, warps and
stages come from a heuristic on shapes and the device's shared memory, and the split count from
flash-attn's wave-efficiency rule on the SM count, so no call ever benchmarks and the op can be
captured in a CUDA graph on its first call. The grid comes from shapes only (`Smax`, the window,
never the `cache_seqlens` values): the lengths are read inside the kernels, so there is no host
synchronisation. Every program id lives on grid axis 0 (limit 2^31 - 1), so `B * Hk` is not bounded
by the 65,535 of axes 1 and 2.

Window: with `p` the position of a query in the cache, keys `p - left <= s <= p` are visible
(decoding is causal, so `right` never widens it). Splits cover only `[p_first - left, p_last]`:
the cost scales with the window, not with the cache. Softcap: logits `c * tanh(scale * q.k / c)`.
Paged: token `s` of row `b` is at `k_cache[block_table[b, s // block_size], s % block_size]`; only
table entries of tokens that are read or appended are loaded, so unreferenced blocks are never
touched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...tools import sm_count as _tools_sm_count
from ..common.triton_utils import device_guard, dot_precision, interpreted

MAX_SPLITS = 128
LOG2E = 1.4426950408889634
# Shared memory a launch may plan on when the device cannot be asked (the CPU interpreter, a
# static compile): the smaller of sm_80 (163 KB opt-in) and sm_90 (227 KB).
DEFAULT_SMEM = 163 * 1024
CPU_SM_COUNT = 132  # attnkit.tools.DEFAULT_SM_COUNT: what a plan assumes off CUDA (an H100/H200)

# Checked by `python -m attnkit.tools.gpu_audit` (CI: `--quick` audits bf16 D = 128 decode at B = 8
# and the split B = 1 MQA case): no decode kernel variant compiled for sm_90 spills.
AUDIT_REQUIREMENTS = [
    dict(kernel=r"^(_attention_decode_fwd_kernel|_attention_decode_reduce_kernel|_kv_append_kernel)$",
         arch="sm_90", dtypes=("bfloat16",), head_dims=(128,), max_spill_stores=0,
         why="issue 12: the decode kernels (split-KV forward, split merge, KV append) spill nothing at D = 128"),
]


def sm_count(device: torch.device | None = None) -> int:
    """Streaming multiprocessors to size the split count for: `attnkit.tools.sm_count`
    (`ATTNKIT_SM_COUNT` if set, the CUDA device's count, else 132 off CUDA)."""
    return int(_tools_sm_count(device))


def _smem_budget(device: torch.device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", DEFAULT_SMEM))
    return DEFAULT_SMEM


def head_block(d: int) -> int:
    """A head dim padded to a power of two of at least 16 (the smallest `tl.dot` operand)."""
    return max(16, triton.next_power_of_2(d))


def strides4(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())


def decode_config(rows: int, bd: int, bdv: int, elt: int, smem: int = DEFAULT_SMEM, window: bool = False) -> dict:
    """The launch configuration of the split-KV kernel, from shapes only (no tuning).

    `BM`: packed query rows per tile (all `Tq * G` rows of a group up to 64, at least 16 for
    `tl.dot`). `BN = 128` keys per tile where a K and a V tile fit in `smem` (else 64, 32), with
    as many pipeline stages (4, 3, 2; `stages - 1` tiles buffered) as fit: decoding is bound by
    HBM, so the aim is bytes in flight, not arithmetic. 4 warps (8 for 64-row query tiles, and
    for the windowed 128 x 128 key tile at D = 128: the window's second bound on every key takes
    the registers that triton 3.6 lacks at 4 warps, a 4-byte spill on sm_90; 2026-12-02).
    float32 (FMA products): 16-64 keys.
    """
    bm = min(max(16, triton.next_power_of_2(rows)), 64)
    if interpreted():
        return dict(BM=bm, BN=32, num_warps=4, num_stages=1)
    if elt >= 4:
        # float32 runs its products on FMA units (IEEE, no TF32): both operands sit in registers,
        # so the key tile stays small enough not to spill
        bn = max(16, min(64, 2048 // bd))
        return dict(BM=bm, BN=bn, num_warps=8 if bd >= 128 or bm >= 64 else 4, num_stages=2)
    budget = smem - 8 * 1024  # query tile, reduction scratch, barriers
    # a 128 x 256 key tile at 4 warps needs more than 255 registers around the dot: cap BN at 64
    for bn in ((128, 64, 32) if bd + bdv <= 256 else (64, 32)):
        stage = bn * (bd + bdv) * elt
        for stages in (4, 3, 2):
            # Triton's pipeliner keeps `num_stages - 1` K/V tiles in flight in shared memory
            if (stages - 1) * stage <= budget:
                wide = bm >= 64 or (window and bn == 128 and bd == 128)
                return dict(BM=bm, BN=bn, num_warps=8 if wide else 4, num_stages=stages)
    return dict(BM=bm, BN=16, num_warps=4, num_stages=1)


def num_splits_heuristic(programs: int, num_sms: int, num_blocks: int, max_splits: int = MAX_SPLITS) -> int:
    """flash-attn's rule: the fewest splits whose wave efficiency (programs·splits / SMs over its
    ceiling) is within 85% of the best; 1 when the programs already fill 80% of the SMs."""
    if programs >= 0.8 * num_sms or num_blocks <= 1:
        return 1
    max_splits = max(1, min(max_splits, num_sms, num_blocks))
    effs = []
    for s in range(1, max_splits + 1):
        eligible = s == 1 or triton.cdiv(num_blocks, s) != triton.cdiv(num_blocks, s - 1)
        waves = programs * s / num_sms
        effs.append(waves / -(-waves // 1) if eligible else 0.0)
    best = max(effs)
    return next(s for s, e in enumerate(effs, 1) if e >= 0.85 * best)


def decode_plan(B: int, Tq: int, H: int, HK: int, D: int, DV: int, Smax: int, elt: int, *,
                window_left: int = -1, num_sms: int = CPU_SM_COUNT, smem: int = DEFAULT_SMEM) -> dict:
    """Everything the launch needs, from shapes only: tiles, warps/stages, splits and grids."""
    G = H // HK
    rows = Tq * G
    bd, bdv = head_block(D), head_block(DV)
    cfg = decode_config(rows, bd, bdv, elt, smem, window=window_left >= 0)
    row_blocks = triton.cdiv(rows, cfg["BM"])
    # keys a tile can see: the whole cache, or its window plus the tile's own steps
    span = Smax if window_left < 0 else min(Smax, window_left + Tq)
    span = max(span, 1)
    programs = B * HK * row_blocks
    n_splits = num_splits_heuristic(programs, num_sms, triton.cdiv(span, cfg["BN"]))
    chunk = triton.cdiv(triton.cdiv(span, n_splits), cfg["BN"]) * cfg["BN"]
    n_splits = triton.cdiv(span, chunk)
    return dict(cfg, BD=bd, BDV=bdv, G=G, rows=rows, row_blocks=row_blocks, n_splits=n_splits, chunk=chunk,
                grid_fwd=(programs * n_splits,), grid_reduce=(programs,))


# ---------------------------------------------------------------------------------------- kernels


@triton.jit
def _softcap_tanh(x):
    """tanh(x) from exp2, stable for any x (saturates to +-1; absolute error ~1 ulp of 1)."""
    e = tl.exp2(tl.minimum(tl.abs(x), 20.) * 2.8853900817779268)  # exp(2|x|); tanh(20) == 1 in float32
    t = 1. - 2. / (e + 1.)
    return tl.where(x < 0, -t, t)


@triton.jit
def _token_rows(cols, m_col, i_b, block_table, s_btb, s_kb, s_kt, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """Element offsets of tokens `cols` of batch row `i_b` in a cache: `b * s_kb + s * s_kt`, or
    through the block table `block_table[b, s // PAGE] * s_kb + (s % PAGE) * s_kt` (masked
    tokens read no table entry)."""
    if PAGED:
        blk = tl.load(block_table + i_b * s_btb + cols // PAGE, mask=m_col, other=0).to(tl.int64)
        off = blk * s_kb + (cols % PAGE) * s_kt
    else:
        off = i_b * s_kb + cols * s_kt
    return off


@triton.jit(do_not_specialize=["Tq", "Smax"])
def _kv_append_kernel(
    k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, Tq, Smax,
    s_nkb, s_nkt, s_nkh, s_nkd, s_nvb, s_nvt, s_nvh, s_nvd,
    s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd, s_btb,
    HK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr,
):
    # program = (batch row b, new token t) folded on grid axis 0 (B may exceed the 65,535 programs of
    # axes 1 and 2); writes all HK heads of token t at cache_seqlens[b] + t
    pid = tl.program_id(0).to(tl.int64)
    i_t, i_b = pid % Tq, pid // Tq
    pos = tl.load(cache_seqlens + i_b).to(tl.int64) + i_t
    o_h = tl.arange(0, BH)
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    # positions past Smax are never written (the public op refuses them where it can check)
    ok = pos < Smax
    m_h = o_h < tl.where(ok, HK, 0)
    m_k = m_h[:, None] & (o_d < D)[None, :]
    m_v = m_h[:, None] & (o_dv < DV)[None, :]
    if PAGED:
        blk = tl.load(block_table + i_b * s_btb + pos // PAGE, mask=ok, other=0).to(tl.int64)
        p_k = blk * s_kb + (pos % PAGE) * s_kt
        p_v = blk * s_vb + (pos % PAGE) * s_vt
    else:
        p_k = i_b * s_kb + pos * s_kt
        p_v = i_b * s_vb + pos * s_vt
    # [BH, BD], [BH, BDV]
    b_k = tl.load(k_new + i_b * s_nkb + i_t * s_nkt + o_h[:, None] * s_nkh + o_d[None, :] * s_nkd, mask=m_k)
    b_v = tl.load(v_new + i_b * s_nvb + i_t * s_nvt + o_h[:, None] * s_nvh + o_dv[None, :] * s_nvd, mask=m_v)
    tl.store(k_cache + p_k + o_h[:, None] * s_kh + o_d[None, :] * s_kd, b_k, mask=m_k)
    tl.store(v_cache + p_v + o_h[:, None] * s_vh + o_dv[None, :] * s_vd, b_v, mask=m_v)


@triton.jit(do_not_specialize=["Tq", "Smax", "chunk", "n_splits", "row_blocks", "window_left"])
def _attention_decode_fwd_kernel(
    q, k_cache, v_cache, cache_seqlens, block_table, o_part, lse_part, scale, softcap,
    Tq, Smax, chunk, n_splits, row_blocks, window_left,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd, s_btb,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    APPENDED: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # program = ((batch row x KV head, block of packed query rows), KV split), all on axis 0
    pid = tl.program_id(0).to(tl.int64)
    i_s = pid % n_splits
    i_bm = pid // n_splits
    i_m, i_bh = i_bm % row_blocks, i_bm // row_blocks
    i_b, i_hk = i_bh // HK, i_bh % HK
    n_rows = Tq * G
    seq_len = tl.load(cache_seqlens + i_b).to(tl.int64)
    if APPENDED:
        seq_len += Tq
    seq_len = tl.minimum(seq_len, Smax)
    shift = seq_len - Tq  # query t sits at position shift + t and sees the keys s <= shift + t
    if SOFTCAP:
        s_in = scale / softcap  # logits c * tanh(scale * q.k / c), in log2 units below
        s_out = softcap * 1.4426950408889634
    else:
        s_in = scale * 1.4426950408889634
        s_out = 1.

    rows = i_m * BM + tl.arange(0, BM)
    t = rows // G
    h = i_hk * G + rows % G
    m_row = rows < n_rows
    p_row = shift + t  # [BM] positions of the rows' queries
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_d, m_dv = o_d < D, o_dv < DV
    # [BM, BD]
    b_q = tl.load(q + i_b * s_qb + t[:, None] * s_qt + h[:, None] * s_qh + o_d[None, :] * s_qd,
                  mask=m_row[:, None] & m_d[None, :], other=0.)

    # keys any row of the tile sees: [lo, hi); this split takes [lo + i_s * chunk, ...)
    t_first = (i_m * BM) // G
    t_last = tl.minimum(Tq - 1, (i_m * BM + BM - 1) // G)
    hi = shift + t_last + 1
    lo = 0
    if WINDOW:
        lo = tl.maximum(shift + t_first - window_left, 0)
    n_start = lo + i_s * chunk
    n_end = tl.minimum(n_start + chunk, hi)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    for n0 in range(n_start, n_end, BN):
        cols = n0 + tl.arange(0, BN)
        m_col = cols < n_end
        p_k = _token_rows(cols, m_col, i_b, block_table, s_btb, s_kb, s_kt, PAGED, PAGE)
        p_v = _token_rows(cols, m_col, i_b, block_table, s_btb, s_vb, s_vt, PAGED, PAGE)
        # [BN, BD], [BN, BDV]
        b_k = tl.load(k_cache + i_hk * s_kh + p_k[:, None] + o_d[None, :] * s_kd,
                      mask=m_col[:, None] & m_d[None, :], other=0.)
        b_v = tl.load(v_cache + i_hk * s_vh + p_v[:, None] + o_dv[None, :] * s_vd,
                      mask=m_col[:, None] & m_dv[None, :], other=0.)
        # [BM, BD] @ [BD, BN] -> [BM, BN], in log2 units
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * s_in
        if SOFTCAP:
            b_s = _softcap_tanh(b_s) * s_out
        visible = m_col[None, :] & (cols[None, :] <= p_row[:, None])
        if WINDOW:
            visible = visible & (cols[None, :] >= p_row[:, None] - window_left)
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
    p_part = (i_bh * n_splits + i_s) * n_rows + rows
    tl.store(o_part + p_part[:, None] * DV + o_dv[None, :], acc, mask=m_row[:, None] & m_dv[None, :])
    tl.store(lse_part + p_part, b_lse, mask=m_row)


@triton.jit(do_not_specialize=["Tq", "n_splits", "row_blocks"])
def _attention_decode_reduce_kernel(
    o_part, lse_part, o, Tq, n_splits, row_blocks,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
):
    # program = (batch row x KV head, block of packed query rows) on axis 0:
    # o = Σ_s 2^(lse_s - m) o_s / Σ_s 2^(lse_s - m)
    pid = tl.program_id(0).to(tl.int64)
    i_m, i_bh = pid % row_blocks, pid // row_blocks
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


def _paging(block_table: torch.Tensor | None, k_cache: torch.Tensor) -> tuple[int, int, int]:
    """(page size, capacity Smax, row stride of the table): a paged cache is
    `[num_blocks, page, Hk, D]` with capacity `max_blocks * page`; a padded one `[B, Smax, Hk, D]`."""
    if block_table is None:
        return 1, k_cache.shape[1], 0
    page = k_cache.shape[1]
    return page, block_table.shape[1] * page, block_table.stride(0)


def kv_append(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
              k_new: torch.Tensor, v_new: torch.Tensor, block_table: torch.Tensor | None = None) -> None:
    """Writes `k_new [B, Tq, Hk, D]`/`v_new` into the caches at `cache_seqlens[b] + t` (through
    `block_table` when paged), in place."""
    B, Tq, HK, D = k_new.shape
    DV = v_new.shape[3]
    if B == 0 or Tq == 0:
        return
    page, Smax, s_btb = _paging(block_table, k_cache)
    with device_guard(k_cache):
        _kv_append_kernel[(B * Tq,)](
            k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, Tq, Smax,
            *strides4(k_new), *strides4(v_new), *strides4(k_cache), *strides4(v_cache), s_btb,
            HK=HK, D=D, DV=DV, BH=triton.next_power_of_2(HK), BD=triton.next_power_of_2(D),
            BDV=triton.next_power_of_2(DV), PAGED=block_table is not None, PAGE=page)


def attention_decode_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cache_seqlens: torch.Tensor, *, scale: float, appended: bool,
                         window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                         block_table: torch.Tensor | None = None) -> torch.Tensor:
    """Split-KV attention of `q [B, Tq, H, D]` over the caches (no append here). Any strides.

    `appended=True` means the last `Tq` valid positions of each row are `cache_seqlens[b] ..
    cache_seqlens[b] + Tq - 1` (just appended); otherwise they end at `cache_seqlens[b]`.
    Returns `o [B, Tq, H, Dv]` in q's dtype.
    """
    B, Tq, H, D = q.shape
    HK, DV = k_cache.shape[2], v_cache.shape[3]
    page, Smax, s_btb = _paging(block_table, k_cache)
    o = torch.empty(B, Tq, H, DV, device=q.device, dtype=q.dtype)
    if o.numel() == 0:
        return o
    left = int(window[0])
    plan = decode_plan(B, Tq, H, HK, D, DV, Smax, q.element_size(), window_left=left,
                       num_sms=sm_count(q.device), smem=_smem_budget(q.device))
    n_splits, rows = plan["n_splits"], plan["rows"]
    o_part = torch.empty(B * HK, n_splits, rows, DV, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B * HK, n_splits, rows, device=q.device, dtype=torch.float32)
    cap = float(softcap)
    with device_guard(q):
        _attention_decode_fwd_kernel[plan["grid_fwd"]](
            q, k_cache, v_cache, cache_seqlens, block_table, o_part, lse_part, float(scale), cap if cap > 0 else 1.0,
            Tq, Smax, plan["chunk"], n_splits, plan["row_blocks"], max(left, 0),
            *strides4(q), *strides4(k_cache), *strides4(v_cache), s_btb,
            H=H, HK=HK, G=plan["G"], D=D, DV=DV, BD=plan["BD"], BDV=plan["BDV"], BM=plan["BM"], BN=plan["BN"],
            APPENDED=appended, PAGED=block_table is not None, PAGE=page, WINDOW=left >= 0, SOFTCAP=cap > 0,
            DOT_PRECISION=dot_precision(q), num_warps=plan["num_warps"], num_stages=plan["num_stages"])
        _attention_decode_reduce_kernel[plan["grid_reduce"]](
            o_part, lse_part, o, Tq, n_splits, plan["row_blocks"],
            H=H, HK=HK, G=plan["G"], DV=DV, BDV=plan["BDV"], BM=plan["BM"], num_warps=4)
    return o


# ------------------------------------------------------------------------ backend entry point


@torch.no_grad()
def attention_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, *, window=(-1, -1),
                     softcap=0.0, block_table=None):
    """Triton backend of `attnkit.attention_decode` (see docs/contracts.md); appends in place.

    `window=(left, right)` (`-1` unbounded), `softcap` (`0.0` off) and `block_table` (int32
    `[B, max_blocks]` over `k_cache [num_blocks, page, Hk, D]`) follow SPEC "Sliding window,
    softcap, paged KV cache"; any page size works.
    """
    window = (-1, -1) if window is None else window
    softcap = 0.0 if softcap is None else softcap
    if k_new is not None:
        kv_append(k_cache, v_cache, cache_seqlens, k_new, v_new, block_table)
    return attention_decode_fwd(q, k_cache, v_cache, cache_seqlens, scale=scale, appended=k_new is not None,
                                window=window, softcap=softcap, block_table=block_table)
