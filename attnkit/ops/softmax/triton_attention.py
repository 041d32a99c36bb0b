"""Triton softmax attention (prefill / training): FlashAttention-2 forward and backward with native
GQA, bottom-right causal masking, variable lengths and a fused per-head QK-norm.

GQA by packing: a program owns one KV head and a block of `BM` *packed query rows*; packed row
`r` of a sequence is query position `t = r // G` of query head `hk * G + r % G` (`G = H // Hk`).
Every K/V tile a program loads is therefore used by all the query heads of its group (for MQA a
block may hold a single position of all `H` heads; for MHA it is the usual row block). In the
backward, a program owns a block of keys of one KV head and loops over every packed query row
of its group, so `dk`/`dv` are summed over the group's query heads inside the kernel: K/V are
never repeated and no per-query-head `dk`/`dv` is written.

QK-norm is fused without normalising the tiles: with `x̂ = r · x ⊙ w`, `q̂·k̂ = r_q r_k ((x_q ⊙ u)
· x_k)` (`u = w_q ⊙ w_k`), so the dots take the raw input tiles and the per-row scales `r` multiply
the float32 products. The logits keep float32 accuracy in 16-bit dtypes (only `x_q ⊙ u` is a new
operand, split in two when a weight exists); no normalised copy of Q or K is ever written. The
backward folds `r` into `ds` the same way and runs the norm's backward at the end of the programs
that own the finished `dq̂` (dq kernel) and `dk̂` (dk/dv kernel) rows. Weight and tensor-scale
gradients are written as per-program partials and summed in the launcher (deterministic: no
atomics). Derivations are in `docs/softmax_kernels.md`.

Variable lengths run in one launch without a host sync: sequence `i` owns the program ids
`[cu[i]·G // BM + i, cu[i+1]·G // BM + i + 1)` (at least `cdiv(len_i·G, BM)` of them) and a
program finds its sequence by a binary search over `cu_seqlens`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..common.triton_utils import device_guard, dot_precision, interpreted

NORMS = {None: 0, "rms": 1, "l2": 2}


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 4 for the CPU interpreter."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def head_block(d: int) -> int:
    """A head dim padded to a power of two of at least 16 (the smallest `tl.dot` operand)."""
    return max(16, triton.next_power_of_2(d))


def strides4(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())


# ------------------------------------------------------------------------------------- configs


def _fwd_configs() -> list[triton.Config]:
    if interpreted():
        return [triton.Config({"BM": 32, "BN": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
            for bm, bn, w in ((128, 64, 8), (128, 32, 8), (64, 64, 4), (64, 32, 4))
            for s in (2, 3)]


def _smem_bytes(cfg: triton.Config, named_args: dict, kwargs: dict, q_rows: str, kv_rows: str) -> int:
    """Rough shared memory of a config: one resident `[q_rows, BD]` tile plus `num_stages`
    pipelined `[kv_rows, BD + BDV]` tiles."""
    args = {**named_args, **kwargs, **cfg.kwargs}
    size = args["q"].element_size()
    return size * (args[q_rows] * args["BD"] + max(cfg.num_stages, 1) * args[kv_rows] * (args["BD"] + args["BDV"]))


def _prune_fwd(configs, named_args, **kwargs):
    """Drop configs whose tiles would not fit in shared memory (head dims 256, float32)."""
    kept = [c for c in configs if _smem_bytes(c, named_args, kwargs, "BM", "BN") <= 200 * 1024]
    return kept or [triton.Config({"BM": 32, "BN": 32}, num_warps=4, num_stages=1)]


def _bwd_configs(inner: str) -> list[triton.Config]:
    """A backward program owns a fixed tile (`_bwd_tile`: the grid and the partial buffers depend
    on it) and loops over the other side in tiles of `inner` rows, which are tuned with warps and
    stages (register pressure: the fused norm keeps more tiles alive)."""
    if interpreted():
        return [triton.Config({inner: 32}, num_warps=4, num_stages=1)]
    return [triton.Config({inner: n}, num_warps=w, num_stages=2) for n in (16, 32, 64) for w in (4, 8)]


def _prune_bwd(configs, named_args, **kwargs):
    """64-row inner tiles only for head dims <= 64 (they spill above)."""
    args = {**named_args, **kwargs}
    if max(args["BD"], args["BDV"]) <= 64:
        return configs
    return [c for c in configs if max(c.kwargs.values()) <= 32]


def _bwd_tile(bd: int, bdv: int) -> int:
    """Keys per dk/dv program and packed query rows per dq program."""
    if interpreted():
        return 32
    return 64 if max(bd, bdv) <= 64 else 32


# ----------------------------------------------------------------------------------- jit helpers


@triton.jit
def find_block(cu_seqlens, pid, N, G: tl.constexpr, BLOCK: tl.constexpr):
    """Varlen scheduling: sequence `i` owns the program ids `[first(i), first(i + 1))` with
    `first(i) = cu[i]·G // BLOCK + i` (at least `cdiv(len_i·G, BLOCK)` ids, since
    `floor(a + x) - floor(a) + 1 >= ceil(x)`). Returns `(i, pid - first(i))` by binary search."""
    lo = pid * 0
    hi = lo + N  # invariant: first(lo) <= pid < first(hi); first(N) is the grid size
    while hi - lo > 1:
        mid = (lo + hi) // 2
        go_right = tl.load(cu_seqlens + mid).to(tl.int64) * G // BLOCK + mid <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo, pid - (tl.load(cu_seqlens + lo).to(tl.int64) * G // BLOCK + lo)


@triton.jit
def seq_bounds(cu_seqlens_q, cu_seqlens_k, i_n, T, S, IS_VARLEN: tl.constexpr):
    """(first query row, query length, first key row, key length) of sequence `i_n`."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens_q + i_n).to(tl.int64)
        t_len = tl.load(cu_seqlens_q + i_n + 1).to(tl.int64) - bos
        bos_k = tl.load(cu_seqlens_k + i_n).to(tl.int64)
        s_len = tl.load(cu_seqlens_k + i_n + 1).to(tl.int64) - bos_k
    else:
        bos = i_n * 0
        t_len = bos + T
        bos_k = bos
        s_len = bos + S
    return bos, t_len, bos_k, s_len


