"""Every dispatched op as a ``torch.library`` custom op: ``torch.ops.attnkit.<name>``.

The public functions (``attnkit.attention``, ...) validate and normalise their arguments, choose a
backend (:func:`attnkit.dispatch.choose`, cached per call signature) and call the op below with
the chosen backend's name. To ``torch.compile``, ``torch.export`` and CUDA-graph capture each op
is one opaque node with:

* a schema that names every argument (tensors positional, options keyword-only), including the
  sliding-window/softcap/paged-cache arguments of the softmax ops (``window``, ``softcap``,
  ``block_table``), so the schema does not change when those features land in every backend;
* a fake implementation (output shapes and dtypes from the contract, never reading values);
* for the differentiable ops (``attention``, ``qk_norm``, ``linear_attention``,
  ``lightning_attention``) autograd registered with ``register_autograd``, whose backward is the
  op ``<name>_backward``. With the ``triton`` backend the forward ops of ``attention``,
  ``linear_attention`` and ``lightning_attention`` also return the backward kernels' residuals
  (lse, QK-norm rstd, segment states, ...) and the backward op runs only the backward kernels on
  them; otherwise the backward op reruns the chosen backend's forward with autograd on and
  differentiates it (autograd through the reference; the cost: one extra forward);
* for the in-place ops (``attention_decode_append``, ``linear_attention_step``,
  ``loki_cache_append``) the mutated tensors declared in the schema (``Tensor(a!)``).

The public functions without a backend (``loki_rotate``, ``loki_calibrate``, ``lightning_slopes``,
``layer_decay``) are ops too, outside the dispatcher: traced calls (and eager ones under
``ATTNKIT_EAGER_CUSTOM_OPS=1``) go through them (:func:`through_op`), plain eager calls run the
same implementation directly.

The ops take *validated, normalised* arguments (what the prepare step returns): call the public
functions, not ``torch.ops.attnkit.*``, unless you validate yourself. Callables (a user
``feature_map``) never reach an op: the prepare step applies them outside, as ordinary torch code
that compiles with the rest of the model.

Backend implementations keep the keyword signature of ``docs/contracts.md``; an op calls
``dispatch.implementation(op, backend)(**kwargs)`` with exactly the kwargs the prepare step
would have passed (``window``/``softcap``/``block_table`` only when set, so backends that
predate them keep working).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import dispatch

__all__ = ["CALLERS", "OPS"]

CALLERS: dict[str, Callable[[dict, str], Any]] = {}  # op name -> caller(kwargs, backend)
OPS: dict[str, Any] = {}  # op name -> torch.library CustomOpDef (backward ops included)

_NO_WINDOW = (-1, -1)


def _fn(op: str, backend: str) -> Callable[..., Any]:
    return dispatch.implementation(op, backend)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The stand-in for an absent tensor output (custom ops cannot return None)."""
    return like.new_empty(0, dtype=dtype if dtype is not None else like.dtype)


def _own(out: Tensor, *inputs: Tensor | None) -> Tensor:
    """`out` contiguous and not aliasing any input (a custom op's outputs never alias inputs)."""
    out = out.contiguous()
    if out.numel():
        ptr = out.untyped_storage().data_ptr()
        if any(x is not None and x.numel() and x.untyped_storage().data_ptr() == ptr for x in inputs):
            out = out.clone()
    return out


def _softmax_extras(kw: dict, window: Sequence[int], softcap: float, block_table: Tensor | None = None) -> dict:
    if tuple(window) != _NO_WINDOW:
        kw["window"] = (int(window[0]), int(window[1]))
    if softcap:
        kw["softcap"] = float(softcap)
    if block_table is not None:
        kw["block_table"] = block_table
    return kw


@contextlib.contextmanager
def _autograd_on():
    """Autograd inside an op's kernel (where the dispatcher has switched it off): the backward
    ops rerun a backend's forward and differentiate it."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), \
            torch.enable_grad():
        yield


def _leaves(xs: Sequence[Tensor | None], needs: Sequence[bool]) -> list[Tensor | None]:
    return [None if x is None else x.detach().requires_grad_(bool(n)) for x, n in zip(xs, needs)]


def _grads(outs: Sequence[Tensor], grads: Sequence[Tensor], leaves: Sequence[Tensor | None],
           needs: Sequence[bool]) -> list[Tensor]:
    """d(outs)/d(leaves) contracted with `grads`; an empty tensor where no gradient is wanted."""
    pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and o.requires_grad and o.numel()]
    wrt = [x for x, n in zip(leaves, needs) if n and x is not None]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g.to(o.dtype) for o, g in pairs],
                                   allow_unused=True) if pairs and wrt else [None] * len(wrt))
    out = []
    for x, n in zip(leaves, needs):
        if n and x is not None:
            g = next(got)
            out.append(torch.zeros_like(x) if g is None else g.contiguous())
        else:
            out.append(_empty(x) if x is not None else torch.empty(0))
    return out


def _fake_grads(xs: Sequence[Tensor | None], needs: Sequence[bool]) -> list[Tensor]:
    return [torch.empty_like(x, memory_format=torch.contiguous_format) if (n and x is not None)
            else (_empty(x) if x is not None else torch.empty(0)) for x, n in zip(xs, needs)]


def _as_grads(xs: Sequence[Tensor | None], needs: Sequence[bool], got: Sequence[Tensor]) -> tuple:
    return tuple(g if (n and x is not None) else None for x, n, g in zip(xs, needs, got))


def _op(name: str, schema: str, mutates: tuple[str, ...] = ()):
    def deco(fn):
        op = torch.library.custom_op(f"attnkit::{name}", fn, mutates_args=mutates, schema=schema)
        OPS[name] = op
        return op
    return deco


# ------------------------------------------------------------------------------------ attention

_ATTN_TENSORS = "Tensor q, Tensor k, Tensor v, Tensor? scale_tensor=None, Tensor? q_norm_weight=None, " \
                "Tensor? k_norm_weight=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None"
_ATTN_OPTIONS = "bool causal=False, float? scale=None, str? qk_norm=None, float norm_eps=1e-06, " \
                "bool return_lse=False, int[2] window=[-1, -1], float softcap=0.0, str backend='reference'"


def _attention_kwargs(q, k, v, scale_tensor, q_norm_weight, k_norm_weight, cu_seqlens_q, cu_seqlens_k, *,
                      causal, scale, qk_norm, norm_eps, return_lse, window, softcap) -> dict:
    if scale_tensor is not None:
        s = scale_tensor
    else:
        s = float(scale) if scale is not None else q.shape[-1] ** -0.5
    return _softmax_extras(dict(q=q, k=k, v=v, causal=causal, scale=s, qk_norm=qk_norm, q_norm_weight=q_norm_weight,
                                k_norm_weight=k_norm_weight, norm_eps=norm_eps, cu_seqlens_q=cu_seqlens_q,
                                cu_seqlens_k=cu_seqlens_k, return_lse=return_lse), window, softcap)


def _attention_outputs(res, q: Tensor, return_lse: bool) -> tuple[Tensor, Tensor]:
    o, lse = res if return_lse else (res, None)
    return o, (lse if lse is not None else _empty(q, _state_dtype(q.dtype)))


def _triton_attention():
    from .ops.softmax import triton_attention

    return triton_attention


def _triton_attention_args(q, scale_tensor, q_norm_weight, k_norm_weight, cu_seqlens_q, cu_seqlens_k, *, causal,
                           scale, qk_norm, norm_eps, window, softcap) -> dict:
    """The options of the Triton attention kernels' launchers (what the backend entry derives)."""
    return dict(causal=causal, scale=scale_tensor if scale_tensor is not None else
                (float(scale) if scale is not None else q.shape[-1] ** -0.5),
                norm=qk_norm, q_w=q_norm_weight if qk_norm is not None else None,
                k_w=k_norm_weight if qk_norm is not None else None, eps=norm_eps, cu_seqlens_q=cu_seqlens_q,
                cu_seqlens_k=cu_seqlens_k, window=(int(window[0]), int(window[1])), softcap=float(softcap))


