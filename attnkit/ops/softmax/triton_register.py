"""Registers the `triton` backend of `attention`, `attention_decode` and `qk_norm`.

The kernels are imported on first use (string targets), so importing attnkit never imports
Triton. What the kernels cannot run is refused here with a reason that `attnkit.explain` shows.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ... import dispatch
from ..._validation import FLOAT_DTYPES

# The largest head dim a tile holds whole (Q/K rows need the full dim for the norm and the dot).
MAX_HEAD_DIM = 256


def _no_interpreted_bf16_dot(inputs: dispatch.Inputs) -> Iterator[str]:
    """The Triton CPU interpreter computes `tl.dot` of two bfloat16 operands wrongly."""
    if inputs.device.type == "cpu" and inputs.dtype == torch.bfloat16:
        yield ("bfloat16 matrix products are wrong in the Triton CPU interpreter; "
               "run bfloat16 on a CUDA device, or use float16/float32 on the CPU")


_COMMON = dict(priority=20, devices=("cuda", "cpu"), dtypes=FLOAT_DTYPES, head_dim_range=(1, MAX_HEAD_DIM))

dispatch.register("attention", "triton", "attnkit.ops.softmax.triton_attention:attention",
                  check=_no_interpreted_bf16_dot, **_COMMON)
dispatch.register("attention_decode", "triton", "attnkit.ops.softmax.triton_decode:attention_decode",
                  check=_no_interpreted_bf16_dot, **_COMMON)
dispatch.register("qk_norm", "triton", "attnkit.ops.softmax.triton_qk_norm:qk_norm", **_COMMON)
