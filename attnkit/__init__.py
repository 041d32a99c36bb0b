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

# Subpackages reachable as attributes after a plain `import attnkit` (imported on first access,
# so `import attnkit` stays light): `attnkit.nn.MultiheadAttention`, `attnkit.integrations...`.
_LAZY_SUBMODULES = ("nn", "integrations")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))

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
    "nn",
    "qk_norm",
]
