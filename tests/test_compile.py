"""torch.compile / torch.export / CUDA graphs (docs/compile.md).

Every public op and every attnkit.nn module traces with ``fullgraph=True`` (``aot_eager``; a few
with ``inductor``), and compiled outputs and gradients equal eager ones; the modules' inference
forward exports; changing only the sequence length (marked dynamic) or stepping a decode loop
does not recompile; value checks are skipped while tracing but shape checks still run.
Shapes are tiny and compiled functions are reused: compiling dominates the cost.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import attnkit
from attnkit import dispatch
from attnkit import nn as aknn
from attnkit.ops.loki import LokiCache

from .harness import DEVICE


def r(*shape, grad=False, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE).to(dtype).requires_grad_(grad)


def _clone(xs):
    return [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in xs]


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def check_compiled(fn, *args, backend="aot_eager", exact=True):
    """fn compiled with fullgraph=True gives eager's outputs, gradients and in-place updates."""
    eager_args, comp_args = _clone(args), _clone(args)
    out_e = _flat(fn(*eager_args))
    out_c = _flat(torch.compile(fn, fullgraph=True, backend=backend)(*comp_args))
    # eager calls the backend directly, compiled code runs torch.ops.attnkit.* (the backward op
    # reruns the forward under autograd): equal up to float32 rounding of a reordered reduction
    tol = dict(rtol=1e-6, atol=1e-6) if exact else dict(rtol=1e-5, atol=1e-5)
    assert len(out_e) == len(out_c)
    for a, b in zip(out_c, out_e):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(comp_args, eager_args):  # in-place updates (caches, states) match too
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, **tol)
    diff = [o for o in out_e if o.requires_grad]
    if diff:
        gs = [torch.randn_like(o) for o in diff]
        leaves_e = [x for x in eager_args if isinstance(x, torch.Tensor) and x.requires_grad]
        leaves_c = [x for x in comp_args if isinstance(x, torch.Tensor) and x.requires_grad]
        ge = torch.autograd.grad(diff, leaves_e, gs)
        gc = torch.autograd.grad([o for o in out_c if o.requires_grad], leaves_c, gs)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b, **tol)


# ------------------------------------------------------------------------------------------ ops


def test_compile_attention_ops():
    q, k, v = r(2, 5, 4, 16, grad=True), r(2, 5, 2, 16, grad=True), r(2, 5, 2, 16, grad=True)
    w = r(16, grad=True)
    check_compiled(lambda q, k, v, w: attnkit.attention(q, k, v, causal=True, qk_norm="rms", q_norm_weight=w,
                                                        k_norm_weight=w, return_lse=True), q, k, v, w)
    check_compiled(lambda x, w: attnkit.qk_norm(x, w), q, w)
    check_compiled(lambda q, k, v: attnkit.attention(q, k, v, causal=True, window=(2, 0), softcap=5.0), q, k, v)
    kc, vc, lens = r(2, 9, 2, 16), r(2, 9, 2, 16), torch.tensor([3, 6], dtype=torch.int32, device=DEVICE)
    q1, k1, v1 = r(2, 1, 4, 16), r(2, 1, 2, 16), r(2, 1, 2, 16)
    check_compiled(lambda q, kc, vc, lens, k1, v1: attnkit.attention_decode(q, kc, vc, lens, k_new=k1, v_new=v1),
                   q1, kc, vc, lens, k1, v1)
    check_compiled(lambda q, kc, vc, lens: attnkit.attention_decode(q, kc, vc, lens), q1, kc, vc, lens)
    pk, pv = r(5, 4, 2, 16), r(5, 4, 2, 16)  # paged: 5 blocks of 4 tokens
    table = torch.tensor([[3, 1], [0, 4]], dtype=torch.int32, device=DEVICE)
    check_compiled(lambda q, pk, pv, lens, k1, v1, t: attnkit.attention_decode(
        q, pk, pv, lens, k_new=k1, v_new=v1, block_table=t, window=(3, 0), softcap=4.0),
        q1, pk, pv, torch.tensor([2, 5], dtype=torch.int32, device=DEVICE), k1, v1, table)


