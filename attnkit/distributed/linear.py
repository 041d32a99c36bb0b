"""Context-parallel linear and lightning attention (LASP-2 style).

Rank `r` of `P` holds tokens `[r·L, (r+1)·L)` (contiguous layout, `L = T/P`). The recurrence
`S_t = λ S_{t-1} + k_tᵀ v_t` is linear in the state, so the state entering rank `r`'s shard is a
decayed sum of the other shards' local states:

    M_j   = Σ_{t<L} λ^(L-1-t) k_tᵀ v_t          (shard j's state from a zero start)
    S_in  = λ^(rL) S_0 + Σ_{j<r} λ^((r-1-j)L) M_j
    S_fin = λ^(PL) S_0 + Σ_{j<P} λ^((P-1-j)L) M_j

Each rank computes its `M_r` (one GEMM), starts one async all-gather of the `M` (`[B, Hs, Dk, Dv]`
in the compute dtype, `+ z` with `normalize`), runs the local op from a zero state while the
states travel, then adds `scale · λ^(t+1) q_t S_in` (the contribution of the incoming state).
With `normalize=True` the division does not split, so the local pass runs after the gather, with
`initial_state=(S_in, z_in)`. The backward of the all-gather is a reduce-scatter of the same size;
everything else is local autograd. Derivation and volumes: `docs/distributed.md`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..ops.linear import api as _api
from ..ops.linear.reference import compute_dtype, feature
from . import _comm

__all__ = ["lightning_attention", "linear_attention"]


def _dtype_code(dtype: torch.dtype) -> int:
    return {torch.float64: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4}.get(dtype, 0)


def _needs_grad(*xs) -> list[int]:
    on = torch.is_grad_enabled()
    return [int(on and isinstance(x, torch.Tensor) and x.requires_grad) for x in xs]


def _check_group_shapes(group, world, q, k, v, *extra) -> None:
    """Same shard shapes, dtype, options and requires-grad flags on every rank (or one ValueError everywhere)."""
    values = [*q.shape, *k.shape, *v.shape, _dtype_code(q.dtype), *extra, *_needs_grad(q, k, v)]
    _comm.check_same_everywhere("the shard shapes, dtype, options and requires_grad of q, k, v", values,
                                group, world, q.device, q, k, v)


def _pack(*xs: torch.Tensor | None) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in xs if x is not None])


def _unpack(flat: torch.Tensor, shapes: list) -> list:
    """`[P, n]` -> one `[P, *shape]` per shape (views, differentiable)."""
    out, i = [], 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        out.append(flat[:, i:i + n].reshape(flat.shape[0], *shape))
        i += n
    return out


def _weights(world: int, upto: int, log_a: torch.Tensor | None, exclude: int | None, ref: torch.Tensor):
    """Coefficients of the combine: `c [P, Hs]` for the `M_j` and `c0 [Hs]` (or a float) for `S_0`.

    Causal (`exclude is None`): the state before shard `upto`, `c_j = a^(upto-1-j)` for `j < upto`
    and `c0 = a^upto` with `a = λ^L = exp(-log_a)`. Non-causal: every shard but `exclude`, weight 1.
    Exponents are non-positive, so nothing overflows.
    """
    j = torch.arange(world, device=ref.device, dtype=ref.dtype)
    if exclude is not None:
        return (j != exclude).to(ref.dtype)[:, None], 1.0
    n = (upto - 1 - j).clamp(min=0)
    mask = (j < upto).to(ref.dtype)[:, None]
    if log_a is None:
        return mask, 1.0
    return torch.exp(-log_a[None, :] * n[:, None]) * mask, torch.exp(-log_a * upto)


def _combine(M_all: torch.Tensor, S0: torch.Tensor | None, c: torch.Tensor, c0) -> torch.Tensor:
    """`Σ_j c[j, h] M_all[j, :, h] + c0[h] S0[:, h]` for `M_all [P, B, Hs, *rest]`."""
    rest = M_all.dim() - 3
    out = torch.einsum("jh,jbh...->bh...", c, M_all)
    if S0 is not None:
        w = c0 if not isinstance(c0, torch.Tensor) else c0.reshape(-1, *([1] * rest))
        out = out + w * S0.to(M_all.dtype)
    return out


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None = None, *,
                        group=None, scale: float | None = None, initial_state: torch.Tensor | None = None,
                        output_final_state: bool = False, backend: str | None = None):
    """Context-parallel `attnkit.lightning_attention`: `q`, `k`, `v` are this rank's contiguous shard.

    The result is this rank's shard of the single-process op over the whole sequence. Only the
    recurrent states travel: one all-gather of `[B, H, Dk, Dv]` (float32; float64 for float64
    inputs) per call, and one reduce-scatter of the same size in the backward, whatever `T`.

    Args:
        q: `[B, L, H, Dk]`; k: `[B, L, Hk, Dk]`; v: `[B, L, Hk, Dv]` with `L = T / P` on every rank,
            rank `r` holding tokens `[r·L, (r+1)·L)` (see `shard_sequence`).
        decay: float32 `[H]` (`>= 0`), the same on every rank; None: no decay.
        group: process group (default: the whole world).
        scale: as in `attnkit.lightning_attention` (default `Dk ** -0.5`).
        initial_state: float32 `[B, H, Dk, Dv]`, the state before the first token of the whole
            sequence; pass the same tensor on every rank.
        output_final_state: also return the whole sequence's final state (the same on every rank).
        backend: backend of the local op (None: automatic).

    Returns:
        `(o [B, L, H, Dv], state or None)`. Gradients follow the SPMD convention: the `.grad` of
        `decay` and `initial_state` on a rank is its own contribution; their sum over the group is
        the single-process gradient.

    Example:
        >>> o, S = akd.lightning_attention(q_local, k_local, v_local, decay, scale=1.0, output_final_state=True)
    """
    call = _api._prepare_lightning_attention(q, k, v, decay, scale=scale, initial_state=initial_state,
                                             output_final_state=output_final_state)
    kw = call.kwargs
    scale, output_final_state = kw["scale"], kw["output_final_state"]
    group, world, rank = _comm.resolve_group(group)
    B, L, H, Dk = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    G = H // Hk
    _check_group_shapes(group, world, q, k, v, decay is not None, initial_state is not None,
                        int(output_final_state), *_needs_grad(decay, initial_state))
    cdt = compute_dtype(q.dtype)

    # 1. this shard's state from a zero start, M = Σ_t λ^(L-1-t) k_tᵀ v_t, per query head
    kc, vc = k.to(cdt), v.to(cdt)
    d = None if decay is None else decay.to(cdt)
    t = torch.arange(L, device=q.device, dtype=cdt)
    if d is None:
        M = torch.einsum("btkd,btke->bkde", kc, vc)[:, :, None].expand(B, Hk, G, Dk, Dv).reshape(B, H, Dk, Dv)
    else:
        w = torch.exp(-d.reshape(Hk, G)[None, :, :, None] * (L - 1 - t)[:, None, None, None])  # [L, Hk, G, 1]
        M = torch.einsum("btkgd,btke->bkgde", kc[:, :, :, None] * w, vc).reshape(B, H, Dk, Dv)

    # 2. states travel while the local op (intra-shard work) runs from a zero state
    pending = _comm.gather_start(M, group, world)
    o_local, _ = _api.lightning_attention(q, k, v, decay, scale=scale, backend=backend)
    M_all = _comm.gather_finish(M, pending)  # [P, B, H, Dk, Dv]

    # 3. the state entering this shard, and its contribution scale · λ^(t+1) q_t S_in
    log_a = None if d is None else d * L
    c, c0 = _weights(world, rank, log_a, None, M_all)
    S_in = _combine(M_all, initial_state, c, c0)
    qc = q.to(cdt) * scale
    if d is not None:
        qc = qc * torch.exp(-d[None, None, :, None] * (t + 1)[None, :, None, None])
    o = (o_local.to(cdt) + torch.einsum("bthd,bhde->bthe", qc, S_in)).to(q.dtype)

    state = None
    if output_final_state:
        c, c0 = _weights(world, world, log_a, None, M_all)
        state = _combine(M_all, initial_state, c, c0)
    return o, state


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, causal: bool = True,
                     feature_map: str | Callable | None = None, normalize: bool = False,
                     scale: float | None = None, eps: float = 1e-6, initial_state=None,
                     output_final_state: bool = False, backend: str | None = None):
    """Context-parallel `attnkit.linear_attention`: `q`, `k`, `v` are this rank's contiguous shard.

    Causal: the state entering rank `r` is `S_0 + Σ_{j<r} M_j` (and `z`); non-causal: every query
    reads the totals, so a rank adds `S_0 + Σ_{j≠r} M_j` to its local totals. One all-gather of
    the states (`[B, Hk, Dk, Dv]`, `+ z [B, Hk, Dk]` with `normalize`) per call, one
    reduce-scatter of the same size in the backward, whatever `T`.

    Args:
        q: `[B, L, H, Dk]`; k: `[B, L, Hk, Dk]`; v: `[B, L, Hk, Dv]`, rank `r` holding tokens
            `[r·L, (r+1)·L)` of the whole sequence (`L = T / P`, the same on every rank).
        group: process group (default: the whole world).
        causal, feature_map, normalize, scale, eps: as in `attnkit.linear_attention`.
        initial_state: `S [B, Hk, Dk, Dv]` float32, or `(S, z [B, Hk, Dk])` with `normalize`; the state
            before the whole sequence, the same on every rank.
        output_final_state: also return the whole sequence's final state (the same on every rank).
        backend: backend of the local op (None: automatic).

    Returns:
        `(o [B, L, H, Dv], state or None)`; gradients as in `lightning_attention`.

    Example:
        >>> o, (S, z) = akd.linear_attention(q_local, k_local, v_local, feature_map="elu", normalize=True,
        ...                                  output_final_state=True)
    """
    call = _api._prepare_linear_attention(q, k, v, causal=causal, feature_map=feature_map, normalize=normalize,
                                          scale=scale, eps=eps, initial_state=initial_state,
                                          output_final_state=output_final_state)
    kw = dict(call.kwargs)
    group, world, rank = _comm.resolve_group(group)
    q_in, k_in = kw["q"], kw["k"]  # a callable feature map has been applied by the prepare step
    causal, normalize, fm, scale = kw["causal"], kw["normalize"], kw["feature_map"], kw["scale"]
    B, L, H, Dk = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    G = H // Hk
    S0, z0 = (initial_state if normalize else (initial_state, None)) if initial_state is not None else (None, None)
    _check_group_shapes(group, world, q, k, v, int(causal), int(normalize), initial_state is not None,
                        int(kw["output_final_state"]), *_needs_grad(S0, z0))
    cdt = compute_dtype(q.dtype)

    # 1. this shard's totals from a zero start: M = Σ_t φ(k_t)ᵀ v_t, z = Σ_t φ(k_t)
    kf = feature(k_in.to(cdt), fm)
    M = torch.einsum("btkd,btke->bkde", kf, v.to(cdt))
    z = kf.sum(1) if normalize else None
    shapes = [(B, Hk, Dk, Dv)] + ([(B, Hk, Dk)] if normalize else [])
    flat = _pack(M, z)
    pending = _comm.gather_start(flat, group, world)

    local_kw = dict(causal=causal, feature_map=fm, normalize=normalize, scale=scale, eps=kw["eps"], backend=backend)
    o_local = None
    if not normalize:  # the normalised output does not split into local + incoming parts: run it after
        o_local, _ = _api.linear_attention(q_in, k_in, v, **local_kw)
    parts = _unpack(_comm.gather_finish(flat, pending), shapes)

    c, c0 = _weights(world, rank, None, None if causal else rank, M)
    S_in = _combine(parts[0], S0, c, c0)  # [B, Hk, Dk, Dv]
    if normalize:
        z_in = _combine(parts[1], z0, c, c0)
        o, _ = _api.linear_attention(q_in, k_in, v, initial_state=(S_in, z_in), **local_kw)
    else:
        qf = feature(q_in.to(cdt) * scale, fm).reshape(B, L, Hk, G, Dk)
        o = (o_local.to(cdt) + torch.einsum("btkgd,bkde->btkge", qf, S_in).reshape(B, L, H, Dv)).to(q.dtype)

    state = None
    if kw["output_final_state"]:
        c, c0 = _weights(world, world, None, None, M)
        S_fin = _combine(parts[0], S0, c, c0)
        state = (S_fin, _combine(parts[1], z0, c, c0)) if normalize else S_fin
    return o, state
