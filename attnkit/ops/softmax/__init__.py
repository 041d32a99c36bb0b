"""Softmax attention with native GQA/MQA and fused QK-norm; decoding; standalone QK-norm."""

from .api import attention, attention_decode, qk_norm

__all__ = ["attention", "attention_decode", "qk_norm"]