def test_compile_linear_ops():
    q, k, v = r(1, 6, 4, 16, grad=True), r(1, 6, 2, 16, grad=True), r(1, 6, 2, 16, grad=True)
    S0, z0 = r(1, 2, 16, 16, grad=True), r(1, 2, 16).abs().requires_grad_(True)
    check_compiled(lambda q, k, v, S0, z0: attnkit.linear_attention(
        q, k, v, feature_map="elu", normalize=True, initial_state=(S0, z0), output_final_state=True), q, k, v, S0, z0)
    # a callable feature map stays outside the op, as traced torch code
    check_compiled(lambda q, k, v: attnkit.linear_attention(q, k, v, feature_map=torch.nn.functional.softplus),
                   q, k, v)
    decay, H0 = torch.rand(4, device=DEVICE), r(1, 4, 16, 16, grad=True)
    check_compiled(lambda q, k, v, d, H0: attnkit.lightning_attention(q, k, v, d, initial_state=H0,
                                                                      output_final_state=True), q, k, v, decay, H0)
    S = r(3, 4, 16, 16)
    idx = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    q1, k1, v1 = r(2, 1, 4, 16), r(2, 1, 2, 16), r(2, 1, 2, 16)
    check_compiled(lambda q, k, v, S, d, idx: attnkit.linear_attention_step(q, k, v, S, decay=d, state_indices=idx),
                   q1, k1, v1, S, decay, idx)


def test_compile_loki_ops():
    basis = attnkit.loki_calibrate(r(64, 2, 16))
    cache = LokiCache(basis, 2, 12, max_rank=8, device=DEVICE)
    cache.append(r(2, 7, 2, 16), r(2, 7, 2, 16))

    def step(q, k, v):
        cache.append(k, v)
        return cache.attend(q, rank=4, top_k=5)

    eager_state = [t.clone() for t in (cache.k_rot, cache.v, cache.k_lowrank, cache.seqlens)]
    q, k, v = r(2, 1, 4, 16), r(2, 1, 2, 16), r(2, 1, 2, 16)
    o_eager = step(q, k, v)
    after = [t.clone() for t in (cache.k_rot, cache.v, cache.k_lowrank, cache.seqlens)]
    for t, s in zip((cache.k_rot, cache.v, cache.k_lowrank, cache.seqlens), eager_state):
        t.copy_(s)
    o_comp = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(o_comp, o_eager, rtol=0, atol=0)
    for t, s in zip((cache.k_rot, cache.v, cache.k_lowrank, cache.seqlens), after):
        torch.testing.assert_close(t, s, rtol=0, atol=0)
    q2, k_rot, v_c = r(2, 1, 4, 16), cache.k_rot.clone(), cache.v.clone()
    check_compiled(lambda q, kr, vc, lens: attnkit.loki_attention_decode(q, kr, vc, lens, basis, rank=4, top_k=5),
                   q2, k_rot, v_c, cache.seqlens.clone())


def _attnkit_ops(fn, *args):
    """`fn(*args)` compiled with fullgraph=True (aot_eager): its outputs and the attnkit ops in its
    dynamo graph (so a test can check that the call went through ``torch.ops.attnkit``)."""
    counter = CompileCounterWithBackend("aot_eager")
    out = torch.compile(fn, fullgraph=True, backend=counter)(*args)
    assert counter.frame_count == 1
    names = {n.target.name() for g in counter.graphs for n in g.graph.nodes
             if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
             and n.target.namespace == "attnkit"}
    return out, names


