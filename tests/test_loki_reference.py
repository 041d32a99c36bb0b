"""Loki on the reference backend: calibration, rotation, the basis object and sparse decode.

Decode results are checked against hand-written float64 loops (one (row, head) at a time,
argsort + softmax), never against the vectorised reference itself.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import attnkit
from attnkit import LokiBasis, loki_attention_decode, loki_calibrate, loki_rotate

from .harness import params, randn

DEV = "cpu"  # the reference backend is what this file tests; CPU keeps every value check on


# ----------------------------------------------------------------------------------- helpers


def _planted_keys(n: int, hk: int, d: int, *, dtype=torch.float64, offset: float = 0.0):
    """Keys with a distinct, decaying variance along a random orthonormal frame per head.

    Returns `(keys [n, hk, d], frames [hk, d, d], sigmas [d])`."""
    frames = torch.linalg.qr(torch.randn(hk, d, d, dtype=torch.float64)).Q
    sigmas = 2.0 ** -torch.arange(d, dtype=torch.float64) * 4.0
    z = torch.randn(n, hk, d, dtype=torch.float64) * sigmas
    keys = torch.einsum("nhj,hdj->nhd", z, frames) + offset * frames[None, :, :, 0]
    return keys.to(dtype), frames, sigmas


def _basis(hk: int, d: int, n: int = 256, dtype=torch.float32) -> LokiBasis:
    return loki_calibrate(_planted_keys(n, hk, d)[0], dtype=dtype)


def _hand_loki(q, k_rot, v, lens, comps, rank, top_k, scale, selection="head"):
    """Loki decode in float64, one row and KV head at a time: `[B, 1, H, Dv]` float64."""
    B, _, H, _ = q.shape
    Hk, Dv = k_rot.shape[2], v.shape[3]
    G = H // Hk
    out = torch.zeros(B, 1, H, Dv, dtype=torch.float64)
    for b in range(B):
        L = int(lens[b])
        if L == 0:
            continue
        for kv in range(Hk):
            keys = k_rot[b, :L, kv].double()
            vals = v[b, :L, kv].double()
            heads = list(range(kv * G, (kv + 1) * G))
            q_rot = {h: q[b, 0, h].double() @ comps[kv].double() for h in heads}
            approx = {h: keys[:, :rank] @ q_rot[h][:rank] for h in heads}
            if selection == "group":
                shared = torch.stack([approx[h] for h in heads]).amax(dim=0)
                approx = {h: shared for h in heads}
            for h in heads:
                sel = torch.argsort(approx[h], descending=True)[:top_k]
                p = torch.softmax(scale * (keys[sel] @ q_rot[h]), dim=0)
                out[b, 0, h] = p @ vals[sel]
    return out


def _eye(hk: int, d: int) -> torch.Tensor:
    return torch.eye(d, dtype=torch.float64).expand(hk, d, d)


def _poison_tail(x: torch.Tensor, lens) -> torch.Tensor:
    """NaN in every cache position at or past each row's length (must never be read)."""
    x = x.clone()
    for b, L in enumerate(lens):
        x[b, int(L):] = float("nan")
    return x


