"""Sliding window, softcap and paged KV cache (SPEC "Sliding window, softcap, paged KV cache"),
and the decode-cache contract that nothing at or past a row's length is read (issue 9, defect 1).

Oracles are written here from the definition, in float64, independently of attnkit's reference
(dense scores, explicit masks); every backend that runs on this machine is compared with them.
"""

from __future__ import annotations

import pytest
import torch

import attnkit

from .harness import DEVICE

F64 = torch.float64


def rand(*shape, dtype=F64, requires_grad=False):
    x = torch.randn(*shape, dtype=F64, device=DEVICE).to(dtype)
    return x.requires_grad_(requires_grad)


def lens_of(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


# ------------------------------------------------------------ decode never reads past the lengths


@pytest.mark.parametrize("append", [False, True], ids=["no-append", "append"])
def test_reference_decode_ignores_nan_past_cache_seqlens(append):
    """Issue 9 defect 1: NaN at positions >= L_b must not reach the output (0 * NaN = NaN)."""
    q = rand(1, 1, 2, 16)
    kc, vc = rand(1, 8, 1, 16), rand(1, 8, 1, 16)
    lens = lens_of([4])
    kn = vn = None
    if append:
        kn, vn = rand(1, 1, 1, 16), rand(1, 1, 1, 16)
    clean = attnkit.attention_decode(q, kc.clone(), vc.clone(), lens, k_new=kn, v_new=vn, backend="reference")
    kp, vp = kc.clone(), vc.clone()
    start = 5 if append else 4
    kp[:, start:], vp[:, start:] = float("nan"), float("nan")
    poisoned = attnkit.attention_decode(q, kp, vp, lens, k_new=kn, v_new=vn, backend="reference")
    assert not poisoned.isnan().any()
    assert torch.equal(poisoned, clean)


# ------------------------------------------------------------------------------------ oracles


def oracle_attention(q, k, v, *, causal=False, window=(-1, -1), softcap=None, scale=None, qk_norm=None,
                     wq=None, wk=None, eps=1e-6):
    """Dense float64 attention straight from the SPEC: returns (o, lse)."""
    B, T, H, D = q.shape
    S, Hk = k.shape[1], k.shape[2]
    if qk_norm is not None:
        def norm(x, w):
            stat = x.square().mean(-1, keepdim=True) if qk_norm == "rms" else x.square().sum(-1, keepdim=True)
            y = x * torch.rsqrt(stat + eps)
            return y * w if w is not None else y
        q, k = norm(q, wq), norm(k, wk)
    scale = D ** -0.5 if scale is None else scale
    kr, vr = k.repeat_interleave(H // Hk, dim=2), v.repeat_interleave(H // Hk, dim=2)
    x = torch.einsum("bthd,bshd->bhts", q, kr) * scale
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    p = torch.arange(T, device=q.device)[:, None] + S - T
    s = torch.arange(S, device=q.device)[None]
    vis = torch.ones(T, S, dtype=torch.bool, device=q.device)
    left, right = window
    if left >= 0:
        vis &= s >= p - left
    if right >= 0:
        vis &= s <= p + right
    if causal:
        vis &= s <= p
    x = x.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(x, -1)  # [B, H, T]; -inf for rows that see nothing
    w = torch.where(torch.isfinite(lse)[..., None], torch.exp(x - lse[..., None].clamp_min(-1e300)),
                    torch.zeros_like(x))
    o = torch.einsum("bhts,bshd->bthd", w, vr)
    return o, lse


def oracle_decode(q, k_rows, v_rows, lens, *, window=(-1, -1), softcap=None, scale=None):
    """Decode over contiguous per-row key lists `k_rows[b] [L_b, Hk, D]` (L_b = lens[b])."""
    outs = []
    for b, L in enumerate(lens):
        o, _ = oracle_attention(q[b:b + 1], k_rows[b][None, :L], v_rows[b][None, :L], causal=True,
                                window=window, softcap=softcap, scale=scale)
        outs.append(o)
    return torch.cat(outs)


def close64(a, b, tol=1e-10):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=False), float((a - b).abs().max())


# --------------------------------------------------------------------------- attention (fwd+bwd)

ATT_CASES = [
    dict(T=9, S=9, H=4, Hk=2, causal=True, window=(3, 0), softcap=None),
    dict(T=9, S=9, H=4, Hk=2, causal=True, window=(3, 0), softcap=2.0),
    dict(T=7, S=13, H=4, Hk=1, causal=False, window=(4, 2), softcap=1.5),
    dict(T=13, S=7, H=2, Hk=2, causal=True, window=(2, -1), softcap=None),  # rows that see nothing
    dict(T=8, S=11, H=6, Hk=3, causal=False, window=(-1, 0), softcap=3.0),
    dict(T=8, S=11, H=6, Hk=3, causal=False, window=(0, 0), softcap=None),
    dict(T=10, S=10, H=4, Hk=4, causal=False, window=(5, -1), softcap=0.5),
    dict(T=6, S=12, H=8, Hk=2, causal=False, window=(-1, -1), softcap=4.0),
]


def _ids(cases):
    return [pytest.param(c, id="-".join(f"{k}{v}" for k, v in c.items())) for c in cases]


@pytest.mark.parametrize("qk_norm", [None, "rms"])
@pytest.mark.parametrize("c", _ids(ATT_CASES))
def test_attention_float64_matches_oracle_with_gradients(c, qk_norm):
    B, D, Dv = 2, 8, 6
    q = rand(B, c["T"], c["H"], D, requires_grad=True)
    k = rand(B, c["S"], c["Hk"], D, requires_grad=True)
    v = rand(B, c["S"], c["Hk"], Dv, requires_grad=True)
    scale = torch.tensor(0.7, dtype=F64, device=DEVICE, requires_grad=True)
    wq = rand(D, requires_grad=True) if qk_norm else None
    wk = rand(D, requires_grad=True) if qk_norm else None
    leaves = [x for x in (q, k, v, scale, wq, wk) if x is not None]
    kw = dict(causal=c["causal"], window=c["window"], softcap=c["softcap"])
    o, lse = attnkit.attention(q, k, v, scale=scale, qk_norm=qk_norm, q_norm_weight=wq, k_norm_weight=wk,
                               return_lse=True, backend="reference", **kw)
    o_ref, lse_ref = oracle_attention(q, k, v, scale=scale, qk_norm=qk_norm, wq=wq, wk=wk, **kw)
    close64(o, o_ref)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    close64(lse.nan_to_num(neginf=0.0), lse_ref.nan_to_num(neginf=0.0))
    cot, cot_l = torch.randn_like(o), torch.randn_like(lse)
    finite = torch.isfinite(lse_ref)
    loss = (o * cot).sum() + (lse.nan_to_num(neginf=0.0) * cot_l * finite).sum()
    loss_ref = (o_ref * cot).sum() + (lse_ref.nan_to_num(neginf=0.0) * cot_l * finite).sum()
    g = torch.autograd.grad(loss, leaves)
    g_ref = torch.autograd.grad(loss_ref, leaves)
    for a, b in zip(g, g_ref):
        assert torch.isfinite(a).all()
        close64(a, b)


def test_attention_window_and_softcap_with_varlen():
    cu = torch.tensor([0, 5, 5, 17, 20], dtype=torch.int32, device=DEVICE)
    cuk = torch.tensor([0, 7, 9, 21, 21], dtype=torch.int32, device=DEVICE)
    q = rand(1, 20, 4, 8, requires_grad=True)
    k = rand(1, 21, 2, 8, requires_grad=True)
    v = rand(1, 21, 2, 8, requires_grad=True)
    kw = dict(causal=True, window=(3, 0), softcap=1.0)
    o, lse = attnkit.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cuk, return_lse=True, backend="reference", **kw)
    cot = torch.randn_like(o)
    g = torch.autograd.grad((o * cot).sum(), (q, k, v))
    outs = []
    for i in range(4):
        qs, ks = slice(int(cu[i]), int(cu[i + 1])), slice(int(cuk[i]), int(cuk[i + 1]))
        o_i, lse_i = oracle_attention(q[:, qs], k[:, ks], v[:, ks], **kw)
        close64(o[:, qs], o_i)
        assert torch.equal(torch.isinf(lse[..., qs]), torch.isinf(lse_i))
        outs.append(o_i)
    g_ref = torch.autograd.grad((torch.cat(outs, 1) * cot).sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        close64(a, b)


def test_window_off_and_causal_normalisation_are_exact():
    q, k, v = rand(2, 9, 4, 8), rand(2, 9, 2, 8), rand(2, 9, 2, 8)
    base = attnkit.attention(q, k, v, causal=True, backend="reference")
    for window in (None, (-1, -1), (-1, 0), (-1, 7), (100, 0)):
        assert torch.equal(attnkit.attention(q, k, v, causal=True, window=window, backend="reference"), base)
    assert torch.equal(attnkit.attention(q, k, v, softcap=0, backend="reference"),
                       attnkit.attention(q, k, v, backend="reference"))
    call = attnkit.ops.softmax.api._prepare_attention(q, k, v, causal=True, window=(5, 3), softcap=2)
    assert call.kwargs["window"] == (5, -1) and call.kwargs["softcap"] == 2.0
    assert {"window", "softcap"} <= call.inputs.features
    call = attnkit.ops.softmax.api._prepare_attention(q, k, v)
    assert call.kwargs["window"] == (-1, -1) and call.kwargs["softcap"] == 0.0
    assert not {"window", "softcap"} & call.inputs.features