def test_compile_loki_calibrate_and_rotate():
    """Custom ops without a backend to choose (docs/compile.md): compiled, the call is the op
    (`torch.ops.attnkit.loki_calibrate` / `loki_rotate`) and equals eager bit for bit (the op runs
    the function eager calls); rotate's registered backward equals autograd through the eager
    einsum; shape checks still raise at trace time."""
    keys = r(40, 2, 16)
    for center in (False, True):
        for dtype in (torch.float32, torch.float64):
            got, names = _attnkit_ops(lambda k: attnkit.loki_calibrate(k, center=center, dtype=dtype), keys)
            want = attnkit.loki_calibrate(keys, center=center, dtype=dtype)
            assert names == {"attnkit::loki_calibrate"}
            assert isinstance(got, attnkit.LokiBasis)
            for a, b in zip((got.components, got.explained_variance_ratio, got.mean),
                            (want.components, want.explained_variance_ratio, want.mean)):
                if b is None:
                    assert a is None
                else:
                    assert a.dtype == b.dtype == dtype
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
    basis = attnkit.loki_calibrate(keys)
    x = r(2, 3, 2, 16)
    got, names = _attnkit_ops(lambda x: attnkit.loki_rotate(x, basis), x)
    assert names == {"attnkit::loki_rotate"}
    torch.testing.assert_close(got, attnkit.loki_rotate(x, basis), rtol=0, atol=0)
    check_compiled(lambda x: attnkit.loki_rotate(x, basis), r(2, 3, 2, 16, grad=True))
    check_compiled(lambda x: attnkit.loki_rotate(x, basis), r(5, 2, 16, grad=True, dtype=torch.float64))
    # a basis whose components require grad (a trained basis): gradients reach them, as eagerly
    comps = basis.components.detach().clone().requires_grad_(True)
    check_compiled(lambda x, c: attnkit.loki_rotate(x, attnkit.LokiBasis(c, basis.explained_variance_ratio)),
                   r(3, 2, 16, grad=True, dtype=torch.bfloat16), comps, exact=False)
    with pytest.raises(Exception, match="basis must have components of shape"):
        torch.compile(lambda x: attnkit.loki_rotate(x, basis), fullgraph=True, backend="aot_eager")(r(2, 3, 4, 16))


def test_compiled_loki_calibrate_checks_finite_keys_when_run():
    """The finite-covariance check is inside the op: skipped while tracing (values unknown), it
    runs when the compiled graph runs the op on CPU tensors, with the eager error."""
    keys = r(40, 2, 16)
    keys[3, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="keys must be finite to calibrate a basis"):
        attnkit.loki_calibrate(keys)
    calib = torch.compile(lambda k: attnkit.loki_calibrate(k), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="keys must be finite to calibrate a basis"):
        calib(keys)


def test_compile_lightning_slopes_and_layer_decay():
    """Ops too (`torch.ops.attnkit.lightning_slopes`, `layer_decay`): compiled equals eager bit for
    bit, gradients of layer_decay included (float64 and float16 slopes: the gradient comes back in
    the slopes' dtype, as through eager autograd)."""
    for h in (1, 7, 16):
        got, names = _attnkit_ops(lambda: attnkit.lightning_slopes(h))
        assert names == {"attnkit::lightning_slopes"}
        want = attnkit.lightning_slopes(h)
        assert got.dtype == want.dtype == torch.float32 and got.device == want.device
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    got, names = _attnkit_ops(lambda: attnkit.layer_decay(attnkit.lightning_slopes(8), 3, 8))
    assert names == {"attnkit::lightning_slopes", "attnkit::layer_decay"}
    torch.testing.assert_close(got, attnkit.layer_decay(attnkit.lightning_slopes(8), 3, 8), rtol=0, atol=0)
    for dtype in (torch.float64, torch.float16, torch.float32):
        torch._dynamo.reset()  # 3 layer positions per dtype: under the recompile limit
        s = torch.rand(6, dtype=torch.float64, device=DEVICE).to(dtype).requires_grad_(True)
        for layer_idx, num_layers in ((0, 1), (2, 5), (4, 5)):
            s_c = s.detach().clone().requires_grad_(True)
            f = torch.compile(lambda s: attnkit.layer_decay(s, layer_idx, num_layers), fullgraph=True,
                              backend="aot_eager")
            out_c, out_e = f(s_c), attnkit.layer_decay(s, layer_idx, num_layers)
            torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
            g = torch.randn(6, device=DEVICE)
            (gc,), (ge,) = torch.autograd.grad(out_c, s_c, g), torch.autograd.grad(out_e, s, g)
            assert gc.dtype == ge.dtype == dtype
            torch.testing.assert_close(gc, ge, rtol=0, atol=0)
    with pytest.raises(Exception, match="layer_idx must be in 0..3"):  # dynamo wraps the ValueError
        torch.compile(lambda s: attnkit.layer_decay(s, 4, 4), fullgraph=True, backend="aot_eager")(torch.rand(4))


# -------------------------------------------------------------------------------------- modules


