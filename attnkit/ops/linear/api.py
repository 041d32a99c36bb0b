"""Public linear-attention and lightning-attention ops: validation, then dispatch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ... import _custom_ops, dispatch
from ..._validation import (
    REFERENCE_DTYPES,
    SMALL_READ,
    check_cu_seqlens,
    check_float_scale,
    check_index,
    cu_seqlens_values,
    dtype_name,
    expect_bool,
    expect_float,
    expect_heads,
    expect_ndim,
    expect_positive_float,
    expect_same_device,
    expect_same_dtype,
    expect_shape,
    expect_tensor,
    index_values,
    value_checks_enabled,
)
from . import reference

FEATURE_MAPS = (None, "elu", "relu")

# ------------------------------------------------------------------------------------- helpers


def _check_qkv(q, k, v, *, step: bool = False):
    layout = "[B, 1, H, Dk]" if step else "[B, T, H, Dk]"
    expect_ndim("q", q, 4, layout)
    expect_ndim("k", k, 4, layout.replace("H", "Hk"))
    expect_ndim("v", v, 4, layout.replace("H, Dk", "Hk, Dv"))
    expect_float("q", q, REFERENCE_DTYPES)
    expect_same_dtype(("q", "k", "v"), (q, k, v))
    expect_same_device(("q", "k", "v"), (q, k, v))
    B, T, H, Dk = q.shape
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T):
        raise ValueError(f"q, k and v must share batch and time dims [B, T] = [{B}, {T}], "
                         f"got k {list(k.shape)} and v {list(v.shape)}")
    if step and T != 1:
        raise ValueError(f"q must hold exactly one token per row ([B, 1, H, Dk]), got {list(q.shape)}")
    if k.shape[3] != Dk:
        raise ValueError(f"k must have the head dim of q (Dk = {Dk}), got {k.shape[3]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have as many heads as k (Hk = {k.shape[2]}), got {v.shape[2]}")
    expect_heads("q", H, "k", k.shape[2])
    return B, T, H, k.shape[2], Dk, v.shape[3]


def _state_dtypes(q: torch.Tensor) -> tuple[torch.dtype, ...]:
    return (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)


def _check_state_tensor(name: str, s: Any, shape, layout: str, q: torch.Tensor) -> None:
    expect_tensor(name, s)
    expect_shape(name, s, shape, layout)
    allowed = _state_dtypes(q)
    if s.dtype not in allowed:
        raise TypeError(f"{name} must be float32 (recurrent states are float32), got {dtype_name(s.dtype)}")
    if s.device != q.device:
        raise ValueError(f"{name} must be on the same device as q ({q.device}), got {s.device}")


def _check_state(name: str, state: Any, normalize: bool, N: int, Hs: int, Hk: int, Dk: int, Dv: int,
                 q: torch.Tensor, hs_name: str) -> None:
    """S `[N, Hs, Dk, Dv]`, or `(S, z)` with z `[N, Hk, Dk]` when normalize."""
    s_layout = f"[N, {hs_name}, Dk, Dv]"
    if normalize:
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"{name} must be a tuple (S, z) when normalize=True, got {type(state).__name__}")
        _check_state_tensor(f"{name}[0] (S)", state[0], (N, Hs, Dk, Dv), s_layout, q)
        _check_state_tensor(f"{name}[1] (z)", state[1], (N, Hk, Dk), "[N, Hk, Dk]", q)
    else:
        if isinstance(state, (tuple, list)):
            raise TypeError(f"{name} must be a tensor S {s_layout} when normalize=False, got a tuple")
        _check_state_tensor(name, state, (N, Hs, Dk, Dv), s_layout, q)


def _check_feature_map(feature_map: Any) -> str | Callable | None:
    if feature_map is None or callable(feature_map):
        return feature_map
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be None, 'elu', 'relu' or a callable, got {feature_map!r}")
        return feature_map
    raise TypeError(f"feature_map must be None, 'elu', 'relu' or a callable, got {type(feature_map).__name__}")


def _check_decay(decay: Any, H: int, q: torch.Tensor) -> None:
    """Shape, dtype and device of `decay` (its values: :func:`_decay_values`)."""
    if decay is None:
        return
    expect_tensor("decay", decay)
    expect_shape("decay", decay, (H,), "[H]")
    if decay.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"decay must be float32, got {dtype_name(decay.dtype)}")
    if decay.device != q.device:
        raise ValueError(f"decay must be on the same device as q ({q.device}), got {decay.device}")


def _decay_values(decay: torch.Tensor | None) -> None:
    """Every entry of `decay` >= 0 (NaN fails), read in one transfer."""
    if decay is None:
        return
    if decay.numel() <= SMALL_READ:
        vals = decay.tolist()
        ok = all(d >= 0 for d in vals)
    else:
        ok, vals = bool((decay >= 0).all()), None
    if not ok:
        raise ValueError(f"decay must have every entry >= 0 (λ = exp(-decay) <= 1), "
                         f"got {vals if vals is not None else decay.tolist()}")


def _features(q, k, v, state, **flags) -> frozenset[str]:
    tensors = [q, k, v, *(state if isinstance(state, (tuple, list)) else [state])]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out = {name for name, on in flags.items() if on}
    if grad:
        out.add("grad")
    return frozenset(out)


# --------------------------------------------------------------------------------- linear attention


@dispatch.op("linear_attention")
def _prepare_linear_attention(q, k, v, *, causal=True, feature_map=None, normalize=False, scale=None, eps=1e-6,
                              initial_state=None, output_final_state=False, cu_seqlens=None) -> dispatch.Call:
    B, T, H, Hk, Dk, Dv = _check_qkv(q, k, v)
    causal = expect_bool("causal", causal)
    normalize = expect_bool("normalize", normalize)
    output_final_state = expect_bool("output_final_state", output_final_state)
    fm = _check_feature_map(feature_map)
    scale = check_float_scale(scale, Dk)
    eps = expect_positive_float("eps", eps)
    N = check_cu_seqlens("cu_seqlens", cu_seqlens, T, B, values=False)
    if cu_seqlens is not None:
        expect_same_device(("q", "cu_seqlens"), (q, cu_seqlens))
    N = B if N is None else N
    if initial_state is not None:
        _check_state("initial_state", initial_state, normalize, N, Hk, Hk, Dk, Dv, q, "Hk")
    if callable(fm):
        # a user callable runs outside the kernels: φ(scale·q), φ(k), then the identity map
        q, k, fm, scale = fm(q * scale), fm(k), None, 1.0
        if not isinstance(q, torch.Tensor) or q.shape != (B, T, H, Dk) or k.shape != (B, T, Hk, Dk):
            raise ValueError("feature_map callable must map each tensor to one of the same shape")
    inputs = dispatch.Inputs(
        "linear_attention", q.device, q.dtype, (Dk, Dv),
        _features(q, k, v, initial_state, varlen=cu_seqlens is not None, causal=causal, normalize=normalize,
                  initial_state=initial_state is not None, final_state=output_final_state,
                  **{f"feature_map={fm}": fm is not None}))
    kwargs = dict(q=q, k=k, v=v, causal=causal, feature_map=fm, normalize=normalize, scale=scale, eps=eps,
                  initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None and value_checks_enabled(cu_seqlens):
        _linear_attention_values(kwargs)
    return dispatch.Call(inputs, kwargs)


def _linear_attention_values(kw: dict) -> None:
    """The checks of `linear_attention` that read tensor values (packed-sequence offsets)."""
    if kw["cu_seqlens"] is not None:
        cu_seqlens_values("cu_seqlens", kw["cu_seqlens"], kw["q"].shape[1])


_LINEAR_ATTENTION = dispatch.fast("linear_attention", _prepare_linear_attention, _linear_attention_values)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                     feature_map: str | Callable | None = None, normalize: bool = False,
                     scale: float | None = None, eps: float = 1e-6,
                     initial_state: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
                     output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                     backend: str | None = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
    """Linear attention (causal or not) with feature maps, optional normalisation and states.

    Causal: `S_t = S_{t-1} + φ(k_t)ᵀ v_t`, `o_t = φ(q_t) S_t`; with `normalize=True` also
    `z_t = z_{t-1} + φ(k_t)` and `o_t = φ(q_t) S_t / (φ(q_t)·z_t + eps)`. Non-causal: the same with
    the totals over the whole sequence. `q` is multiplied by `scale` before `φ`.

    Args:
        q: `[B, T, H, Dk]`. k: `[B, T, Hk, Dk]`. v: `[B, T, Hk, Dv]`, with `H % Hk == 0`; query head
            `h` reads KV head `h // (H // Hk)`.
        causal: causal recurrence (default) or totals over the sequence.
        feature_map: `None` (identity), `"elu"` (`elu(x) + 1`), `"relu"` or a callable applied
            elementwise to `scale * q` and to `k` (outside the fused kernels).
        normalize: divide by `φ(q)·z + eps`.
        scale: multiplies `q` first; default `Dk ** -0.5`.
        eps: denominator epsilon when `normalize=True`.
        initial_state: `S [N, Hk, Dk, Dv]` float32, or `(S, z [N, Hk, Dk])` when `normalize=True`.
        output_final_state: return the final state in the same form.
        cu_seqlens: int32 `[N + 1]` offsets of packed sequences (then `B == 1`).
        backend: `None` (automatic), `"reference"`, `"triton"` or `"cuda"`.

    Returns:
        `(o, state)`: `o [B, T, H, Dv]` in q's dtype; `state` is `None` unless `output_final_state`.

    Example:
        >>> q = torch.randn(2, 128, 8, 64); k = torch.randn(2, 128, 2, 64); v = torch.randn(2, 128, 2, 64)
        >>> o, (S, z) = attnkit.linear_attention(q, k, v, feature_map="elu", normalize=True,
        ...                                      output_final_state=True)
    """
    return _LINEAR_ATTENTION(backend, q, k, v, causal, feature_map, normalize, scale, eps, initial_state,
                             output_final_state, cu_seqlens)


# ------------------------------------------------------------------------------ lightning attention


@dispatch.op("lightning_attention")
def _prepare_lightning_attention(q, k, v, decay=None, *, scale=None, initial_state=None,
                                 output_final_state=False, cu_seqlens=None) -> dispatch.Call:
    B, T, H, Hk, Dk, Dv = _check_qkv(q, k, v)
    _check_decay(decay, H, q)
    scale = check_float_scale(scale, Dk)
    output_final_state = expect_bool("output_final_state", output_final_state)
    N = check_cu_seqlens("cu_seqlens", cu_seqlens, T, B, values=False)
    if cu_seqlens is not None:
        expect_same_device(("q", "cu_seqlens"), (q, cu_seqlens))
    N = B if N is None else N
    if initial_state is not None:
        _check_state("initial_state", initial_state, False, N, H, Hk, Dk, Dv, q, "H")
    inputs = dispatch.Inputs(
        "lightning_attention", q.device, q.dtype, (Dk, Dv),
        _features(q, k, v, initial_state, varlen=cu_seqlens is not None, decay=decay is not None,
                  decay_grad=decay is not None and decay.requires_grad and torch.is_grad_enabled(),
                  initial_state=initial_state is not None, final_state=output_final_state))
    kwargs = dict(q=q, k=k, v=v, decay=decay, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if value_checks_enabled(decay, cu_seqlens):
        _lightning_attention_values(kwargs)
    return dispatch.Call(inputs, kwargs)


def _lightning_attention_values(kw: dict) -> None:
    """The checks of `lightning_attention` that read tensor values: `decay >= 0`, the offsets."""
    _decay_values(kw["decay"])
    if kw["cu_seqlens"] is not None:
        cu_seqlens_values("cu_seqlens", kw["cu_seqlens"], kw["q"].shape[1])


_LIGHTNING_ATTENTION = dispatch.fast("lightning_attention", _prepare_lightning_attention,
                                     _lightning_attention_values)


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None = None, *,
                        scale: float | None = None, initial_state: torch.Tensor | None = None,
                        output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                        backend: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention with a per-head exponential decay (Lightning Attention-2, MiniMax-01).

    `λ_h = exp(-decay[h])`, `S_t = λ_h S_{t-1} + k_tᵀ v_t`, `o_t = scale · q_t S_t`.

    Args:
        q: `[B, T, H, Dk]`. k: `[B, T, Hk, Dk]`. v: `[B, T, Hk, Dv]` (GQA: query head `h` reads KV
            head `h // (H // Hk)`; the state is still per query head).
        decay: float32 `[H]`, every entry `>= 0`; `None` means no decay. See `lightning_slopes` and
            `layer_decay` for the MiniMax/TransNormerLLM values.
        scale: default `Dk ** -0.5`; `scale=1.0` reproduces Lightning Attention and MiniMax-01.
        initial_state: float32 `[N, H, Dk, Dv]` (`N = B`, or the number of packed sequences).
        output_final_state: also return the final state `[N, H, Dk, Dv]` (float32).
        cu_seqlens: int32 `[N + 1]` offsets of packed sequences (then `B == 1`).
        backend: `None` (automatic), `"reference"`, `"triton"` or `"cuda"`.

    Returns:
        `(o [B, T, H, Dv], state or None)`.

    Example:
        >>> decay = attnkit.layer_decay(attnkit.lightning_slopes(16), layer_idx=3, num_layers=8)
        >>> o, S = attnkit.lightning_attention(q, k, v, decay, scale=1.0, output_final_state=True)
    """
    return _LIGHTNING_ATTENTION(backend, q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens)


