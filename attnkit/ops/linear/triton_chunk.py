"""Host side of the chunked Triton kernels of linear attention and lightning attention.

The kernels (`triton_chunk_kernels.py`) are sequence parallel: every sequence is cut into segments
of `SEG` tokens, each segment's local state is computed in parallel, a short scan over segments
gives every segment its incoming state, and the output pass runs per segment from it. The
backward mirrors this with a reverse scan over the segments' state gradients. `SEG` is a power of
two chosen from the SM count so that every launch that walks tokens has at least `2 × SMs`
programs once the input is large enough (`segment_len`). The derivation and the launch plan are
in `docs/linear_attention.md`.

Host-side allocations: the outputs, the segment states `[NSEG, HS, Dk, Dv]` float32 (saved for the
backward: a `SEG`-th of a per-token state) and, for varlen, a small int32 segment table built on
the device (no host sync). Internal entry points for context parallelism: `local_state` (the state
contribution of a shard from a zero start, with decay) and `chunk_linear_fwd(..., h0=...)` (the
output pass with an incoming state).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton

from ..common.triton_utils import device_guard, dot_precision
from . import triton_chunk_kernels as kern
from .triton_chunk_kernels import FEATURE_MAPS, NORM_TILE_STATE_BUDGET, STATE_BUDGET, TILE_STATE_BUDGET

MIN_SEG = 256  # tokens: 4 chunks of 64, below that the scan over segments costs more than it gives
MAX_SEG = 8192
_SCAN_BLOCK = 1024
_seg_override: int | None = None


def sm_count(device: torch.device | None = None) -> int:
    """SMs of `device` (`ATTNKIT_SM_COUNT` overrides; 132, an H100, without CUDA)."""
    try:
        from ...tools import sm_count as shared
    except ImportError:
        shared = None
    if shared is not None:
        return shared(device)
    env = os.environ.get("ATTNKIT_SM_COUNT")
    if env:
        return int(env)
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


@contextlib.contextmanager
def force_segment_len(n: int | None):
    """Test hook: every launch in the block uses segments of `n` tokens (any n >= 1)."""
    global _seg_override
    old, _seg_override = _seg_override, n
    try:
        yield
    finally:
        _seg_override = old


def segment_len(total_tokens: int, state_heads: int, sms: int) -> int:
    """Tokens per segment: the largest power of two (within [MIN_SEG, MAX_SEG]) that still gives
    `2 × sms` (segment, state head) programs. Fewer tokens per segment than that only lengthens
    the scan; more would leave SMs idle. At a fixed number of tokens per call it does not depend on
    how they split into sequences, so throughput stays flat in T."""
    if _seg_override is not None:
        return _seg_override
    per_program = max(1, total_tokens * state_heads // (2 * sms))
    seg = 1 << (per_program.bit_length() - 1)  # round down: at least 2 × sms programs
    return min(max(seg, MIN_SEG), MAX_SEG)


@dataclass
class SegmentPlan:
    """How the token axis is cut: `SEG` tokens per segment, `NS` segments per sequence (fixed
    length) or the device tables `seg_info [M, 2]` (sequence, index; -1 = spare) and `seg_cu [N+1]`
    (varlen); `nseg` is the number of segment slots (grid axis 0)."""
    SEG: int
    NS: int
    nseg: int
    seg_info: torch.Tensor | None
    seg_cu: torch.Tensor | None


def plan_segments(q: torch.Tensor, N: int, state_heads: int, cu_seqlens: torch.Tensor | None,
                  seg: int | None = None) -> SegmentPlan:
    B, T = q.shape[:2]
    SEG = seg if seg is not None else segment_len(B * T, state_heads, sm_count(q.device))
    if cu_seqlens is None:
        NS = triton.cdiv(T, SEG)
        return SegmentPlan(SEG, NS, N * NS, None, None)
    # Σ_n ceil(len_n / SEG) <= T // SEG + N slots; built with device ops only (no host sync)
    cu = cu_seqlens.to(torch.int64)
    counts = (cu[1:] - cu[:-1] + SEG - 1) // SEG
    seg_cu = torch.zeros(N + 1, dtype=torch.int64, device=q.device)
    seg_cu[1:] = torch.cumsum(counts, 0)
    M = T // SEG + N
    slot = torch.arange(M, dtype=torch.int64, device=q.device)
    i_n = torch.searchsorted(seg_cu[1:], slot, right=True)
    valid = i_n < N
    i_g = slot - seg_cu[i_n.clamp(max=N - 1)]
    info = torch.stack([torch.where(valid, i_n, 0), torch.where(valid, i_g, -1)], 1).to(torch.int32)
    return SegmentPlan(SEG, 0, M, info.contiguous(), seg_cu.to(torch.int32))


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _blocks_dv_split(K: int, V: int, budget: int = TILE_STATE_BUDGET) -> tuple[int, int]:
    """Dk whole, Dv split so the `[BK, BV]` state block fits: for o, dv and the state passes."""
    BK = _pow2(K)
    return BK, min(_pow2(V), max(16, budget // BK))


def _blocks_dk_split(K: int, V: int, budget: int = TILE_STATE_BUDGET) -> tuple[int, int]:
    """Dv whole, Dk split: for dq and dk (they sum over Dv)."""
    BV = _pow2(V)
    return min(_pow2(K), max(16, budget // BV)), BV


def _tile_budget(normalize: bool, grouped: bool = False, K: int = 0, V: int = 0) -> int:
    """State elements per program in the token-tile passes (output, dq, dk, dv): `[128, 32]` with
    normalize, for lightning GQA's grouped dk/dv and for head dims over 128 (ptxas on sm_90:
    `[128, 64]` spills there), else `[128, 64]`."""
    small = normalize or grouped or max(_pow2(K), _pow2(V)) > 128
    return NORM_TILE_STATE_BUDGET if small else TILE_STATE_BUDGET


def _narrow_dv(BV: int, grouped: bool) -> int:
    """Dv columns of the dv pass's `[BK, BV]` state block beyond the budget: below triton 3.9
    (`kern.old_triton()`, ptxas 12.8) lightning GQA's grouped dv takes at most 32 (`[64, 64]`
    spilled 68-104 B at D = 64 with 2 and 3 stages; `[64, 32]` none)."""
    return min(BV, 32) if grouped and kern.old_triton() else BV


def _dims(q, k, v, cu_seqlens):
    B, T, H, K = q.shape
    HK, V = k.shape[2], v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    return B, T, H, HK, K, V, N


def _scan(hs, h0, ht, decay, plan: SegmentPlan, cu_seqlens, T, N, HS, D, reverse, zs=None, z0=None, zt=None):
    """In place over the segment slots (and the normaliser slots `zs`, `[.., HS, DZ]`, in the same
    launch); see `_segment_scan_kernel`."""
    if N == 0 or HS == 0 or (D == 0 and zs is None):
        return
    # smaller element blocks until the launch has 2 x SMs programs (the scan is latency bound)
    block, want = _SCAN_BLOCK, 2 * sm_count(hs.device)
    while block > 64 and triton.cdiv(D, block) * N * HS < want:
        block //= 2
    DZ = zs.shape[-1] if zs is not None else 0
    grid = (max(1, triton.cdiv(D, block)), N, HS)
    kern._segment_scan_kernel[grid](hs, h0, ht, zs, z0, zt, decay, plan.seg_cu, cu_seqlens, T, plan.NS, plan.SEG,
                                    HS=HS, D=D, DZ=DZ, BLOCK=block, BZ=_pow2(max(DZ, 1)), REVERSE=reverse,
                                    num_warps=4)


def local_state(k: torch.Tensor, v: torch.Tensor, *, decay: torch.Tensor | None, feature_map: str | None,
                normalize: bool, state_heads: int, plan: SegmentPlan, cu_seqlens: torch.Tensor | None):
    """Local state of every segment from a zero start, `Σ_j λ^(n-1-j) φ(k_j)ᵀ v_j` (and `Σ_j φ(k_j)`):
    `[nseg, HS, Dk, Dv]` float32 (and `[nseg, HS, Dk]`). With one segment per sequence
    (`plan_segments(..., seg=T)`) this is the state contribution of a whole shard: the state after
    it is `λ^T S_in + local`. For context parallelism (`attnkit.distributed`)."""
    B, T, HK, K = k.shape
    V = v.shape[-1]
    HS = state_heads
    hs = k.new_empty(plan.nseg, HS, K, V, dtype=torch.float32)
    zs = k.new_empty(plan.nseg, HS, K, dtype=torch.float32) if normalize else None
    if plan.nseg == 0 or HS == 0:
        return hs, zs
    BK, BV = _blocks_dv_split(K, V, STATE_BUDGET)
    grid = (plan.nseg, HS, triton.cdiv(K, BK) * triton.cdiv(V, BV))
    with device_guard(k):
        kern._segment_state_kernel[grid](
            k, v, hs, zs, decay, plan.seg_info, cu_seqlens, T, plan.NS, plan.SEG, HK=HK, HS=HS, K=K, V=V,
            BK=BK, BV=BV, FEATURE_MAP=FEATURE_MAPS[feature_map], NORMALIZE=normalize,
            DOT_PRECISION=dot_precision(k))
    return hs, zs


def chunk_linear_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, decay: torch.Tensor | None,
                     scale: float, eps: float, feature_map: str | None, normalize: bool, causal: bool,
                     state_heads: int, h0: torch.Tensor | None, z0: torch.Tensor | None,
                     output_final_state: bool, cu_seqlens: torch.Tensor | None, keep_fp32_output: bool,
                     plan: SegmentPlan | None = None):
    """Runs the chunked forward (no autograd). Inputs contiguous, states float32 contiguous.

    Returns `(o, ht, zt, den, s_in, z_in, plan)`: `o [B, T, H, V]` (float32 when
    `keep_fp32_output`, else q's dtype), final states (or None), the normaliser `den [B, T, H]`
    (float32, with `normalize`), the states the output pass started from (causal: each segment's
    incoming state `[nseg, HS, ...]`; non-causal: the sequence totals `[N, HS, ...]`) and the plan.
    """
    B, T, H, HK, K, V, N = _dims(q, k, v, cu_seqlens)
    HS = state_heads
    # sized for the launch with the fewest heads: lightning GQA's dk/dv runs one program per KV head
    plan = plan if plan is not None else plan_segments(q, N, min(HS, HK), cu_seqlens)
    o = torch.empty(B, T, H, V, device=q.device, dtype=torch.float32 if keep_fp32_output else q.dtype)
    den = torch.empty(B, T, H, device=q.device, dtype=torch.float32) if normalize else None
    need_states = output_final_state or not causal
    ht = q.new_empty(N, HS, K, V, dtype=torch.float32) if need_states else None
    zt = q.new_empty(N, HS, K, dtype=torch.float32) if need_states and normalize else None
    fm = FEATURE_MAPS[feature_map]
    with device_guard(q):
        # 1. local states, 2. scan: slots become incoming states, the run ends as the final state
        hs, zs = local_state(k, v, decay=decay, feature_map=feature_map, normalize=normalize, state_heads=HS,
                             plan=plan, cu_seqlens=cu_seqlens)
        _scan(hs, h0, ht, decay, plan, cu_seqlens, T, N, HS, K * V, False, zs, z0, zt)
        # 3. output per segment from its incoming state (non-causal: from the totals)
        s_in, z_in = (hs, zs) if causal else (ht, zt)
        if plan.nseg and HS:
            BK, BV = _blocks_dv_split(K, V, _tile_budget(normalize, False, K, V))
            grid = (plan.nseg, HS, triton.cdiv(V, BV))
            kern._segment_output_kernel[grid](
                q, k, v, o, den, decay, s_in, z_in, plan.seg_info, cu_seqlens, scale, eps, T, plan.NS, plan.SEG,
                H=H, HK=HK, HS=HS, K=K, V=V, BK=BK, BV=BV, FEATURE_MAP=fm, NORMALIZE=normalize, CAUSAL=causal,
                STATE_PER_SEQ=not causal, DOT_PRECISION=dot_precision(q))
    if not output_final_state:
        ht = zt = None
    return o, ht, zt, den, s_in, z_in, plan


def chunk_linear_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
                     dht: torch.Tensor | None, dzt: torch.Tensor | None, *, decay: torch.Tensor | None,
                     scale: float, feature_map: str | None, normalize: bool, causal: bool,
                     state_heads: int, o: torch.Tensor | None, den: torch.Tensor | None,
                     s_in: torch.Tensor | None, z_in: torch.Tensor | None, plan: SegmentPlan,
                     cu_seqlens: torch.Tensor | None, need_dh0: bool):
    """Runs the chunked backward (no autograd). `o` is the output (only with `normalize`);
    `s_in`, `z_in`, `plan` come from `chunk_linear_fwd`.

    Returns `(dq, dk, dv, dh0, dz0)` in the dtypes of q/k/v and float32 states.
    """
    B, T, H, HK, K, V, N = _dims(q, k, v, cu_seqlens)
    HS = state_heads
    fm = FEATURE_MAPS[feature_map]
    # dd = -(do·o)/d per token and query head, written by the first pass (`_segment_dstate_kernel`)
    delta = q.new_empty(B, T, H, dtype=torch.float32) if normalize else None
    fp32 = torch.float32
    # lightning GQA (a state per query head, H > Hk): one dk/dv program per KV head sums its
    # group's GPS = H / Hk state heads in the kernel
    GPS = HS // HK if HS == H and H > HK else 1
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    want_dh0 = need_dh0 or not causal
    dh0 = q.new_empty(N, HS, K, V, dtype=fp32) if want_dh0 else None
    dz0 = q.new_empty(N, HS, K, dtype=fp32) if normalize and want_dh0 else None
    common = dict(scale=scale, T=T, NS=plan.NS, SEG=plan.SEG, H=H, HS=HS, K=K, V=V, FEATURE_MAP=fm,
                  NORMALIZE=normalize, DOT_PRECISION=dot_precision(q))
    run = plan.nseg > 0 and HS > 0
    with device_guard(q):
        # 1. local state gradients, 2. reverse scan: slots become the gradient after each segment
        dhs = q.new_empty(plan.nseg, HS, K, V, dtype=fp32)
        dzs = q.new_empty(plan.nseg, HS, K, dtype=fp32) if normalize else None
        if run:
            BK, BV = _blocks_dv_split(K, V, STATE_BUDGET)
            grid = (plan.nseg, HS, triton.cdiv(K, BK) * triton.cdiv(V, BV))
            kern._segment_dstate_kernel[grid](q, do, o, den, delta, dhs, dzs, decay, plan.seg_info, cu_seqlens,
                                              BK=BK, BV=BV, **common)
        _scan(dhs, dht, dh0, decay, plan, cu_seqlens, T, N, HS, K * V, True, dzs, dzt, dz0)
        if run:
            # 3. dq from each segment's incoming state (non-causal: the totals)
            budget = _tile_budget(normalize, False, K, V)
            # with normalize the Dv-whole passes (dq, dk) take [Dv, 16]-wide state blocks at
            # D = 128 (ptxas on sm_90: 80-100 B of spills at 32), dv at most 32 Dv columns; the
            # grouped (lightning GQA) dk likewise
            nb = budget // 2 if normalize else budget
            BK, BV = _blocks_dk_split(K, V, nb)
            grid = (plan.nseg, HS, triton.cdiv(K, BK))
            kern._segment_dq_kernel[grid](q, k, v, do, den, delta, dq, decay, s_in, z_in, plan.seg_info,
                                          cu_seqlens, HK=HK, BK=BK, BV=BV, CAUSAL=causal,
                                          STATE_PER_SEQ=not causal, **common)
            # 4. dk/dv from the gradient after each segment (non-causal: the total gradient = dh0)
            g_in, gz_in = (dhs, dzs) if causal else (dh0, dz0)
            args = (q, k, v, do, den, delta)
            tail = dict(decay=decay, gin=g_in, gzin=gz_in, seg_info=plan.seg_info, cu_seqlens=cu_seqlens,
                        HK=HK, GPS=GPS, CAUSAL=causal, STATE_PER_SEQ=not causal, **common)
            heads = HS // GPS
            budget = _tile_budget(normalize, GPS > 1, K, V)
            nb = budget // 2 if normalize or GPS > 1 else budget  # dk: [Dv, 16] at D = 128
            if _pow2(K) * _pow2(V) <= budget and not normalize and GPS == 1:
                # GPS > 1: the running state gradients live in the segment slots (in place)
                grid = (plan.nseg, heads, 1)
                kern._segment_dkdv_kernel[grid](*args, dk, dv, gwork=g_in if GPS > 1 else None, BK=_pow2(K),
                                                BV=_pow2(V), **tail)
            else:
                # the whole state does not fit (or normalize, or grouped): dk from Dk blocks with Dv
                # whole, dv from Dv blocks with Dk whole (each recomputes the state gradient of its block).
                # GPS > 1: the first launch keeps its running gradients in a scratch copy of the
                # slots (the second still reads them), the second works in place
                work = torch.empty_like(g_in) if GPS > 1 else None
                BK, BV = _blocks_dk_split(K, V, nb)
                kern._segment_dkdv_kernel[(plan.nseg, heads, triton.cdiv(K, BK))](
                    *args, dk, None, gwork=work, BK=BK, BV=BV, **tail)
                BK, BV = _blocks_dv_split(K, V, budget)
                BV = min(BV, 32) if normalize else _narrow_dv(BV, GPS > 1)
                kern._segment_dkdv_kernel[(plan.nseg, heads, triton.cdiv(V, BV))](
                    *args, None, dv, gwork=g_in if GPS > 1 else None, BK=BK, BV=BV, **tail)
    return dq, dk, dv, dh0, dz0


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
        o, ht, zt, den, s_in, z_in, plan = chunk_linear_fwd(
            q, k, v, decay=decay, scale=scale, eps=eps, feature_map=feature_map, normalize=normalize,
            causal=causal, state_heads=state_heads, h0=h0, z0=z0, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, keep_fp32_output=False)
        # segment incoming states (a SEG-th of a per-token state) and the varlen segment tables;
        # with normalize the output as returned and the float32 denominators (for dd = -(do·o)/d)
        ctx.save_for_backward(q, k, v, decay, h0, z0, cu_seqlens, o if normalize else None, den, s_in, z_in,
                              plan.seg_info, plan.seg_cu)
        ctx.plan = (plan.SEG, plan.NS, plan.nseg)
        ctx.scale = scale
        ctx.feature_map = feature_map
        ctx.normalize = normalize
        ctx.causal = causal
        ctx.state_heads = state_heads
        return o, ht, zt

    @staticmethod
    def backward(ctx, do, dht, dzt):
        q, k, v, decay, h0, z0, cu_seqlens, o_out, den, s_in, z_in, seg_info, seg_cu = ctx.saved_tensors
        plan = SegmentPlan(*ctx.plan, seg_info, seg_cu)
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
            state_heads=ctx.state_heads, o=o_out, den=den, s_in=s_in, z_in=z_in, plan=plan,
            cu_seqlens=cu_seqlens, need_dh0=need_dh0)
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