def _modules():
    torch.manual_seed(1)
    return {
        "gqa_rope_rmsnorm": aknn.GroupedQueryAttention(64, 4, 2, qk_norm="rms", rope_theta=1e4),
        "gqa_fused_norm": aknn.GroupedQueryAttention(64, 4, 2, qk_norm="rms"),
        "gqa_l2_rope": aknn.GroupedQueryAttention(64, 4, 2, qk_norm="l2", rope_theta=1e4),
        "mqa": aknn.MultiQueryAttention(64, 4),
        "gqa_window_softcap": aknn.GroupedQueryAttention(64, 4, 2, rope_theta=1e4, window=(2, 0), softcap=5.0),
        "lightning": aknn.LightningAttention(64, 4, layer_idx=1, num_layers=3),
        "linear": aknn.LinearAttention(64, 4, 2),
        "linear_noncausal": aknn.LinearAttention(64, 4, feature_map="relu", normalize=False, causal=False),
        "rmsnorm": aknn.RMSNorm(64),
    }


@pytest.mark.parametrize("name", sorted(_modules()))
def test_compile_module_forward_backward(name):
    m = _modules()[name].to(DEVICE)
    x = r(2, 5, 64, grad=True)
    out_e = m(x)
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    xc = x.detach().clone().requires_grad_(True)
    out_c = cm(xc)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out_e)
    ge = torch.autograd.grad(out_e, [x, *m.parameters()], g)
    gc = torch.autograd.grad(out_c, [xc, *m.parameters()], g)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_multihead_attention_dropin():
    m = aknn.MultiheadAttention(64, 4, batch_first=True).to(DEVICE)
    x = r(2, 5, 64, grad=True)
    fn = lambda x: m(x, x, x, need_weights=False)[0]  # noqa: E731  (the fused path)
    out_e = fn(x)
    out_c = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    gx_e, = torch.autograd.grad(out_e.sum(), x)
    gx_c, = torch.autograd.grad(out_c.sum(), x)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-5, atol=1e-6)


def test_compile_decode_loops_do_not_recompile():
    """Prefill once, then decode steps (what mode="reduce-overhead" replays): one graph per
    phase; new cache lengths are tensor values, never guards."""
    torch.manual_seed(2)
    layers = {"gqa": aknn.GroupedQueryAttention(64, 4, 2, qk_norm="rms", rope_theta=1e4).to(DEVICE),
              "lightning": aknn.LightningAttention(64, 4).to(DEVICE),
              "linear": aknn.LinearAttention(64, 4, 2).to(DEVICE),
              "gqa_loki": aknn.GroupedQueryAttention(64, 4, 2, rope_theta=1e4).to(DEVICE)}
    layers["gqa_loki"].set_loki_basis(attnkit.loki_calibrate(r(64, 2, 16)), rank=4, top_k=4)
    with torch.no_grad():
        for name, m in layers.items():
            counter = CompileCounterWithBackend("aot_eager")
            if name.startswith("gqa"):
                cache, cache_e = aknn.KVCache.for_module(m, 2, 16), aknn.KVCache.for_module(m, 2, 16)
                step = torch.compile(lambda x, c: m(x, cache=c), fullgraph=True, backend=counter)
                xs = [r(2, 5, 64)] + [r(2, 1, 64) for _ in range(5)]
                for x in xs:
                    torch.testing.assert_close(step(x, cache), m(x, cache=cache_e), rtol=1e-5, atol=1e-6)
            else:
                step = torch.compile(lambda x, s: m(x, state=s, return_state=True), fullgraph=True, backend=counter)
                x0 = r(2, 5, 64)
                _, state = step(x0, None)
                _, state_e = m(x0, state=None, return_state=True)
                for _ in range(5):
                    x = r(2, 1, 64)
                    y, state = step(x, state)
                    y_e, state_e = m(x, state=state_e, return_state=True)
                    torch.testing.assert_close(y, y_e, rtol=1e-5, atol=1e-6)
            assert counter.frame_count == 2, (name, counter.frame_count)  # prefill + decode step


def test_decode_op_does_not_recompile_as_lengths_advance():
    counter = CompileCounterWithBackend("aot_eager")
    kc, vc = torch.zeros(2, 32, 2, 16, device=DEVICE), torch.zeros(2, 32, 2, 16, device=DEVICE)
    lens = torch.zeros(2, dtype=torch.int32, device=DEVICE)

    @torch.compile(fullgraph=True, backend=counter)
    def step(q, k, v):
        o = attnkit.attention_decode(q, kc, vc, lens, k_new=k, v_new=v)
        lens.add_(1)
        return o

    for _ in range(6):
        step(r(2, 1, 4, 16), r(2, 1, 2, 16), r(2, 1, 2, 16))
    assert counter.frame_count == 1
    assert lens.tolist() == [6, 6]


