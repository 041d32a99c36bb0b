"""Linear-attention layers: MiniMax-01's lightning attention and a generic linear attention."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.linear import lightning_attention as cp_lightning_attention
from ..distributed.linear import linear_attention as cp_linear_attention
from ..ops.linear import layer_decay, lightning_attention, lightning_slopes, linear_attention, linear_attention_step


def _use_step(x: torch.Tensor, state: Any, causal: bool = True) -> bool:
    """A single new token with a state is a decoding step (inference only: the step op updates in place)."""
    if x.shape[1] != 1 or state is None or not causal:
        return False
    tensors = [x, *(state if isinstance(state, tuple) else (state,))]
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


class RMSNorm(nn.Module):
    """RMSNorm with the parameter name and numerics of `MiniMaxRMSNorm` / `LlamaRMSNorm`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LightningAttention(nn.Module):
    """The lightning-attention layer of MiniMax-Text-01, on attnkit's kernels.

    `qkv_proj` (no bias) → SiLU → split into q, k, v per head → lightning attention with the
    per-head decay `layer_decay(lightning_slopes(H), layer_idx, num_layers)` and `scale=1.0` →
    RMSNorm `norm` over all heads → times `sigmoid(output_gate(x))` → `out_proj`.

    Parameter *and buffer* names and shapes are those of `MiniMaxLightningAttention` in
    `transformers` (its `slope_rate`, `query_decay`, `key_decay`, `diagonal_decay` buffers are kept,
    derived from `layer_idx`, `num_layers` and `block_size`), so its `state_dict` loads unchanged with
    `strict=True` both ways; a state_dict holding only the parameters loads too (the derived
    buffers are then recomputed).

    Args:
        hidden_size: model width.
        num_heads: attention heads `H`.
        layer_idx, num_layers: position in the stack (sets the decay, as in MiniMax-01).
        head_dim: default `hidden_size // num_heads`.
        block_size: MiniMax's config `block_size` (only shapes the mirrored buffers; attnkit's kernels
            pick their own tiling).
        norm_eps: RMSNorm epsilon (MiniMax uses 1e-6 for this norm).
        backend: attnkit backend for the ops (`None`: automatic).
        process_group: context parallelism: a `torch.distributed` process group; `forward` then takes
            this rank's contiguous shard of the sequence (`attnkit.distributed.lightning_attention`).

    Example:
        >>> layer = attnkit.nn.LightningAttention(1024, 16, layer_idx=2, num_layers=8)
        >>> y, state = layer(x[:, :100], return_state=True)   # prefill
        >>> y1, state = layer(x[:, 100:101], state=state, return_state=True)  # one decoding step
    """

    def __init__(self, hidden_size: int, num_heads: int, layer_idx: int = 0, num_layers: int = 1,
                 head_dim: int | None = None, *, block_size: int = 256, norm_eps: float = 1e-6,
                 backend: str | None = None, process_group=None, device=None, dtype=None) -> None:
        super().__init__()
        self.process_group = process_group
        self.hidden_size = hidden_size
        self.num_attention_heads = num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.layer_idx = layer_idx
        self.num_hidden_layers = num_layers
        self.block_size = block_size
        self.backend = backend
        self._decay: torch.Tensor | None = None
        inner = num_heads * self.head_dim
        kw = dict(device=device, dtype=dtype)
        self.norm = RMSNorm(inner, eps=norm_eps, **kw)
        self.qkv_proj = nn.Linear(hidden_size, 3 * inner, bias=False, **kw)
        self.out_proj = nn.Linear(inner, hidden_size, bias=False, **kw)
        self.output_gate = nn.Linear(hidden_size, inner, bias=False, **kw)
        for name, value in self._derived_buffers(device).items():
            self.register_buffer(name, value)

    def _derived_buffers(self, device=None) -> dict[str, torch.Tensor]:
        """MiniMax's decay buffers (same values, shapes and dtypes as transformers builds them)."""
        slope = layer_decay(lightning_slopes(self.num_attention_heads), self.layer_idx, self.num_hidden_layers)
        slope_rate = slope.to(device)[:, None, None]
        r = torch.arange(self.block_size, device=device) + 1
        query_decay = torch.exp(-slope_rate * r[:, None])
        key_decay = torch.exp(-slope_rate * (self.block_size - r[:, None]))
        diag = slope_rate * (r[:, None] - r[None, :])[None, None]
        diagonal_decay = torch.exp(torch.where(diag >= 0, -diag, float("-inf")))
        return dict(slope_rate=slope_rate, query_decay=query_decay, key_decay=key_decay,
                    diagonal_decay=diagonal_decay)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The decay buffers are derived from the constructor arguments: fill them in when a
        # checkpoint carries only the parameters.
        for name in ("slope_rate", "query_decay", "key_decay", "diagonal_decay"):
            state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def decay(self) -> torch.Tensor:
        """float32 `[H]`: `λ_h = exp(-decay[h])`.

        Read from the `slope_rate` buffer (so a loaded checkpoint's values are used as stored) unless
        the module was cast to a 16-bit dtype, in which case it is recomputed in float32.
        """
        if self.slope_rate.dtype in (torch.float32, torch.float64):
            return self.slope_rate[:, 0, 0].to(torch.float32)
        dev = self.slope_rate.device
        if self._decay is None or self._decay.device != dev:
            self._decay = layer_decay(lightning_slopes(self.num_attention_heads), self.layer_idx,
                                      self.num_hidden_layers).to(dev)
        return self._decay

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, return_state: bool = False,
                attention_mask: torch.Tensor | None = None, *, process_group=None):
        """Args:
            x: `[B, T, hidden_size]`.
            state: float32 `[B, H, head_dim, head_dim]` from a previous call, or None. On a
                single-token decoding step (no grad) it is updated in place and returned.
            return_state: also return the state after the last token.
            attention_mask: optional `[B, T]` padding mask (0 = padding), zeroing padded tokens'
                q/k/v as transformers does.
            process_group: overrides the constructor's; with a group, `x` is this rank's contiguous
                shard, `state` the state before the whole sequence, and the returned state the whole
                sequence's final state.

        Returns:
            `y [B, T, hidden_size]`, or `(y, state)` when `return_state`.
        """
        B, T, _ = x.shape
        H, D = self.num_attention_heads, self.head_dim
        qkv = F.silu(self.qkv_proj(x))
        if attention_mask is not None:
            qkv = (qkv * attention_mask[:, :, None]).to(qkv.dtype)
        q, k, v = qkv.view(B, T, H, 3 * D).split(D, dim=-1)
        group = process_group if process_group is not None else self.process_group
        if group is not None:
            o, new_state = cp_lightning_attention(q, k, v, self.decay, group=group, scale=1.0, initial_state=state,
                                                  output_final_state=return_state, backend=self.backend)
        elif _use_step(x, state):
            o = linear_attention_step(q, k, v, state, decay=self.decay, scale=1.0, backend=self.backend)
            new_state = state
        else:
            o, new_state = lightning_attention(q, k, v, self.decay, scale=1.0, initial_state=state,
                                               output_final_state=return_state, backend=self.backend)
        o = self.norm(o.reshape(B, T, H * D))
        y = self.out_proj(torch.sigmoid(self.output_gate(x)) * o)
        return (y, new_state) if return_state else y