@_op("attention", f"({_ATTN_TENSORS}, *, {_ATTN_OPTIONS}) -> (Tensor, Tensor, Tensor, Tensor)")
def _attention(q, k, v, scale_tensor=None, q_norm_weight=None, k_norm_weight=None, cu_seqlens_q=None,
               cu_seqlens_k=None, *, causal=False, scale=None, qk_norm=None, norm_eps=1e-6, return_lse=False,
               window=_NO_WINDOW, softcap=0.0, backend="reference"):
    """Outputs `(o, lse, rq, rk)`. With the `triton` backend the kernels' own residuals: `lse`
    always (the forward kernel writes it anyway), and the query/key rstd of the QK-norm
    (`[B, T, H]`, `[B, S, Hk]`, empty without a norm), so the backward op runs only the backward
    kernels. Other backends: `lse` only with `return_lse`, `rq`/`rk` empty."""
    ins = (q, k, v, scale_tensor, q_norm_weight, k_norm_weight)
    if backend == "triton":
        with torch.no_grad():
            o, lse, rq, rk = _triton_attention().attention_fwd(
                q, k, v, **_triton_attention_args(q, scale_tensor, q_norm_weight, k_norm_weight, cu_seqlens_q,
                                                  cu_seqlens_k, causal=causal, scale=scale, qk_norm=qk_norm,
                                                  norm_eps=norm_eps, window=window, softcap=softcap))
        return (_own(o, *ins), _own(lse, *ins), _own(rq, *ins) if rq is not None else _empty(q, torch.float32),
                _own(rk, *ins) if rk is not None else _empty(q, torch.float32))
    kw = _attention_kwargs(q, k, v, scale_tensor, q_norm_weight, k_norm_weight, cu_seqlens_q, cu_seqlens_k,
                           causal=causal, scale=scale, qk_norm=qk_norm, norm_eps=norm_eps, return_lse=return_lse,
                           window=window, softcap=softcap)
    with torch.no_grad():
        o, lse = _attention_outputs(_fn("attention", backend)(**kw), q, return_lse)
    return _own(o, *ins), _own(lse, *ins), _empty(q, torch.float32), _empty(q, torch.float32)


@_attention.register_fake
def _(q, k, v, scale_tensor=None, q_norm_weight=None, k_norm_weight=None, cu_seqlens_q=None, cu_seqlens_k=None,
      *, causal=False, scale=None, qk_norm=None, norm_eps=1e-6, return_lse=False, window=_NO_WINDOW, softcap=0.0,
      backend="reference"):
    B, T, H, _ = q.shape
    o = q.new_empty(B, T, H, v.shape[3])
    f32 = torch.float32
    if backend == "triton":
        lse = q.new_empty(B, H, T, dtype=f32)
        norm = qk_norm is not None
        rq = q.new_empty(B, T, H, dtype=f32) if norm else _empty(q, f32)
        rk = q.new_empty(B, k.shape[1], k.shape[2], dtype=f32) if norm else _empty(q, f32)
        return o, lse, rq, rk
    lse = q.new_empty(B, H, T, dtype=_state_dtype(q.dtype)) if return_lse else _empty(q, _state_dtype(q.dtype))
    return o, lse, _empty(q, f32), _empty(q, f32)


@_op("attention_backward", f"(Tensor do, Tensor dlse, Tensor o, Tensor lse, Tensor rq, Tensor rk, {_ATTN_TENSORS}, "
                           f"*, bool[6] needs, {_ATTN_OPTIONS}) -> Tensor[]")
def _attention_backward(do, dlse, o, lse, rq, rk, q, k, v, scale_tensor=None, q_norm_weight=None, k_norm_weight=None,
                        cu_seqlens_q=None, cu_seqlens_k=None, *, needs, causal=False, scale=None, qk_norm=None,
                        norm_eps=1e-6, return_lse=False, window=_NO_WINDOW, softcap=0.0, backend="reference"):
    """Gradients of the forward op. `o`, `lse`, `rq`, `rk` are its outputs: the `triton` backend
    runs its backward kernels on them; other backends rerun their forward with autograd on and
    differentiate it (see docs/compile.md)."""
    if backend == "triton":
        xs = (q, k, v, scale_tensor, q_norm_weight, k_norm_weight)
        with torch.no_grad():
            got = _triton_attention().attention_bwd(
                q, k, v, o, lse, do.contiguous(), dlse.contiguous() if return_lse else None,
                rq=rq if rq.numel() else None, rk=rk if rk.numel() else None,
                **_triton_attention_args(q, scale_tensor, q_norm_weight, k_norm_weight, cu_seqlens_q, cu_seqlens_k,
                                         causal=causal, scale=scale, qk_norm=qk_norm, norm_eps=norm_eps,
                                         window=window, softcap=softcap))
        dq, dk, dv, dq_w, dk_w, dscale = got
        norm = qk_norm is not None
        return _fill_grads(xs, needs, (dq, dk, dv, dscale, dq_w if norm else None, dk_w if norm else None))
    with _autograd_on():
        leaves = _leaves((q, k, v, scale_tensor, q_norm_weight, k_norm_weight), needs)
        kw = _attention_kwargs(*leaves, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale, qk_norm=qk_norm,
                               norm_eps=norm_eps, return_lse=return_lse, window=window, softcap=softcap)
        o, lse = _attention_outputs(_fn("attention", backend)(**kw), q, return_lse)
        return _grads((o, lse if return_lse else None), (do, dlse), leaves, needs)