@triton.jit
def row_rstd(x, m_row, eps, D: tl.constexpr, NORM: tl.constexpr):
    """`r = rsqrt(mean (rms) or sum (l2) of x² + eps)` per row of a zero-padded float32 tile
    `[R, BD]`. Padded rows get 0 (never `rsqrt(eps)`, which is inf for eps = 0). Without a norm
    (NORM = 0) the callers ignore `r`: it is the row mask and nothing is computed."""
    r = m_row.to(tl.float32)
    if NORM != 0:
        ss = tl.sum(x * x, 1)
        if NORM == 1:
            ss = ss / D
        r = tl.where(m_row, tl.rsqrt(tl.where(m_row, ss + eps, 1.)), 0.)
    return r


@triton.jit
def row_norm(x, w, o_d, m_d, m_row, eps, D: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr):
    """Per-row QK-norm of a zero-padded float32 tile `[R, BD]`: returns `(x̂, y, r)` with
    `r = row_rstd(x)` `[R]`, `y = x·r` and `x̂ = y·w`."""
    r = row_rstd(x, m_row, eps, D, NORM)
    y = x * r[:, None]
    if HAS_W:
        x_hat = y * tl.load(w + o_d, mask=m_d, other=0.).to(tl.float32)[None, :]
    else:
        x_hat = y
    return x_hat, y, r


@triton.jit
def row_norm_bwd(g, y, r, w, o_d, m_d, D: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr):
    """Backward of `row_norm`: `g = dL/dx̂` `[R, BD]` -> (`dx [R, BD]`, `Σ_rows g ⊙ y` `[BD]`).

    `dx = r · (g·w - c · y · Σ_d(g·w·y))` with `c = 1/D` (rms) or 1 (l2).
    """
    if HAS_W:
        gy = g * tl.load(w + o_d, mask=m_d, other=0.).to(tl.float32)[None, :]
    else:
        gy = g
    c = tl.sum(gy * y, 1)
    if NORM == 1:
        c = c / D
    dx = r[:, None] * (gy - y * c[:, None])
    dw = tl.sum(g * y, 0)
    return dx, dw


@triton.jit
def load_rows(base, rows, heads, o_d, m_row, m_d, s_t, s_h, s_d):
    """A `[R, BD]` tile of rows (`rows` token index, `heads` head index per row), zero padded."""
    p = base + rows[:, None] * s_t + heads[:, None] * s_h + o_d[None, :] * s_d
    return tl.load(p, mask=m_row[:, None] & m_d[None, :], other=0.)


@triton.jit
def load_scale(scale, scale_ptr, HAS_SCALE_TENSOR: tl.constexpr):
    if HAS_SCALE_TENSOR:
        return tl.load(scale_ptr).to(tl.float32)
    return scale


@triton.jit
def load_weight(w, o_d, m_d, HAS_W: tl.constexpr):
    """A norm weight `[BD]` in float32 (ones when absent, zero padded)."""
    if HAS_W:
        return tl.load(w + o_d, mask=m_d, other=0.).to(tl.float32)
    return tl.where(m_d, 1., 0.)


