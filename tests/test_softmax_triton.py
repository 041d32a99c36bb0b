"""Triton backend of attention, attention_decode and qk_norm.

Every case goes through the public ops with `backend="triton"` and is compared with the reference
backend by `harness.compare_op` (float64 golden, same-dtype reference, kernel): the output, the
log-sum-exp, and the gradients of q, k, v, both norm weights and a tensor scale under random
cotangents on the output *and* the lse. Output buffers start as NaN (`nan_empty`) and strided
inputs have NaN in their gaps, so an element a kernel forgets to write, or a stray read, shows up.
Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so the case lists are small; the same file runs on CUDA (bfloat16 there).
"""

import pytest
import torch

import attnkit
from attnkit.ops.softmax import triton_register  # noqa: F401  (registers the triton backend)

from .harness import (
    DEVICE,
    assert_close_to_golden,
    cast_input,
    clone_as,
    compare_op,
    compiled_variants,
    interpreted,
    kernel_dtypes,
    params,
)

BACKEND = "triton"
F64 = torch.float64


def _data(*shape):
    return torch.randn(*shape, dtype=F64, device=DEVICE)


_as = cast_input


def _aux_as(x64, dtype, aux_dtype):
    """A norm weight or tensor scale: float64 on the golden run, else `aux_dtype` ("f32" or "x")."""
    if x64 is None:
        return None
    dt = F64 if dtype == F64 else (torch.float32 if aux_dtype == "f32" else dtype)
    return clone_as(x64, dt, requires_grad=True)


# ----------------------------------------------------------------------------------- attention

# T/S in {1, 17, 63, 100, 129} with T < S, T == S and T > S (empty causal rows); GQA ratios 1, 2,
# 4 and all (Hk = 1); head dims 32/64/80/96/128 and Dk != Dv; QK-norm rms/l2 with and without
# one or both weights (float32 or input-dtype weights); float and tensor scales; strided inputs.
ATTENTION_CASES = params([
    dict(B=2, T=63, S=63, H=4, Hk=4, D=64, Dv=64, causal=1, norm=None, w=None, tscale=0, strided=0),
    dict(B=1, T=100, S=129, H=4, Hk=2, D=32, Dv=32, causal=1, norm="rms", w="qk", tscale=1, strided=0),
    dict(B=2, T=129, S=17, H=4, Hk=1, D=32, Dv=32, causal=1, norm=None, w=None, tscale=1, strided=1),
    dict(B=1, T=17, S=100, H=8, Hk=2, D=80, Dv=80, causal=0, norm="l2", w=None, tscale=1, strided=0),
    dict(B=1, T=1, S=63, H=2, Hk=1, D=128, Dv=128, causal=1, norm=None, w=None, tscale=0, strided=0),
    dict(B=1, T=63, S=1, H=2, Hk=2, D=32, Dv=64, causal=1, norm="rms", w="q", tscale=0, strided=0),
    dict(B=1, T=17, S=17, H=4, Hk=2, D=96, Dv=32, causal=0, norm="l2", w="k", tscale=0, strided=1),
    dict(B=1, T=129, S=100, H=3, Hk=1, D=32, Dv=16, causal=1, norm="rms", w="qk", tscale=1, strided=0),
    dict(B=2, T=17, S=63, H=4, Hk=4, D=32, Dv=32, causal=0, norm=None, w=None, tscale=0, strided=0),
])


def _attention_args(case, q, k, v, wq, wk, sc, aux_dtype="f32"):
    strided = bool(case["strided"])

    def make_args(dt):
        args = tuple(_as(x, dt, strided=strided) for x in (q, k, v))
        return args, dict(causal=bool(case["causal"]), scale=_aux_as(sc, dt, aux_dtype) if sc is not None else 0.3,
                          qk_norm=case["norm"], q_norm_weight=_aux_as(wq, dt, aux_dtype),
                          k_norm_weight=_aux_as(wk, dt, aux_dtype), return_lse=True)

    return make_args


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention(case, dtype, nan_empty):
    B, T, S, H, Hk, D, Dv = (case[n] for n in ("B", "T", "S", "H", "Hk", "D", "Dv"))
    q, k, v = _data(B, T, H, D), _data(B, S, Hk, D), _data(B, S, Hk, Dv)
    wq = _data(D) * 0.5 + 1 if case["w"] in ("qk", "q") else None
    wk = _data(D) * 0.5 + 1 if case["w"] in ("qk", "k") else None
    sc = torch.tensor(0.7, dtype=F64, device=DEVICE) if case["tscale"] else None
    # in low precision, one case keeps the weights and the scale in the input dtype
    aux = "x" if dtype != torch.float32 and case["w"] and case["tscale"] else "f32"
    compare_op(attnkit.attention, _attention_args(case, q, k, v, wq, wk, sc, aux), dtype, BACKEND, grad=True,
               output_names=["o", "lse"])