@_attention_backward.register_fake
def _(do, dlse, o, lse, rq, rk, q, k, v, scale_tensor=None, q_norm_weight=None, k_norm_weight=None, cu_seqlens_q=None,
      cu_seqlens_k=None, *, needs, **_):
    return _fake_grads((q, k, v, scale_tensor, q_norm_weight, k_norm_weight), needs)


def _save(ctx, inputs, keyword_only_inputs, n_diff: int) -> None:
    ctx.save_for_backward(*inputs)
    ctx.options = dict(keyword_only_inputs)
    ctx.needs = [isinstance(x, Tensor) and x.requires_grad for x in inputs[:n_diff]]


def _attention_bwd(ctx, do, dlse, drq, drk):
    *xs, o, lse, rq, rk = ctx.saved_tensors
    if dlse is None:
        dlse = torch.zeros_like(lse)
    got = _attention_backward(do, dlse, o, lse, rq, rk, *xs, needs=ctx.needs, **ctx.options)
    return (*_as_grads(xs[:6], ctx.needs, got), None, None)


def _attention_setup(ctx, inputs, keyword_only_inputs, output):
    """Saves the inputs and the forward's outputs (`o`, `lse` and the Triton residuals; the
    backward op of the `triton` backend needs them, the others get them for free)."""
    _save(ctx, (*inputs, *output), keyword_only_inputs, 6)


_attention.register_autograd(_attention_bwd, setup_context=_attention_setup)


def _call_attention(kw: dict, backend: str):
    scale = kw["scale"]
    st = scale if isinstance(scale, Tensor) else None
    o, lse, _, _ = _attention(kw["q"], kw["k"], kw["v"], st, kw["q_norm_weight"], kw["k_norm_weight"], kw["cu_seqlens_q"],
                        kw["cu_seqlens_k"], causal=kw["causal"], scale=None if st is not None else float(scale),
                        qk_norm=kw["qk_norm"], norm_eps=kw["norm_eps"], return_lse=kw["return_lse"],
                        window=list(kw.get("window") or _NO_WINDOW), softcap=float(kw.get("softcap") or 0.0),
                        backend=backend)
    return (o, lse) if kw["return_lse"] else o


CALLERS["attention"] = _call_attention


# ------------------------------------------------------------------------------ attention_decode

_DEC_OPTIONS = "float scale, int[2] window=[-1, -1], float softcap=0.0, str backend='reference'"


def _decode_kwargs(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, scale, window, softcap) -> dict:
    return _softmax_extras(dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, k_new=k_new,
                                v_new=v_new, scale=float(scale)), window, softcap, block_table)


def _decode_fake(q, v_cache):
    B, Tq, H, _ = q.shape
    return q.new_empty(B, Tq, H, v_cache.shape[3])


@_op("attention_decode", "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
                         f"Tensor? block_table=None, *, {_DEC_OPTIONS}) -> Tensor")
def _attention_decode(q, k_cache, v_cache, cache_seqlens, block_table=None, *, scale, window=_NO_WINDOW,
                      softcap=0.0, backend="reference"):
    kw = _decode_kwargs(q, k_cache, v_cache, cache_seqlens, None, None, block_table, scale, window, softcap)
    with torch.no_grad():
        return _own(_fn("attention_decode", backend)(**kw), q, k_cache, v_cache)


@_attention_decode.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table=None, **_):
    return _decode_fake(q, v_cache)


@_op("attention_decode_append", "(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, "
                                f"Tensor k_new, Tensor v_new, Tensor? block_table=None, *, {_DEC_OPTIONS}) -> Tensor",
     mutates=("k_cache", "v_cache"))
def _attention_decode_append(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table=None, *, scale,
                             window=_NO_WINDOW, softcap=0.0, backend="reference"):
    kw = _decode_kwargs(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, scale, window, softcap)
    with torch.no_grad():
        return _own(_fn("attention_decode", backend)(**kw), q, k_cache, v_cache, k_new, v_new)


@_attention_decode_append.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table=None, **_):
    return _decode_fake(q, v_cache)


def _call_attention_decode(kw: dict, backend: str):
    opts = dict(scale=float(kw["scale"]), window=list(kw.get("window") or _NO_WINDOW),
                softcap=float(kw.get("softcap") or 0.0), backend=backend)
    args = (kw["q"], kw["k_cache"], kw["v_cache"], kw["cache_seqlens"])
    with torch.no_grad():  # inference only: the output never requires grad
        if kw["k_new"] is None:
            return _attention_decode(*args, kw.get("block_table"), **opts)
        return _attention_decode_append(*args, kw["k_new"], kw["v_new"], kw.get("block_table"), **opts)


CALLERS["attention_decode"] = _call_attention_decode


# --------------------------------------------------------------------------------------- qk_norm

_NORM_OPTIONS = "str mode='rms', float eps=1e-06, str backend='reference'"


@_op("qk_norm", f"(Tensor x, Tensor? weight=None, *, {_NORM_OPTIONS}) -> Tensor")
def _qk_norm(x, weight=None, *, mode="rms", eps=1e-6, backend="reference"):
    with torch.no_grad():
        return _own(_fn("qk_norm", backend)(x=x, weight=weight, mode=mode, eps=eps), x, weight)


@_qk_norm.register_fake
def _(x, weight=None, **_):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_op("qk_norm_backward", f"(Tensor dy, Tensor x, Tensor? weight=None, *, bool[2] needs, {_NORM_OPTIONS}) "
                         "-> Tensor[]")
