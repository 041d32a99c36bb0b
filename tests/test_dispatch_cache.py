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
from attnkit import _validation as V
from attnkit import dispatch
from attnkit.ops.linear import api as linear_api
from attnkit.ops.loki import api as loki_api
from attnkit.ops.loki import cache as loki_cache
from attnkit.ops.loki import reference as reference_loki
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


# ------------------------------------------------------------------------------------- Loki


def _loki(B=2, H=4, Hk=2, D=16, Dv=8, Smax=8, blocks=None):
    """A basis and a contiguous (or, with `blocks=(num_blocks, block_size)`, paged) Loki cache."""
    basis = attnkit.loki_calibrate(r(64, Hk, D))
    n0, n1 = (B, Smax) if blocks is None else blocks
    return basis, r(B, 1, H, D), r(n0, n1, Hk, D), r(n0, n1, Hk, Dv)


def test_loki_value_checks_run_on_cached_calls():
    """As test_value_checks_run_on_cached_calls, for the Loki ops (contiguous and paged)."""
    basis, q, kc, vc = _loki()
    kw = dict(rank=2, top_k=3, backend="reference")
    for _ in range(2):
        attnkit.loki_attention_decode(q, kc, vc, i32(3, 5), basis, **kw)
    assert _cached(loki_api._LOKI_ATTENTION_DECODE)
    with pytest.raises(ValueError, match=r"cache_seqlens values must be in 0..8 \(Smax = 8, Smax, the capacity "
                                         r"of k_cache_rot\), got values in -1..5"):
        attnkit.loki_attention_decode(q, kc, vc, i32(-1, 5), basis, **kw)
    kl = r(2, 2, 8, 4)
    loki_cache.loki_attention_decode_lowrank(q, kl, kc, vc, i32(3, 5), basis, **kw)
    assert _cached(loki_cache._LOKI_ATTENTION_DECODE_LOWRANK)
    with pytest.raises(ValueError, match=r"cache_seqlens values must be in 0..8 .*got values in 3..9"):
        loki_cache.loki_attention_decode_lowrank(q, kl, kc, vc, i32(3, 9), basis, **kw)
    kn, vn = r(2, 1, 2, 16), r(2, 1, 2, 8)
    append = lambda lens: loki_cache.loki_cache_append(kn, vn, kc, vc, lens, basis, k_lowrank=kl,  # noqa: E731
                                                       backend="reference")
    append(i32(3, 5))
    append(i32(3, 6))
    assert _cached(loki_cache._LOKI_CACHE_APPEND)
    before = kc.clone()
    with pytest.raises(ValueError, match=r"got cache_seqlens\[1\] = 8 and T = 1: the cache is too small"):
        append(i32(3, 8))
    with pytest.raises(ValueError, match=r"cache_seqlens values must be in 0..8 .*got values in -2..3"):
        append(i32(3, -2))
    assert torch.equal(kc, before)  # nothing written when rejected

    # paged: 6 blocks of 4 tokens, 3 per row
    basis, q, pk, pv = _loki(blocks=(6, 4))
    table = i32(0, 1, 2, 3, 4, 5).view(2, 3)
    paged = dict(kw, block_table=table)
    attnkit.loki_attention_decode(q, pk, pv, i32(12, 5), basis, **paged)
    bad = table.clone()
    bad[1, 1] = 6
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 6 is used by row 1 but is not a block"):
        attnkit.loki_attention_decode(q, pk, pv, i32(12, 5), basis, **dict(paged, block_table=bad))
    with pytest.raises(ValueError, match=r"cache_seqlens values must be in 0\.\.12 \(Smax = 12, max_blocks"):
        attnkit.loki_attention_decode(q, pk, pv, i32(13, 5), basis, **paged)
    pl = r(6, 2, 4, 4)
    loki_cache.loki_cache_append(kn, vn, pk, pv, i32(3, 3), basis, k_lowrank=pl, block_table=table,
                                 backend="reference")
    shared = i32(0, 1, 2, 0, 4, 5).view(2, 3)
    with pytest.raises(ValueError, match="two rows append k_new/v_new into the same cache slot"):
        loki_cache.loki_cache_append(kn, vn, pk, pv, i32(3, 3), basis, k_lowrank=pl, block_table=shared,
                                     backend="reference")
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] \+ Tq = 13 tokens do not fit in block_table row 0"):
        loki_cache.loki_cache_append(kn, vn, pk, pv, i32(12, 3), basis, k_lowrank=pl, block_table=table,
                                     backend="reference")


