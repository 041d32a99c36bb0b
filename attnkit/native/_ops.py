"""The ``cuda`` backend implementations (contract signatures of docs/contracts.md).

Each function puts its already-validated arguments in kernel form (unit stride in the last dim,
float32 weights and states, int64 state indices), calls the extension on the tensors' device and
current CUDA stream, and returns what the contract says. Inputs whose memory layout a kernel
cannot address directly are handled here without changing the result: read-only inputs are
copied, and tensors updated in place (caches, states) are updated through a copy that is then
written back, so in-place semantics always hold.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ..dispatch import BackendUnavailable
from . import _build

_FEATURE_MAPS = {None: 0, "elu": 1, "relu": 2}
_NORM_MODES = {"rms": 0, "l2": 1}


def _ext():
    try:
        return _build.module()
    except RuntimeError as e:
        raise BackendUnavailable(f"cuda backend: {e}") from e


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch(x: torch.Tensor):
    """(device context, stream handle, SM count) for a kernel launch on x's device."""
    if x.device.type != "cuda":
        return contextlib.nullcontext(), 0, 0
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    ctx = torch.cuda.device(index) if index != torch.cuda.current_device() else contextlib.nullcontext()
    return ctx, torch.cuda.current_stream(index).cuda_stream, _num_sms(index)


def _unit_last(x: torch.Tensor | None) -> torch.Tensor | None:
    """x with unit stride in the last dim (a copy only if needed)."""
    if x is None or x.shape[-1] <= 1 or x.stride(-1) == 1:
        return x
    return x.contiguous()


def _vector_ready(x: torch.Tensor) -> bool:
    """Whether CUDA 16-byte loads can address x's rows in place (aligned base and strides)."""
    if x.device.type != "cuda":
        return x.shape[-1] <= 1 or x.stride(-1) == 1
    step = 16 // x.element_size()
    return (x.stride(-1) == 1 and x.data_ptr() % 16 == 0
            and all(s % step == 0 for s in x.stride()[:-1]))


# ------------------------------------------------------------------------------ attention_decode


