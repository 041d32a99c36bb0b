"""Calls of the public ops at GPU-like shapes, built on meta tensors (no memory, no values), for
the launch recorder: the audit's case list and the launch planner's single call.

A call is described by `op`, `mode`, `dtype`, a shape dict and flags; :func:`make_call` turns it
into a zero-argument function that runs the public op (forward, and the backward through
autograd for `bwd`/`fwd+bwd`), marking the phase of every launch (`fwd` / `bwd`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

#: Public ops with Triton kernels, and their modes.
OPS: dict[str, tuple[str, ...]] = {
    "attention": ("fwd", "bwd", "fwd+bwd"),
    "attention_decode": ("decode",),
    "qk_norm": ("fwd", "bwd", "fwd+bwd"),
    "linear_attention": ("fwd", "bwd", "fwd+bwd"),
    "lightning_attention": ("fwd", "bwd", "fwd+bwd"),
    "linear_attention_step": ("decode",),
    "loki_attention_decode": ("decode",),
    "loki_cache_append": ("decode",),
    "loki_cache_attend": ("decode",),
}

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}

SHORT_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass
class Case:
    """One public call; `quick` cases form the CI audit; `optional` ones may name a feature that is
    not implemented yet (their failure is reported as skipped, not as an error)."""

    op: str
    mode: str
    dtype: torch.dtype
    shape: dict[str, int]
    flags: dict[str, Any] = field(default_factory=dict)
    quick: bool = False
    optional: bool = False

    @property
    def head_dim(self) -> int:
        return self.shape.get("D", 0)

    @property
    def name(self) -> str:
        shape = ",".join(f"{k}={v}" for k, v in self.shape.items())
        flags = "".join(f" {k}={v}" for k, v in self.flags.items())
        return f"{self.op} {self.mode} {SHORT_DTYPE[self.dtype]} {shape}{flags}"


# ----------------------------------------------------------------------------------- shapes


def parse_shape(text: str) -> dict[str, int]:
    """`"B=2,T=16384,H=16,D=128"` -> dict; keys are case-sensitive names, values positive ints."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"shape entries must look like NAME=INT, got {part!r} in {text!r}")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise ValueError(f"shape entry {part!r} must have an integer value") from None
        if out[key.strip()] < 0:
            raise ValueError(f"shape entry {part!r} must not be negative")
    return out