def test_loki_cache_misses_when_an_argument_changes():
    """Each call after the first good one changes one argument's type, shape or device: it must
    miss the cache and get the prepare step's error."""
    basis, q, kc, vc = _loki()
    lens = i32(3, 5)
    run = lambda b=basis, **kw: attnkit.loki_attention_decode(  # noqa: E731
        q, kc, vc, lens, b, **dict(dict(rank=2, top_k=3, backend="reference"), **kw))
    run()
    run()
    with pytest.raises(TypeError, match="rank must be an int, got float"):
        run(rank=2.0)
    with pytest.raises(TypeError, match="top_k must be an int, got bool"):
        run(top_k=True)
    with pytest.raises(ValueError, match=r"basis must have components of shape \[Hk, D, D\] = \[2, 16, 16\]"):
        run(attnkit.loki_calibrate(r(64, 2, 8)))
    with pytest.raises(ValueError, match="basis must be on the same device as k_cache_rot"):
        run(basis.to("meta"))
    with pytest.raises(TypeError, match="basis must be a LokiBasis"):
        run(basis.components)
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        attnkit.loki_attention_decode(q, kc, vc, lens.long(), basis, rank=2, top_k=3, backend="reference")

    basis, q, pk, pv = _loki(blocks=(6, 4))
    table = i32(0, 1, 2, 3, 4, 5).view(2, 3)
    attnkit.loki_attention_decode(q, pk, pv, i32(12, 5), basis, rank=2, top_k=3, block_table=table)
    with pytest.raises(ValueError, match=r"k_cache_rot must have shape \[B, Smax, Hk, D\]"):
        attnkit.loki_attention_decode(q, pk, pv, i32(12, 5), basis, rank=2, top_k=3)
    with pytest.raises(ValueError, match=r"block_table must have shape \[B, max_blocks\] with B = 2"):
        attnkit.loki_attention_decode(q, pk, pv, i32(12, 5), basis, rank=2, top_k=3, block_table=table.view(3, 2))


def test_loki_backend_gets_a_contiguous_block_table(monkeypatch):
    """A strided block table has its own signature; its calls are never replayed (the prepare
    step makes it contiguous, as the kernels need) and the backend always gets it contiguous."""
    basis, q, pk, pv = _loki(blocks=(6, 4))
    table = i32(0, 1, 2, 3, 4, 5).view(2, 3)
    strided = torch.full((2, 6), -7, dtype=torch.int32)
    strided[:, ::2] = table
    strided = strided[:, ::2]
    assert not strided.is_contiguous()
    impl = dispatch._IMPLS["loki_attention_decode"]["reference"]
    seen = []

    def spy(**kw):
        seen.append(kw["block_table"].is_contiguous())
        return reference_loki.loki_attention_decode(**kw)

    monkeypatch.setattr(impl, "target", spy)
    dispatch._CHOICES.clear()
    try:
        outs = [attnkit.loki_attention_decode(q, pk, pv, i32(12, 5), basis, rank=2, top_k=3, block_table=t,
                                              backend="reference") for t in (table, table, strided, strided)]
    finally:
        monkeypatch.undo()
        dispatch._CHOICES.clear()
    assert seen == [True] * 4
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=0)


def test_loki_cached_calls_read_the_basis_afresh():
    """A cached signature takes the components from the basis on every call:
    `load_state_dict` (same shapes) changes the result as for an uncached call."""
    basis, q, kc, vc = _loki()
    lens = i32(7, 5)
    run = lambda: attnkit.loki_attention_decode(q, kc, vc, lens, basis, rank=2, top_k=3,  # noqa: E731
                                                backend="reference")
    o1 = run()
    torch.testing.assert_close(run(), o1, rtol=0, atol=0)
    assert _cached(loki_api._LOKI_ATTENTION_DECODE)
    basis.load_state_dict(attnkit.loki_calibrate(r(64, 2, 16) * torch.linspace(0.1, 3, 16)).state_dict())
    o2 = run()
    call = loki_api._prepare_loki_attention_decode(q, kc, vc, lens, basis, rank=2, top_k=3)
    want = dispatch.implementation("loki_attention_decode", "reference")(**call.kwargs)
    torch.testing.assert_close(o2, want, rtol=0, atol=0)
    assert not torch.allclose(o1, o2)


