"""Sequence-parallel chunked Triton kernels of linear attention and lightning attention.

A *state head* owns one recurrent state `S [Dk, Dv]` (and `z [Dk]` with normalisation): one per
query head for lightning attention (`HS = H`, optional decay `λ = exp(-decay[h])`), one per KV head
for linear attention (`HS = Hk`, shared by its `H // Hk` query heads, optional feature map φ).

Each sequence is cut into *segments* of `SEG` tokens (the last one shorter) and every kernel that
walks tokens runs one program per (segment, state head, state block), so the grid grows with the
sequence length instead of being fixed by `B·H`:

forward   1. `_segment_state_kernel`   local state of each segment from a zero state, with decay
          2. `_segment_scan_kernel`    short scan over the segments of a sequence: each slot now
                                       holds the segment's *incoming* state; the final state
          3. `_segment_output_kernel`  the chunked output of each segment, started from its
                                       incoming state (Lightning Attention-2 inside the segment)
backward  1. `_segment_dstate_kernel`  local state gradient of each segment (reverse, with decay)
          2. `_segment_scan_kernel`    reverse scan: gradient of the state after each segment; dh0
          3. `_segment_dq_kernel`      dq of each segment from its incoming state (saved, small)
          4. `_segment_dkdv_kernel`    dk/dv of each segment from the gradient after it

Blocking: a program keeps one `[BK, BV]` float32 block of the state in registers (dq and a
dk-only program keep it transposed, `[BV, BK]`, so narrow Dk blocks stay on wgmma). An output
that sums over a head dim is produced by a program that holds that dim whole, so nothing is a
partial sum: `o` and `dv` sum over Dk (programs split Dv), `dq` and `dk` sum over Dv (programs
split Dk). Up to D = 64 (without normalize or grouped GQA) `dk`/`dv` come from one program. With
normalize, `dd = -(do·o)/d` is computed by `_segment_dstate_kernel`; lightning GQA sums its
group's dk/dv inside `_segment_dkdv_kernel` (`GPS` state heads per program). The derivation and
the block budgets are in `docs/linear_attention.md`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common.triton_utils import interpreted

FEATURE_MAPS = {None: 0, "elu": 1, "relu": 2}

# Checked by the static GPU audit (attnkit/tools/_requirements.py; CI: `gpu_audit --arch sm_90
# --quick`, whose cases include these): on sm_90, in bf16 at head dims 64 and 128, every kept config
# of every chunk/segment kernel that runs tensor-core products runs them all on wgmma and spills
# nothing — lightning attention with decay (with and without GQA) and linear attention with
# normalize and a feature map (GQA).
_CHUNK_KERNELS = r"^_segment_(state|output|dstate|dq|dkdv)_kernel$"
AUDIT_REQUIREMENTS = [
    dict(kernel=_CHUNK_KERNELS, arch="sm_90", dtypes=("bfloat16",), head_dims=(64, 128),
         case=r"^lightning_attention fwd\+bwd (?!.*decay=False)", max_spill_stores=0, mma="wgmma",
         why="issue 11: lightning attention (decay) chunk kernels on wgmma without spills"),
    dict(kernel=_CHUNK_KERNELS, arch="sm_90", dtypes=("bfloat16",), head_dims=(64, 128),
         case=r"^linear_attention fwd\+bwd .*normalize=True", max_spill_stores=0, mma="wgmma",
         why="issue 11: linear attention with normalize (+ feature map) chunk kernels on wgmma without spills"),
]

# fp32 elements of the state block a program keeps in registers (8 warps): [128, 128] for the
# state passes (one product per chunk), [128, 64] for the output/dq/dk/dv passes, whose token
# tiles and [BT, BT] score tiles share the register file (ptxas: [128, 128] spills there)
STATE_BUDGET = 128 * 128
TILE_STATE_BUDGET = 128 * 64
# with `normalize` the token-tile passes also carry the denominators, 1/d, dd and the normaliser
# gradient; lightning GQA's dk/dv carries the group's sums; head dims over 128 have wider tiles:
# [128, 32] blocks there (ptxas: [128, 64] spills 50-400 B), and dk/dv as two launches
NORM_TILE_STATE_BUDGET = 128 * 32


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


# The block budgets above and the prune below are tuned to triton 3.9's ptxas (CUDA 13.4; CI
# pins 3.9). Triton 3.6 (the GPU machine's version; ptxas 12.8 below sm_100) allocates registers
# differently and spilled 68-416 B in some of those configs, so below 3.9 a few narrower blocks
# and fewer stages are used (`old_triton()`; the evidence table is in docs/linear_attention.md,
# "Triton 3.6"). Tests monkeypatch TRITON_VERSION to check both rule sets.
TRITON_VERSION = _version_tuple(triton.__version__)


def old_triton() -> bool:
    """Whether the installed triton is older than 3.9 (the version the budgets are tuned to)."""
    return TRITON_VERSION < (3, 9)


def _autotune_configs() -> list[triton.Config]:
    if interpreted():
        return [triton.Config({"BT": 32}, num_warps=4, num_stages=1)]
    # BT = 64 rows: every token-major product has M = 64 per warp group (wgmma on sm_90);
    # num_stages >= 2 so the next chunk's tiles are prefetched while this one computes
    return [triton.Config({"BT": 64}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs that do not spill (ptxas on sm_90, `benchmarks/audit_linear.py`): the
    token-tile passes (they take both q and k: output, dq, dk/dv) need 8 warps at every head dim;
    the state passes need 8 warps once the state block is larger than 64x64; dq and dk with
    normalize need num_stages = 2, dk/dv at head dims over 128 num_stages = 3 (16-bit inputs, sm_90);
    float32 inputs or sm_80 at head dims over 128 need num_stages = 2 (shared memory)."""
    args = {**named_args, **kwargs}
    bk, bv = args.get("BK"), args.get("BV")
    if bk is None or bv is None or interpreted():
        return configs
    kept = configs
    if ("q" in args and "k" in args) or bk * bv > 64 * 64:
        kept = [c for c in kept if c.num_warps >= 8]
    x = args.get("q", args.get("k"))
    wide = getattr(x, "element_size", None) is not None and x.element_size() == 4
    # shared memory of the target (sm_90: 227 KB; sm_80: 163 KB, where 3 stages of the D > 128
    # tiles do not fit); the softmax module's helpers read the device or $ATTNKIT_TARGET_ARCH
    from ..softmax.triton_attention import _capability, smem_limit
    big_smem = not hasattr(x, "device") or smem_limit(_capability(x)) >= 200_000
    if args.get("NORMALIZE") and ("dq" in args or (args.get("STORE_DK") and not args.get("STORE_DV"))):
        # dq and dk with normalize: 3 stages spill 16-36 B at D = 128 (gpu_audit, sm_90)
        kept = [c for c in kept if c.num_stages <= 2]
    elif "dk" in args and max(args["K"], args["V"]) > 128 and not wide and big_smem:
        # the dk and dv passes at head dims over 128 spill up to 36 B with 2 stages, none with 3 (bf16)
        kept = [c for c in kept if c.num_stages >= 3]
    elif old_triton() and "dk" in args and args.get("STORE_DV") and not args.get("NORMALIZE") and not wide \
            and big_smem:
        # triton < 3.9 (ptxas 12.8): the passes that store dv (dk+dv at D = 64 too) spill 84-192 B
        # with 2 stages at D = 64/128, none with 3 (bf16, sm_90; lightning attention, measured
        # without normalize: with it both stage counts behave alike)
        kept = [c for c in kept if c.num_stages >= 3]
    elif old_triton() and "o" in args and "k" in args and max(args["K"], args["V"]) > 128 and not wide \
            and big_smem:
        # triton < 3.9: the output pass at head dims over 128 spills 168 B with 2 stages, none
        # with 3 (lightning, bf16, sm_90, [256, 16] blocks)
        kept = [c for c in kept if c.num_stages >= 3]
    if (wide or not big_smem) and max(args["K"], args["V"]) > 128 or wide and not big_smem and \
            max(args["K"], args["V"]) > 64:
        # float32 tiles, or sm_80, at head dims over 128, and float32 tiles on sm_80 at head dims
        # over 64 (gpu_audit --arch sm_80, float32, D = 128: 3 stages need 197-229 KB): 3 stages
        # exceed the shared memory
        kept = [c for c in kept if c.num_stages <= 2]
    return kept or configs[:1]


