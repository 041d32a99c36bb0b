"""Reference linear/lightning attention against independent formulations.

The independent formulation is a token-by-token float64 recurrence written straight from SPEC.md.
"""

import pytest
import torch

import attnkit
from attnkit.ops.linear import reference as R

from .harness import params, randn


def naive(q, k, v, *, decay=None, scale=None, fm=None, normalize=False, causal=True, S0=None, z0=None,
          eps=1e-6):
    """Token-by-token float64 recurrence of SPEC.md (per query head state iff decay is not None)."""
    B, T, H, Dk = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    G = H // Hk
    scale = Dk ** -0.5 if scale is None else scale
    phi = fm if callable(fm) else (lambda x: R.feature(x, fm))
    q, k, v = phi(q.double() * scale), phi(k.double()), v.double()
    per_q = decay is not None
    Hs = H if per_q else Hk
    S = torch.zeros(B, Hs, Dk, Dv, dtype=torch.float64) if S0 is None else S0.double().clone()
    z = torch.zeros(B, Hk, Dk, dtype=torch.float64) if z0 is None else z0.double().clone()
    lam = torch.exp(-decay.double()) if per_q else torch.ones(Hs, dtype=torch.float64)
    kv_of = [h // G if per_q else h for h in range(Hs)]
    o = torch.zeros(B, T, H, Dv, dtype=torch.float64)
    states = []
    for t in range(T):
        for h in range(Hs):
            S[:, h] = lam[h] * S[:, h] + k[:, t, kv_of[h], :, None] * v[:, t, kv_of[h], None, :]
        z = z + k[:, t]
        states.append((S.clone(), z.clone()))
    for t in range(T):
        St, zt = states[t] if causal else states[-1]
        for h in range(H):
            sh = h if per_q else h // G
            o[:, t, h] = (q[:, t, h, :, None] * St[:, sh]).sum(-2)
            if normalize:
                o[:, t, h] /= (q[:, t, h] * zt[:, h // G]).sum(-1, keepdim=True) + eps
    return o, S, z


def qkv(B, T, H, Hk, Dk, Dv, dtype=torch.float64, **kw):
    return (randn(B, T, H, Dk, dtype=dtype, device="cpu", **kw), randn(B, T, Hk, Dk, dtype=dtype, device="cpu", **kw),
            randn(B, T, Hk, Dv, dtype=dtype, device="cpu", **kw))


RECURRENCE_CASES = [
    dict(B=2, T=37, H=4, Hk=2, Dk=8, Dv=5, chunk=16),
    dict(B=1, T=100, H=3, Hk=3, Dk=6, Dv=6, chunk=7),
    dict(B=2, T=1, H=4, Hk=1, Dk=4, Dv=3, chunk=16),
    dict(B=1, T=65, H=2, Hk=1, Dk=16, Dv=8, chunk=64),
]


@pytest.mark.parametrize("c", params(RECURRENCE_CASES))
@pytest.mark.parametrize("with_state", [False, True], ids=["h0none", "h0"])
def test_lightning_matches_recurrence(c, with_state, monkeypatch):
    monkeypatch.setattr(R, "CHUNK", c["chunk"])
    q, k, v = qkv(c["B"], c["T"], c["H"], c["Hk"], c["Dk"], c["Dv"])
    decay = torch.rand(c["H"]) * 0.7
    decay[0] = 0.0  # one head without decay
    S0 = randn(c["B"], c["H"], c["Dk"], c["Dv"], dtype=torch.float64, device="cpu") if with_state else None
    for d in (decay, None):
        o, S = attnkit.lightning_attention(q, k, v, d, scale=0.7, initial_state=S0, output_final_state=True)
        dd = d if d is not None else torch.zeros(c["H"])
        on, Sn, _ = naive(q, k, v, decay=dd, scale=0.7, S0=S0)
        torch.testing.assert_close(o, on, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(S, Sn, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("c", params(RECURRENCE_CASES))
@pytest.mark.parametrize("fm,normalize,causal", [
    (None, False, True), ("elu", True, True), ("relu", False, True), ("elu", True, False),
    (None, False, False), (torch.sigmoid, True, True)], ids=["id", "elu-norm", "relu", "elu-norm-nc", "id-nc",
                                                            "callable-norm"])
def test_linear_matches_recurrence(c, fm, normalize, causal, monkeypatch):
    monkeypatch.setattr(R, "CHUNK", c["chunk"])
    B, T, H, Hk, Dk, Dv = (c[x] for x in ("B", "T", "H", "Hk", "Dk", "Dv"))
    q, k, v = qkv(B, T, H, Hk, Dk, Dv)
    S0 = randn(B, Hk, Dk, Dv, dtype=torch.float64, device="cpu")
    z0 = torch.rand(B, Hk, Dk, dtype=torch.float64) + 0.5
    init = (S0, z0) if normalize else S0
    o, st = attnkit.linear_attention(q, k, v, causal=causal, feature_map=fm, normalize=normalize,
                                     initial_state=init, output_final_state=True)
    on, Sn, zn = naive(q, k, v, fm=fm, normalize=normalize, causal=causal, S0=S0, z0=z0)
    torch.testing.assert_close(o, on, rtol=1e-9, atol=1e-9)
    S = st[0] if normalize else st
    torch.testing.assert_close(S, Sn, rtol=1e-10, atol=1e-10)
    if normalize:
        torch.testing.assert_close(st[1], zn, rtol=1e-10, atol=1e-10)


def test_lightning_large_decay_is_finite():
    # λ^-j would overflow here; the chunk form must only ever exponentiate non-positive numbers.
    q, k, v = qkv(1, 300, 2, 2, 8, 8)
    decay = torch.tensor([30.0, 0.0])
    o, S = attnkit.lightning_attention(q, k, v, decay, output_final_state=True)
    on, Sn, _ = naive(q, k, v, decay=decay)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    torch.testing.assert_close(o, on, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("op", ["lightning", "linear_norm"])
def test_varlen_equals_per_sequence(op):
    lens = [5, 0, 64, 17]
    cu = torch.tensor([0, 5, 5, 69, 86], dtype=torch.int32)
    H, Hk, Dk, Dv = 4, 2, 8, 6
    q, k, v = qkv(1, sum(lens), H, Hk, Dk, Dv)
    N = len(lens)
    if op == "lightning":
        decay = torch.rand(H)
        S0 = randn(N, H, Dk, Dv, dtype=torch.float64, device="cpu")
        o, S = attnkit.lightning_attention(q, k, v, decay, initial_state=S0, output_final_state=True, cu_seqlens=cu)
    else:
        S0 = (randn(N, Hk, Dk, Dv, dtype=torch.float64, device="cpu"), torch.rand(N, Hk, Dk, dtype=torch.float64))
        o, S = attnkit.linear_attention(q, k, v, feature_map="elu", normalize=True, initial_state=S0,
                                        output_final_state=True, cu_seqlens=cu)
    for i in range(N):
        a, b = cu[i].item(), cu[i + 1].item()
        sl = slice(a, b)
        if op == "lightning":
            oi, Si = attnkit.lightning_attention(q[:, sl], k[:, sl], v[:, sl], decay, initial_state=S0[i:i + 1],
                                                 output_final_state=True)
            torch.testing.assert_close(S[i:i + 1], Si)
        else:
            oi, Si = attnkit.linear_attention(q[:, sl], k[:, sl], v[:, sl], feature_map="elu", normalize=True,
                                              initial_state=(S0[0][i:i + 1], S0[1][i:i + 1]), output_final_state=True)
            torch.testing.assert_close(S[0][i:i + 1], Si[0])
            torch.testing.assert_close(S[1][i:i + 1], Si[1])
        torch.testing.assert_close(o[:, sl], oi)


def test_split_and_resume():
    q, k, v = qkv(2, 90, 4, 1, 8, 8)
    decay = torch.rand(4)
    o, S = attnkit.lightning_attention(q, k, v, decay, output_final_state=True)
    o1, S1 = attnkit.lightning_attention(q[:, :41], k[:, :41], v[:, :41], decay, output_final_state=True)
    o2, S2 = attnkit.lightning_attention(q[:, 41:], k[:, 41:], v[:, 41:], decay, initial_state=S1,
                                         output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o)
    torch.testing.assert_close(S2, S)


@pytest.mark.parametrize("mode", ["lightning", "lightning-nodecay", "linear-elu-norm", "linear-gqa-relu"])
def test_step_equals_chunked(mode):
    B, T, H, Hk, Dk, Dv = 3, 20, 4, 2, 8, 6
    q, k, v = qkv(B, T, H, Hk, Dk, Dv)
    if mode.startswith("lightning"):
        decay = torch.rand(H) if mode == "lightning" else None
        S0 = randn(B, H, Dk, Dv, dtype=torch.float64, device="cpu")
        o_ref, S_ref = attnkit.lightning_attention(q, k, v, decay, initial_state=S0, output_final_state=True)
        state, kw = S0.clone(), dict(decay=decay)
    else:
        fm, norm = ("elu", True) if "norm" in mode else ("relu", False)
        S0 = randn(B, Hk, Dk, Dv, dtype=torch.float64, device="cpu")
        z0 = torch.rand(B, Hk, Dk, dtype=torch.float64)
        init = (S0, z0) if norm else S0
        o_ref, S_ref = attnkit.linear_attention(q, k, v, feature_map=fm, normalize=norm, initial_state=init,
                                                output_final_state=True)
        state = (S0.clone(), z0.clone()) if norm else S0.clone()
        kw = dict(feature_map=fm, normalize=norm)
    # rows permuted through state_indices: row b lives at state row perm[b]
    perm = torch.tensor([2, 0, 1], dtype=torch.int32)
    inv = torch.argsort(perm.long())
    permuted = tuple(s[inv].clone() for s in state) if isinstance(state, tuple) else state[inv].clone()
    outs = [attnkit.linear_attention_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], permuted,
                                          state_indices=perm, **kw) for t in range(T)]
    torch.testing.assert_close(torch.cat(outs, 1), o_ref)
    got = tuple(s[perm.long()] for s in permuted) if isinstance(permuted, tuple) else permuted[perm.long()]
    torch.testing.assert_close(got, S_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_close_to_float64(dtype):
    q, k, v = qkv(2, 70, 4, 2, 16, 16)
    decay = torch.rand(4)
    o64, S64 = attnkit.lightning_attention(q, k, v, decay, output_final_state=True)
    o, S = attnkit.lightning_attention(q.to(dtype), k.to(dtype), v.to(dtype), decay, output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    assert (o.double() - o64).abs().max() <= tol * o64.abs().max()
    assert (S.double() - S64).abs().max() <= tol * S64.abs().max()


def test_gradcheck_lightning():
    q, k, v = qkv(1, 9, 2, 1, 3, 2, requires_grad=True)
    S0 = randn(1, 2, 3, 2, dtype=torch.float64, device="cpu", requires_grad=True)
    decay = torch.tensor([0.3, 1.1])

    def f(q, k, v, S0):
        return attnkit.lightning_attention(q, k, v, decay, initial_state=S0, output_final_state=True)

    R_chunk = R.CHUNK
    try:
        R.CHUNK = 4
        assert torch.autograd.gradcheck(f, (q, k, v, S0))
    finally:
        R.CHUNK = R_chunk


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_linear_normalized(causal):
    q, k, v = qkv(1, 7, 2, 2, 3, 2, requires_grad=True)
    S0 = randn(1, 2, 3, 2, dtype=torch.float64, device="cpu", requires_grad=True)
    z0 = (torch.rand(1, 2, 3, dtype=torch.float64) + 1).requires_grad_(True)

    def f(q, k, v, S0, z0):
        o, (S, z) = attnkit.linear_attention(q, k, v, causal=causal, feature_map="elu", normalize=True,
                                             initial_state=(S0, z0), output_final_state=True)
        return o, S, z

    assert torch.autograd.gradcheck(f, (q, k, v, S0, z0))


def test_empty_sequence():
    q, k, v = qkv(2, 0, 4, 2, 8, 8)
    o, S = attnkit.lightning_attention(q, k, v, torch.rand(4), output_final_state=True)
    assert o.shape == (2, 0, 4, 8) and S.shape == (2, 4, 8, 8) and not S.any()
    o, (S, z) = attnkit.linear_attention(q, k, v, normalize=True, output_final_state=True)
    assert o.shape == (2, 0, 4, 8) and S.shape == (2, 2, 8, 8)


def test_long_sequence_runs_on_cpu():
    # 32k tokens: the chunked reference keeps memory O(T) and has no per-token Python loop.
    T = 32768
    q, k, v = (randn(1, T, 2, 32, device="cpu") for _ in range(3))
    o, S = attnkit.lightning_attention(q, k, v, attnkit.lightning_slopes(2), scale=1.0, output_final_state=True)
    assert o.shape == (1, T, 2, 32) and torch.isfinite(o).all()


def test_nan_propagates():
    q, k, v = qkv(1, 10, 2, 2, 4, 4)
    q[0, 3, 0, 0] = float("nan")
    o, _ = attnkit.lightning_attention(q, k, v, torch.rand(2))
    assert torch.isnan(o[0, 3, 0]).all() and not torch.isnan(o[0, :3]).any()


def test_strided_inputs():
    q, k, v = qkv(2, 33, 4, 2, 8, 8, strided=True)
    decay = torch.rand(4)
    o, S = attnkit.lightning_attention(q, k, v, decay, output_final_state=True)
    on, Sn, _ = naive(q, k, v, decay=decay)
    torch.testing.assert_close(o, on)
    torch.testing.assert_close(S, Sn)


def test_slopes_and_layer_decay():
    s = attnkit.lightning_slopes(8)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, torch.tensor([2 ** (-8 * (i + 1) / 8) for i in range(8)], dtype=torch.float32))
    d = attnkit.layer_decay(s, 2, 5)
    torch.testing.assert_close(d, s * (1 - 2 / (4 + 1e-5) + 1e-5))
    torch.testing.assert_close(attnkit.layer_decay(s, 0, 1), s * (1 + 1e-5))
    with pytest.raises(ValueError, match="layer_idx"):
        attnkit.layer_decay(s, 5, 5)
    with pytest.raises(ValueError, match="num_heads"):
        attnkit.lightning_slopes(0)


def test_backend_choice_and_explain():
    q, k, v = qkv(1, 4, 2, 2, 4, 4)
    ex = attnkit.explain("lightning_attention", q, k, v, torch.rand(2))
    assert ex.backend == "reference" and "triton" in ex.refusals
    with pytest.raises(attnkit.BackendUnavailable, match="cuda"):
        attnkit.lightning_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        attnkit.lightning_attention(q, k, v, backend="nope")


def test_env_backend_override(monkeypatch):
    q, k, v = qkv(1, 4, 2, 2, 4, 4)
    monkeypatch.setenv("ATTNKIT_BACKEND", "cuda")
    with pytest.raises(attnkit.BackendUnavailable, match="ATTNKIT_BACKEND"):
        attnkit.lightning_attention(q, k, v)
    monkeypatch.setenv("ATTNKIT_BACKEND", "reference")
    assert attnkit.explain("lightning_attention", q, k, v).backend == "reference"
    monkeypatch.setenv("ATTNKIT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ATTNKIT_BACKEND"):
        attnkit.lightning_attention(q, k, v)


# ------------------------------------------------------------------------------------ bad inputs

def _good(dtype=torch.float32):
    q, k, v = qkv(2, 5, 4, 2, 8, 6, dtype=dtype)
    return q, k, v


BAD_LIGHTNING = [
    ("q-rank", lambda q, k, v, d: dict(q=q[0]), ValueError, "q"),
    ("heads", lambda q, k, v, d: dict(k=torch.randn(2, 5, 3, 8), v=torch.randn(2, 5, 3, 6)), ValueError, "heads"),
    ("Dk", lambda q, k, v, d: dict(k=torch.randn(2, 5, 2, 7)), ValueError, "head dim"),
    ("time", lambda q, k, v, d: dict(v=torch.randn(2, 4, 2, 6)), ValueError, "batch and time"),
    ("v-heads", lambda q, k, v, d: dict(v=torch.randn(2, 5, 1, 6)), ValueError, "v must have"),
    ("mixed-dtype", lambda q, k, v, d: dict(k=k.half()), TypeError, "k must have the same dtype"),
    ("int-dtype", lambda q, k, v, d: dict(q=q.int(), k=k.int(), v=v.int()), TypeError, "q must have dtype"),
    ("decay-shape", lambda q, k, v, d: dict(decay=torch.rand(3)), ValueError, "decay"),
    ("decay-sign", lambda q, k, v, d: dict(decay=torch.tensor([0.1, -0.2, 0.3, 0.0])), ValueError, ">= 0"),
    ("decay-nan", lambda q, k, v, d: dict(decay=torch.tensor([0.1, float("nan"), 0.3, 0.0])), ValueError, ">= 0"),
    ("decay-dtype", lambda q, k, v, d: dict(decay=d.half()), TypeError, "decay"),
    ("state-shape", lambda q, k, v, d: dict(initial_state=torch.zeros(2, 2, 8, 6)), ValueError, "initial_state"),
    ("state-dtype", lambda q, k, v, d: dict(initial_state=torch.zeros(2, 4, 8, 6, dtype=torch.float16)),
     TypeError, "initial_state"),
    ("scale-type", lambda q, k, v, d: dict(scale="1"), TypeError, "scale"),
    ("cu-dtype", lambda q, k, v, d: dict(q=q[:1], k=k[:1], v=v[:1], cu_seqlens=torch.tensor([0, 5])), TypeError,
     "cu_seqlens"),
    ("cu-batch", lambda q, k, v, d: dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), ValueError,
     "batch size 1"),
    ("cu-start", lambda q, k, v, d: dict(q=q[:1], k=k[:1], v=v[:1], cu_seqlens=torch.tensor([1, 5], dtype=torch.int32)),
     ValueError, "start at 0"),
    ("cu-order", lambda q, k, v, d: dict(q=q[:1], k=k[:1], v=v[:1],
                                         cu_seqlens=torch.tensor([0, 4, 2, 5], dtype=torch.int32)), ValueError,
     "non-decreasing"),
    ("cu-end", lambda q, k, v, d: dict(q=q[:1], k=k[:1], v=v[:1], cu_seqlens=torch.tensor([0, 4], dtype=torch.int32)),
     ValueError, "packed length"),
    ("cu-state-rows", lambda q, k, v, d: dict(q=q[:1], k=k[:1], v=v[:1], cu_seqlens=torch.tensor([0, 2, 5],
                                              dtype=torch.int32), initial_state=torch.zeros(1, 4, 8, 6)),
     ValueError, "initial_state"),
    ("final-flag", lambda q, k, v, d: dict(output_final_state=1), TypeError, "output_final_state"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BAD_LIGHTNING, ids=[b[0] for b in BAD_LIGHTNING])
def test_bad_lightning_inputs(name, mutate, exc, match):
    q, k, v = _good()
    d = torch.rand(4)
    args = dict(q=q, k=k, v=v, decay=d)
    args.update(mutate(q, k, v, d))
    with pytest.raises(exc, match=match):
        attnkit.lightning_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("decay"), **args)


BAD_LINEAR = [
    ("feature-map-name", dict(feature_map="gelu"), ValueError, "feature_map"),
    ("feature-map-type", dict(feature_map=3), TypeError, "feature_map"),
    ("normalize-needs-tuple", dict(normalize=True, initial_state=torch.zeros(2, 2, 8, 6)), TypeError,
     "initial_state"),
    ("z-shape", dict(normalize=True, initial_state=(torch.zeros(2, 2, 8, 6), torch.zeros(2, 4, 8))), ValueError,
     "z"),
    ("tuple-without-normalize", dict(initial_state=(torch.zeros(2, 2, 8, 6), torch.zeros(2, 2, 8))), TypeError,
     "initial_state"),
    ("state-per-query-head", dict(initial_state=torch.zeros(2, 4, 8, 6)), ValueError, "initial_state"),
    ("eps", dict(eps=0.0), ValueError, "eps"),
    ("causal-type", dict(causal="yes"), TypeError, "causal"),
]


@pytest.mark.parametrize("name,kw,exc,match", BAD_LINEAR, ids=[b[0] for b in BAD_LINEAR])
def test_bad_linear_inputs(name, kw, exc, match):
    q, k, v = _good()
    with pytest.raises(exc, match=match):
        attnkit.linear_attention(q, k, v, **kw)


def _step_inputs():
    q, k, v = qkv(3, 1, 4, 2, 8, 6, dtype=torch.float32)
    return q, k, v, torch.randn(5, 4, 8, 6)


BAD_STEP = [
    ("two-tokens", lambda q, k, v, S: dict(q=torch.randn(3, 2, 4, 8), k=torch.randn(3, 2, 2, 8),
                                           v=torch.randn(3, 2, 2, 6)), ValueError, "one token"),
    ("state-shape", lambda q, k, v, S: dict(state=torch.randn(5, 3, 8, 6)), ValueError, "state"),
    ("state-dtype", lambda q, k, v, S: dict(state=S.half()), TypeError, "state"),
    ("decay-with-fm", lambda q, k, v, S: dict(decay=torch.rand(4), feature_map="elu"), ValueError, "feature_map"),
    ("decay-with-linear-state", lambda q, k, v, S: dict(decay=torch.rand(4), state=torch.randn(5, 2, 8, 6)),
     ValueError, "state"),
    ("fm-with-per-query-state", lambda q, k, v, S: dict(feature_map="elu"), ValueError, "feature_map"),
    ("indices-range", lambda q, k, v, S: dict(state_indices=torch.tensor([0, 5, 1], dtype=torch.int32)),
     ValueError, "state_indices"),
    ("indices-negative", lambda q, k, v, S: dict(state_indices=torch.tensor([0, -1, 1], dtype=torch.int32)),
     ValueError, "state_indices"),
    ("indices-repeat", lambda q, k, v, S: dict(state_indices=torch.tensor([0, 1, 1], dtype=torch.int32)),
     ValueError, "state_indices"),
    ("indices-dtype", lambda q, k, v, S: dict(state_indices=torch.tensor([0, 1, 2], dtype=torch.int16)),
     TypeError, "state_indices"),
    ("indices-shape", lambda q, k, v, S: dict(state_indices=torch.tensor([0, 1], dtype=torch.int32)),
     ValueError, "state_indices"),
    ("too-few-rows", lambda q, k, v, S: dict(state=S[:2]), ValueError, "state"),
    ("normalize-tensor", lambda q, k, v, S: dict(normalize=True, state=torch.randn(5, 2, 8, 6)), TypeError,
     "state"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BAD_STEP, ids=[b[0] for b in BAD_STEP])
def test_bad_step_inputs_modify_nothing(name, mutate, exc, match):
    q, k, v, S = _step_inputs()
    args = dict(q=q, k=k, v=v, state=S, decay=torch.rand(4))
    args.update(mutate(q, k, v, S))
    if "feature_map" in args and name == "fm-with-per-query-state":
        args.pop("decay")
    if name in ("normalize-tensor",):
        args.pop("decay")
    state = args.pop("state")
    before = state.clone()
    with pytest.raises(exc, match=match):
        attnkit.linear_attention_step(args.pop("q"), args.pop("k"), args.pop("v"), state, **args)
    assert torch.equal(state, before), "a rejected call modified the state"


def test_step_value_checks_skipped_on_cuda_without_env(monkeypatch):
    from attnkit import _validation as V

    t = torch.zeros(1)
    assert V.value_checks_enabled(t)
    monkeypatch.setenv("ATTNKIT_CHECKS", "1")
    assert V.value_checks_enabled(t)
