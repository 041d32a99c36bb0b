"""The public functions' per-signature cache (``attnkit.dispatch.FastOp``).

A repeated call signature skips the prepare step and the backend choice, so these tests check
that what the cache skips cannot matter: value checks still run on every call, argument types
that the prepare step rejects are still rejected, each tensor reaches the backend under its own
name, and the cache stays bounded.
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import dispatch
from attnkit.ops.linear import api as linear_api
from attnkit.ops.softmax import api as softmax_api


def r(*s, dtype=torch.float32):
    return torch.randn(*s, dtype=dtype)


def i32(*v):
    return torch.tensor(v, dtype=torch.int32)


def _cached(fast: dispatch.FastOp) -> int:
    return sum(1 for e in fast.cache.values() if e is not dispatch._SLOW)


def test_value_checks_run_on_cached_calls():
    """Each call below repeats the signature of a good call (so it is served by the cache) with
    bad values: the value check of the prepare step must still raise."""
    q = r(1, 6, 2, 16)
    attnkit.attention(q, q, q, cu_seqlens_q=i32(0, 2, 6), cu_seqlens_k=i32(0, 2, 6), backend="reference")
    assert _cached(softmax_api._ATTENTION)
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        attnkit.attention(q, q, q, cu_seqlens_q=i32(0, 7, 6), cu_seqlens_k=i32(0, 2, 6), backend="reference")
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\] must equal the packed length 6"):
        attnkit.attention(q, q, q, cu_seqlens_q=i32(0, 2, 6), cu_seqlens_k=i32(0, 2, 5), backend="reference")

    qd, kc, vc = r(2, 1, 4, 16), r(2, 8, 2, 16), r(2, 8, 2, 16)
    kn, vn = r(2, 1, 2, 16), r(2, 1, 2, 16)
    for _ in range(2):
        attnkit.attention_decode(qd, kc, vc, i32(3, 5), k_new=kn, v_new=vn, backend="reference")
    with pytest.raises(ValueError, match=r"cache_seqlens values must be in 0..8 \(Smax\), got values in -1..5"):
        attnkit.attention_decode(qd, kc, vc, i32(-1, 5), k_new=kn, v_new=vn, backend="reference")
    with pytest.raises(ValueError, match=r"got cache_seqlens\[1\] = 8 and Tq = 1: the cache is too small"):
        attnkit.attention_decode(qd, kc, vc, i32(3, 8), k_new=kn, v_new=vn, backend="reference")

    ql = r(1, 5, 4, 8)
    kl = r(1, 5, 2, 8)
    attnkit.lightning_attention(ql, kl, kl, torch.tensor([0.1, 0.2, 0.3, 0.4]), backend="reference")
    with pytest.raises(ValueError, match="decay must have every entry >= 0"):
        attnkit.lightning_attention(ql, kl, kl, torch.tensor([0.1, -0.2, 0.3, 0.4]), backend="reference")
    with pytest.raises(ValueError, match="decay must have every entry >= 0"):
        attnkit.lightning_attention(ql, kl, kl, torch.tensor([0.1, float("nan"), 0.3, 0.4]), backend="reference")

    attnkit.linear_attention(ql, kl, kl, cu_seqlens=i32(0, 2, 5), backend="reference")
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        attnkit.linear_attention(ql, kl, kl, cu_seqlens=i32(1, 2, 5), backend="reference")

    qs, ks = r(3, 1, 4, 8), r(3, 1, 2, 8)
    S = torch.zeros(5, 4, 8, 8)
    decay = torch.tensor([0.1, 0.2, 0.3, 0.4])
    attnkit.linear_attention_step(qs, ks, ks, S, decay=decay, state_indices=i32(4, 0, 2), backend="reference")
    with pytest.raises(ValueError, match="state_indices must not repeat a row within one step, got \\[4, 0, 4\\]"):
        attnkit.linear_attention_step(qs, ks, ks, S, decay=decay, state_indices=i32(4, 0, 4), backend="reference")
    with pytest.raises(ValueError, match=r"state_indices values must be in 0..4 \(rows of state, N = 5\), "
                                         r"got values in 0..5"):
        attnkit.linear_attention_step(qs, ks, ks, S, decay=decay, state_indices=i32(5, 0, 2), backend="reference")
    with pytest.raises(ValueError, match="decay must have every entry >= 0"):
        attnkit.linear_attention_step(qs, ks, ks, S, decay=-decay, state_indices=i32(4, 0, 2), backend="reference")


def test_cache_keeps_argument_types_apart():
    """`causal=True` and `causal=1` compare (and hash) equal; only the first is valid."""
    q = r(1, 4, 2, 16)
    attnkit.attention(q, q, q, causal=True, backend="reference")
    with pytest.raises(TypeError, match="causal must be a bool, got int"):
        attnkit.attention(q, q, q, causal=1, backend="reference")
    x = r(2, 3, 16)
    attnkit.qk_norm(x, eps=1e-6, backend="reference")
    with pytest.raises(TypeError, match="eps must be a float, got bool"):
        attnkit.qk_norm(x, eps=True, backend="reference")


def test_cached_calls_pass_each_tensor_under_its_own_name():
    """The first call of a signature passes one tensor as q, k and v; a later call with distinct
    tensors must reach the backend with each in its place (the cache maps names, not identities)."""
    x = r(1, 5, 2, 16, dtype=torch.float64)
    attnkit.attention(x, x, x, causal=True, backend="reference")
    q, k, v = (r(1, 5, 2, 16, dtype=torch.float64) for _ in range(3))
    got = attnkit.attention(q, k, v, causal=True, backend="reference")
    call = softmax_api._prepare_attention(q, k, v, causal=True)
    want = dispatch.implementation("attention", "reference")(**call.kwargs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * 16 ** -0.5
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(got, torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v))

    # in place: the state given on each call is the one updated
    qs, ks = r(2, 1, 2, 8), r(2, 1, 2, 8)
    S1, S2 = torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8)
    attnkit.linear_attention_step(qs, ks, ks, S1, backend="reference")
    attnkit.linear_attention_step(qs, ks, ks, S2, backend="reference")
    torch.testing.assert_close(S2, S1, rtol=0, atol=0)
    assert S2.abs().sum() > 0


def test_cache_is_bounded_and_cleared_with_the_choices(monkeypatch):
    monkeypatch.setattr(dispatch, "_FAST_MAX", 8)
    fast = softmax_api._QK_NORM
    fast.cache.clear()
    for d in range(1, 30):
        attnkit.qk_norm(r(2, d), backend="reference")
        assert len(fast.cache) <= 8
    assert fast.cache
    dispatch._CHOICES.clear()
    assert not fast.cache


def test_grad_mode_and_requires_grad_are_part_of_the_signature():
    q = r(1, 4, 2, 8)
    k = r(1, 4, 2, 8)
    with torch.no_grad():
        attnkit.linear_attention(q, k, k, backend="reference")
    qg = q.clone().requires_grad_()
    o, _ = attnkit.linear_attention(qg, k, k, backend="reference")
    o.sum().backward()
    assert qg.grad is not None and qg.grad.abs().sum() > 0
    assert _cached(linear_api._LINEAR_ATTENTION) >= 2


def test_callable_feature_map_is_never_replayed():
    """A callable feature map makes new tensors in the prepare step: those calls take the full
    path every time (the map runs on each call's own inputs)."""
    q, k, v = r(1, 4, 2, 8), r(1, 4, 2, 8), r(1, 4, 2, 8)
    fm = lambda t: torch.nn.functional.elu(t) + 1  # noqa: E731
    o1, _ = attnkit.linear_attention(q, k, v, feature_map=fm, backend="reference")
    q2 = r(1, 4, 2, 8)
    o2, _ = attnkit.linear_attention(q2, k, v, feature_map=fm, backend="reference")
    want, _ = attnkit.linear_attention(q2, k, v, feature_map="elu", backend="reference")
    torch.testing.assert_close(o2, want)
    assert not torch.allclose(o1, o2)