def _decode_inputs(B, Smax, H, Hk, D, Dv, lens, *, dtype=torch.float64, strided=False):
    """Unrotated keys, their rotation, and a poisoned cache tail (float64 basis for float64)."""
    basis = _basis(Hk, D, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    q = randn(B, 1, H, D, dtype=dtype, device=DEV, strided=strided)
    k = randn(B, Smax, Hk, D, dtype=dtype, device=DEV)
    v = _poison_tail(randn(B, Smax, Hk, Dv, dtype=dtype, device=DEV), lens)
    k_rot = _poison_tail(loki_rotate(k, basis), lens)
    if strided:  # same values, non-contiguous views
        k_rot = torch.cat([k_rot, k_rot], dim=-1)[..., :D]
        v = torch.cat([v, v], dim=-1)[..., :Dv]
        assert not k_rot.is_contiguous() and not v.is_contiguous()
    seqlens = torch.tensor(lens, dtype=torch.int32)
    return q, k, k_rot, v, seqlens, basis


# --------------------------------------------------------------------------------- calibrate


@pytest.mark.parametrize("center", [False, True])
def test_calibrate_orthonormal_sorted_ratios(center):
    keys = _planted_keys(300, 3, 16)[0].float()
    basis = loki_calibrate(keys, center=center)
    c = basis.components
    assert c.dtype == torch.float32 and c.shape == (3, 16, 16)
    eye = torch.eye(16).expand(3, 16, 16)
    torch.testing.assert_close(c.transpose(-1, -2) @ c, eye, atol=1e-6, rtol=0)
    r = basis.explained_variance_ratio
    assert r.dtype == torch.float32 and r.shape == (3, 16)
    assert bool((r[:, :-1] >= r[:, 1:]).all()), "ratios must be sorted descending"
    torch.testing.assert_close(r.sum(-1), torch.ones(3), atol=1e-6, rtol=0)
    # Independent meaning of the ratio: variance of the (centred) keys along each column.
    x = keys.double() - (keys.double().mean(0) if center else 0.0)
    proj = torch.einsum("nhd,hde->nhe", x, c.double()).pow(2).mean(0)
    torch.testing.assert_close(r.double(), proj / proj.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    if center:
        torch.testing.assert_close(basis.mean, keys.double().mean(0).float())
    else:
        assert basis.mean is None


@pytest.mark.parametrize("center", [False, True])
def test_calibrate_recovers_planted_subspace(center):
    # Rank-4 keys with distinct variances (exact in the sample: whitened, zero-mean latents) and
    # tiny noise. With center=True they also sit at a large offset along an axis outside the
    # subspace, which an uncentred PCA would take as its first component.
    n, hk, d, r = 500, 2, 16, 4
    frames = torch.linalg.qr(torch.randn(hk, d, d, dtype=torch.float64)).Q
    sub = frames[:, :, :r]  # [hk, d, r]
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    lat = torch.linalg.qr(torch.cat([torch.ones(hk, n, 1, dtype=torch.float64),
                                     torch.randn(hk, n, r, dtype=torch.float64)], dim=-1)).Q[..., 1:]
    z = lat * math.sqrt(n) * sigmas  # [hk, n, r], sample moments exactly diag(sigmas^2), mean 0
    keys = torch.einsum("hnj,hdj->nhd", z, sub) + 1e-4 * torch.randn(n, hk, d, dtype=torch.float64)
    offset = 50.0 * frames[:, :, r]  # [hk, d]
    if center:
        keys = keys + offset
    basis = loki_calibrate(keys, center=center)
    lead = basis.components[:, :, :r].double()
    # Same subspace: the projectors agree.
    torch.testing.assert_close(lead @ lead.transpose(-1, -2), sub @ sub.transpose(-1, -2), atol=1e-5, rtol=0)
    assert bool((basis.explained_variance_ratio[:, :r].sum(-1) > 1 - 1e-6).all())
    torch.testing.assert_close(basis.explained_variance_ratio[:, :r].double(),
                               (sigmas ** 2 / (sigmas ** 2).sum()).expand(hk, r), atol=1e-6, rtol=0)
    # Distinct planted variances: each leading column is its planted axis up to sign...
    cos = (lead * sub).sum(-2).abs()
    torch.testing.assert_close(cos, torch.ones(hk, r, dtype=torch.float64), atol=1e-5, rtol=0)
    # ...with the documented sign: the largest-|.| entry of every column is positive.
    c = basis.components
    assert bool((c.gather(-2, c.abs().argmax(-2, keepdim=True)) > 0).all())
    if center:
        torch.testing.assert_close(basis.mean.double(), offset, atol=1e-4, rtol=0)
        # Without centring the offset takes the first axis: the check above can fail.
        plain = loki_calibrate(keys).components[:, :, 0].double()
        torch.testing.assert_close((plain * frames[:, :, r]).sum(-1).abs(), torch.ones(hk, dtype=torch.float64))


def test_calibrate_is_deterministic_and_dtype_independent():
    keys = _planted_keys(400, 2, 8)[0]
    a, b = loki_calibrate(keys), loki_calibrate(keys.clone())
    assert torch.equal(a.components, b.components)
    # Half-precision samples calibrate in float64 too and give a float32 basis of the same axes.
    h = loki_calibrate(keys.half())
    assert h.components.dtype == torch.float32
    cos = (h.components * a.components).sum(-2)
    torch.testing.assert_close(cos[:, :4], torch.ones(2, 4), atol=1e-3, rtol=0)


def test_calibrate_single_key_and_zero_variance():
    key = torch.randn(1, 2, 6)
    basis = loki_calibrate(key)  # rank 1: everything along the key itself
    torch.testing.assert_close(basis.explained_variance_ratio[:, 0], torch.ones(2))
    torch.testing.assert_close(basis.components[:, :, 0].abs(), (key[0] / key[0].norm(dim=-1, keepdim=True)).abs())
    centred = loki_calibrate(key, center=True)  # nothing varies: ratios are all zero
    assert torch.equal(centred.explained_variance_ratio, torch.zeros(2, 6))
    c = centred.components
    torch.testing.assert_close(c.transpose(-1, -2) @ c, torch.eye(6).expand(2, 6, 6), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad, exc, match", [
    pytest.param(lambda: torch.randn(5, 8), ValueError, r"keys must have shape \[N, Hk, D\]", id="2d"),
    pytest.param(lambda: torch.randn(0, 2, 8), ValueError, "N, Hk, D >= 1", id="N0"),
    pytest.param(lambda: torch.randint(0, 3, (5, 2, 8)), TypeError, "keys must have dtype", id="int"),
    pytest.param(lambda: [[1.0]], TypeError, "keys must be a torch.Tensor", id="list"),
    pytest.param(lambda: torch.randn(5, 2, 8).index_fill_(0, torch.tensor([2]), float("nan")),
                 ValueError, "keys must be finite", id="nan"),
])
def test_calibrate_rejects(bad, exc, match):
    with pytest.raises(exc, match=match):
        loki_calibrate(bad())


def test_calibrate_center_must_be_bool():
    with pytest.raises(TypeError, match="center must be a bool, got int"):
        loki_calibrate(torch.randn(5, 2, 8), center=1)


# ------------------------------------------------------------------------------------ rotate


@pytest.mark.parametrize("shape", [(7, 3, 8), (2, 5, 3, 8), (3, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_rotate_definition_shape_dtype(shape, dtype):
    basis = _basis(3, 8)
    x = randn(*shape, dtype=dtype, device=DEV)
    y = loki_rotate(x, basis)
    assert y.shape == x.shape and y.dtype == dtype
    want = torch.stack([x[..., h, :].double() @ basis.components[h].double() for h in range(3)], dim=-2)
    tol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 4e-3}[dtype]  # float32 basis
    torch.testing.assert_close(y.double(), want, atol=tol * 4, rtol=tol)


def test_rotate_keeps_dot_products():
    basis = loki_calibrate(_planted_keys(100, 2, 16)[0], center=True)  # no mean subtracted
    a, b = torch.randn(4, 2, 16, dtype=torch.float64), torch.randn(4, 2, 16, dtype=torch.float64)
    ra, rb = loki_rotate(a, basis), loki_rotate(b, basis)
    torch.testing.assert_close((ra * rb).sum(-1), (a * b).sum(-1), atol=1e-5, rtol=1e-5)
    # A float64 basis keeps them to float64 precision.
    b64 = loki_calibrate(_planted_keys(100, 2, 16)[0], dtype=torch.float64)
    assert b64.components.dtype == torch.float64
    torch.testing.assert_close((loki_rotate(a, b64) * loki_rotate(b, b64)).sum(-1), (a * b).sum(-1),
                               atol=1e-12, rtol=0)


def test_rotated_calibration_keys_are_decorrelated():
    keys = _planted_keys(500, 2, 8)[0]
    basis = loki_calibrate(keys)
    r = loki_rotate(keys, basis)
    cov = torch.einsum("nhd,nhe->hde", r, r) / r.shape[0]
    diag = torch.diagonal(cov, dim1=-2, dim2=-1)
    off = cov - torch.diag_embed(diag)
    assert float(off.abs().max()) < 1e-5 * float(diag.max())
    torch.testing.assert_close(diag / diag.sum(-1, keepdim=True), basis.explained_variance_ratio.double(),
                               atol=1e-6, rtol=0)


def test_rotate_rejects():
    basis = _basis(2, 8)
    with pytest.raises(ValueError, match=r"basis must have components of shape \[Hk, D, D\] = \[3, 8, 8\]"):
        loki_rotate(torch.randn(4, 3, 8), basis)
    with pytest.raises(ValueError, match=r"= \[2, 6, 6\] to match x"):
        loki_rotate(torch.randn(4, 2, 6), basis)
    with pytest.raises(ValueError, match="x must have shape"):
        loki_rotate(torch.randn(8), basis)
    with pytest.raises(TypeError, match="x must have dtype"):
        loki_rotate(torch.ones(4, 2, 8, dtype=torch.int32), basis)
    with pytest.raises(TypeError, match="basis must be a LokiBasis"):
        loki_rotate(torch.randn(4, 2, 8), basis.components)
    with pytest.raises(ValueError, match="basis must be on the same device as x"):
        loki_rotate(torch.randn(4, 2, 8), basis.to("meta"))


# -------------------------------------------------------------------------------- LokiBasis


@pytest.mark.parametrize("center", [False, True])
def test_basis_state_dict_round_trip(center):
    basis = loki_calibrate(_planted_keys(64, 2, 8)[0], center=center)
    sd = basis.state_dict()
    assert set(sd) == ({"components", "explained_variance_ratio"} | ({"mean"} if center else set()))
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    back = LokiBasis.from_state_dict(torch.load(buf, weights_only=True))
    for name in ("components", "explained_variance_ratio", "mean"):
        a, b = getattr(basis, name), getattr(back, name)
        assert (a is None and b is None) or torch.equal(a, b)
    # load_state_dict into another basis of the same size keeps that basis' dtype.
    other = _basis(2, 8).to(dtype=torch.float64)
    other.load_state_dict(sd)
    assert other.components.dtype == torch.float64
    torch.testing.assert_close(other.components, basis.components.double())
    assert (other.mean is None) == (not center)


def test_basis_load_state_dict_rejects_and_keeps_contents():
    basis = _basis(2, 8)
    before = basis.components.clone()
    with pytest.raises(ValueError, match=r"state_dict\['components'\] must have shape"):
        basis.load_state_dict(_basis(3, 8).state_dict())
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        basis.load_state_dict({**_basis(2, 8).state_dict(), "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"missing \['explained_variance_ratio'\]"):
        LokiBasis.from_state_dict({"components": before})
    bad = _basis(2, 8).state_dict()
    bad["explained_variance_ratio"] = torch.zeros(2, 7)
    with pytest.raises(ValueError, match="explained_variance_ratio must have shape"):
        basis.load_state_dict(bad)
    assert torch.equal(basis.components, before)


def test_basis_to_and_repr():
    basis = loki_calibrate(_planted_keys(64, 2, 8)[0], center=True)
    assert basis.to() is basis and basis.to(device="cpu") is basis
    assert basis.to(device="cpu").components.dtype == torch.float32
    b64 = basis.to(dtype=torch.float64)
    assert b64 is not basis and b64.components.dtype == torch.float64 and b64.mean.dtype == torch.float64
    assert basis.components.dtype == torch.float32  # the original is untouched
    assert (b64.num_kv_heads, b64.head_dim) == (2, 8)
    meta = basis.to("meta")
    assert meta.components.device.type == "meta"
    assert repr(basis) == "LokiBasis(num_kv_heads=2, head_dim=8, centered=True, dtype=float32, device=cpu)"
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        basis.to(dtype=torch.int32)


def test_basis_constructor_validates():
    good = _basis(2, 8)
    with pytest.raises(ValueError, match="components must be orthonormal"):
        LokiBasis(good.components * 1.01, good.explained_variance_ratio)
    with pytest.raises(ValueError, match=r"components must have shape \[Hk, D, D\]"):
        LokiBasis(torch.zeros(2, 8, 7), good.explained_variance_ratio)
    with pytest.raises(ValueError, match=r"explained_variance_ratio must have shape \[Hk, D\] = \[2, 8\]"):
        LokiBasis(good.components, torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"mean must have shape \[Hk, D\]"):
        LokiBasis(good.components, good.explained_variance_ratio, torch.zeros(8))
    with pytest.raises(TypeError, match="components must have dtype"):
        LokiBasis(torch.eye(8, dtype=torch.int64).expand(2, 8, 8), good.explained_variance_ratio)


# ------------------------------------------------------------------------------------ decode


GQA = [dict(H=4, Hk=4), dict(H=4, Hk=2), dict(H=4, Hk=1)]


@pytest.mark.parametrize("heads", params(GQA))
def test_decode_full_rank_is_exact_topk(heads):
    # rank = D scores with q̃·k̃ = q·k: exact top-k attention on the *unrotated* keys.
    H, Hk, D = heads["H"], heads["Hk"], 16
    lens = [37, 20, 6]
    q, k, k_rot, v, seqlens, basis = _decode_inputs(3, 37, H, Hk, D, 8, lens)
    o = loki_attention_decode(q, k_rot, v, seqlens, basis, rank=D, top_k=5)
    want = _hand_loki(q, k, v, seqlens, _eye(Hk, D), D, 5, D ** -0.5)
    torch.testing.assert_close(o, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("case", params([
    dict(H=4, Hk=4, top_k=33, rank=1),
    dict(H=4, Hk=2, top_k=100, rank=3),
    dict(H=4, Hk=1, top_k=33, rank=16),
]))
def test_decode_top_k_at_least_length_is_dense(case):
    H, Hk, D = case["H"], case["Hk"], 16
    lens = [1, 7, 33]
    q, k, k_rot, v, seqlens, basis = _decode_inputs(3, 33, H, Hk, D, 8, lens)
    o = loki_attention_decode(q, k_rot, v, seqlens, basis, rank=case["rank"], top_k=case["top_k"], scale=0.3)
    # Plain dense softmax over the valid positions, unrotated keys.
    want = torch.zeros(3, 1, H, 8, dtype=torch.float64)
    for b, L in enumerate(lens):
        for h in range(H):
            kv = h // (H // Hk)
            p = torch.softmax(0.3 * (k[b, :L, kv] @ q[b, 0, h]), dim=0)
            want[b, 0, h] = p @ v[b, :L, kv]
    torch.testing.assert_close(o, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("case", params([
    dict(H=4, Hk=4, D=32, rank=4, top_k=8, sel="head"),
    dict(H=4, Hk=2, D=32, rank=8, top_k=8, sel="head"),
    dict(H=4, Hk=1, D=16, rank=2, top_k=3, sel="head"),
    dict(H=4, Hk=2, D=32, rank=4, top_k=8, sel="group"),
    dict(H=6, Hk=1, D=16, rank=3, top_k=5, sel="group"),
    dict(H=2, Hk=2, D=16, rank=3, top_k=5, sel="group"),
]))
def test_decode_sparse_matches_hand_formula(case):
    # Rows shorter than top_k, of length 0 and 1, a full row, lengths that are multiples of
    # nothing; NaN in every unused cache slot.
    H, Hk, D = case["H"], case["Hk"], case["D"]
    lens = [63, 1, 0, 5, 70, 29]
    q, _, k_rot, v, seqlens, basis = _decode_inputs(6, 70, H, Hk, D, 12, lens)
    o = loki_attention_decode(q, k_rot, v, seqlens, basis, rank=case["rank"], top_k=case["top_k"],
                              selection=case["sel"])
    want = _hand_loki(q, k_rot, v, seqlens, basis.components, case["rank"], case["top_k"], D ** -0.5,
                      case["sel"])
    assert o.shape == (6, 1, H, 12) and o.dtype == torch.float64
    torch.testing.assert_close(o, want, atol=1e-10, rtol=1e-10)
    assert torch.equal(o[2], torch.zeros(1, H, 12))
    if case["sel"] == "group" and H > Hk:  # the check can tell the two selections apart
        per_head = _hand_loki(q, k_rot, v, seqlens, basis.components, case["rank"], case["top_k"],
                              D ** -0.5, "head")
        assert not torch.allclose(per_head, want)


def test_decode_non_contiguous_inputs():
    lens = [19, 4]
    q, _, k_rot, v, seqlens, basis = _decode_inputs(2, 19, 4, 2, 16, 8, lens, strided=True)
    assert not q.is_contiguous()
    o = loki_attention_decode(q, k_rot, v, seqlens, basis, rank=4, top_k=6, scale=0.5)
    want = _hand_loki(q, k_rot, v, seqlens, basis.components, 4, 6, 0.5)
    torch.testing.assert_close(o, want, atol=1e-10, rtol=1e-10)


# Error budget relative to max(1, |o|), against the float64 run on the same input values: in
# half precision the final rounding of o (at most eps/2 relative) dominates; in float32 the
# accumulated compute error (rotation, scores, softmax over <= 64 terms) does.
DTYPE_TOL = {torch.float32: 16 * torch.finfo(torch.float32).eps, torch.float16: torch.finfo(torch.float16).eps,
             torch.bfloat16: torch.finfo(torch.bfloat16).eps}


@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=str)
@pytest.mark.parametrize("sel", ["head", "group"])
def test_decode_low_precision_close_to_float64(dtype, sel):
    lens = [64, 1, 23, 40]
    basis = _basis(2, 32)
    q = randn(4, 1, 4, 32, dtype=dtype, device=DEV)
    k_rot = loki_rotate(randn(4, 64, 2, 32, dtype=dtype, device=DEV), basis)
    v = randn(4, 64, 2, 16, dtype=dtype, device=DEV)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    o = loki_attention_decode(q, k_rot, v, seqlens, basis, rank=8, top_k=12, selection=sel)
    golden = loki_attention_decode(q.double(), k_rot.double(), v.double(), seqlens, basis, rank=8,
                                   top_k=12, selection=sel)
    assert o.dtype == dtype and o.shape == golden.shape
    mag = max(1.0, float(golden.abs().max()))
    err = float((o.double() - golden).abs().max())
    assert err <= DTYPE_TOL[dtype] * mag, f"max error {err:.3e} vs float64 (|o| max {mag:.2f})"


def test_decode_empty_and_zero_capacity():
    basis = _basis(2, 8)
    q = torch.randn(2, 1, 4, 8)
    empty_cache = torch.randn(2, 0, 2, 8), torch.randn(2, 0, 2, 5)
    o = loki_attention_decode(q, *empty_cache, torch.zeros(2, dtype=torch.int32), basis, rank=2, top_k=4)
    assert torch.equal(o, torch.zeros(2, 1, 4, 5))
    o = loki_attention_decode(q[:0], torch.randn(0, 9, 2, 8), torch.randn(0, 9, 2, 5),
                              torch.zeros(0, dtype=torch.int32), basis, rank=2, top_k=4)
    assert o.shape == (0, 1, 4, 5)


def test_decode_inference_only_and_nan_propagates():
    q, _, k_rot, v, seqlens, basis = _decode_inputs(2, 10, 2, 1, 8, 4, [10, 3], dtype=torch.float32)
    q.requires_grad_(True)
    o = loki_attention_decode(q, k_rot, v, seqlens, basis, rank=2, top_k=4)
    assert not o.requires_grad and bool(torch.isfinite(o).all())
    # NaN in a valid value that is attended reaches the output of its row only.
    v = v.clone()
    v[1, :3] = float("nan")
    o = loki_attention_decode(q.detach(), k_rot, v, seqlens, basis, rank=2, top_k=4)
    assert bool(torch.isnan(o[1]).all()) and bool(torch.isfinite(o[0]).all())


def test_decode_explain_and_backend_names():
    q, _, k_rot, v, seqlens, basis = _decode_inputs(2, 10, 4, 2, 8, 4, [10, 3], dtype=torch.float32)
    ex = attnkit.explain("loki_attention_decode", q, k_rot, v, seqlens, basis, rank=2, top_k=4,
                         selection="group")
    # automatic: the native CPU kernel when it can be built here, else the reference
    auto = "cuda" if not ex.refusals["cuda"] else "reference"
    assert ex.backend == auto and f"runs on '{auto}'" in str(ex)
    assert ex.inputs.has("selection=group") and ex.inputs.has("gqa") and ex.inputs.head_dims == (8, 4)
    ex = attnkit.explain("loki_attention_decode", q, k_rot, v, seqlens, basis, rank=2, top_k=4,
                         backend="reference")
    assert ex.backend == "reference" and ex.requested == "reference"
    with pytest.raises(ValueError, match="rank must be in 1..8"):
        attnkit.explain("loki_attention_decode", q, k_rot, v, seqlens, basis, rank=9, top_k=4)
    with pytest.raises(ValueError, match="backend must be one of"):
        loki_attention_decode(q, k_rot, v, seqlens, basis, rank=2, top_k=4, backend="fast")


def _valid_call():
    lens = [10, 3]
    q, _, k_rot, v, seqlens, basis = _decode_inputs(2, 10, 4, 2, 8, 4, lens, dtype=torch.float32)
    return dict(q=q, k_cache_rot=k_rot, v_cache=v, cache_seqlens=seqlens, basis=basis, rank=2, top_k=4)


def _with(**changes):
    return lambda c: {**c, **{k: (f(c) if callable(f) else f) for k, f in changes.items()}}


BAD_DECODE = [
    ("rank0", _with(rank=0), ValueError, r"rank must be in 1\.\.8, got 0"),
    ("rank_gt_D", _with(rank=9), ValueError, r"rank must be in 1\.\.8, got 9"),
    ("rank_bool", _with(rank=True), TypeError, "rank must be an int, got bool"),
    ("rank_float", _with(rank=2.0), TypeError, "rank must be an int, got float"),
    ("top_k0", _with(top_k=0), ValueError, "top_k must be in >= 1, got 0"),
    ("top_k_float", _with(top_k=4.0), TypeError, "top_k must be an int, got float"),
    ("top_k_bool", _with(top_k=True), TypeError, "top_k must be an int, got bool"),
    ("basis_Hk", _with(basis=lambda c: _basis(1, 8)), ValueError,
     r"basis must have components of shape \[Hk, D, D\] = \[2, 8, 8\] to match k_cache_rot"),
    ("basis_D", _with(basis=lambda c: _basis(2, 16)), ValueError, r"basis .* got \[2, 16, 16\]"),
    ("basis_tensor", _with(basis=lambda c: c["basis"].components), TypeError, "basis must be a LokiBasis"),
    ("basis_device", _with(basis=lambda c: c["basis"].to("meta")), ValueError,
     "basis must be on the same device as k_cache_rot"),
    ("q_int", _with(q=lambda c: c["q"].long()), TypeError, "q must have dtype in"),
    ("k_dtype", _with(k_cache_rot=lambda c: c["k_cache_rot"].double()), TypeError,
     r"k_cache_rot must have the same dtype as q \(float32\), got float64"),
    ("v_dtype", _with(v_cache=lambda c: c["v_cache"].half()), TypeError, "v_cache must have the same dtype"),
    ("seqlens_int64", _with(cache_seqlens=lambda c: c["cache_seqlens"].long()), TypeError,
     "cache_seqlens must be int32, got int64"),
    ("seqlens_gt_Smax", _with(cache_seqlens=torch.tensor([11, 3], dtype=torch.int32)), ValueError,
     r"cache_seqlens values must be in 0\.\.10 \(Smax = 10.*got values in 3\.\.11"),
    ("seqlens_negative", _with(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32)), ValueError,
     r"cache_seqlens values must be in 0\.\.10"),
    ("seqlens_shape", _with(cache_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32)), ValueError,
     r"cache_seqlens must have shape \[2\], got \[3\]"),
    ("seqlens_list", _with(cache_seqlens=[10, 3]), TypeError, "cache_seqlens must be a torch.Tensor"),
    ("q_3d", _with(q=lambda c: c["q"][:, 0]), ValueError, r"q must have shape \[B, 1, H, D\] \(4 dims\)"),
    ("q_two_steps", _with(q=lambda c: c["q"].expand(2, 2, 4, 8)), ValueError, "one decoding step"),
    ("k_batch", _with(k_cache_rot=lambda c: c["k_cache_rot"][:1]), ValueError,
     r"k_cache_rot must have shape \[B, Smax, Hk, D\]"),
    ("k_D", _with(k_cache_rot=lambda c: c["k_cache_rot"][..., :6]), ValueError,
     r"k_cache_rot must have shape .*= \[2, 10, 2, 8\], got \[2, 10, 2, 6\]"),
    ("v_Smax", _with(v_cache=lambda c: c["v_cache"][:, :9]), ValueError, r"v_cache must have shape"),
    ("v_Hk", _with(v_cache=lambda c: c["v_cache"][:, :, :1]), ValueError, r"v_cache must have shape"),
    ("heads_not_multiple", _with(q=lambda c: c["q"][:, :, :3]), ValueError, r"H % Hk == 0"),
    ("selection", _with(selection="tokens"), ValueError, r"selection must be one of \['head', 'group'\]"),
    ("scale_tensor", _with(scale=torch.tensor(0.5)), TypeError, "scale must be a float or None"),
    ("scale_str", _with(scale="0.5"), TypeError, "scale must be a float"),
]


@pytest.mark.parametrize("change, exc, match", [pytest.param(*b[1:], id=b[0]) for b in BAD_DECODE])
def test_decode_rejects(change, exc, match):
    call = change(_valid_call())
    snapshot = {k: t.clone() for k, t in call.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(exc, match=match):
        loki_attention_decode(**call)
    with pytest.raises(exc, match=match):  # explain validates the same way
        attnkit.explain("loki_attention_decode", **call)
    for k, t in snapshot.items():
        assert torch.equal(call[k], t) or (t.is_floating_point() and torch.equal(call[k].isnan(), t.isnan()))


def test_decode_default_scale():
    q, _, k_rot, v, seqlens, basis = _decode_inputs(2, 12, 2, 2, 16, 4, [12, 5])
    o = loki_attention_decode(q, k_rot, v, seqlens, basis, rank=4, top_k=6)
    o2 = loki_attention_decode(q, k_rot, v, seqlens, basis, rank=4, top_k=6, scale=1 / math.sqrt(16))
    assert torch.equal(o, o2)
