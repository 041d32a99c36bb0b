"""torch.library custom ops: every public op is ``torch.ops.attnkit.<name>``; ``opcheck`` on each.

Each case calls the *public* function once under a recording dispatch mode (with
``ATTNKIT_EAGER_CUSTOM_OPS=1``, so the eager call goes through the op), which captures the
custom-op call exactly as the public function makes it (validated, normalised arguments and the
chosen backend); ``torch.library.opcheck`` then checks that call: schema (declared mutation and
aliasing), fake implementation, autograd registration and AOT dispatch (static and dynamic).
Shapes are tiny: the checks are about registration, not numerics (tests per backend cover those).
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnkit
from attnkit import dispatch
from attnkit._custom_ops import OPS
from attnkit.native import _build

from .harness import interpreted

PUBLIC_OPS = ("attention", "attention_decode", "qk_norm", "linear_attention", "lightning_attention",
              "linear_attention_step", "loki_attention_decode", "loki_attention_decode_lowrank",
              "loki_cache_append", "loki_rotate", "loki_calibrate", "lightning_slopes", "layer_decay")

# Names in attnkit.__all__ that are not ops, and why. Everything else there is a public function
# and must have its torch.ops.attnkit op (test_every_public_function_is_an_op).
NOT_OPS = {
    "BackendUnavailable": "an exception class",
    "LokiBasis": "a class (a container of the tensors loki_calibrate returns)",
    "nn": "a module (attnkit.nn), whose layers call the ops",
    "explain": "reports the dispatch decision for a call (prepare step, backend choice) as text; computes no tensor",
}


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "attnkit" and not func.name().endswith("_backward"):
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _clone(x):
    if isinstance(x, torch.Tensor):
        y = x.detach().clone()
        return y.requires_grad_(x.requires_grad) if y.is_floating_point() else y
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(i) for i in x)
    return x


def recorded(fn):
    """The (op, args, kwargs) of the single attnkit custom-op call `fn()` makes (eager calls go
    through the ops under ATTNKIT_EAGER_CUSTOM_OPS=1; traced calls always do)."""
    with pytest.MonkeyPatch.context() as mp, _Record() as rec:
        mp.setenv("ATTNKIT_EAGER_CUSTOM_OPS", "1")
        fn()
    assert len(rec.calls) == 1, [c[0] for c in rec.calls]
    func, args, kwargs = rec.calls[0]
    return func, _clone(args), _clone(kwargs)


def r(*shape, dtype=torch.float32, grad=False):
    x = torch.randn(*shape, dtype=torch.float64).to(dtype)
    return x.requires_grad_(grad)


def _basis(hk, d):
    return attnkit.loki_calibrate(torch.randn(64, hk, d))


def _loki_inputs(dtype=torch.float32):
    B, Smax, H, Hk, D = 2, 12, 4, 2, 16
    basis = _basis(Hk, D)
    k_rot = attnkit.loki_rotate(r(B, Smax, Hk, D, dtype=dtype), basis)
    lens = torch.tensor([7, 12], dtype=torch.int32)
    return r(B, 1, H, D, dtype=dtype), k_rot, r(B, Smax, Hk, D, dtype=dtype), lens, basis


def _lowrank(k_rot, R=8):
    return k_rot[..., :R].permute(0, 2, 1, 3).contiguous()


def cases(backend: str, dtype=torch.float32, grad: bool = True):
    """name -> zero-argument callable making one public call on `backend` (tiny shapes)."""
    g = grad and backend != "cuda"  # the native kernels are inference-only
    kw = dict(backend=backend)
    out = {}
    q, k, v = r(1, 5, 4, 16, dtype=dtype, grad=g), r(1, 5, 2, 16, dtype=dtype, grad=g), r(1, 5, 2, 16, dtype=dtype,
                                                                                           grad=g)
    if backend != "cuda":
        w = r(16, grad=g)
        out["attention"] = lambda: attnkit.attention(q, k, v, causal=True, qk_norm="rms", q_norm_weight=w,
                                                     k_norm_weight=w, return_lse=True, **kw)
        out["attention_window_softcap"] = lambda: attnkit.attention(q, k, v, causal=True, window=(2, 0), softcap=5.0,
                                                                    **kw)
        cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        out["attention_varlen_tensor_scale"] = lambda: attnkit.attention(
            q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, scale=torch.tensor(0.3, requires_grad=g), **kw)
        out["linear_attention"] = lambda: attnkit.linear_attention(
            q, k, v, feature_map="elu", normalize=True, output_final_state=True,
            initial_state=(r(1, 2, 16, 16, grad=g), r(1, 2, 16, grad=g).abs()), **kw)
        out["lightning_attention"] = lambda: attnkit.lightning_attention(
            q, k, v, torch.rand(4), output_final_state=True, initial_state=r(1, 4, 16, 16, grad=g), **kw)
    xs = r(2, 3, 4, 16, dtype=dtype, grad=g)
    out["qk_norm"] = lambda: attnkit.qk_norm(xs, r(16, grad=g), **kw)
    kc, vc = r(2, 9, 2, 16, dtype=dtype), r(2, 9, 2, 16, dtype=dtype)
    lens = torch.tensor([3, 6], dtype=torch.int32)
    q1, k1, v1 = r(2, 1, 4, 16, dtype=dtype), r(2, 1, 2, 16, dtype=dtype), r(2, 1, 2, 16, dtype=dtype)
    out["attention_decode"] = lambda: attnkit.attention_decode(q1, kc, vc, lens, **kw)
    out["attention_decode_append"] = lambda: attnkit.attention_decode(q1, kc, vc, lens, k_new=k1, v_new=v1, **kw)
    if backend == "reference":
        # paged cache: 5 blocks of 4 tokens, row 0 uses blocks 3, 1; row 1 uses blocks 0, 4
        pk, pv = r(5, 4, 2, 16, dtype=dtype), r(5, 4, 2, 16, dtype=dtype)
        table = torch.tensor([[3, 1], [0, 4]], dtype=torch.int32)
        out["attention_decode_paged_append"] = lambda: attnkit.attention_decode(
            q1, pk, pv, torch.tensor([2, 5], dtype=torch.int32), k_new=k1, v_new=v1, block_table=table,
            window=(3, 0), softcap=4.0, **kw)
    S = torch.zeros(3, 4, 16, 16)
    idx = torch.tensor([2, 0], dtype=torch.int32)
    out["linear_attention_step"] = lambda: attnkit.linear_attention_step(q1, k1, v1, S, decay=torch.rand(4),
                                                                         state_indices=idx, **kw)
    Sz = (torch.zeros(2, 2, 16, 16), torch.zeros(2, 2, 16))
    out["linear_attention_step_normalized"] = lambda: attnkit.linear_attention_step(
        q1, k1, v1, Sz, feature_map="elu", normalize=True, **kw)
    ql, k_rot, v_rot, llens, basis = _loki_inputs(dtype)
    out["loki_attention_decode"] = lambda: attnkit.loki_attention_decode(ql, k_rot, v_rot, llens, basis, rank=4,
                                                                         top_k=5, **kw)
    from attnkit.ops.loki import loki_attention_decode_lowrank, loki_cache_append
    if backend != "cuda":
        low = _lowrank(k_rot)
        out["loki_attention_decode_lowrank"] = lambda: loki_attention_decode_lowrank(
            ql, low, k_rot, v_rot, llens, basis, rank=4, top_k=5, **kw)
        low2 = _lowrank(k_rot).clone()
        out["loki_cache_append"] = lambda: loki_cache_append(r(2, 1, 2, 16, dtype=dtype), r(2, 1, 2, 16, dtype=dtype),
                                                             k_rot.clone(), v_rot.clone(), lens, basis, k_lowrank=low2,
                                                             **kw)
    return out


def test_every_public_op_is_a_custom_op():
    names = set(OPS)
    for name in PUBLIC_OPS:
        assert name in names
        assert hasattr(torch.ops.attnkit, name)
    assert "attention_decode_append" in names  # the in-place variant
    assert set(dispatch.ops()) <= names
    # the softmax ops' schemas carry the sliding-window / softcap / paged-cache arguments
    for name in ("attention", "attention_decode", "attention_decode_append"):
        args = {a.name: a for a in getattr(torch.ops.attnkit, name).default._schema.arguments}
        assert str(args["window"].type) == "List[int]" and list(args["window"].default_value) == [-1, -1]
        assert str(args["softcap"].type) == "float" and args["softcap"].default_value == 0.0
    for name in ("attention_decode", "attention_decode_append"):
        args = {a.name: a for a in getattr(torch.ops.attnkit, name).default._schema.arguments}
        assert str(args["block_table"].type) == "Optional[Tensor]" and args["block_table"].default_value is None
    mutating = {"attention_decode_append": {"k_cache", "v_cache"}, "linear_attention_step": {"state", "z"},
                "loki_cache_append": {"k_cache_rot", "v_cache", "k_lowrank"}}
    for name, op in OPS.items():
        written = {a.name for a in getattr(torch.ops.attnkit, name).default._schema.arguments
                   if a.alias_info is not None and a.alias_info.is_write}
        assert written == mutating.get(name, set()), (name, written)


def test_every_public_function_is_an_op():
    """SPEC "every public op is a custom op", read literally: each function in attnkit.__all__ has
    its torch.ops.attnkit op, except the names listed in NOT_OPS (with the reason)."""
    assert set(NOT_OPS) <= set(attnkit.__all__), "NOT_OPS names something that is no longer public"
    for name in NOT_OPS:  # the exclusions are what they claim to be
        obj = getattr(attnkit, name)
        assert isinstance(obj, type) or inspect.ismodule(obj) or name == "explain", name
    functions = [n for n in attnkit.__all__ if n not in NOT_OPS]
    assert set(functions) == set(PUBLIC_OPS) - {"loki_attention_decode_lowrank", "loki_cache_append"}
    for name in functions:
        assert inspect.isfunction(getattr(attnkit, name)), name
        assert name in OPS, name
        assert isinstance(getattr(torch.ops.attnkit, name).default, torch._ops.OpOverload), name


def backendless_cases():
    """The public functions without a backend (no dispatch; docs/compile.md):
    name -> (function, its arguments); tensor arguments that require grad are the leaves."""
    torch.manual_seed(3)
    basis = _basis(2, 16)
    comps = basis.components.clone().requires_grad_(True)  # a trained basis: gradients reach it
    keys = r(40, 2, 16)
    ratio = basis.explained_variance_ratio
    return {
        "loki_rotate": (lambda x: attnkit.loki_rotate(x, basis), (r(2, 3, 2, 16, grad=True),)),
        "loki_rotate_bf16_grad_components": (lambda x, c: attnkit.loki_rotate(x, attnkit.LokiBasis(c, ratio)),
                                             (r(3, 2, 16, dtype=torch.bfloat16, grad=True), comps)),
        "loki_calibrate": (lambda k: attnkit.loki_calibrate(k), (keys,)),
        "loki_calibrate_center_f64_grad_keys": (
            lambda k: attnkit.loki_calibrate(k, center=True, dtype=torch.float64),
            (keys.clone().requires_grad_(True),)),
        "lightning_slopes": (lambda: attnkit.lightning_slopes(7), ()),
        "layer_decay": (lambda s: attnkit.layer_decay(s, 2, 6),
                        (torch.rand(5, dtype=torch.float64, requires_grad=True),)),
        "layer_decay_f16_strided": (lambda s: attnkit.layer_decay(s, 0, 1),
                                    (torch.rand(4, 6, dtype=torch.float16)[:, ::2].requires_grad_(True),)),
    }


@pytest.mark.parametrize("name", sorted(backendless_cases()))
def test_opcheck_backendless(name):
    fn, args = backendless_cases()[name]
    _opcheck(name, lambda: fn(*args))


def _flat(out):
    if isinstance(out, attnkit.LokiBasis):
        return [out.components, out.explained_variance_ratio, out.mean]
    return [out]


@pytest.mark.parametrize("name", sorted(backendless_cases()))
def test_backendless_op_matches_direct_call(name):
    """Eager calls run the implementation directly; through the op (ATTNKIT_EAGER_CUSTOM_OPS=1)
    the results are the same bits, and the gradients of the registered backward equal autograd
    through the direct call (bitwise for layer_decay, to float rounding for the rotation)."""
    fn, args = backendless_cases()[name]
    args_op = _clone(args)
    direct = _flat(fn(*args))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNKIT_EAGER_CUSTOM_OPS", "1")
        func, *_ = recorded(lambda: fn(*_clone(args)))  # the call does reach the op
        via_op = _flat(fn(*args_op))
    assert func.name() == "attnkit::" + next(op for op in PUBLIC_OPS if name.startswith(op))
    assert len(direct) == len(via_op)
    for a, b in zip(via_op, direct):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    leaves = [x for x in args if isinstance(x, torch.Tensor) and x.requires_grad]
    if name.startswith("loki_calibrate"):  # as eagerly: not differentiable, even from keys with grad
        assert not any(t.requires_grad for t in via_op if t is not None)
        return
    if not leaves:
        return
    g = torch.randn(direct[0].shape, dtype=torch.float64).to(direct[0].dtype)
    gd = torch.autograd.grad(direct[0], leaves, g)
    go = torch.autograd.grad(via_op[0], [x for x in args_op if isinstance(x, torch.Tensor) and x.requires_grad], g)
    exact = name.startswith("layer_decay")
    for a, b in zip(go, gd):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **(dict(rtol=0, atol=0) if exact else {}))


def _opcheck(name, call, fast: bool = False):
    func, args, kwargs = recorded(call)
    utils = ("test_schema", "test_faketensor") if fast else \
        ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(func, args, kwargs, test_utils=utils)


@pytest.mark.parametrize("name", sorted(cases("reference")))
def test_opcheck_reference(name):
    _opcheck(name, cases("reference")[name])


def _native_ok() -> bool:
    return not _build.static_reasons("cpu") and os.environ.get("ATTNKIT_DISABLE_NATIVE") != "1"


@pytest.mark.skipif(not _native_ok(), reason="the native extension cannot be built here")
@pytest.mark.parametrize("name", sorted(cases("cuda")))
def test_opcheck_native(name):
    _opcheck(name, cases("cuda")[name])


TRITON_FEW = ("attention", "qk_norm", "attention_decode_append", "linear_attention_step", "linear_attention",
              "lightning_attention")
# autograd (and AOT dispatch) checked too: the backward ops of these run the backward kernels on the
# forward op's residual outputs, whose fake shapes opcheck compares with the real ones
TRITON_AUTOGRAD = ("qk_norm", "attention", "linear_attention", "lightning_attention")


@pytest.mark.skipif(torch.cuda.is_available() or not interpreted(), reason="interpreter cases (CPU only)")
@pytest.mark.parametrize("name", TRITON_FEW)
def test_opcheck_triton_interpreted(name):
    # the interpreter is slow: schema and fake-tensor checks only, except TRITON_AUTOGRAD
    _opcheck(name, cases("triton")[name], fast=name not in TRITON_AUTOGRAD)


def test_recorded_call_matches_public_result():
    # what opcheck checks is the op the public function runs: same result through torch.ops
    call = cases("reference")["attention"]
    func, args, kwargs = recorded(call)
    o, lse = call()
    o2, lse2, _, _ = func(*args, **kwargs)  # (o, lse, and the residuals of the triton backend)
    torch.testing.assert_close(o2, o, rtol=0, atol=0)
    torch.testing.assert_close(lse2, lse, rtol=0, atol=0)
