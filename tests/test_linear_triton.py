"""Triton backend of lightning_attention, linear_attention and linear_attention_step.

Every case goes through the public ops with `backend="triton"` and is compared with the reference
backend by `harness.compare_op` (float64 golden, same-dtype reference, kernel): outputs, final
states, and dq/dk/dv/dh0 under random cotangents for the output and the final state. Without a
GPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the
case lists are small; the same file runs on CUDA.
"""

import pytest
import torch

import attnkit
from attnkit.ops.linear import triton_register  # noqa: F401  (registers the triton backend)

from .harness import DEVICE, cast_input, clone_as, compare_op, compiled_variants, interpreted, kernel_dtypes, params

BACKEND = "triton"


def _data(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE) * scale


_as = cast_input


def _state_as(x64, dtype):
    # states are float32 (float64 on the float64 golden run)
    return None if x64 is None else clone_as(x64, torch.float64 if dtype == torch.float64 else torch.float32,
                                              requires_grad=True)


def _decay(H):
    return (torch.rand(H, device=DEVICE) * 0.2 + 0.01).float()


# ------------------------------------------------------------------------------ lightning attention

LIGHTNING_CASES = params([
    dict(B=2, T=63, H=4, Hk=4, Dk=32, Dv=32, decay=1, h0=1, strided=0),
    dict(B=1, T=100, H=4, Hk=2, Dk=80, Dv=96, decay=1, h0=0, strided=1),
    dict(B=2, T=1, H=2, Hk=1, Dk=16, Dv=32, decay=0, h0=1, strided=0),
    dict(B=1, T=257, H=2, Hk=1, Dk=32, Dv=16, decay=1, h0=1, strided=0),
    dict(B=1, T=40, H=2, Hk=2, Dk=256, Dv=48, decay=1, h0=1, strided=1),
    dict(B=1, T=1000, H=2, Hk=2, Dk=64, Dv=64, decay=1, h0=1, strided=0),
])


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("case", LIGHTNING_CASES)
def test_lightning_attention(case, dtype, nan_empty):
    B, T, H, Hk, Dk, Dv = (case[n] for n in ("B", "T", "H", "Hk", "Dk", "Dv"))
    q, k, v = _data(B, T, H, Dk), _data(B, T, Hk, Dk), _data(B, T, Hk, Dv)
    s0 = _data(B, H, Dk, Dv) if case["h0"] else None
    decay = _decay(H) if case["decay"] else None
    strided = bool(case["strided"])

    def make_args(dt):
        args = (_as(q, dt, strided=strided), _as(k, dt, strided=strided), _as(v, dt, strided=strided), decay)
        return args, dict(scale=0.5, initial_state=_state_as(s0, dt), output_final_state=True)

    compare_op(attnkit.lightning_attention, make_args, dtype, BACKEND, grad=True, output_names=["o", "S"])


# --------------------------------------------------------------------------------- linear attention

LINEAR_CASES = params([
    dict(B=2, T=63, H=4, Hk=2, Dk=32, Dv=48, causal=1, fm="elu", norm=1, h0=1, strided=0),
    dict(B=1, T=100, H=4, Hk=1, Dk=32, Dv=32, causal=1, fm="relu", norm=0, h0=0, strided=1),
    dict(B=1, T=257, H=2, Hk=2, Dk=16, Dv=80, causal=1, fm=None, norm=0, h0=1, strided=0),
    dict(B=1, T=63, H=2, Hk=2, Dk=32, Dv=32, causal=1, fm="relu", norm=1, h0=1, strided=0),
    dict(B=2, T=100, H=4, Hk=2, Dk=32, Dv=32, causal=0, fm="elu", norm=1, h0=1, strided=0),
    dict(B=1, T=1, H=2, Hk=1, Dk=32, Dv=16, causal=0, fm=None, norm=0, h0=0, strided=1),
])


def _linear_state(B, Hk, Dk, Dv, norm, T):
    s0 = _data(B, Hk, Dk, Dv)
    # a normaliser that a positive feature map would have built: positive, growing with length
    z0 = (torch.rand(B, Hk, Dk, dtype=torch.float64, device=DEVICE) + 0.5) * max(T, 1) if norm else None
    return s0, z0


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("case", LINEAR_CASES)
def test_linear_attention(case, dtype, nan_empty):
    B, T, H, Hk, Dk, Dv = (case[n] for n in ("B", "T", "H", "Hk", "Dk", "Dv"))
    norm = bool(case["norm"])
    q, k, v = _data(B, T, H, Dk), _data(B, T, Hk, Dk), _data(B, T, Hk, Dv)
    s0, z0 = _linear_state(B, Hk, Dk, Dv, norm, T) if case["h0"] else (None, None)
    strided = bool(case["strided"])

    def make_args(dt):
        state = None
        if s0 is not None:
            state = (_state_as(s0, dt), _state_as(z0, dt)) if norm else _state_as(s0, dt)
        args = (_as(q, dt, strided=strided), _as(k, dt, strided=strided), _as(v, dt, strided=strided))
        return args, dict(causal=bool(case["causal"]), feature_map=case["fm"], normalize=norm, scale=0.7,
                          initial_state=state, output_final_state=True)

    names = ["o", "S", "z"] if norm else ["o", "S"]
    compare_op(attnkit.linear_attention, make_args, dtype, BACKEND, grad=True, output_names=names)


