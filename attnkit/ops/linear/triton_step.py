"""Fused recurrent decode step for linear attention and lightning attention (Triton).

One token per row: `S ← λ S + φ(k)ᵀ v`, `o = φ(scale·q) S` (lightning: `o = scale · q S`), with
`z ← z + φ(k)` and `o /= φ(q)·z + eps` when normalising. The state rows (`state_indices[b]`, or
`b`) are read and written in place; nothing is allocated but the output, no value is read on the
host, so the step can be captured in a CUDA graph. Strides are passed through, so strided
q/k/v and state views need no copy.

The state layout and the float32 arithmetic are those of the chunked kernels in
`triton_chunk_kernels.py`; a state head is a query head (lightning) or a KV head shared by its group of
query heads (linear attention).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common.triton_utils import device_guard
from .triton_chunk_kernels import FEATURE_MAPS, _phi


def _step_block_sizes(K: int, V: int) -> tuple[int, int]:
    BK = max(16, triton.next_power_of_2(K))
    BV = min(max(16, triton.next_power_of_2(V)), 64 if BK <= 128 else 32)
    return BK, BV


@triton.heuristics({
    "USE_DECAY": lambda args: args["decay"] is not None,
    "USE_STATE_INDICES": lambda args: args["state_indices"] is not None,
    "NORMALIZE": lambda args: args["z"] is not None,
})
@triton.jit
def _linear_attention_step_kernel(
    q, k, v, o, s, z, decay, state_indices, scale, eps,
    stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kd, stride_vb, stride_vh, stride_vd,
    stride_sn, stride_sh, stride_sk, stride_sv, stride_zn, stride_zh, stride_zk,
    H: tl.constexpr, HK: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, FEATURE_MAP: tl.constexpr,
    USE_DECAY: tl.constexpr, USE_STATE_INDICES: tl.constexpr, NORMALIZE: tl.constexpr,
):
    # program = (first Dv block, batch row, state head); it walks Dv blocks i_vp, i_vp + NVP, ...
    # With NORMALIZE there is one program per (row, state head) (NVP = 1), so the z row is read
    # and written by a single program.
    i_vp, i_b, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    NVP = tl.num_programs(0).to(tl.int64)
    QPS: tl.constexpr = H // HS
    i_hk = i_s * HK // HS
    if USE_STATE_INDICES:
        i_row = tl.load(state_indices + i_b).to(tl.int64)
    else:
        i_row = i_b

    o_k = tl.arange(0, BK)
    m_k = o_k < K
    # [BK] φ(k) in float32 (0 on padding)
    b_k = tl.load(k + i_b * stride_kb + i_hk * stride_kh + o_k * stride_kd, mask=m_k, other=0.).to(tl.float32)
    if FEATURE_MAP != 0:
        b_k = tl.where(m_k, _phi(b_k, FEATURE_MAP), 0.)
    if NORMALIZE:
        p_z = z + i_row * stride_zn + i_s * stride_zh + o_k * stride_zk
        b_z = tl.load(p_z, mask=m_k, other=0.) + b_k
    if USE_DECAY:
        b_l = tl.exp(-tl.load(decay + i_s).to(tl.float32))

    for i_v in range(i_vp, NV, NVP):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = tl.load(v + i_b * stride_vb + i_hk * stride_vh + o_v * stride_vd, mask=m_v, other=0.).to(tl.float32)
        p_s = s + i_row * stride_sn + i_s * stride_sh + o_k[:, None] * stride_sk + o_v[None, :] * stride_sv
        # [BK, BV] float32 state block
        b_h = tl.load(p_s, mask=m_k[:, None] & m_v[None, :], other=0.)
        if USE_DECAY:
            b_h *= b_l
        b_h += b_k[:, None] * b_v[None, :]
        tl.store(p_s, b_h, mask=m_k[:, None] & m_v[None, :])
        for i_g in range(QPS):
            i_h = i_s * QPS + i_g
            b_q = tl.load(q + i_b * stride_qb + i_h * stride_qh + o_k * stride_qd, mask=m_k, other=0.)
            b_q = b_q.to(tl.float32) * scale
            if FEATURE_MAP != 0:
                b_q = tl.where(m_k, _phi(b_q, FEATURE_MAP), 0.)
            # [BK] · [BK, BV] -> [BV]
            b_o = tl.sum(b_q[:, None] * b_h, 0)
            if NORMALIZE:
                b_o = b_o / (tl.sum(b_q * b_z, 0) + eps)
            tl.store(o + (i_b * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if NORMALIZE:
        tl.store(p_z, b_z, mask=m_k)


def linear_attention_step_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                              z: torch.Tensor | None, *, decay: torch.Tensor | None, scale: float,
                              feature_map: str | None, eps: float, state_indices: torch.Tensor | None,
                              state_heads: int) -> torch.Tensor:
    """Launches the step kernel; `s` (and `z`) are updated in place. Returns `o [B, 1, H, V]`."""
    B, _, H, K = q.shape
    HK, V = k.shape[2], v.shape[-1]
    BK, BV = _step_block_sizes(K, V)
    NV = triton.cdiv(V, BV)
    o = torch.empty(B, 1, H, V, device=q.device, dtype=q.dtype)
    grid = (1 if z is not None else NV, B, state_heads)
    z_strides = z.stride() if z is not None else (0, 0, 0)
    with device_guard(q):
        _linear_attention_step_kernel[grid](
            q, k, v, o, s, z, decay, state_indices, scale, eps,
            q.stride(0), q.stride(2), q.stride(3), k.stride(0), k.stride(2), k.stride(3),
            v.stride(0), v.stride(2), v.stride(3), *s.stride(), *z_strides,
            H=H, HK=HK, HS=state_heads, K=K, V=V, BK=BK, BV=BV, NV=NV,
            FEATURE_MAP=FEATURE_MAPS[feature_map], num_warps=4 if BK * BV <= 4096 else 8)
    return o


def linear_attention_step(q, k, v, state, mode, decay, scale, feature_map, normalize, eps, state_indices):
    """Triton backend of `attnkit.linear_attention_step` (see docs/contracts.md)."""
    s, z = state if normalize else (state, None)
    state_heads = q.shape[2] if mode == "lightning" else k.shape[2]
    return linear_attention_step_fwd(q, k, v, s, z, decay=decay, scale=scale, feature_map=feature_map,
                                     eps=eps, state_indices=state_indices, state_heads=state_heads)
