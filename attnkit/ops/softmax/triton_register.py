"""Registers the `triton` backend of `attention`, `attention_decode` and `qk_norm`.

The kernels are imported on first use (string targets), so importing attnkit never imports
Triton. What the kernels cannot run is refused here with a reason that `attnkit.explain` shows.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterator

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


# Features of SPEC "Sliding window, softcap, paged KV cache" (issue 15) that the Triton kernels do
# not implement. Empty: the attention kernels have window and softcap (forward and backward), the
# decode kernel window, softcap and paged caches of any block size. A feature listed here is
# refused by name (see _not_yet).
ATTENTION_LACKS: tuple[str, ...] = ()
DECODE_LACKS: tuple[str, ...] = ()


def _not_yet(op: str, lacking: tuple[str, ...]) -> Callable[[dispatch.Inputs], Iterator[str]]:
    """A check that refuses the features in `lacking` with a reason naming them."""

    def check(inputs: dispatch.Inputs) -> Iterator[str]:
        for feature in lacking:
            if inputs.has(feature):
                yield (f"{feature!r} is not supported yet by the triton {op} kernel; "
                       "use backend='reference' (or 'cuda' for attention_decode)")

    return check


def _both(*checks: Callable[[dispatch.Inputs], Iterator[str]]) -> Callable[[dispatch.Inputs], list[str]]:
    return lambda inputs: [reason for check in checks for reason in check(inputs)]


def _kernel(target: str) -> Callable[..., object]:
    """The kernel entry point `"module:attr"`, imported on first call. Keyword arguments of the
    feature set above that the entry point does not declare yet are dropped; they can only be
    off here, since the checks refuse them when they are on."""

    @functools.cache
    def resolve():
        module, _, attr = target.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        params = inspect.signature(fn).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        drop = () if takes_all else tuple(n for n in ("window", "softcap", "block_table") if n not in params)
        return fn, drop

    def call(**kwargs):
        fn, drop = resolve()
        for name in drop:
            kwargs.pop(name, None)
        return fn(**kwargs)

    return call


_COMMON = dict(priority=20, devices=("cuda", "cpu"), dtypes=FLOAT_DTYPES, head_dim_range=(1, MAX_HEAD_DIM))

dispatch.register("attention", "triton", _kernel("attnkit.ops.softmax.triton_attention:attention"),
                  check=_both(_no_interpreted_bf16_dot, _not_yet("attention", ATTENTION_LACKS)), **_COMMON)
dispatch.register("attention_decode", "triton", _kernel("attnkit.ops.softmax.triton_decode:attention_decode"),
                  check=_both(_no_interpreted_bf16_dot, _not_yet("attention_decode", DECODE_LACKS)),
                  **_COMMON)
dispatch.register("qk_norm", "triton", "attnkit.ops.softmax.triton_qk_norm:qk_norm", **_COMMON)