def _qk_norm_backward(dy, x, weight=None, *, needs, mode="rms", eps=1e-6, backend="reference"):
    with _autograd_on():
        leaves = _leaves((x, weight), needs)
        y = _fn("qk_norm", backend)(x=leaves[0], weight=leaves[1], mode=mode, eps=eps)
        return _grads((y,), (dy,), leaves, needs)


@_qk_norm_backward.register_fake
def _(dy, x, weight=None, *, needs, **_):
    return _fake_grads((x, weight), needs)


def _qk_norm_bwd(ctx, dy):
    xs = ctx.saved_tensors
    return _as_grads(xs, ctx.needs, _qk_norm_backward(dy, *xs, needs=ctx.needs, **ctx.options))


_qk_norm.register_autograd(_qk_norm_bwd, setup_context=lambda ctx, inputs, keyword_only_inputs, output:
                           _save(ctx, inputs, keyword_only_inputs, 2))

CALLERS["qk_norm"] = lambda kw, backend: _qk_norm(kw["x"], kw["weight"], mode=kw["mode"], eps=kw["eps"],
                                                  backend=backend)


# ------------------------------------------------------------- chunked Triton kernels' residuals
#
# With the `triton` backend the forward ops of linear_attention / lightning_attention return,
# besides the outputs, what the backward kernels need (`_CHUNK_RESIDUALS`): the denominators
# (normalize), each segment's incoming state (`s_in`, `z_in`; non-causal: the sequence totals)
# and, for packed sequences, the segment tables. The backward op runs only the backward kernels on
# them. The segment length `SEG` is not an output: it is a function of the shapes and the device
# (`triton_chunk.segment_len`), recomputed in the backward and checked against `s_in`.

_CHUNK_RESIDUALS = "Tensor den, Tensor s_in, Tensor z_in, Tensor seg_info, Tensor seg_cu"


def _triton_chunk():
    from .ops.linear import triton_chunk

    return triton_chunk