# -------------------------------------------------------------------------------------- decode step


@dispatch.op("linear_attention_step")
def _prepare_linear_attention_step(q, k, v, state, *, decay=None, scale=None, feature_map=None, normalize=False,
                                   eps=1e-6, state_indices=None) -> dispatch.Call:
    B, _, H, Hk, Dk, Dv = _check_qkv(q, k, v, step=True)
    normalize = expect_bool("normalize", normalize)
    fm = _check_feature_map(feature_map)
    scale = check_float_scale(scale, Dk)
    eps = expect_positive_float("eps", eps)
    S = state[0] if isinstance(state, (tuple, list)) else state
    expect_tensor("state" + ("[0]" if S is not state else ""), S)
    expect_ndim("state", S, 4, "[N, H or Hk, Dk, Dv]")
    N = S.shape[0]
    if decay is not None:
        if fm is not None or normalize:
            raise ValueError("feature_map and normalize are not allowed with decay (the lightning recurrence); "
                             f"got feature_map={feature_map!r}, normalize={normalize}")
        _check_decay(decay, H, q)
        mode = "lightning"
    elif normalize or isinstance(state, (tuple, list)):
        if not normalize:
            raise ValueError("state is a tuple (S, z): pass normalize=True, or pass S alone")
        mode = "linear"
    elif S.shape[1] == Hk:
        mode = "linear"
    elif S.shape[1] == H:
        if fm is not None:
            raise ValueError(f"feature_map needs the linear-attention state [N, Hk={Hk}, Dk, Dv]; "
                             f"got a per-query-head state {list(S.shape)}")
        mode = "lightning"
    else:
        raise ValueError(f"state must have shape [N, Hk={Hk}, Dk={Dk}, Dv={Dv}] (linear attention) or "
                         f"[N, H={H}, Dk, Dv] (lightning), got {list(S.shape)}")
    Hs = H if mode == "lightning" else Hk
    _check_state("state", state, normalize, N, Hs, Hk, Dk, Dv, q, "H" if mode == "lightning" else "Hk")
    if state_indices is not None:
        check_index("state_indices", state_indices, B, N, f"rows of state, N = {N}",
                    dtypes=(torch.int32, torch.int64), values=False)
        expect_same_device(("q", "state_indices"), (q, state_indices))
    elif N < B:
        raise ValueError(f"state must have at least B = {B} rows when state_indices is None, got {N}")
    if callable(fm):
        q, k, fm, scale = fm(q * scale), fm(k), None, 1.0
    inputs = dispatch.Inputs(
        "linear_attention_step", q.device, q.dtype, (Dk, Dv),
        frozenset({f"mode={mode}", *(["decay"] if decay is not None else []), *(["normalize"] if normalize else []),
                   *([f"feature_map={fm}"] if fm is not None else []),
                   *(["state_indices"] if state_indices is not None else [])}))
    kwargs = dict(q=q, k=k, v=v, state=state, mode=mode, decay=decay, scale=scale, feature_map=fm,
                  normalize=normalize, eps=eps, state_indices=state_indices)
    if value_checks_enabled(decay, state_indices):
        _linear_attention_step_values(kwargs)
    return dispatch.Call(inputs, kwargs)


