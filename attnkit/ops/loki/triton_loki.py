"""Triton Loki decode: rotation, low-rank scoring, top-k and sparse attention over the selected keys.

One decoding step runs up to five launches, all sized from shapes only (never from
`cache_seqlens` values) with fixed launch parameters (no autotuning) and every program id on grid
axis 0, so nothing waits on the host, nothing benchmarks, and the step can be captured in a CUDA
graph on its first call:

1. `_loki_rotate_kernel` rotates the queries, `q̃ = q @ components[hk]`, into a float32 buffer
   `[B, H, D]` (the same kernel, with offsets, rotates appended keys into the caches).
2. `_loki_score_kernel` scores every position with the leading `rank` rotated dims,
   `q̃[:rank] · k̃_s[:rank]`. A program owns one (row, KV head) and a block of positions, so the
   `G` query heads of a group read each key once. Keys come either from the low-rank buffer
   `[B, Hk, Smax, R]` (each position's `R` dims contiguous, the block one contiguous span) or
   from `k_cache_rot[..., :rank]` (the portable path): the kernel only sees strides.
   Scores are float32 `[B, H, Smax]` (`[B, Hk, Smax]` for `selection="group"`, the max over the
   group), `-inf` past the row's length.
3. `_loki_select_kernel` picks exactly `min(top_k, L)` positions per (row, selecting head) by
   radix select on the score bits (no sort): int32 indices in increasing position order, ties at
   the threshold resolved to the lowest positions.
4. `_loki_sparse_attn_fwd_kernel` gathers the selected keys/values (full dims, one contiguous
   row each) and runs exact online softmax over them, split over the selected set (split-K)
   when that leaves the device idle; `_loki_sparse_attn_reduce_kernel` merges the splits by
   log-sum-exp. Slots at or past the row's length (a row shorter than `top_k`) are masked by
   index, as in the reference. With `selection="group"` the `G` query heads of a KV head share
   one gather (`tl.dot` over a `[BM, BD]` row tile); with per-head selection each program owns
   one query head and uses float32 vector maths.

`top_k >= Smax` (known on the host) skips steps 2-3: dense attention over every valid position,
with the query heads of a group sharing the keys.

Derivation and measurements: docs/loki.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common.triton_utils import device_guard, dot_precision, interpreted
from ..softmax.triton_decode import _token_rows, num_splits_heuristic, sm_count

LOG2E = 1.4426950408889634
MAX_SPLITS = 64

# Checked by `python -m attnkit.tools.gpu_audit` (CI: `--quick`, whose Loki cases are bf16 D = 128:
# the portable op at B = 8 and B = 1 with the segmented selection, the low-rank and paged layouts,
# the appends): every Loki kernel variant compiled for sm_90 spills nothing.
AUDIT_REQUIREMENTS = [
    dict(kernel=r"^_loki_", arch="sm_90", dtypes=("bfloat16",), head_dims=(128,), max_spill_stores=0,
         why="issue 12: the Loki kernels (rotate/append, score, selection, sparse attention, reduce) spill "
             "nothing at D = 128"),
]


# ------------------------------------------------------------------------------------ blocks


# Launch parameters are fixed heuristics (no autotuning): no call ever benchmarks, so every
# kernel here can be captured in a CUDA graph on its first call.
NUM_WARPS = 4
NUM_STAGES = 2
# Selection: one program per (row, selecting head). A row of up to SELECT_RESIDENT slots is
# loaded once and held in registers for every pass (32 scores per thread at 8 warps: 128
# registers, no spills on sm_80/sm_90); longer rows are streamed in SELECT_BLOCK-slot blocks
# (8 warps), once per pass.
SELECT_RESIDENT = 8192
SELECT_BLOCK = 8192
# Segmented selection (few rows, e.g. B = 1): each row is cut into segments of SEGMENT_MIN or more
# slots (a power of two) so that the selection launches run about SEGMENT_WAVES programs per SM;
# used when the rows alone leave SMs idle (fewer rows than SMs).
SEGMENT_MIN = 512
SEGMENT_WAVES = 4


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(n))


def _score_blocks(G: int, rank: int) -> tuple[int, int, int]:
    """(query heads, positions, rank dims) per scoring tile; the product bounds the
    `[BG, BN, BR]` broadcast tile of the float32 dot products."""
    BG, BR = _pow2(G), min(_pow2(rank, 4), 32)
    BN = 64 if interpreted() else max(16, min(256, 8192 // (BG * BR)))
    return BG, BN, BR


def _attn_blocks(shared: bool, G: int, BD: int) -> tuple[int, int]:
    """(query rows, selected keys) per attention tile. Shared rows are padded to 16 for `tl.dot`."""
    BM = _pow2(G, 16) if shared else 1
    if interpreted():
        return BM, 32
    return BM, 64 if BD <= 128 else 32


def _num_splits(programs: int, n_sel: int, BN: int, device: torch.device) -> int:
    """Splits of the selected set so that the programs fill the device (flash-attn's rule)."""
    return num_splits_heuristic(programs, sm_count(device), triton.cdiv(n_sel, BN), MAX_SPLITS)


# ---------------------------------------------------------------------------------- kernels


@triton.heuristics({
    "HAS_OFFSETS": lambda args: args["cache_seqlens"] is not None,
    "HAS_LOWRANK": lambda args: args["y_low"] is not None,
    "HAS_V": lambda args: args["v_new"] is not None,
    "PAGED": lambda args: args["block_table"] is not None,
})
@triton.jit(do_not_specialize=["T", "Smax", "n_t", "n_e"])
def _loki_rotate_kernel(
    x, comps, y, y_low, v_new, v_cache, cache_seqlens, block_table, T, Smax, n_t, n_e,
    s_xb, s_xt, s_xh, s_xd, s_yb, s_yt, s_yh, s_yd, s_lb, s_lh, s_lt, s_ld,
    s_nvb, s_nvt, s_nvh, s_nvd, s_vb, s_vt, s_vh, s_vd, s_btb,
    HK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, R: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
    HAS_OFFSETS: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_V: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr,
):
    # program = (batch row x KV head, block of BT rows, block of BE output dims), folded on axis 0
    # x [B, T, HK, D] rows -> y[b, pos, hk, :] = x[b, t, hk, :] @ comps[hk], pos = t (+ cache_seqlens[b]);
    # PAGED: position pos of row b is slot (block_table[b, pos // PAGE], pos % PAGE) of the caches
    pid = tl.program_id(0).to(tl.int64)
    i_e = pid % n_e
    i_t = (pid // n_e) % n_t
    i_bh = pid // (n_e * n_t)
    i_b, i_hk = i_bh // HK, i_bh % HK
    rows = i_t * BT + tl.arange(0, BT)
    m_row = rows < T
    pos = rows
    if HAS_OFFSETS:
        pos = tl.load(cache_seqlens + i_b).to(tl.int64) + rows
        m_row = m_row & (pos < Smax)  # never write past the capacity (the public op refuses it)
    o_e = i_e * BE + tl.arange(0, BE)
    m_e = o_e < D
    x_base = x + i_b * s_xb + i_hk * s_xh + rows[:, None] * s_xt
    c_base = comps + i_hk * D * D + o_e[None, :]
    # [BT, BK] @ [BK, BE] -> [BT, BE] accumulated over the input dims in BK slices, IEEE float32
    # like the reference rotation; only one slice of x and of the basis is live at a time, so
    # nothing spills at D >= 128 (the whole [BT, D] x [D, BE] product did)
    b_y = tl.zeros([BT, BE], dtype=tl.float32)
    for k0 in range(0, D, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < D
        b_x = tl.load(x_base + o_k[None, :] * s_xd, mask=m_row[:, None] & m_k[None, :], other=0.).to(tl.float32)
        b_c = tl.load(c_base + o_k[:, None] * D, mask=m_k[:, None] & m_e[None, :], other=0.)
        b_y += tl.dot(b_x, b_c, input_precision="ieee")
    b_y = b_y.to(y.dtype.element_ty)
    # [BT] element offsets of the rows' slots (table entries read only for rows written)
    p_y = _token_rows(pos, m_row, i_b, block_table, s_btb, s_yb, s_yt, PAGED, PAGE)
    tl.store(y + i_hk * s_yh + p_y[:, None] + o_e[None, :] * s_yd, b_y, mask=m_row[:, None] & m_e[None, :])
    if HAS_LOWRANK:
        # the same rounded values as the full cache, so both layouts score identically
        p_l = _token_rows(pos, m_row, i_b, block_table, s_btb, s_lb, s_lt, PAGED, PAGE)
        tl.store(y_low + i_hk * s_lh + p_l[:, None] + o_e[None, :] * s_ld,
                 b_y.to(y_low.dtype.element_ty), mask=m_row[:, None] & (o_e < R)[None, :])
    if HAS_V:
        # values are copied unchanged, columns of this program's block
        m_v = m_row[:, None] & (o_e < DV)[None, :]
        b_v = tl.load(v_new + i_b * s_nvb + i_hk * s_nvh + rows[:, None] * s_nvt + o_e[None, :] * s_nvd, mask=m_v)
        p_v = _token_rows(pos, m_row, i_b, block_table, s_btb, s_vb, s_vt, PAGED, PAGE)
        tl.store(v_cache + i_hk * s_vh + p_v[:, None] + o_e[None, :] * s_vd, b_v, mask=m_v)


@triton.heuristics({"PAGED": lambda args: args["block_table"] is not None,
                    "HIST0": lambda args: args["hist"] is not None})
@triton.jit(do_not_specialize=["Smax", "rank", "n_blocks"])
def _loki_score_kernel(
    q_rot, k, cache_seqlens, block_table, scores, hist, Smax, rank, n_blocks,
    s_kb, s_kh, s_kt, s_kd, s_btb,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BG: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, GROUP: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr, HIST0: tl.constexpr,
):
    # program = (batch row x KV head, block of BN positions) folded on axis 0; the G query heads
    # share each key load. Keys [B, HK, Smax, >= rank] by strides, or paged [num_blocks, HK, PAGE, .]
    pid = tl.program_id(0).to(tl.int64)
    i_n, i_bh = pid % n_blocks, pid // n_blocks
    i_b, i_hk = i_bh // HK, i_bh % HK
    seq_len = tl.load(cache_seqlens + i_b).to(tl.int64)
    cols = i_n * BN + tl.arange(0, BN)
    m_col = cols < seq_len
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    q_base = q_rot + (i_b * H + i_hk * G) * D
    # [BN] element offsets of the positions' keys (table entries read only for valid positions)
    p_k = k + i_hk * s_kh + _token_rows(cols, m_col, i_b, block_table, s_btb, s_kb, s_kt, PAGED, PAGE)
    # blocks past the row's length load nothing
    r_end = tl.where(i_n * BN < seq_len, rank, 0)
    acc = tl.zeros([BG, BN], dtype=tl.float32)
    for r0 in range(0, r_end, BR):
        o_r = r0 + tl.arange(0, BR)
        m_r = o_r < rank
        # [BG, BR] float32 rotated queries, [BN, BR] leading key dims
        b_q = tl.load(q_base + o_g[:, None] * D + o_r[None, :], mask=m_g[:, None] & m_r[None, :], other=0.)
        b_k = tl.load(p_k[:, None] + o_r[None, :] * s_kd, mask=m_col[:, None] & m_r[None, :],
                      other=0.).to(tl.float32)
        # [BG, 1, BR] * [1, BN, BR] -> [BG, BN]: exact float32 products, no tile padding for small G
        acc += tl.sum(b_q[:, None, :] * b_k[None, :, :], axis=2)
    # a valid -inf score must still rank above every invalid position (as in the reference)
    acc = tl.where(acc == float("-inf"), -3.4028234663852886e38, acc)
    m_out = cols < Smax
    if GROUP:
        # [BN]: one selection per KV head, by the max over its query heads
        b_s = tl.max(tl.where(m_g[:, None], acc, float("-inf")), axis=0)
        b_s = tl.where(m_col, b_s, float("-inf"))
        tl.store(scores + i_bh * Smax + cols, b_s, mask=m_out)
        if HIST0:
            # the segmented selection's first radix pass, fused: this block's 256-bin histogram of
            # the top 8 key bits of its valid scores, added (integer counts) to the row's histogram
            bins = tl.arange(0, 256)
            h0 = tl.histogram((_score_key(b_s) >> 24).to(tl.int32), 256, mask=m_col & m_out)
            tl.atomic_add(hist + i_bh * 4 * 256 + bins, h0, mask=h0 > 0)
    else:
        b_s = tl.where(m_col[None, :], acc, float("-inf"))
        p_s = scores + (i_b * H + i_hk * G + o_g)[:, None] * Smax + cols[None, :]
        tl.store(p_s, b_s, mask=m_g[:, None] & m_out[None, :])


@triton.jit
def _write_selected(base, out, start, end, tau, k_rem, n_out, n_tie, BLK: tl.constexpr):
    """Write, in position order, the positions in [start, end) whose score key is above `tau`, and
    those equal to it while the ties taken so far (`n_tie` before this range) stay within `k_rem`;
    `n_out` is where this range's first index goes."""
    o = tl.arange(0, BLK)
    for n0 in range(start, end, BLK):
        cols = n0 + o
        m = cols < end
        key = _score_key(tl.load(base + cols, mask=m, other=0.))
        gt = m & (key > tau)
        eq = (m & (key == tau)).to(tl.int32)
        take = gt | ((eq == 1) & (n_tie + tl.cumsum(eq, 0) <= k_rem))
        t32 = take.to(tl.int32)
        tl.store(out + n_out + tl.cumsum(t32, 0) - 1, cols, mask=take)
        n_out += tl.sum(t32, 0)
        n_tie += tl.sum(eq, 0)


@triton.jit
def _fill_short_row(out, k, top_k, Smax, BLK: tl.constexpr):
    """A row shorter than top_k: the remaining slots point past its length (masked by index later)."""
    o = tl.arange(0, BLK)
    for j0 in range(k, top_k, BLK):
        tl.store(out + j0 + o, Smax + tl.zeros([BLK], dtype=tl.int32), mask=j0 + o < top_k)


@triton.jit
def _score_key(x):
    """float32 -> uint32 keys in the same order (larger score, larger key; NaN above +inf, as
    torch.topk ranks it)."""
    bits = x.to(tl.uint32, bitcast=True)
    flip = tl.where((bits >> 31) == 1, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    return bits ^ flip


@triton.jit
def _select_digit(hist, k_rem, bins):
    """The digit `d` of the k_rem-th largest among the histogram's scores, and how many lie above
    it: `ge[d]` = scores with digit >= d; d = the largest digit with ge[d] >= k_rem."""
    ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
    d = tl.max(tl.where(ge[None, :] >= k_rem[:, None], bins[None, :], 0), 1)  # [1]
    above = tl.sum(tl.where(bins[None, :] > d[:, None], hist[None, :], 0), 1)
    return d, above


@triton.jit(do_not_specialize=["Smax", "top_k"])
def _loki_select_kernel(scores, cache_seqlens, idx, Smax, top_k, HSEL: tl.constexpr, BLK: tl.constexpr,
                        RESIDENT: tl.constexpr):
    # program = one (batch row, selecting head): the positions of its top_k scores, exactly, in
    # increasing position order, without sorting. Radix select on the order-preserving uint32 key:
    # four passes build a 256-bin histogram of the next 8 key bits among the scores that share the
    # digits chosen so far, and pick the digit where the count from the top reaches the remaining
    # k. That gives the k-th largest key `tau` and how many of the scores equal to it are needed
    # (`need`). A last pass writes every position with key > tau and the first `need` positions
    # with key == tau (ties: lowest positions first), compacted by a running prefix sum.
    # RESIDENT (Smax <= BLK): the row is loaded once and every pass runs on registers.
    pid = tl.program_id(0).to(tl.int64)
    i_b = pid // HSEL
    seq_len = tl.minimum(tl.load(cache_seqlens + i_b), Smax)
    k = tl.minimum(top_k, seq_len)
    base = scores + pid * Smax
    out = idx + pid * top_k
    o = tl.arange(0, BLK)
    bins = tl.arange(0, 256)
    prefix = tl.zeros([1], dtype=tl.uint32)
    k_rem = tl.zeros([1], dtype=tl.int32) + k
    if RESIDENT:
        m_row = o < seq_len
        key_row = _score_key(tl.load(base + o, mask=m_row, other=0.))
    for r in tl.static_range(4):
        shift = 24 - 8 * r
        if RESIDENT:
            m = m_row
            if r > 0:
                m = m & ((key_row >> (shift + 8)) == (prefix >> (shift + 8)))
            hist = tl.histogram(((key_row >> shift) & 255).to(tl.int32), 256, mask=m)
        else:
            hist = tl.zeros([256], dtype=tl.int32)
            for n0 in range(0, seq_len, BLK):
                cols = n0 + o
                m = cols < seq_len
                key = _score_key(tl.load(base + cols, mask=m, other=0.))
                if r > 0:
                    m = m & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
                hist += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=m)
        d, above = _select_digit(hist, k_rem, bins)
        k_rem -= above
        prefix = prefix | (d.to(tl.uint32) << shift)
    # tau = prefix; k_rem = how many scores equal to tau are taken
    if RESIDENT:
        gt = m_row & (key_row > prefix)
        eq = (m_row & (key_row == prefix)).to(tl.int32)
        take = gt | ((eq == 1) & (tl.cumsum(eq, 0) <= k_rem))
        tl.store(out + tl.cumsum(take.to(tl.int32), 0) - 1, o, mask=take)
    else:
        _write_selected(base, out, 0, seq_len, prefix, k_rem, tl.zeros([1], dtype=tl.int32),
                        tl.zeros([1], dtype=tl.int32), BLK)
    _fill_short_row(out, k, top_k, Smax, BLK)


@triton.jit
def _radix_state(hist, row, k, PASSES: tl.constexpr):
    """Digits chosen by the first `PASSES` radix passes of selecting row `row` from their complete
    histograms `hist[row, r, :]`: (the key prefix so far, how many of the k largest are still to be
    found among the scores that share it). Every program of the row derives the same values."""
    bins = tl.arange(0, 256)
    prefix = tl.zeros([1], dtype=tl.uint32)
    k_rem = tl.zeros([1], dtype=tl.int32) + k
    for r in tl.static_range(PASSES):
        h = tl.load(hist + (row * 4 + r) * 256 + bins)
        d, above = _select_digit(h, k_rem, bins)
        k_rem -= above
        prefix = prefix | (d.to(tl.uint32) << (24 - 8 * r))
    return prefix, k_rem


SEG_STATS = 258  # per segment: suffix counts of the last digit (257, the last one 0) and the count above


@triton.jit(do_not_specialize=["Smax", "top_k", "n_seg", "seg_len"])
def _loki_select_hist_kernel(scores, cache_seqlens, hist, stats, Smax, top_k, n_seg, seg_len, HSEL: tl.constexpr,
                             BLK: tl.constexpr, PASS: tl.constexpr):
    # program = (selecting row, segment of seg_len slots), folded on axis 0. Radix pass PASS of the
    # segmented selection: the 256-bin histogram of key digit PASS among the segment's scores that
    # share the digits chosen by the earlier passes, added to the row's histogram hist[row, PASS].
    # Integer additions: the counts (and everything derived from them) do not depend on the order
    # in which the segments add them.
    # The last pass also keeps what the write pass needs of this segment, whatever the last digit
    # d turns out to be: stats[row, seg, j] = its scores sharing the first three digits whose last
    # digit is >= j (j = 0..256), stats[row, seg, 257] = its scores whose first three digits are
    # above the chosen ones. Then #(key > tau) = stats[257] + stats[d + 1] and #(key == tau) =
    # stats[d] - stats[d + 1].
    pid = tl.program_id(0).to(tl.int64)
    i_seg, row = pid % n_seg, pid // n_seg
    i_b = row // HSEL
    seq_len = tl.minimum(tl.load(cache_seqlens + i_b), Smax)
    k = tl.minimum(top_k, seq_len)
    prefix, k_rem = _radix_state(hist, row, k, PASS)
    shift = 24 - 8 * PASS
    base = scores + row * Smax
    o = tl.arange(0, BLK)
    local = tl.zeros([256], dtype=tl.int32)
    n_above = tl.zeros([1], dtype=tl.int32)
    start = i_seg * seg_len
    end = tl.minimum(start + seg_len, seq_len)
    for n0 in range(start, end, BLK):
        cols = n0 + o
        m = cols < end
        key = _score_key(tl.load(base + cols, mask=m, other=0.))
        if PASS == 3:
            n_above += tl.sum((m & ((key >> 8) > (prefix >> 8))).to(tl.int32), 0)
        if PASS > 0:
            m = m & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
        local += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=m)
    bins = tl.arange(0, 256)
    tl.atomic_add(hist + (row * 4 + PASS) * 256 + bins, local, mask=local > 0)
    if PASS == 3:
        p_st = stats + pid * 258
        tl.store(p_st + bins, tl.sum(local, 0) - tl.cumsum(local, 0) + local)
        c = tl.arange(0, 2)
        tl.store(p_st + 256 + c, tl.where(c == 0, 0, n_above))


@triton.jit(do_not_specialize=["Smax", "top_k", "n_seg", "seg_len"])
def _loki_select_write_kernel(scores, cache_seqlens, hist, stats, idx, Smax, top_k, n_seg, seg_len,
                              HSEL: tl.constexpr, BLK: tl.constexpr, SB: tl.constexpr):
    # program = (selecting row, segment): writes the segment's selected positions (key > tau, and
    # key == tau while the row still needs ties, lowest positions first) at its place in the row's
    # output, after those of the earlier segments (an exclusive prefix sum of their counts, read
    # from the last histogram pass's stats): the indices come out in increasing position order, as
    # the single-program selection writes them.
    pid = tl.program_id(0).to(tl.int64)
    i_seg, row = pid % n_seg, pid // n_seg
    i_b = row // HSEL
    seq_len = tl.minimum(tl.load(cache_seqlens + i_b), Smax)
    k = tl.minimum(top_k, seq_len)
    tau, k_rem = _radix_state(hist, row, k, 4)
    d = (tau & 255).to(tl.int64)  # [1] the last digit
    o_s = tl.arange(0, SB)
    gt_before = tl.zeros([1], dtype=tl.int32)
    eq_before = tl.zeros([1], dtype=tl.int32)
    for s0 in range(0, i_seg, SB):
        m_s = s0 + o_s < i_seg
        p_st = stats + (row * n_seg + s0 + o_s) * 258  # [SB] earlier segments
        at_d = tl.load(p_st + d, mask=m_s, other=0)
        above_d = tl.load(p_st + d + 1, mask=m_s, other=0)
        gt_before += tl.sum(tl.load(p_st + 257, mask=m_s, other=0) + above_d, 0)
        eq_before += tl.sum(at_d - above_d, 0)
    n_tie = eq_before
    n_out = gt_before + tl.minimum(eq_before, k_rem)
    base = scores + row * Smax
    out = idx + row * top_k
    start = i_seg * seg_len
    _write_selected(base, out, start, tl.minimum(start + seg_len, seq_len), tau, k_rem, n_out, n_tie, BLK)
    if i_seg == 0:
        _fill_short_row(out, k, top_k, Smax, BLK)


@triton.jit
def _rows_dot(a, b, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """`a [BM, K] · b [BN, K]ᵀ -> [BM, BN]` float32: `tl.dot` for tiles of >= 16 rows, else an
    exact float32 broadcast sum (one row: no padding to the 16 rows `tl.dot` needs)."""
    if USE_DOT:
        out = tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION)
    else:
        out = tl.sum(a[:, None, :].to(tl.float32) * b[None, :, :].to(tl.float32), axis=2)
    return out


@triton.jit
def _rows_mm(p, v, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """`p [BM, BN] @ v [BN, BDV] -> [BM, BDV]` float32 (as `_rows_dot`)."""
    if USE_DOT:
        out = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    else:
        out = tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), axis=1)
    return out


@triton.heuristics({"HAS_INDEX": lambda args: args["idx"] is not None,
                    "PAGED": lambda args: args["block_table"] is not None})
@triton.jit(do_not_specialize=["n_sel", "chunk", "n_splits"])
def _loki_sparse_attn_fwd_kernel(
    q_rot, k, v, cache_seqlens, block_table, idx, o, o_part, lse_part, scale, n_sel, chunk, n_splits,
    s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd, s_ib, s_ih, s_ij, s_btb,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    SHARED: tl.constexpr, SPLIT: tl.constexpr, HAS_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr,
):
    # program = (split of `chunk` selected slots, batch row x selecting head).
    # SHARED: the selecting head is KV head i_sel; the BM rows are its G query heads (one gather each).
    # else:   the selecting head is query head i_sel, alone in its (single-row) tile.
    # (folded on grid axis 0: B * H may exceed the 65,535 programs of axes 1 and 2)
    pid = tl.program_id(0).to(tl.int64)
    i_s, i_bh = pid % n_splits, pid // n_splits
    o_m = tl.arange(0, BM)
    if SHARED:
        i_b, i_sel = i_bh // HK, i_bh % HK
        i_hk = i_sel
        heads = i_sel * G + o_m
        m_row = o_m < G
    else:
        i_b, i_sel = i_bh // H, i_bh % H
        i_hk = i_sel // G
        heads = i_sel + o_m
        m_row = o_m < 1
    seq_len = tl.load(cache_seqlens + i_b).to(tl.int64)
    qk_scale = scale * 1.4426950408889634  # log2(e): exp2 below
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_d, m_dv = o_d < D, o_dv < DV
    # [BM, BD] float32 rotated queries of the tile's rows
    b_q = tl.load(q_rot + (i_b * H + heads)[:, None] * D + o_d[None, :], mask=m_row[:, None] & m_d[None, :], other=0.)
    if SHARED:
        b_q = b_q.to(k.dtype.element_ty)  # tensor-core operands, as flash attention
    k_base = k + i_hk * s_kh
    v_base = v + i_hk * s_vh

    j_start = i_s * chunk
    j_end = tl.minimum(j_start + chunk, n_sel)
    if not HAS_INDEX:
        j_end = tl.minimum(j_end, seq_len)  # dense: slot j is position j; nothing past the length
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    for j0 in range(j_start, j_end, BN):
        o_j = j0 + tl.arange(0, BN)
        m_j = o_j < j_end
        if HAS_INDEX:
            # [BN] selected positions; a row shorter than top_k selected slots past its length
            pos = tl.load(idx + i_b * s_ib + i_sel * s_ih + o_j * s_ij, mask=m_j, other=0).to(tl.int64)
            m_j = m_j & (pos < seq_len)
        else:
            pos = o_j
        # [BN] offsets of the slots (paged: through the table, entries of valid slots only)
        p_k = _token_rows(pos, m_j, i_b, block_table, s_btb, s_kb, s_kt, PAGED, PAGE)
        p_v = _token_rows(pos, m_j, i_b, block_table, s_btb, s_vb, s_vt, PAGED, PAGE)
        # [BN, BD], [BN, BDV]: gathered rows, each one contiguous span of the cache
        b_k = tl.load(k_base + p_k[:, None] + o_d[None, :] * s_kd, mask=m_j[:, None] & m_d[None, :], other=0.)
        b_v = tl.load(v_base + p_v[:, None] + o_dv[None, :] * s_vd, mask=m_j[:, None] & m_dv[None, :], other=0.)
        # [BM, BD] . [BN, BD]^T -> [BM, BN] logits in log2 units
        b_s = _rows_dot(b_q, b_k, SHARED, DOT_PRECISION) * qk_scale
        b_s = tl.where(m_j[None, :], b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0., m_new)
        b_p = tl.exp2(b_s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(b_p, 1)
        # [BM, BN] @ [BN, BDV] -> [BM, BDV]
        acc = acc * alpha[:, None] + _rows_mm(b_p, b_v, SHARED, DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.  # nothing selected in this split (or a row of length 0): zeros, lse = -inf
    acc = acc / tl.where(empty, 1., l_i)[:, None]
    m_o = m_row[:, None] & m_dv[None, :]
    if SPLIT:
        b_lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1., l_i)))  # log2 units
        p_part = (i_b * H + heads) * n_splits + i_s
        tl.store(o_part + p_part[:, None] * DV + o_dv[None, :], acc, mask=m_o)
        tl.store(lse_part + p_part, b_lse, mask=m_row)
    else:
        tl.store(o + (i_b * H + heads)[:, None] * DV + o_dv[None, :], acc.to(o.dtype.element_ty), mask=m_o)


