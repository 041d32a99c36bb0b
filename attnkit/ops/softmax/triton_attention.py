"""Triton softmax attention (prefill / training): FlashAttention-2 style forward and backward with
native GQA, bottom-right aligned causal masking and sliding windows, logit softcapping, variable
lengths and a fused per-head QK-norm.

GQA by packing: a program owns one KV head and a block of `BM` *packed query rows*; packed row
`r` of a sequence is query position `t = r // G` of query head `hk * G + r % G` (`G = H // Hk`).
Every K/V tile a program loads is therefore used by all the query heads of its group. In the
backward, a dk/dv program owns a block of keys of one KV head and loops over every packed query
row of its group, so `dk`/`dv` are summed over the group's query heads inside the kernel.

Masking: causal masking is the window `(left, 0)`; a window is `(left, right)` with `-1` unbounded
(flash-attn semantics, positions bottom-right aligned). A block of rows sees a contiguous range of
key tiles; the loops run over that range only (tiles outside every row's window are never
loaded), and split it into tiles every row sees whole (no mask at all) and the boundary tiles at
both ends (masked). The backward does the same over query tiles for a block of keys.

Tiles: the forward tunes `BM`/`BN` (up to 128 x 128); the backward programs own 128-row outer
tiles (keys for dk/dv, packed query rows for dq) with tuned 32/64-row inner tiles, and every
product keeps the outer tile as its M dimension (the dk/dv kernel works on transposed tiles), so
that sm_90 can run them on `wgmma`. The backward is deterministic (no atomics): dq and dk/dv are
separate kernels, and weight/scale gradients are per-program partials summed by the launcher.

QK-norm: with `q̂ = r_q x_q ⊙ w_q`, `k̂ = r_k x_k ⊙ w_k`, `q̂·k̂ = r_q r_k ((x_q ⊙ w_q ⊙ w_k) · x_k)`.
A pre-pass computes `r_q` once per query, `r_k` once per key and (with weights) the query operand
`x_q ⊙ w_q ⊙ w_k`; the rstds scale the float32 logits per row and per key column, so the loops
have the same products as plain attention. The norms' own backward runs in the epilogues.
Derivations: docs/softmax_kernels.md.

Variable lengths run in one launch without a host sync: sequence `i` owns the row blocks
`[cu[i]·G // BM + i, cu[i+1]·G // BM + i + 1)` (at least `cdiv(len_i·G, BM)` of them) and a
program finds its sequence by a binary search over `cu_seqlens`.
"""

from __future__ import annotations

import contextvars
import os

import torch
import triton
import triton.language as tl

from ..common.triton_utils import device_guard, dot_precision, interpreted

NORMS = {None: 0, "rms": 1, "l2": 2}
LOG2E = 1.4426950408889634

# Checked by the static GPU audit (attnkit/tools/_requirements.py; CI: `gpu_audit --arch sm_90
# --quick`): on sm_90, every kept config of the forward and both backward kernels runs every
# product on wgmma and spills nothing, with and without the RMS QK-norm, with a sliding window and
# with a softcap, and the QK-norm adds no tensor-core work to the forward (no second QKᵀ product).
_ATTN_KERNELS = r"^_attention_(fwd|bwd_dkdv|bwd_dq)_kernel$"
_PLAIN_CALL = r"^attention fwd\+bwd \S+ \S+ causal=True$"
AUDIT_REQUIREMENTS = [
    dict(kernel=_ATTN_KERNELS, arch="sm_90", dtypes=("bfloat16",), head_dims=(64, 128), case=_PLAIN_CALL,
         max_spill_stores=0, mma="wgmma", why="issue 12: softmax fwd/bwd on wgmma without spills"),
    dict(kernel=_ATTN_KERNELS, arch="sm_90", dtypes=("bfloat16",), head_dims=(64, 128), case=r"norm=rms",
         max_spill_stores=0, mma="wgmma", why="issue 12: softmax fwd/bwd with RMS QK-norm on wgmma without spills"),
    dict(kernel=r"^_attention_fwd_kernel$", arch="sm_90", dtypes=("bfloat16",), head_dims=(64, 128),
         case=r"norm=rms", same_mma_count_as=_PLAIN_CALL,
         why="issue 12: the RMS-norm forward has the same number of MMA instructions as the plain forward"),
    # sliding windows and softcap (issue 15): the windowed calls (causal window in --quick; the
    # full audit adds window + softcap and a left-only window) and the softcap calls
    dict(kernel=_ATTN_KERNELS, arch="sm_90", dtypes=("bfloat16",), head_dims=(64, 128), case=r" window=\(",
         max_spill_stores=0, mma="wgmma", why="issue 15: sliding-window softmax fwd/bwd on wgmma without spills"),
    dict(kernel=_ATTN_KERNELS, arch="sm_90", dtypes=("bfloat16",), head_dims=(64, 128), case=r" softcap=",
         max_spill_stores=0, mma="wgmma", why="issue 15: softcapped softmax fwd/bwd on wgmma without spills"),
]


def head_block(d: int) -> int:
    """A head dim padded to a power of two of at least 16 (the smallest `tl.dot` operand)."""
    return max(16, triton.next_power_of_2(d))


def strides4(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())


# ------------------------------------------------------------------------------------- configs

# Largest dynamic shared memory one block may use (opt-in), per compute capability major.minor.
_SMEM_LIMITS = {(8, 0): 166_912, (8, 7): 166_912, (9, 0): 232_448, (10, 0): 232_448, (10, 3): 232_448}
_SMEM_DEFAULT = 101_376  # sm_86 / sm_89 / sm_120 (99 KB)


def smem_limit(capability: tuple[int, int] | None) -> int:
    """Shared memory budget of a device (`None`: the CPU interpreter, no limit that matters)."""
    if capability is None:
        return 1 << 30
    return _SMEM_LIMITS.get(tuple(capability), _SMEM_DEFAULT)


def _capability(t: torch.Tensor) -> tuple[int, int] | None:
    """The compute capability the configs are pruned for: the tensor's CUDA device; for CPU/meta
    tensors (a static audit recording launches) `$ATTNKIT_TARGET_ARCH` (`sm_90`, `sm_80`, ...),
    else sm_80, the smallest shared memory of the supported data-centre GPUs."""
    if t.device.type == "cuda":
        return torch.cuda.get_device_capability(t.device)
    if interpreted():
        return None
    arch = os.environ.get("ATTNKIT_TARGET_ARCH", "sm_80").removeprefix("sm_")
    return (int(arch[:-1]), int(arch[-1])) if arch.isdigit() and len(arch) >= 2 else (8, 0)


#: Set to "0" to keep the forward on the pointer path everywhere (no tensor descriptors).
TMA_ENV = "ATTNKIT_TMA"