@torch.no_grad()
def attention_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, window=(-1, -1), softcap=0.0,
                     block_table=None):
    B, Tq, H, _ = q.shape
    Dv = v_cache.shape[3]
    if B == 0 or Tq == 0 or H == 0:
        return q.new_empty(B, Tq, H, Dv)
    ext = _ext()
    lens = cache_seqlens.contiguous()
    q, k_new, v_new = _unit_last(q), _unit_last(k_new), _unit_last(v_new)
    kc, vc = k_cache, v_cache
    if not (_vector_ready(kc) and _vector_ready(vc)):
        # The kernel cannot address these caches in place: append with indexing (as the reference
        # does), then attend over copies that hold the same tokens.
        if k_new is not None:
            pos = lens.long()[:, None] + torch.arange(Tq, device=q.device)
            rows = torch.arange(B, device=q.device)[:, None].expand(B, Tq)
            if block_table is not None:
                bs = k_cache.shape[1]
                rows, pos = block_table[rows, pos // bs].long(), pos % bs
            k_cache[rows, pos] = k_new
            v_cache[rows, pos] = v_new
        kc, vc = k_cache.contiguous(), v_cache.contiguous()
    ctx, stream, sms = _launch(q)
    with ctx:
        return ext.attention_decode(q, kc, vc, lens, k_new, v_new, float(scale), int(window[0]), float(softcap),
                                    block_table, stream, sms)


# ------------------------------------------------------------------------- loki_attention_decode


@torch.no_grad()
def loki_attention_decode(q, k_cache_rot, v_cache, cache_seqlens, components, rank, top_k, scale, selection,
                          block_table=None):
    B, _, H, _ = q.shape
    Dv = v_cache.shape[3]
    # Paged ([num_blocks, block_size, Hk, D] caches): a row holds max_blocks * block_size positions.
    Smax = v_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    if B == 0 or H == 0 or Smax == 0:
        return q.new_zeros(B, 1, H, Dv)
    ext = _ext()
    k, v = k_cache_rot, v_cache
    if not _vector_ready(k):
        k = k.contiguous()
    if not _vector_ready(v):
        v = v.contiguous()
    comps = components.to(torch.float32).contiguous()
    ctx, stream, sms = _launch(q)
    with ctx:
        return ext.loki_attention_decode(_unit_last(q), k, v, cache_seqlens.contiguous(), comps, int(rank),
                                         int(top_k), float(scale), selection == "group", block_table, stream, sms)


# ------------------------------------------------------------------------- linear_attention_step


def _kernel_state(S: torch.Tensor) -> bool:
    """Whether the kernel can update S `[N, Hs, Dk, Dv]` in place: contiguous `[Dk, Dv]` blocks."""
    return S.stride(3) == 1 and S.stride(2) == S.shape[3]


@torch.no_grad()
def linear_attention_step(q, k, v, state, mode, decay, scale, feature_map, normalize, eps, state_indices):
    B, _, H, _ = q.shape
    Dv = v.shape[3]
    S, z = state if normalize else (state, None)
    if B == 0 or H == 0:
        return q.new_empty(B, 1, H, Dv)
    ext = _ext()
    S_k = S if _kernel_state(S) else S.contiguous()
    z_k = z if z is None or z.stride(2) == 1 else z.contiguous()
    decay_k = None if decay is None else decay.to(torch.float32).contiguous()
    idx = None if state_indices is None else state_indices.to(torch.int64).contiguous()
    ctx, stream, _ = _launch(q)
    with ctx:
        o = ext.linear_attention_step(_unit_last(q), _unit_last(k), _unit_last(v), S_k, z_k, mode == "lightning",
                                      decay_k, float(scale), _FEATURE_MAPS[feature_map], float(eps), idx, stream)
    if S_k is not S:  # updated through a copy: write it back
        S.copy_(S_k)
    if z_k is not z:
        z.copy_(z_k)
    return o


# ------------------------------------------------------------------------------------ qk_norm


def _float_weight(w: torch.Tensor | None) -> torch.Tensor | None:
    return None if w is None else w.detach().to(torch.float32).contiguous()


@torch.no_grad()
def qk_norm(x, weight, mode, eps):
    if x.numel() == 0:
        return torch.empty_like(x)
    ext = _ext()
    ctx, stream, _ = _launch(x)
    with ctx:
        return ext.qk_norm(x.contiguous(), _float_weight(weight), _NORM_MODES[mode], float(eps), stream)


def _check_rope_table(name: str, t, B: int, T: int, D: int, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] != T:
        raise ValueError(f"{name} must have shape [T, rot] or [B, T, rot] with T = {T}, B = {B}, "
                         f"got {list(t.shape)}")
    rot = t.shape[2]
    if rot % 2 or not 0 < rot <= D:
        raise ValueError(f"{name} must have an even last dim rot in 2..D = {D} (the rotary dims), got {rot}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on the same device as q ({device}), got {t.device}")
    return t.to(torch.float32).contiguous()


def qk_norm_rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                  q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                  mode: str | None = "rms", eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head QK-norm then rotary embedding, applied in place to `q` and `k` (one fused kernel).

    For every head row `x` of q (weight `q_weight`) and of k (weight `k_weight`):
    `y = x * rsqrt(mean(x²) + eps) * w` (`mode="rms"`; `"l2"` uses `sum(x²)`; `None` skips the
    norm), then RoPE with the Llama / Qwen3 `rotate_half` convention on the first `rot` dims:
    `y[:rot] = y[:rot] * cos + rotate_half(y[:rot]) * sin` with
    `rotate_half(u) = cat(-u[rot/2:], u[:rot/2])`; dims past `rot` are only normalised. The norm
    comes before RoPE (Qwen3 `q_norm`/`k_norm`). Computed in float32, rounded once to q's dtype.

    Args:
        q: `[B, T, H, D]` (float32/float16/bfloat16), unit stride in the last dim; updated in place.
        k: `[B, T, Hk, D]`, same dtype and device; updated in place.
        cos, sin: `[T, rot]` or `[B or 1, T, rot]` (the tables `transformers` rotary embeddings
            return, per position), any float dtype; `rot` even and `<= D`.
        q_weight, k_weight: `[D]` norm weights (float32 or q's dtype), default ones.
        mode: `"rms"` (default), `"l2"` or `None` (RoPE only).
        eps: added to the mean (or sum) of squares. Default 1e-6.

    Returns:
        `(q, k)`, the same tensors, modified.

    Example:
        >>> cos, sin = rotary(x, position_ids)            # [B, T, D] each
        >>> attnkit.native.qk_norm_rope_(q, k, cos, sin, q_weight=q_norm.weight, k_weight=k_norm.weight)
    """
    for n, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{n} must have shape [B, T, heads, D] (4 dims), got {list(x.shape)}")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{n} must be float32, float16 or bfloat16, got {x.dtype}")
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            raise ValueError(f"{n} must have unit stride in its last dim to be updated in place, "
                             f"got strides {list(x.stride())}")
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{n} must be a CPU or CUDA tensor, got {x.device}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise ValueError(f"{n} requires grad: qk_norm_rope_ is an in-place inference op; "
                             "run it under torch.no_grad()")
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k must have shape [B, T, Hk, D] = [{B}, {T}, Hk, {D}], got {list(k.shape)}")
    if k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"k must have q's dtype and device ({q.dtype}, {q.device}), got ({k.dtype}, {k.device})")
    if mode is not None and mode not in _NORM_MODES:
        raise ValueError(f"mode must be 'rms', 'l2' or None, got {mode!r}")
    if mode is None and (q_weight is not None or k_weight is not None):
        raise ValueError("q_weight/k_weight were given with mode=None (RoPE only): pass mode='rms' or "
                         "'l2' to normalise, or drop the weights")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    cos_k = _check_rope_table("cos", cos, B, T, D, q.device)
    sin_k = _check_rope_table("sin", sin, B, T, D, q.device)
    if cos_k.shape != sin_k.shape:
        raise ValueError(f"cos and sin must have the same shape, got {list(cos.shape)} and {list(sin.shape)}")
    weights = []
    for n, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None:
            if not isinstance(w, torch.Tensor) or w.shape != (D,):
                raise ValueError(f"{n} must be a tensor of shape [D] = [{D}], got "
                                 f"{list(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
            if w.dtype not in (torch.float32, q.dtype) or w.device != q.device:
                raise ValueError(f"{n} must be float32 or q's dtype on q's device, got {w.dtype} on {w.device}")
        weights.append(_float_weight(w))
    if q.numel() == 0 and k.numel() == 0:
        return q, k
    ext = _ext()
    ctx, stream, _ = _launch(q)
    with ctx, torch.no_grad():
        ext.qk_norm_rope_(q, k, cos_k, sin_k, weights[0], weights[1], mode is not None,
                          _NORM_MODES.get(mode, 0), float(eps), stream)
    return q, k