@triton.jit(do_not_specialize=["n_rows", "n_splits"])
def _loki_sparse_attn_reduce_kernel(o_part, lse_part, o, n_rows, n_splits,
                                    DV: tl.constexpr, BR: tl.constexpr, BDV: tl.constexpr):
    # program = block of BR (row, query head) pairs: o = Σ_s 2^(lse_s - m) o_s / Σ_s 2^(lse_s - m)
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_row = rows < n_rows
    o_dv = tl.arange(0, BDV)
    m_o = m_row[:, None] & (o_dv < DV)[None, :]
    m_i = tl.full([BR], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BR], dtype=tl.float32)
    acc = tl.zeros([BR, BDV], dtype=tl.float32)
    for i_s in range(0, n_splits):
        p_part = rows * n_splits + i_s
        # [BR], [BR, BDV]
        b_lse = tl.load(lse_part + p_part, mask=m_row, other=float("-inf"))
        b_o = tl.load(o_part + p_part[:, None] * DV + o_dv[None, :], mask=m_o, other=0.)
        m_new = tl.maximum(m_i, b_lse)
        m_safe = tl.where(m_new == float("-inf"), 0., m_new)
        alpha = tl.exp2(m_i - m_safe)
        w = tl.exp2(b_lse - m_safe)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + b_o * w[:, None]
        m_i = m_new
    acc = acc / tl.where(l_i == 0., 1., l_i)[:, None]  # rows that attended nothing: 0
    tl.store(o + rows[:, None] * DV + o_dv[None, :], acc.to(o.dtype.element_ty), mask=m_o)


