"""Softmax attention with native GQA/MQA and fused QK-norm; decoding; standalone QK-norm."""

from .api import attention, attention_decode, qk_norm

__all__ = ["attention", "attention_decode", "qk_norm"]

from . import triton_register  # noqa: E402,F401  (registers the triton backend; kernels load lazily)