def _linear_attention_step_values(kw: dict) -> None:
    """The checks of `linear_attention_step` that read tensor values: `decay >= 0`, and
    `state_indices` in range and distinct (one read of `state_indices` when it is small)."""
    _decay_values(kw["decay"])
    idx = kw["state_indices"]
    if idx is None or idx.numel() == 0:
        return
    state = kw["state"]
    N = (state[0] if isinstance(state, (tuple, list)) else state).shape[0]
    B = idx.shape[0]
    if B <= SMALL_READ:
        vals = idx.tolist()
        lo, hi, distinct = min(vals), max(vals), len(set(vals)) == B
    else:
        lo, hi = (int(t) for t in torch.aminmax(idx))
        distinct, vals = None, None
    if lo < 0 or hi >= N:
        raise ValueError(f"state_indices values must be in 0..{N - 1} (rows of state, N = {N}), "
                         f"got values in {lo}..{hi}")
    if distinct is None:
        distinct = idx.unique().numel() == B
    if not distinct:
        raise ValueError(f"state_indices must not repeat a row within one step, "
                         f"got {vals if vals is not None else idx.tolist()}")


_LINEAR_ATTENTION_STEP = dispatch.fast("linear_attention_step", _prepare_linear_attention_step,
                                       _linear_attention_step_values)