# one empty sequence, one with T > S (empty causal rows), lengths that are not block multiples
CU_Q = [0, 17, 17, 80, 100, 101]
CU_K = [0, 30, 31, 94, 94, 130]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_varlen(causal, nan_empty):
    H, Hk, D, Dv = 4, 2, 32, 48
    q, k, v = _data(1, CU_Q[-1], H, D), _data(1, CU_K[-1], Hk, D), _data(1, CU_K[-1], Hk, Dv)
    wq, wk = _data(D) * 0.5 + 1, _data(D) * 0.5 + 1
    sc = torch.tensor(1.3, dtype=F64, device=DEVICE)
    cu_q = torch.tensor(CU_Q, dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor(CU_K, dtype=torch.int32, device=DEVICE)

    def make_args(dt):
        return (_as(q, dt), _as(k, dt), _as(v, dt)), dict(
            causal=causal, scale=_aux_as(sc, dt, "f32"), qk_norm="rms", q_norm_weight=_aux_as(wq, dt, "f32"),
            k_norm_weight=_aux_as(wk, dt, "f32"), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)

    compare_op(attnkit.attention, make_args, torch.float32, BACKEND, grad=True, output_names=["o", "lse"])


def test_attention_varlen_equals_per_sequence():
    H, Hk, D = 4, 1, 32
    q, k, v = (_data(1, CU_Q[-1], H, D).float(), _data(1, CU_K[-1], Hk, D).float(),
               _data(1, CU_K[-1], Hk, D).float())
    cu_q = torch.tensor(CU_Q, dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor(CU_K, dtype=torch.int32, device=DEVICE)
    o, lse = attnkit.attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True,
                               backend=BACKEND)
    assert lse.shape == (1, H, CU_Q[-1])
    for i in range(len(CU_Q) - 1):
        qs, ks = slice(CU_Q[i], CU_Q[i + 1]), slice(CU_K[i], CU_K[i + 1])
        o_i, lse_i = attnkit.attention(q[:, qs], k[:, ks], v[:, ks], causal=True, return_lse=True, backend=BACKEND)
        torch.testing.assert_close(o[:, qs], o_i, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse[..., qs], lse_i, rtol=1e-6, atol=1e-6)


def test_attention_empty_causal_rows_are_exact_zeros(nan_empty):
    # T > S: queries 0 .. T - S - 1 see no key: o = 0 and lse = -inf exactly, zero gradients
    B, T, S, H, Hk, D = 2, 40, 7, 4, 2, 32
    q, k, v = (_data(B, T, H, D).float().requires_grad_(), _data(B, S, Hk, D).float().requires_grad_(),
               _data(B, S, Hk, D).float().requires_grad_())
    o, lse = attnkit.attention(q, k, v, causal=True, qk_norm="l2", return_lse=True, backend=BACKEND)
    empty = T - S
    assert bool((o[:, :empty] == 0).all()) and bool(torch.isneginf(lse[..., :empty]).all())
    assert bool(torch.isfinite(o).all()) and bool(torch.isfinite(lse[..., empty:]).all())
    (o.square().sum() + lse[..., empty:].sum()).backward()
    assert bool((q.grad[:, :empty] == 0).all())
    assert all(bool(torch.isfinite(x.grad).all()) for x in (q, k, v))


@pytest.mark.parametrize("T,S", [(0, 5), (5, 0)])
def test_attention_empty_inputs(T, S, nan_empty):
    q = _data(2, T, 4, 32).float().requires_grad_()
    k, v = _data(2, S, 2, 32).float().requires_grad_(), _data(2, S, 2, 16).float().requires_grad_()
    o, lse = attnkit.attention(q, k, v, causal=True, return_lse=True, backend=BACKEND)
    assert o.shape == (2, T, 4, 16) and lse.shape == (2, 4, T)
    assert bool((o == 0).all()) and bool(torch.isneginf(lse).all())
    o.sum().backward()
    assert all(bool((x.grad == 0).all()) for x in (q, k, v))


def test_attention_large_head_dim():
    # D = 256 (the largest a tile holds), Dk != Dv
    B, T, S, H, Hk = 1, 33, 40, 2, 1
    q, k, v = _data(B, T, H, 256), _data(B, S, Hk, 256), _data(B, S, Hk, 160)

    def make_args(dt):
        return (_as(q, dt), _as(k, dt), _as(v, dt)), dict(causal=True, return_lse=True)

    compare_op(attnkit.attention, make_args, torch.float32, BACKEND, grad=True, output_names=["o", "lse"])


def test_attention_without_grad_and_without_lse():
    q, k, v = _data(1, 17, 4, 32).half(), _data(1, 17, 2, 32).half(), _data(1, 17, 2, 32).half()
    o = attnkit.attention(q, k, v, causal=True, backend=BACKEND)
    ref = attnkit.attention(q, k, v, causal=True, backend="reference")
    assert o.dtype == torch.float16 and o.shape == ref.shape
    torch.testing.assert_close(o, ref, rtol=2e-3, atol=2e-3)


# -------------------------------------------------------------------------------------- decode

DECODE_CASES = params([
    dict(B=3, Tq=1, Smax=100, H=4, Hk=1, D=32, Dv=32, lens=(0, 37, 99), append=1, strided=0),
    dict(B=3, Tq=1, Smax=100, H=4, Hk=4, D=64, Dv=64, lens=(1, 63, 100), append=0, strided=1),
    dict(B=2, Tq=3, Smax=129, H=8, Hk=2, D=64, Dv=48, lens=(0, 126), append=1, strided=1),
    dict(B=2, Tq=4, Smax=63, H=6, Hk=3, D=80, Dv=80, lens=(2, 63), append=0, strided=0),
    dict(B=2, Tq=2, Smax=257, H=8, Hk=1, D=128, Dv=128, lens=(255, 17), append=1, strided=0),
    dict(B=1, Tq=5, Smax=100, H=16, Hk=1, D=32, Dv=32, lens=(40,), append=1, strided=0),  # 80 packed rows
])


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("case", DECODE_CASES)
def test_attention_decode(case, dtype, nan_empty):
    B, Tq, Smax, H, Hk, D, Dv = (case[n] for n in ("B", "Tq", "Smax", "H", "Hk", "D", "Dv"))
    strided = bool(case["strided"])
    q, k_cache, v_cache = _data(B, Tq, H, D), _data(B, Smax, Hk, D), _data(B, Smax, Hk, Dv)
    k_new = _data(B, Tq, Hk, D) if case["append"] else None
    v_new = _data(B, Tq, Hk, Dv) if case["append"] else None
    lens = torch.tensor(case["lens"], dtype=torch.int32, device=DEVICE)
    runs = {}
    for key, dt, backend in (("golden", F64, "reference"), ("ref", dtype, "reference"), ("out", dtype, BACKEND)):
        caches = (_as(k_cache, dt, grad=False, strided=strided), _as(v_cache, dt, grad=False, strided=strided))
        new = [_as(x, dt, grad=False, strided=strided) for x in (k_new, v_new)]
        o = attnkit.attention_decode(_as(q, dt, grad=False, strided=strided), *caches, lens, k_new=new[0],
                                     v_new=new[1], scale=0.2, backend=backend)
        runs[key] = (o, caches)
    assert_close_to_golden("o", runs["out"][0], runs["ref"][0], runs["golden"][0])
    # the append wrote exactly what the reference wrote, nothing else changed; lengths untouched
    for name, out, ref in zip(("k_cache", "v_cache"), runs["out"][1], runs["ref"][1]):
        assert torch.equal(out, ref), f"{name} differs from the reference after the call"
    assert lens.tolist() == list(case["lens"])


def test_attention_decode_rows_before_any_key_are_zero(nan_empty):
    # without append, cache_seqlens[b] < Tq leaves the first queries of row b without keys
    q, k_cache, v_cache = _data(2, 4, 4, 32).float(), _data(2, 20, 2, 32).float(), _data(2, 20, 2, 32).float()
    lens = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    o = attnkit.attention_decode(q, k_cache, v_cache, lens, backend=BACKEND)
    assert bool((o[0, :2] == 0).all()) and bool((o[1] == 0).all())
    ref = attnkit.attention_decode(q, k_cache, v_cache, lens, backend="reference")
    torch.testing.assert_close(o, ref, rtol=1e-6, atol=1e-6)


def test_attention_decode_rejected_append_leaves_caches_unchanged():
    k_cache, v_cache = _data(2, 16, 2, 32).float(), _data(2, 16, 2, 32).float()
    k0, v0 = k_cache.clone(), v_cache.clone()
    q, k_new, v_new = _data(2, 2, 4, 32).float(), _data(2, 2, 2, 32).float(), _data(2, 2, 2, 32).float()
    lens = torch.tensor([3, 15], dtype=torch.int32, device=DEVICE)  # 15 + 2 > Smax = 16
    with pytest.raises(ValueError, match="Smax"):
        attnkit.attention_decode(q, k_cache, v_cache, lens, k_new=k_new, v_new=v_new, backend=BACKEND)
    assert torch.equal(k_cache, k0) and torch.equal(v_cache, v0)


def test_attention_decode_equals_prefill_last_rows():
    # decoding Tq new tokens after a cache of L tokens equals the last Tq rows of causal prefill
    B, L, Tq, H, Hk, D = 2, 50, 3, 4, 2, 32
    q, k, v = _data(B, L + Tq, H, D).float(), _data(B, L + Tq, Hk, D).float(), _data(B, L + Tq, Hk, D).float()
    k_cache, v_cache = torch.zeros(B, 64, Hk, D, device=DEVICE), torch.zeros(B, 64, Hk, D, device=DEVICE)
    k_cache[:, :L], v_cache[:, :L] = k[:, :L], v[:, :L]
    lens = torch.full((B,), L, dtype=torch.int32, device=DEVICE)
    o = attnkit.attention_decode(q[:, L:], k_cache, v_cache, lens, k_new=k[:, L:], v_new=v[:, L:], backend=BACKEND)
    o_full = attnkit.attention(q, k, v, causal=True, backend=BACKEND)
    torch.testing.assert_close(o, o_full[:, L:], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- qk_norm

QK_NORM_CASES = params([
    dict(shape=(2, 17, 4, 64), mode="rms", w="f32", strided=0),
    dict(shape=(3, 63, 80), mode="rms", w="x", strided=1),
    dict(shape=(1, 100, 2, 32), mode="l2", w=None, strided=0),
    dict(shape=(129, 128), mode="l2", w="f32", strided=1),
])


@pytest.mark.parametrize("dtype", kernel_dtypes() + ([torch.bfloat16] if interpreted() else []))
@pytest.mark.parametrize("case", QK_NORM_CASES)
def test_qk_norm(case, dtype, nan_empty):
    # no tl.dot here, so bfloat16 runs in the interpreter too
    x = _data(*case["shape"])
    w = _data(case["shape"][-1]) * 0.5 + 1 if case["w"] else None

    def make_args(dt):
        return (_as(x, dt, strided=bool(case["strided"])), _aux_as(w, dt, case["w"])), dict(mode=case["mode"], eps=1e-5)

    compare_op(attnkit.qk_norm, make_args, dtype, BACKEND, grad=True, output_names=["y"])


def test_qk_norm_backward_grid_follows_the_shared_sm_count(monkeypatch, nan_empty):
    """The backward's program count comes from `attnkit.tools.sm_count` (ATTNKIT_SM_COUNT), 4 per
    SM: with 1 SM, 9 row blocks run on 4 programs, each looping over several blocks and summing
    its weight partial, and the gradients stay exact."""
    from attnkit.ops.softmax.triton_qk_norm import _bwd_programs

    monkeypatch.setenv("ATTNKIT_SM_COUNT", "1")
    assert _bwd_programs(9, torch.device("cpu")) == 4 and _bwd_programs(3, torch.device("cpu")) == 3
    monkeypatch.setenv("ATTNKIT_SM_COUNT", "7")
    assert _bwd_programs(100, torch.device("cpu")) == 28
    monkeypatch.setenv("ATTNKIT_SM_COUNT", "1")
    x = _data(9, 64, 64)  # 576 rows of 64: 9 blocks of 64 rows
    w = _data(64) * 0.5 + 1

    def make_args(dt):
        return (_as(x, dt), _aux_as(w, dt, "f32")), dict(mode="rms", eps=1e-5)

    compare_op(attnkit.qk_norm, make_args, torch.float32, BACKEND, grad=True, output_names=["y"])


# --------------------------------------------------------------------- tensor descriptors (TMA)


def test_tma_is_used_only_where_tma_can_address_the_tensors(monkeypatch):
    from attnkit.ops.softmax import triton_attention as ta

    monkeypatch.delenv("ATTNKIT_TMA", raising=False)
    k = torch.zeros(2, 64, 4, 32, dtype=torch.float32)
    assert ta.use_tma(k, k)
    assert not ta.use_tma(k, k.transpose(1, 3))                    # last stride != 1
    assert not ta.use_tma(torch.zeros(k.numel() + 1)[1:].view(k.shape), k)  # base 4 B past 16-B alignment
    assert not ta.use_tma(torch.zeros(2, 64, 4, 33)[..., :32], k)  # row stride 33 x 4 B, not 16-B aligned
    monkeypatch.setenv("ATTNKIT_TMA", "0")
    assert not ta.use_tma(k, k)
    # compiled path on CPU/meta tensors (the audit): the target arch decides, Hopper or newer only
    monkeypatch.delenv("ATTNKIT_TMA")
    monkeypatch.setattr(ta, "interpreted", lambda: False)
    for arch, want in (("sm_90", True), ("sm_80", False), ("sm_89", False)):
        monkeypatch.setenv("ATTNKIT_TARGET_ARCH", arch)
        assert ta.use_tma(k, k) is want, arch


@pytest.mark.parametrize("norm", [None, "rms"])
def test_tma_and_pointer_paths_agree(monkeypatch, norm):
    """The interpreter emulates the descriptors: the forward through TMA (whole tiles) equals the
    pointer path bit for bit, and matches the float64 reference (non-causal T = S = 100: whole
    32-key tiles plus a boundary tile; D = 48 pads the head dim inside the descriptor)."""
    q, k, v = _data(1, 100, 4, 48), _data(1, 100, 2, 48), _data(1, 100, 2, 48)
    kw = dict(causal=False, qk_norm=norm, backend=BACKEND)
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("ATTNKIT_TMA", flag)
        outs.append(attnkit.attention(q.float(), k.float(), v.float(), **kw))
    assert torch.equal(outs[0], outs[1])
    ref = attnkit.attention(q, k, v, causal=False, qk_norm=norm, backend="reference")
    torch.testing.assert_close(outs[0].double(), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- dispatch, tuning


def test_explain():
    q, k, v = _data(1, 8, 4, 32).float(), _data(1, 8, 2, 32).float(), _data(1, 8, 2, 32).float()
    ex = attnkit.explain("attention", q, k, v, causal=True, qk_norm="rms", backend=BACKEND)
    assert ex.backend == BACKEND and not ex.refusals[BACKEND]
    big = _data(1, 8, 2, 512).float()
    ex = attnkit.explain("attention", big, big, big, backend=BACKEND)
    assert ex.backend is None and any("head dims" in r for r in ex.refusals[BACKEND])
    ex = attnkit.explain("qk_norm", q.double(), backend=BACKEND)
    assert ex.backend is None and any("float64" in r for r in ex.refusals[BACKEND])
    lens = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    ex = attnkit.explain("attention_decode", q, k, v, lens, backend=BACKEND)
    assert ex.backend == BACKEND
    if DEVICE == "cpu":
        ex = attnkit.explain("attention", q.bfloat16(), k.bfloat16(), v.bfloat16(), backend=BACKEND)
        assert ex.backend is None and any("interpreter" in r for r in ex.refusals[BACKEND])


@pytest.mark.skipif(interpreted(), reason="the Triton interpreter has no compile cache to count; "
                                          "checked on GPU (a new length must not recompile)")
def test_new_length_does_not_recompile():
    from attnkit.ops.softmax import triton_attention, triton_decode

    kernels = (triton_attention._attention_fwd_kernel, triton_attention._attention_bwd_dkdv_kernel,
               triton_attention._attention_bwd_dq_kernel, triton_attention._attention_bwd_preprocess_kernel,
               triton_decode._attention_decode_fwd_kernel, triton_decode._attention_decode_reduce_kernel)

    def run(T):
        q = _data(1, T, 4, 64).half().requires_grad_()
        k, v = _data(1, T + 3, 2, 64).half().requires_grad_(), _data(1, T + 3, 2, 64).half().requires_grad_()
        o = attnkit.attention(q, k, v, causal=True, qk_norm="rms", backend=BACKEND)
        o.float().sum().backward()
        lens = torch.tensor([T], dtype=torch.int32, device=DEVICE)
        k_cache, v_cache = _data(1, 2048, 2, 64).half(), _data(1, 2048, 2, 64).half()
        attnkit.attention_decode(q[:, :1].detach(), k_cache, v_cache, lens, backend=BACKEND)

    run(100)
    before = [compiled_variants(kern) for kern in kernels]
    run(333)
    run(1025)
    assert [compiled_variants(kern) for kern in kernels] == before
