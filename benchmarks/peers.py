"""Adapters for peer libraries: one small function per peer and op.

Each adapter takes a :class:`Case` (attnkit-layout inputs already built) and returns a
:class:`Runner`, or raises :class:`Unavailable` with the reason (package not installed, device,
dtype, shape it cannot run). Layout conversions a peer needs (head-first copies) are made here,
outside the timed region, as fresh leaf tensors. Every import is guarded.

Signatures verified against the peers' sources (see docs/benchmarks.md, "Peers"):
* ``torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0,
  is_causal=False, scale=None, enable_gqa=False)`` on ``[B, H, T, D]``; ``is_causal`` is
  top-left aligned, so it matches attnkit's bottom-right rule only when ``T == S``.
* flash-attn 2 ``flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, ...)``
  on ``[B, T, H, D]`` with native GQA and bottom-right causal alignment; and
  ``flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, ..., cache_seqlens=None, ...,
  softmax_scale=None, causal=False, ...)`` (no backward).
* flash-linear-attention ``fla.ops.simple_gla.chunk_simple_gla(q, k, v, g=None, g_gamma=None,
  scale=None, initial_state=None, output_final_state=False, ...)`` on ``[B, T, H, K]`` with
  ``g_gamma [H]`` the per-head log decay; ``fla.ops.lightning_attn.chunk_lightning_attn(q, k, v,
  layer_idx, num_layers, scale=None, ...)`` (its own decay: ``g_gamma = -(8/H)·(1 - l/L)·h``);
  ``fla.ops.linear_attn.chunk_linear_attn(q, k, v, scale=None, initial_state=None,
  output_final_state=False, normalize=True, ...)``. All return ``(o, final_state)``; none has GQA.
* lightning-attn ``lightning_attn.ops.lightning_attn_func(q, k, v, s)`` on head-first
  ``[B, H, T, D]`` with ``s`` the per-head decay rate (``λ = exp(-s)``), no scale; power-of-two
  head dims up to 128 on the single-kernel path; no GQA.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import models
from .case import Case, Runner, Unavailable, fresh_leaf, primary

HALF = (torch.float16, torch.bfloat16)


def _import(module: str, attr: str):
    """``module.attr``, or Unavailable naming the package (any import error counts)."""
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as e:  # ImportError, but also broken installs (e.g. a Triton mismatch)
        raise Unavailable(f"{module}.{attr} cannot be imported ({type(e).__name__}: {e})") from None


def _need_cuda(case: Case) -> None:
    if case.device.type != "cuda":
        raise Unavailable(f"runs on CUDA tensors only, got {case.device.type}")


def _need_half(case: Case) -> None:
    if case.dtype not in HALF:
        raise Unavailable(f"runs in float16/bfloat16 only, got {str(case.dtype).replace('torch.', '')}")


def _need_mha(case: Case) -> None:
    if case["Hk"] != case["H"]:
        raise Unavailable(f"has no GQA (needs Hk == H, got H={case['H']}, Hk={case['Hk']})")


def _probe(runner: Runner, case: Case) -> Runner:
    """Run once (untimed) so a shape the peer rejects becomes Unavailable instead of a crash.

    Warnings raised meanwhile are kept out of the output; the first one joins the reason (SDPA
    says why a pinned backend cannot run only in a warning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = runner.fn()
            if case.grad:
                o = primary(out)
                o.backward(torch.randn_like(o))
                for t in runner.leaves:
                    t.grad = None
        except (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError) as e:
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason = f"cannot run this case ({type(e).__name__}: {first[:160]})"
            if caught:
                reason += f"; {str(caught[0].message).strip().splitlines()[0][:160]}"
            raise Unavailable(reason) from None
    return runner


# ------------------------------------------------------------------------------------------ SDPA

SDPA_BACKENDS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}


def _sdpa_fn(q, k, v, *, causal: bool, scale: float, backend: str | None):
    """SDPA on attnkit-layout tensors (transposed views, as models call it), output [B, H, T, Dv]."""
    gqa = q.shape[2] != k.shape[2]

    def call():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal, scale=scale, enable_gqa=gqa)

    if backend is None:
        return call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = getattr(SDPBackend, backend)

    def pinned():
        with sdpa_kernel(which):
            return call()

    return pinned