# ---------------------------------------------------------------------------- host launchers


def _paging(block_table: torch.Tensor | None, k_cache_rot: torch.Tensor) -> tuple[int, int, int]:
    """(page size, capacity Smax, row stride of the table): a paged cache is `[num_blocks, page,
    Hk, D]` with capacity `max_blocks * page`; a padded one `[B, Smax, Hk, D]` (page 1: unused)."""
    if block_table is None:
        return 1, k_cache_rot.shape[1], 0
    page = k_cache_rot.shape[1]
    return page, block_table.shape[1] * page, block_table.stride(0)


def _rotate_launch(x_view: tuple, y_view: tuple, components: torch.Tensor, T: int, B: int, HK: int,
                   low_view: tuple | None = None, v_views: tuple | None = None,
                   cache_seqlens: torch.Tensor | None = None, Smax: int = 0, R: int = 0, DV: int = 0,
                   block_table: torch.Tensor | None = None, page: int = 1) -> None:
    """Launch `_loki_rotate_kernel`; views are `(tensor, s_b, s_t, s_h, s_d)` (low: `s_b, s_h,
    s_t, s_d`), so one kernel serves queries (`T` = query heads of a group) and appended keys
    (through `block_table` when the cache is paged: `s_b` is then the stride of a block)."""
    D = components.shape[-1]
    BK = 16
    BE = min(_pow2(D, 16), 64)
    BT = 16 if T <= 16 else 32
    n_e = triton.cdiv(max(D, DV), BE)
    n_t = triton.cdiv(T, BT)
    none4 = (0, 0, 0, 0)
    x, *s_x = x_view
    y, *s_y = y_view
    y_low, *s_l = low_view if low_view is not None else (None, *none4)
    (v_new, *s_nv), (v_cache, *s_v) = v_views if v_views is not None else ((None, *none4), (None, *none4))
    _loki_rotate_kernel[(B * HK * n_t * n_e,)](
        x, components, y, y_low, v_new, v_cache, cache_seqlens, block_table, T, Smax, n_t, n_e,
        *s_x, *s_y, *s_l, *s_nv, *s_v, block_table.stride(0) if block_table is not None else 0,
        HK=HK, D=D, DV=DV, R=R, BT=BT, BK=BK, BE=BE, PAGE=page, num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def rotate_queries(q: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """`q [B, 1, H, D]` (any strides) -> float32 `q̃ [B, H, D]`, `q̃[b, h] = q[b, 0, h] @ components[h // G]`."""
    B, _, H, D = q.shape
    HK = components.shape[0]
    G = H // HK
    q_rot = torch.empty(B, H, D, device=q.device, dtype=torch.float32)
    s_qb, _, s_qh, s_qd = q.stride()
    # rows of a (b, hk) program are the G query heads of the group: head = hk * G + row
    _rotate_launch((q, s_qb, s_qh, G * s_qh, s_qd), (q_rot, H * D, D, G * D, 1),
                   components.contiguous(), G, B, HK)
    return q_rot


def loki_append_fwd(k_new: torch.Tensor, v_new: torch.Tensor, k_cache_rot: torch.Tensor, v_cache: torch.Tensor,
                    cache_seqlens: torch.Tensor, components: torch.Tensor,
                    k_lowrank: torch.Tensor | None = None, block_table: torch.Tensor | None = None) -> None:
    """Rotates `k_new [B, T, Hk, D]` and writes it at `cache_seqlens[b] + t` into `k_cache_rot`
    (and its first `R` dims into `k_lowrank [B, Hk, Smax, R]`), and `v_new` into `v_cache`, in place;
    through `block_table [B, max_blocks]` into paged caches `[num_blocks, page, Hk, D]` (`k_lowrank
    [num_blocks, Hk, page, R]`) when given."""
    B, T, HK, D = k_new.shape
    if B == 0 or T == 0 or HK == 0:
        return
    page, Smax, _ = _paging(block_table, k_cache_rot)
    DV = v_cache.shape[3]
    s_nk, s_k, s_nv, s_v = k_new.stride(), k_cache_rot.stride(), v_new.stride(), v_cache.stride()
    low = None
    if k_lowrank is not None:
        s_l = k_lowrank.stride()
        low = (k_lowrank, s_l[0], s_l[1], s_l[2], s_l[3])
    with device_guard(k_new):
        _rotate_launch((k_new, s_nk[0], s_nk[1], s_nk[2], s_nk[3]), (k_cache_rot, s_k[0], s_k[1], s_k[2], s_k[3]),
                       components.contiguous(), T, B, HK, low_view=low,
                       v_views=((v_new, s_nv[0], s_nv[1], s_nv[2], s_nv[3]), (v_cache, s_v[0], s_v[1], s_v[2], s_v[3])),
                       cache_seqlens=cache_seqlens, Smax=Smax, R=k_lowrank.shape[3] if k_lowrank is not None else 0,
                       DV=DV, block_table=block_table, page=page)


def loki_scores_fwd(q_rot: torch.Tensor, keys: torch.Tensor, cache_seqlens: torch.Tensor, HK: int, *, rank: int,
                    group: bool, block_table: torch.Tensor | None = None,
                    hist: torch.Tensor | None = None) -> torch.Tensor:
    """Approximate scores from `q̃ [B, H, D]` and `keys`, a `[B, Hk, Smax, >= rank]` view by
    strides (the low-rank buffer, or `k_cache_rot.transpose(1, 2)`; paged: `[num_blocks, Hk, page,
    >= rank]` read through `block_table`). Returns float32 `[B, H or Hk, Smax]`, `-inf` at
    positions `>= cache_seqlens[b]`. With `hist` (zeroed int32 `[B * Hk, 4, 256]`, group selection
    only) the first radix pass of the segmented selection is added into `hist[:, 0]`."""
    assert hist is None or group, "the fused first radix pass serves group selection"
    B, H, D = q_rot.shape
    page = keys.shape[2]
    Smax = keys.shape[2] if block_table is None else block_table.shape[1] * page
    G = H // HK
    scores = torch.empty(B, HK if group else H, Smax, device=q_rot.device, dtype=torch.float32)
    BG, BN, BR = _score_blocks(G, rank)
    n_blocks = triton.cdiv(Smax, BN)
    _loki_score_kernel[(n_blocks * B * HK,)](
        q_rot, keys, cache_seqlens, block_table, scores, hist, Smax, rank, n_blocks, *keys.stride(),
        block_table.stride(0) if block_table is not None else 0,
        H=H, HK=HK, G=G, D=D, BG=BG, BN=BN, BR=BR, GROUP=group, PAGE=page if block_table is not None else 1,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return scores


def select_segments(rows: int, Smax: int, num_sms: int) -> tuple[int, int]:
    """(segment length, segments per row) of the selection, from shapes only. One segment (the
    single-program radix select) when the rows alone give every SM a program; else segments of a
    power of two >= SEGMENT_MIN slots, enough for about SEGMENT_WAVES programs per SM."""
    if rows >= num_sms or Smax <= SEGMENT_MIN:
        return Smax, 1
    seg_len = max(SEGMENT_MIN, triton.next_power_of_2(triton.cdiv(rows * Smax, SEGMENT_WAVES * num_sms)))
    n_seg = triton.cdiv(Smax, seg_len)
    return (Smax, 1) if n_seg == 1 else (seg_len, n_seg)


def _select_segmented(scores: torch.Tensor, cache_seqlens: torch.Tensor, top_k: int, idx: torch.Tensor,
                      seg_len: int, n_seg: int, hist: torch.Tensor | None = None) -> None:
    """The radix select of `loki_select` spread over `n_seg` programs per row: four histogram
    launches (one per 8-bit digit; segments add integer counts into the row's histogram; the last
    also keeps per-segment counts), then one that writes each segment's positions after those of
    the earlier segments. Exactly the single-program result. `hist` given: the first pass is
    already in it (fused into the score kernel), three histogram launches remain."""
    B, HSEL, Smax = scores.shape
    rows = B * HSEL
    first = 0 if hist is None else 1
    if hist is None:
        hist = torch.zeros(rows, 4, 256, device=scores.device, dtype=torch.int32)
    stats = torch.empty(rows, n_seg, SEG_STATS, device=scores.device, dtype=torch.int32)
    blk = min(seg_len, 128 if interpreted() else SELECT_BLOCK)
    warps = max(4, min(8, blk // 1024))
    grid = (rows * n_seg,)
    for r in range(first, 4):
        _loki_select_hist_kernel[grid](scores, cache_seqlens, hist, stats, Smax, top_k, n_seg, seg_len, HSEL=HSEL,
                                       BLK=blk, PASS=r, num_warps=warps, num_stages=1)
    _loki_select_write_kernel[grid](scores, cache_seqlens, hist, stats, idx, Smax, top_k, n_seg, seg_len, HSEL=HSEL,
                                    BLK=blk, SB=128, num_warps=warps, num_stages=1)


def loki_select(scores: torch.Tensor, cache_seqlens: torch.Tensor, top_k: int,
                segment: int | None = None, hist: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the `min(top_k, cache_seqlens[b])` largest valid scores of each `[B, Hsel,
    Smax]` row, int32 `[B, Hsel, top_k]` in increasing position order (ties at the threshold: the
    lowest positions); slots past a short row's count hold `Smax`. Radix select, no sort, no host
    synchronisation: one program per row, or (few rows: :func:`select_segments`; or `segment`
    slots per program if given) several programs per row. `hist`: the row histograms with the
    first radix pass done by the score kernel (segmented selection only)."""
    B, HSEL, Smax = scores.shape
    idx = torch.empty(B, HSEL, top_k, device=scores.device, dtype=torch.int32)
    if idx.numel() == 0:
        return idx
    if segment is not None:
        if segment < 1 or segment & (segment - 1):
            raise ValueError(f"segment must be a power of two, got {segment}")
        seg_len, n_seg = segment, triton.cdiv(Smax, segment)
    else:
        seg_len, n_seg = select_segments(B * HSEL, Smax, sm_count(scores.device))
    if n_seg > 1:
        _select_segmented(scores, cache_seqlens, top_k, idx, seg_len, n_seg, hist)
        return idx
    assert hist is None, "a histogram from the scorer serves the segmented selection only"
    row = triton.next_power_of_2(Smax)
    if interpreted():
        blk = max(16, row) if row <= 256 else 128
    else:
        blk = max(1024, row) if row <= SELECT_RESIDENT else SELECT_BLOCK
    _loki_select_kernel[(B * HSEL,)](scores, cache_seqlens, idx, Smax, top_k, HSEL=HSEL, BLK=blk,
                                    RESIDENT=Smax <= blk, num_warps=max(4, min(8, blk // 1024)),
                                    num_stages=1)
    return idx


def loki_sparse_attn_fwd(q_rot: torch.Tensor, k_cache_rot: torch.Tensor, v_cache: torch.Tensor,
                         cache_seqlens: torch.Tensor, idx: torch.Tensor | None, *, scale: float, out_dtype: torch.dtype,
                         num_splits: int | None = None, block_table: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention of `q̃ [B, H, D]` over the selected slots `idx [B, H or Hk, n_sel]` (int32
    positions; `None`: every position, dense). `idx` with `Hk` heads (or dense with `G > 1`) lets
    a group's query heads share each gathered key. Paged caches are read through `block_table`.
    Returns `o [B, 1, H, Dv]` in `out_dtype`."""
    B, H, D = q_rot.shape
    page, Smax, s_btb = _paging(block_table, k_cache_rot)
    HK, DV = v_cache.shape[2], v_cache.shape[3]
    G = H // HK
    shared = G > 1 and (idx is None or idx.shape[1] == HK)
    n_sel = Smax if idx is None else idx.shape[2]
    BD, BDV = _pow2(D, 16), _pow2(DV, 16)
    BM, BN = _attn_blocks(shared, G, BD)
    n_prog = B * (HK if shared else H)
    n_splits = num_splits or _num_splits(n_prog, n_sel, BN, q_rot.device)
    chunk = max(BN, triton.cdiv(triton.cdiv(n_sel, n_splits), BN) * BN)
    n_splits = max(1, triton.cdiv(n_sel, chunk))
    o = torch.empty(B, 1, H, DV, device=q_rot.device, dtype=out_dtype)
    split = n_splits > 1
    o_part = torch.empty(B * H, n_splits, DV, device=q_rot.device, dtype=torch.float32) if split else None
    lse_part = torch.empty(B * H, n_splits, device=q_rot.device, dtype=torch.float32) if split else None
    s_i = idx.stride() if idx is not None else (0, 0, 0)
    _loki_sparse_attn_fwd_kernel[(n_splits * n_prog,)](
        q_rot, k_cache_rot, v_cache, cache_seqlens, block_table, idx, o, o_part, lse_part, float(scale), n_sel, chunk,
        n_splits, *k_cache_rot.stride(), *v_cache.stride(), *s_i, s_btb,
        H=H, HK=HK, G=G, D=D, DV=DV, BM=BM, BN=BN, BD=BD, BDV=BDV, SHARED=shared, SPLIT=split, PAGE=page,
        DOT_PRECISION=dot_precision(v_cache), num_stages=NUM_STAGES,
        # per-head tiles run float32 broadcasts: 8 warps keep a [BN, BD >= 128] tile from spilling
        num_warps=NUM_WARPS if shared or BD < 128 else 8)
    if split:
        BR = 16
        _loki_sparse_attn_reduce_kernel[(triton.cdiv(B * H, BR),)](
            o_part, lse_part, o, B * H, n_splits, DV=DV, BR=BR, BDV=BDV)
    return o


def loki_decode_fwd(q: torch.Tensor, k_cache_rot: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                    components: torch.Tensor, *, rank: int, top_k: int, scale: float, selection: str,
                    k_lowrank: torch.Tensor | None = None, num_splits: int | None = None,
                    block_table: torch.Tensor | None = None) -> torch.Tensor:
    """One Loki decoding step (no host synchronisation). Scores come from `k_lowrank [B, Hk, Smax,
    R >= rank]` when given, else from `k_cache_rot[..., :rank]`. With `block_table [B, max_blocks]`
    the caches are paged (`[num_blocks, page, Hk, D]`, `k_lowrank [num_blocks, Hk, page, R]`).
    Returns `o [B, 1, H, Dv]`."""
    B, _, H, D = q.shape
    _, Smax, _ = _paging(block_table, k_cache_rot)
    HK, DV = k_cache_rot.shape[2], v_cache.shape[3]
    if B == 0 or H == 0 or Smax == 0:
        return torch.zeros(B, 1, H, DV, device=q.device, dtype=q.dtype)
    with device_guard(q):
        q_rot = rotate_queries(q, components)
        idx = None
        if top_k < Smax:  # else every row is dense: no scoring, no selection
            keys = k_lowrank if k_lowrank is not None else k_cache_rot.transpose(1, 2)
            group = selection == "group"
            hist = None
            if group and select_segments(B * HK, Smax, sm_count(q.device))[1] > 1:
                # few rows, group selection: the scorer does the selection's first radix pass
                hist = torch.zeros(B * HK, 4, 256, device=q.device, dtype=torch.int32)
            scores = loki_scores_fwd(q_rot, keys, cache_seqlens, HK, rank=rank, group=group,
                                     block_table=block_table, hist=hist)
            # [B, H or Hk, top_k] int32, position order
            idx = loki_select(scores, cache_seqlens, top_k, hist=hist)
        return loki_sparse_attn_fwd(q_rot, k_cache_rot, v_cache, cache_seqlens, idx, scale=scale, out_dtype=q.dtype,
                                    num_splits=num_splits, block_table=block_table)


# ----------------------------------------------------------------------- backend entry points


@torch.no_grad()
def loki_attention_decode(q, k_cache_rot, v_cache, cache_seqlens, components, rank, top_k, scale, selection,
                          block_table=None):
    """Triton backend of `attnkit.loki_attention_decode` (docs/contracts.md): the portable layout,
    scores read from `k_cache_rot[..., :rank]` (paged through `block_table` when given)."""
    return loki_decode_fwd(q, k_cache_rot, v_cache, cache_seqlens, components, rank=rank, top_k=top_k, scale=scale,
                           selection=selection, block_table=block_table)


@torch.no_grad()
def loki_attention_decode_lowrank(q, k_lowrank, k_cache_rot, v_cache, cache_seqlens, components, rank, top_k, scale,
                                  selection, block_table=None):
    """Triton backend of `loki_attention_decode_lowrank` (attnkit/ops/loki/cache.py): scores read
    from the contiguous (or paged) low-rank key buffer."""
    return loki_decode_fwd(q, k_cache_rot, v_cache, cache_seqlens, components, rank=rank, top_k=top_k, scale=scale,
                           selection=selection, k_lowrank=k_lowrank, block_table=block_table)


@torch.no_grad()
def loki_cache_append(k_new, v_new, k_cache_rot, v_cache, cache_seqlens, components, k_lowrank, block_table=None):
    """Triton backend of `loki_cache_append` (attnkit/ops/loki/cache.py): one fused launch rotates
    the new keys and writes the rotated cache, the low-rank buffer and the values (through the
    block table when paged)."""
    loki_append_fwd(k_new, v_new, k_cache_rot, v_cache, cache_seqlens, components, k_lowrank, block_table)
