"""Reference (pure PyTorch) linear attention and lightning attention.

These functions define the meaning of the ops. They are chunked: within a chunk of `chunk`
tokens the masked quadratic form is used, across chunks a recurrent `[Dk, Dv]` state, so memory
is O(T) and there is one Python iteration per chunk (never per token). Maths runs in float32
(float64 for float64 inputs); states are float32 (float64 for float64 inputs).

All heads are handled in a *group layout*: queries `[B, Hk, G, T, Dk]` with `G = H // Hk`, keys and
values `[B, Hk, 1, T, D]`. A per-KV-head state (linear attention) is `[B, Hk, 1, Dk, Dv]` and a
per-query-head state (lightning attention) is `[B, Hk, G, Dk, Dv]`; broadcasting does the rest,
and K/V are never repeated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def feature(x: torch.Tensor, feature_map: str | None) -> torch.Tensor:
    """The named feature maps: None (identity), "elu" (elu(x) + 1), "relu"."""
    if feature_map is None:
        return x
    if feature_map == "elu":
        return F.elu(x) + 1.0
    if feature_map == "relu":
        return F.relu(x)
    raise ValueError(f"feature_map must be None, 'elu', 'relu' or a callable, got {feature_map!r}")


def _to_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """[B, T, H, D] -> [B, Hk, G, T, D] for q; [B, T, Hk, D] -> [B, Hk, 1, T, D] for k and v."""
    B, T, H, Dk = q.shape
    Hk = k.shape[2]
    qg = q.reshape(B, T, Hk, H // Hk, Dk).permute(0, 2, 3, 1, 4)
    kg = k.permute(0, 2, 1, 3).unsqueeze(2)
    vg = v.permute(0, 2, 1, 3).unsqueeze(2)
    return qg, kg, vg


def _from_groups(o: torch.Tensor) -> torch.Tensor:
    """[B, Hk, G, T, Dv] -> [B, T, H, Dv]."""
    B, Hk, G, T, Dv = o.shape
    return o.permute(0, 3, 1, 2, 4).reshape(B, T, Hk * G, Dv)


def chunked_causal(qg, kg, vg, S, z=None, log_decay=None, chunk: int = CHUNK):
    """Causal linear recurrence in chunks (group layout, compute dtype).

    `S_t = λ S_{t-1} + k_tᵀ v_t`, `o_t = q_t S_t` (and `z_t = z_{t-1} + k_t`, denominators `q_t·z_t`
    when `z` is given; normalisation is only defined without decay).

    Args:
        qg: `[B, Hk, G, T, Dk]`; kg: `[B, Hk, 1, T, Dk]`; vg: `[B, Hk, 1, T, Dv]`.
        S: `[B, Hk, 1 or G, Dk, Dv]` state before the first token.
        z: `[B, Hk, 1, Dk]` or None.
        log_decay: `[Hk, G]` (the `decay` of SPEC, `λ = exp(-decay)`) or None.

    Returns:
        `(o [B, Hk, G, T, Dv], den [B, Hk, G, T] or None, S, z)`.
    """
    T = qg.shape[3]
    outs, dens = [], []
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        L = b - a
        qc, kc, vc = qg[..., a:b, :], kg[..., a:b, :], vg[..., a:b, :]
        scores = qc @ kc.transpose(-1, -2)  # [B, Hk, G, L, L]
        idx = torch.arange(L, device=qg.device)
        diff = (idx[:, None] - idx[None, :]).to(qg.dtype)  # i - j
        causal = diff >= 0
        if log_decay is None:
            scores = scores.masked_fill(~causal, 0.0)
            inter = qc @ S
            k_w = kc
            S_decay = None
        else:
            d = log_decay.to(qg.dtype)[:, :, None, None]  # [Hk, G, 1, 1]
            # λ^(i-j) for i >= j, as exp of a non-positive number (never λ^-j, which overflows)
            M = torch.exp(-d * diff.clamp(min=0)).masked_fill(~causal, 0.0)  # [Hk, G, L, L]
            scores = scores * M
            q_decay = torch.exp(-d[..., 0] * (idx.to(qg.dtype) + 1))  # [Hk, G, L]
            inter = (qc * q_decay[..., None]) @ S
            k_w = kc * torch.exp(-d[..., 0] * (L - 1 - idx).to(qg.dtype))[..., None]  # [B, Hk, G, L, Dk]
            S_decay = torch.exp(-d * L)  # [Hk, G, 1, 1]
        outs.append(scores @ vc + inter)
        if z is not None:
            dens.append(scores.sum(-1) + (qc * z.unsqueeze(-2)).sum(-1))
            z = z + kc.sum(-2)
        update = k_w.transpose(-1, -2) @ vc
        S = (S if S_decay is None else S * S_decay) + update
    o = torch.cat(outs, dim=3) if outs else qg.new_zeros(*qg.shape[:4], vg.shape[-1])
    den = None
    if z is not None:
        den = torch.cat(dens, dim=3) if dens else qg.new_zeros(qg.shape[:4])
    return o, den, S, z


def noncausal(qg, kg, vg, S, z=None):
    """Non-causal form: every query reads the totals `S_0 + Σ_t k_tᵀ v_t` (and `z_0 + Σ_t k_t`)."""
    S = S + kg.transpose(-1, -2) @ vg
    o = qg @ S
    den = None
    if z is not None:
        z = z + kg.sum(-2)
        den = (qg * z.unsqueeze(-2)).sum(-1)
    return o, den, S, z


def _run_dense(q, k, v, *, causal, feature_map, normalize, scale, eps, S0, z0, log_decay, per_query_state):
    """One batch of equal-length sequences. S0/z0 are in the user's layout or None."""
    cdt = compute_dtype(q.dtype)
    B, T, H, Dk = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    G = H // Hk
    qf = feature(q.to(cdt) * scale, feature_map)
    kf = feature(k.to(cdt), feature_map)
    qg, kg, vg = _to_groups(qf, kf, v.to(cdt))
    hs = G if per_query_state else 1
    if S0 is None:
        S = q.new_zeros(B, Hk, hs, Dk, Dv, dtype=cdt)
    else:
        S = S0.to(cdt).reshape(B, Hk, hs, Dk, Dv)
    z = None
    if normalize:
        z = q.new_zeros(B, Hk, 1, Dk, dtype=cdt) if z0 is None else z0.to(cdt).reshape(B, Hk, 1, Dk)
    if causal:
        o, den, S, z = chunked_causal(qg, kg, vg, S, z, log_decay)
    else:
        o, den, S, z = noncausal(qg, kg, vg, S, z)
    if normalize:
        o = o / (den.unsqueeze(-1) + eps)
    o = _from_groups(o).to(q.dtype)
    S = S.reshape(B, Hk * hs, Dk, Dv)
    z = z.reshape(B, Hk, Dk) if z is not None else None
    return o, S, z