def _sdpa_prefill(case: Case, backend: str | None, name: str) -> Runner:
    if backend is not None:
        _need_cuda(case)
    if case["causal"] and case["T"] != case["S"]:
        raise Unavailable("SDPA's is_causal is top-left aligned; it equals attnkit's bottom-right rule "
                          "only for T == S")
    t = case.tensors
    fn = _sdpa_fn(t["q"], t["k"], t["v"], causal=case["causal"], scale=case["scale"], backend=backend)
    return _probe(Runner(name, fn, (t["q"], t["k"], t["v"])), case)


def sdpa_attention(backend: str | None, name: str) -> Callable[[Case], Runner]:
    return lambda case: _sdpa_prefill(case, backend, name)


def causal_softmax_model(case: Case) -> tuple[float, float, int]:
    """FLOPs and bytes of causal softmax attention on a linear op's q, k, v (T == S)."""
    B, T, H, Hk, D, Dv = (case[k] for k in ("B", "T", "H", "Hk", "D", "Dv"))
    return (models.attention_flops(B, H, T, T, D, Dv, True, case.mode),
            models.attention_bytes(B, H, Hk, T, T, D, Dv, case.dtype, case.mode), B * T)


def dense_decode_model(case: Case) -> tuple[float, float, int]:
    """FLOPs and bytes of dense decoding over the whole valid cache."""
    B, S, H, Hk, D, Dv, Tq = (case[k] for k in ("B", "S", "H", "Hk", "D", "Dv", "Tq"))
    return (models.decode_flops(B, H, Tq, S, D, Dv), models.decode_bytes(B, H, Hk, Tq, S, D, Dv, case.dtype),
            B * Tq)


def sdpa_linear_crossover(case: Case) -> Runner:
    """Causal softmax SDPA on the same q, k, v: where quadratic attention stops being cheaper."""
    t = case.tensors
    fn = _sdpa_fn(t["q"], t["k"], t["v"], causal=True, scale=case["scale"], backend=None)
    return _probe(Runner("sdpa", fn, (t["q"], t["k"], t["v"]), note="softmax crossover",
                         model=causal_softmax_model), case)


def sdpa_rms_norm(case: Case) -> Runner:
    """Unfused QK-norm: ``F.rms_norm`` on q and k, then SDPA."""
    if case["qk_norm"] != "rms":
        raise Unavailable(f"only for qk_norm='rms', got {case['qk_norm']!r}")
    if case["causal"] and case["T"] != case["S"]:
        raise Unavailable("SDPA's is_causal is top-left aligned; needs T == S")
    t = case.tensors
    q, k, v, wq, wk = t["q"], t["k"], t["v"], t["q_norm_weight"], t["k_norm_weight"]
    D, eps = q.shape[-1], case["norm_eps"]
    gqa = q.shape[2] != k.shape[2]

    def fn():
        qn = F.rms_norm(q, (D,), wq, eps).transpose(1, 2)
        kn = F.rms_norm(k, (D,), wk, eps).transpose(1, 2)
        return F.scaled_dot_product_attention(qn, kn, v.transpose(1, 2), is_causal=case["causal"],
                                              scale=case["scale"], enable_gqa=gqa)

    return _probe(Runner("sdpa+rms_norm", fn, (q, k, v, wq, wk)), case)


def sdpa_decode(case: Case) -> Runner:
    """Dense SDPA over the valid part of the cache (every row has the same length here)."""
    t = case.tensors
    if case["Tq"] != 1:
        raise Unavailable("SDPA's causal mask is top-left aligned; only Tq == 1 decodes correctly")
    q, kc, vc, L = t["q"], t["k_cache"], t["v_cache"], case["S"]
    gqa = q.shape[2] != kc.shape[2]
    k, v = kc[:, :L], vc[:, :L]

    def fn():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              scale=case["scale"], enable_gqa=gqa)

    return _probe(Runner("sdpa", fn, model=dense_decode_model), case)


# ------------------------------------------------------------------------------------ flash-attn


def flash_attn(case: Case) -> Runner:
    _need_cuda(case)
    _need_half(case)
    func = _import("flash_attn", "flash_attn_func")
    t = case.tensors
    q, k, v = t["q"], t["k"], t["v"]

    def fn():
        return func(q, k, v, softmax_scale=case["scale"], causal=case["causal"])

    return _probe(Runner("flash_attn", fn, (q, k, v)), case)


def flash_attn_decode(case: Case) -> Runner:
    _need_cuda(case)
    _need_half(case)
    func = _import("flash_attn", "flash_attn_with_kvcache")
    t = case.tensors
    q, kc, vc, lens = t["q"], t["k_cache"], t["v_cache"], t["cache_seqlens"]

    def fn():
        return func(q, kc, vc, cache_seqlens=lens, softmax_scale=case["scale"], causal=True)

    return _probe(Runner("flash_attn", fn, model=dense_decode_model), case)


