"""The softmax-attention family on the reference backend, against independent formulations.

`attention`, `attention_decode` and `qk_norm` are checked against formulas written here from
scratch (float64, K/V repeated per query head, explicit masks) and against
`torch.nn.functional.scaled_dot_product_attention`, so that the reference can serve as the
golden run for the kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.ops.softmax import reference

from .harness import params, randn

F64 = torch.float64
LOW_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------ independent formulations


def causal_mask(T: int, S: int, device) -> torch.Tensor:
    """`[T, S]` bool, True where query t sees key s (bottom-right: s <= t + S - T)."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


def naive_attention(q, k, v, *, causal=False, scale=None):
    """float64 attention with K/V repeated to every query head. Returns `(o, lse)`."""
    q, k, v = q.double(), k.double(), v.double()
    B, T, H, D = q.shape
    S, Hk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    k = k.repeat_interleave(H // Hk, dim=2)
    v = v.repeat_interleave(H // Hk, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    if causal:
        s = s.masked_fill(~causal_mask(T, S, q.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1)
    p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(p), p)  # rows that see nothing
    return torch.einsum("bhts,bshd->bthd", p, v), lse


def sdpa_attention(q, k, v, *, causal=False, scale=None):
    """torch's SDPA with native GQA; bottom-right causal through an explicit mask."""
    T, S = q.shape[1], k.shape[1]
    mask = causal_mask(T, S, q.device) if causal else None
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, scale=scale, enable_gqa=True)
    return o.transpose(1, 2)


def hand_norm(x, w, mode, eps):
    x = x.double()
    stat = (x * x).mean(-1, keepdim=True) if mode == "rms" else (x * x).sum(-1, keepdim=True)
    y = x / torch.sqrt(stat + eps)
    return y * w.double() if w is not None else y


def qkv(B, T, S, H, Hk, D, Dv, dtype=F64, device="cpu", requires_grad=False, strided=False):
    return (randn(B, T, H, D, dtype=dtype, device=device, requires_grad=requires_grad, strided=strided),
            randn(B, S, Hk, D, dtype=dtype, device=device, requires_grad=requires_grad, strided=strided),
            randn(B, S, Hk, Dv, dtype=dtype, device=device, requires_grad=requires_grad, strided=strided))


def close64(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def assert_rounded(name, out, golden):
    """`out` (low precision) equals `golden` (float64 maths on the same rounded inputs) up to the
    rounding of the output: within one unit of `out`'s dtype relative to each element, plus a
    float32-arithmetic floor relative to the largest element."""
    assert out.shape == golden.shape, name
    g = golden.detach().double()
    eps = 0.0 if out.dtype == torch.float32 else torch.finfo(out.dtype).eps
    mag = float(g.abs().max()) if g.numel() else 0.0
    bound = eps * g.abs() + 1e-5 * max(mag, 1.0)
    err = (out.double() - g).abs()
    assert bool((err <= bound).all()), f"{name}: max error {float(err.max()):.3e} ({out.dtype})"


# Lengths 1/17/63/100/129 with T != S and T > S (empty causal rows); GQA ratios 1, 2, 4 and all
# (Hk = 1); Dk != Dv.
CASES = params([
    dict(B=2, T=17, S=17, H=4, Hk=4, D=16, Dv=16, causal=False),
    dict(B=2, T=17, S=17, H=4, Hk=4, D=16, Dv=16, causal=True),
    dict(B=1, T=1, S=100, H=4, Hk=2, D=16, Dv=8, causal=True),
    dict(B=2, T=63, S=63, H=8, Hk=2, D=32, Dv=32, causal=True),
    dict(B=1, T=100, S=17, H=4, Hk=1, D=8, Dv=24, causal=True),
    dict(B=2, T=129, S=63, H=2, Hk=1, D=16, Dv=16, causal=False),
    dict(B=1, T=17, S=129, H=6, Hk=3, D=24, Dv=16, causal=True),
    dict(B=1, T=63, S=1, H=4, Hk=4, D=8, Dv=8, causal=True),
    dict(B=1, T=129, S=100, H=8, Hk=1, D=8, Dv=4, causal=True),
])


def shape_of(c):
    return c["B"], c["T"], c["S"], c["H"], c["Hk"], c["D"], c["Dv"]


# ----------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("c", CASES)
def test_attention_matches_naive(c, device):
    q, k, v = qkv(*shape_of(c), device=device)
    o, lse = attnkit.attention(q, k, v, causal=c["causal"], return_lse=True)
    o_ref, lse_ref = naive_attention(q, k, v, causal=c["causal"])
    assert o.dtype == F64 and lse.dtype == F64
    assert lse.shape == (c["B"], c["H"], c["T"])
    close64(o, o_ref)
    close64(lse, lse_ref)
    assert torch.equal(attnkit.attention(q, k, v, causal=c["causal"]), o)


@pytest.mark.parametrize("c", CASES)
def test_attention_matches_sdpa(c, device):
    q, k, v = qkv(*shape_of(c), device=device)
    scale = 0.37
    o = attnkit.attention(q, k, v, causal=c["causal"], scale=scale)
    o_ref = sdpa_attention(q, k, v, causal=c["causal"], scale=scale)
    sees = causal_mask(c["T"], c["S"], device).any(-1) if c["causal"] else torch.ones(c["T"], dtype=bool)
    close64(o[:, sees], o_ref[:, sees])
    assert bool((o[:, ~sees] == 0).all())


def test_empty_rows_are_zero_with_lse_minus_inf_and_finite_grads(device):
    B, T, S, H, Hk = 2, 9, 4, 4, 2
    q, k, v = qkv(B, T, S, H, Hk, 8, 8, device=device, requires_grad=True)
    o, lse = attnkit.attention(q, k, v, causal=True, return_lse=True)
    empty = T - S  # queries 0..T-S-1 see no key
    assert bool((o[:, :empty] == 0).all()) and bool(torch.isneginf(lse[..., :empty]).all())
    assert bool(torch.isfinite(lse[..., empty:]).all())
    (o.square().sum() + lse[..., empty:].sum()).backward()
    for x in (q, k, v):
        assert bool(torch.isfinite(x.grad).all())
    assert bool((q.grad[:, :empty] == 0).all())


@pytest.mark.parametrize("mode", ["rms", "l2"])
@pytest.mark.parametrize("weights", [False, True], ids=["no_w", "w"])
def test_attention_qk_norm_matches_hand_formula(mode, weights, device):
    B, T, S, H, Hk, D, Dv = 2, 17, 23, 4, 2, 16, 8
    q, k, v = qkv(B, T, S, H, Hk, D, Dv, device=device, strided=True)
    wq = randn(D, dtype=F64, device=device) if weights else None
    wk = randn(D, dtype=torch.float32, device=device) if weights else None  # mixed: float32 weight
    eps = 1e-3
    o, lse = attnkit.attention(q, k, v, causal=True, qk_norm=mode, q_norm_weight=wq, k_norm_weight=wk,
                               norm_eps=eps, scale=2.5, return_lse=True)
    o_ref, lse_ref = naive_attention(hand_norm(q, wq, mode, eps), hand_norm(k, wk, mode, eps), v,
                                     causal=True, scale=2.5)
    close64(o, o_ref)
    close64(lse, lse_ref)


def test_attention_tensor_scale(device):
    q, k, v = qkv(1, 17, 17, 4, 1, 8, 8, device=device)
    scale = torch.tensor(0.7, dtype=torch.float32, device=device, requires_grad=True)
    o = attnkit.attention(q, k, v, causal=True, scale=scale)
    close64(o, naive_attention(q, k, v, causal=True, scale=scale.item())[0])
    o.sum().backward()
    assert scale.grad is not None and scale.grad.dtype == torch.float32


def test_attention_strided_inputs(device):
    B, T, S, H, Hk, D, Dv = 2, 33, 40, 4, 2, 16, 8
    q, k, v = qkv(B, T, S, H, Hk, D, Dv, device=device, strided=True)
    # Also a [B, H, T, D] tensor seen as [B, T, H, D] (the layout of many model codes).
    k = randn(B, Hk, S, D, dtype=F64, device=device).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    o, lse = attnkit.attention(q, k, v, causal=True, return_lse=True)
    o_c, lse_c = attnkit.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True,
                                   return_lse=True)
    close64(o, o_c)
    close64(lse, lse_c)
    close64(o, naive_attention(q, k, v, causal=True)[0])


def test_attention_nan_propagates(device):
    q, k, v = qkv(2, 5, 7, 2, 1, 8, 8, device=device)
    q[1, 3, 0, 2] = float("nan")
    o = attnkit.attention(q, k, v)
    assert bool(torch.isnan(o[1, 3, 0]).all())
    o[1, 3, 0] = 0
    assert bool(torch.isfinite(o).all())


@pytest.mark.parametrize("T,S", [(0, 5), (0, 0), (4, 0)])
def test_attention_empty(T, S, device):
    q, k, v = qkv(2, T, S, 4, 2, 8, 6, device=device, requires_grad=True)
    o, lse = attnkit.attention(q, k, v, causal=True, return_lse=True)
    assert o.shape == (2, T, 4, 6) and lse.shape == (2, 4, T)
    assert bool((o == 0).all()) and bool(torch.isneginf(lse).all())
    o.sum().backward()
    assert q.grad.shape == q.shape and bool((q.grad == 0).all())


# ------------------------------------------------------------------------------------- varlen


VARLEN = params([
    dict(lens_q=(5, 0, 17, 3), lens_k=(5, 4, 9, 0), causal=True),
    dict(lens_q=(5, 0, 17, 3), lens_k=(5, 4, 9, 0), causal=False),
    dict(lens_q=(1, 63, 20), lens_k=(1, 63, 40), causal=True),
])


@pytest.mark.parametrize("c", VARLEN)
def test_varlen_matches_per_sequence(c, device):
    H, Hk, D, Dv = 4, 2, 16, 8
    cu_q = torch.tensor([0, *torch.tensor(c["lens_q"]).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(c["lens_k"]).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q, k, v = qkv(1, int(cu_q[-1]), int(cu_k[-1]), H, Hk, D, Dv, device=device)
    o, lse = attnkit.attention(q, k, v, causal=c["causal"], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                               return_lse=True)
    assert o.shape == (1, q.shape[1], H, Dv) and lse.shape == (1, H, q.shape[1])
    for i in range(len(c["lens_q"])):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        o_i, lse_i = attnkit.attention(q[:, qs], k[:, ks], v[:, ks], causal=c["causal"], return_lse=True)
        o_n, lse_n = naive_attention(q[:, qs], k[:, ks], v[:, ks], causal=c["causal"])
        close64(o[:, qs], o_i)
        close64(lse[..., qs], lse_i)
        close64(o[:, qs], o_n)
        close64(lse[..., qs], lse_n)


# ------------------------------------------------------------------------------------- decode


def cache_setup(B, Smax, Tq, H, Hk, D, Dv, lens, device, dtype=F64):
    q = randn(B, Tq, H, D, dtype=dtype, device=device)
    k_cache = randn(B, Smax, Hk, D, dtype=dtype, device=device)
    v_cache = randn(B, Smax, Hk, Dv, dtype=dtype, device=device)
    return q, k_cache, v_cache, torch.tensor(lens, dtype=torch.int32, device=device)


DECODE = params([
    dict(B=3, Smax=16, Tq=1, H=4, Hk=1, D=16, Dv=8, lens=(4, 0, 15)),
    dict(B=3, Smax=16, Tq=3, H=4, Hk=2, D=16, Dv=16, lens=(4, 0, 13)),
    dict(B=2, Smax=40, Tq=2, H=8, Hk=2, D=8, Dv=12, lens=(37, 17)),
])


@pytest.mark.parametrize("c", DECODE)
def test_decode_append_matches_prefill(c, device):
    B, Smax, Tq = c["B"], c["Smax"], c["Tq"]
    q, k_cache, v_cache, lens = cache_setup(B, Smax, Tq, c["H"], c["Hk"], c["D"], c["Dv"], c["lens"], device)
    k_new = randn(B, Tq, c["Hk"], c["D"], dtype=F64, device=device)
    v_new = randn(B, Tq, c["Hk"], c["Dv"], dtype=F64, device=device)
    k_before, v_before, lens_before = k_cache.clone(), v_cache.clone(), lens.clone()
    o = attnkit.attention_decode(q, k_cache, v_cache, lens, k_new=k_new, v_new=v_new)
    assert o.shape == (B, Tq, c["H"], c["Dv"]) and torch.equal(lens, lens_before)
    for b, n in enumerate(c["lens"]):
        k_full = torch.cat([k_before[b:b + 1, :n], k_new[b:b + 1]], dim=1)
        v_full = torch.cat([v_before[b:b + 1, :n], v_new[b:b + 1]], dim=1)
        close64(o[b:b + 1], attnkit.attention(q[b:b + 1], k_full, v_full, causal=True))
        close64(o[b:b + 1], naive_attention(q[b:b + 1], k_full, v_full, causal=True)[0])
        # The new tokens went to positions n .. n + Tq - 1 and nothing else was touched.
        k_want, v_want = k_before[b].clone(), v_before[b].clone()
        k_want[n:n + Tq], v_want[n:n + Tq] = k_new[b], v_new[b]
        assert torch.equal(k_cache[b], k_want) and torch.equal(v_cache[b], v_want)


@pytest.mark.parametrize("c", DECODE + params([
    dict(B=3, Smax=16, Tq=3, H=4, Hk=4, D=8, Dv=8, lens=(16, 2, 0)),  # full row; rows shorter than Tq
]))
def test_decode_without_append_matches_prefill(c, device):
    B, Tq = c["B"], c["Tq"]
    q, k_cache, v_cache, lens = cache_setup(B, c["Smax"], Tq, c["H"], c["Hk"], c["D"], c["Dv"], c["lens"], device)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    o = attnkit.attention_decode(q, k_cache, v_cache, lens, scale=0.5)
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)
    for b, n in enumerate(c["lens"]):
        # The queries are the last Tq of the n cached positions; with n < Tq the first ones see nothing.
        o_b = attnkit.attention(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], causal=True, scale=0.5)
        close64(o[b:b + 1], o_b)
        if n < Tq:
            assert bool((o[b, :Tq - n] == 0).all())


def test_decode_strided_and_low_precision(device):
    B, Smax, Tq, H, Hk, D, Dv = 2, 24, 2, 4, 2, 16, 8
    lens = torch.tensor([5, 20], dtype=torch.int32, device=device)
    for dtype in LOW_DTYPES:
        q = randn(B, Tq, H, D, dtype=dtype, device=device, strided=True)
        k_cache = randn(B, Smax, Hk, D, dtype=dtype, device=device, strided=True)
        v_cache = randn(B, Smax, Hk, Dv, dtype=dtype, device=device, strided=True)
        k_new = randn(B, Tq, Hk, D, dtype=dtype, device=device, strided=True)
        v_new = randn(B, Tq, Hk, Dv, dtype=dtype, device=device, strided=True)
        k64, v64 = k_cache.double(), v_cache.double()
        o = attnkit.attention_decode(q, k_cache, v_cache, lens, k_new=k_new, v_new=v_new)
        g = attnkit.attention_decode(q.double(), k64, v64, lens, k_new=k_new.double(), v_new=v_new.double())
        assert o.dtype == dtype
        assert_rounded(f"decode {dtype}", o, g)
        assert torch.equal(k_cache.double(), k64) and torch.equal(v_cache.double(), v64)


def test_decode_empty(device):
    q, k_cache, v_cache, lens = cache_setup(2, 8, 0, 4, 2, 8, 8, (3, 5), device)
    k_before = k_cache.clone()
    k_new, v_new = randn(2, 0, 2, 8, dtype=F64), randn(2, 0, 2, 8, dtype=F64)
    o = attnkit.attention_decode(q, k_cache, v_cache, lens, k_new=k_new, v_new=v_new)
    assert o.shape == (2, 0, 4, 8) and torch.equal(k_cache, k_before)


# ------------------------------------------------------------------------------------- qk_norm


@pytest.mark.parametrize("mode", ["rms", "l2"])
@pytest.mark.parametrize("dtype", [F64, *LOW_DTYPES], ids=lambda d: str(d).replace("torch.", ""))
def test_qk_norm_matches_hand_formula(mode, dtype, device):
    x = randn(2, 17, 4, 32, dtype=dtype, device=device, strided=True)
    w = randn(32, dtype=torch.float32, device=device)
    for weight in (None, w, w.to(dtype)):
        y = attnkit.qk_norm(x, weight, mode=mode, eps=1e-5)
        assert y.dtype == dtype and y.shape == x.shape
        golden = hand_norm(x, weight, mode, 1e-5)
        if dtype == F64:
            close64(y, golden)
        else:
            assert_rounded(f"qk_norm {mode}", y, golden)


# ----------------------------------------------------------------------------------- blocking


def _count_blocks(monkeypatch, budget):
    """Force `budget` score elements per block; return the list of block score sizes seen."""
    seen = []
    block = reference._softmax_block

    def spy(q, k, v, *rest):
        seen.append(q.shape[0] * q.shape[1] * q.shape[2] * q.shape[3] * k.shape[2])
        return block(q, k, v, *rest)

    monkeypatch.setattr(reference, "MAX_SCORE_ELEMENTS", budget)
    monkeypatch.setattr(reference, "_softmax_block", spy)
    return seen


@pytest.mark.parametrize("budget", [4 * 100 * 7, 4 * 100], ids=["query-blocks", "one-row-blocks"])
def test_blocking_matches_unblocked(budget, monkeypatch, device):
    B, T, S, H, Hk, D, Dv = 3, 129, 100, 4, 2, 8, 8
    q, k, v = qkv(B, T, S, H, Hk, D, Dv, device=device, requires_grad=True)
    wq = randn(D, dtype=F64, device=device, requires_grad=True)
    cot = randn(B, T, H, Dv, dtype=F64, device=device)

    def run():
        o, lse = attnkit.attention(q, k, v, causal=True, qk_norm="rms", q_norm_weight=wq, return_lse=True)
        gs = torch.autograd.grad((o * cot).sum() + lse.sum(), (q, k, v, wq))
        return (o, lse, *gs)

    full = run()
    seen = _count_blocks(monkeypatch, budget)
    blocked = run()
    assert len(seen) > B and max(seen) <= budget  # several blocks per row, each under the budget
    for a, b in zip(blocked, full):
        close64(a, b)


def test_decode_blocking_over_batch_rows(monkeypatch, device):
    c = dict(B=5, Smax=32, Tq=2, H=4, Hk=2, D=8, Dv=8, lens=(4, 0, 30, 9, 17))
    q, k_cache, v_cache, lens = cache_setup(*[c[n] for n in ("B", "Smax", "Tq", "H", "Hk", "D", "Dv", "lens")],
                                            device)
    full = attnkit.attention_decode(q, k_cache, v_cache, lens)
    seen = _count_blocks(monkeypatch, 4 * 32 * 2)  # two batch rows of one query each
    close64(attnkit.attention_decode(q, k_cache, v_cache, lens), full)
    assert len(seen) == 3 * 2 and max(seen) <= 4 * 32 * 2


def test_block_sizes_bound_long_sequences():
    for B, H, T, S in [(1, 32, 131072, 131072), (8, 64, 8192, 8192), (2, 8, 100, 100), (256, 64, 1, 65536)]:
        rows, cols = reference._block_sizes(B, H, T, S)
        assert 1 <= rows <= B and 1 <= cols <= T
        assert rows * H * cols * S <= reference.MAX_SCORE_ELEMENTS
    assert reference._block_sizes(2, 8, 100, 100) == (2, 100)  # small problems: one block


# ------------------------------------------------------------------------------------ gradcheck


GRAD = params([
    dict(T=3, S=4, causal=False, norm=None),
    dict(T=5, S=3, causal=True, norm="rms"),  # T > S: two empty rows
    dict(T=4, S=4, causal=True, norm="l2"),
])


@pytest.mark.parametrize("c", GRAD)
def test_attention_gradcheck(c, device):
    H, Hk, D, Dv = 4, 2, 4, 3
    q, k, v = qkv(1, c["T"], c["S"], H, Hk, D, Dv, device=device, requires_grad=True)
    scale = torch.tensor(0.8, dtype=F64, device=device, requires_grad=True)
    inputs = [q, k, v, scale]
    if c["norm"] is not None:
        inputs += [randn(D, dtype=F64, device=device, requires_grad=True) for _ in range(2)]

    def fn(q, k, v, scale, *w):
        o, lse = attnkit.attention(q, k, v, causal=c["causal"], scale=scale, qk_norm=c["norm"],
                                   q_norm_weight=w[0] if w else None, k_norm_weight=w[1] if w else None,
                                   return_lse=True)
        return o, lse.masked_fill(torch.isinf(lse), 0.0)  # finite differences of -inf are NaN

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("mode", ["rms", "l2"])
def test_qk_norm_gradcheck(mode, device):
    x = randn(2, 3, 5, dtype=F64, device=device, requires_grad=True)
    w = randn(5, dtype=F64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: attnkit.qk_norm(x, w, mode=mode), (x, w))


# ---------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("norm", [None, "rms"])
def test_low_precision_close_to_float64(dtype, norm, device):
    """float32 maths for every dtype: outputs and gradients are the float64 result rounded once."""
    B, T, S, H, Hk, D, Dv = 2, 63, 17, 4, 2, 16, 8  # T > S: empty causal rows
    q, k, v = qkv(B, T, S, H, Hk, D, Dv, dtype=dtype, device=device, requires_grad=True)
    w = randn(D, dtype=torch.float32, device=device, requires_grad=True) if norm else None
    cot = randn(B, T, H, Dv, dtype=dtype, device=device)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    w64 = w.detach().double().requires_grad_() if norm else None

    o, lse = attnkit.attention(q, k, v, causal=True, qk_norm=norm, q_norm_weight=w, return_lse=True)
    g, g_lse = attnkit.attention(*leaves, causal=True, qk_norm=norm, q_norm_weight=w64, return_lse=True)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert_rounded("o", o, g)
    torch.testing.assert_close(lse.double(), g_lse, rtol=1e-5, atol=1e-5)
    o.backward(cot)
    g.backward(cot.double())
    for name, x, x64 in zip("qkvw", (q, k, v, w), (*leaves, w64)):
        if x is not None:
            assert x.grad.dtype == x.dtype
            assert_rounded(f"d{name}", x.grad, x64.grad)


# ------------------------------------------------------------------------------- dispatching


def test_explain_and_backends(device):
    q, k, v = qkv(1, 4, 4, 2, 1, 8, 8, device=device, requires_grad=True)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=device)
    ex = attnkit.explain("attention", q, k, v, causal=True, qk_norm="rms", cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert ex.backend == "reference"
    assert {"causal", "varlen", "qk_norm=rms", "grad"} <= set(ex.inputs.features)
    assert ex.inputs.head_dims == (8, 8)
    lens = torch.tensor([2], dtype=torch.int32, device=device)
    with torch.no_grad():
        assert attnkit.explain("attention_decode", q, k, v, lens).backend == "reference"
        assert attnkit.explain("qk_norm", q).backend == "reference"
    # float64 is a reference-only dtype, so the kernel backends refuse it whatever is installed.
    for name in ("triton", "cuda"):
        with pytest.raises(attnkit.BackendUnavailable):
            attnkit.attention(q, k, v, backend=name)
        with pytest.raises(attnkit.BackendUnavailable):
            attnkit.qk_norm(q, backend=name)
    with pytest.raises(ValueError, match="backend"):
        attnkit.attention(q, k, v, backend="nope")
    assert torch.equal(attnkit.attention(q, k, v, backend="reference"), attnkit.attention(q, k, v))


# -------------------------------------------------------------------------------- bad inputs


def _attn(**over):
    """Arguments of a valid attention call (float64), with `over` replacing some of them."""
    q, k, v = qkv(1, 6, 6, 4, 2, 8, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    kw = dict(q=q, k=k, v=v, causal=True)
    if over.pop("varlen", False):
        kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu.clone())
    kw.update(over)
    return attnkit.attention, kw


def _decode(**over):
    q, k_cache, v_cache, lens = cache_setup(2, 8, 2, 4, 2, 8, 6, (3, 6), "cpu")
    kw = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=lens,
              k_new=randn(2, 2, 2, 8, dtype=F64), v_new=randn(2, 2, 2, 6, dtype=F64))
    kw.update(over)
    return attnkit.attention_decode, kw


