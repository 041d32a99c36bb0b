"""attnkit: fused Triton and CUDA attention kernels for PyTorch.

Every op has a pure-PyTorch reference backend (its meaning) and registers faster backends
(``triton``, ``cuda``) through :mod:`attnkit.dispatch`. See ``docs/api.md``.
"""

from . import native  # noqa: E402,F401  (registers the cuda backend; compiles nothing at import)
from .dispatch import BackendUnavailable, explain
from .ops.linear import (
    layer_decay,
    lightning_attention,
    lightning_slopes,
    linear_attention,
    linear_attention_step,
)
from .ops.loki import LokiBasis, loki_attention_decode, loki_calibrate, loki_rotate
from .ops.softmax import attention, attention_decode, qk_norm

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "LokiBasis",
    "attention",
    "attention_decode",
    "explain",
    "layer_decay",
    "lightning_attention",
    "lightning_slopes",
    "linear_attention",
    "linear_attention_step",
    "loki_attention_decode",
    "loki_calibrate",
    "loki_rotate",
    "qk_norm",
]