# ------------------------------------------------------------------------ flash-linear-attention


def _fla_common(case: Case) -> None:
    _need_cuda(case)
    _need_mha(case)


def fla_simple_gla(case: Case) -> Runner:
    """Lightning attention as simple GLA with a constant per-head log decay ``g_gamma = -decay``."""
    _fla_common(case)
    func = _import("fla.ops.simple_gla", "chunk_simple_gla")
    t = case.tensors
    q, k, v = t["q"], t["k"], t["v"]
    g_gamma = -t["decay"].float()

    def fn():
        return func(q, k, v, g_gamma=g_gamma, scale=case["scale"])

    return _probe(Runner("fla-simple_gla", fn, (q, k, v)), case)


def fla_lightning(case: Case) -> Runner:
    _fla_common(case)
    func = _import("fla.ops.lightning_attn", "chunk_lightning_attn")
    t = case.tensors
    q, k, v = t["q"], t["k"], t["v"]

    def fn():
        return func(q, k, v, layer_idx=0, num_layers=1, scale=case["scale"])

    return _probe(Runner("fla-lightning", fn, (q, k, v), note="fla's own decay rates"), case)


def fla_linear(case: Case) -> Runner:
    _fla_common(case)
    if case["T"] < case["H"]:
        raise Unavailable("chunk_linear_attn refuses T < H (it takes that for a head-first layout)")
    if case.shape.get("feature_map") is not None:
        raise Unavailable("chunk_linear_attn has no feature map")
    func = _import("fla.ops.linear_attn", "chunk_linear_attn")
    t = case.tensors
    q, k, v = t["q"], t["k"], t["v"]

    def fn():
        return func(q, k, v, scale=case["scale"], normalize=case["normalize"])

    return _probe(Runner("fla-linear", fn, (q, k, v)), case)


# --------------------------------------------------------------------------------- lightning-attn


def lightning_attn(case: Case) -> Runner:
    _need_cuda(case)
    _need_mha(case)
    D = case["D"]
    if D > 128 or D & (D - 1):
        raise Unavailable(f"needs a power-of-two head dim <= 128, got D={D}")
    func = _import("lightning_attn.ops", "lightning_attn_func")
    t = case.tensors
    # Head-first contiguous copies, made untimed; lightning-attn applies no scale: fold it into q.
    q = fresh_leaf((t["q"] * case["scale"]).transpose(1, 2), case.grad)
    k = fresh_leaf(t["k"].transpose(1, 2), case.grad)
    v = fresh_leaf(t["v"].transpose(1, 2), case.grad)
    s = t["decay"].float().contiguous()

    def fn():
        return func(q, k, v, s)

    return _probe(Runner("lightning_attn", fn, (q, k, v)), case)


# --------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Peer:
    name: str
    make: Callable[[Case], Runner]
    cuda_only: bool = False


def peers_for(op: str) -> list[Peer]:
    """The peers that implement (or give a crossover point for) an op, in column order."""
    sdpa_variants = [Peer(name, sdpa_attention(backend, name), cuda_only=True)
                     for name, backend in SDPA_BACKENDS.items()]
    table: dict[str, list[Peer]] = {
        "attention": [Peer("sdpa", sdpa_attention(None, "sdpa")), *sdpa_variants,
                      Peer("flash_attn", flash_attn, cuda_only=True)],
        "qk_norm_attention": [Peer("sdpa+rms_norm", sdpa_rms_norm)],
        "lightning_attention": [Peer("fla-simple_gla", fla_simple_gla, cuda_only=True),
                                Peer("fla-lightning", fla_lightning, cuda_only=True),
                                Peer("lightning_attn", lightning_attn, cuda_only=True),
                                Peer("sdpa", sdpa_linear_crossover)],
        "linear_attention": [Peer("fla-linear", fla_linear, cuda_only=True),
                             Peer("sdpa", sdpa_linear_crossover)],
        "attention_decode": [Peer("sdpa", sdpa_decode), Peer("flash_attn", flash_attn_decode, cuda_only=True)],
        "loki_decode": [Peer("sdpa", sdpa_decode), Peer("flash_attn", flash_attn_decode, cuda_only=True)],
        "linear_attention_step": [],
    }
    return table[op]


ALL_PEERS = sorted({p.name for op in ("attention", "qk_norm_attention", "lightning_attention",
                                      "linear_attention", "attention_decode", "loki_decode")
                    for p in peers_for(op)})