def parse_flags(text: str) -> dict[str, Any]:
    """`"causal=false,norm=rms"` -> `{"causal": False, "norm": "rms"}` (ints, floats, bools, none)."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"flags must look like NAME=VALUE, got {part!r}")
        low = value.strip().lower()
        if low in ("true", "false"):
            out[key.strip()] = low == "true"
        elif low in ("none", "null"):
            out[key.strip()] = None
        else:
            try:
                out[key.strip()] = int(value)
            except ValueError:
                try:
                    out[key.strip()] = float(value)
                except ValueError:
                    out[key.strip()] = value.strip()
    return out


_ALLOWED_FLAGS = {
    "attention": {"causal", "norm", "norm_weight", "varlen", "return_lse", "window", "softcap"},
    "attention_decode": {"append", "softcap", "window", "paged"},
    "qk_norm": {"mode", "weight"},
    "linear_attention": {"causal", "normalize", "feature_map", "initial_state", "final_state"},
    "lightning_attention": {"decay", "initial_state", "final_state"},
    "linear_attention_step": {"lightning", "normalize", "feature_map"},
    "loki_attention_decode": {"selection", "paged"},
    "loki_cache_append": {"paged"},
    "loki_cache_attend": {"selection", "paged"},
}


def _check(op: str, mode: str, flags: dict) -> None:
    if op not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
    if mode not in OPS[op]:
        raise ValueError(f"mode of {op} must be one of {OPS[op]}, got {mode!r}")
    unknown = set(flags) - _ALLOWED_FLAGS[op]
    if unknown:
        raise ValueError(f"unknown flags for {op}: {sorted(unknown)}; known: {sorted(_ALLOWED_FLAGS[op])}")


# ------------------------------------------------------------------------------------ calls


def _t(*shape, dtype, device, grad=False):
    x = torch.empty(*shape, dtype=dtype, device=device)
    return x.requires_grad_(grad)


def _basis(hk: int, d: int, device):
    """An orthonormal basis (values do not matter to the recorder; the structure does)."""
    from ..ops.loki import LokiBasis

    eye = torch.eye(d).expand(hk, d, d).contiguous()
    ratio = torch.full((hk, d), 1.0 / d)
    return LokiBasis(eye, ratio, None).to(device) if device != "cpu" else LokiBasis(eye, ratio, None)


def make_call(op: str, mode: str, dtype: torch.dtype, shape: dict[str, int], flags: dict[str, Any] | None = None,
              device: str = "meta") -> Callable[[], Any]:
    """A zero-argument function that calls public op `op` once in `mode` (see :data:`OPS`).

    Shape keys (defaults in brackets): `B` [1], `T` [1024] query length, `S` [T] key length (cache
    capacity `Smax` for decode ops), `L` [S - Tq] cached tokens per row (decode), `Tq` [1] new
    query tokens (decode), `H` [16], `Hk` [H] KV heads, `D` [128], `Dv` [D], `N` [2] sequences
    when `varlen`, `rank` [D // 4] and `top_k` [S // 8] (Loki).
    """
    import attnkit

    flags = dict(flags or {})
    _check(op, mode, flags)
    B, T, H = shape.get("B", 1), shape.get("T", 1024), shape.get("H", 16)
    S, Hk, D = shape.get("S", T), shape.get("Hk", H), shape.get("D", 128)
    Dv = shape.get("Dv", D)
    grad = mode in ("bwd", "fwd+bwd")
    kw = dict(dtype=dtype, device=device)

    def with_backward(forward: Callable[[], Any], leaves: list[torch.Tensor]) -> Callable[[], Any]:
        def call():
            from ._recorder import set_phase

            set_phase("fwd")
            out = forward()
            outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                    if isinstance(o, torch.Tensor) and o.requires_grad]
            if grad:
                set_phase("setup")  # the incoming gradients are inputs, not allocations of the op
                grads = [torch.empty_like(o) for o in outs]
                set_phase("bwd")
                torch.autograd.backward(outs, grads)
                set_phase("fwd")
            return out
        call.leaves = leaves  # their .grad are the op's outputs too (launch_plan tells them apart)
        return call

    if op == "attention":
        q, k, v = _t(B, T, H, D, **kw, grad=grad), _t(B, S, Hk, D, **kw, grad=grad), _t(B, S, Hk, Dv, **kw, grad=grad)
        extra: dict[str, Any] = {}
        norm = flags.get("norm")
        if norm is not None:
            extra["qk_norm"] = norm
            if flags.get("norm_weight", True):
                extra["q_norm_weight"] = _t(D, dtype=torch.float32, device=device, grad=grad)
                extra["k_norm_weight"] = _t(D, dtype=torch.float32, device=device, grad=grad)
        if flags.get("varlen"):
            n = shape.get("N", 2)
            q, k, v = (_t(1, B * T, H, D, **kw, grad=grad), _t(1, B * S, Hk, D, **kw, grad=grad),
                       _t(1, B * S, Hk, Dv, **kw, grad=grad))
            extra["cu_seqlens_q"] = torch.linspace(0, B * T, n + 1, device="cpu").to(torch.int32).to(device)
            extra["cu_seqlens_k"] = torch.linspace(0, B * S, n + 1, device="cpu").to(torch.int32).to(device)
        for name in ("window", "softcap"):
            if name in flags:
                extra[name] = flags[name]
        if flags.get("return_lse"):
            extra["return_lse"] = True
        leaves = [q, k, v, *(x for x in extra.values() if isinstance(x, torch.Tensor) and x.requires_grad)]
        return with_backward(lambda: attnkit.attention(q, k, v, causal=flags.get("causal", True), backend="triton",
                                                       **extra), leaves)

    if op == "qk_norm":
        x = _t(B, T, H, D, **kw, grad=grad)
        w = _t(D, dtype=torch.float32, device=device, grad=grad) if flags.get("weight", True) else None
        return with_backward(lambda: attnkit.qk_norm(x, w, mode=flags.get("mode", "rms"), backend="triton"), [x])

    if op == "linear_attention":
        q, k, v = _t(B, T, H, D, **kw, grad=grad), _t(B, T, Hk, D, **kw, grad=grad), _t(B, T, Hk, Dv, **kw, grad=grad)
        normalize = flags.get("normalize", False)
        init = None
        if flags.get("initial_state"):
            s0 = _t(B, Hk, D, Dv, dtype=torch.float32, device=device, grad=grad)
            init = (s0, _t(B, Hk, D, dtype=torch.float32, device=device, grad=grad)) if normalize else s0
        return with_backward(lambda: attnkit.linear_attention(
            q, k, v, causal=flags.get("causal", True), feature_map=flags.get("feature_map"), normalize=normalize,
            initial_state=init, output_final_state=flags.get("final_state", False), backend="triton"), [q, k, v])

    if op == "lightning_attention":
        q, k, v = _t(B, T, H, D, **kw, grad=grad), _t(B, T, Hk, D, **kw, grad=grad), _t(B, T, Hk, Dv, **kw, grad=grad)
        decay = attnkit.lightning_slopes(H).to(device) if flags.get("decay", True) else None
        init = _t(B, H, D, Dv, dtype=torch.float32, device=device, grad=grad) if flags.get("initial_state") else None
        return with_backward(lambda: attnkit.lightning_attention(
            q, k, v, decay, initial_state=init, output_final_state=flags.get("final_state", False),
            backend="triton"), [q, k, v])

    if op == "linear_attention_step":
        q, k, v = _t(B, 1, H, D, **kw), _t(B, 1, Hk, D, **kw), _t(B, 1, Hk, Dv, **kw)
        if flags.get("lightning"):
            state = _t(B, H, D, Dv, dtype=torch.float32, device=device)
            return lambda: attnkit.linear_attention_step(q, k, v, state, decay=attnkit.lightning_slopes(H).to(device),
                                                         backend="triton")
        normalize = flags.get("normalize", False)
        s = _t(B, Hk, D, Dv, dtype=torch.float32, device=device)
        state = (s, _t(B, Hk, D, dtype=torch.float32, device=device)) if normalize else s
        return lambda: attnkit.linear_attention_step(q, k, v, state, normalize=normalize,
                                                     feature_map=flags.get("feature_map"), backend="triton")

    Tq = shape.get("Tq", 1)
    L = shape.get("L", max(0, S - Tq))
    if op == "attention_decode":
        q = _t(B, Tq, H, D, **kw)
        kc, vc = _t(B, S, Hk, D, **kw), _t(B, S, Hk, Dv, **kw)
        seqlens = torch.full((B,), L, dtype=torch.int32, device=device)
        extra = {}
        if flags.get("append", True):
            extra = dict(k_new=_t(B, Tq, Hk, D, **kw), v_new=_t(B, Tq, Hk, Dv, **kw))
        for name in ("window", "softcap"):
            if name in flags:
                extra[name] = flags[name]
        if flags.get("paged"):
            page = flags["paged"] if isinstance(flags["paged"], int) and flags["paged"] > 1 else 256
            n_blocks = -(-S // page)
            kc, vc = _t(B * n_blocks, page, Hk, D, **kw), _t(B * n_blocks, page, Hk, Dv, **kw)
            extra["block_table"] = torch.arange(B * n_blocks, dtype=torch.int32).reshape(B, n_blocks).to(device)
        return lambda: attnkit.attention_decode(q, kc, vc, seqlens, backend="triton", **extra)

    rank, top_k = shape.get("rank", max(1, D // 4)), shape.get("top_k", max(1, S // 8))
    basis = _basis(Hk, D, device)
    seqlens = torch.full((B,), L, dtype=torch.int32, device=device)
    # paged=N: caches of B * ceil(S / N) blocks of N tokens, each row its own blocks
    page = flags["paged"] if isinstance(flags.get("paged"), int) and flags["paged"] > 1 else (
        256 if flags.get("paged") else 0)
    paging: dict[str, Any] = {}
    n0, n1 = B, S
    if page:
        n_blocks = -(-S // page)
        n0, n1 = B * n_blocks, page
        paging["block_table"] = torch.arange(B * n_blocks, dtype=torch.int32).reshape(B, n_blocks).to(device)
    if op == "loki_attention_decode":
        q, kc, vc = _t(B, 1, H, D, **kw), _t(n0, n1, Hk, D, **kw), _t(n0, n1, Hk, Dv, **kw)
        return lambda: attnkit.loki_attention_decode(q, kc, vc, seqlens, basis, rank=rank, top_k=top_k,
                                                     selection=flags.get("selection", "head"), backend="triton",
                                                     **paging)
    from ..ops.loki.cache import loki_attention_decode_lowrank, loki_cache_append

    kc, vc = _t(n0, n1, Hk, D, **kw), _t(n0, n1, Hk, Dv, **kw)
    k_low = _t(n0, Hk, n1, rank, **kw)
    if op == "loki_cache_append":
        k_new, v_new = _t(B, Tq, Hk, D, **kw), _t(B, Tq, Hk, Dv, **kw)
        return lambda: loki_cache_append(k_new, v_new, kc, vc, seqlens, basis, k_lowrank=k_low, backend="triton",
                                         **paging)
    q = _t(B, 1, H, D, **kw)
    return lambda: loki_attention_decode_lowrank(q, k_low, kc, vc, seqlens, basis, rank=rank, top_k=top_k,
                                                 selection=flags.get("selection", "head"), backend="triton",
                                                 **paging)


# ------------------------------------------------------------------------------- audit cases

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def audit_cases(quick: bool) -> list[Case]:
    """The audit's calls. Quick: the hot kernels at head dim 128 in bfloat16 (CI); full: every
    kernel family at head dims 64/128/256, bf16/fp16/fp32 and the flags that change the kernel."""
    cases: list[Case] = []

    def add(op, mode, dtype, shape, flags=None, *, hot=False, optional=False):
        c = Case(op, mode, dtype, dict(shape), dict(flags or {}), quick=hot, optional=optional)
        if (not quick or hot) and all(c.name != x.name for x in cases):
            cases.append(c)

    train = dict(B=1, T=1024, H=16, Hk=4)
    dec = dict(B=8, S=65536, H=32, Hk=8)
    # softmax attention (prefill / training)
    # the cases the softmax AUDIT_REQUIREMENTS name (triton_attention.py): bf16, D = 64/128, plain
    # and RMS QK-norm (with weights)
    for d in (64, 128):
        add("attention", "fwd+bwd", BF16, {**train, "D": d}, {"causal": True}, hot=True)
        add("attention", "fwd+bwd", BF16, {**train, "D": d}, {"causal": True, "norm": "rms"}, hot=True)
    for dtype in (BF16, FP16, FP32):
        for d in (64, 128, 256):
            add("attention", "fwd+bwd", dtype, {**train, "D": d}, {"causal": True})
    add("attention", "fwd+bwd", BF16, {**train, "Hk": 16, "D": 128}, {"causal": False})
    add("attention", "fwd+bwd", BF16, {**train, "Hk": 1, "D": 128}, {"causal": True})
    for d in (128, 256):
        for dtype in (BF16, FP32):
            add("attention", "fwd+bwd", dtype, {**train, "D": d}, {"causal": True, "norm": "rms"})
    add("attention", "fwd+bwd", BF16, {**train, "D": 128}, {"causal": True, "norm": "l2", "norm_weight": False})
    add("attention", "fwd+bwd", BF16, {**train, "D": 128}, {"causal": True, "varlen": True})
    # sliding window (causal: both sides bounded) and softcap, the cases the windowed/softcap
    # AUDIT_REQUIREMENTS name (bf16, D = 64/128). --quick: window and softcap apart at D = 128,
    # and at D = 64 one call with both (Gemma 2's layers; the most registers of the three
    # specialisations), which the window and the softcap requirement both select (29 variants
    # instead of 58 for two D = 64 calls); the full audit has every combination
    for d in (128, 64):
        add("attention", "fwd+bwd", BF16, {**train, "D": d}, {"causal": True, "window": (256, 0)}, hot=d == 128)
        add("attention", "fwd+bwd", BF16, {**train, "D": d}, {"causal": True, "softcap": 30.0}, hot=d == 128)
        add("attention", "fwd+bwd", BF16, {**train, "D": d}, {"causal": True, "window": (256, 0), "softcap": 50.0},
            hot=d == 64)
    add("attention", "fwd+bwd", BF16, {**train, "D": 128}, {"causal": False, "window": (256, -1)})
    # QK-norm
    for d in (64, 128, 256):
        add("qk_norm", "fwd+bwd", BF16, dict(B=1, T=1024, H=16, D=d), {"mode": "rms"})
    add("qk_norm", "fwd+bwd", FP32, dict(B=1, T=1024, H=16, D=128), {"mode": "l2", "weight": False})
    # decode (split-KV)
    add("attention_decode", "decode", BF16, {**dec, "D": 128}, hot=True)
    for dtype in (BF16, FP16, FP32):
        for d in (64, 128, 256):
            add("attention_decode", "decode", dtype, {**dec, "D": d})
    add("attention_decode", "decode", BF16, {**dec, "Tq": 4, "D": 128})
    # one long row of an MQA model: few programs, so the cache is split (the reduce kernel runs)
    add("attention_decode", "decode", BF16, dict(B=1, S=65536, H=8, Hk=1, D=128), hot=True)
    add("attention_decode", "decode", BF16, {**dec, "D": 128}, {"window": (4096, 0)}, optional=True)
    add("attention_decode", "decode", BF16, {**dec, "D": 128}, {"softcap": 30.0}, optional=True)
    add("attention_decode", "decode", BF16, {**dec, "D": 128}, {"paged": 256}, optional=True)
    # chunked linear / lightning attention
    lin = dict(B=1, T=1024, H=16)
    # the cases the linear AUDIT_REQUIREMENTS name (triton_chunk_kernels.py): bf16, D = 64/128,
    # lightning with decay (and GQA: dk/dv summed over the group in the kernel), linear attention
    # with normalize and a feature map (GQA)
    for d in (64, 128):
        add("lightning_attention", "fwd+bwd", BF16, {**lin, "D": d}, {"final_state": True}, hot=True)
        add("lightning_attention", "fwd+bwd", BF16, {**lin, "Hk": 4, "D": d}, hot=True)
        add("linear_attention", "fwd+bwd", BF16, {**lin, "Hk": 4, "D": d},
            {"causal": True, "normalize": True, "feature_map": "elu"}, hot=True)
    add("linear_attention", "fwd+bwd", BF16, {**lin, "D": 128}, {"causal": True}, hot=True)
    for dtype in (BF16, FP32):
        for d in (64, 128, 256):
            add("lightning_attention", "fwd+bwd", dtype, {**lin, "D": d}, {"initial_state": True, "final_state": True})
            add("linear_attention", "fwd+bwd", dtype, {**lin, "D": d}, {"causal": True})
    add("linear_attention", "fwd+bwd", BF16, {**lin, "Hk": 4, "D": 128},
        {"causal": True, "normalize": True, "feature_map": "elu", "initial_state": True, "final_state": True})
    add("linear_attention", "fwd+bwd", BF16, {**lin, "D": 128}, {"causal": False, "feature_map": "relu"})
    # recurrent steps
    for d in (64, 128, 256):
        add("linear_attention_step", "decode", BF16, dict(B=8, H=16, D=d), {"lightning": True})
        add("linear_attention_step", "decode", BF16, dict(B=8, H=16, Hk=4, D=d),
            {"normalize": True, "feature_map": "elu"})
    # Loki
    loki = dict(B=8, S=16384, H=32, Hk=8)
    add("loki_attention_decode", "decode", BF16, {**loki, "D": 128}, hot=True)
    add("loki_cache_append", "decode", BF16, {**loki, "Tq": 1, "D": 128}, hot=True)
    add("loki_cache_append", "decode", BF16, {**loki, "Tq": 512, "D": 128}, hot=True)
    for dtype in (BF16, FP16, FP32):
        for d in (64, 128, 256):
            add("loki_attention_decode", "decode", dtype, {**loki, "D": d}, {"selection": "head"})
    add("loki_attention_decode", "decode", BF16, {**loki, "D": 128}, {"selection": "group"})
    add("loki_attention_decode", "decode", BF16, dict(B=1, S=16384, H=8, Hk=1, D=128), {"selection": "group"},
        hot=True)
    # B = 1, issue 12's shape: the segmented selection (several programs per row)
    add("loki_attention_decode", "decode", BF16, dict(B=1, S=32768, H=32, Hk=8, D=128, rank=32, top_k=4096),
        {"selection": "group"}, hot=True)
    # paged caches (issue 15): score, gather and append through the block table
    add("loki_cache_attend", "decode", BF16, {**loki, "D": 128, "rank": 32}, {"selection": "group", "paged": 256},
        hot=True)
    add("loki_cache_append", "decode", BF16, {**loki, "Tq": 1, "D": 128}, {"paged": 256}, hot=True)
    add("loki_attention_decode", "decode", BF16, {**loki, "D": 128}, {"selection": "head", "paged": 16})
    for d in (64, 128, 256):
        add("loki_cache_append", "decode", BF16, {**loki, "Tq": 512, "D": d})
        add("loki_cache_attend", "decode", BF16, {**loki, "D": d, "rank": d // 4}, {"selection": "group"})
    return cases