def test_sequence_length_marked_dynamic_does_not_recompile():
    m = aknn.GroupedQueryAttention(64, 4, 2, qk_norm="rms", rope_theta=1e4).to(DEVICE)
    counter = CompileCounterWithBackend("aot_eager")
    cm = torch.compile(m, fullgraph=True, backend=counter)
    for T in (5, 7, 12, 9):
        x = r(2, T, 64)
        torch._dynamo.mark_dynamic(x, 1)
        torch.testing.assert_close(cm(x), m(x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def test_inductor_attention():
    q, k, v = r(1, 6, 4, 16, grad=True), r(1, 6, 2, 16, grad=True), r(1, 6, 2, 16, grad=True)
    check_compiled(lambda q, k, v: attnkit.attention(q, k, v, causal=True) * 2, q, k, v, backend="inductor",
                   exact=False)


@pytest.mark.parametrize("qk_norm", [None, "rms"])
def test_compiled_triton_attention_backward_does_not_rerun_forward(monkeypatch, qk_norm):
    """The forward op of the triton backend returns the kernels' residuals (lse, the QK-norm
    rstd); the backward op runs only the backward kernels: one forward launch per fwd+bwd."""
    from attnkit.ops.softmax import triton_attention as ta

    fwd_calls, bwd_calls = [], []
    real_fwd, real_bwd = ta.attention_fwd, ta.attention_bwd
    monkeypatch.setattr(ta, "attention_fwd", lambda *a, **kw: fwd_calls.append(1) or real_fwd(*a, **kw))
    monkeypatch.setattr(ta, "attention_bwd", lambda *a, **kw: bwd_calls.append(1) or real_bwd(*a, **kw))
    q, k, v = r(1, 5, 4, 16, grad=True), r(1, 5, 2, 16, grad=True), r(1, 5, 2, 16, grad=True)
    w = torch.ones(16, device=DEVICE).add_(r(16), alpha=0.1).requires_grad_(qk_norm is not None)

    def fn(q, k, v, w):
        return attnkit.attention(q, k, v, causal=True, qk_norm=qk_norm, q_norm_weight=w if qk_norm else None,
                                 backend="triton")

    f = torch.compile(fn, fullgraph=True, backend="aot_eager")
    xs_c = _clone((q, k, v, w))
    o = f(*xs_c)
    assert len(fwd_calls) == 1 and not bwd_calls
    g = torch.randn_like(o)
    o.backward(g)
    assert len(fwd_calls) == 1 and len(bwd_calls) == 1
    # the same gradients as eager (the backend's autograd.Function: the same kernels)
    xs_e = _clone((q, k, v, w))
    fn(*xs_e).backward(g)
    for a, b in zip(xs_c, xs_e):
        if b.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["lightning", "lightning_varlen", "linear_normalize", "linear_noncausal"])
def test_compiled_triton_linear_backward_does_not_rerun_forward(monkeypatch, case):
    """The chunked Triton forward op returns the backward's residuals (segment states,
    denominators, segment tables); the backward op runs only the backward kernels."""
    from attnkit.ops.linear import triton_chunk as tc

    fwd_calls, bwd_calls = [], []
    real_fwd, real_bwd = tc.chunk_linear_fwd, tc.chunk_linear_bwd
    monkeypatch.setattr(tc, "chunk_linear_fwd", lambda *a, **kw: fwd_calls.append(1) or real_fwd(*a, **kw))
    monkeypatch.setattr(tc, "chunk_linear_bwd", lambda *a, **kw: bwd_calls.append(1) or real_bwd(*a, **kw))
    T = 7
    q, k, v = r(1, T, 4, 16, grad=True), r(1, T, 2, 16, grad=True), r(1, T, 2, 16, grad=True)
    if case.startswith("lightning"):
        cu = torch.tensor([0, 3, T], dtype=torch.int32, device=DEVICE) if case.endswith("varlen") else None
        N = 2 if cu is not None else 1
        s0 = r(N, 4, 16, 16, grad=True)
        decay = torch.tensor([0.1, 0.3, 0.5, 0.9], device=DEVICE)

        def fn(q, k, v, s0):
            return attnkit.lightning_attention(q, k, v, decay, initial_state=s0, output_final_state=True,
                                               cu_seqlens=cu, backend="triton")
    else:
        s0 = (r(1, 2, 16, 16, grad=True).abs(), r(1, 2, 16, grad=True).abs())
        causal = case != "linear_noncausal"

        def fn(q, k, v, s0):
            return attnkit.linear_attention(q, k, v, feature_map="elu", normalize=True, causal=causal,
                                            initial_state=s0, output_final_state=True, backend="triton")

    flat0 = list(s0) if isinstance(s0, tuple) else [s0]
    xs_c, xs_e = _clone((q, k, v, *flat0)), _clone((q, k, v, *flat0))
    pack = (lambda xs: (*xs[:3], tuple(xs[3:]))) if isinstance(s0, tuple) else (lambda xs: tuple(xs))
    out_c = _flat(torch.compile(fn, fullgraph=True, backend="aot_eager")(*pack(xs_c)))
    assert len(fwd_calls) == 1 and not bwd_calls
    gs = [torch.randn_like(o) for o in out_c]
    torch.autograd.backward(out_c, gs)
    assert len(fwd_calls) == 1 and len(bwd_calls) == 1
    out_e = _flat(fn(*pack(xs_e)))
    torch.autograd.backward(out_e, gs)
    for a, b in zip(out_c, out_e):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(xs_c, xs_e):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # inductor's C++ codegen of a whole layer: ~1 min on 2 cores; the op case above stays
def test_inductor_module():
    m = aknn.LightningAttention(64, 4).to(DEVICE)
    x = r(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, fullgraph=True, backend="inductor")(x), m(x), rtol=1e-5,
                                   atol=1e-5)


