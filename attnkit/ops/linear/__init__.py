"""Linear attention and lightning attention (chunked prefill, recurrent decode step)."""

from .api import layer_decay, lightning_attention, lightning_slopes, linear_attention, linear_attention_step

__all__ = ["layer_decay", "lightning_attention", "lightning_slopes", "linear_attention", "linear_attention_step"]

from . import triton_register  # noqa: E402,F401  (registers the triton backend; kernels load lazily)