class LinearAttention(nn.Module):
    """Multi-head linear attention with q/k/v/o projections (GQA allowed).

    `o = linear_attention(φ(q), φ(k), v)` with feature map `feature_map`, optional normalisation
    and causal or non-causal form, then `o_proj`.

    Args:
        hidden_size: model width.
        num_heads: query heads `H`; `num_kv_heads` key/value heads (`None`: `H`).
        feature_map: `"elu"` (default), `"relu"`, `None` or a callable.
        normalize: divide by `φ(q)·z + eps` (default True).
        causal: causal recurrence (default) or totals over the sequence.
        head_dim: default `hidden_size // num_heads`. bias: projection biases.
        scale: multiplies q before φ (default `head_dim ** -0.5`).
        backend: attnkit backend for the ops (`None`: automatic).
        process_group: context parallelism: a `torch.distributed` process group; `forward` then takes
            this rank's contiguous shard of the sequence (`attnkit.distributed.linear_attention`).

    Example:
        >>> layer = attnkit.nn.LinearAttention(512, 8, num_kv_heads=2)
        >>> y, state = layer(x, return_state=True)
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 feature_map: Any = "elu", normalize: bool = True, causal: bool = True,
                 head_dim: int | None = None, *, bias: bool = False, scale: float | None = None, eps: float = 1e-6,
                 backend: str | None = None, process_group=None, device=None, dtype=None) -> None:
        super().__init__()
        self.process_group = process_group
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        self.head_dim = head_dim or hidden_size // num_heads
        self.feature_map = feature_map
        self.normalize = normalize
        self.causal = causal
        self.scale = scale
        self.eps = eps
        self.backend = backend
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, **kw)
        self.k_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, **kw)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, **kw)

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = False, *, process_group=None):
        """Args:
            x: `[B, T, hidden_size]`.
            state: `S [B, Hk, D, D]` float32 (or `(S, z)` when `normalize`) from a previous call. On
                a single-token causal decoding step (no grad) it is updated in place and returned.
            return_state: also return the state after the last token.
            process_group: overrides the constructor's; with a group, `x` is this rank's contiguous
                shard and the states are those of the whole sequence.

        Returns:
            `y [B, T, hidden_size]`, or `(y, state)` when `return_state`.
        """
        B, T, _ = x.shape
        D = self.head_dim
        q = self.q_proj(x).view(B, T, self.num_heads, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, D)
        kw = dict(feature_map=self.feature_map, normalize=self.normalize, scale=self.scale, eps=self.eps,
                  backend=self.backend)
        group = process_group if process_group is not None else self.process_group
        if group is not None:
            o, new_state = cp_linear_attention(q, k, v, group=group, causal=self.causal, initial_state=state,
                                               output_final_state=return_state, **kw)
        elif _use_step(x, state, self.causal):
            o = linear_attention_step(q, k, v, state, **kw)
            new_state = state
        else:
            o, new_state = linear_attention(q, k, v, causal=self.causal, initial_state=state,
                                            output_final_state=return_state, **kw)
        y = self.o_proj(o.reshape(B, T, self.num_heads * D))
        return (y, new_state) if return_state else y
