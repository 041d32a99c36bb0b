"""`attn_implementation="attnkit"` for transformers models.

    >>> import attnkit.integrations.transformers as akt
    >>> akt.register()
    >>> model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnkit")

Every model that goes through transformers' `AttentionInterface` (Llama, Qwen2/3, Mistral, Gemma 2/3,
...) then runs its attention on attnkit. Masks arrive in SDPA's form: boolean (True = attend) or
additive float (0 / -inf or the dtype's minimum), of any shape that broadcasts to `[B, H, T, S]`
(`[B, 1, T, S]`, `[B, 1, 1, S]`, `[1, 1, T, S]`, ...).

* No mask: the fused kernel runs directly (bottom-right causal, which is also what a cache's
  decoding step needs), with the layer's sliding window and logit softcap.
* A mask that is causal (optionally with the layer's sliding window) restricted to one
  contiguous block of valid tokens per row (left or right padding, the masks of `generate`):
  the batch is packed into variable-length sequences and runs in one varlen call, with the
  window and softcap.
* Anything else (custom patterns, additive biases, dropout in training) runs an exact PyTorch
  fallback with the mask as given: SDPA, or, with a softcap, the eager formula
  `softmax(c * tanh(scale * q.k / c) + mask) @ v`. Results are always exact; no argument is
  ignored (an argument attnkit cannot honour raises).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.softmax import attention

NAME = "attnkit"


def _bool_mask(mask: torch.Tensor, B: int, T: int, S: int) -> torch.Tensor | None:
    """An SDPA mask as bool `[B, Hm, T, S]` (True = attend), or None for an additive float mask
    with values other than 0 and -inf/the dtype's minimum (a bias: only the fallback can use it)."""
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    ok = m.dim() == 4 and all(a in (1, b) for a, b in zip((m.shape[0], m.shape[2], m.shape[3]), (B, T, S)))
    if not ok:
        raise ValueError(f"attention_mask must broadcast to [B, H, T, S] = [{B}, H, {T}, {S}], "
                         f"got shape {list(mask.shape)}")
    if m.dtype != torch.bool:
        if not m.is_floating_point():
            raise TypeError(f"attention_mask must be bool or floating point, got {m.dtype}")
        blocked = m <= torch.finfo(m.dtype).min
        if not bool(((m == 0) | blocked).all()):
            return None
        m = ~blocked
    return m.expand(B, m.shape[1], T, S)


def _padding_pattern(mask: torch.Tensor, causal: bool, left: int):
    """For a bool mask `[B, 1|H, T, S]`, return `(kv_valid [B, S], q_valid [B, T])` when the mask
    is exactly causal (bottom-right) or full attention, with a sliding window of `left` earlier
    keys when `left >= 0`, restricted to one contiguous block of valid keys per row (for the
    valid query rows); else None."""
    B, _, T, S = mask.shape
    if T > S:
        return None
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
        if left >= 0:
            expected = expected & (pos[None, None, :] >= q_pos[None, :, None] - left)
    rows_ok = (expected == m) | ~q_valid[:, :, None]
    if not bool(rows_ok.all()):
        return None
    return kv_valid, q_valid


def _packed(query, key, value, kv_valid, q_valid, causal, scale, window=None, softcap=None):
    """Run the valid tokens of each row as one varlen call; padded query rows get zeros."""
    B, T, H, D = query.shape
    q_counts = q_valid.sum(-1).to(torch.int32)
    k_counts = kv_valid.sum(-1).to(torch.int32)
    cu_q = F.pad(torch.cumsum(q_counts, 0, dtype=torch.int32), (1, 0))
    cu_k = F.pad(torch.cumsum(k_counts, 0, dtype=torch.int32), (1, 0))
    qp = query[q_valid][None]
    kp = key[kv_valid][None]
    vp = value[kv_valid][None]
    o = attention(qp, kp, vp, causal=causal, scale=scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                  window=window, softcap=softcap)
    out = query.new_zeros(B, T, H, value.shape[-1])
    out[q_valid] = o[0]
    return out


def _exact(query, key, value, mask, dropout, scale, softcap, causal, left):
    """The exact PyTorch fallback, `[B, H, T, D]` in, `[B, T, H, Dv]` out."""
    T, S = query.shape[2], key.shape[2]
    if mask is None and ((causal and T > 1) or left >= 0):
        mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)
        if left >= 0:
            mask = mask.triu(S - T - left)
    if not softcap:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous()
    # Softcap: the eager formula (SDPA has no softcap).
    G = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(G, dim=1), value.repeat_interleave(G, dim=1)
    s = (query @ k.transpose(-1, -2)) * (query.shape[-1] ** -0.5 if scale is None else scale)
    s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(query.dtype)
    p = F.dropout(p, p=dropout, training=dropout > 0)
    return (p @ v).transpose(1, 2).contiguous()


def attnkit_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function: `query [B, H, T, D]`, `key/value [B, Hk, S, D]` →
    `(out [B, T, H, D], None)`. Honours `sliding_window=W` (keys `p - W < s <= p`, as
    transformers' sliding-window masks) and `softcap=c` (Gemma 2)."""
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attnkit: attention sinks (s_aux) are not supported; "
                                  "use attn_implementation='eager' for this model")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    softcap = kwargs.get("softcap")
    sliding = kwargs.get("sliding_window")
    left = int(sliding) - 1 if sliding is not None and causal else -1
    window = (left, 0) if left >= 0 else None
    q = query.transpose(1, 2)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    B, T, S = q.shape[0], q.shape[1], k.shape[1]
    drop = dropout if module.training else 0.0
    if drop == 0:
        if attention_mask is None:
            # SDPA's convention without a mask: causal only for a square prefill, full otherwise
            # (a decoding step); bottom-right causal gives both.
            return attention(q, k, v, causal=causal and T > 1, scale=scaling, window=window,
                             softcap=softcap), None
        mask = _bool_mask(attention_mask, B, T, S)
        if mask is not None:
            pattern = _padding_pattern(mask, causal, left)
            if pattern is not None:
                return _packed(q, k, v, *pattern, causal=causal, scale=scaling, window=window,
                               softcap=softcap), None
    elif attention_mask is not None:
        _bool_mask(attention_mask, B, T, S)  # the same shape checks
    return _exact(query, key, value, attention_mask, drop, scaling, softcap, causal, left), None


def register() -> None:
    """Register `"attnkit"` in transformers' attention and attention-mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attnkit_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