def use_tma(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the forward loads its whole K/V tiles through tensor descriptors (TMA): on sm_90 or
    newer (the target arch when recording on CPU/meta tensors; any device under the interpreter,
    which emulates descriptors, so the CPU tests run this path), unless `$ATTNKIT_TMA` is "0", and
    only when TMA can address the tensors: unit last stride, 16-byte aligned base and every other
    stride a multiple of 16 bytes. Other inputs (unaligned, strided views) take the pointer path."""
    if os.environ.get(TMA_ENV, "1") == "0":
        return False
    if not interpreted():
        cap = _capability(k)
        if cap is None or cap[0] < 9:
            return False
    for x in (k, v):
        e = x.element_size()
        if x.stride(-1) != 1 or x.data_ptr() % 16 or any((st * e) % 16 for st in x.stride()[:-1]):
            return False
    return True


def _scratch_allocator(size: int, alignment: int, stream):
    """Global scratch for device-side tensor descriptors (Triton asks for it at launch)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _launch_with_scratch(launch):
    """Runs `launch()` with Triton's scratch allocator set in a copy of the current context, so the
    caller's allocator setting (a context variable) is left as it was."""
    def run():
        triton.set_allocator(_scratch_allocator)
        return launch()
    return contextvars.copy_context().run(run)


def len_bucket(n: int) -> int:
    """Coarse length class for the autotune keys (<= 2k, <= 16k, longer): tuning reruns only
    when a length crosses a class, and lengths inside a class share one compiled kernel."""
    return 0 if n <= 2048 else (1 if n <= 16384 else 2)


def fwd_configs() -> list[triton.Config]:
    """`BM x BN` tiles up to 128 x 128 (the shared-memory prune drops what a device cannot hold)."""
    if interpreted():
        return [triton.Config({"BM": 32, "BN": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in ((128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3),
                                 (128, 64, 8, 4), (64, 128, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2),
                                 (64, 64, 8, 2), (64, 32, 8, 2))]


def fwd_smem_bytes(cfg: triton.Config, BD: int, BDV: int, elsize: int) -> int:
    """Upper estimate of a forward config's shared memory: the resident `[BM, BD]` query tile,
    `num_stages` pipelined K and V tiles, and a `[BM, BN]` staging tile for `P`."""
    bm, bn = cfg.kwargs["BM"], cfg.kwargs["BN"]
    return elsize * (bm * BD + max(cfg.num_stages, 1) * bn * (BD + BDV) + bm * bn)


# Registers per thread a config may plan for (estimate below); ptxas has 255. Calibrated on the
# sm_90 compile audit (bf16, D = 64/128): configs estimated <= 208 compiled without spills, those
# above spilled (e.g. forward 128 x 128 x D128 / 8 warps: 224, 144 B spilled).
REG_BUDGET = 208


def _regs(elems_f32: int, elems_operand: int, elsize: int, num_warps: int, num_stages: int) -> float:
    """Registers per thread: float32 tiles (accumulators, logits) count 1 per element, input-dtype
    operands held in registers `elsize / 4`, plus 24 per pipeline stage beyond 2."""
    return (elems_f32 + elems_operand * elsize / 4) / (32 * num_warps) + 24 * max(num_stages - 2, 0)


def _mma_sync_regs(capability) -> int:
    """Extra registers before sm_90: `mma.sync` takes both operands from registers (sm_80 audit:
    dq 128 x 32 / D128 spilled 96 B at an sm_90 estimate of 160; 128 x 16 at 144 did not)."""
    return 64 if capability is not None and capability[0] < 9 else 0


# Extra registers of a 4-warp forward (one warp group, M = 64 wgmma): the sm_90 audit
# (2026-12-02, bf16) had 64 x 64 / D128 / 3 stages at an estimate of 184 spill 44 B and
# 64 x 128 / D64 / 3 stages at 200 spill 56 B, while 64 x 64 / D64 / 3 stages (136) and
# 64 x 32 / D128 / 2 stages (128) compiled at 164 and 174 registers without spilling.
FWD_4WARP_REGS = 32


def fwd_regs(cfg: triton.Config, BD: int, BDV: int, elsize: int) -> float:
    """Accumulator `[BM, BDV]` and logits/probabilities `2 x [BM, BN]` in float32, `[BM, BD]` Q
    (+ FWD_4WARP_REGS at 4 warps)."""
    bm, bn = cfg.kwargs["BM"], cfg.kwargs["BN"]
    return (_regs(bm * BDV + 2 * bm * bn, bm * BD, elsize, cfg.num_warps, cfg.num_stages)
            + FWD_4WARP_REGS * (cfg.num_warps <= 4))


# Forward tiles (BM, BN, num_warps) kept only when no other config survives the prune: 64 x 32 on
# 8 warps is the smallest tile (the fallback of fp32 / head dim 256 / sm_80), dominated by 64 x 64
# on 8 warps wherever that fits, and the GPU machine's Triton 3.6 ptxas crashes on it for sm_90 at
# head dim 64 bf16 (`ptxas` error code -11, audit of 2026-12-02; Triton 3.9 compiles it).
FWD_FALLBACK_ONLY = {(64, 32, 8)}


def prune_fwd(configs, BD: int, BDV: int, elsize: int, capability) -> list[triton.Config]:
    """Configs that fit the device's shared memory and the register budget (the FWD_FALLBACK_ONLY
    tiles only when nothing else does); when none fits the budget, the one with the fewest
    estimated registers that fits shared memory."""
    limit = smem_limit(capability)
    fits = [c for c in configs if fwd_smem_bytes(c, BD, BDV, elsize) <= limit]
    kept = [c for c in fits if fwd_regs(c, BD, BDV, elsize) + _mma_sync_regs(capability) <= REG_BUDGET]
    preferred = [c for c in kept if (c.kwargs["BM"], c.kwargs["BN"], c.num_warps) not in FWD_FALLBACK_ONLY]
    if preferred:
        return preferred
    if kept:
        return kept
    if fits:
        return [min(fits, key=lambda c: fwd_regs(c, BD, BDV, elsize))]
    return [triton.Config({"BM": 32, "BN": 32}, num_warps=4, num_stages=1)]


def _prune_fwd(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    return prune_fwd(configs, args["BD"], args["BDV"], args["q"].element_size(), _capability(args["q"]))


def bwd_outer_tile(BD: int, BDV: int, elsize: int) -> int:
    """Keys per dk/dv program and packed query rows per dq program: 128 while the two resident
    outer tiles (K and V, or Q and dO) fit in 64 KB (16-bit head dims <= 128), else 64 or 32.
    The grid and the partial buffers depend on it, so it is fixed by shape, not tuned."""
    if interpreted():
        return 32
    for tile in (128, 64):
        if tile * (BD + BDV) * elsize <= 65536:
            return tile
    return 32


def bwd_dkdv_tile(outer: int, BD: int, BDV: int, capability) -> int:
    """Keys per dk/dv program: `outer`, except before sm_90 (`mma.sync`, both operands in
    registers) at head dims above 64, where 128 keys leave no inner tile within the registers
    (sm_80 audit, 2026-12-02: inner 16 / w8 / s2 spilled 52 B, 20 B with the QK-norm): 64."""
    if capability is not None and capability[0] < 9 and outer == 128 and BD + BDV > 128:
        return 64
    return outer


def bwd_configs(inner: str) -> list[triton.Config]:
    """The inner tile (the side a backward program loops over) is tuned with warps and stages."""
    if interpreted():
        return [triton.Config({inner: 16}, num_warps=4, num_stages=1)]
    return [triton.Config({inner: n}, num_warps=w, num_stages=s)
            for n in (64, 32, 16) for w in (8, 4) for s in (2, 3)]


def bwd_smem_bytes(cfg: triton.Config, outer: int, BD: int, BDV: int, elsize: int) -> int:
    """Resident outer tiles plus `num_stages` pipelined inner tiles (both sides carry a head-dim
    `BD` and a `BDV` tile), plus a transposed staging copy of one inner tile."""
    inner = next(iter(cfg.kwargs.values()))
    return elsize * (outer * (BD + BDV) + (max(cfg.num_stages, 1) + 1) * inner * (BD + BDV))


# Extra registers of a backward program per feature on top of causal masking: a left window bound
# (a second visibility test on the masked tiles) and a softcap (tanh and its derivative). Sm_90
# audit (2026-12-02, bf16): with both, dq spilled 24 B at D64 / 32 inner / 4 warps / 2 stages
# (estimate 192; Triton 3.6, 255 registers) and sat at 254 registers at D128 / 64 / 8 / 2 (192;
# 16 B spilled before this round's dq restructuring); with either alone both compile clean.
BWD_FEATURE_REGS = 12


def bwd_regs(cfg: triton.Config, outer: int, BD: int, BDV: int, elsize: int, dkdv: bool,
             norm: bool = False, features: int = 0) -> float:
    """dk/dv: two float32 accumulators `[outer, BD + BDV]`, resident K, V and `4 x [outer, inner]`
    transposed tiles (`Sᵀ`, `Pᵀ`, `dPᵀ`, `dSᵀ`: the audit's 128 x 64 / D64 config spilled 188 B with
    2); dq: one `[outer, BD]` accumulator, resident Q, dO and `2 x [outer, inner]` logits/dp;
    +24 with a QK-norm (the row and column rstd scales; dq 128 x 64 / D128 spilled 48 B with it);
    +BWD_FEATURE_REGS per feature (`features`: a left window bound, a softcap)."""
    inner = next(iter(cfg.kwargs.values()))
    acc = outer * (BD + BDV) + 4 * outer * inner if dkdv else outer * BD + 2 * outer * inner
    return (_regs(acc, outer * (BD + BDV), elsize, cfg.num_warps, cfg.num_stages) + 24 * norm
            + BWD_FEATURE_REGS * features)


def prune_bwd(configs, outer: int, BD: int, BDV: int, elsize: int, capability,
              dkdv: bool = True, norm: bool = False, features: int = 0) -> list[triton.Config]:
    """Inner tiles up to the outer tile that fit shared memory and the register budget; when none
    fits the budget, the one with the fewest estimated registers that fits shared memory.
    `features`: how many of (left window bound, softcap) the call has (see `bwd_regs`)."""
    limit = smem_limit(capability)
    fits = [c for c in configs if next(iter(c.kwargs.values())) <= outer
            and bwd_smem_bytes(c, outer, BD, BDV, elsize) <= limit]

    def regs(c):
        return bwd_regs(c, outer, BD, BDV, elsize, dkdv, norm, features)

    kept = [c for c in fits if regs(c) + _mma_sync_regs(capability) <= REG_BUDGET]
    if kept:
        return kept
    if fits:
        return [min(fits, key=regs)]
    name = next(iter(configs[0].kwargs))
    return [triton.Config({name: 16}, num_warps=4, num_stages=1)]


def _bwd_features(args) -> int:
    """Left window bound and softcap of a launch (causal masking alone is the right bound, which
    the plain estimate already covers)."""
    return int(bool(args["HAS_WL"])) + int(bool(args["SOFTCAP"]))


def _prune_bwd_dkdv(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    return prune_bwd(configs, args["BN"], args["BD"], args["BDV"], args["q"].element_size(), _capability(args["q"]),
                     norm=args["NORM"] != 0, features=_bwd_features(args))


def _prune_bwd_dq(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    return prune_bwd(configs, args["BM"], args["BD"], args["BDV"], args["q"].element_size(), _capability(args["q"]),
                     dkdv=False, norm=args["NORM"] != 0, features=_bwd_features(args))


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
def program_block(T, N, G: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr,
                  IS_VARLEN: tl.constexpr):
    """1-D grid of `blocks · B · Hk` programs: returns `(i_bh, i_blk)` with the blocks of one (batch
    row, KV head) consecutive, so programs in flight share K/V in L2, and, with REVERSE, the
    longest blocks (the last rows under causal masking) first, the short ones filling the tail."""
    pid = tl.program_id(0).to(tl.int64)
    if IS_VARLEN:
        n_blk = T.to(tl.int64) * G // BLOCK + N
    else:
        n_blk = tl.cdiv(T.to(tl.int64) * G, BLOCK)
    i_bh = pid // n_blk
    i_blk = pid % n_blk
    if REVERSE:
        i_blk = n_blk - 1 - i_blk
    return i_bh, i_blk


@triton.jit
def tile_split(lo, lo_full, hi, hi_full, BLOCK: tl.constexpr):
    """Tiles of the index range `[lo, hi)` that a block touches, `[lo_full, hi_full)` being the
    part every member of the block sees. Returns `(a, u0, u1, b)`: loop `[a, u0)` and `[u1, b)`
    with masks, `[u0, u1)` without (whole tiles only); `a`, `u0`, `u1` are multiples of BLOCK
    (or equal to `b`), and `a == b` when the block sees nothing."""
    lo = tl.maximum(lo, 0)
    a = (lo // BLOCK) * BLOCK
    b = tl.maximum(hi, a)
    u0 = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(lo_full, 0), BLOCK) * BLOCK, a), b)
    u1 = tl.maximum(tl.minimum((tl.maximum(hi_full, 0) // BLOCK) * BLOCK, b), u0)
    return a, u0, u1, b


@triton.jit
def tanh(x):
    """float32 tanh accurate to a few ulp (the interpreter has no libdevice): an odd Taylor
    polynomial below |x| = 0.25 (no cancellation near 0), `(1 - e) / (1 + e)`, `e = exp(-2x)`,
    above."""
    x2 = x * x
    # signed throughout (both forms are odd), with |x| clamped to 15 so exp2 stays finite
    # (tanh(15) is 1 in float32): no |x| tile and no sign fix-up live beside the two forms
    e = tl.exp2(tl.minimum(tl.maximum(x, -15.), 15.) * -2.8853900817779268)
    big = (1. - e) / (1. + e)
    small = x * (1. + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * -0.008863235529902197)))))
    return tl.where(x2 < 0.0625, small, big)


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
def row_norm_bwd_x(g, x, r, w, o_d, m_d, D: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr):
    """`row_norm_bwd` from the raw input tile `x` (any dtype) and `r`, with `y = x·r` formed inside
    the elementwise expressions instead of as a float32 tile of its own (registers, in the
    attention epilogues). Returns (`dx`, `Σ_rows g ⊙ y`)."""
    if HAS_W:
        gy = g * tl.load(w + o_d, mask=m_d, other=0.).to(tl.float32)[None, :]
    else:
        gy = g
    c = tl.sum(gy * x.to(tl.float32), 1) * r
    if NORM == 1:
        c = c / D
    dx = r[:, None] * (gy - x.to(tl.float32) * (r * c)[:, None])
    dw = tl.sum(g * x.to(tl.float32) * r[:, None], 0)
    return dx, dw


@triton.jit
def load_rows(base, rows, heads, o_d, m_row, m_d, s_t, s_h, s_d):
    """A `[R, BD]` tile of rows (`rows` token index, `heads` head index per row), zero padded."""
    p = base + rows[:, None] * s_t + heads[:, None] * s_h + o_d[None, :] * s_d
    return tl.load(p, mask=m_row[:, None] & m_d[None, :], other=0.)


@triton.jit
def load_tile(base, rows, o_d, m_row, m_d, s_t, s_d, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A `[R, BD]` tile at `base + rows·s_t + d·s_d`, masked only where needed: rows when
    MASK_ROWS, the head-dim padding unless EVEN_D (the head dim is a power of two >= 16)."""
    p = base + rows[:, None] * s_t + o_d[None, :] * s_d
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(p, mask=m_row[:, None], other=0.)
        else:
            x = tl.load(p, mask=m_row[:, None] & m_d[None, :], other=0.)
    else:
        if EVEN_D:
            x = tl.load(p)
        else:
            x = tl.load(p, mask=m_d[None, :], other=0.)
    return x


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
def logit_scales(scale, softcap, SOFTCAP: tl.constexpr):
    """`(sc1, sc2)`: the logits in log2 units are `raw·sc1` (no softcap) or `tanh(raw·sc1)·sc2`
    (softcap `c`: `sc1 = scale / c`, `sc2 = c·log2 e`), `raw = q̂·k̂`."""
    if SOFTCAP:
        sc1 = scale / softcap
        sc2 = softcap * 1.4426950408889634
    else:
        sc1 = scale * 1.4426950408889634
        sc2 = sc1 * 0. + 1.4426950408889634
    return sc1, sc2


@triton.jit
def window_visible(vis, q_pos, k_pos, WL, WR, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """`vis & (p - WL <= s <= p + WR)` for broadcastable query positions `p` (already shifted
    by `S - T`) and key positions `s`; an unbounded side is not tested."""
    if HAS_WL:
        vis = vis & (k_pos >= q_pos - WL)
    if HAS_WR:
        vis = vis & (k_pos <= q_pos + WR)
    return vis


@triton.jit
def key_range(t0, t1, shift, s_len, WL, WR, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """Keys seen by query positions `[t0, t1]`: `(lo, lo_full, hi, hi_full)` (see `tile_split`)."""
    lo = t0 * 0
    lo_full = lo
    hi = lo + s_len
    hi_full = hi
    if HAS_WL:
        lo = t0 + shift - WL
        lo_full = t1 + shift - WL
    if HAS_WR:
        hi = tl.minimum(t1 + shift + WR + 1, s_len)
        hi_full = tl.minimum(t0 + shift + WR + 1, s_len)
    return lo, lo_full, hi, hi_full


@triton.jit
def query_range(c0, c1, shift, t_len, WL, WR, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """Query positions that see keys `[c0, c1]`: `(lo, lo_full, hi, hi_full)` (see `tile_split`);
    key `s` is seen by positions `t` with `s - shift - WR <= t <= s - shift + WL`."""
    lo = c0 * 0
    lo_full = lo
    hi = lo + t_len
    hi_full = hi
    if HAS_WR:
        lo = c0 - shift - WR
        lo_full = c1 - shift - WR
    if HAS_WL:
        hi = tl.minimum(c1 - shift + WL + 1, t_len)
        hi_full = tl.minimum(c0 - shift + WL + 1, t_len)
    return lo, lo_full, hi, hi_full


# ---------------------------------------------------------------------------------- norm pre-pass


@triton.heuristics({"HAS_Y": lambda args: args["y"] is not None,
                    "HAS_WA": lambda args: args["w_a"] is not None,
                    "HAS_WB": lambda args: args["w_b"] is not None})
@triton.jit(do_not_specialize=["R", "L"])
def _norm_prep_kernel(
    x, r, y, w_a, w_b, eps, R, L, s_xb, s_xt, s_xh, s_xd,
    HX: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, NORM: tl.constexpr,
    HAS_Y: tl.constexpr, HAS_WA: tl.constexpr, HAS_WB: tl.constexpr,
):
    # program = BR rows of x [B, L, HX, D] (any strides); r [B, L, HX] float32 and, with y,
    # y = x ⊙ w_a ⊙ w_b in x's dtype, contiguous [B, L, HX, D] (the query operand of the kernels)
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_row = rows < R
    i_b = rows // (L * HX)
    i_t = (rows // HX) % L
    i_h = rows % HX
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    p = x + i_b[:, None] * s_xb + i_t[:, None] * s_xt + i_h[:, None] * s_xh + o_d[None, :] * s_xd
    b_x = tl.load(p, mask=m_row[:, None] & m_d[None, :], other=0.)
    b_r = row_rstd(b_x.to(tl.float32), m_row, eps, D, NORM)
    tl.store(r + rows, b_r, mask=m_row)
    if HAS_Y:
        b_u = load_weight(w_a, o_d, m_d, HAS_WA) * load_weight(w_b, o_d, m_d, HAS_WB)
        b_y = b_x.to(tl.float32) * b_u[None, :]
        tl.store(y + rows[:, None] * D + o_d[None, :], b_y.to(y.dtype.element_ty),
                 mask=m_row[:, None] & m_d[None, :])


def norm_prep(x: torch.Tensor, norm: str, eps: float, w_a=None, w_b=None, write_y: bool = False):
    """`r [B, L, Hx]` float32 (the norm's rstd per row of `x [B, L, Hx, D]`) and, with `write_y`,
    `y = x ⊙ w_a ⊙ w_b` in x's dtype (contiguous), else None."""
    B, L, HX, D = x.shape
    r = torch.empty(B, L, HX, device=x.device, dtype=torch.float32)
    y = torch.empty(B, L, HX, D, device=x.device, dtype=x.dtype) if write_y else None
    R = B * L * HX
    if R > 0:
        BD = head_block(D)
        BR = max(1, 4096 // BD)
        with device_guard(x):
            _norm_prep_kernel[(triton.cdiv(R, BR),)](
                x, r, y, w_a, w_b, float(eps), R, L, *strides4(x), HX=HX, D=D, BD=BD, BR=BR,
                NORM=NORMS[norm], num_warps=1 if interpreted() else 4)
    return r, y


# --------------------------------------------------------------------------------------- forward


_HEURISTICS = {
    "HAS_SCALE_TENSOR": lambda args: args["scale_ptr"] is not None,
    "HAS_QW": lambda args: args["q_w"] is not None,
    "HAS_KW": lambda args: args["k_w"] is not None,
    "IS_VARLEN": lambda args: args["cu_seqlens_q"] is not None,
    "EVEN_D": lambda args: args["D"] == args["BD"],
    "EVEN_DV": lambda args: args["DV"] == args["BDV"],
}


@triton.jit
def _kv_tile_logits(b_q, r_row, k_desc, v_desc, k_base, v_base, rk_base, n0, s_len, o_d, m_d, o_dv, m_dv, s_kt, s_kd, s_vt, s_vd, HK,
                    BN: tl.constexpr, MASK: tl.constexpr, NORM: tl.constexpr, EVEN_D: tl.constexpr,
                    EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """The K/V tile at key `n0` for resident query rows `b_q [BM, BD]` (forward and dq): loads
    `K [BN, BD]`, `V [BN, BDV]` (masked only on a boundary tile, MASK; through the tensor
    descriptors `k_desc`/`v_desc` on whole tiles when USE_TMA) and returns
    `(raw, b_k, b_v, r_k, cols, m_col)` with the raw logits `raw = q·kᵀ [BM, BN]` in float32,
    scaled by `r_row[:, None]·r_k[None, :]` with a norm (`r_k` the keys' rstd from the pre-pass,
    loaded once per tile; `r_row` the caller's per-row factor), unscaled without one."""
    o_n = tl.arange(0, BN)
    cols = n0 + o_n
    m_col = cols < s_len
    # [BN, BD], [BN, BDV]: 64-bit tile base, 32-bit offsets inside the tile
    if USE_TMA and not MASK:
        # TMA (Hopper): head-dim padding past D comes back as zeros from the descriptor's bounds
        b_k = k_desc.load([n0, 0])
        b_v = v_desc.load([n0, 0])
    else:
        b_k = load_tile(k_base + tl.cast(n0, tl.int64) * s_kt, o_n, o_d, m_col, m_d, s_kt, s_kd, MASK, EVEN_D)
        b_v = load_tile(v_base + tl.cast(n0, tl.int64) * s_vt, o_n, o_dv, m_col, m_dv, s_vt, s_vd, MASK, EVEN_DV)
    # [BM, BD] @ [BD, BN] -> [BM, BN]
    b_raw = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
    r_k = m_col.to(tl.float32)  # unused without a norm
    if NORM != 0:
        if MASK:
            r_k = tl.load(rk_base + cols * HK, mask=m_col, other=0.)
        else:
            r_k = tl.load(rk_base + cols * HK)
        b_raw = b_raw * r_row[:, None] * r_k[None, :]
    return b_raw, b_k, b_v, r_k, cols, m_col


@triton.jit
def _fwd_tile(acc, l_i, m_i, b_q, b_rs, k_desc, v_desc, k_base, v_base, rk_base, n0, q_pos, m_row, s_len, sc1, sc2, WL, WR,
              o_d, m_d, o_dv, m_dv, s_kt, s_kd, s_vt, s_vd, HK,
              BN: tl.constexpr, MASK: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
              NORM: tl.constexpr, SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
              DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """One key tile of the online softmax. MASK: a boundary tile (key bounds and window tested);
    otherwise every row of the block sees every key of the tile and nothing is tested. With a
    norm, `b_rs = sc1·r_q` per row and `r_k` per key scale the product."""
    b_s, b_k, b_v, r_k, cols, m_col = _kv_tile_logits(b_q, b_rs, k_desc, v_desc, k_base, v_base, rk_base, n0, s_len, o_d, m_d, o_dv,
                                                      m_dv, s_kt, s_kd, s_vt, s_vd, HK, BN, MASK, NORM, EVEN_D,
                                                      EVEN_DV, DOT_PRECISION, USE_TMA)
    if NORM == 0:
        b_s = b_s * sc1
    if SOFTCAP:
        b_s = tanh(b_s) * sc2
    if MASK:
        visible = window_visible(m_col[None, :] & m_row[:, None], q_pos[:, None], cols[None, :], WL, WR,
                                 HAS_WL, HAS_WR)
        b_s = tl.where(visible, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        # rows that have seen no key yet keep m = -inf: shift them by 0 (exp2(-inf) = 0, no NaN)
        m_safe = tl.where(m_new == float("-inf"), 0., m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        m_safe = m_new
    b_p = tl.exp2(b_s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    # [BM, BN] @ [BN, BDV] -> [BM, BDV]
    acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.heuristics({**_HEURISTICS, "USE_TMA": lambda args: use_tma(args["k"], args["v"])})
@triton.autotune(configs=fwd_configs(), key=["BD", "BDV", "G", "HAS_WL", "HAS_WR", "NORM", "SOFTCAP", "LEN_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit(do_not_specialize=["T", "S", "N", "WL", "WR", "LEN_BUCKET"])
def _attention_fwd_kernel(
    q, k, v, o, lse, rq, rk, scale_ptr, q_w, k_w, cu_seqlens_q, cu_seqlens_k, scale, softcap, eps,
    T, S, N, WL, WR, LEN_BUCKET,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, NORM: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr,
    IS_VARLEN: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, USE_TMA: tl.constexpr,
):
    # program = (batch row x KV head, block of BM packed query rows of one sequence); longest
    # blocks first when the window is bounded on the right (causal)
    i_bh, i_m = program_block(T, N, G, BM, HAS_WR, IS_VARLEN)
    i_b, i_hk = i_bh // HK, i_bh % HK
    if IS_VARLEN:
        i_n, i_m = find_block(cu_seqlens_q, i_m, N, G, BM)
    else:
        i_n = i_b
    bos, t_len, bos_k, s_len = seq_bounds(cu_seqlens_q, cu_seqlens_k, i_n, T, S, IS_VARLEN)
    if i_m * BM >= t_len * G:
        return
    sc1, sc2 = logit_scales(load_scale(scale, scale_ptr, HAS_SCALE_TENSOR), softcap, SOFTCAP)
    # positions inside one sequence in 32 bits (the mask and tile arithmetic); bases in 64
    t_len = t_len.to(tl.int32)
    s_len = s_len.to(tl.int32)
    rows_start = (i_m * BM).to(tl.int32)
    rows = rows_start + tl.arange(0, BM)
    t = rows // G  # query position of each packed row
    h = (i_hk * G).to(tl.int32) + rows % G  # query head of each packed row
    m_row = t < t_len
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_d, m_dv = o_d < D, o_dv < DV
    q_base = q + i_b * s_qb + bos * s_qt
    k_base = k + i_b * s_kb + bos_k * s_kt + i_hk * s_kh
    v_base = v + i_b * s_vb + bos_k * s_vt + i_hk * s_vh
    rk_base = k_base  # unused without a norm
    if NORM != 0:
        rk_base = rk + (i_b * S + bos_k) * HK + i_hk

    # [BM, BD] query operand: with a norm, `q` is x_q ⊙ w_q ⊙ w_k (weights) or x_q, and r_q
    # (float32, from the pre-pass) enters the row scale; nothing is normalised in registers
    b_q = load_rows(q_base, t.to(tl.int64), h, o_d, m_row, m_d, s_qt, s_qh, s_qd)
    b_rs = sc1
    if NORM != 0:
        b_rs = tl.load(rq + (i_b * T + bos + t) * H + h, mask=m_row, other=0.) * sc1

    # keys of the block's positions [t0, t1]; row p = t + s_len - t_len sees p - WL <= s <= p + WR
    shift = s_len - t_len
    t0 = rows_start // G
    t1 = tl.minimum(t_len - 1, (rows_start + BM - 1) // G)
    lo, lo_full, hi, hi_full = key_range(t0, t1, shift, s_len, WL, WR, HAS_WL, HAS_WR)
    a, u0, u1, b = tile_split(lo, lo_full, hi, hi_full, BN)
    q_pos = t + shift

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    k_desc = k_base  # unused on the pointer path
    v_desc = v_base
    if USE_TMA:
        # K/V of this (sequence, KV head) as 2-D [s_len, D] tensors for the whole tiles (the host
        # checked 16-byte alignment of the bases and strides, unit last stride)
        k_desc = tl.make_tensor_descriptor(k_base, shape=[s_len, D], strides=[s_kt, 1], block_shape=[BN, BD])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[s_len, DV], strides=[s_vt, 1], block_shape=[BN, BDV])
    for n0 in range(a, u0, BN):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, b_q, b_rs, k_desc, v_desc, k_base, v_base, rk_base, n0, q_pos, m_row, s_len, sc1, sc2,
                                  WL, WR, o_d, m_d, o_dv, m_dv, s_kt, s_kd, s_vt, s_vd, HK, BN, True,
                                  HAS_WL, HAS_WR, NORM, SOFTCAP, EVEN_D, EVEN_DV, DOT_PRECISION, False)
    for n0 in range(u0, u1, BN):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, b_q, b_rs, k_desc, v_desc, k_base, v_base, rk_base, n0, q_pos, m_row, s_len, sc1, sc2,
                                  WL, WR, o_d, m_d, o_dv, m_dv, s_kt, s_kd, s_vt, s_vd, HK, BN, False,
                                  HAS_WL, HAS_WR, NORM, SOFTCAP, EVEN_D, EVEN_DV, DOT_PRECISION, USE_TMA)
    for n0 in range(u1, b, BN):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, b_q, b_rs, k_desc, v_desc, k_base, v_base, rk_base, n0, q_pos, m_row, s_len, sc1, sc2,
                                  WL, WR, o_d, m_d, o_dv, m_dv, s_kt, s_kd, s_vt, s_vd, HK, BN, True,
                                  HAS_WL, HAS_WR, NORM, SOFTCAP, EVEN_D, EVEN_DV, DOT_PRECISION, False)

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
def load_qrows(base, t, h, o_d, m_row, m_d, s_t, s_h, s_d, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """`[R, BD]` tile of packed query rows (position `t`, head `h`), masked only where needed."""
    p = base + t[:, None] * s_t + h[:, None] * s_h + o_d[None, :] * s_d
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(p, mask=m_row[:, None], other=0.)
        else:
            x = tl.load(p, mask=m_row[:, None] & m_d[None, :], other=0.)
    else:
        if EVEN_D:
            x = tl.load(p)
        else:
            x = tl.load(p, mask=m_d[None, :], other=0.)
    return x


@triton.jit
def _dkdv_tile(b_dk, b_dv, b_k, b_v, b_rs, q_base, rq_base, do_base, lse_base, delta_base, r0, cols, m_col, shift,
               t_len, sc2, WL, WR, i_hk, o_d, m_d, o_dv, m_dv, s_qt, s_qh, s_qd, T,
               H: tl.constexpr, G: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, MASK: tl.constexpr,
               HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, NORM: tl.constexpr, SOFTCAP: tl.constexpr,
               EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One tile of BM packed query rows for the resident keys, on transposed `[BN, BM]` tiles
    (keys are the M dimension of every product). With a norm, the query operand is
    `x_q ⊙ w_q ⊙ w_k` and `r_q` (rows) and `b_rs = sc1·r_k` (keys) scale the product."""
    rows = r0 + tl.arange(0, BM)
    t = rows // G
    h = (i_hk * G).to(tl.int32) + rows % G
    m_row = t < t_len
    # [BM, BD] query operand, [BM, BDV]: 64-bit tile base, 32-bit offsets inside the tile
    t_base = r0 // G
    t_loc = t - t_base
    b_q = load_qrows(q_base + tl.cast(t_base, tl.int64) * s_qt, t_loc, h, o_d, m_row, m_d, s_qt, s_qh, s_qd, MASK, EVEN_D)
    b_do = load_qrows(do_base + tl.cast(t_base, tl.int64) * (H * DV), t_loc, h, o_dv, m_row, m_dv, H * DV, DV, 1, MASK,
                      EVEN_DV)
    p_lse = h * T + t
    if MASK:
        b_lse2 = tl.load(lse_base + p_lse, mask=m_row, other=0.) * 1.4426950408889634
        b_delta = tl.load(delta_base + p_lse, mask=m_row, other=0.)
    else:
        b_lse2 = tl.load(lse_base + p_lse) * 1.4426950408889634
        b_delta = tl.load(delta_base + p_lse)
    # [BN, BD] @ [BD, BM] -> [BN, BM], logits in log2 units (b_rs: per-key scale)
    b_s = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * b_rs
    if NORM != 0:
        if MASK:
            r_q = tl.load(rq_base + t * H + h, mask=m_row, other=0.)
        else:
            r_q = tl.load(rq_base + t * H + h)
        b_s = b_s * r_q[None, :]
    if SOFTCAP:
        b_th = tanh(b_s)
        b_s = b_th * sc2
    b_p = tl.exp2(b_s - b_lse2[None, :])
    if MASK:
        visible = window_visible(m_col[:, None] & m_row[None, :], (t + shift)[None, :], cols[:, None], WL, WR,
                                 HAS_WL, HAS_WR)
        b_p = tl.where(visible, b_p, 0.)
    # [BN, BDV] @ [BDV, BM] -> [BN, BM]
    b_dp = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
    b_ds = b_p * (b_dp - b_delta[None, :])
    if SOFTCAP:
        b_ds = b_ds * (1. - b_th * b_th)
    # [BN, BM] @ [BM, BDV] -> [BN, BDV]; [BN, BM] @ [BM, BD] -> [BN, BD]
    b_dv += tl.dot(b_p.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
    if NORM != 0:
        b_ds = b_ds * r_q[None, :]
    b_dk += tl.dot(b_ds.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)
    return b_dk, b_dv


@triton.heuristics({name: _HEURISTICS[name] for name in ("HAS_SCALE_TENSOR", "IS_VARLEN", "EVEN_D", "EVEN_DV")})
@triton.autotune(configs=bwd_configs("BM"),
                 key=["BD", "BDV", "G", "HAS_WL", "HAS_WR", "NORM", "SOFTCAP", "BN", "LEN_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_bwd_dkdv})
@triton.jit(do_not_specialize=["T", "S", "N", "WL", "WR", "LEN_BUCKET"])
def _attention_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv, rq, rk, scale_ptr, cu_seqlens_q, cu_seqlens_k, scale, softcap, eps,
    T, S, N, WL, WR, LEN_BUCKET,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, NORM: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, IS_VARLEN: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
):
    # program = (batch row x KV head, block of BN keys); loops over the packed query rows that
    # see them, so dk/dv are summed over the group's G query heads here. With a norm and weights,
    # `q` is x_q ⊙ w_q ⊙ w_k (from `norm_prep`), `rq` the queries' rstd, and dk is dL/d(x_k·r_k).
    i_bh, i_nb = program_block(S, N, 1, BN, False, IS_VARLEN)
    i_b, i_hk = i_bh // HK, i_bh % HK
    if IS_VARLEN:
        i_n, i_nb = find_block(cu_seqlens_k, i_nb, N, 1, BN)
    else:
        i_n = i_b
    bos, t_len, bos_k, s_len = seq_bounds(cu_seqlens_q, cu_seqlens_k, i_n, T, S, IS_VARLEN)
    if i_nb * BN >= s_len:
        return
    scale = load_scale(scale, scale_ptr, HAS_SCALE_TENSOR)
    sc1, sc2 = logit_scales(scale, softcap, SOFTCAP)
    t_len = t_len.to(tl.int32)
    s_len = s_len.to(tl.int32)
    c0 = (i_nb * BN).to(tl.int32)
    cols = c0 + tl.arange(0, BN)
    m_col = cols < s_len
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_d, m_dv = o_d < D, o_dv < DV
    q_base = q + i_b * s_qb + bos * s_qt
    k_base = k + i_b * s_kb + bos_k * s_kt + i_hk * s_kh
    v_base = v + i_b * s_vb + bos_k * s_vt + i_hk * s_vh
    do_base = do + (i_b * T + bos) * H * DV
    lse_base = lse + i_b * H * T + bos
    delta_base = delta + i_b * H * T + bos
    rq_base = lse_base  # unused without a norm
    if NORM != 0:
        rq_base = rq + (i_b * T + bos) * H

    # [BN, BD] raw keys, [BN, BDV]; the per-key logit scale [BN, 1]
    o_n = tl.arange(0, BN)
    b_k = load_tile(k_base + tl.cast(c0, tl.int64) * s_kt, o_n, o_d, m_col, m_d, s_kt, s_kd, True, EVEN_D)
    b_v = load_tile(v_base + tl.cast(c0, tl.int64) * s_vt, o_n, o_dv, m_col, m_dv, s_vt, s_vd, True, EVEN_DV)
    if NORM != 0:
        r_k = tl.load(rk + ((i_b * S + bos_k + cols) * HK + i_hk), mask=m_col, other=0.)
        b_rs = (sc1 * r_k)[:, None]
    else:
        r_k = m_col.to(tl.float32)
        b_rs = sc1

    # packed query rows that see keys [c0, c1]
    shift = s_len - t_len
    c1 = tl.minimum(s_len - 1, c0 + BN - 1)
    lo, lo_full, hi, hi_full = query_range(c0, c1, shift, t_len, WL, WR, HAS_WL, HAS_WR)
    a, u0, u1, b = tile_split(lo * G, lo_full * G, hi * G, hi_full * G, BM)

    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BDV], dtype=tl.float32)
    for r0 in range(a, u0, BM):
        b_dk, b_dv = _dkdv_tile(b_dk, b_dv, b_k, b_v, b_rs, q_base, rq_base, do_base, lse_base, delta_base, r0, cols, m_col,
                                shift, t_len, sc2, WL, WR, i_hk, o_d, m_d, o_dv, m_dv, s_qt, s_qh, s_qd, T, H, G, DV,
                                BM, True, HAS_WL, HAS_WR, NORM, SOFTCAP, EVEN_D, EVEN_DV, DOT_PRECISION)
    for r0 in range(u0, u1, BM):
        b_dk, b_dv = _dkdv_tile(b_dk, b_dv, b_k, b_v, b_rs, q_base, rq_base, do_base, lse_base, delta_base, r0, cols, m_col,
                                shift, t_len, sc2, WL, WR, i_hk, o_d, m_d, o_dv, m_dv, s_qt, s_qh, s_qd, T, H, G, DV,
                                BM, False, HAS_WL, HAS_WR, NORM, SOFTCAP, EVEN_D, EVEN_DV, DOT_PRECISION)
    for r0 in range(u1, b, BM):
        b_dk, b_dv = _dkdv_tile(b_dk, b_dv, b_k, b_v, b_rs, q_base, rq_base, do_base, lse_base, delta_base, r0, cols, m_col,
                                shift, t_len, sc2, WL, WR, i_hk, o_d, m_d, o_dv, m_dv, s_qt, s_qh, s_qd, T, H, G, DV,
                                BM, True, HAS_WL, HAS_WR, NORM, SOFTCAP, EVEN_D, EVEN_DV, DOT_PRECISION)

    # dv first: its registers are free before the norm's backward needs a float32 tile
    p_kv = (i_b * S + bos_k + cols) * HK + i_hk
    tl.store(dv + p_kv[:, None] * DV + o_dv[None, :], b_dv.to(dv.dtype.element_ty),
             mask=m_col[:, None] & m_dv[None, :])
    b_dk = b_dk * scale
    if NORM != 0:
        # dL/dy_k with y_k = x_k·r_k (w_k lives on the query side): the unweighted norm backward.
        # The raw keys are read again rather than kept in registers through the loop (the
        # products read them from shared memory; holding them spilled at D = 128)
        b_xk = load_tile(k_base + tl.cast(c0, tl.int64) * s_kt, o_n, o_d, m_col, m_d, s_kt, s_kd, True, EVEN_D)
        b_dk, _ = row_norm_bwd_x(b_dk, b_xk, r_k, k_base, o_d, m_d, D, NORM, False)
    tl.store(dk + p_kv[:, None] * D + o_d[None, :], b_dk.to(dk.dtype.element_ty), mask=m_col[:, None] & m_d[None, :])


@triton.jit
def _dq_tile(b_acc, b_dsr, b_dss, b_pr, b_q, r_q, b_do, b_lse2, b_delta, k_base, v_base, rk_base, n0, q_pos, m_row,
             s_len, sc1, sc2, WL, WR, o_d, m_d, o_dv, m_dv, s_kt, s_kd, s_vt, s_vd, HK,
             BN: tl.constexpr, MASK: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
             NORM: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SCALE_TENSOR: tl.constexpr,
             EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile for the resident query rows: accumulates Σ_j dz_j·(r_j x_j) (dz = dL/dz,
    z = scale·q̂·k̂ the logits before the cap) and the three tensor-scale row sums."""
    # raw = q̂·k̂ (with a norm, r_q·r_k scale the product of the operands)
    b_raw, b_k, b_v, r_k, cols, m_col = _kv_tile_logits(b_q, r_q, k_base, v_base, k_base, v_base, rk_base, n0, s_len, o_d, m_d,
                                                        o_dv, m_dv, s_kt, s_kd, s_vt, s_vd, HK, BN, MASK, NORM,
                                                        EVEN_D, EVEN_DV, DOT_PRECISION, False)
    b_s = b_raw * sc1
    if SOFTCAP:
        b_th = tanh(b_s)
        b_s = b_th * sc2
    if MASK:
        # masked before exp2 (the mask dies here); b_lse2 is finite (rows without keys: 0)
        visible = window_visible(m_col[None, :] & m_row[:, None], q_pos[:, None], cols[None, :], WL, WR,
                                 HAS_WL, HAS_WR)
        b_s = tl.where(visible, b_s, float("-inf"))
    b_p = tl.exp2(b_s - b_lse2[:, None])
    if SOFTCAP and not HAS_SCALE_TENSOR:
        # only dz = p·z'·(dp - delta) is needed: fold the cap's derivative z' = 1 - tanh² into p
        # before the dp product, so one [BM, BN] float32 tile (not p and tanh) lives across it
        # (window + softcap, D = 128, BN=64 w8s2 spilled 16 B on sm_90 with both alive)
        b_p = b_p * (1. - b_th * b_th)
    # [BM, BDV] @ [BDV, BN] -> [BM, BN]
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
    b_ds = b_p * (b_dp - b_delta[:, None])
    b_dz = b_ds
    if SOFTCAP and HAS_SCALE_TENSOR:
        b_dz = b_ds * (1. - b_th * b_th)
    if HAS_SCALE_TENSOR:
        if MASK:
            b_raw = tl.where(visible, b_raw, 0.)
        b_dsr += tl.sum(b_dz * b_raw, 1)
        b_dss += tl.sum(b_ds, 1)
        if SOFTCAP:
            b_pr += tl.sum(b_p * (1. - b_th * b_th) * b_raw, 1)
        else:
            b_pr += tl.sum(b_p * b_raw, 1)
    if NORM != 0:
        b_dz = b_dz * r_k[None, :]
    # [BM, BN] @ [BN, BD] -> [BM, BD]
    b_acc += tl.dot(b_dz.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)
    return b_acc, b_dsr, b_dss, b_pr


@triton.heuristics({**_HEURISTICS, "HAS_DLSE": lambda args: args["dlse"] is not None,
                    "HAS_QOP": lambda args: args["qop"] is not None})
@triton.autotune(configs=bwd_configs("BN"),
                 key=["BD", "BDV", "G", "HAS_WL", "HAS_WR", "NORM", "SOFTCAP", "BM", "LEN_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_bwd_dq})
@triton.jit(do_not_specialize=["T", "S", "N", "WL", "WR", "LEN_BUCKET"])
def _attention_bwd_dq_kernel(
    q, k, v, do, lse, delta, dlse, dq, qop, rq, rk, dqw_part, dkw_part, dscale_part, scale_ptr, q_w, k_w,
    cu_seqlens_q, cu_seqlens_k, scale, softcap, eps, T, S, N, WL, WR, LEN_BUCKET,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd,
    H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, NORM: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr,
    IS_VARLEN: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, HAS_DLSE: tl.constexpr,
    HAS_QOP: tl.constexpr,
):
    # program = (batch row x KV head, block of BM packed query rows), as in the forward. It also
    # writes the partials of both norm weights' gradients and of the tensor scale's: per row,
    # dscale = Σ_j dz_j raw_j + (dlse - Σ_j ds_j) · Σ_j p_j z'_j raw_j (raw = q̂·k̂, z' = dcap/dz):
    # the second term removes the error of `delta`, whose rowsum(dO ⊙ O) uses the rounded output
    # (exact arithmetic gives Σ_j ds_j = dlse).
    i_bh, i_m = program_block(T, N, G, BM, HAS_WR, IS_VARLEN)
    i_b, i_hk = i_bh // HK, i_bh % HK
    if IS_VARLEN:
        i_n, i_m = find_block(cu_seqlens_q, i_m, N, G, BM)
    else:
        i_n = i_b
    bos, t_len, bos_k, s_len = seq_bounds(cu_seqlens_q, cu_seqlens_k, i_n, T, S, IS_VARLEN)
    if i_m * BM >= t_len * G:
        return
    scale = load_scale(scale, scale_ptr, HAS_SCALE_TENSOR)
    sc1, sc2 = logit_scales(scale, softcap, SOFTCAP)
    t_len = t_len.to(tl.int32)
    s_len = s_len.to(tl.int32)
    rows_start = (i_m * BM).to(tl.int32)
    rows = rows_start + tl.arange(0, BM)
    t = rows // G
    h = (i_hk * G).to(tl.int32) + rows % G
    m_row = t < t_len
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_d, m_dv = o_d < D, o_dv < DV
    q_base = q + i_b * s_qb + bos * s_qt
    k_base = k + i_b * s_kb + bos_k * s_kt + i_hk * s_kh
    v_base = v + i_b * s_vb + bos_k * s_vt + i_hk * s_vh
    rk_base = k_base  # unused without a norm
    if NORM != 0:
        rk_base = rk + (i_b * S + bos_k) * HK + i_hk

    # [BM, BD] query operand and r_q as in the forward (pre-pass: `qop` contiguous x_q ⊙ w_q ⊙ w_k
    # when weights exist, `rq`), [BM, BDV], [BM]
    p_row = (i_b * T + bos + t) * H + h
    if HAS_QOP:
        b_q = tl.load(qop + p_row.to(tl.int64)[:, None] * D + o_d[None, :], mask=m_row[:, None] & m_d[None, :],
                      other=0.)
    else:
        b_q = load_rows(q_base, t.to(tl.int64), h, o_d, m_row, m_d, s_qt, s_qh, s_qd)
    r_q = sc1  # unused without a norm
    if NORM != 0:
        r_q = tl.load(rq + p_row, mask=m_row, other=0.)
    b_do = tl.load(do + p_row[:, None] * DV + o_dv[None, :], mask=m_row[:, None] & m_dv[None, :], other=0.)
    p_lse = (i_b * H + h) * T + bos + t
    b_lse2 = tl.load(lse + p_lse, mask=m_row, other=0.) * 1.4426950408889634
    # a row that sees no key (lse = -inf) only meets masked tiles, where every logit is -inf:
    # a finite lse there gives p = exp2(-inf) = 0 (not exp2(-inf + inf) = NaN)
    b_lse2 = tl.where(b_lse2 == float("-inf"), 0., b_lse2)
    b_delta = tl.load(delta + p_lse, mask=m_row, other=0.)

    shift = s_len - t_len
    t0 = rows_start // G
    t1 = tl.minimum(t_len - 1, (rows_start + BM - 1) // G)
    lo, lo_full, hi, hi_full = key_range(t0, t1, shift, s_len, WL, WR, HAS_WL, HAS_WR)
    a, u0, u1, b = tile_split(lo, lo_full, hi, hi_full, BN)
    q_pos = t + shift

    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    b_dsr = tl.zeros([BM], dtype=tl.float32)  # Σ_j dz_j raw_j
    b_dss = tl.zeros([BM], dtype=tl.float32)  # Σ_j ds_j
    b_pr = tl.zeros([BM], dtype=tl.float32)  # Σ_j p_j z'_j raw_j
    for n0 in range(a, u0, BN):
        b_acc, b_dsr, b_dss, b_pr = _dq_tile(
            b_acc, b_dsr, b_dss, b_pr, b_q, r_q, b_do, b_lse2, b_delta, k_base, v_base, rk_base, n0, q_pos, m_row,
            s_len, sc1, sc2, WL, WR, o_d, m_d, o_dv, m_dv, s_kt, s_kd, s_vt, s_vd, HK, BN, True, HAS_WL, HAS_WR,
            NORM, SOFTCAP, HAS_SCALE_TENSOR, EVEN_D, EVEN_DV, DOT_PRECISION)
    for n0 in range(u0, u1, BN):
        b_acc, b_dsr, b_dss, b_pr = _dq_tile(
            b_acc, b_dsr, b_dss, b_pr, b_q, r_q, b_do, b_lse2, b_delta, k_base, v_base, rk_base, n0, q_pos, m_row,
            s_len, sc1, sc2, WL, WR, o_d, m_d, o_dv, m_dv, s_kt, s_kd, s_vt, s_vd, HK, BN, False, HAS_WL, HAS_WR,
            NORM, SOFTCAP, HAS_SCALE_TENSOR, EVEN_D, EVEN_DV, DOT_PRECISION)
    for n0 in range(u1, b, BN):
        b_acc, b_dsr, b_dss, b_pr = _dq_tile(
            b_acc, b_dsr, b_dss, b_pr, b_q, r_q, b_do, b_lse2, b_delta, k_base, v_base, rk_base, n0, q_pos, m_row,
            s_len, sc1, sc2, WL, WR, o_d, m_d, o_dv, m_dv, s_kt, s_kd, s_vt, s_vd, HK, BN, True, HAS_WL, HAS_WR,
            NORM, SOFTCAP, HAS_SCALE_TENSOR, EVEN_D, EVEN_DV, DOT_PRECISION)

    i_prog = tl.program_id(0).to(tl.int64)
    if HAS_SCALE_TENSOR:
        b_fix = -b_dss
        if HAS_DLSE:
            b_fix += tl.load(dlse + p_lse, mask=m_row, other=0.)
        tl.store(dscale_part + i_prog, tl.sum(b_dsr + b_fix * b_pr, 0))
    if NORM != 0:
        # dL/dq̂ = scale · w_k ⊙ acc; dL/dw_k = scale · Σ_rows acc ⊙ q̂ (q̂ = x_q·r_q ⊙ w_q);
        # the raw queries are read again here rather than kept through the loop
        b_wq = load_weight(q_w, o_d, m_d, HAS_QW)
        b_wk = load_weight(k_w, o_d, m_d, HAS_KW)
        b_xq = load_rows(q_base, t.to(tl.int64), h, o_d, m_row, m_d, s_qt, s_qh, s_qd)
        # the norm backward of `row_norm_bwd_x` with g·w_q = scale · acc ⊙ w_k ⊙ w_q formed in place
        b_gy = b_acc * (b_wk * b_wq * scale)[None, :]
        b_c = tl.sum(b_gy * b_xq.to(tl.float32), 1) * r_q
        if NORM == 1:
            b_c = b_c / D
        b_dq = r_q[:, None] * (b_gy - b_xq.to(tl.float32) * (r_q * b_c)[:, None])
        tl.store(dq + p_row[:, None] * D + o_d[None, :], b_dq.to(dq.dtype.element_ty),
                 mask=m_row[:, None] & m_d[None, :])
        if HAS_QW or HAS_KW:
            # after dq is stored (registers): both weight gradients share Σ_rows acc ⊙ y_q
            # (y_q = x_q·r_q): dw_k = scale·w_q ⊙ it, dw_q = scale·w_k ⊙ it (one column sum)
            b_cs = tl.sum(b_acc * b_xq.to(tl.float32) * r_q[:, None], 0) * scale
            if HAS_KW:
                tl.store(dkw_part + i_prog * D + o_d, b_cs * b_wq, mask=m_d)
            if HAS_QW:
                tl.store(dqw_part + i_prog * D + o_d, b_cs * b_wk, mask=m_d)
    else:
        tl.store(dq + p_row[:, None] * D + o_d[None, :], (b_acc * scale).to(dq.dtype.element_ty),
                 mask=m_row[:, None] & m_d[None, :])


# -------------------------------------------------------------------------------- host launchers


def window_bounds(window: tuple[int, int], causal: bool) -> tuple[int, int]:
    """`(WL, WR)` with -1 for an unbounded side; causal masking is the right bound 0 (a key past
    the query's position is never seen, whatever `window[1]` allows)."""
    left, right = (int(window[0]), int(window[1])) if window is not None else (-1, -1)
    left = left if left >= 0 else -1
    right = right if right >= 0 else -1
    if causal:
        right = 0
    return left, right


def _common_args(q, k, v, scale, softcap, q_w, k_w, eps, cu_q, cu_k, window, norm):
    B, T, H, D = q.shape
    S, HK, DV = k.shape[1], k.shape[2], v.shape[3]
    tensor_scale = isinstance(scale, torch.Tensor)
    wl, wr = window
    return dict(
        q=q, k=k, v=v, scale_ptr=scale if tensor_scale else None, q_w=q_w, k_w=k_w,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, scale=0.0 if tensor_scale else float(scale),
        softcap=float(softcap), eps=float(eps), T=T, S=S, N=q.shape[0] if cu_q is None else cu_q.numel() - 1,
        WL=max(wl, 0), WR=max(wr, 0), LEN_BUCKET=len_bucket(max(T, S)),
        **dict(zip(("s_qb", "s_qt", "s_qh", "s_qd"), strides4(q))),
        **dict(zip(("s_kb", "s_kt", "s_kh", "s_kd"), strides4(k))),
        **dict(zip(("s_vb", "s_vt", "s_vh", "s_vd"), strides4(v))),
        H=H, HK=HK, G=H // HK, D=D, DV=DV, BD=head_block(D), BDV=head_block(DV),
        NORM=NORMS[norm], HAS_WL=wl >= 0, HAS_WR=wr >= 0, SOFTCAP=softcap > 0,
        DOT_PRECISION=dot_precision(q))


def _row_blocks(n_rows: int, n_seq: int | None, block: int) -> int:
    """Row blocks per batch row: `cdiv(rows, block)`, or the varlen schedule's count."""
    if n_seq is None:
        return triton.cdiv(n_rows, block)
    return n_rows // block + n_seq


def attention_fwd(q, k, v, *, causal: bool, scale: float | torch.Tensor, norm: str | None,
                  q_w: torch.Tensor | None, k_w: torch.Tensor | None, eps: float,
                  cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                  window: tuple[int, int] = (-1, -1), softcap: float = 0.0):
    """Runs the forward kernel (no autograd). Any strides are accepted.

    Returns `o [B, T, H, DV]` (q's dtype, contiguous), `lse [B, H, T]` float32 (natural log) and
    the rstd of the queries `[B, T, H]` and keys `[B, S, Hk]` (float32; None without a norm),
    which the backward reuses.
    """
    B, T, H, _ = q.shape
    HK, DV = k.shape[2], v.shape[3]
    G = H // HK
    o = torch.empty(B, T, H, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    rq = rk = None
    q_op = {}
    if norm is not None:
        # QK-norm pre-pass: r_k once per key, r_q once per query and, with weights, the query
        # operand x_q ⊙ w_q ⊙ w_k (one rounding; without weights the operand is q itself)
        rk = norm_prep(k, norm, eps)[0]
        rq, qn = norm_prep(q, norm, eps, q_w, k_w, write_y=q_w is not None or k_w is not None)
        if qn is not None:
            q_op = dict(q=qn, **dict(zip(("s_qb", "s_qt", "s_qh", "s_qd"), strides4(qn))))
    if o.numel() == 0:
        return o, lse.fill_(float("-inf")), rq, rk
    n_seq = None if cu_seqlens_q is None else cu_seqlens_q.numel() - 1

    def grid(meta):
        return (_row_blocks(T * G, n_seq, meta["BM"]) * B * HK,)

    with device_guard(q):
        args = _common_args(q, k, v, scale, softcap, q_w, k_w, eps, cu_seqlens_q, cu_seqlens_k,
                            window_bounds(window, causal), norm)
        def launch():
            _attention_fwd_kernel[grid](o=o, lse=lse, rq=rq, rk=rk, **{**args, **q_op})

        if q.is_cuda and use_tma(k, v):
            _launch_with_scratch(launch)
        else:
            launch()
    return o, lse, rq, rk


def attention_bwd(q, k, v, o, lse, do, dlse, *, causal: bool, scale: float | torch.Tensor, norm: str | None,
                  q_w: torch.Tensor | None, k_w: torch.Tensor | None, eps: float,
                  cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                  window: tuple[int, int] = (-1, -1), softcap: float = 0.0, rq: torch.Tensor | None = None,
                  rk: torch.Tensor | None = None):
    """Runs the backward kernels (no autograd). `o`, `do` contiguous `[B, T, H, DV]`; `dlse`
    (`[B, H, T]` float32 contiguous) may be None; `rq`/`rk` are the forward's query/key rstd
    (recomputed when None and a norm is on).

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
    BD, BDV = head_block(D), head_block(DV)
    tile = bwd_outer_tile(BD, BDV, q.element_size())
    tile_k = bwd_dkdv_tile(tile, BD, BDV, _capability(q))
    n_seq = None if cu_seqlens_q is None else cu_seqlens_q.numel() - 1
    n_q = _row_blocks(T * G, n_seq, tile) * B * HK
    n_k = _row_blocks(S, n_seq, tile_k) * B * HK
    # per-program partials, zero where a program writes nothing (varlen padding, early exits)
    f32 = dict(device=q.device, dtype=torch.float32)
    dqw_part = torch.zeros(n_q, D, **f32) if norm is not None and q_w is not None else None
    dkw_part = torch.zeros(n_q, D, **f32) if norm is not None and k_w is not None else None
    dscale_part = torch.zeros(n_q, **f32) if tensor_scale else None
    if B == 0 or T == 0 or S == 0:
        # no visible key anywhere: every gradient is zero
        dq.zero_()
        dk.zero_()
        dv.zero_()
    else:
        delta = torch.empty(B, H, T, **f32)
        BT = 32 if interpreted() else 64
        wb = window_bounds(window, causal)
        common = _common_args(q, k, v, scale, softcap, q_w, k_w, eps, cu_seqlens_q, cu_seqlens_k, wb, norm)
        dkdv_q = {}
        qn = None
        if norm is not None:
            if rk is None:
                rk = norm_prep(k, norm, eps)[0]
            # the dk/dv kernel streams the query operand the forward used (x_q ⊙ w_q ⊙ w_k) and r_q
            has_w = q_w is not None or k_w is not None
            rq_new, qn = norm_prep(q, norm, eps, q_w, k_w, write_y=has_w) if rq is None or has_w else (None, None)
            rq = rq if rq is not None else rq_new
            if qn is not None:
                dkdv_q = dict(q=qn, **dict(zip(("s_qb", "s_qt", "s_qh", "s_qd"), strides4(qn))))
        dkdv_args = {**common, **dkdv_q}
        for name in ("q_w", "k_w"):
            dkdv_args.pop(name)
        with device_guard(q):
            _attention_bwd_preprocess_kernel[(triton.cdiv(T, BT), B * H)](
                o, do, dlse, delta, T, H=H, DV=DV, BDV=BDV, BT=BT)
            _attention_bwd_dkdv_kernel[(n_k,)](
                do=do, lse=lse, delta=delta, dk=dk, dv=dv, rq=rq, rk=rk, BN=tile_k, **dkdv_args)
            _attention_bwd_dq_kernel[(n_q,)](
                do=do, lse=lse, delta=delta, dlse=dlse, dq=dq, qop=qn, rq=rq, rk=rk, dqw_part=dqw_part, dkw_part=dkw_part,
                dscale_part=dscale_part, BM=tile, **common)
    dq_w = dqw_part.sum(0) if dqw_part is not None else None
    dk_w = dkw_part.sum(0) if dkw_part is not None else None
    dscale = dscale_part.sum() if dscale_part is not None else None
    return dq, dk, dv, dq_w, dk_w, dscale


# ------------------------------------------------------------------------------------- autograd


class AttentionFunction(torch.autograd.Function):
    """Autograd for the kernels above; outputs `(o, lse)`, both differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, scale_tensor, q_w, k_w, scale, causal, norm, eps, cu_seqlens_q, cu_seqlens_k,
                window, softcap):
        ctx.set_materialize_grads(False)
        o, lse, rq, rk = attention_fwd(
            q, k, v, causal=causal, scale=scale_tensor if scale_tensor is not None else scale, norm=norm,
            q_w=q_w, k_w=k_w, eps=eps, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            window=window, softcap=softcap)
        ctx.save_for_backward(q, k, v, o, lse, scale_tensor, q_w, k_w, cu_seqlens_q, cu_seqlens_k, rq, rk)
        ctx.scale = scale
        ctx.causal = causal
        ctx.norm = norm
        ctx.eps = eps
        ctx.window = window
        ctx.softcap = softcap
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, scale_tensor, q_w, k_w, cu_seqlens_q, cu_seqlens_k, rq, rk = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv, dq_w, dk_w, dscale = attention_bwd(
            q, k, v, o, lse, do.contiguous(), dlse.contiguous() if dlse is not None else None,
            causal=ctx.causal, scale=scale_tensor if scale_tensor is not None else ctx.scale,
            norm=ctx.norm, q_w=q_w, k_w=k_w, eps=ctx.eps, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            window=ctx.window, softcap=ctx.softcap, rq=rq, rk=rk)
        if dscale is not None:
            dscale = dscale.to(scale_tensor.dtype)
        if dq_w is not None:
            dq_w = dq_w.to(q_w.dtype)
        if dk_w is not None:
            dk_w = dk_w.to(k_w.dtype)
        return dq, dk, dv, dscale, dq_w, dk_w, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------ backend entry point


def attention(q, k, v, causal, scale, qk_norm, q_norm_weight, k_norm_weight, norm_eps,
              cu_seqlens_q, cu_seqlens_k, return_lse, window=(-1, -1), softcap=0.0):
    """Triton backend of `attnkit.attention` (see docs/contracts.md). `window=(left, right)`
    (-1 unbounded) and `softcap` (0.0 off) come normalised from the public op."""
    scale_tensor = scale if isinstance(scale, torch.Tensor) else None
    if qk_norm is None:
        q_norm_weight = k_norm_weight = None
    window = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    softcap = 0.0 if softcap is None else float(softcap)
    o, lse = AttentionFunction.apply(q, k, v, scale_tensor, q_norm_weight, k_norm_weight,
                                     None if scale_tensor is not None else scale, causal, qk_norm,
                                     norm_eps, cu_seqlens_q, cu_seqlens_k, window, softcap)
    return (o, lse) if return_lse else o
