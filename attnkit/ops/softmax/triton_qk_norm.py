"""Triton standalone QK-norm (`rms` / `l2` over the last dim), forward and backward.

The row maths (`row_norm`, `row_norm_bwd`) is shared with the fused attention kernels. The
weight gradient is summed per program over a fixed, strided set of row blocks and the `[P, D]`
partials are summed in the launcher: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...tools import sm_count
from ..common.triton_utils import device_guard, interpreted
from .triton_attention import NORMS, row_norm, row_norm_bwd


def _row_block(bd: int) -> int:
    """Rows per program: about 4K elements per tile."""
    return max(1, 4096 // bd)


def _bwd_programs(n_blocks: int, device: torch.device) -> int:
    """A fixed number of programs (a few per SM) so that the `[P, D]` weight partials stay small;
    the SM count is `attnkit.tools.sm_count` (honours `ATTNKIT_SM_COUNT`, 132 off CUDA), like the
    other kernels' grids."""
    return max(1, min(n_blocks, 4 * sm_count(device)))


@triton.heuristics({"HAS_W": lambda args: args["w"] is not None})
@triton.jit(do_not_specialize=["R"])
def _qk_norm_fwd_kernel(
    x, w, y, R, s_xr, s_xd, eps,
    D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr,
):
    # program = block of BR rows; y is contiguous [R, D]
    i_r = tl.program_id(0).to(tl.int64)
    rows = i_r * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m_row, m_d = rows < R, o_d < D
    m = m_row[:, None] & m_d[None, :]
    # [BR, BD]
    b_x = tl.load(x + rows[:, None] * s_xr + o_d[None, :] * s_xd, mask=m, other=0.)
    b_y, _, _ = row_norm(b_x.to(tl.float32), w, o_d, m_d, m_row, eps, D, NORM, HAS_W)
    tl.store(y + rows[:, None] * D + o_d[None, :], b_y.to(y.dtype.element_ty), mask=m)


@triton.heuristics({"HAS_W": lambda args: args["w"] is not None})
@triton.jit(do_not_specialize=["R"])
def _qk_norm_bwd_kernel(
    x, w, dy, dx, dw_part, R, s_xr, s_xd, s_dyr, s_dyd, eps,
    D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr,
):
    # program p handles the row blocks p, p + P, p + 2P, ... and writes its weight partial
    i_p, n_p = tl.program_id(0).to(tl.int64), tl.num_programs(0).to(tl.int64)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_dw = tl.zeros([BD], dtype=tl.float32)
    for i_r in range(i_p, tl.cdiv(R, BR), n_p):
        rows = i_r * BR + tl.arange(0, BR)
        m_row = rows < R
        m = m_row[:, None] & m_d[None, :]
        # [BR, BD]
        b_x = tl.load(x + rows[:, None] * s_xr + o_d[None, :] * s_xd, mask=m, other=0.).to(tl.float32)
        b_dy = tl.load(dy + rows[:, None] * s_dyr + o_d[None, :] * s_dyd, mask=m, other=0.).to(tl.float32)
        _, b_y, b_r = row_norm(b_x, w, o_d, m_d, m_row, eps, D, NORM, HAS_W)
        b_dx, b_dw_blk = row_norm_bwd(b_dy, b_y, b_r, w, o_d, m_d, D, NORM, HAS_W)
        tl.store(dx + rows[:, None] * D + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m)
        b_dw += b_dw_blk
    if HAS_W:
        tl.store(dw_part + i_p * D + o_d, b_dw, mask=m_d)


# -------------------------------------------------------------------------------- host launchers


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as `[R, D]`, a view whenever the leading dims allow one."""
    return x.reshape(-1, x.shape[-1])


def qk_norm_fwd(x: torch.Tensor, w: torch.Tensor | None, *, mode: str, eps: float) -> torch.Tensor:
    """Runs the forward kernel (no autograd). Returns `y`, shaped and typed like `x`, contiguous."""
    x2 = _rows(x)
    R, D = x2.shape
    y = torch.empty(R, D, device=x.device, dtype=x.dtype)
    if y.numel() > 0:
        BD = triton.next_power_of_2(D)
        BR = _row_block(BD)
        with device_guard(x):
            _qk_norm_fwd_kernel[(triton.cdiv(R, BR),)](
                x2, w, y, R, *x2.stride(), float(eps), D=D, BD=BD, BR=BR, NORM=NORMS[mode],
                num_warps=1 if interpreted() else 4)
    return y.view(x.shape)


def qk_norm_bwd(x: torch.Tensor, w: torch.Tensor | None, dy: torch.Tensor, *, mode: str,
                eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs the backward kernel (no autograd). Returns `dx` (x's dtype) and `dw` (float32, or None)."""
    x2, dy2 = _rows(x), _rows(dy)
    R, D = x2.shape
    dx = torch.empty(R, D, device=x.device, dtype=x.dtype)
    BD = triton.next_power_of_2(D)
    BR = _row_block(BD)
    P = _bwd_programs(triton.cdiv(R, BR), x.device)
    dw_part = torch.zeros(P, D, device=x.device, dtype=torch.float32) if w is not None else None
    if dx.numel() > 0:
        with device_guard(x):
            _qk_norm_bwd_kernel[(P,)](
                x2, w, dy2, dx, dw_part, R, *x2.stride(), *dy2.stride(), float(eps), D=D, BD=BD, BR=BR,
                NORM=NORMS[mode], num_warps=1 if interpreted() else 4)
    return dx.view(x.shape), (dw_part.sum(0) if dw_part is not None else None)


class QKNormFunction(torch.autograd.Function):
    """Autograd for the standalone norm."""

    @staticmethod
    def forward(ctx, x, w, mode, eps):
        y = qk_norm_fwd(x, w, mode=mode, eps=eps)
        ctx.save_for_backward(x, w)
        ctx.mode = mode
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx, dw = qk_norm_bwd(x, w, dy, mode=ctx.mode, eps=ctx.eps)
        return dx, (dw.to(w.dtype) if dw is not None else None), None, None


# ------------------------------------------------------------------------ backend entry point


def qk_norm(x, weight, mode, eps):
    """Triton backend of `attnkit.qk_norm` (see docs/contracts.md)."""
    return QKNormFunction.apply(x, weight, mode, eps)
