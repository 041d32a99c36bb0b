"""Registers the `triton` backend of `loki_attention_decode`, `loki_attention_decode_lowrank` and
`loki_cache_append`.

The kernels are imported on first use (string targets), so importing attnkit never imports
Triton. What the kernels cannot run is refused here with a reason that `attnkit.explain` shows.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ... import dispatch
from ..._validation import FLOAT_DTYPES
from . import cache  # noqa: F401  (registers the prepare steps of the cache ops)

# A gathered key/value row and a rotation column block are held whole in registers.
MAX_HEAD_DIM = 256


def _no_interpreted_bf16_dot(inputs: dispatch.Inputs) -> Iterator[str]:
    """The Triton CPU interpreter computes `tl.dot` of two bfloat16 operands wrongly."""
    if inputs.device.type == "cpu" and inputs.dtype == torch.bfloat16:
        yield ("bfloat16 matrix products are wrong in the Triton CPU interpreter; "
               "run bfloat16 on a CUDA device, or use float16/float32 on the CPU")


_COMMON = dict(priority=20, devices=("cuda", "cpu"), dtypes=FLOAT_DTYPES, head_dim_range=(1, MAX_HEAD_DIM),
               check=_no_interpreted_bf16_dot)
_MODULE = "attnkit.ops.loki.triton_loki"

dispatch.register("loki_attention_decode", "triton", f"{_MODULE}:loki_attention_decode", **_COMMON)
dispatch.register("loki_attention_decode_lowrank", "triton", f"{_MODULE}:loki_attention_decode_lowrank", **_COMMON)
dispatch.register("loki_cache_append", "triton", f"{_MODULE}:loki_cache_append", **_COMMON)