# --------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", ["gqa_rope_rmsnorm", "gqa_fused_norm", "lightning", "linear"])
def test_export_inference_forward(name):
    m = _modules()[name].to(DEVICE).eval()
    x = r(2, 5, 64)
    with torch.no_grad():
        ep = torch.export.export(m, (x,))
        y = ep.module()(x)
        torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-6)
        x2 = r(2, 5, 64)
        torch.testing.assert_close(ep.module()(x2), m(x2), rtol=1e-5, atol=1e-6)
    names = {n.target.name() for n in ep.graph.nodes if n.op == "call_function" and hasattr(n.target, "name")}
    assert any(n.startswith("attnkit::") for n in names), names


# ------------------------------------------------------------------------ checks while tracing


def test_value_checks_skipped_under_compile_shape_checks_still_run():
    q, k, v = r(1, 4, 2, 16), r(1, 4, 2, 16), r(1, 4, 2, 16)
    bad_decay = torch.tensor([-0.5, 0.1], device=DEVICE)
    with pytest.raises(ValueError, match="decay must have every entry >= 0"):
        attnkit.lightning_attention(q, k, v, bad_decay)  # eager reads the values
    f = torch.compile(lambda q, k, v, d: attnkit.lightning_attention(q, k, v, d)[0], fullgraph=True,
                      backend="aot_eager")
    f(q, k, v, bad_decay)  # no value read while tracing (no data-dependent guard)
    with pytest.raises(Exception, match="v must have as many heads as k"):
        f(q, k, r(1, 4, 1, 16), bad_decay)


# ---------------------------------------------------------------------------- backend choice