def _run(q, k, v, cu_seqlens, initial_state, normalize, **kw):
    """Dispatch over packed sequences (a Python loop per *sequence*, never per token)."""
    if normalize:
        S0, z0 = initial_state if initial_state is not None else (None, None)
    else:
        S0, z0 = initial_state, None
    if cu_seqlens is None:
        return _run_dense(q, k, v, normalize=normalize, S0=S0, z0=z0, **kw)
    bounds = cu_seqlens.tolist()
    outs, Ss, zs = [], [], []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        o, S, z = _run_dense(q[:, a:b], k[:, a:b], v[:, a:b], normalize=normalize,
                             S0=None if S0 is None else S0[i:i + 1],
                             z0=None if z0 is None else z0[i:i + 1], **kw)
        outs.append(o)
        Ss.append(S)
        zs.append(z)
    o = torch.cat(outs, dim=1)
    return o, torch.cat(Ss, dim=0), (torch.cat(zs, dim=0) if normalize else None)


def linear_attention(q, k, v, *, causal, feature_map, normalize, scale, eps, initial_state,
                     output_final_state, cu_seqlens):
    """Reference implementation of `attnkit.linear_attention` (see docs/contracts.md)."""
    o, S, z = _run(q, k, v, cu_seqlens, initial_state, normalize, causal=causal, feature_map=feature_map,
                   scale=scale, eps=eps, log_decay=None, per_query_state=False)
    if not output_final_state:
        return o, None
    return o, ((S, z) if normalize else S)


def lightning_attention(q, k, v, *, decay, scale, initial_state, output_final_state, cu_seqlens):
    """Reference implementation of `attnkit.lightning_attention` (see docs/contracts.md)."""
    Hk = k.shape[2]
    H = q.shape[2]
    log_decay = None if decay is None else decay.reshape(Hk, H // Hk)
    o, S, _ = _run(q, k, v, cu_seqlens, initial_state, False, causal=True, feature_map=None, scale=scale,
                   eps=0.0, log_decay=log_decay, per_query_state=True)
    return o, (S if output_final_state else None)


@torch.no_grad()
def linear_attention_step(q, k, v, *, state, mode, decay, scale, feature_map, normalize, eps, state_indices):
    """Reference implementation of `attnkit.linear_attention_step`: one token, state updated in place."""
    B, _, H, Dk = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    G = H // Hk
    S_all, z_all = state if normalize else (state, None)
    cdt = compute_dtype(q.dtype)
    rows = (torch.arange(B, device=q.device) if state_indices is None else state_indices.long())
    qf = feature(q[:, 0].to(cdt) * scale, feature_map).reshape(B, Hk, G, Dk)  # [B, Hk, G, Dk]
    kf = feature(k[:, 0].to(cdt), feature_map).reshape(B, Hk, 1, Dk)
    vf = v[:, 0].to(cdt).reshape(B, Hk, 1, Dv)
    hs = G if mode == "lightning" else 1
    S = S_all[rows].to(cdt).reshape(B, Hk, hs, Dk, Dv)
    if decay is not None:
        S = S * torch.exp(-decay.to(cdt).reshape(Hk, G))[..., None, None]
    S = S + kf.unsqueeze(-1) * vf.unsqueeze(-2)  # k_tᵀ v_t: [B, Hk, 1, Dk, Dv]
    o = (qf.unsqueeze(-2) @ S).squeeze(-2)  # [B, Hk, G, Dv]
    if normalize:
        z = z_all[rows].to(cdt).reshape(B, Hk, 1, Dk) + kf
        o = o / ((qf * z).sum(-1, keepdim=True) + eps)
        z_all[rows] = z.reshape(B, Hk, Dk).to(z_all.dtype)
    S_all[rows] = S.reshape(B, Hk * hs, Dk, Dv).to(S_all.dtype)
    return o.reshape(B, 1, H, Dv).to(q.dtype)
