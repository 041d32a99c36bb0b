"""Chunked Triton kernels for causal/non-causal linear attention and lightning attention.

One set of kernels serves both ops. A *state head* owns one recurrent state `S [Dk, Dv]`
(and `z [Dk]` with normalisation):

* lightning attention: one state per query head (`HS = H`), with an optional per-head decay
  `λ = exp(-decay[h])`; the state head reads KV head `h // (H // Hk)`;
* linear attention: one state per KV head (`HS = Hk`), shared by the `H // Hk` query heads of
  its group, with an optional feature map `φ` and normalisation.

Every program scans the chunks of one (sequence, state head, Dv block) in order, Lightning
Attention-2 style: inside a chunk of `BT` tokens the output is `((Q Kᵀ) ⊙ M) V` with the decay
folded into the mask `M`, across chunks it is `λ^(i+1) Q S`, and the float32 state is carried in
registers. Nothing but the inputs is saved for the backward: `dq` recomputes the states in a
forward scan and `dk`/`dv`/`dh0` come from a reverse scan over the state gradient. The
derivation is in `docs/linear_attention.md`.

GQA: K/V are read by index, never repeated. For lightning attention with `H > Hk`, `dk`/`dv`
are written per query head into a float32 buffer and summed over each group in the launcher
(deterministic, no atomics); for linear attention the group's query heads are looped over inside
the program that owns the shared state, so `dk`/`dv` come out per KV head directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common.triton_utils import device_guard, dot_precision, interpreted

FEATURE_MAPS = {None: 0, "elu": 1, "relu": 2}


def _autotune_configs() -> list[triton.Config]:
    if interpreted():
        return [triton.Config({"BT": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BT": bt}, num_warps=w, num_stages=s)
            for bt in (32, 64) for w in (4, 8) for s in (1, 2)]


def _prune_configs(configs, named_args, **kwargs):
    """Large head dims keep a `[BK, BV]` float32 state plus `[BT, BK]` tiles in registers:
    skip the 64-token chunks there, and the 4-warp configs that would spill."""
    bk = kwargs.get("BK", named_args.get("BK"))
    if bk is None or bk < 256:
        return configs
    kept = [c for c in configs if c.kwargs["BT"] <= 32 and c.num_warps >= 8]
    return kept or configs[:1]


def _block_sizes(K: int, V: int) -> tuple[int, int]:
    """Dk is kept whole (`BK`, padded to a power of two); Dv is split into `BV` blocks so the
    `[BK, BV]` float32 state fits in registers."""
    BK = max(16, triton.next_power_of_2(K))
    BV = min(max(16, triton.next_power_of_2(V)), 64 if BK <= 128 else 32)
    return BK, BV


# ----------------------------------------------------------------------------------- jit helpers


@triton.jit
def _phi(x, FEATURE_MAP: tl.constexpr):
    """The feature map on a float32 tile: identity, elu(x) + 1, relu (NaN propagates)."""
    if FEATURE_MAP == 1:
        x = tl.where(x > 0, x + 1.0, tl.exp(tl.where(x > 0, 0.0, x)))
    elif FEATURE_MAP == 2:
        x = tl.where(x < 0, 0.0, x)
    return x


@triton.jit
def _phi_grad(x, FEATURE_MAP: tl.constexpr):
    """dφ/dx on a float32 tile (for FEATURE_MAP != 0)."""
    if FEATURE_MAP == 1:
        g = tl.where(x > 0, 1.0, tl.exp(tl.where(x > 0, 0.0, x)))
    else:
        g = tl.where(x > 0, 1.0, 0.0)
    return g


@triton.jit
def _load_q(q, rows, i_h, o_k, mask, scale, H: tl.constexpr, K: tl.constexpr, FEATURE_MAP: tl.constexpr):
    """Returns (q̃ in q's dtype for the tensor-core dots, q̃ in float32, raw q in float32).
    q̃ = φ(scale·q) with a feature map; without one q̃ = q and the caller multiplies the
    products by `scale` (no extra rounding of q)."""
    # [BT, BK]
    b_q = tl.load(q + (rows[:, None] * H + i_h) * K + o_k[None, :], mask=mask, other=0.)
    b_x = b_q.to(tl.float32)
    b_qf = b_x
    if FEATURE_MAP != 0:
        b_qf = tl.where(mask, _phi(b_x * scale, FEATURE_MAP), 0.)
        b_q = b_qf.to(b_q.dtype)
    return b_q, b_qf, b_x


@triton.jit
def _load_k(k, rows, i_hk, o_k, mask, HK: tl.constexpr, K: tl.constexpr, FEATURE_MAP: tl.constexpr):
    """Returns (φ(k) in k's dtype for the tensor-core dots, φ(k) in float32, raw k in float32);
    padded rows/columns stay exactly 0."""
    # [BT, BK]
    b_k = tl.load(k + (rows[:, None] * HK + i_hk) * K + o_k[None, :], mask=mask, other=0.)
    b_x = b_k.to(tl.float32)
    b_kf = b_x
    if FEATURE_MAP != 0:
        b_kf = tl.where(mask, _phi(b_x, FEATURE_MAP), 0.)
        b_k = b_kf.to(b_k.dtype)
    return b_k, b_kf, b_x


@triton.jit
def _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n * T
        eos = bos + T
    return bos, eos - bos


@triton.jit
def _num_rows(T, IS_VARLEN: tl.constexpr):
    """Token rows of the `[B, T]` (or packed `[1, total]`) layout, as int64."""
    if IS_VARLEN:
        n = T.to(tl.int64)
    else:
        n = tl.num_programs(1).to(tl.int64) * T
    return n


@triton.jit
def _chunk_decay(b_a, o_t, m_t, n_valid, USE_DECAY: tl.constexpr):
    """Decay factors of a chunk of `n_valid` tokens (local index i = o_t):
    λ^(i+1) for the inter-chunk output, λ^(L-1-i) for the state update (0 on padding, where
    the exponent would be positive), and λ^L for the carried state."""
    if USE_DECAY:
        b_qd = tl.exp(-b_a * (o_t + 1).to(tl.float32))
        b_kd = tl.where(m_t, tl.exp(-b_a * tl.where(m_t, n_valid - 1 - o_t, 0).to(tl.float32)), 0.)
        b_sd = tl.exp(-b_a * n_valid.to(tl.float32))
    else:
        b_qd = tl.full(o_t.shape, 1.0, tl.float32)
        b_kd = tl.where(m_t, 1.0, 0.)
        b_sd = 1.0
    return b_qd, b_kd, b_sd


@triton.jit
def _intra_mask(b_a, o_t, USE_DECAY: tl.constexpr):
    """M[i, j] = λ^(i-j) for i >= j, else 0, as exp(-decay·(i-j)) (never λ^-j: it overflows)."""
    # [BT, BT]
    diff = o_t[:, None] - o_t[None, :]
    if USE_DECAY:
        b_m = tl.where(diff >= 0, tl.exp(-b_a * tl.where(diff >= 0, diff, 0).to(tl.float32)), 0.)
    else:
        b_m = tl.where(diff >= 0, 1.0, 0.)
    return b_m


# --------------------------------------------------------------------------------------- forward


@triton.heuristics({
    "USE_INITIAL_STATE": lambda args: args["h0"] is not None,
    "STORE_FINAL_STATE": lambda args: args["ht"] is not None,
    "STORE_OUTPUT": lambda args: args["o"] is not None,
    "USE_DECAY": lambda args: args["decay"] is not None,
    "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
})
@triton.autotune(configs=_autotune_configs(), key=["K", "V"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit(do_not_specialize=["T"])
def _chunk_linear_fwd_kernel(
    q, k, v, o, den, decay, h0, z0, ht, zt, cu_seqlens, scale, eps, T,
    H: tl.constexpr, HK: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, STORE_OUTPUT: tl.constexpr,
    USE_DECAY: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # program = (Dv block, sequence, state head); it scans the sequence's chunks in order.
    # CAUSAL=False (linear attention only) runs with the totals as `h0`/`z0`: no intra term, no update.
    i_v, i_n, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    QPS: tl.constexpr = H // HS  # query heads per state head (1 for lightning, the GQA group for linear)
    i_hk = i_s * HK // HS
    bos, seq_len = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    NT = tl.cdiv(seq_len, BT)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = (i_n * HS + i_s) * K * V + o_k[:, None] * V + o_v[None, :]

    # [BK, BV] float32 state, [BK] normaliser
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    b_z = tl.zeros([BK], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + p_state, mask=m_kv, other=0.)
        if NORMALIZE:
            b_z += tl.load(z0 + (i_n * HS + i_s) * K + o_k, mask=m_k, other=0.)
    b_a = 0.
    if USE_DECAY:
        b_a = tl.load(decay + i_s).to(tl.float32)
    b_m = _intra_mask(b_a, o_t, USE_DECAY)
    b_c = _intra_mask(b_a, o_t, False)  # plain causal 0/1 mask for z_i = z_prev + Σ_{j<=i} k̃_j

    for i_t in range(0, NT):
        t = i_t * BT + o_t
        m_t = t < seq_len
        rows = bos + t
        n_valid = tl.minimum(seq_len - i_t * BT, BT)
        b_qd, b_kd, b_sd = _chunk_decay(b_a, o_t, m_t, n_valid, USE_DECAY)
        if CAUSAL:
            b_k, b_kf, _ = _load_k(k, rows, i_hk, o_k, m_t[:, None] & m_k[None, :], HK, K, FEATURE_MAP)
            # [BT, BV]
            b_v = tl.load(v + (rows[:, None] * HK + i_hk) * V + o_v[None, :],
                          mask=m_t[:, None] & m_v[None, :], other=0.)
        if NORMALIZE:
            # per-token normaliser z_i in float32 (the denominator is not rounded to q's dtype)
            b_zc = b_z[None, :] + tl.zeros([BT, BK], dtype=tl.float32)
            if CAUSAL:
                # [BT, BT] @ [BT, BK] -> [BT, BK]
                b_zc += tl.dot(b_c, b_kf, input_precision="ieee")
        if STORE_OUTPUT:
            for i_g in range(QPS):
                i_h = i_s * QPS + i_g
                b_q, b_qf, _ = _load_q(q, rows, i_h, o_k, m_t[:, None] & m_k[None, :], scale, H, K, FEATURE_MAP)
                # inter-chunk: [BT, BK] @ [BK, BV] -> [BT, BV], scaled by λ^(i+1)
                b_o = tl.dot(b_q, b_h.to(b_q.dtype), input_precision=DOT_PRECISION) * b_qd[:, None]
                if CAUSAL:
                    # intra-chunk: ([BT, BK] @ [BK, BT]) ⊙ M -> [BT, BT]
                    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * b_m
                    # [BT, BT] @ [BT, BV] -> [BT, BV]
                    b_o += tl.dot(b_s.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
                if NORMALIZE:
                    b_den = tl.sum(b_qf * b_zc, 1)
                if FEATURE_MAP == 0:
                    b_o *= scale
                if NORMALIZE:
                    if FEATURE_MAP == 0:
                        b_den *= scale
                    b_den += eps
                    b_o = b_o / b_den[:, None]
                    if i_v == 0:
                        tl.store(den + rows * H + i_h, b_den, mask=m_t)
                tl.store(o + (rows[:, None] * H + i_h) * V + o_v[None, :], b_o.to(o.dtype.element_ty),
                         mask=m_t[:, None] & m_v[None, :])
        if CAUSAL:
            # S <- λ^L S + (K ⊙ λ^(L-1-j))ᵀ V: [BK, BT] @ [BT, BV] -> [BK, BV]
            b_kw = (b_kf * b_kd[:, None]).to(b_k.dtype)
            b_h = b_h * b_sd + tl.dot(tl.trans(b_kw), b_v, input_precision=DOT_PRECISION)
            if NORMALIZE:
                b_z += tl.sum(b_kf, 0)

    if STORE_FINAL_STATE:
        tl.store(ht + p_state, b_h, mask=m_kv)
        if NORMALIZE:
            if i_v == 0:
                tl.store(zt + (i_n * HS + i_s) * K + o_k, b_z, mask=m_k)


# -------------------------------------------------------------------------------------- backward


@triton.heuristics({
    "USE_INITIAL_STATE": lambda args: args["h0"] is not None,
    "USE_DECAY": lambda args: args["decay"] is not None,
    "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
})
@triton.autotune(configs=_autotune_configs(), key=["K", "V"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit(do_not_specialize=["T"])
def _chunk_linear_bwd_dq_kernel(
    q, k, v, do, den, delta, dq, decay, h0, z0, cu_seqlens, scale, T,
    H: tl.constexpr, HK: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_DECAY: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # Forward scan recomputing S: dq̃_i = λ^(i+1) dn_i Sᵀ + Σ_j M[i,j] (dn_i·v_j) k̃_j [+ dd_i z_i].
    # Each Dv block writes its partial dq into dq[i_v] (summed by the launcher when NV > 1).
    i_v, i_n, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    QPS: tl.constexpr = H // HS
    i_hk = i_s * HK // HS
    bos, seq_len = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    NT = tl.cdiv(seq_len, BT)
    # this Dv block's slab of the partial-sum buffer `[NV, B, T, H, K]`
    dq += i_v * _num_rows(T, IS_VARLEN) * H * K

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    b_z = tl.zeros([BK], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + (i_n * HS + i_s) * K * V + o_k[:, None] * V + o_v[None, :],
                       mask=m_k[:, None] & m_v[None, :], other=0.)
        if NORMALIZE:
            b_z += tl.load(z0 + (i_n * HS + i_s) * K + o_k, mask=m_k, other=0.)
    b_a = 0.
    if USE_DECAY:
        b_a = tl.load(decay + i_s).to(tl.float32)
    b_m = _intra_mask(b_a, o_t, USE_DECAY)
    b_c = _intra_mask(b_a, o_t, False)  # plain causal 0/1 mask for z_i = z_prev + Σ_{j<=i} k̃_j

    for i_t in range(0, NT):
        t = i_t * BT + o_t
        m_t = t < seq_len
        rows = bos + t
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        n_valid = tl.minimum(seq_len - i_t * BT, BT)
        b_qd, b_kd, b_sd = _chunk_decay(b_a, o_t, m_t, n_valid, USE_DECAY)
        b_k, b_kf, _ = _load_k(k, rows, i_hk, o_k, m_tk, HK, K, FEATURE_MAP)
        # [BT, BV]
        b_v = tl.load(v + (rows[:, None] * HK + i_hk) * V + o_v[None, :], mask=m_tv, other=0.)
        if NORMALIZE:
            # z_i = z_prev + Σ_{j<=i} k̃_j in float32: [BT, BT] @ [BT, BK] -> [BT, BK]
            b_zc = b_z[None, :] + tl.zeros([BT, BK], dtype=tl.float32)
            if CAUSAL:
                b_zc += tl.dot(b_c, b_kf, input_precision="ieee")
        for i_g in range(QPS):
            i_h = i_s * QPS + i_g
            b_do = tl.load(do + (rows[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.)
            if NORMALIZE:
                # dn = do / den; dd = -(do·o) / den (precomputed by the launcher)
                b_den = tl.load(den + rows * H + i_h, mask=m_t, other=1.)
                b_dd = tl.load(delta + rows * H + i_h, mask=m_t, other=0.)
                b_do = (b_do.to(tl.float32) / b_den[:, None]).to(b_v.dtype)
            # [BT, BV] @ [BV, BK] -> [BT, BK]
            b_dq = tl.dot(b_do, tl.trans(b_h).to(b_do.dtype), input_precision=DOT_PRECISION) * b_qd[:, None]
            if CAUSAL:
                # ([BT, BV] @ [BV, BT]) ⊙ M -> [BT, BT]; then [BT, BT] @ [BT, BK] -> [BT, BK]
                b_ds = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION) * b_m
                b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)
            if NORMALIZE:
                if i_v == 0:
                    b_dq += b_dd[:, None] * b_zc
            b_q = tl.load(q + (rows[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
            if FEATURE_MAP == 0:
                b_dq *= scale
            else:
                b_dq *= _phi_grad(b_q * scale, FEATURE_MAP) * scale
            tl.store(dq + (rows[:, None] * H + i_h) * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
        if CAUSAL:
            # same state update as the forward: [BK, BT] @ [BT, BV] -> [BK, BV]
            b_kw = (b_kf * b_kd[:, None]).to(b_k.dtype)
            b_h = b_h * b_sd + tl.dot(tl.trans(b_kw), b_v, input_precision=DOT_PRECISION)
            if NORMALIZE:
                b_z += tl.sum(b_kf, 0)


@triton.heuristics({
    "USE_FINAL_STATE_GRAD": lambda args: args["dht"] is not None,
    "STORE_INITIAL_STATE_GRAD": lambda args: args["dh0"] is not None,
    "STORE_DKV": lambda args: args["dk"] is not None,
    "USE_DECAY": lambda args: args["decay"] is not None,
    "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
})
@triton.autotune(configs=_autotune_configs(), key=["K", "V"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit(do_not_specialize=["T"])
def _chunk_linear_bwd_dkdv_kernel(
    q, k, v, do, den, delta, dk, dv, decay, dht, dzt, dh0, dz0, cu_seqlens, scale, T,
    H: tl.constexpr, HK: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_FINAL_STATE_GRAD: tl.constexpr, STORE_INITIAL_STATE_GRAD: tl.constexpr, STORE_DKV: tl.constexpr,
    USE_DECAY: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # Reverse scan over dS (the gradient of the state after the current chunk, `dht` at the end):
    #   dk̃_j = λ^(L-1-j) dS v_j + Σ_t M[t,j] (dn_t·v_j) q̃_t [+ dz_j],
    #   dv_j = λ^(L-1-j) k̃_j dS + Σ_t M[t,j] (q̃_t·k̃_j) dn_t,
    #   dS  <- λ^L dS + (Q̃ ⊙ λ^(t+1))ᵀ dN;  dh0 = dS before the first chunk.
    # CAUSAL=False (linear attention only) runs with the total dS as `dht`: no intra term, no update.
    # dk of each Dv block is a partial sum (slab i_v of `[NV, B, T, HS, K]`); dv is complete.
    i_v, i_n, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    QPS: tl.constexpr = H // HS
    i_hk = i_s * HK // HS
    bos, seq_len = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    NT = tl.cdiv(seq_len, BT)
    if STORE_DKV:
        dk += i_v * _num_rows(T, IS_VARLEN) * HS * K

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = (i_n * HS + i_s) * K * V + o_k[:, None] * V + o_v[None, :]

    # [BK, BV] float32 state gradient, [BK] normaliser gradient
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    b_dz = tl.zeros([BK], dtype=tl.float32)
    if USE_FINAL_STATE_GRAD:
        b_dh += tl.load(dht + p_state, mask=m_kv, other=0.)
        if NORMALIZE:
            b_dz += tl.load(dzt + (i_n * HS + i_s) * K + o_k, mask=m_k, other=0.)
    b_a = 0.
    if USE_DECAY:
        b_a = tl.load(decay + i_s).to(tl.float32)
    # transposed masks: Mᵀ[j, t] = M[t, j]
    b_mt = tl.trans(_intra_mask(b_a, o_t, USE_DECAY))
    b_ct = tl.trans(_intra_mask(b_a, o_t, False))

    for i_r in range(0, NT):
        i_t = NT - 1 - i_r
        t = i_t * BT + o_t
        m_t = t < seq_len
        rows = bos + t
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        n_valid = tl.minimum(seq_len - i_t * BT, BT)
        b_qd, b_kd, b_sd = _chunk_decay(b_a, o_t, m_t, n_valid, USE_DECAY)
        if STORE_DKV:
            b_k, _, b_kx = _load_k(k, rows, i_hk, o_k, m_tk, HK, K, FEATURE_MAP)
            # [BT, BV]
            b_v = tl.load(v + (rows[:, None] * HK + i_hk) * V + o_v[None, :], mask=m_tv, other=0.)
            # inter-chunk: [BT, BV] @ [BV, BK] -> [BT, BK] and [BT, BK] @ [BK, BV] -> [BT, BV]
            b_dk = tl.dot(b_v, tl.trans(b_dh).to(b_v.dtype), input_precision=DOT_PRECISION) * b_kd[:, None]
            b_dv = tl.dot(b_k, b_dh.to(b_k.dtype), input_precision=DOT_PRECISION) * b_kd[:, None]
            if NORMALIZE:
                if i_v == 0:
                    b_dk += b_dz[None, :]
        # gradient flowing into the state before this chunk, from this chunk's outputs
        b_dh_c = tl.zeros([BK, BV], dtype=tl.float32)
        b_dz_c = tl.zeros([BK], dtype=tl.float32)
        if CAUSAL:
            for i_g in range(QPS):
                i_h = i_s * QPS + i_g
                b_q, b_qf, _ = _load_q(q, rows, i_h, o_k, m_tk, scale, H, K, FEATURE_MAP)
                b_do = tl.load(do + (rows[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.)
                if NORMALIZE:
                    b_den = tl.load(den + rows * H + i_h, mask=m_t, other=1.)
                    b_dd = tl.load(delta + rows * H + i_h, mask=m_t, other=0.)
                    b_do = (b_do.to(tl.float32) / b_den[:, None]).to(b_q.dtype)
                if STORE_DKV:
                    # Aᵀ = (K̃ Q̃ᵀ) ⊙ Mᵀ: [BT, BK] @ [BK, BT] -> [BT, BT]; dv += Aᵀ dN
                    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * b_mt
                    if FEATURE_MAP == 0:
                        b_st *= scale
                    b_dv += tl.dot(b_st.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
                    # dAᵀ = (V dNᵀ) ⊙ Mᵀ: [BT, BV] @ [BV, BT] -> [BT, BT]; dk += dAᵀ Q̃
                    b_dst = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION) * b_mt
                    b_dkq = tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)
                    if NORMALIZE:
                        if i_v == 0:
                            # dz_j = Σ_{t>=j} dd_t q̃_t in float32: [BT, BT] @ [BT, BK] -> [BT, BK]
                            b_dkq += tl.dot(b_ct * b_dd[None, :], b_qf, input_precision="ieee")
                    if FEATURE_MAP == 0:
                        b_dkq *= scale
                    b_dk += b_dkq
                # (Q̃ ⊙ λ^(t+1))ᵀ dN: [BK, BT] @ [BT, BV] -> [BK, BV]
                b_qw = (b_qf * b_qd[:, None]).to(b_q.dtype)
                b_dh_c += tl.dot(tl.trans(b_qw), b_do, input_precision=DOT_PRECISION)
                if NORMALIZE:
                    b_dz_c += tl.sum(b_qf * b_dd[:, None], 0)
            if FEATURE_MAP == 0:
                b_dh_c *= scale
                b_dz_c *= scale
        if STORE_DKV:
            if FEATURE_MAP != 0:
                b_dk *= _phi_grad(b_kx, FEATURE_MAP)
            tl.store(dk + (rows[:, None] * HS + i_s) * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)
            tl.store(dv + (rows[:, None] * HS + i_s) * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)
        if CAUSAL:
            b_dh = b_dh * b_sd + b_dh_c
            if NORMALIZE:
                b_dz += b_dz_c

    if STORE_INITIAL_STATE_GRAD:
        tl.store(dh0 + p_state, b_dh, mask=m_kv)
        if NORMALIZE:
            if i_v == 0:
                tl.store(dz0 + (i_n * HS + i_s) * K + o_k, b_dz, mask=m_k)


# -------------------------------------------------------------------------------- host launchers


def _launch_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None):
    B, T, H, K = q.shape
    HK, V = k.shape[2], v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    return B, T, H, HK, K, V, N


def chunk_linear_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, decay: torch.Tensor | None,
                     scale: float, eps: float, feature_map: str | None, normalize: bool, causal: bool,
                     state_heads: int, h0: torch.Tensor | None, z0: torch.Tensor | None,
                     output_final_state: bool, cu_seqlens: torch.Tensor | None, keep_fp32_output: bool):
    """Runs the chunked forward (no autograd). Inputs contiguous, states float32 contiguous.

    Returns `(o, ht, zt, den, s_total, z_total)`: `o [B, T, H, V]` (float32 when
    `keep_fp32_output`, else q's dtype), final states (or None), the normaliser `den [B, T, H]`
    (float32, with `normalize`) and, for `causal=False`, the totals used by the output.
    """
    B, T, H, HK, K, V, N = _launch_dims(q, k, v, cu_seqlens)
    BK, BV = _block_sizes(K, V)
    NV = triton.cdiv(V, BV)
    HS = state_heads
    o = torch.empty(B, T, H, V, device=q.device, dtype=torch.float32 if keep_fp32_output else q.dtype)
    den = torch.empty(B, T, H, device=q.device, dtype=torch.float32) if normalize else None
    need_states = output_final_state or not causal
    ht = q.new_empty(N, HS, K, V, dtype=torch.float32) if need_states else None
    zt = q.new_empty(N, HS, K, dtype=torch.float32) if need_states and normalize else None
    common = dict(decay=decay, cu_seqlens=cu_seqlens, scale=scale, eps=eps, T=T, H=H, HK=HK, HS=HS,
                  K=K, V=V, BK=BK, BV=BV, FEATURE_MAP=FEATURE_MAPS[feature_map], NORMALIZE=normalize,
                  DOT_PRECISION=dot_precision(q))
    grid = (NV, N, HS)
    with device_guard(q):
        if causal:
            _chunk_linear_fwd_kernel[grid](q=q, k=k, v=v, o=o, den=den, h0=h0, z0=z0, ht=ht, zt=zt,
                                           CAUSAL=True, **common)
            return o, ht, zt, den, None, None
        # non-causal: one pass for the totals S0 + Σ φ(k)ᵀv (and z0 + Σ φ(k)), one for the output
        _chunk_linear_fwd_kernel[grid](q=q, k=k, v=v, o=None, den=None, h0=h0, z0=z0, ht=ht, zt=zt,
                                       CAUSAL=True, **common)
        _chunk_linear_fwd_kernel[grid](q=q, k=k, v=v, o=o, den=den, h0=ht, z0=zt, ht=None, zt=None,
                                       CAUSAL=False, **common)
    return o, (ht if output_final_state else None), (zt if output_final_state else None), den, ht, zt


def chunk_linear_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
                     dht: torch.Tensor | None, dzt: torch.Tensor | None, *, decay: torch.Tensor | None,
                     scale: float, feature_map: str | None, normalize: bool, causal: bool,
                     state_heads: int, h0: torch.Tensor | None, z0: torch.Tensor | None,
                     o: torch.Tensor | None, den: torch.Tensor | None, s_total: torch.Tensor | None,
                     z_total: torch.Tensor | None, cu_seqlens: torch.Tensor | None, need_dh0: bool):
    """Runs the chunked backward (no autograd). `o` is the float32 output (only with `normalize`).

    Returns `(dq, dk, dv, dh0, dz0)` in the dtypes of q/k/v and float32 states.
    """
    B, T, H, HK, K, V, N = _launch_dims(q, k, v, cu_seqlens)
    BK, BV = _block_sizes(K, V)
    NV = triton.cdiv(V, BV)
    HS = state_heads
    delta = -(do.float() * o).sum(-1) / den if normalize else None
    fp32 = torch.float32
    group_sum = HS == H and H > HK  # lightning GQA: per-query-head dk/dv summed over each group
    dq = q.new_empty(NV, B, T, H, K, dtype=fp32 if NV > 1 else q.dtype)
    dk = k.new_empty(NV, B, T, HS, K, dtype=fp32 if NV > 1 or group_sum else k.dtype)
    dv = v.new_empty(B, T, HS, V, dtype=fp32 if group_sum else v.dtype)
    dh0 = q.new_empty(N, HS, K, V, dtype=fp32) if need_dh0 or not causal else None
    dz0 = q.new_empty(N, HS, K, dtype=fp32) if normalize and (need_dh0 or not causal) else None
    common = dict(q=q, k=k, v=v, do=do, den=den, delta=delta, decay=decay, cu_seqlens=cu_seqlens,
                  scale=scale, T=T, H=H, HK=HK, HS=HS, K=K, V=V, BK=BK, BV=BV,
                  FEATURE_MAP=FEATURE_MAPS[feature_map], NORMALIZE=normalize, DOT_PRECISION=dot_precision(q))
    grid = (NV, N, HS)
    with device_guard(q):
        if causal:
            _chunk_linear_bwd_dq_kernel[grid](dq=dq, h0=h0, z0=z0, CAUSAL=True, **common)
            _chunk_linear_bwd_dkdv_kernel[grid](dk=dk, dv=dv, dht=dht, dzt=dzt, dh0=dh0, dz0=dz0,
                                                CAUSAL=True, **common)
        else:
            # dq against the totals; the total state gradient by a scan with no dk/dv, then dk/dv
            _chunk_linear_bwd_dq_kernel[grid](dq=dq, h0=s_total, z0=z_total, CAUSAL=False, **common)
            _chunk_linear_bwd_dkdv_kernel[grid](dk=None, dv=None, dht=dht, dzt=dzt, dh0=dh0, dz0=dz0,
                                                CAUSAL=True, **common)
            _chunk_linear_bwd_dkdv_kernel[grid](dk=dk, dv=dv, dht=dh0, dzt=dz0, dh0=None, dz0=None,
                                                CAUSAL=False, **common)
    dq = dq.sum(0) if NV > 1 else dq[0]
    dk = dk.sum(0) if NV > 1 else dk[0]
    if group_sum:
        dk = dk.view(B, T, HK, H // HK, K).sum(3)
        dv = dv.view(B, T, HK, H // HK, V).sum(3)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dh0, dz0


# ------------------------------------------------------------------------------------- autograd


class ChunkLinearAttentionFunction(torch.autograd.Function):
    """Autograd for the chunked kernels; outputs `(o, S_final, z_final)` (None where absent)."""

    @staticmethod
    def forward(ctx, q, k, v, decay, h0, z0, cu_seqlens, scale, eps, feature_map, normalize, causal,
                output_final_state, state_heads):
        ctx.set_materialize_grads(False)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        h0 = h0.contiguous() if h0 is not None else None
        z0 = z0.contiguous() if z0 is not None else None
        needs_grad = any(ctx.needs_input_grad[i] for i in (0, 1, 2, 4, 5))
        keep_fp32 = normalize and needs_grad
        o, ht, zt, den, s_total, z_total = chunk_linear_fwd(
            q, k, v, decay=decay, scale=scale, eps=eps, feature_map=feature_map, normalize=normalize,
            causal=causal, state_heads=state_heads, h0=h0, z0=z0, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, keep_fp32_output=keep_fp32)
        o_fp32 = o if keep_fp32 else None
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, decay, h0, z0, cu_seqlens, o_fp32, den, s_total, z_total)
        ctx.scale = scale
        ctx.feature_map = feature_map
        ctx.normalize = normalize
        ctx.causal = causal
        ctx.state_heads = state_heads
        return o, ht, zt

    @staticmethod
    def backward(ctx, do, dht, dzt):
        q, k, v, decay, h0, z0, cu_seqlens, o_fp32, den, s_total, z_total = ctx.saved_tensors
        if do is None:
            do = torch.zeros(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=q.dtype)
        if ctx.normalize and dht is not None and dzt is None:
            dzt = torch.zeros_like(z0 if z0 is not None else dht[..., 0])
        if ctx.normalize and dzt is not None and dht is None:
            dht = dzt.new_zeros(dzt.shape + (v.shape[-1],))
        need_dh0 = h0 is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
        dq, dk, dv, dh0, dz0 = chunk_linear_bwd(
            q, k, v, do.contiguous(), dht.contiguous() if dht is not None else None,
            dzt.contiguous() if dzt is not None else None, decay=decay, scale=ctx.scale,
            feature_map=ctx.feature_map, normalize=ctx.normalize, causal=ctx.causal,
            state_heads=ctx.state_heads, h0=h0, z0=z0, o=o_fp32, den=den, s_total=s_total,
            z_total=z_total, cu_seqlens=cu_seqlens, need_dh0=need_dh0)
        if not need_dh0:
            dh0 = dz0 = None
        return dq, dk, dv, None, dh0, dz0, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------ backend entry points


def lightning_attention(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens):
    """Triton backend of `attnkit.lightning_attention` (see docs/contracts.md): state per query head."""
    o, ht, _ = ChunkLinearAttentionFunction.apply(
        q, k, v, decay, initial_state, None, cu_seqlens, scale, 0.0, None, False, True,
        output_final_state, q.shape[2])
    return o, (ht if output_final_state else None)


def linear_attention(q, k, v, causal, feature_map, normalize, scale, eps, initial_state,
                     output_final_state, cu_seqlens):
    """Triton backend of `attnkit.linear_attention` (see docs/contracts.md): state per KV head."""
    h0, z0 = (initial_state if normalize else (initial_state, None)) if initial_state is not None else (None, None)
    o, ht, zt = ChunkLinearAttentionFunction.apply(
        q, k, v, None, h0, z0, cu_seqlens, scale, eps, feature_map, normalize, causal,
        output_final_state, k.shape[2])
    if not output_final_state:
        return o, None
    return o, ((ht, zt) if normalize else ht)