def _chunk_plan_shape(q: Tensor, N: int, HS: int, varlen: bool) -> tuple[int, int, int]:
    """(SEG, NS, nseg) of `triton_chunk.plan_segments` from shapes alone."""
    tc = _triton_chunk()
    B, T = q.shape[0], q.shape[1]
    SEG = tc.segment_len(B * T, HS, tc.sm_count(q.device))
    if varlen:
        return SEG, 0, T // SEG + N
    NS = -(-T // SEG)
    return SEG, NS, N * NS


def _chunk_fwd(q, k, v, decay, h0, z0, cu_seqlens, *, scale, eps, feature_map, normalize, causal,
               output_final_state, state_heads):
    """The Triton chunked forward: `(o, S, z, den, s_in, z_in, seg_info, seg_cu)` (empty where absent)."""
    f32 = torch.float32
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    with torch.no_grad():
        o, ht, zt, den, s_in, z_in, plan = _triton_chunk().chunk_linear_fwd(
            qc, kc, vc, decay=decay, scale=float(scale), eps=float(eps), feature_map=feature_map, normalize=normalize,
            causal=causal, state_heads=state_heads, h0=h0.contiguous() if h0 is not None else None,
            z0=z0.contiguous() if z0 is not None else None, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, keep_fp32_output=False)
    ins = (q, k, v, decay, h0, z0)

    def out(x, *others, dtype=f32):
        if x is None:
            return _empty(q, dtype)
        if any(x is y for y in others):  # outputs never alias each other: non-causal s_in is the total
            x = x.clone()
        return _own(x, *ins)

    return (_own(o.to(q.dtype), *ins), out(ht), out(zt), out(den), out(s_in, ht), out(z_in, zt),
            out(plan.seg_info, dtype=torch.int32), out(plan.seg_cu, dtype=torch.int32))


def _chunk_fake(q, k, v, cu_seqlens, *, normalize, causal, output_final_state, state_heads):
    B, T, H, K = q.shape
    V, N, f32, i32 = v.shape[3], _n_seqs(q, cu_seqlens), torch.float32, torch.int32
    SEG, NS, nseg = _chunk_plan_shape(q, N, state_heads, cu_seqlens is not None)
    rows = nseg if causal else N
    S = q.new_empty(N, state_heads, K, V, dtype=f32) if output_final_state else _empty(q, f32)
    z = q.new_empty(N, state_heads, K, dtype=f32) if output_final_state and normalize else _empty(q, f32)
    den = q.new_empty(B, T, H, dtype=f32) if normalize else _empty(q, f32)
    s_in = q.new_empty(rows, state_heads, K, V, dtype=f32)
    z_in = q.new_empty(rows, state_heads, K, dtype=f32) if normalize else _empty(q, f32)
    seg_info = q.new_empty(nseg, 2, dtype=i32) if cu_seqlens is not None else _empty(q, i32)
    seg_cu = q.new_empty(N + 1, dtype=i32) if cu_seqlens is not None else _empty(q, i32)
    return q.new_empty(B, T, H, V), S, z, den, s_in, z_in, seg_info, seg_cu


def _chunk_bwd(do, dS, dz, q, k, v, decay, h0, z0, cu_seqlens, o, den, s_in, z_in, seg_info, seg_cu, *, scale,
               feature_map, normalize, causal, output_final_state, state_heads, need_dh0):
    """The Triton chunked backward on the forward op's residuals: `(dq, dk, dv, dh0, dz0)`."""
    tc = _triton_chunk()
    N = _n_seqs(q, cu_seqlens)
    SEG, NS, nseg = _chunk_plan_shape(q, N, state_heads, cu_seqlens is not None)
    if causal and s_in.shape[0] != nseg:
        raise RuntimeError(f"linear/lightning attention backward: the forward ran with {s_in.shape[0]} segments, "
                           f"the backward plans {nseg} (SEG = {SEG}): the segment length changed between "
                           "forward and backward (triton_chunk.force_segment_len or ATTNKIT_SM_COUNT)")
    varlen = cu_seqlens is not None
    plan = tc.SegmentPlan(SEG, NS, nseg, seg_info if varlen else None, seg_cu if varlen else None)
    dht = dS.contiguous() if output_final_state else None
    dzt = dz.contiguous() if output_final_state and normalize else None
    with torch.no_grad():
        return tc.chunk_linear_bwd(
            q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous(), dht, dzt, decay=decay, scale=float(scale),
            feature_map=feature_map, normalize=normalize, causal=causal, state_heads=state_heads,
            o=o if normalize else None, den=den if normalize else None, s_in=s_in, z_in=z_in if normalize else None,
            plan=plan, cu_seqlens=cu_seqlens, need_dh0=need_dh0)


def _fill_grads(xs, needs, got) -> list[Tensor]:
    """The backward op's list: the gradient where wanted (zeros if the kernels gave none), empty
    tensors elsewhere."""
    out = []
    for x, n, g in zip(xs, needs, got):
        if n and x is not None:
            out.append(torch.zeros_like(x) if g is None else g.to(x.dtype).contiguous())
        else:
            out.append(_empty(x) if x is not None else torch.empty(0))
    return out


# ------------------------------------------------------------------------------ linear_attention

_LIN_TENSORS = "Tensor q, Tensor k, Tensor v, Tensor? initial_state=None, Tensor? initial_z=None, " \
               "Tensor? cu_seqlens=None"
_LIN_OPTIONS = "bool causal=True, str? feature_map=None, bool normalize=False, float scale, float eps=1e-06, " \
               "bool output_final_state=False, str backend='reference'"


def _linear_kwargs(q, k, v, initial_state, initial_z, cu_seqlens, *, causal, feature_map, normalize, scale, eps,
                   output_final_state) -> dict:
    state = None
    if initial_state is not None:
        state = (initial_state, initial_z) if normalize else initial_state
    return dict(q=q, k=k, v=v, causal=causal, feature_map=feature_map, normalize=normalize, scale=float(scale),
                eps=float(eps), initial_state=state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def _linear_outputs(res, q: Tensor, normalize: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    o, state = res
    if state is None:
        return o, None, None
    return (o, *state) if normalize else (o, state, None)


@_op("linear_attention", f"({_LIN_TENSORS}, *, {_LIN_OPTIONS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
                         "Tensor, Tensor, Tensor)")
def _linear_attention(q, k, v, initial_state=None, initial_z=None, cu_seqlens=None, *, causal=True, feature_map=None,
                      normalize=False, scale, eps=1e-6, output_final_state=False, backend="reference"):
    """Outputs `(o, S, z, den, s_in, z_in, seg_info, seg_cu)`: the last five are the Triton
    backward's residuals (empty for the other backends)."""
    if backend == "triton":
        return _chunk_fwd(q, k, v, None, initial_state, initial_z, cu_seqlens, scale=scale, eps=eps,
                          feature_map=feature_map, normalize=normalize, causal=causal,
                          output_final_state=output_final_state, state_heads=k.shape[2])
    kw = _linear_kwargs(q, k, v, initial_state, initial_z, cu_seqlens, causal=causal, feature_map=feature_map,
                        normalize=normalize, scale=scale, eps=eps, output_final_state=output_final_state)
    with torch.no_grad():
        o, S, z = _linear_outputs(_fn("linear_attention", backend)(**kw), q, normalize)
    ins = (q, k, v, initial_state, initial_z)
    sd = _state_dtype(q.dtype)
    f32, i32 = torch.float32, torch.int32
    return (_own(o, *ins), _own(S, *ins) if S is not None else _empty(q, sd),
            _own(z, *ins) if z is not None else _empty(q, sd),
            _empty(q, f32), _empty(q, f32), _empty(q, f32), _empty(q, i32), _empty(q, i32))


def _n_seqs(q: Tensor, cu_seqlens: Tensor | None):
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@_linear_attention.register_fake
def _(q, k, v, initial_state=None, initial_z=None, cu_seqlens=None, *, causal=True, normalize=False,
      output_final_state=False, backend="reference", **_):
    if backend == "triton":
        return _chunk_fake(q, k, v, cu_seqlens, normalize=normalize, causal=causal,
                           output_final_state=output_final_state, state_heads=k.shape[2])
    f32, i32 = torch.float32, torch.int32
    rest = (_empty(q, f32), _empty(q, f32), _empty(q, f32), _empty(q, i32), _empty(q, i32))
    B, T, H, Dk = q.shape
    Hk, Dv, N, sd = k.shape[2], v.shape[3], _n_seqs(q, cu_seqlens), _state_dtype(q.dtype)
    o = q.new_empty(B, T, H, Dv)
    S = q.new_empty(N, Hk, Dk, Dv, dtype=sd) if output_final_state else _empty(q, sd)
    z = q.new_empty(N, Hk, Dk, dtype=sd) if output_final_state and normalize else _empty(q, sd)
    return (o, S, z, *rest)


@_op("linear_attention_backward", f"(Tensor do, Tensor dS, Tensor dz, Tensor o, {_CHUNK_RESIDUALS}, "
                                  f"{_LIN_TENSORS}, *, bool[5] needs, {_LIN_OPTIONS}) -> Tensor[]")
def _linear_attention_backward(do, dS, dz, o, den, s_in, z_in, seg_info, seg_cu, q, k, v, initial_state=None,
                               initial_z=None, cu_seqlens=None, *, needs, causal=True, feature_map=None,
                               normalize=False, scale, eps=1e-6, output_final_state=False, backend="reference"):
    """Gradients of the forward op: the `triton` backend runs its backward kernels on the
    forward's residuals; other backends rerun their forward with autograd on (docs/compile.md)."""
    xs = (q, k, v, initial_state, initial_z)
    if backend == "triton":
        dq, dk, dv, dh0, dz0 = _chunk_bwd(
            do, dS, dz, q, k, v, None, initial_state, initial_z, cu_seqlens, o, den, s_in, z_in, seg_info, seg_cu,
            scale=scale, feature_map=feature_map, normalize=normalize, causal=causal,
            output_final_state=output_final_state, state_heads=k.shape[2],
            need_dh0=initial_state is not None and bool(needs[3] or needs[4]))
        return _fill_grads(xs, needs, (dq, dk, dv, dh0, dz0))
    with _autograd_on():
        leaves = _leaves((q, k, v, initial_state, initial_z), needs)
        kw = _linear_kwargs(*leaves, cu_seqlens, causal=causal, feature_map=feature_map, normalize=normalize,
                            scale=scale, eps=eps, output_final_state=output_final_state)
        outs = _linear_outputs(_fn("linear_attention", backend)(**kw), q, normalize)
        return _grads(outs, (do, dS, dz), leaves, needs)


@_linear_attention_backward.register_fake
def _(do, dS, dz, o, den, s_in, z_in, seg_info, seg_cu, q, k, v, initial_state=None, initial_z=None, cu_seqlens=None, *, needs, **_):
    return _fake_grads((q, k, v, initial_state, initial_z), needs)


def _linear_bwd(ctx, do, dS, dz, *_residual_grads):
    *xs, o, den, s_in, z_in, seg_info, seg_cu = ctx.saved_tensors
    got = _linear_attention_backward(do, dS, dz, o, den, s_in, z_in, seg_info, seg_cu, *xs, needs=ctx.needs,
                                     **ctx.options)
    return (*_as_grads(xs[:5], ctx.needs, got), None)


_linear_attention.register_autograd(_linear_bwd, setup_context=lambda ctx, inputs, keyword_only_inputs, output:
                                    _save(ctx, (*inputs, output[0], *output[3:]), keyword_only_inputs, 5))


def _call_linear_attention(kw: dict, backend: str):
    state, normalize = kw["initial_state"], kw["normalize"]
    S0, z0 = (state if normalize else (state, None)) if state is not None else (None, None)
    o, S, z, *_ = _linear_attention(kw["q"], kw["k"], kw["v"], S0, z0, kw["cu_seqlens"], causal=kw["causal"],
                                feature_map=kw["feature_map"], normalize=normalize, scale=float(kw["scale"]),
                                eps=float(kw["eps"]), output_final_state=kw["output_final_state"], backend=backend)
    if not kw["output_final_state"]:
        return o, None
    return o, ((S, z) if normalize else S)


CALLERS["linear_attention"] = _call_linear_attention


# --------------------------------------------------------------------------- lightning_attention

_LIGHT_TENSORS = "Tensor q, Tensor k, Tensor v, Tensor? decay=None, Tensor? initial_state=None, " \
                 "Tensor? cu_seqlens=None"
_LIGHT_OPTIONS = "float scale, bool output_final_state=False, str backend='reference'"


def _lightning_kwargs(q, k, v, decay, initial_state, cu_seqlens, *, scale, output_final_state) -> dict:
    return dict(q=q, k=k, v=v, decay=decay, scale=float(scale), initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens)


@_op("lightning_attention", f"({_LIGHT_TENSORS}, *, {_LIGHT_OPTIONS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def _lightning_attention(q, k, v, decay=None, initial_state=None, cu_seqlens=None, *, scale,
                         output_final_state=False, backend="reference"):
    """Outputs `(o, S, s_in, seg_info, seg_cu)`: the last three are the Triton backward's
    residuals (empty for the other backends)."""
    if backend == "triton":
        o, S, _, _, s_in, _, seg_info, seg_cu = _chunk_fwd(
            q, k, v, decay, initial_state, None, cu_seqlens, scale=scale, eps=0.0, feature_map=None, normalize=False,
            causal=True, output_final_state=output_final_state, state_heads=q.shape[2])
        return o, S, s_in, seg_info, seg_cu
    kw = _lightning_kwargs(q, k, v, decay, initial_state, cu_seqlens, scale=scale,
                           output_final_state=output_final_state)
    with torch.no_grad():
        o, S = _fn("lightning_attention", backend)(**kw)
    ins = (q, k, v, decay, initial_state)
    return (_own(o, *ins), (_own(S, *ins) if S is not None else _empty(q, _state_dtype(q.dtype))),
            _empty(q, torch.float32), _empty(q, torch.int32), _empty(q, torch.int32))


@_lightning_attention.register_fake
def _(q, k, v, decay=None, initial_state=None, cu_seqlens=None, *, output_final_state=False, backend="reference", **_):
    if backend == "triton":
        o, S, _, _, s_in, _, seg_info, seg_cu = _chunk_fake(q, k, v, cu_seqlens, normalize=False, causal=True,
                                                           output_final_state=output_final_state,
                                                           state_heads=q.shape[2])
        return o, S, s_in, seg_info, seg_cu
    B, T, H, Dk = q.shape
    sd = _state_dtype(q.dtype)
    S = q.new_empty(_n_seqs(q, cu_seqlens), H, Dk, v.shape[3], dtype=sd) if output_final_state else _empty(q, sd)
    return (q.new_empty(B, T, H, v.shape[3]), S, _empty(q, torch.float32), _empty(q, torch.int32),
            _empty(q, torch.int32))


@_op("lightning_attention_backward", f"(Tensor do, Tensor dS, Tensor s_in, Tensor seg_info, Tensor seg_cu, "
                                     f"{_LIGHT_TENSORS}, *, bool[5] needs, {_LIGHT_OPTIONS}) -> Tensor[]")
def _lightning_attention_backward(do, dS, s_in, seg_info, seg_cu, q, k, v, decay=None, initial_state=None,
                                  cu_seqlens=None, *, needs, scale, output_final_state=False, backend="reference"):
    """Gradients of the forward op: the `triton` backend runs its backward kernels on the
    forward's residuals (no gradient for `decay`: the backend refuses that case); other backends
    rerun their forward with autograd on (docs/compile.md)."""
    if backend == "triton":
        xs = (q, k, v, decay, initial_state)
        dq, dk, dv, dh0, _ = _chunk_bwd(
            do, dS, None, q, k, v, decay, initial_state, None, cu_seqlens, None, None, s_in, None, seg_info, seg_cu,
            scale=scale, feature_map=None, normalize=False, causal=True, output_final_state=output_final_state,
            state_heads=q.shape[2], need_dh0=initial_state is not None and bool(needs[4]))
        return _fill_grads(xs, needs, (dq, dk, dv, None, dh0))
    with _autograd_on():
        leaves = _leaves((q, k, v, decay, initial_state), needs)
        kw = _lightning_kwargs(*leaves, cu_seqlens, scale=scale, output_final_state=output_final_state)
        o, S = _fn("lightning_attention", backend)(**kw)
        return _grads((o, S), (do, dS), leaves, needs)


@_lightning_attention_backward.register_fake
def _(do, dS, s_in, seg_info, seg_cu, q, k, v, decay=None, initial_state=None, cu_seqlens=None, *, needs, **_):
    return _fake_grads((q, k, v, decay, initial_state), needs)


def _lightning_bwd(ctx, do, dS, *_residual_grads):
    *xs, s_in, seg_info, seg_cu = ctx.saved_tensors
    got = _lightning_attention_backward(do, dS, s_in, seg_info, seg_cu, *xs, needs=ctx.needs, **ctx.options)
    return (*_as_grads(xs[:5], ctx.needs, got), None)


_lightning_attention.register_autograd(_lightning_bwd, setup_context=lambda ctx, inputs, keyword_only_inputs, output:
                                       _save(ctx, (*inputs, *output[2:]), keyword_only_inputs, 5))


def _call_lightning_attention(kw: dict, backend: str):
    o, S, *_ = _lightning_attention(kw["q"], kw["k"], kw["v"], kw["decay"], kw["initial_state"], kw["cu_seqlens"],
                                scale=float(kw["scale"]), output_final_state=kw["output_final_state"],
                                backend=backend)
    return o, (S if kw["output_final_state"] else None)


CALLERS["lightning_attention"] = _call_lightning_attention


# ------------------------------------------------------------------------- linear_attention_step


@_op("linear_attention_step", "(Tensor q, Tensor k, Tensor v, Tensor(a!) state, Tensor(b!)? z=None, "
                              "Tensor? decay=None, Tensor? state_indices=None, *, str recurrence, float scale, "
                              "str? feature_map=None, bool normalize=False, float eps=1e-06, "
                              "str backend='reference') -> Tensor", mutates=("state", "z"))
def _linear_attention_step(q, k, v, state, z=None, decay=None, state_indices=None, *, recurrence, scale,
                           feature_map=None, normalize=False, eps=1e-6, backend="reference"):
    with torch.no_grad():
        o = _fn("linear_attention_step", backend)(
            q=q, k=k, v=v, state=(state, z) if normalize else state, mode=recurrence, decay=decay, scale=float(scale),
            feature_map=feature_map, normalize=normalize, eps=float(eps), state_indices=state_indices)
    return _own(o, q, k, v, state, z)


@_linear_attention_step.register_fake
def _(q, k, v, state, z=None, decay=None, state_indices=None, **_):
    B, _, H, _ = q.shape
    return q.new_empty(B, 1, H, v.shape[3])


def _call_linear_attention_step(kw: dict, backend: str):
    normalize = kw["normalize"]
    S, z = kw["state"] if normalize else (kw["state"], None)
    with torch.no_grad():
        return _linear_attention_step(kw["q"], kw["k"], kw["v"], S, z, kw["decay"], kw["state_indices"],
                                      recurrence=kw["mode"], scale=float(kw["scale"]), feature_map=kw["feature_map"],
                                      normalize=normalize, eps=float(kw["eps"]), backend=backend)


CALLERS["linear_attention_step"] = _call_linear_attention_step


# ------------------------------------------------------------------------------------------ Loki

_LOKI_OPTIONS = "int rank, int top_k, float scale, str selection='head', str backend='reference'"


def _loki_fake(q, v_cache):
    B, _, H, _ = q.shape
    return q.new_empty(B, 1, H, v_cache.shape[3])


def _paged(kw: dict, block_table: Tensor | None) -> dict:
    """`block_table` (a paged Loki cache) reaches the backend only when set."""
    if block_table is not None:
        kw["block_table"] = block_table
    return kw


@_op("loki_attention_decode", "(Tensor q, Tensor k_cache_rot, Tensor v_cache, Tensor cache_seqlens, "
                              f"Tensor components, Tensor? block_table=None, *, {_LOKI_OPTIONS}) -> Tensor")
def _loki_attention_decode(q, k_cache_rot, v_cache, cache_seqlens, components, block_table=None, *, rank, top_k,
                           scale, selection="head", backend="reference"):
    with torch.no_grad():
        o = _fn("loki_attention_decode", backend)(**_paged(dict(
            q=q, k_cache_rot=k_cache_rot, v_cache=v_cache, cache_seqlens=cache_seqlens, components=components,
            rank=rank, top_k=top_k, scale=float(scale), selection=selection), block_table))
    return _own(o, q, k_cache_rot, v_cache)


@_loki_attention_decode.register_fake
def _(q, k_cache_rot, v_cache, cache_seqlens, components, block_table=None, **_):
    return _loki_fake(q, v_cache)


@_op("loki_attention_decode_lowrank", "(Tensor q, Tensor k_lowrank, Tensor k_cache_rot, Tensor v_cache, "
                                      "Tensor cache_seqlens, Tensor components, Tensor? block_table=None, *, "
                                      f"{_LOKI_OPTIONS}) -> Tensor")
def _loki_attention_decode_lowrank(q, k_lowrank, k_cache_rot, v_cache, cache_seqlens, components, block_table=None,
                                   *, rank, top_k, scale, selection="head", backend="reference"):
    with torch.no_grad():
        o = _fn("loki_attention_decode_lowrank", backend)(**_paged(dict(
            q=q, k_lowrank=k_lowrank, k_cache_rot=k_cache_rot, v_cache=v_cache, cache_seqlens=cache_seqlens,
            components=components, rank=rank, top_k=top_k, scale=float(scale), selection=selection), block_table))
    return _own(o, q, k_lowrank, k_cache_rot, v_cache)


@_loki_attention_decode_lowrank.register_fake
def _(q, k_lowrank, k_cache_rot, v_cache, cache_seqlens, components, block_table=None, **_):
    return _loki_fake(q, v_cache)


@_op("loki_cache_append", "(Tensor k_new, Tensor v_new, Tensor(a!) k_cache_rot, Tensor(b!) v_cache, "
                          "Tensor cache_seqlens, Tensor components, Tensor(c!)? k_lowrank=None, "
                          "Tensor? block_table=None, *, str backend='reference') -> ()",
     mutates=("k_cache_rot", "v_cache", "k_lowrank"))
def _loki_cache_append(k_new, v_new, k_cache_rot, v_cache, cache_seqlens, components, k_lowrank=None,
                       block_table=None, *, backend="reference"):
    with torch.no_grad():
        _fn("loki_cache_append", backend)(**_paged(dict(
            k_new=k_new, v_new=v_new, k_cache_rot=k_cache_rot, v_cache=v_cache, cache_seqlens=cache_seqlens,
            components=components, k_lowrank=k_lowrank), block_table))


@_loki_cache_append.register_fake
def _(*args, **kwargs):
    return None


def _loki_decode_args(kw: dict, backend: str) -> dict:
    return dict(rank=int(kw["rank"]), top_k=int(kw["top_k"]), scale=float(kw["scale"]), selection=kw["selection"],
                backend=backend)


def _call_loki_attention_decode(kw: dict, backend: str):
    with torch.no_grad():
        return _loki_attention_decode(kw["q"], kw["k_cache_rot"], kw["v_cache"], kw["cache_seqlens"],
                                      kw["components"], kw.get("block_table"), **_loki_decode_args(kw, backend))


def _call_loki_attention_decode_lowrank(kw: dict, backend: str):
    with torch.no_grad():
        return _loki_attention_decode_lowrank(kw["q"], kw["k_lowrank"], kw["k_cache_rot"], kw["v_cache"],
                                              kw["cache_seqlens"], kw["components"], kw.get("block_table"),
                                              **_loki_decode_args(kw, backend))


def _call_loki_cache_append(kw: dict, backend: str):
    with torch.no_grad():
        _loki_cache_append(kw["k_new"], kw["v_new"], kw["k_cache_rot"], kw["v_cache"], kw["cache_seqlens"],
                           kw["components"], kw["k_lowrank"], kw.get("block_table"), backend=backend)


CALLERS["loki_attention_decode"] = _call_loki_attention_decode
CALLERS["loki_attention_decode_lowrank"] = _call_loki_attention_decode_lowrank
CALLERS["loki_cache_append"] = _call_loki_cache_append


# ------------------------------------------------- backend-less public functions (no dispatch)
#
# loki_rotate, loki_calibrate, lightning_slopes and layer_decay are compositions of torch ops with
# no backend to choose, so they bypass dispatch.FastOp; they are ops all the same (SPEC: every
# public op), routed like dispatch.run routes the others: traced calls (and eager ones under
# ATTNKIT_EAGER_CUSTOM_OPS=1) go through torch.ops.attnkit.<name>, plain eager calls run the
# implementation directly (the same function the op runs, so the results are the same bits).


def through_op(*tensors: Tensor | None) -> bool:
    """Whether a public function outside the dispatcher calls its ``torch.ops.attnkit`` op rather
    than its implementation: under torch.compile/export, an active fake/proxy/functionalization
    mode, tensor-subclass inputs (as :func:`attnkit.dispatch.run`), or ATTNKIT_EAGER_CUSTOM_OPS=1."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    if dispatch._env_key()[3] in (b"1", "1"):  # env[3]: ATTNKIT_EAGER_CUSTOM_OPS
        return True
    return dispatch._traced(dict(enumerate(tensors)))


def _loki_api():
    from .ops.loki import api

    return api


def _linear_api():
    from .ops.linear import api

    return api


@_op("loki_rotate", "(Tensor x, Tensor components) -> Tensor")
def _loki_rotate(x, components):
    """`x [..., Hk, D] @ components[h]` per KV head, in x's dtype (the public function validates)."""
    with torch.no_grad():
        return _own(_loki_api()._rotate(x, components), x, components)


@_loki_rotate.register_fake
def _(x, components):
    return x.new_empty(x.shape)


def _loki_rotate_setup(ctx, inputs, output):
    x, components = inputs
    ctx.save_for_backward(x, components)


def _loki_rotate_bwd(ctx, grad):
    """The rotation is bilinear: dx = g @ C^T per head, dC = sum over the leading dims of x^T g,
    computed in the forward's compute dtype and returned in each input's dtype (what autograd
    through the eager einsum gives). Plain torch ops, so it traces and double-differentiates."""
    x, components = ctx.saved_tensors
    cd = _loki_api().reference.compute_dtype(x.dtype)
    g = grad.to(cd)
    dx = dc = None
    if ctx.needs_input_grad[0]:
        dx = torch.einsum("...he,hde->...hd", g, components.to(cd)).to(x.dtype)
    if ctx.needs_input_grad[1]:
        dc = torch.einsum("...hd,...he->hde", x.to(cd), g).to(components.dtype)
    return dx, dc


_loki_rotate.register_autograd(_loki_rotate_bwd, setup_context=_loki_rotate_setup)


@_op("loki_calibrate", "(Tensor keys, *, bool center, ScalarType dtype) -> (Tensor, Tensor, Tensor)")
def _loki_calibrate(keys, *, center, dtype):
    """`(components [Hk, D, D], explained_variance_ratio [Hk, D], mean [Hk, D] or empty)` in
    `dtype`. Not differentiable (the public function passes detached keys): no autograd."""
    with torch.no_grad():
        components, ratio, mean = _loki_api()._calibrate(keys, center, dtype)
    return (_own(components, keys), _own(ratio, keys),
            _own(mean, keys) if mean is not None else _empty(keys, dtype))


@_loki_calibrate.register_fake
def _(keys, *, center, dtype):
    _, hk, d = keys.shape
    return (keys.new_empty(hk, d, d, dtype=dtype), keys.new_empty(hk, d, dtype=dtype),
            keys.new_empty(hk, d, dtype=dtype) if center else _empty(keys, dtype))


@_op("lightning_slopes", "(int num_heads) -> Tensor")
def _lightning_slopes(num_heads):
    """float32 `[num_heads]` on the CPU (the public function has no device argument)."""
    return _linear_api()._lightning_slopes(num_heads)


@_lightning_slopes.register_fake
def _(num_heads):
    return torch.empty(num_heads, dtype=torch.float32)


@_op("layer_decay", "(Tensor slopes, int layer_idx, int num_layers) -> Tensor")
def _layer_decay(slopes, layer_idx, num_layers):
    """float32, the shape of `slopes` (contiguous)."""
    with torch.no_grad():
        return _own(_linear_api()._layer_decay(slopes, layer_idx, num_layers), slopes)


@_layer_decay.register_fake
def _(slopes, layer_idx, num_layers):
    return slopes.new_empty(slopes.shape, dtype=torch.float32)


def _layer_decay_setup(ctx, inputs, output):
    slopes, layer_idx, num_layers = inputs
    ctx.factor = _linear_api()._depth_factor(layer_idx, num_layers)
    ctx.slopes_dtype = slopes.dtype


def _layer_decay_bwd(ctx, grad):
    """d/dslopes of `slopes.to(float32) * factor`: `(g * factor)` back in slopes' dtype."""
    ds = (grad * ctx.factor).to(ctx.slopes_dtype) if ctx.needs_input_grad[0] else None
    return ds, None, None


_layer_decay.register_autograd(_layer_decay_bwd, setup_context=_layer_decay_setup)