def linear_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          state: torch.Tensor | tuple[torch.Tensor, torch.Tensor], *,
                          decay: torch.Tensor | None = None, scale: float | None = None,
                          feature_map: str | Callable | None = None, normalize: bool = False, eps: float = 1e-6,
                          state_indices: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """One decoding step of linear or lightning attention; updates `state` in place.

    With `decay` this is the lightning recurrence (state `[N, H, Dk, Dv]`). Without it the op follows
    the state it is given: `[N, Hk, Dk, Dv]` (or `(S, z)` with `normalize=True`) is the
    linear-attention recurrence, `[N, H, Dk, Dv]` is lightning without decay. Running it token by
    token equals the chunked op with `output_final_state=True`. Inference only.

    Args:
        q: `[B, 1, H, Dk]`. k: `[B, 1, Hk, Dk]`. v: `[B, 1, Hk, Dv]`.
        state: float32 state as above; row `state_indices[b]` (or `b`) is read and updated in place.
        decay: float32 `[H]` (`>= 0`) for the lightning recurrence.
        scale, feature_map, normalize, eps: as in `linear_attention` / `lightning_attention`.
        state_indices: int32/int64 `[B]`, distinct rows of `state` (continuous batching). A
            repeated row would be updated by two programs at once (a race): it is rejected with a
            ValueError when value checks run (CPU tensors; CUDA with `ATTNKIT_CHECKS=1`, never
            during CUDA-graph capture); unchecked, the result for that row is undefined.
        backend: `None` (automatic), `"reference"`, `"triton"` or `"cuda"`.

    Returns:
        `o [B, 1, H, Dv]` in q's dtype.

    Example:
        >>> S = torch.zeros(4, 16, 64, 64)  # from lightning_attention(..., output_final_state=True)
        >>> o = attnkit.linear_attention_step(q, k, v, S, decay=decay, scale=1.0)
    """
    return _LINEAR_ATTENTION_STEP(backend, q, k, v, state, decay, scale, feature_map, normalize, eps,
                                  state_indices)