def test_loki_components_converted_per_call_are_not_replayed():
    """float64 queries with a float32 basis: the prepare step converts the components on every
    call, so the signature is recorded as not replayable and each call takes the full path."""
    basis, q, kc, vc = _loki()
    q, kc, vc = q.double(), kc.double(), vc.double()
    fast = loki_api._LOKI_ATTENTION_DECODE
    fast.cache.clear()
    outs = [attnkit.loki_attention_decode(q, kc, vc, i32(7, 5), basis, rank=2, top_k=3, backend="reference")
            for _ in range(2)]
    assert list(fast.cache.values()) == [dispatch._SLOW]
    components = basis.components.double()
    assert basis.components.dtype == torch.float32
    want = reference_loki.loki_attention_decode(q=q, k_cache_rot=kc, v_cache=vc, cache_seqlens=i32(7, 5),
                                                components=components, rank=2, top_k=3, scale=16 ** -0.5,
                                                selection="head")
    for o in outs:
        torch.testing.assert_close(o, want, rtol=0, atol=0)


def test_loki_cache_object_steps_equal_the_uncached_path():
    """LokiCache appends and attends through the cached path; every step equals the same step
    with the caches emptied before each call (each call then runs the full path)."""
    basis = attnkit.loki_calibrate(r(64, 2, 16))
    prompt = (r(2, 5, 2, 16), r(2, 5, 2, 8))
    steps = [(r(2, 1, 4, 16), r(2, 1, 2, 16), r(2, 1, 2, 8)) for _ in range(4)]
    outs = []
    for clear in (False, True):
        cache = loki_cache.LokiCache(basis, 2, 12, max_rank=4, v_head_dim=8, block_size=4)
        cache.append(*prompt, backend="reference")
        got = []
        for q, k, v in steps:
            if clear:
                dispatch._CHOICES.clear()
            cache.append(k, v, backend="reference")
            if clear:
                dispatch._CHOICES.clear()
            got.append(cache.attend(q, rank=3, top_k=4, backend="reference"))
        if not clear:
            assert _cached(loki_cache._LOKI_CACHE_APPEND) and _cached(loki_cache._LOKI_ATTENTION_DECODE_LOWRANK)
        outs.append((got, cache.k_rot.clone(), cache.k_lowrank.clone(), cache.v.clone(), cache.seqlens.clone()))
    (got_a, *bufs_a), (got_b, *bufs_b) = outs
    for a, b in zip(got_a + bufs_a, got_b + bufs_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert outs[0][4].tolist() == [9, 9]


def _table_error(monkeypatch, small_read, *args):
    monkeypatch.setattr(V, "SMALL_READ", small_read)
    try:
        V.check_block_table(*args)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("seed", range(40))
def test_block_table_value_checks_read_small_tables_once_with_the_same_verdicts(monkeypatch, seed):
    """Small tables are checked on the host after one read (what every paged decode step pays),
    larger ones on the device: random tables (some entries out of range, shared blocks, lengths
    past the capacity) get the same verdict and message both ways."""
    g = torch.Generator().manual_seed(seed)
    B, max_blocks, block_size, num_blocks = 3, 4, int(torch.randint(1, 4, (), generator=g)), 9
    new_tokens = int(torch.randint(0, 3, (), generator=g))
    table = torch.randint(-1, num_blocks + 1, (B, max_blocks), generator=g, dtype=torch.int32)
    if seed % 2:  # every entry a block, three blocks in two places each
        table = (torch.randperm(B * max_blocks, generator=g) % num_blocks).view(B, -1).to(torch.int32)
    lengths = torch.randint(0, max_blocks * block_size + 2 - new_tokens, (B,), generator=g, dtype=torch.int32)
    args = (table, B, num_blocks, block_size, lengths, new_tokens)
    small, large = _table_error(monkeypatch, 256, *args), _table_error(monkeypatch, 0, *args)
    assert small == large


def test_block_table_value_checks_catch_each_error_on_both_paths(monkeypatch):
    table = i32(0, 1, 2, 3, 4, 5).view(2, 3)
    for small_read in (256, 0):
        run = lambda t, lens, new=1: _table_error(monkeypatch, small_read, t, 2, 6, 4, lens, new)  # noqa: E731
        assert run(table, i32(3, 11)) is None
        assert "cache_seqlens[1] + Tq = 13 tokens do not fit in block_table row 1" in run(table, i32(3, 12))
        bad = table.clone()
        bad[1, 2] = 6
        assert run(bad, i32(3, 7)) is None  # row 1 uses 2 blocks for 8 tokens: entry 2 is never read
        assert run(bad, i32(3, 8)).startswith("block_table[1, 2] = 6 is used by row 1 but is not a block")
        bad[0, 0] = -1
        assert run(bad, i32(3, 8)).startswith("block_table[0, 0] = -1 is used by row 0")
        shared = i32(0, 1, 2, 0, 4, 5).view(2, 3)
        assert run(shared, i32(5, 5), new=0) is None  # shared blocks read only
        assert "same cache slot" in run(shared, i32(3, 3))
        assert run(shared, i32(3, 4)) is None  # row 0 writes block 0, row 1 block 4
