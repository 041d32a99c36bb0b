"""`attn_implementation="attnkit"` for transformers models.

    >>> import attnkit.integrations.transformers as akt
    >>> akt.register()
    >>> model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnkit")

Every model that goes through transformers' `AttentionInterface` (Llama, Qwen2/3, Mistral, ...) then
runs its attention on attnkit. Masks arrive in SDPA's boolean form. Without a mask the fused
kernel runs directly (bottom-right causal, which is also what a cache's decoding step needs).
With a mask that is a causal-and/or-padding pattern whose valid tokens are one contiguous block
per row (left or right padding), the batch is packed into variable-length sequences and runs in
one varlen call. Any other mask (sliding windows, custom patterns), dropout in training or a
softcap run PyTorch's `scaled_dot_product_attention` with the mask, so results are always exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.softmax import attention

NAME = "attnkit"


def _contiguous_padding(mask: torch.Tensor, causal: bool):
    """For a bool mask `[B, 1|H, T, S]`, return `(kv_valid [B, S], q_valid [B, T])` when the mask is
    exactly causal(bottom-right)/full attention restricted to one contiguous block of valid keys per
    row (for the valid query rows), else None."""
    B, _, T, S = mask.shape
    m = mask[:, 0]
    if mask.shape[1] != 1 and not bool((mask == mask[:, :1]).all()):
        return None
    kv_valid = m.any(dim=1)  # [B, S]
    counts = kv_valid.sum(-1)
    first = torch.where(counts > 0, kv_valid.int().argmax(-1), torch.zeros_like(counts))
    pos = torch.arange(S, device=mask.device)
    block = (pos[None] >= first[:, None]) & (pos[None] < (first + counts)[:, None])
    if not bool((block == kv_valid).all()):
        return None
    q_pos = S - T + torch.arange(T, device=mask.device)  # absolute positions of the queries
    q_valid = kv_valid[:, q_pos]
    expected = kv_valid[:, None, :].expand(B, T, S)
    if causal:
        expected = expected & (pos[None, None, :] <= q_pos[None, :, None])
    rows_ok = (expected == m) | ~q_valid[:, :, None]
    if not bool(rows_ok.all()):
        return None
    return kv_valid, q_valid


def _packed(query, key, value, kv_valid, q_valid, causal, scale):
    """Run the valid tokens of each row as one varlen call; padded query rows get zeros."""
    B, T, H, D = query.shape
    q_counts = q_valid.sum(-1).to(torch.int32)
    k_counts = kv_valid.sum(-1).to(torch.int32)
    cu_q = F.pad(torch.cumsum(q_counts, 0, dtype=torch.int32), (1, 0))
    cu_k = F.pad(torch.cumsum(k_counts, 0, dtype=torch.int32), (1, 0))
    qp = query[q_valid][None]
    kp = key[kv_valid][None]
    vp = value[kv_valid][None]
    o = attention(qp, kp, vp, causal=causal, scale=scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out = query.new_zeros(B, T, H, value.shape[-1])
    out[q_valid] = o[0]
    return out


def attnkit_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function: `query [B, H, T, D]`, `key/value [B, Hk, S, D]` →
    `(out [B, T, H, D], None)`."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q = query.transpose(1, 2)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    T, S = q.shape[1], k.shape[1]
    window = kwargs.get("sliding_window")
    exact_only = ((dropout > 0 and module.training) or kwargs.get("softcap") is not None
                  or (attention_mask is None and window is not None and window < S))
    if not exact_only:
        if attention_mask is None:
            # SDPA's convention without a mask: causal only for a square prefill, full otherwise
            # (a decoding step); bottom-right causal gives both.
            return attention(q, k, v, causal=causal and T > 1, scale=scaling), None
        if attention_mask.dtype == torch.bool:
            pattern = _contiguous_padding(attention_mask, causal)
            if pattern is not None:
                return _packed(q, k, v, *pattern, causal=causal, scale=scaling), None
    # exact fallback: PyTorch SDPA with the mask as given
    if attention_mask is None and causal and T > 1 and T != S:
        attention_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout if module.training else 0.0,
        scale=scaling, is_causal=attention_mask is None and causal and T > 1,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register `"attnkit"` in transformers' attention and attention-mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attnkit_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