# every flag that changes the work, plus SEG (a power of two chosen from the total length: the
# coarse length bucket); never the raw T
_KEY = ("K", "V", "BK", "BV", "H", "HS", "FEATURE_MAP", "NORMALIZE", "CAUSAL", "STATE_PER_SEQ", "USE_DECAY",
        "IS_VARLEN", "STORE_DK", "STORE_DV", "GPS", "SEG")


def _autotune(fn):
    """Autotune a jitted kernel keyed on the names of `_KEY` that it takes."""
    key = [name for name in _KEY if name in fn.arg_names]
    return triton.autotune(configs=_autotune_configs(), key=key,
                           prune_configs_by={"early_config_prune": _prune_configs})(fn)


def _segment_kernel(autotune: bool = True, **flags: str):
    """Jit a segment kernel (`T`, `NS` not specialised), autotuned on `_KEY` unless told not to,
    with the heuristics every segment kernel has (`USE_DECAY`, `IS_VARLEN`) plus `flags`:
    `FLAG="arg"` sets the constexpr FLAG to whether the argument `arg` is given (not None)."""
    present = {"USE_DECAY": "decay", "IS_VARLEN": "cu_seqlens", **flags}

    def deco(fn):
        kernel = triton.jit(do_not_specialize=["T", "NS"])(fn)
        if autotune:
            kernel = _autotune(kernel)
        return triton.heuristics({flag: (lambda args, name=name: args[name] is not None)
                                  for flag, name in present.items()})(kernel)
    return deco


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
def _load_q(q, start, t, i_h, o_k, mask, scale, H: tl.constexpr, K: tl.constexpr, FEATURE_MAP: tl.constexpr):
    """Returns (q̃ in q's dtype for the tensor-core dots, q̃ in float32, raw q in float32).
    q̃ = φ(scale·q) with a feature map; without one q̃ = q and the caller multiplies the
    products by `scale` (no extra rounding of q)."""
    # [BT, BK]
    b_q = tl.load(q + (start * H + i_h) * K + (t[:, None] * (H * K) + o_k[None, :]), mask=mask, other=0.)
    b_x = b_q.to(tl.float32)
    b_qf = b_x
    if FEATURE_MAP != 0:
        b_qf = tl.where(mask, _phi(b_x * scale, FEATURE_MAP), 0.)
        b_q = b_qf.to(b_q.dtype)
    return b_q, b_qf, b_x


@triton.jit
def _load_k(k, start, t, i_hk, o_k, mask, HK: tl.constexpr, K: tl.constexpr, FEATURE_MAP: tl.constexpr):
    """Returns (φ(k) in k's dtype for the tensor-core dots, φ(k) in float32, raw k in float32);
    padded rows/columns stay exactly 0."""
    # [BT, BK]
    b_k = tl.load(k + (start * HK + i_hk) * K + (t[:, None] * (HK * K) + o_k[None, :]), mask=mask, other=0.)
    b_x = b_k.to(tl.float32)
    b_kf = b_x
    if FEATURE_MAP != 0:
        b_kf = tl.where(mask, _phi(b_x, FEATURE_MAP), 0.)
        b_k = b_kf.to(b_k.dtype)
    return b_k, b_kf, b_x


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