def test_linear_attention_callable_feature_map():
    # a callable runs outside the kernels (prepare step); the kernels then see the identity map
    B, T, H, Hk, Dk, Dv = 1, 40, 2, 1, 32, 32
    q, k, v = _data(B, T, H, Dk), _data(B, T, Hk, Dk), _data(B, T, Hk, Dv)

    def make_args(dt):
        return (_as(q, dt), _as(k, dt), _as(v, dt)), dict(feature_map=torch.sigmoid, normalize=True,
                                                          output_final_state=True)

    compare_op(attnkit.linear_attention, make_args, torch.float32, BACKEND, grad=True, output_names=["o", "S", "z"])


def test_empty_sequence():
    q, k, v = _data(2, 0, 2, 32).float(), _data(2, 0, 1, 32).float(), _data(2, 0, 1, 16).float()
    s0 = _data(2, 2, 32, 16).float()
    o, S = attnkit.lightning_attention(q, k, v, _decay(2), initial_state=s0, output_final_state=True,
                                       backend=BACKEND)
    assert o.shape == (2, 0, 2, 16) and torch.equal(S, s0)
    o, (S, z) = attnkit.linear_attention(q, k, v, feature_map="elu", normalize=True, output_final_state=True,
                                         backend=BACKEND)
    assert o.shape == (2, 0, 2, 16) and not S.any() and not z.any()


# ------------------------------------------------------------------------------ variable length

CU = [0, 17, 17, 80, 150]  # one empty sequence, lengths that are not chunk multiples


VARLEN_OPS = [  # (id, op, kwargs)
    ("lightning-decay", "lightning", dict(scale=0.5)),
    ("linear-elu-normalize", "linear", dict(feature_map="elu", normalize=True, scale=0.5)),
    ("linear-noncausal-relu", "linear", dict(causal=False, feature_map="relu", scale=0.5)),
]
VARLEN_PARAMS = [pytest.param(kind, kw, id=name) for name, kind, kw in VARLEN_OPS]


def _run_varlen_op(kind, q, k, v, state, cu, backend, **kw):
    if kind == "lightning":
        return attnkit.lightning_attention(q, k, v, kw.pop("decay"), initial_state=state, output_final_state=True,
                                           cu_seqlens=cu, backend=backend, **kw)
    return attnkit.linear_attention(q, k, v, initial_state=state, output_final_state=True, cu_seqlens=cu,
                                    backend=backend, **kw)


def _varlen_inputs(kind, normalize):
    total, N, H, Hk, Dk, Dv = CU[-1], len(CU) - 1, 4, 2, 32, 48
    q, k, v = _data(1, total, H, Dk), _data(1, total, Hk, Dk), _data(1, total, Hk, Dv)
    if kind == "lightning":
        s0, z0 = _data(N, H, Dk, Dv), None
    else:
        s0, z0 = _linear_state(N, Hk, Dk, Dv, normalize, 10)
    return q, k, v, s0, z0, _decay(H)


@pytest.mark.parametrize("kind,kw", VARLEN_PARAMS)
def test_varlen_matches_reference(kind, kw, nan_empty):
    q, k, v, s0, z0, decay = _varlen_inputs(kind, kw.get("normalize", False))
    cu = torch.tensor(CU, dtype=torch.int32, device=DEVICE)

    def make_args(dt):
        state = _state_as(s0, dt) if z0 is None else (_state_as(s0, dt), _state_as(z0, dt))
        extra = dict(decay=decay) if kind == "lightning" else {}
        return (kind, _as(q, dt), _as(k, dt), _as(v, dt), state, cu), dict(kw, **extra)

    def fn(kind, q, k, v, state, cu, backend=None, **kw):
        return _run_varlen_op(kind, q, k, v, state, cu, backend, **kw)

    compare_op(fn, make_args, torch.float32, BACKEND, grad=True)