# ----------------------------------------------------------------------------------- decay helpers


def lightning_slopes(num_heads: int) -> torch.Tensor:
    """Per-head decay slopes of Lightning Attention / MiniMax-01: `2 ** (-8 * (i + 1) / H)`.

    Returns:
        float32 `[num_heads]`.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if _custom_ops.through_op():  # traced: torch.ops.attnkit.lightning_slopes (docs/compile.md)
        return _custom_ops.OPS["lightning_slopes"](num_heads)
    return _lightning_slopes(num_heads)


def _lightning_slopes(num_heads: int) -> torch.Tensor:
    """The body of :func:`lightning_slopes` and of its op (validated `num_heads`)."""
    i = torch.arange(num_heads, dtype=torch.float64)
    return torch.pow(2.0, -8.0 * (i + 1) / num_heads).to(torch.float32)


def layer_decay(slopes: torch.Tensor, layer_idx: int, num_layers: int) -> torch.Tensor:
    """Scale slopes by depth as MiniMax-01 does: `slopes * (1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5)`.

    Returns:
        float32, the shape of `slopes`.
    """
    expect_tensor("slopes", slopes)
    for name, val in (("layer_idx", layer_idx), ("num_layers", num_layers)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be in 0..{num_layers - 1}, got {layer_idx}")
    if _custom_ops.through_op(slopes):  # traced: torch.ops.attnkit.layer_decay (docs/compile.md)
        return _custom_ops.OPS["layer_decay"](slopes, layer_idx, num_layers)
    return _layer_decay(slopes, layer_idx, num_layers)


def _depth_factor(layer_idx: int, num_layers: int) -> float:
    return 1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5


def _layer_decay(slopes: torch.Tensor, layer_idx: int, num_layers: int) -> torch.Tensor:
    """The body of :func:`layer_decay` and of its op (validated arguments)."""
    return (slopes.to(torch.float32) * _depth_factor(layer_idx, num_layers)).to(torch.float32)


# --------------------------------------------------------------------------------- registrations

_REF_DTYPES = REFERENCE_DTYPES
dispatch.register("linear_attention", "reference", reference.linear_attention, dtypes=_REF_DTYPES)
dispatch.register("lightning_attention", "reference", reference.lightning_attention, dtypes=_REF_DTYPES)
dispatch.register("linear_attention_step", "reference", reference.linear_attention_step, dtypes=_REF_DTYPES)