@triton.jit
def _segment(seg_info, cu_seqlens, T, NS, SEG, IS_VARLEN: tl.constexpr):
    """Sequence index, first token row and token count (>= 0) of this program's segment.

    Fixed length: segment `pid` is number `pid % NS` of sequence `pid // NS`. Varlen: row `pid`
    of `seg_info [M, 2]` holds (sequence, index in it); index -1 marks a spare slot (count 0)."""
    pid = tl.program_id(0).to(tl.int64)
    if IS_VARLEN:
        i_n = tl.load(seg_info + pid * 2).to(tl.int64)
        i_g = tl.load(seg_info + pid * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        i_n = pid // NS
        i_g = pid % NS
        bos = i_n * T
        eos = bos + T
    start = bos + i_g * SEG
    n = tl.maximum(tl.minimum(eos - start, SEG), 0)
    if IS_VARLEN:
        n = tl.where(i_g >= 0, n, 0)
    # n <= SEG: token offsets inside a segment are int32 (one int64 base per tile, not per element)
    return pid, i_n, start, n.to(tl.int32)


@triton.jit
def _state_ptr(hin, pid, i_n, i_s, HS: tl.constexpr, D: tl.constexpr, PER_SEQ: tl.constexpr):
    """Row of a state buffer: per segment (`[NSEG, HS, ...]`) or per sequence (`[N, HS, ...]`)."""
    if PER_SEQ:
        p = hin + (i_n * HS + i_s) * D
    else:
        p = hin + (pid * HS + i_s) * D
    return p


@triton.jit
def _incoming_state(hin, zin, decay, pid, i_n, i_s, o_k, o_v, m_k, m_v, HS: tl.constexpr, K: tl.constexpr,
                    V: tl.constexpr, BK: tl.constexpr, PER_SEQ: tl.constexpr, NORMALIZE: tl.constexpr,
                    USE_DECAY: tl.constexpr):
    """A segment's incoming `[BK, BV]` float32 state block, its `[BK]` normaliser (zeros without
    NORMALIZE) and the head's decay rate `a` (λ = exp(-a); 0. without USE_DECAY)."""
    b_h = tl.load(_state_ptr(hin, pid, i_n, i_s, HS, K * V, PER_SEQ) + o_k[:, None] * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.)
    b_z = tl.zeros([BK], dtype=tl.float32)
    if NORMALIZE:
        b_z += tl.load(_state_ptr(zin, pid, i_n, i_s, HS, K, PER_SEQ) + o_k, mask=m_k, other=0.)
    b_a = 0.
    if USE_DECAY:
        b_a = tl.load(decay + i_s).to(tl.float32)
    return b_h, b_z, b_a


@triton.jit
def _cols(i_b, BD: tl.constexpr, D: tl.constexpr):
    """Columns of block `i_b` of a head dim; a block that covers the dim is a constant range, so
    its bounds mask folds away at compile time."""
    if BD >= D:
        o = tl.arange(0, BD)
    else:
        o = i_b * BD + tl.arange(0, BD)
    return o


@triton.jit
def _intra_mask_t(b_a, o_t, USE_DECAY: tl.constexpr):
    """Mᵀ[j, t] = λ^(t-j) for t >= j, else 0 (built transposed, no layout shuffle)."""
    # [BT, BT]
    diff = o_t[None, :] - o_t[:, None]
    if USE_DECAY:
        b_m = tl.where(diff >= 0, tl.exp(-b_a * tl.where(diff >= 0, diff, 0).to(tl.float32)), 0.)
    else:
        b_m = tl.where(diff >= 0, 1.0, 0.)
    return b_m


# --------------------------------------------------------------------------------------- forward


@_segment_kernel()
def _segment_state_kernel(
    k, v, hs, zs, decay, seg_info, cu_seqlens, T, NS, SEG,
    HK: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_DECAY: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # program = (segment, state head, state block): the segment's state from a zero start,
    #   S_loc = Σ_j λ^(n-1-j) φ(k_j)ᵀ v_j,   z_loc = Σ_j φ(k_j),
    # one [BK, BT] @ [BT, BV] product per chunk, written to hs[segment, head, block].
    pid, i_n, start, n = _segment(seg_info, cu_seqlens, T, NS, SEG, IS_VARLEN)
    i_s = tl.program_id(1).to(tl.int64)
    NVB: tl.constexpr = (V + BV - 1) // BV
    i_k, i_v = tl.program_id(2) // NVB, tl.program_id(2) % NVB
    i_hk = i_s * HK // HS
    o_t = tl.arange(0, BT)
    o_k = _cols(i_k, BK, K)
    o_v = _cols(i_v, BV, V)
    m_k = o_k < K
    m_v = o_v < V
    b_a = 0.
    if USE_DECAY:
        b_a = tl.load(decay + i_s).to(tl.float32)

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    b_z = tl.zeros([BK], dtype=tl.float32)
    for i_t in range(0, tl.cdiv(n, BT)):
        t = i_t * BT + o_t
        m_t = t < n
        b_qd, b_kd, b_sd = _chunk_decay(b_a, o_t, m_t, tl.minimum(n - i_t * BT, BT), USE_DECAY)
        b_k, b_kf, b_kx = _load_k(k, start, t, i_hk, o_k, m_t[:, None] & m_k[None, :], HK, K, FEATURE_MAP)
        # [BT, BV]
        b_v = tl.load(v + (start * HK + i_hk) * V + (t[:, None] * (HK * V) + o_v[None, :]), mask=m_t[:, None] & m_v[None, :], other=0.)
        # S <- λ^L S + (K ⊙ λ^(L-1-j))ᵀ V: [BK, BT] @ [BT, BV] -> [BK, BV]
        b_kw = (b_kf * b_kd[:, None]).to(b_k.dtype)
        # (the product accumulates into the decayed state: no second [BK, BV] accumulator)
        b_h = tl.dot(tl.trans(b_kw), b_v, b_h * b_sd, input_precision=DOT_PRECISION)
        if NORMALIZE:
            b_z += tl.sum(b_kf, 0)
    p_h = _state_ptr(hs, pid, i_n, i_s, HS, K * V, False)
    tl.store(p_h + o_k[:, None] * V + o_v[None, :], b_h, mask=m_k[:, None] & m_v[None, :])
    if NORMALIZE:
        if i_v == 0:
            tl.store(_state_ptr(zs, pid, i_n, i_s, HS, K, False) + o_k, b_z, mask=m_k)


@_segment_kernel(autotune=False, USE_H0="h0", STORE_HT="ht", HAS_Z="zs", USE_Z0="z0", STORE_ZT="zt")
def _segment_scan_kernel(
    hs, h0, ht, zs, z0, zt, decay, seg_cu, cu_seqlens, T, NS, SEG,
    HS: tl.constexpr, D: tl.constexpr, DZ: tl.constexpr, BLOCK: tl.constexpr, BZ: tl.constexpr,
    REVERSE: tl.constexpr, USE_DECAY: tl.constexpr, IS_VARLEN: tl.constexpr, USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr, HAS_Z: tl.constexpr, USE_Z0: tl.constexpr, STORE_ZT: tl.constexpr,
):
    # program = (block of D state elements, sequence, state head); walks the sequence's segments
    # in order (REVERSE: from the last), replacing each slot's local state `loc_g` by the running
    # state r before it and updating r <- λ^(n_g) r + loc_g. Forward: r starts at h0 and the slots
    # become incoming states, r ends as the final state. Reverse (gradients): r starts at dS_T, the
    # slots become the gradient of the state after each segment, r ends as dh0. In place.
    # HAS_Z: the normaliser slots `zs` (DZ elements, never decayed) ride along in the programs of
    # block 0, so the state and its normaliser are one launch.
    i_b, i_n, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    if IS_VARLEN:
        g0 = tl.load(seg_cu + i_n).to(tl.int64)
        ng = tl.load(seg_cu + i_n + 1).to(tl.int64) - g0
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - tl.load(cu_seqlens + i_n).to(tl.int64)
    else:
        g0 = i_n * NS
        ng = NS
        seq_len = T
    o = i_b * BLOCK + tl.arange(0, BLOCK)
    m = o < D
    b_r = tl.zeros([BLOCK], dtype=tl.float32)
    if USE_H0:
        b_r += tl.load(h0 + (i_n * HS + i_s) * D + o, mask=m, other=0.)
    b_a = 0.
    if USE_DECAY:
        b_a = tl.load(decay + i_s).to(tl.float32)
    if HAS_Z:
        o_z = tl.arange(0, BZ)
        m_z = (o_z + i_b * BZ) < DZ  # block 0 only (BZ >= DZ)
        b_rz = tl.zeros([BZ], dtype=tl.float32)
        if USE_Z0:
            b_rz += tl.load(z0 + (i_n * HS + i_s) * DZ + o_z, mask=m_z, other=0.)
    for i_r in range(0, ng):
        i_g = i_r
        if REVERSE:
            i_g = ng - 1 - i_r
        p = hs + ((g0 + i_g) * HS + i_s) * D + o
        b_loc = tl.load(p, mask=m, other=0.)
        tl.store(p, b_r, mask=m)
        if HAS_Z:
            p_z = zs + ((g0 + i_g) * HS + i_s) * DZ + o_z
            b_lz = tl.load(p_z, mask=m_z, other=0.)
            tl.store(p_z, b_rz, mask=m_z)
            b_rz += b_lz
        if USE_DECAY:
            n_g = tl.minimum(seq_len - i_g * SEG, SEG)
            b_r = b_r * tl.exp(-b_a * n_g.to(tl.float32))
        b_r += b_loc
    if STORE_HT:
        tl.store(ht + (i_n * HS + i_s) * D + o, b_r, mask=m)
    if STORE_ZT:
        tl.store(zt + (i_n * HS + i_s) * DZ + o_z, b_rz, mask=m_z)


@_segment_kernel()
def _segment_output_kernel(
    q, k, v, o, den, decay, hin, zin, seg_info, cu_seqlens, scale, eps, T, NS, SEG,
    H: tl.constexpr, HK: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr, CAUSAL: tl.constexpr, STATE_PER_SEQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_DECAY: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # program = (segment, state head, Dv block), Dk whole: the chunks of the segment in order,
    # started from the segment's incoming state `hin` (CAUSAL=False, linear attention only: the
    # sequence totals, no intra term, no update). o's Dv block is complete: nothing is reduced.
    pid, i_n, start, n = _segment(seg_info, cu_seqlens, T, NS, SEG, IS_VARLEN)
    i_s, i_v = tl.program_id(1).to(tl.int64), tl.program_id(2)
    QPS: tl.constexpr = H // HS  # query heads per state head (1 for lightning, the GQA group for linear)
    i_hk = i_s * HK // HS
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = _cols(i_v, BV, V)
    m_k = o_k < K
    m_v = o_v < V

    # [BK, BV] float32 state, [BK] normaliser
    b_h, b_z, b_a = _incoming_state(hin, zin, decay, pid, i_n, i_s, o_k, o_v, m_k, m_v, HS, K, V, BK,
                                    STATE_PER_SEQ, NORMALIZE, USE_DECAY)
    for i_t in range(0, tl.cdiv(n, BT)):
        t = i_t * BT + o_t
        m_t = t < n
        b_qd, b_kd, b_sd = _chunk_decay(b_a, o_t, m_t, tl.minimum(n - i_t * BT, BT), USE_DECAY)
        if CAUSAL:
            b_k, b_kf, b_kx = _load_k(k, start, t, i_hk, o_k, m_t[:, None] & m_k[None, :], HK, K, FEATURE_MAP)
            # [BT, BV]
            b_v = tl.load(v + (start * HK + i_hk) * V + (t[:, None] * (HK * V) + o_v[None, :]),
                          mask=m_t[:, None] & m_v[None, :], other=0.)
            # K ⊙ λ^(L-1-j) for the state update, formed now so the float32 copy of k dies early;
            # without decay the weights are the 0/1 row mask and k̃ is already 0 on padding rows,
            # so the update reads k̃ itself (one [BT, BK] tile fewer live across the head loop)
            if USE_DECAY:
                b_kw = (b_kf * b_kd[:, None]).to(b_k.dtype)
            else:
                b_kw = b_k
            if NORMALIZE:
                # the normaliser after this chunk, Σ φ(k_j) in float32 ([BK]: the [BT, BK] float32
                # copy of k̃ dies here, nothing [BT, BK] stays live across the query-head loop)
                b_zn = b_z + tl.sum(b_kf, 0)
        for i_g in range(QPS):
            i_h = i_s * QPS + i_g
            b_q, b_qf, b_qx = _load_q(q, start, t, i_h, o_k, m_t[:, None] & m_k[None, :], scale, H, K, FEATURE_MAP)
            if NORMALIZE:
                # d_i = q̃_i·z_prev + Σ_{j<=i} q̃_i·k̃_j: the first term in float32 here (CAUSAL=False:
                # z_prev is the sequence total), the second from the score tile below
                b_den = tl.sum(b_qf * b_z[None, :], 1)
            # inter-chunk: [BT, BK] @ [BK, BV] -> [BT, BV], scaled by λ^(i+1)
            b_o = tl.dot(b_q, b_h.to(b_q.dtype), input_precision=DOT_PRECISION) * b_qd[:, None]
            if CAUSAL:
                # intra-chunk: ([BT, BK] @ [BK, BT]) ⊙ M -> [BT, BT]; [BT, BT] @ [BT, BV] -> [BT, BV]
                # (the [BT, BT] mask is rebuilt per chunk: a few exps, 16 fewer live registers)
                b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * _intra_mask(b_a, o_t, USE_DECAY)
                if NORMALIZE:
                    # Σ_{j<=i} q̃_i·k̃_j: float32 row sums of the float32-accumulated score tile (M is
                    # the 0/1 causal mask: normalize never decays), the same q̃, k̃ as the numerator
                    b_den += tl.sum(b_s, 1)
                b_o = tl.dot(b_s.to(b_v.dtype), b_v, b_o, input_precision=DOT_PRECISION)
            if FEATURE_MAP == 0:
                b_o *= scale
            if NORMALIZE:
                if FEATURE_MAP == 0:
                    b_den *= scale
                b_den += eps
                b_o = b_o / b_den[:, None]
                if i_v == 0:
                    tl.store(den + start * H + i_h + t * H, b_den, mask=m_t)
            tl.store(o + (start * H + i_h) * V + (t[:, None] * (H * V) + o_v[None, :]), b_o.to(o.dtype.element_ty),
                     mask=m_t[:, None] & m_v[None, :])
        if CAUSAL:
            # S <- λ^L S + (K ⊙ λ^(L-1-j))ᵀ V: [BK, BT] @ [BT, BV] -> [BK, BV]
            b_h = tl.dot(tl.trans(b_kw), b_v, b_h * b_sd, input_precision=DOT_PRECISION)
            if NORMALIZE:
                b_z = b_zn


# -------------------------------------------------------------------------------------- backward


@triton.jit
def _load_do(do, den, delta, start, t, i_h, o_v, m_t, m_tv, H: tl.constexpr, V: tl.constexpr,
             NORMALIZE: tl.constexpr, LOAD_DD: tl.constexpr = True):
    """The output cotangent tile `do` as loaded (a tensor-core operand straight from memory), and
    the per-row factors of the unnormalised output's cotangent dn = do / den: 1/den, and
    dd = -(do·o) / den (1 and 0 without normalisation). dn is never formed: the products take
    `do` and scale their rows (or, transposed, columns) by 1/den in float32."""
    # [BT, BV]
    b_do = tl.load(do + (start * H + i_h) * V + (t[:, None] * (H * V) + o_v[None, :]), mask=m_tv, other=0.)
    b_rd = tl.full(m_t.shape, 1.0, tl.float32)
    b_dd = tl.zeros(m_t.shape, dtype=tl.float32)
    if NORMALIZE:
        b_rd = 1.0 / tl.load(den + start * H + i_h + t * H, mask=m_t, other=1.)
        if LOAD_DD:
            b_dd += tl.load(delta + start * H + i_h + t * H, mask=m_t, other=0.)
    return b_do, b_rd, b_dd


@triton.jit
def _row_delta(do, o, start, t, i_h, m_t, b_rd, H: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    """dd_t = -(do_t·o_t) / d_t over the whole Dv, in float32 from the output as returned (the
    first backward pass computes it; the later passes load it)."""
    b_acc = tl.zeros(m_t.shape, dtype=tl.float32)
    for i_vb in range(0, (V + BV - 1) // BV):
        o_v = i_vb * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        off = (start * H + i_h) * V + (t[:, None] * (H * V) + o_v[None, :])
        # [BT, BV] -> [BT]
        b_acc += tl.sum(tl.load(do + off, mask=m, other=0.).to(tl.float32) * tl.load(o + off, mask=m, other=0.).to(tl.float32), 1)
    return -b_acc * b_rd


@_segment_kernel()
def _segment_dstate_kernel(
    q, do, o, den, delta, dhs, dzs, decay, seg_info, cu_seqlens, scale, T, NS, SEG,
    H: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_DECAY: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # program = (segment, state head, state block): the gradient the segment's outputs send to
    # the state entering it, chunks walked from the last:
    #   G_loc <- λ^L G_loc + Σ_group (φ(q) ⊙ λ^(i+1))ᵀ dn,   Gz_loc <- Gz_loc + Σ_group φ(q)ᵀ dd
    # With normalize it also computes dd = -(do·o)/d for its rows and stores it (`delta`) for the
    # dq and dk/dv passes (the programs of Dv block 0; Dk is whole here).
    pid, i_n, start, n = _segment(seg_info, cu_seqlens, T, NS, SEG, IS_VARLEN)
    i_s = tl.program_id(1).to(tl.int64)
    NVB: tl.constexpr = (V + BV - 1) // BV
    i_k, i_v = tl.program_id(2) // NVB, tl.program_id(2) % NVB
    QPS: tl.constexpr = H // HS
    o_t = tl.arange(0, BT)
    o_k = _cols(i_k, BK, K)
    o_v = _cols(i_v, BV, V)
    m_k = o_k < K
    m_v = o_v < V
    b_a = 0.
    if USE_DECAY:
        b_a = tl.load(decay + i_s).to(tl.float32)

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    b_dz = tl.zeros([BK], dtype=tl.float32)
    NT = tl.cdiv(n, BT)
    for i_r in range(0, NT):
        i_t = NT - 1 - i_r
        t = i_t * BT + o_t
        m_t = t < n
        m_tk = m_t[:, None] & m_k[None, :]
        b_qd, b_kd, b_sd = _chunk_decay(b_a, o_t, m_t, tl.minimum(n - i_t * BT, BT), USE_DECAY)
        b_dh = b_dh * b_sd
        for i_g in range(QPS):
            i_h = i_s * QPS + i_g
            b_q, b_qf, b_qx = _load_q(q, start, t, i_h, o_k, m_tk, scale, H, K, FEATURE_MAP)
            b_do, b_rd, b_dd = _load_do(do, den, delta, start, t, i_h, o_v, m_t, m_t[:, None] & m_v[None, :], H, V,
                                        NORMALIZE, False)
            if NORMALIZE:
                b_dd = _row_delta(do, o, start, t, i_h, m_t, b_rd, H, V, BV)
                if i_v == 0:
                    tl.store(delta + start * H + i_h + t * H, b_dd, mask=m_t)
            # (Q̃ ⊙ λ^(i+1) / d)ᵀ dO: [BK, BT] @ [BT, BV] -> [BK, BV], accumulated into the decayed G
            b_qs = b_qd
            if NORMALIZE:
                b_qs = b_qd * b_rd
            b_qw = (b_qf * b_qs[:, None]).to(b_q.dtype)
            b_dh = tl.dot(tl.trans(b_qw), b_do, b_dh, input_precision=DOT_PRECISION)
            if NORMALIZE:
                b_dz += tl.sum(b_qf * b_dd[:, None], 0)
    if FEATURE_MAP == 0:
        b_dh *= scale
        b_dz *= scale
    p_h = _state_ptr(dhs, pid, i_n, i_s, HS, K * V, False)
    tl.store(p_h + o_k[:, None] * V + o_v[None, :], b_dh, mask=m_k[:, None] & m_v[None, :])
    if NORMALIZE:
        if i_v == 0:
            tl.store(_state_ptr(dzs, pid, i_n, i_s, HS, K, False) + o_k, b_dz, mask=m_k)


@_segment_kernel()
def _segment_dq_kernel(
    q, k, v, do, den, delta, dq, decay, hin, zin, seg_info, cu_seqlens, scale, T, NS, SEG,
    H: tl.constexpr, HK: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr, CAUSAL: tl.constexpr, STATE_PER_SEQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_DECAY: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # program = (segment, state head, Dk block), Dv whole (BV >= V), so dq comes out complete:
    #   dq̃_i = λ^(i+1) dn_i Sᵀ + Σ_j M[i,j] (dn_i·v_j) φ(k_j) [+ dd_i z_i],
    # a forward walk of the segment's chunks from its incoming state (saved by the forward).
    pid, i_n, start, n = _segment(seg_info, cu_seqlens, T, NS, SEG, IS_VARLEN)
    i_s, i_k = tl.program_id(1).to(tl.int64), tl.program_id(2)
    QPS: tl.constexpr = H // HS
    i_hk = i_s * HK // HS
    o_t = tl.arange(0, BT)
    o_k = _cols(i_k, BK, K)
    o_v = tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V

    b_h, b_z, b_a = _incoming_state(hin, zin, decay, pid, i_n, i_s, o_k, o_v, m_k, m_v, HS, K, V, BK,
                                    STATE_PER_SEQ, NORMALIZE, USE_DECAY)
    # the state kept transposed, Sᵀ [BV, BK] (one shuffle here): its update Sᵀ += Vᵀ (K̃ ⊙ w) has
    # M = Dv rows per warp group, so a narrow Dk block still runs on wgmma, and dN Sᵀ reads it as is
    b_ht = tl.trans(b_h)
    for i_t in range(0, tl.cdiv(n, BT)):
        t = i_t * BT + o_t
        m_t = t < n
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_qd, b_kd, b_sd = _chunk_decay(b_a, o_t, m_t, tl.minimum(n - i_t * BT, BT), USE_DECAY)
        if CAUSAL:
            b_k, b_kf, b_kx = _load_k(k, start, t, i_hk, o_k, m_tk, HK, K, FEATURE_MAP)
            # [BT, BV]
            b_v = tl.load(v + (start * HK + i_hk) * V + (t[:, None] * (HK * V) + o_v[None, :]), mask=m_tv, other=0.)
            b_kw = (b_kf * b_kd[:, None]).to(b_k.dtype)
            if NORMALIZE:
                b_zn = b_z + tl.sum(b_kf, 0)  # the normaliser after this chunk (float32, [BK])
        for i_g in range(QPS):
            i_h = i_s * QPS + i_g
            b_do, b_rd, b_dd = _load_do(do, den, delta, start, t, i_h, o_v, m_t, m_tv, H, V, NORMALIZE)
            # dN Sᵀ = diag(1/d) dO Sᵀ: [BT, BV] @ [BV, BK] -> [BT, BK]
            b_qs = b_qd
            if NORMALIZE:
                b_qs = b_qd * b_rd
            b_dq = tl.dot(b_do, b_ht.to(b_do.dtype), input_precision=DOT_PRECISION) * b_qs[:, None]
            if NORMALIZE:
                # dd_i z_i = dd_i z_prev (float32, here) + Σ_{j<=i} dd_i k̃_j (in the intra product)
                b_dq += b_dd[:, None] * b_z[None, :]
            if CAUSAL:
                # ((dN Vᵀ [+ dd 1ᵀ]) ⊙ M: [BT, BV] @ [BV, BT] -> [BT, BT]; then [BT, BT] @ [BT, BK] -> [BT, BK]
                b_ds = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
                if NORMALIZE:
                    b_ds = b_ds * b_rd[:, None] + b_dd[:, None]
                b_ds = b_ds * _intra_mask(b_a, o_t, USE_DECAY)
                b_dq = tl.dot(b_ds.to(b_k.dtype), b_k, b_dq, input_precision=DOT_PRECISION)
            if FEATURE_MAP == 0:
                b_dq *= scale
            else:
                b_x = tl.load(q + (start * H + i_h) * K + (t[:, None] * (H * K) + o_k[None, :]), mask=m_tk, other=0.).to(tl.float32)
                b_dq *= _phi_grad(b_x * scale, FEATURE_MAP) * scale
            tl.store(dq + (start * H + i_h) * K + (t[:, None] * (H * K) + o_k[None, :]), b_dq.to(dq.dtype.element_ty), mask=m_tk)
        if CAUSAL:
            # the forward's state update, transposed: [BV, BT] @ [BT, BK] -> [BV, BK]
            b_ht = tl.dot(tl.trans(b_v), b_kw, b_ht * b_sd, input_precision=DOT_PRECISION)
            if NORMALIZE:
                b_z = b_zn


@triton.jit
def _g_offsets(o_k, o_v, m_k, m_v, V: tl.constexpr, TRANS_G: tl.constexpr):
    """Offsets and mask of a state-gradient block, `[BK, BV]` or transposed `[BV, BK]`."""
    if TRANS_G:
        off = o_k[None, :] * V + o_v[:, None]
        m = m_k[None, :] & m_v[:, None]
    else:
        off = o_k[:, None] * V + o_v[None, :]
        m = m_k[:, None] & m_v[None, :]
    return off, m


@triton.jit
def _dkdv_head(q, do, den, delta, decay, scale, start, t, i_s, o_t, o_k, o_v, m_t, m_tk, m_tv, n_c,
               b_k, b_v, b_dh, b_dz, b_dk, b_dv,
               H: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
               FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr, CAUSAL: tl.constexpr,
               DOT_PRECISION: tl.constexpr, USE_DECAY: tl.constexpr, STORE_DK: tl.constexpr,
               STORE_DV: tl.constexpr, TRANS_G: tl.constexpr, ACC: tl.constexpr):
    """One chunk of one state head `i_s` for dk/dv (see `_segment_dkdv_kernel`): its terms of dk̃
    and dv (added to `b_dk`, `b_dv` when ACC, else they start here) and its G (and Gz) moved
    before the chunk. Returns (b_dk, b_dv, b_dh, b_dz)."""
    QPS: tl.constexpr = H // HS
    b_a = 0.
    if USE_DECAY:
        b_a = tl.load(decay + i_s).to(tl.float32)
    b_qd, b_kd, b_sd = _chunk_decay(b_a, o_t, m_t, n_c, USE_DECAY)
    # inter-chunk: [BT, BV] @ [BV, BK] -> [BT, BK] and [BT, BK] @ [BK, BV] -> [BT, BV]
    if STORE_DK:
        if TRANS_G:
            b_dki = tl.dot(b_v, b_dh.to(b_v.dtype), input_precision=DOT_PRECISION) * b_kd[:, None]
        else:
            b_dki = tl.dot(b_v, tl.trans(b_dh).to(b_v.dtype), input_precision=DOT_PRECISION) * b_kd[:, None]
        if NORMALIZE:
            b_dki += b_dz[None, :]
        if ACC:
            b_dk += b_dki
        else:
            b_dk = b_dki
    if STORE_DV:
        b_dvi = tl.dot(b_k, b_dh.to(b_k.dtype), input_precision=DOT_PRECISION) * b_kd[:, None]
        if ACC:
            b_dv += b_dvi
        else:
            b_dv = b_dvi
    if CAUSAL:
        # G <- λ^L G + Σ_group (Q̃ ⊙ λ^(t+1))ᵀ dN: the products accumulate into the decayed G
        b_dh = b_dh * b_sd
        for i_g in range(QPS):
            i_h = i_s * QPS + i_g
            # transposed mask Mᵀ[j, t] = M[t, j], rebuilt per query head (not live across the loop)
            b_mt = _intra_mask_t(b_a, o_t, USE_DECAY)
            if FEATURE_MAP == 0:
                b_mt *= scale  # the q̃ products carry `scale` (no feature map: q̃ = q)
            b_q, b_qf, b_qx = _load_q(q, start, t, i_h, o_k, m_tk, scale, H, K, FEATURE_MAP)
            b_do, b_rd, b_dd = _load_do(do, den, delta, start, t, i_h, o_v, m_t, m_tv, H, V, NORMALIZE)
            b_qs = b_qd
            if FEATURE_MAP == 0:
                b_qs = b_qd * scale
            if NORMALIZE:
                b_qs = b_qs * b_rd
            b_qw = (b_qf * b_qs[:, None]).to(b_q.dtype)
            if NORMALIZE and STORE_DK:
                # Gz <- Gz + Σ_t dd_t q̃_t (only dk reads Gz), now so that the float32 q̃ dies here
                b_dzc = tl.sum(b_qf * b_dd[:, None], 0)
                if FEATURE_MAP == 0:
                    b_dzc *= scale
                b_dz += b_dzc
            # (Q̃ ⊙ λ^(t+1) / d)ᵀ dO: [BK, BT] @ [BT, BV] -> [BK, BV] (first, so the weighted q̃
            # tile dies early)
            if TRANS_G:
                b_dh = tl.dot(tl.trans(b_do), b_qw, b_dh, input_precision=DOT_PRECISION)
            else:
                b_dh = tl.dot(tl.trans(b_qw), b_do, b_dh, input_precision=DOT_PRECISION)
            if STORE_DV:
                # Aᵀ diag(1/d) = (K̃ Q̃ᵀ) ⊙ Mᵀ / d_t: [BT, BK] @ [BK, BT] -> [BT, BT]; dv += (..) dO
                if NORMALIZE and not USE_DECAY:
                    # b_qw = q̃ ⊙ [scale ·] 1/d (λ = 1): the product yields the scaled columns itself
                    # (no 1/d broadcast in the product's layout: triton 3.6 spilled 392-416 B here)
                    b_st = tl.dot(b_k, tl.trans(b_qw), input_precision=DOT_PRECISION) * _intra_mask_t(b_a, o_t, False)
                else:
                    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * b_mt
                    if NORMALIZE:
                        b_st = b_st * b_rd[None, :]
                b_dv = tl.dot(b_st.to(b_do.dtype), b_do, b_dv, input_precision=DOT_PRECISION)
            if STORE_DK:
                # dAᵀ = (V dNᵀ [+ 1 ddᵀ]) ⊙ Mᵀ: [BT, BV] @ [BV, BT] -> [BT, BT]; dk += dAᵀ Q̃
                # (the normaliser's Σ_{t>=j} dd_t q̃_t rides the same product)
                b_dst = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
                if NORMALIZE:
                    b_dst = b_dst * b_rd[None, :]
                b_dst = b_dst * b_mt
                b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, b_dk, input_precision=DOT_PRECISION)
                if NORMALIZE:
                    b_dzq = tl.cumsum(b_qf * b_dd[:, None], 0, reverse=True)
                    if FEATURE_MAP == 0:
                        b_dzq *= scale
                    b_dk += b_dzq
    return b_dk, b_dv, b_dh, b_dz


@_segment_kernel(STORE_DK="dk", STORE_DV="dv")
def _segment_dkdv_kernel(
    q, k, v, do, den, delta, dk, dv, decay, gin, gzin, gwork, seg_info, cu_seqlens, scale, T, NS, SEG,
    H: tl.constexpr, HK: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GPS: tl.constexpr,
    FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr, CAUSAL: tl.constexpr, STATE_PER_SEQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_DECAY: tl.constexpr, IS_VARLEN: tl.constexpr,
    STORE_DK: tl.constexpr, STORE_DV: tl.constexpr,
):
    # program = (segment, KV-side head, state block): a reverse walk of the segment's chunks from
    # the gradient G of the state after the segment (`gin`; CAUSAL=False: the sequence total):
    #   dk̃_j = Σ_s [λ^(L-1-j) v_j G_sᵀ + Σ_t M[t,j] (dn_t·v_j) q̃_t] [+ Gz + Σ_{t>=j} dd_t q̃_t],
    #   dv_j  = Σ_s [λ^(L-1-j) k̃_j G_s  + Σ_t M[t,j] (q̃_t·k̃_j) dn_t],
    #   G_s <- λ^L G_s + (Q̃ ⊙ λ^(t+1))ᵀ dN,
    # over the GPS state heads s that read this KV head. GPS = 1 (linear attention; lightning
    # without GQA): one state head, G carried in registers. GPS > 1 (lightning GQA: a state per
    # query head): the group's dk/dv are summed here, in a fixed order (deterministic, no float32
    # per-query-head buffers), and each G_s is carried between chunks in its `gwork` slot (read
    # from `gin` at the first chunk; the slot is this program's alone; a barrier orders the
    # block's global writes before the next chunk reads them).
    # STORE_DK needs Dv whole (BV >= V), STORE_DV needs Dk whole (BK >= K): each output that
    # sums over a head dim is computed by a program holding that dim, so it comes out complete.
    tl.static_assert(GPS == 1 or not NORMALIZE, "normalize has one state per KV head")
    pid, i_n, start, n = _segment(seg_info, cu_seqlens, T, NS, SEG, IS_VARLEN)
    i_p = tl.program_id(1).to(tl.int64)
    NVB: tl.constexpr = (V + BV - 1) // BV
    i_k, i_v = tl.program_id(2) // NVB, tl.program_id(2) % NVB
    i_hk = i_p * GPS * HK // HS
    o_t = tl.arange(0, BT)
    o_k = _cols(i_k, BK, K)
    o_v = _cols(i_v, BV, V)
    m_k = o_k < K
    m_v = o_v < V
    # a dk-only program keeps G transposed, `[BV, BK]`: its update is then Gᵀ += dOᵀ (Q̃ ⊙ w) with
    # M = Dv rows per warp group (wgmma) and its products read it without a transpose
    TRANS_G: tl.constexpr = STORE_DK and not STORE_DV
    off_g, m_g = _g_offsets(o_k, o_v, m_k, m_v, V, TRANS_G)

    if GPS == 1:
        # [BK, BV] float32 state gradient, [BK] normaliser gradient
        b_dh = tl.load(_state_ptr(gin, pid, i_n, i_p, HS, K * V, STATE_PER_SEQ) + off_g, mask=m_g, other=0.)
        b_dz = tl.zeros([BK], dtype=tl.float32)
        if NORMALIZE:
            b_dz += tl.load(_state_ptr(gzin, pid, i_n, i_p, HS, K, STATE_PER_SEQ) + o_k, mask=m_k, other=0.)
    NT = tl.cdiv(n, BT)
    for i_r in range(0, NT):
        i_t = NT - 1 - i_r
        t = i_t * BT + o_t
        m_t = t < n
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        n_c = tl.minimum(n - i_t * BT, BT)
        b_k, b_kf, b_kx = _load_k(k, start, t, i_hk, o_k, m_tk, HK, K, FEATURE_MAP)
        # [BT, BV]
        b_v = tl.load(v + (start * HK + i_hk) * V + (t[:, None] * (HK * V) + o_v[None, :]), mask=m_tv, other=0.)
        if GPS == 1:
            b_dk, b_dv, b_dh, b_dz = _dkdv_head(
                q, do, den, delta, decay, scale, start, t, i_p, o_t, o_k, o_v, m_t, m_tk, m_tv, n_c,
                b_k, b_v, b_dh, b_dz, 0., 0., H, HS, K, V, FEATURE_MAP, NORMALIZE, CAUSAL, DOT_PRECISION,
                USE_DECAY, STORE_DK, STORE_DV, TRANS_G, False)
        else:
            b_dk = tl.zeros([BT, BK], dtype=tl.float32)
            b_dv = tl.zeros([BT, BV], dtype=tl.float32)
            for i_j in range(GPS):
                i_s = i_p * GPS + i_j
                p_w = _state_ptr(gwork, pid, i_n, i_s, HS, K * V, False) + off_g
                p_g = _state_ptr(gin, pid, i_n, i_s, HS, K * V, STATE_PER_SEQ) + off_g
                if CAUSAL:
                    if i_r == 0:
                        b_g = tl.load(p_g, mask=m_g, other=0.)
                    else:
                        b_g = tl.load(p_w, mask=m_g, other=0.)
                else:
                    b_g = tl.load(p_g, mask=m_g, other=0.)
                b_dk, b_dv, b_g, b_gz = _dkdv_head(
                    q, do, den, delta, decay, scale, start, t, i_s, o_t, o_k, o_v, m_t, m_tk, m_tv, n_c,
                    b_k, b_v, b_g, tl.zeros([BK], dtype=tl.float32), b_dk, b_dv, H, HS, K, V, FEATURE_MAP,
                    NORMALIZE, CAUSAL, DOT_PRECISION, USE_DECAY, STORE_DK, STORE_DV, TRANS_G, True)
                if CAUSAL:
                    tl.store(p_w, b_g, mask=m_g)
            tl.debug_barrier()
        if STORE_DK:
            if FEATURE_MAP != 0:
                # k reloaded (an L1/L2 hit) rather than kept live in float32 across the chunk
                b_kx = tl.load(k + (start * HK + i_hk) * K + (t[:, None] * (HK * K) + o_k[None, :]), mask=m_tk,
                               other=0.).to(tl.float32)
                b_dk *= _phi_grad(b_kx, FEATURE_MAP)
            tl.store(dk + (start * HK + i_hk) * K + (t[:, None] * (HK * K) + o_k[None, :]), b_dk.to(dk.dtype.element_ty), mask=m_tk)
        if STORE_DV:
            tl.store(dv + (start * HK + i_hk) * V + (t[:, None] * (HK * V) + o_v[None, :]), b_dv.to(dv.dtype.element_ty), mask=m_tv)