def _norm(**over):
    kw = dict(x=randn(2, 3, 8, dtype=torch.float32), weight=randn(8, dtype=torch.float32))
    kw.update(over)
    return attnkit.qk_norm, kw


I32 = dict(dtype=torch.int32)
BAD = [
    # attention
    ("q-not-tensor", lambda: _attn(q=[1.0]), TypeError, "q"),
    ("q-rank", lambda: _attn(q=randn(6, 4, 8, dtype=F64)), ValueError, "q"),
    ("k-rank", lambda: _attn(k=randn(1, 6, 16, dtype=F64)), ValueError, "k"),
    ("q-int", lambda: _attn(q=torch.ones(1, 6, 4, 8, dtype=torch.int64)), TypeError, "q"),
    ("k-dtype", lambda: _attn(k=randn(1, 6, 2, 8)), TypeError, "k"),
    ("v-dtype", lambda: _attn(v=randn(1, 6, 2, 8, dtype=torch.float16)), TypeError, "v"),
    ("k-device", lambda: _attn(k=torch.empty(1, 6, 2, 8, dtype=F64, device="meta")), ValueError, "k"),
    ("k-batch", lambda: _attn(k=randn(2, 6, 2, 8, dtype=F64)), ValueError, "k"),
    ("k-head-dim", lambda: _attn(k=randn(1, 6, 2, 16, dtype=F64)), ValueError, "k"),
    ("v-length", lambda: _attn(v=randn(1, 5, 2, 8, dtype=F64)), ValueError, "v"),
    ("v-heads", lambda: _attn(v=randn(1, 6, 1, 8, dtype=F64)), ValueError, "v"),
    ("gqa-ratio", lambda: _attn(k=randn(1, 6, 3, 8, dtype=F64), v=randn(1, 6, 3, 8, dtype=F64)),
     ValueError, "H % Hk"),
    ("causal-type", lambda: _attn(causal="yes"), TypeError, "causal"),
    ("return_lse-type", lambda: _attn(return_lse=1), TypeError, "return_lse"),
    ("scale-type", lambda: _attn(scale="0.1"), TypeError, "scale"),
    ("scale-shape", lambda: _attn(scale=torch.ones(1, dtype=F64)), ValueError, "scale"),
    ("scale-int", lambda: _attn(scale=torch.tensor(1)), TypeError, "scale"),
    ("qk_norm-name", lambda: _attn(qk_norm="layer"), ValueError, "qk_norm"),
    ("qk_norm-type", lambda: _attn(qk_norm=True), TypeError, "qk_norm"),
    ("q_norm_weight-shape", lambda: _attn(qk_norm="rms", q_norm_weight=randn(9, dtype=F64)),
     ValueError, "q_norm_weight"),
    ("k_norm_weight-dtype", lambda: _attn(qk_norm="rms", k_norm_weight=randn(8, dtype=torch.float16)),
     TypeError, "k_norm_weight"),
    ("q_norm_weight-without-qk_norm", lambda: _attn(q_norm_weight=randn(8, dtype=F64)),
     ValueError, "q_norm_weight"),
    ("k_norm_weight-not-tensor", lambda: _attn(qk_norm="l2", k_norm_weight=[1.0] * 8),
     TypeError, "k_norm_weight"),
    ("norm_eps", lambda: _attn(qk_norm="rms", norm_eps=-1.0), ValueError, "norm_eps"),
    ("cu_seqlens_k-missing", lambda: _attn(cu_seqlens_q=torch.tensor([0, 6], **I32)),
     ValueError, "cu_seqlens_k"),
    ("cu_seqlens_q-int64", lambda: _attn(varlen=True, cu_seqlens_q=torch.tensor([0, 6])),
     TypeError, "cu_seqlens_q"),
    ("cu_seqlens_q-batch", lambda: _attn(varlen=True, q=randn(2, 6, 4, 8, dtype=F64),
                                         k=randn(2, 6, 2, 8, dtype=F64), v=randn(2, 6, 2, 8, dtype=F64)),
     ValueError, "cu_seqlens_q"),
    ("cu_seqlens_q-order", lambda: _attn(varlen=True, cu_seqlens_q=torch.tensor([0, 4, 2, 6], **I32),
                                         cu_seqlens_k=torch.tensor([0, 2, 4, 6], **I32)),
     ValueError, "cu_seqlens_q"),
    ("cu_seqlens_q-start", lambda: _attn(varlen=True, cu_seqlens_q=torch.tensor([1, 6], **I32)),
     ValueError, "cu_seqlens_q"),
    ("cu_seqlens_k-total", lambda: _attn(varlen=True, cu_seqlens_k=torch.tensor([0, 2, 5], **I32)),
     ValueError, "cu_seqlens_k"),
    ("cu_seqlens_k-count", lambda: _attn(varlen=True, cu_seqlens_k=torch.tensor([0, 6], **I32)),
     ValueError, "cu_seqlens_k"),
    # attention_decode
    ("decode-q-rank", lambda: _decode(q=randn(2, 4, 8, dtype=F64)), ValueError, "q"),
    ("decode-k_cache-dtype", lambda: _decode(k_cache=randn(2, 8, 2, 8)), TypeError, "k_cache"),
    ("decode-k_new-dtype", lambda: _decode(k_new=randn(2, 2, 2, 8)), TypeError, "k_new"),
    ("decode-v_new-missing", lambda: _decode(v_new=None), ValueError, "v_new"),
    ("decode-k_new-Tq", lambda: _decode(k_new=randn(2, 1, 2, 8, dtype=F64)), ValueError, "k_new"),
    ("decode-v_new-Dv", lambda: _decode(v_new=randn(2, 2, 2, 8, dtype=F64)), ValueError, "v_new"),
    ("decode-v_cache-Smax", lambda: _decode(v_cache=randn(2, 9, 2, 6, dtype=F64)), ValueError, "v_cache"),
    ("decode-k_cache-head-dim", lambda: _decode(k_cache=randn(2, 8, 2, 4, dtype=F64)),
     ValueError, "k_cache"),
    ("decode-gqa-ratio", lambda: _decode(k_cache=randn(2, 8, 3, 8, dtype=F64), v_cache=randn(2, 8, 3, 6, dtype=F64),
                                         k_new=None, v_new=None), ValueError, "H % Hk"),
    ("decode-k_cache-device", lambda: _decode(k_cache=torch.empty(2, 8, 2, 8, dtype=F64, device="meta")),
     ValueError, "k_cache"),
    ("decode-cache_seqlens-int64", lambda: _decode(cache_seqlens=torch.tensor([3, 6])),
     TypeError, "cache_seqlens"),
    ("decode-cache_seqlens-shape", lambda: _decode(cache_seqlens=torch.tensor([3, 6, 1], **I32)),
     ValueError, "cache_seqlens"),
    ("decode-cache_seqlens-negative", lambda: _decode(cache_seqlens=torch.tensor([-1, 2], **I32)),
     ValueError, "cache_seqlens"),
    ("decode-cache_seqlens-past-Smax", lambda: _decode(cache_seqlens=torch.tensor([3, 9], **I32),
                                                       k_new=None, v_new=None), ValueError, "cache_seqlens"),
    ("decode-capacity", lambda: _decode(cache_seqlens=torch.tensor([3, 7], **I32)), ValueError, "cache_seqlens"),
    ("decode-scale-tensor", lambda: _decode(scale=torch.tensor(0.5)), TypeError, "scale"),
    # qk_norm
    ("norm-x-not-tensor", lambda: _norm(x=1.0), TypeError, "x"),
    ("norm-x-0dim", lambda: _norm(x=torch.tensor(1.0), weight=None), ValueError, "x"),
    ("norm-x-int", lambda: _norm(x=torch.ones(2, 8, dtype=torch.int32)), TypeError, "x"),
    ("norm-mode", lambda: _norm(mode="layer"), ValueError, "mode"),
    ("norm-weight-shape", lambda: _norm(weight=randn(4)), ValueError, "weight"),
    ("norm-weight-dtype", lambda: _norm(weight=randn(8, dtype=torch.float16)), TypeError, "weight"),
    ("norm-eps", lambda: _norm(eps="small"), TypeError, "eps"),
]


@pytest.mark.parametrize("make,exc,name", [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_input_rejected(make, exc, name):
    fn, kw = make()
    tensors = {n: t for n, t in kw.items() if isinstance(t, torch.Tensor) and t.device.type != "meta"}
    before = {n: t.clone() for n, t in tensors.items()}
    with pytest.raises(exc) as info:
        fn(**kw)
    assert name in str(info.value), str(info.value)
    for n, t in tensors.items():
        assert torch.equal(t, before[n]), f"{n} was modified by a rejected call"