def test_backend_choice_cached_per_signature(monkeypatch):
    calls = []
    real = dispatch._choose
    monkeypatch.setattr(dispatch, "_choose", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    dispatch._CHOICES.clear()
    x = r(2, 3, 16)
    for _ in range(3):
        attnkit.qk_norm(x, backend="reference")
    assert calls == ["qk_norm"]
    attnkit.qk_norm(r(2, 3, 32), backend="reference")  # a new head dim: a new signature
    assert calls == ["qk_norm", "qk_norm"]
    monkeypatch.setenv("ATTNKIT_BACKEND", "reference")  # the environment is part of the key
    attnkit.qk_norm(x)
    assert len(calls) == 3


def test_automatic_choice_falls_back_when_native_build_fails(monkeypatch, tmp_path):
    """Issue 9, defect 6: a failed native build is one warning naming the log, not an error,
    for the automatic choice; an explicit backend='cuda' raises BackendUnavailable."""
    from attnkit.native import _build

    monkeypatch.setenv("ATTNKIT_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(_build, "_module", None)
    monkeypatch.setattr(_build, "_failure", None)
    monkeypatch.setattr(_build, "_warned", False)
    monkeypatch.setattr(_build, "_built_library", lambda: None)
    monkeypatch.setattr(_build, "static_reasons", lambda device: [] if _build._failure is None else
                        [f"the native extension failed to build (see {_build._failure})"])

    def broken(verbose):
        raise RuntimeError("c++: error: simulated compiler failure")

    monkeypatch.setattr(_build, "_compile", broken)
    monkeypatch.setattr(dispatch, "_WARNED", set())
    dispatch._CHOICES.clear()
    q, kc, vc = r(1, 1, 2, 16), r(1, 8, 1, 16), r(1, 8, 1, 16)
    lens = torch.tensor([5], dtype=torch.int32)
    with pytest.warns(RuntimeWarning, match="build.log") as record:
        o = attnkit.attention_decode(q, kc, vc, lens)
    assert len([w for w in record if "native extension" in str(w.message)]) == 1
    torch.testing.assert_close(o, attnkit.attention_decode(q, kc, vc, lens, backend="reference"), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        attnkit.attention_decode(q, kc, vc, lens)
        attnkit.linear_attention_step(r(1, 1, 2, 16), r(1, 1, 2, 16), r(1, 1, 2, 16), torch.zeros(1, 2, 16, 16))
    with pytest.raises(attnkit.BackendUnavailable, match="build.log"):
        attnkit.attention_decode(q, kc, vc, lens, backend="cuda")
    dispatch._CHOICES.clear()


def test_triton_interpret_set_after_import_is_explained():
    """Issue 9, defect 10: TRITON_INTERPRET=1 set after triton was imported."""
    code = textwrap.dedent("""
        import os, torch, triton
        os.environ["TRITON_INTERPRET"] = "1"
        import attnkit
        q = torch.randn(1, 4, 2, 16)
        print(attnkit.explain("attention", q, q, q, backend="triton"))
        try:
            attnkit.attention(q, q, q, backend="triton")
        except attnkit.BackendUnavailable as e:
            print("RAISED", e)
    """)
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "RAISED" in out.stdout, out.stdout + out.stderr
    assert "TRITON_INTERPRET=1 was set after triton was imported" in out.stdout
    assert "InterpreterError" not in out.stdout + out.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture_and_replay_decode_step():
    torch.manual_seed(3)
    kc, vc = torch.zeros(2, 64, 2, 64, device="cuda"), torch.zeros(2, 64, 2, 64, device="cuda")
    lens = torch.tensor([5, 9], dtype=torch.int32, device="cuda")
    S = torch.zeros(2, 4, 64, 64, device="cuda")
    decay = torch.rand(4, device="cuda")
    q, k, v = r(2, 1, 4, 64), r(2, 1, 2, 64), r(2, 1, 2, 64)

    def step():
        o = attnkit.attention_decode(q, kc, vc, lens, k_new=k, v_new=v)
        o2 = attnkit.linear_attention_step(q, k, k, S, decay=decay)
        lens.add_(1)
        return o, o2

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: kernels compiled/tuned outside the capture
            step()
    torch.cuda.current_stream().wait_stream(s)
    snap = [t.clone() for t in (kc, vc, lens, S)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for t, s0 in zip((kc, vc, lens, S), snap):
        t.copy_(s0)
    for _ in range(3):
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
        state = [t.clone() for t in (kc, vc, lens, S)]
        graph.replay()
        torch.cuda.synchronize()
        kc2, vc2, lens2, S2 = state
        o_ref = attnkit.attention_decode(q, kc2, vc2, lens2, k_new=k, v_new=v)
        o2_ref = attnkit.linear_attention_step(q, k, k, S2, decay=decay)
        torch.testing.assert_close(out[0], o_ref)
        torch.testing.assert_close(out[1], o2_ref)
        torch.testing.assert_close(lens, lens2 + 1)
