"""Registers the Triton backend of lightning_attention, linear_attention and linear_attention_step.

The kernels are imported on first use (string targets), so `triton.jit` decoration happens only
then, after `TRITON_INTERPRET` has been read.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ... import dispatch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HEAD_DIMS = (16, 256)  # Dk is kept whole in registers (padded to a power of two); Dv is blocked


def _check_lightning(inputs: dispatch.Inputs) -> Iterable[str]:
    # the kernels give gradients to q, k, v and the initial state; a prepare step that tags a
    # decay requiring grad ("decay_grad") gets a refusal instead of a silently missing gradient
    if inputs.has("decay_grad"):
        yield "no gradient for decay (it is a fixed per-head slope); use backend='reference'"


for _op, _target, _check in (
    ("lightning_attention", "attnkit.ops.linear.triton_chunk:lightning_attention", _check_lightning),
    ("linear_attention", "attnkit.ops.linear.triton_chunk:linear_attention", None),
    ("linear_attention_step", "attnkit.ops.linear.triton_step:linear_attention_step", None),
):
    dispatch.register(_op, "triton", _target, priority=20, devices=("cuda", "cpu"), dtypes=_DTYPES,
                      head_dim_range=_HEAD_DIMS, check=_check)