@pytest.mark.parametrize("kind,kw", VARLEN_PARAMS)
def test_varlen_matches_per_sequence_loop(kind, kw):
    q, k, v, s0, z0, decay = (x.float() if x is not None else None
                              for x in _varlen_inputs(kind, kw.get("normalize", False)))
    cu = torch.tensor(CU, dtype=torch.int32, device=DEVICE)
    extra = dict(decay=decay) if kind == "lightning" else {}
    state = s0 if z0 is None else (s0, z0)
    o, st = _run_varlen_op(kind, q, k, v, state, cu, BACKEND, **kw, **extra)
    for i, (a, b) in enumerate(zip(CU, CU[1:])):
        st_i = s0[i:i + 1] if z0 is None else (s0[i:i + 1], z0[i:i + 1])
        o_i, st_ref = _run_varlen_op(kind, q[:, a:b], k[:, a:b], v[:, a:b], st_i, None, BACKEND, **kw, **extra)
        torch.testing.assert_close(o[:, a:b], o_i, rtol=1e-6, atol=1e-6)
        got = st[i:i + 1] if z0 is None else (st[0][i:i + 1], st[1][i:i + 1])
        torch.testing.assert_close(got, st_ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ split and resume


@pytest.mark.parametrize("kind", ["lightning", "linear"])
def test_split_and_resume(kind):
    # final state of part 1 as the initial state of part 2 == one pass; gradients flow through it
    B, T, cut, H, Hk, Dk, Dv = 2, 100, 37, 4, 2, 32, 32
    q, k, v = _data(B, T, H, Dk), _data(B, T, Hk, Dk), _data(B, T, Hk, Dv)
    decay = _decay(H)

    def run(q, k, v, state, backend):
        if kind == "lightning":
            return attnkit.lightning_attention(q, k, v, decay, scale=0.5, initial_state=state,
                                               output_final_state=True, backend=backend)
        return attnkit.linear_attention(q, k, v, feature_map="elu", normalize=True, scale=0.5, initial_state=state,
                                        output_final_state=True, backend=backend)

    def two_parts(q, k, v, backend=None):
        o1, st = run(q[:, :cut], k[:, :cut], v[:, :cut], None, backend)
        o2, st = run(q[:, cut:], k[:, cut:], v[:, cut:], st, backend)
        return (torch.cat([o1, o2], 1), st)

    def make_args(dt):
        return (_as(q, dt), _as(k, dt), _as(v, dt)), {}

    compare_op(two_parts, make_args, torch.float32, BACKEND, grad=True)
    qf, kf, vf = q.float(), k.float(), v.float()
    o_split, st_split = two_parts(qf, kf, vf, BACKEND)
    o_one, st_one = run(qf, kf, vf, None, BACKEND)
    torch.testing.assert_close(o_split, o_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st_split, st_one, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ decode step

STEP_CASES = params([
    dict(mode="lightning", B=3, H=4, Hk=2, Dk=32, Dv=80, decay=1, fm=None, norm=0, idx=1),
    dict(mode="lightning", B=2, H=2, Hk=2, Dk=16, Dv=16, decay=0, fm=None, norm=0, idx=0),
    dict(mode="linear", B=3, H=4, Hk=2, Dk=32, Dv=48, decay=0, fm="elu", norm=1, idx=1),
    dict(mode="linear", B=2, H=4, Hk=1, Dk=64, Dv=32, decay=0, fm="relu", norm=0, idx=0),
])


def _step_state(case, N):
    Hs = case["H"] if case["mode"] == "lightning" else case["Hk"]
    s0 = _data(N, Hs, case["Dk"], case["Dv"])
    z0 = (torch.rand(N, case["Hk"], case["Dk"], dtype=torch.float64, device=DEVICE) + 0.5) * 8 if case["norm"] else None
    return s0, z0


def _step(case, q, k, v, state, idx, backend):
    return attnkit.linear_attention_step(q, k, v, state, decay=case.get("_decay"), scale=0.5,
                                         feature_map=case["fm"], normalize=bool(case["norm"]), state_indices=idx,
                                         backend=backend)


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("case", STEP_CASES)
def test_step_matches_reference(case, dtype, nan_empty):
    B, H, Hk, Dk, Dv = (case[n] for n in ("B", "H", "Hk", "Dk", "Dv"))
    N = B + 2
    case = dict(case, _decay=_decay(H) if case["decay"] else None)
    q, k, v = _data(B, 1, H, Dk), _data(B, 1, Hk, Dk), _data(B, 1, Hk, Dv)
    s0, z0 = _step_state(case, N)
    idx = torch.randperm(N, device=DEVICE)[:B].to(torch.int32) if case["idx"] else None
    # rows the step must not touch hold NaN: they must come back unchanged and leak nowhere
    unused = torch.ones(N, dtype=torch.bool, device=DEVICE)
    unused[idx.long() if idx is not None else torch.arange(B, device=DEVICE)] = False
    s0[unused] = float("nan")
    if z0 is not None:
        z0[unused] = float("nan")

    def make_args(dt):
        sdt = torch.float64 if dt == torch.float64 else torch.float32
        s = s0.to(sdt).clone()
        state = (s, z0.to(sdt).clone()) if z0 is not None else s
        return (q.to(dt), k.to(dt), v.to(dt), state), {}

    def fn(q, k, v, state, backend=None):
        o = _step(case, q, k, v, state, idx, backend)
        return o, state  # the whole state, updated in place: untouched rows must stay as they were

    names = ["o", "S", "z"] if z0 is not None else ["o", "S"]
    compare_op(fn, make_args, dtype, BACKEND, output_names=names)


@pytest.mark.parametrize("case", STEP_CASES)
def test_step_matches_chunked(case):
    # running the step token by token equals the chunked op with output_final_state=True
    B, H, Hk, Dk, Dv, T = case["B"], case["H"], case["Hk"], case["Dk"], case["Dv"], 5
    decay = _decay(H) if case["decay"] else None
    case = dict(case, _decay=decay)
    q, k, v = (x.float() for x in (_data(B, T, H, Dk), _data(B, T, Hk, Dk), _data(B, T, Hk, Dv)))
    s0, z0 = (x.float() if x is not None else None for x in _step_state(case, B))
    if case["mode"] == "lightning":
        o_c, st_c = attnkit.lightning_attention(q, k, v, decay, scale=0.5, initial_state=s0,
                                                output_final_state=True, backend=BACKEND)
    else:
        init = (s0, z0) if z0 is not None else s0
        o_c, st_c = attnkit.linear_attention(q, k, v, feature_map=case["fm"], normalize=bool(case["norm"]),
                                             scale=0.5, initial_state=init, output_final_state=True, backend=BACKEND)
    state = (s0.clone(), z0.clone()) if z0 is not None else s0.clone()
    outs = [_step(case, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], state, None, BACKEND) for t in range(T)]
    torch.testing.assert_close(torch.cat(outs, 1), o_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, st_c, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- compilation


@pytest.mark.skipif(interpreted(), reason="the Triton interpreter has no compile cache to count; "
                                          "checked on GPU (a new T must not recompile)")
def test_new_length_does_not_recompile():
    from attnkit.ops.linear import triton_chunk_kernels as kern

    kernels = (kern._segment_state_kernel, kern._segment_scan_kernel, kern._segment_output_kernel,
               kern._segment_dstate_kernel, kern._segment_dq_kernel, kern._segment_dkdv_kernel)

    def run(T):
        q = _data(1, T, 4, 64).half().requires_grad_()
        k, v = _data(1, T, 2, 64).half().requires_grad_(), _data(1, T, 2, 64).half().requires_grad_()
        o, S = attnkit.lightning_attention(q, k, v, _decay(4), output_final_state=True, backend=BACKEND)
        (o.float().sum() + S.sum()).backward()

    run(100)
    before = [compiled_variants(kern) for kern in kernels]
    run(333)
    run(1025)
    assert [compiled_variants(kern) for kern in kernels] == before


def test_explain_accepts_triton():
    q, k, v = _data(1, 8, 2, 32).float(), _data(1, 8, 2, 32).float(), _data(1, 8, 2, 32).float()
    ex = attnkit.explain("lightning_attention", q, k, v, _decay(2), backend=BACKEND)
    assert ex.backend == BACKEND and not ex.refusals[BACKEND]
    ex = attnkit.explain("linear_attention", q.double(), k.double(), v.double(), backend=BACKEND)
    assert ex.backend is None and any("float64" in r for r in ex.refusals[BACKEND])
    q8 = _data(1, 8, 2, 8).float()
    ex = attnkit.explain("lightning_attention", q8, q8, q8, backend=BACKEND)
    assert ex.backend is None and any("head dims" in r for r in ex.refusals[BACKEND])


def test_decay_requiring_grad_is_refused_by_triton():
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    decay = torch.rand(2, requires_grad=True)
    ex = attnkit.explain("lightning_attention", q, k, v, decay, backend="triton")
    assert ex.backend is None and any("decay" in r for r in ex.refusals["triton"])
    o, _ = attnkit.lightning_attention(q, k, v, decay, backend="reference")
    o.sum().backward()
    assert decay.grad is not None and torch.isfinite(decay.grad).all()