@triton.jit
def logit_operand(b_x, b_u, NORM: tl.constexpr, HAS_U: tl.constexpr, SPLIT: tl.constexpr):
    """The query side of the logits. With a norm, `q̂·k̂ = r_q r_k ((x_q ⊙ w_q ⊙ w_k) · x_k)`: the
    row scales are applied to the float32 products, so only `x_q ⊙ u` (u = w_q ⊙ w_k) is a new
    operand. In 16-bit dtypes it is split into `hi + lo` (two input-dtype tiles, ~2x the mantissa)
    so that the logits keep float32 accuracy. Returns `(hi, lo)`; `lo` is used only with SPLIT."""
    b_hi = b_x
    b_lo = b_x
    if NORM != 0:
        if HAS_U:
            b_a = b_x.to(tl.float32) * b_u[None, :]
            b_hi = b_a.to(b_x.dtype)
            if SPLIT:
                b_lo = (b_a - b_hi.to(tl.float32)).to(b_x.dtype)
    return b_hi, b_lo


@triton.jit
def raw_logits(b_hi, b_lo, b_xk, r_q, r_k, NORM: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """`q̂·k̂` (before the scale) of a `[BM, BN]` tile from `logit_operand` and the raw keys."""
    # [BM, BD] @ [BD, BN] -> [BM, BN]
    b_raw = tl.dot(b_hi, tl.trans(b_xk), input_precision=DOT_PRECISION)
    if SPLIT:
        b_raw += tl.dot(b_lo, tl.trans(b_xk), input_precision=DOT_PRECISION)
    if NORM != 0:
        b_raw = b_raw * r_q[:, None] * r_k[None, :]
    return b_raw


# --------------------------------------------------------------------------------------- forward


def _split_logits(args) -> bool:
    """16-bit inputs with a norm weight: the logit operand is split in two (see `logit_operand`)."""
    return (args["NORM"] != 0 and (args["q_w"] is not None or args["k_w"] is not None)
            and args["q"].dtype != torch.float32)


_HEURISTICS = {
    "HAS_SCALE_TENSOR": lambda args: args["scale_ptr"] is not None,
    "HAS_QW": lambda args: args["q_w"] is not None,
    "HAS_KW": lambda args: args["k_w"] is not None,
    "HAS_U": lambda args: args["q_w"] is not None or args["k_w"] is not None,
    "SPLIT": _split_logits,
    "IS_VARLEN": lambda args: args["cu_seqlens_q"] is not None,
}


@triton.heuristics(_HEURISTICS)
@triton.autotune(configs=_fwd_configs(), key=["BD", "BDV", "G", "IS_CAUSAL", "NORM"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit(do_not_specialize=["T", "S", "N"])
def _attention_fwd_kernel(
    q, k, v, o, lse, scale_ptr, q_w, k_w, cu_seqlens_q, cu_seqlens_k, scale, eps, T, S, N,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, NORM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, HAS_U: tl.constexpr,
    SPLIT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    # program = (block of BM packed query rows of one sequence, batch row x KV head)
    i_m, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_hk = i_bh // HK, i_bh % HK
    if IS_VARLEN:
        i_n, i_m = find_block(cu_seqlens_q, i_m, N, G, BM)
    else:
        i_n = i_b
    bos, t_len, bos_k, s_len = seq_bounds(cu_seqlens_q, cu_seqlens_k, i_n, T, S, IS_VARLEN)
    if i_m * BM >= t_len * G:
        return
    qk_scale = load_scale(scale, scale_ptr, HAS_SCALE_TENSOR) * 1.4426950408889634  # log2(e)

    rows = i_m * BM + tl.arange(0, BM)
    t = rows // G  # query position of each packed row
    h = i_hk * G + rows % G  # query head of each packed row
    m_row = t < t_len
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_d, m_dv = o_d < D, o_dv < DV
    q_base = q + i_b * s_qb + bos * s_qt
    k_base = k + i_b * s_kb + bos_k * s_kt + i_hk * s_kh
    v_base = v + i_b * s_vb + bos_k * s_vt + i_hk * s_vh
    zero_h = tl.zeros([BN], dtype=tl.int64)

    # [BM, BD] raw queries; the norm enters as row scales r_q and the weight product u
    b_xq = load_rows(q_base, t, h, o_d, m_row, m_d, s_qt, s_qh, s_qd)
    b_u = load_weight(q_w, o_d, m_d, HAS_QW) * load_weight(k_w, o_d, m_d, HAS_KW)
    r_q = row_rstd(b_xq.to(tl.float32), m_row, eps, D, NORM)
    b_hi, b_lo = logit_operand(b_xq, b_u, NORM, HAS_U, SPLIT)

    # bottom-right causal: row t sees keys s <= t + s_len - t_len
    shift = s_len - t_len
    n_end = s_len
    if IS_CAUSAL:
        t_last = tl.minimum(t_len - 1, (i_m * BM + BM - 1) // G)
        n_end = tl.maximum(tl.minimum(s_len, t_last + shift + 1), 0)

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    for n0 in range(0, n_end, BN):
        cols = n0 + tl.arange(0, BN)
        m_col = cols < s_len
        # [BN, BD], [BN, BDV]
        b_xk = load_rows(k_base, cols, zero_h, o_d, m_col, m_d, s_kt, s_kh, s_kd)
        b_v = load_rows(v_base, cols, zero_h, o_dv, m_col, m_dv, s_vt, s_vh, s_vd)
        r_k = row_rstd(b_xk.to(tl.float32), m_col, eps, D, NORM)
        # [BM, BN] logits in log2 units
        b_s = raw_logits(b_hi, b_lo, b_xk, r_q, r_k, NORM, SPLIT, DOT_PRECISION) * qk_scale
        visible = m_col[None, :]
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= (t + shift)[:, None])
        b_s = tl.where(visible, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        # rows that have seen no key yet keep m = -inf: shift them by 0 (exp2(-inf) = 0, no NaN)
        m_safe = tl.where(m_new == float("-inf"), 0., m_new)
        b_p = tl.exp2(b_s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(b_p, 1)
        # [BM, BN] @ [BN, BDV] -> [BM, BDV]
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
        m_i = m_new

    # a row that sees no key: o = 0, lse = -inf
    empty = l_i == 0.
    acc = acc / tl.where(empty, 1., l_i)[:, None]
    b_lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1., l_i))) * 0.6931471805599453)
    p_o = o + ((i_b * T + bos + t) * H + h)[:, None] * DV + o_dv[None, :]
    tl.store(p_o, acc.to(o.dtype.element_ty), mask=m_row[:, None] & m_dv[None, :])
    tl.store(lse + (i_b * H + h) * T + bos + t, b_lse, mask=m_row)


# -------------------------------------------------------------------------------------- backward


@triton.heuristics({"HAS_DLSE": lambda args: args["dlse"] is not None})
@triton.jit(do_not_specialize=["T"])
def _attention_bwd_preprocess_kernel(
    o, do, dlse, delta, T,
    H: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, BT: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    # delta = rowsum(dO ⊙ O) - dlse: the softmax backward's row term (the lse gradient folds in,
    # since d lse / d s = p). o/do are contiguous [B, T, H, DV]; delta has the lse layout [B, H, T].
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    t = i_t * BT + tl.arange(0, BT)
    o_dv = tl.arange(0, BDV)
    m = (t < T)[:, None] & (o_dv < DV)[None, :]
    p = ((i_b * T + t) * H + i_h)[:, None] * DV + o_dv[None, :]
    # [BT, BDV] -> [BT]
    b_delta = tl.sum(tl.load(o + p, mask=m, other=0.).to(tl.float32)
                     * tl.load(do + p, mask=m, other=0.).to(tl.float32), 1)
    if HAS_DLSE:
        b_delta -= tl.load(dlse + i_bh * T + t, mask=t < T, other=0.)
    tl.store(delta + i_bh * T + t, b_delta, mask=t < T)


@triton.jit
def _softmax_grad_tile(b_raw, b_do, b_v, b_lse2, b_delta, visible, qk_scale, DOT_PRECISION: tl.constexpr):
    """From the raw logits `[BM, BN]`: returns `(p, ds = dL/ds)`, `s` the scaled natural logits."""
    b_p = tl.where(visible, tl.exp2(b_raw * qk_scale - b_lse2[:, None]), 0.)
    # [BM, BDV] @ [BDV, BN] -> [BM, BN]
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
    return b_p, b_p * (b_dp - b_delta[:, None])


@triton.heuristics(_HEURISTICS)
@triton.autotune(configs=_bwd_configs("BM"), key=["BD", "BDV", "G", "IS_CAUSAL", "NORM"],
                 prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit(do_not_specialize=["T", "S", "N"])
def _attention_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv, dkw_part, scale_ptr, q_w, k_w, cu_seqlens_q, cu_seqlens_k,
    scale, eps, T, S, N,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, NORM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, HAS_U: tl.constexpr,
    SPLIT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    # program = (block of BN keys of one sequence, batch row x KV head); loops over every packed
    # query row of the group, so dk/dv are summed over the group's G query heads here.
    i_n_blk, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_hk = i_bh // HK, i_bh % HK
    if IS_VARLEN:
        i_n, i_n_blk = find_block(cu_seqlens_k, i_n_blk, N, 1, BN)
    else:
        i_n = i_b
    bos, t_len, bos_k, s_len = seq_bounds(cu_seqlens_q, cu_seqlens_k, i_n, T, S, IS_VARLEN)
    if i_n_blk * BN >= s_len:
        return
    scale = load_scale(scale, scale_ptr, HAS_SCALE_TENSOR)
    qk_scale = scale * 1.4426950408889634

    cols = i_n_blk * BN + tl.arange(0, BN)
    m_col = cols < s_len
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_d, m_dv = o_d < D, o_dv < DV
    zero_h = tl.zeros([BN], dtype=tl.int64)
    q_base = q + i_b * s_qb + bos * s_qt
    k_base = k + i_b * s_kb + bos_k * s_kt + i_hk * s_kh
    v_base = v + i_b * s_vb + bos_k * s_vt + i_hk * s_vh

    # [BN, BD] raw keys, [BN, BDV]
    b_xk = load_rows(k_base, cols, zero_h, o_d, m_col, m_d, s_kt, s_kh, s_kd)
    b_v = load_rows(v_base, cols, zero_h, o_dv, m_col, m_dv, s_vt, s_vh, s_vd)
    r_k = row_rstd(b_xk.to(tl.float32), m_col, eps, D, NORM)
    b_u = load_weight(q_w, o_d, m_d, HAS_QW) * load_weight(k_w, o_d, m_d, HAS_KW)

    shift = s_len - t_len
    r_start = 0
    if IS_CAUSAL:
        # the first query position that sees key i_n_blk * BN, as a packed row, rounded to BM
        t_first = tl.maximum(i_n_blk * BN - shift, 0)
        r_start = (t_first * G // BM) * BM
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BDV], dtype=tl.float32)
    for r0 in range(r_start, t_len * G, BM):
        rows = r0 + tl.arange(0, BM)
        t = rows // G
        h = i_hk * G + rows % G
        m_row = t < t_len
        # [BM, BD] raw queries, [BM, BDV]
        b_xq = load_rows(q_base, t, h, o_d, m_row, m_d, s_qt, s_qh, s_qd)
        r_q = row_rstd(b_xq.to(tl.float32), m_row, eps, D, NORM)
        b_hi, b_lo = logit_operand(b_xq, b_u, NORM, HAS_U, SPLIT)
        p_row = (i_b * T + bos + t) * H + h
        b_do = tl.load(do + p_row[:, None] * DV + o_dv[None, :], mask=m_row[:, None] & m_dv[None, :], other=0.)
        p_lse = (i_b * H + h) * T + bos + t
        b_lse2 = tl.load(lse + p_lse, mask=m_row, other=0.) * 1.4426950408889634
        b_delta = tl.load(delta + p_lse, mask=m_row, other=0.)
        visible = m_row[:, None] & m_col[None, :]
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= (t + shift)[:, None])
        b_raw = raw_logits(b_hi, b_lo, b_xk, r_q, r_k, NORM, SPLIT, DOT_PRECISION)
        b_p, b_ds = _softmax_grad_tile(b_raw, b_do, b_v, b_lse2, b_delta, visible, qk_scale, DOT_PRECISION)
        # [BN, BM] @ [BM, BDV] -> [BN, BDV]
        b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=DOT_PRECISION)
        # dk̂ = Σ_i ds_i q̂_i = w_q ⊙ Σ_i (ds_i r_i) x_i: [BN, BM] @ [BM, BD] -> [BN, BD]
        if NORM != 0:
            b_ds = b_ds * r_q[:, None]
        b_dk += tl.dot(tl.trans(b_ds.to(b_xq.dtype)), b_xq, input_precision=DOT_PRECISION)

    b_dk = b_dk * scale  # dL/dk̂
    m_k = m_col[:, None] & m_d[None, :]
    if NORM != 0:
        if HAS_QW:
            b_dk = b_dk * load_weight(q_w, o_d, m_d, HAS_QW)[None, :]
        # through the norm: y = x·r
        b_dk, b_dkw = row_norm_bwd(b_dk, b_xk.to(tl.float32) * r_k[:, None], r_k, k_w, o_d, m_d, D, NORM, HAS_KW)
        if HAS_KW:
            i_prog = i_bh * tl.num_programs(0) + tl.program_id(0)
            tl.store(dkw_part + i_prog * D + o_d, b_dkw, mask=m_d)
    p_kv = (i_b * S + bos_k + cols) * HK + i_hk
    tl.store(dk + p_kv[:, None] * D + o_d[None, :], b_dk.to(dk.dtype.element_ty), mask=m_k)
    tl.store(dv + p_kv[:, None] * DV + o_dv[None, :], b_dv.to(dv.dtype.element_ty),
             mask=m_col[:, None] & m_dv[None, :])


@triton.heuristics({**_HEURISTICS, "HAS_DLSE": lambda args: args["dlse"] is not None})
@triton.autotune(configs=_bwd_configs("BN"), key=["BD", "BDV", "G", "IS_CAUSAL", "NORM"],
                 prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit(do_not_specialize=["T", "S", "N"])
def _attention_bwd_dq_kernel(
    q, k, v, do, lse, delta, dlse, dq, dqw_part, dscale_part, scale_ptr, q_w, k_w, cu_seqlens_q, cu_seqlens_k,
    scale, eps, T, S, N,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, NORM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, HAS_U: tl.constexpr,
    SPLIT: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    # program = (block of BM packed query rows, batch row x KV head), as in the forward; also the
    # tensor-scale gradient, each (row, key) pair being visited by one program only. Per row,
    # dscale = Σ_j ds_j raw_j + (dlse - Σ_j ds_j) · Σ_j p_j raw_j: the second term removes the
    # error of `delta`, whose rowsum(dO ⊙ O) uses the rounded output (exact arithmetic gives
    # Σ_j ds_j = dlse). Without it dscale would sum that error times Σ_j p_j raw_j over all rows.
    i_m, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_hk = i_bh // HK, i_bh % HK
    if IS_VARLEN:
        i_n, i_m = find_block(cu_seqlens_q, i_m, N, G, BM)
    else:
        i_n = i_b
    bos, t_len, bos_k, s_len = seq_bounds(cu_seqlens_q, cu_seqlens_k, i_n, T, S, IS_VARLEN)
    if i_m * BM >= t_len * G:
        return
    scale = load_scale(scale, scale_ptr, HAS_SCALE_TENSOR)
    qk_scale = scale * 1.4426950408889634

    rows = i_m * BM + tl.arange(0, BM)
    t = rows // G
    h = i_hk * G + rows % G
    m_row = t < t_len
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_d, m_dv = o_d < D, o_dv < DV
    zero_h = tl.zeros([BN], dtype=tl.int64)
    q_base = q + i_b * s_qb + bos * s_qt
    k_base = k + i_b * s_kb + bos_k * s_kt + i_hk * s_kh
    v_base = v + i_b * s_vb + bos_k * s_vt + i_hk * s_vh

    # [BM, BD] raw queries, [BM, BDV], [BM]
    b_xq = load_rows(q_base, t, h, o_d, m_row, m_d, s_qt, s_qh, s_qd)
    b_u = load_weight(q_w, o_d, m_d, HAS_QW) * load_weight(k_w, o_d, m_d, HAS_KW)
    r_q = row_rstd(b_xq.to(tl.float32), m_row, eps, D, NORM)
    b_hi, b_lo = logit_operand(b_xq, b_u, NORM, HAS_U, SPLIT)
    p_row = (i_b * T + bos + t) * H + h
    b_do = tl.load(do + p_row[:, None] * DV + o_dv[None, :], mask=m_row[:, None] & m_dv[None, :], other=0.)
    p_lse = (i_b * H + h) * T + bos + t
    b_lse2 = tl.load(lse + p_lse, mask=m_row, other=0.) * 1.4426950408889634
    b_delta = tl.load(delta + p_lse, mask=m_row, other=0.)

    shift = s_len - t_len
    n_end = s_len
    if IS_CAUSAL:
        t_last = tl.minimum(t_len - 1, (i_m * BM + BM - 1) // G)
        n_end = tl.maximum(tl.minimum(s_len, t_last + shift + 1), 0)
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    b_dsr = tl.zeros([BM], dtype=tl.float32)  # Σ_j ds_j raw_j
    b_dss = tl.zeros([BM], dtype=tl.float32)  # Σ_j ds_j
    b_pr = tl.zeros([BM], dtype=tl.float32)  # Σ_j p_j raw_j
    for n0 in range(0, n_end, BN):
        cols = n0 + tl.arange(0, BN)
        m_col = cols < s_len
        # [BN, BD] raw keys, [BN, BDV]
        b_xk = load_rows(k_base, cols, zero_h, o_d, m_col, m_d, s_kt, s_kh, s_kd)
        b_v = load_rows(v_base, cols, zero_h, o_dv, m_col, m_dv, s_vt, s_vh, s_vd)
        r_k = row_rstd(b_xk.to(tl.float32), m_col, eps, D, NORM)
        visible = m_row[:, None] & m_col[None, :]
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= (t + shift)[:, None])
        b_raw = raw_logits(b_hi, b_lo, b_xk, r_q, r_k, NORM, SPLIT, DOT_PRECISION)
        b_p, b_ds = _softmax_grad_tile(b_raw, b_do, b_v, b_lse2, b_delta, visible, qk_scale, DOT_PRECISION)
        if HAS_SCALE_TENSOR:
            b_raw = tl.where(visible, b_raw, 0.)
            b_dsr += tl.sum(b_ds * b_raw, 1)
            b_dss += tl.sum(b_ds, 1)
            b_pr += tl.sum(b_p * b_raw, 1)
        # dq̂ = Σ_j ds_j k̂_j = w_k ⊙ Σ_j (ds_j r_j) x_j: [BM, BN] @ [BN, BD] -> [BM, BD]
        if NORM != 0:
            b_ds = b_ds * r_k[None, :]
        b_dq += tl.dot(b_ds.to(b_xk.dtype), b_xk, input_precision=DOT_PRECISION)

    i_prog = i_bh * tl.num_programs(0) + tl.program_id(0)
    if HAS_SCALE_TENSOR:
        b_fix = -b_dss
        if HAS_DLSE:
            b_fix += tl.load(dlse + p_lse, mask=m_row, other=0.)
        tl.store(dscale_part + i_prog, tl.sum(b_dsr + b_fix * b_pr, 0))
    b_dq = b_dq * scale  # dL/dq̂
    if NORM != 0:
        if HAS_KW:
            b_dq = b_dq * load_weight(k_w, o_d, m_d, HAS_KW)[None, :]
        # through the norm: y = x·r
        b_dq, b_dqw = row_norm_bwd(b_dq, b_xq.to(tl.float32) * r_q[:, None], r_q, q_w, o_d, m_d, D, NORM, HAS_QW)
        if HAS_QW:
            tl.store(dqw_part + i_prog * D + o_d, b_dqw, mask=m_d)
    tl.store(dq + p_row[:, None] * D + o_d[None, :], b_dq.to(dq.dtype.element_ty),
             mask=m_row[:, None] & m_d[None, :])


# -------------------------------------------------------------------------------- host launchers


def _common_args(q, k, v, scale, q_w, k_w, eps, cu_q, cu_k, causal, norm):
    B, T, H, D = q.shape
    S, HK, DV = k.shape[1], k.shape[2], v.shape[3]
    tensor_scale = isinstance(scale, torch.Tensor)
    return dict(
        q=q, k=k, v=v, scale_ptr=scale if tensor_scale else None, q_w=q_w, k_w=k_w,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, scale=0.0 if tensor_scale else float(scale),
        eps=float(eps), T=T, S=S, N=q.shape[0] if cu_q is None else cu_q.numel() - 1,
        **dict(zip(("s_qb", "s_qt", "s_qh", "s_qd"), strides4(q))),
        **dict(zip(("s_kb", "s_kt", "s_kh", "s_kd"), strides4(k))),
        **dict(zip(("s_vb", "s_vt", "s_vh", "s_vd"), strides4(v))),
        H=H, HK=HK, G=H // HK, D=D, DV=DV, BD=head_block(D), BDV=head_block(DV),
        NORM=NORMS[norm], IS_CAUSAL=causal, DOT_PRECISION=dot_precision(q))


def _row_blocks(n_rows: int, n_seq: int | None, block: int) -> int:
    """Programs along the rows: `cdiv(rows, block)` per batch row, or the varlen schedule."""
    if n_seq is None:
        return triton.cdiv(n_rows, block)
    return n_rows // block + n_seq


def attention_fwd(q, k, v, *, causal: bool, scale: float | torch.Tensor, norm: str | None,
                  q_w: torch.Tensor | None, k_w: torch.Tensor | None, eps: float,
                  cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None):
    """Runs the forward kernel (no autograd). Any strides are accepted.

    Returns `o [B, T, H, DV]` (q's dtype, contiguous) and `lse [B, H, T]` float32 (natural log).
    """
    B, T, H, _ = q.shape
    HK, DV = k.shape[2], v.shape[3]
    G = H // HK
    o = torch.empty(B, T, H, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse.fill_(float("-inf"))
    n_seq = None if cu_seqlens_q is None else cu_seqlens_q.numel() - 1

    def grid(meta):
        return (_row_blocks(T * G, n_seq, meta["BM"]), B * HK)

    with device_guard(q):
        _attention_fwd_kernel[grid](
            o=o, lse=lse, **_common_args(q, k, v, scale, q_w, k_w, eps, cu_seqlens_q, cu_seqlens_k, causal, norm))
    return o, lse


def attention_bwd(q, k, v, o, lse, do, dlse, *, causal: bool, scale: float | torch.Tensor, norm: str | None,
                  q_w: torch.Tensor | None, k_w: torch.Tensor | None, eps: float,
                  cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None):
    """Runs the backward kernels (no autograd). `o`, `do` contiguous `[B, T, H, DV]`; `dlse`
    (`[B, H, T]` float32 contiguous) may be None.

    Returns `(dq, dk, dv, dq_w, dk_w, dscale)`: dq/dk/dv in the input dtype, the weight gradients
    in float32 (None without weights), `dscale` a float32 0-dim tensor (None for a float scale).
    """
    B, T, H, D = q.shape
    S, HK, DV = k.shape[1], k.shape[2], v.shape[3]
    G = H // HK
    dq = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, S, HK, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, S, HK, DV, device=q.device, dtype=v.dtype)
    tensor_scale = isinstance(scale, torch.Tensor)
    tile = _bwd_tile(head_block(D), head_block(DV))
    n_seq = None if cu_seqlens_q is None else cu_seqlens_q.numel() - 1
    grid_q = (_row_blocks(T * G, n_seq, tile), B * HK)
    grid_k = (_row_blocks(S, n_seq, tile), B * HK)
    # per-program partials, zero where a program writes nothing (varlen padding, early exits)
    f32 = dict(device=q.device, dtype=torch.float32)
    dqw_part = torch.zeros(grid_q[0] * grid_q[1], D, **f32) if norm is not None and q_w is not None else None
    dkw_part = torch.zeros(grid_k[0] * grid_k[1], D, **f32) if norm is not None and k_w is not None else None
    dscale_part = torch.zeros(grid_q[0] * grid_q[1], **f32) if tensor_scale else None
    if B == 0 or T == 0 or S == 0:
        # no visible key anywhere: every gradient is zero
        dq.zero_()
        dk.zero_()
        dv.zero_()
    else:
        delta = torch.empty(B, H, T, **f32)
        BT = 32 if interpreted() else 64
        common = _common_args(q, k, v, scale, q_w, k_w, eps, cu_seqlens_q, cu_seqlens_k, causal, norm)
        with device_guard(q):
            _attention_bwd_preprocess_kernel[(triton.cdiv(T, BT), B * H)](
                o, do, dlse, delta, T, H=H, DV=DV, BDV=head_block(DV), BT=BT)
            _attention_bwd_dkdv_kernel[grid_k](
                do=do, lse=lse, delta=delta, dk=dk, dv=dv, dkw_part=dkw_part, BN=tile, **common)
            _attention_bwd_dq_kernel[grid_q](
                do=do, lse=lse, delta=delta, dlse=dlse, dq=dq, dqw_part=dqw_part, dscale_part=dscale_part,
                BM=tile, **common)
    dq_w = dqw_part.sum(0) if dqw_part is not None else None
    dk_w = dkw_part.sum(0) if dkw_part is not None else None
    dscale = dscale_part.sum() if dscale_part is not None else None
    return dq, dk, dv, dq_w, dk_w, dscale


# ------------------------------------------------------------------------------------- autograd


class AttentionFunction(torch.autograd.Function):
    """Autograd for the kernels above; outputs `(o, lse)`, both differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, scale_tensor, q_w, k_w, scale, causal, norm, eps, cu_seqlens_q, cu_seqlens_k):
        ctx.set_materialize_grads(False)
        o, lse = attention_fwd(q, k, v, causal=causal, scale=scale_tensor if scale_tensor is not None else scale,
                               norm=norm, q_w=q_w, k_w=k_w, eps=eps, cu_seqlens_q=cu_seqlens_q,
                               cu_seqlens_k=cu_seqlens_k)
        ctx.save_for_backward(q, k, v, o, lse, scale_tensor, q_w, k_w, cu_seqlens_q, cu_seqlens_k)
        ctx.scale = scale
        ctx.causal = causal
        ctx.norm = norm
        ctx.eps = eps
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, scale_tensor, q_w, k_w, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv, dq_w, dk_w, dscale = attention_bwd(
            q, k, v, o, lse, do.contiguous(), dlse.contiguous() if dlse is not None else None,
            causal=ctx.causal, scale=scale_tensor if scale_tensor is not None else ctx.scale,
            norm=ctx.norm, q_w=q_w, k_w=k_w, eps=ctx.eps, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
        if dscale is not None:
            dscale = dscale.to(scale_tensor.dtype)
        if dq_w is not None:
            dq_w = dq_w.to(q_w.dtype)
        if dk_w is not None:
            dk_w = dk_w.to(k_w.dtype)
        return dq, dk, dv, dscale, dq_w, dk_w, None, None, None, None, None, None


# ------------------------------------------------------------------------ backend entry point


def attention(q, k, v, causal, scale, qk_norm, q_norm_weight, k_norm_weight, norm_eps,
              cu_seqlens_q, cu_seqlens_k, return_lse):
    """Triton backend of `attnkit.attention` (see docs/contracts.md)."""
    scale_tensor = scale if isinstance(scale, torch.Tensor) else None
    if qk_norm is None:
        q_norm_weight = k_norm_weight = None
    o, lse = AttentionFunction.apply(q, k, v, scale_tensor, q_norm_weight, k_norm_weight,
                                     None if scale_tensor is not None else scale, causal, qk_norm,
                                     norm_eps, cu_seqlens_q, cu_seqlens_k)
    return (o, lse) if return_lse else o
