"""The registry of op configs: shapes (presets), input builders, attnkit calls, models, peers.

One :class:`OpConfig` per benchmarked op. A shape is a dict of parameters; ``None`` (or a
missing key) means the derived default: ``Hk = H``, ``Dv = D``, ``S = T`` (prefill),
``rank = D // 4``, ``top_k = S // 8``. Presets exist per device kind: CPU presets are small
(the reference backend in float32 must get through ``--op all --preset quick`` in minutes),
CUDA presets are the sizes the kernel issues are judged at.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import attnkit
from attnkit import dispatch
from attnkit.ops.loki import loki_attention_decode_lowrank

from . import models
from .case import Case, Runner, Unavailable
from .peers import Peer, dense_decode_model, peers_for

MODES = ("fwd", "bwd", "fwd+bwd", "decode")


# ------------------------------------------------------------------------------------ sweeps


def fixed_b(Ts, **fixed) -> list[dict]:
    """A sweep over T at fixed batch: ``B=..`` in the sweep label."""
    return [dict(fixed, T=T, sweep=f"B={fixed['B']}") for T in Ts]


def fixed_tokens(total: int, Ts, **fixed) -> list[dict]:
    """A sweep over T with ``B·T = total`` (B = total // T): the per-token cost at equal work."""
    return [dict(fixed, B=max(1, total // T), T=T, sweep=f"BxT={total}") for T in Ts]


def over(key: str, values, label: str, **fixed) -> list[dict]:
    """A sweep over any key (context ``S`` for decode, batch ``B`` for the recurrent step)."""
    return [dict(fixed, **{key: v}, sweep=label) for v in values]


K = 1024
LOKI_OPS = ("loki_decode", "paged_loki_decode")


# ------------------------------------------------------------------------------------ shapes


def resolve(op: str, shape: dict) -> dict:
    """Fill the derived defaults of a shape."""
    s = dict(shape)
    s.setdefault("Hk", None)
    if s["Hk"] is None:
        s["Hk"] = s["H"]
    if s.get("Dv") is None:
        s["Dv"] = s["D"]
    if op in ("attention", "qk_norm_attention", "window_attention"):
        if s.get("S") is None:
            s["S"] = s["T"]
        s.setdefault("causal", True)
    s.setdefault("scale", s["D"] ** -0.5)
    if op in ("attention_decode", "loki_decode", "paged_loki_decode"):
        s.setdefault("Tq", 1)
    if op in LOKI_OPS:
        if s.get("rank") is None:
            s["rank"] = max(1, s["D"] // 4)
        if s.get("top_k") is None:
            s["top_k"] = max(1, s["S"] // 8)
    if op == "qk_norm_attention":
        s.setdefault("qk_norm", "rms")
        s.setdefault("norm_eps", 1e-6)
    if op == "linear_attention":
        s.setdefault("normalize", False)
        s.setdefault("feature_map", None)
    if op == "linear_attention_step":
        s.setdefault("kind", "lightning")
    if s["H"] % s["Hk"]:
        raise ValueError(f"H must be a multiple of Hk, got H={s['H']}, Hk={s['Hk']}")
    return s


def _randn(shape, case: Case, grad: bool | None = None, scale: float = 1.0) -> torch.Tensor:
    # drawn in the case dtype directly: no float32 temporary the size of a 128k-token KV cache
    x = torch.randn(*shape, device=case.device, dtype=case.dtype)
    if scale != 1.0:
        x.mul_(scale)
    return x.requires_grad_(case.grad if grad is None else grad)


# ---------------------------------------------------------------------------------- builders


def build_linear(case: Case) -> None:
    B, T, H, Hk, D, Dv = (case[k] for k in ("B", "T", "H", "Hk", "D", "Dv"))
    case.tensors = {"q": _randn((B, T, H, D), case), "k": _randn((B, T, Hk, D), case),
                    "v": _randn((B, T, Hk, Dv), case)}
    if case.op == "lightning_attention":
        case.tensors["decay"] = attnkit.lightning_slopes(H).to(case.device)


def build_attention(case: Case) -> None:
    B, T, S, H, Hk, D, Dv = (case[k] for k in ("B", "T", "S", "H", "Hk", "D", "Dv"))
    case.tensors = {"q": _randn((B, T, H, D), case), "k": _randn((B, S, Hk, D), case),
                    "v": _randn((B, S, Hk, Dv), case)}
    if case.op == "qk_norm_attention":
        case.tensors["q_norm_weight"] = (1 + _randn((D,), case, grad=False, scale=0.1)).requires_grad_(case.grad)
        case.tensors["k_norm_weight"] = (1 + _randn((D,), case, grad=False, scale=0.1)).requires_grad_(case.grad)


def build_decode(case: Case) -> None:
    B, S, H, Hk, D, Dv, Tq = (case[k] for k in ("B", "S", "H", "Hk", "D", "Dv", "Tq"))
    t = {"q": _randn((B, Tq, H, D), case, grad=False),
         "k_cache": _randn((B, S, Hk, D), case, grad=False),
         "v_cache": _randn((B, S, Hk, Dv), case, grad=False),
         "cache_seqlens": torch.full((B,), S, dtype=torch.int32, device=case.device)}
    if case.op in LOKI_OPS:
        sample = t["k_cache"][0, : min(S, 4096)]  # [N, Hk, D] keys to calibrate the basis on
        basis = attnkit.loki_calibrate(sample)
        t["basis"] = basis
        t["k_cache"] = attnkit.loki_rotate(t["k_cache"], basis)  # the rotated cache, built untimed
        # the fast layout: a contiguous [B, Hk, S, rank] low-rank key buffer (attnkit/ops/loki/cache.py)
        t["k_lowrank"] = t["k_cache"][..., : case["rank"]].transpose(1, 2).contiguous()
    case.tensors = t


def build_step(case: Case) -> None:
    B, H, Hk, D, Dv = (case[k] for k in ("B", "H", "Hk", "D", "Dv"))
    state_heads = H if case["kind"] == "lightning" else Hk
    case.tensors = {"q": _randn((B, 1, H, D), case, grad=False), "k": _randn((B, 1, Hk, D), case, grad=False),
                    "v": _randn((B, 1, Hk, Dv), case, grad=False),
                    "state": torch.randn(B, state_heads, D, Dv, device=case.device).mul_(0.01),
                    "decay": (attnkit.lightning_slopes(H).to(case.device) if case["kind"] == "lightning"
                              else None)}


# ------------------------------------------------------------------------------ attnkit calls

AttnkitCall = tuple[str, Callable[..., Any], tuple, dict]  # (dispatch op name, function, args, kwargs)


def call_lightning(case: Case) -> AttnkitCall:
    t = case.tensors
    return ("lightning_attention", attnkit.lightning_attention, (t["q"], t["k"], t["v"], t["decay"]),
            {"scale": case["scale"]})


def call_linear(case: Case) -> AttnkitCall:
    t = case.tensors
    return ("linear_attention", attnkit.linear_attention, (t["q"], t["k"], t["v"]),
            {"causal": True, "normalize": case["normalize"], "feature_map": case["feature_map"],
             "scale": case["scale"]})


def call_attention(case: Case) -> AttnkitCall:
    t = case.tensors
    return ("attention", attnkit.attention, (t["q"], t["k"], t["v"]),
            {"causal": case["causal"], "scale": case["scale"]})


def call_qk_norm_attention(case: Case) -> AttnkitCall:
    t = case.tensors
    return ("attention", attnkit.attention, (t["q"], t["k"], t["v"]),
            {"causal": case["causal"], "scale": case["scale"], "qk_norm": case["qk_norm"],
             "q_norm_weight": t["q_norm_weight"], "k_norm_weight": t["k_norm_weight"],
             "norm_eps": case["norm_eps"]})


def call_decode(case: Case) -> AttnkitCall:
    t = case.tensors
    return ("attention_decode", attnkit.attention_decode,
            (t["q"], t["k_cache"], t["v_cache"], t["cache_seqlens"]), {"scale": case["scale"]})


def call_loki(case: Case) -> AttnkitCall:
    t = case.tensors
    return ("loki_attention_decode", attnkit.loki_attention_decode,
            (t["q"], t["k_cache"], t["v_cache"], t["cache_seqlens"], t["basis"]),
            {"rank": case["rank"], "top_k": case["top_k"], "scale": case["scale"]})


def call_step(case: Case) -> AttnkitCall:
    t = case.tensors
    return ("linear_attention_step", attnkit.linear_attention_step, (t["q"], t["k"], t["v"], t["state"]),
            {"decay": t["decay"], "scale": case["scale"]})


def _leaves(case: Case) -> tuple[torch.Tensor, ...]:
    return tuple(x for x in case.tensors.values()
                 if isinstance(x, torch.Tensor) and x.requires_grad)


def _explain(case: Case, call: AttnkitCall, backend: str | None) -> dispatch.Explanation:
    op_name, _, args, kwargs = call
    with torch.set_grad_enabled(case.grad):
        try:
            return attnkit.explain(op_name, *args, backend=backend, **kwargs)
        except (NotImplementedError, ValueError, TypeError) as e:
            raise Unavailable(f"attnkit.{op_name} is not available ({type(e).__name__}: {e})") from None


def attnkit_runner(case: Case, call: AttnkitCall, backend: str) -> Runner:
    """An attnkit backend by name; Unavailable (with dispatch's reasons) if it refuses the input."""
    exp = _explain(case, call, backend)
    if exp.backend is None:
        raise Unavailable("; ".join(exp.refusals.get(backend, [])) or "refused")
    _, func, args, kwargs = call
    return Runner(f"attnkit:{backend}", lambda: func(*args, backend=backend, **kwargs), _leaves(case))


def attnkit_auto(case: Case, call: AttnkitCall, label: str) -> Runner:
    """An attnkit call with the automatic backend choice (comparators); the note names it."""
    exp = _explain(case, call, None)
    if exp.backend is None:
        raise Unavailable(str(exp))
    _, func, args, kwargs = call
    return Runner(label, lambda: func(*args, **kwargs), _leaves(case), note=f"auto={exp.backend}")


# ------------------------------------------------------------------------------- comparators


def no_norm(case: Case) -> Runner:
    """Attention without the norm on the same q, k, v: what fused QK-norm is compared with."""
    return attnkit_auto(case, call_attention(case), "attnkit:no-norm")


def unfused_norm(case: Case) -> Runner:
    """``attnkit.qk_norm`` on q and k, then attention without norm (two extra passes over q, k)."""
    t = case.tensors
    exp = _explain(case, call_qk_norm_attention(case), None)
    if exp.backend is None:
        raise Unavailable(str(exp))
    mode, eps, causal, scale = case["qk_norm"], case["norm_eps"], case["causal"], case["scale"]

    def fn():
        qn = attnkit.qk_norm(t["q"], t["q_norm_weight"], mode=mode, eps=eps)
        kn = attnkit.qk_norm(t["k"], t["k_norm_weight"], mode=mode, eps=eps)
        return attnkit.attention(qn, kn, t["v"], causal=causal, scale=scale)

    return Runner("attnkit:unfused", fn, _leaves(case), note="qk_norm + attention, automatic backends")


def dense_decode(case: Case) -> Runner:
    """Dense ``attention_decode`` over the same (rotated) cache: what Loki is compared with."""
    t = case.tensors
    call = ("attention_decode", attnkit.attention_decode,
            (t["q"], t["k_cache"], t["v_cache"], t["cache_seqlens"]), {"scale": case["scale"]})
    runner = attnkit_auto(case, call, "attnkit:dense")
    runner.model = dense_decode_model
    return runner


def loki_lowrank(case: Case) -> Runner:
    """Loki scoring from the contiguous low-rank key buffer (the layout a Loki KV cache keeps)."""
    t = case.tensors
    call = ("loki_attention_decode_lowrank", loki_attention_decode_lowrank,
            (t["q"], t["k_lowrank"], t["k_cache"], t["v_cache"], t["cache_seqlens"], t["basis"]),
            {"rank": case["rank"], "top_k": case["top_k"], "scale": case["scale"]})
    return attnkit_auto(case, call, "attnkit:lowrank")


def loki_group(case: Case) -> Runner:
    """Loki with ``selection="group"``: one selection per KV head, shared by its query heads."""
    op_name, func, args, kwargs = call_loki(case)
    return attnkit_auto(case, (op_name, func, args, {**kwargs, "selection": "group"}), "attnkit:group")


# --------------------------------------------------------------------------- models per op

Model = tuple[float | None, float | None, int]  # (FLOPs, bytes, tokens) of one call


def model_attention(case: Case) -> Model:
    B, T, S, H, Hk, D, Dv = (case[k] for k in ("B", "T", "S", "H", "Hk", "D", "Dv"))
    return (models.attention_flops(B, H, T, S, D, Dv, case["causal"], case.mode),
            models.attention_bytes(B, H, Hk, T, S, D, Dv, case.dtype, case.mode), B * T)


def model_linear(case: Case) -> Model:
    B, T, H, Hk, D, Dv = (case[k] for k in ("B", "T", "H", "Hk", "D", "Dv"))
    per_q = case.op == "lightning_attention"
    return (models.linear_flops(B, H, Hk, T, D, Dv, case.mode, per_query_state=per_q),
            models.linear_bytes(B, H, Hk, T, D, Dv, case.dtype, case.mode), B * T)


def model_decode(case: Case) -> Model:
    B, S, H, Hk, D, Dv, Tq = (case[k] for k in ("B", "S", "H", "Hk", "D", "Dv", "Tq"))
    return (models.decode_flops(B, H, Tq, S, D, Dv),
            models.decode_bytes(B, H, Hk, Tq, S, D, Dv, case.dtype), B * Tq)


def model_loki(case: Case) -> Model:
    B, S, H, Hk, D, Dv = (case[k] for k in ("B", "S", "H", "Hk", "D", "Dv"))
    r, k = case["rank"], case["top_k"]
    return (models.loki_flops(B, H, S, D, Dv, r, k), models.loki_bytes(B, H, Hk, S, D, Dv, r, k, case.dtype), B)


def model_step(case: Case) -> Model:
    B, H, Hk, D, Dv = (case[k] for k in ("B", "H", "Hk", "D", "Dv"))
    sh = H if case["kind"] == "lightning" else Hk
    return models.step_flops(B, H, sh, D, Dv), models.step_bytes(B, H, Hk, sh, D, Dv, case.dtype), B


# -------------------------------------------------------------------------------- op configs


@dataclass(frozen=True)
class OpConfig:
    """Everything the harness needs to benchmark one op.

    ``metric`` picks the figure that means something for the op: ``"flops"`` (TFLOP/s and % of
    peak), ``"floor"`` (time, tokens/s and % of the byte floor), ``"bandwidth"`` (GB/s and % of
    peak HBM bandwidth). ``base`` is the shape explicit ``--T/--B/...`` flags start from.
    ``baseline`` names the runner the ``speedup`` column divides by; ``cost_vs`` one whose time
    the ``cost_ratio`` column divides each time by. ``case_info(case)`` returns columns that
    belong to the case (the same in every row of it); ``extra_columns`` are shown in the table.
    """

    name: str
    summary: str
    modes: tuple[str, ...]
    default_mode: str
    x: str
    metric: str
    base: dict[str, dict]
    presets: dict[str, dict[str, list[dict]]]
    build: Callable[[Case], None]
    call: Callable[[Case], AttnkitCall]
    model: Callable[[Case], Model]
    comparators: dict[str, Callable[[Case], Runner]] = field(default_factory=dict)
    baseline: str | None = None
    cost_vs: str | None = None
    case_info: Callable[[Case], dict[str, Any]] | None = None
    extra_columns: tuple[tuple[str, str, str], ...] = ()

    def peers(self) -> list[Peer]:
        return peers_for(self.name)

    def cases(self, preset: str, device: torch.device) -> list[dict]:
        kind = "cuda" if device.type == "cuda" else "cpu"
        return [resolve(self.name, s) for s in self.presets[preset][kind]]


def _lin_presets() -> dict[str, dict[str, list[dict]]]:
    gpu_T = [512, 1 * K, 2 * K, 4 * K, 8 * K, 16 * K, 32 * K, 64 * K]
    return {
        "quick": {"cpu": fixed_b([256, 512, 1024], B=1, H=2, D=32),
                  "cuda": fixed_b([2 * K, 16 * K], B=2, H=16, D=128)},
        "default": {"cpu": fixed_b([512, 1024, 2048, 4096], B=1, H=4, D=64)
                    + fixed_tokens(4096, [512, 1024, 2048], H=4, D=64),
                    "cuda": fixed_b(gpu_T, B=2, H=16, D=128) + fixed_tokens(64 * K, gpu_T, H=16, D=128)},
        "full": {"cpu": fixed_b([512, 1024, 2048, 4096, 8192], B=1, H=4, D=64)
                 + fixed_b([512, 1024, 2048, 4096], B=1, H=4, D=128)
                 + fixed_tokens(8192, [512, 1024, 2048, 4096], H=4, D=64),
                 "cuda": [s for D in (64, 128) for s in fixed_b(gpu_T + [128 * K], B=2, H=16, D=D)
                          + fixed_tokens(128 * K, gpu_T + [128 * K], H=16, D=D)]
                 + fixed_b([4 * K, 16 * K], B=2, H=16, Hk=4, D=128)},
    }


def _attn_presets(causal_only: bool = False) -> dict[str, dict[str, list[dict]]]:
    gpu_T = [512, 1 * K, 2 * K, 4 * K, 8 * K, 16 * K]
    causals = (True,) if causal_only else (True, False)
    gqa = [] if causal_only else [dict(s, sweep=f"{s['sweep']} H=32 Hk={Hk}") for Hk in (8, 1)
                                  for s in fixed_tokens(16 * K, [1 * K, 4 * K, 16 * K], H=32, Hk=Hk, D=128,
                                                        causal=True)]
    return {
        "quick": {"cpu": fixed_b([128, 256, 512], B=1, H=4, D=32, causal=True),
                  "cuda": fixed_tokens(16 * K, [1 * K, 4 * K], H=16, D=128, causal=True)},
        "default": {"cpu": [s for c in causals for s in fixed_b([256, 512, 1024, 2048], B=1, H=4, D=64, causal=c)]
                    + ([] if causal_only else [dict(B=1, T=1024, H=8, Hk=2, D=64, causal=True, sweep="H=8 Hk=2")]),
                    "cuda": [s for c in causals for s in fixed_tokens(16 * K, gpu_T, H=16, D=128, causal=c)]
                    + gqa},
        "full": {"cpu": [s for c in causals for D in (64, 128)
                         for s in fixed_b([256, 512, 1024, 2048, 4096], B=1, H=4, D=D, causal=c)],
                 "cuda": [s for c in causals for D in (64, 128)
                          for s in fixed_tokens(16 * K, gpu_T + [32 * K], H=16 if D == 128 else 32, D=D, causal=c)]
                 + gqa},
    }


def _decode_presets(extra: dict | None = None) -> dict[str, dict[str, list[dict]]]:
    e = extra or {}
    gpu_S = [1 * K, 4 * K, 16 * K, 64 * K, 128 * K]
    return {
        "quick": {"cpu": over("S", [1 * K, 4 * K], "B=1", B=1, H=8, Hk=2, D=64, **e),
                  "cuda": over("S", [4 * K, 64 * K], "B=8", B=8, H=32, Hk=8, D=128, **e)},
        "default": {"cpu": over("S", [1 * K, 4 * K, 16 * K], "B=1", B=1, H=8, Hk=2, D=64, **e)
                    + over("S", [1 * K, 4 * K], "B=4", B=4, H=8, Hk=2, D=64, **e),
                    "cuda": [s for B in (1, 8) for s in over("S", gpu_S, f"B={B}", B=B, H=32, Hk=8, D=128, **e)]},
        "full": {"cpu": [s for B in (1, 4) for s in over("S", [1 * K, 4 * K, 16 * K, 32 * K], f"B={B}",
                                                        B=B, H=8, Hk=2, D=64, **e)],
                 "cuda": [s for B in (1, 8, 32) for s in over("S", gpu_S, f"B={B}", B=B, H=32, Hk=8, D=128, **e)]
                 + over("S", gpu_S, "B=8 MQA", B=8, H=32, Hk=1, D=128, **e)},
    }


def _step_presets() -> dict[str, dict[str, list[dict]]]:
    def both(Bs, **fixed):
        return [s for kind in ("lightning", "linear") for s in over("B", Bs, f"kind={kind}", kind=kind, **fixed)]

    return {
        "quick": {"cpu": both([1, 8], H=4, D=64), "cuda": both([1, 64], H=16, D=128)},
        "default": {"cpu": both([1, 4, 16, 64], H=4, D=64), "cuda": both([1, 8, 32, 128, 512], H=16, D=128)},
        "full": {"cpu": both([1, 4, 16, 64, 256], H=4, D=64),
                 "cuda": both([1, 8, 32, 128, 512, 2048], H=16, D=128)
                 + both([1, 32, 512], H=32, Hk=8, D=128)},
    }


_LIN_BASE = {"cpu": dict(B=1, T=1024, H=4, D=64), "cuda": dict(B=2, T=16 * K, H=16, D=128)}
_ATTN_BASE = {"cpu": dict(B=1, T=512, H=4, D=64, causal=True), "cuda": dict(B=2, T=4 * K, H=16, D=128, causal=True)}
_DEC_BASE = {"cpu": dict(B=1, S=4 * K, H=8, Hk=2, D=64), "cuda": dict(B=8, S=16 * K, H=32, Hk=8, D=128)}
_STEP_BASE = {"cpu": dict(B=8, H=4, D=64, kind="lightning"), "cuda": dict(B=64, H=16, D=128, kind="lightning")}

OPS: dict[str, OpConfig] = {
    "lightning_attention": OpConfig(
        "lightning_attention", "causal linear attention with per-head decay (chunked prefill)",
        ("fwd", "bwd", "fwd+bwd"), "fwd+bwd", "T", "floor", _LIN_BASE, _lin_presets(),
        build_linear, call_lightning, model_linear, baseline="sdpa"),
    "linear_attention": OpConfig(
        "linear_attention", "causal linear attention (chunked prefill)",
        ("fwd", "bwd", "fwd+bwd"), "fwd+bwd", "T", "floor", _LIN_BASE, _lin_presets(),
        build_linear, call_linear, model_linear, baseline="sdpa"),
    "linear_attention_step": OpConfig(
        "linear_attention_step", "one recurrent decoding step (state updated in place)",
        ("decode",), "decode", "B", "bandwidth", _STEP_BASE, _step_presets(),
        build_step, call_step, model_step),
    "attention": OpConfig(
        "attention", "softmax attention (GQA/MQA)", ("fwd", "bwd", "fwd+bwd"), "fwd", "T", "flops",
        _ATTN_BASE, _attn_presets(), build_attention, call_attention, model_attention, baseline="sdpa"),
    "attention_decode": OpConfig(
        "attention_decode", "decoding over a KV cache", ("decode",), "decode", "S", "bandwidth",
        _DEC_BASE, _decode_presets(), build_decode, call_decode, model_decode, baseline="sdpa"),
    "qk_norm_attention": OpConfig(
        "qk_norm_attention", "softmax attention with fused per-head RMS QK-norm",
        ("fwd", "bwd", "fwd+bwd"), "fwd", "T", "flops", _ATTN_BASE, _attn_presets(causal_only=True),
        build_attention, call_qk_norm_attention, model_attention,
        comparators={"attnkit:no-norm": no_norm, "attnkit:unfused": unfused_norm}, baseline="attnkit:no-norm"),
    "loki_decode": OpConfig(
        "loki_decode", "Loki low-rank-key top-k decoding (rank = D/4, top_k = S/8)", ("decode",), "decode", "S",
        "bandwidth", _DEC_BASE, _decode_presets(), build_decode, call_loki, model_loki,
        comparators={"attnkit:dense": dense_decode, "attnkit:lowrank": loki_lowrank, "attnkit:group": loki_group},
        baseline="attnkit:dense"),
}

# What `--op all` runs: every op in its default mode.
ALL = tuple(OPS)


def explicit_cases(cfg: OpConfig, device: torch.device, overrides: dict[str, list]) -> list[dict]:
    """The product of the given ``--T/--B/...`` values over the op's base shape for the device."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    keys = list(overrides)
    out, seen = [], set()
    for values in itertools.product(*(overrides[k] for k in keys)):
        shape = dict(cfg.base[kind])
        shape.update(zip(keys, values))
        shape = resolve(cfg.name, shape)
        key = tuple(sorted((k, v) for k, v in shape.items() if k != "sweep"))
        if key not in seen:
            seen.add(key)
            out.append(shape)
    return out


def default_backends(cfg: OpConfig, case: Case) -> tuple[list[str], dict[str, str]]:
    """Names run when ``--backends`` is not given, and why the others were left out.

    Every attnkit backend that accepts the input, except the Triton *interpreter* on CPU (it is a
    correctness tool, orders of magnitude slower), and the reference backend on CUDA unless no
    other attnkit backend accepts the input (it is the meaning of the op, not a contender, and
    its O(T²) memory would dominate the run); then the op's comparators and every peer.
    """
    names: list[str] = []
    skipped: dict[str, str] = {}
    try:
        call = cfg.call(case)
        accepting = []
        for b in dispatch.BACKENDS:
            exp = _explain(case, call, b)
            if exp.backend is None:
                skipped[f"attnkit:{b}"] = "; ".join(exp.refusals.get(b, [])) or "refused"
            else:
                accepting.append(b)
    except Unavailable as e:
        accepting = []
        skipped["attnkit"] = str(e)
    if case.device.type == "cpu" and "triton" in accepting:
        accepting.remove("triton")
        skipped["attnkit:triton"] = "the Triton interpreter on CPU is not benchmarked by default (name it)"
    if case.device.type == "cuda" and "reference" in accepting and len(accepting) > 1:
        accepting.remove("reference")
        skipped["attnkit:reference"] = "reference skipped on CUDA when a kernel backend accepts (name it)"
    names += [f"attnkit:{b}" for b in accepting]
    names += list(cfg.comparators)
    names += [p.name for p in cfg.peers() if not (p.cuda_only and case.device.type != "cuda")]
    return names, skipped


def all_runner_names(cfg: OpConfig) -> list[str]:
    return ([f"attnkit:{b}" for b in dispatch.BACKENDS] + list(cfg.comparators) + [p.name for p in cfg.peers()])


def canonical_name(cfg: OpConfig, name: str) -> str:
    """``reference`` -> ``attnkit:reference``; ``dense`` -> ``attnkit:dense``; peers unchanged."""
    if name in dispatch.BACKENDS or f"attnkit:{name}" in cfg.comparators:
        return f"attnkit:{name}"
    return name


def make_runner(cfg: OpConfig, case: Case, name: str) -> Runner:
    """Build the runner called ``name`` for a case, or raise Unavailable."""
    if name.startswith("attnkit:") and name[len("attnkit:"):] in dispatch.BACKENDS:
        return attnkit_runner(case, cfg.call(case), name[len("attnkit:"):])
    if name in cfg.comparators:
        return cfg.comparators[name](case)
    for peer in cfg.peers():
        if peer.name == name:
            return peer.make(case)
    raise Unavailable(f"not a backend, comparator or peer of {cfg.name}")


# ------------------------------------------- sliding window and paged KV cache (issue 15)
#
# window_attention: causal attention with a sliding window of W keys (`window=(W - 1, 0)`), next
# to the same tokens cut into T/W independent causal chunks of W ("attnkit:chunks", the
# baseline): a kernel that skips the tiles outside the window costs about 2x the chunks (each
# query sees W keys instead of W/2 on average), independent of T; one that masks them costs T/W
# times more. "attnkit:full" is causal attention over all T keys; the `cost/full` column is each
# runner's time over its time (a skipping implementation: about W/(T/2) plus the tile overheads,
# and falling as T grows at fixed W). The `tiles/qtile` columns are what the Triton forward kernel
# visits, from its own key_range/tile_split run in the interpreter (benchmarks/window_tiles.py;
# 128 x 128 tiles): key tiles per query tile with the window, without it (full causal), and the
# ratio of the totals, so the scaling can be read on a machine without a GPU.
# paged_decode: attention_decode through a shuffled block table next to the same cache stored
# contiguously ("attnkit:contiguous", the baseline): same bytes, so the same GB/s is the goal.
# paged_loki_decode: the same for loki_attention_decode (rank = D/4, top_k = S/8): the portable op
# on the paged rotated caches per backend, next to the contiguous call ("attnkit:contiguous", the
# baseline) and the low-rank-buffer op on the paged buffers ("attnkit:lowrank", its
# `[num_blocks, Hk, block_size, R]` buffer paged by the same table) and on the contiguous ones.


class _OwnPeers(OpConfig):
    """An op config whose peers are given here (these ops have no entry in peers.py)."""

    def peers(self) -> list[Peer]:
        return []


def build_window(case: Case) -> None:
    build_attention(case)


def call_window(case: Case) -> AttnkitCall:
    t = case.tensors
    return ("attention", attnkit.attention, (t["q"], t["k"], t["v"]),
            {"causal": True, "scale": case["scale"], "window": (case["W"] - 1, 0)})


def window_chunks(case: Case) -> Runner:
    """The same q, k, v cut into T/W causal chunks of W tokens (one batched call)."""
    t = case.tensors
    B, T, H, Hk, D, W = (case[k] for k in ("B", "T", "H", "Hk", "D", "W"))
    if T % W or case["S"] != T:
        raise Unavailable(f"T = {T} is not a multiple of the window W = {W}" if T % W else "chunks need S = T")

    def chunk(x):
        return x.reshape(B * (T // W), W, x.shape[2], x.shape[3])

    q, k, v = chunk(t["q"]), chunk(t["k"]), chunk(t["v"])
    call = ("attention", attnkit.attention, (q, k, v), {"causal": True, "scale": case["scale"]})
    runner = attnkit_auto(case, call, "attnkit:chunks")
    runner.model = lambda c: (models.attention_flops(B * (T // W), H, W, W, D, c["Dv"], True, c.mode),
                              models.attention_bytes(B * (T // W), H, Hk, W, W, D, c["Dv"], c.dtype, c.mode), B * T)
    return runner


def window_full(case: Case) -> Runner:
    """Causal attention over all T keys (no window): what a masking kernel costs."""
    runner = attnkit_auto(case, call_attention(case), "attnkit:full")
    runner.model = model_attention
    return runner


def model_window(case: Case) -> Model:
    B, T, H, Hk, D, Dv, W = (case[k] for k in ("B", "T", "H", "Hk", "D", "Dv", "W"))
    pairs = sum(min(t + 1, W) for t in range(min(T, W))) + max(0, T - W) * W  # keys seen per query, summed
    flops = 2.0 * B * H * pairs * (D + Dv) * models.MODE_FLOP_FACTOR[case.mode]
    return flops, models.attention_bytes(B, H, Hk, T, T, D, Dv, case.dtype, case.mode), B * T


_TILES: dict[tuple[int, int, int, int], dict[str, Any]] = {}


def window_tile_info(case: Case) -> dict[str, Any]:
    """The Triton forward kernel's key tiles per query tile for this case (cached per shape)."""
    key = (case["T"], case["S"], case["H"] // case["Hk"], case["W"])
    if key not in _TILES:
        from . import window_tiles
        try:
            s = window_tiles.summary(*key)
            _TILES[key] = {"kernel_tiles": s["tiles_mean"], "kernel_tiles_max": s["tiles_max"],
                           "kernel_tiles_full": s["full_tiles_mean"], "kernel_tile_ratio": s["tile_ratio"],
                           "kernel_tile": f"{s['BM']}x{s['BN']}"}
        except Exception as e:  # the tile count is an annotation: a failure must not stop the run
            print(f"   window tile count unavailable: {type(e).__name__}: {e}", flush=True)
            _TILES[key] = {k: None for k in ("kernel_tiles", "kernel_tiles_max", "kernel_tiles_full",
                                             "kernel_tile_ratio", "kernel_tile")}
    return dict(_TILES[key])


def build_paged(case: Case) -> None:
    """The decode cache of `build_decode`, plus the same tokens in a shuffled block pool."""
    build_decode(case)
    t = case.tensors
    B, S, bs = case["B"], case["S"], case["block_size"]
    if S % bs:
        raise Unavailable(f"S = {S} is not a multiple of block_size = {bs}")
    nb = S // bs
    perm = torch.randperm(B * nb, device=case.device)
    t["block_table"] = perm.view(B, nb).to(torch.int32).contiguous()
    for name in ("k_cache", "v_cache"):
        blocks = t[name].view(B * nb, bs, *t[name].shape[2:])
        pool = torch.empty_like(blocks)
        pool[perm] = blocks
        t[f"{name}_paged"] = pool


def call_paged(case: Case) -> AttnkitCall:
    t = case.tensors
    return ("attention_decode", attnkit.attention_decode,
            (t["q"], t["k_cache_paged"], t["v_cache_paged"], t["cache_seqlens"]),
            {"scale": case["scale"], "block_table": t["block_table"]})


def paged_contiguous(case: Case) -> Runner:
    """The same decode over the contiguous cache."""
    return attnkit_auto(case, call_decode(case), "attnkit:contiguous")


def build_paged_loki(case: Case) -> None:
    """`build_paged` for Loki: rotated caches and the low-rank buffer, each also in the block pool
    (the low-rank buffer as `[num_blocks, Hk, block_size, R]`, the same table)."""
    build_paged(case)
    t = case.tensors
    B, S, bs = case["B"], case["S"], case["block_size"]
    nb = S // bs
    low = t["k_lowrank"]  # [B, Hk, S, R]
    blocks = low.view(B, low.shape[1], nb, bs, low.shape[3]).transpose(1, 2).reshape(B * nb, low.shape[1], bs,
                                                                                     low.shape[3])
    pool = torch.empty_like(blocks)
    pool[t["block_table"].flatten().long()] = blocks
    t["k_lowrank_paged"] = pool


def call_paged_loki(case: Case) -> AttnkitCall:
    t = case.tensors
    return ("loki_attention_decode", attnkit.loki_attention_decode,
            (t["q"], t["k_cache_paged"], t["v_cache_paged"], t["cache_seqlens"], t["basis"]),
            {"rank": case["rank"], "top_k": case["top_k"], "scale": case["scale"], "block_table": t["block_table"]})


def paged_loki_contiguous(case: Case) -> Runner:
    """The same Loki decode over the contiguous rotated cache."""
    return attnkit_auto(case, call_loki(case), "attnkit:contiguous")


def paged_loki_lowrank(case: Case) -> Runner:
    """Loki scoring from the paged low-rank buffer (a paged LokiCache's layout)."""
    t = case.tensors
    call = ("loki_attention_decode_lowrank", loki_attention_decode_lowrank,
            (t["q"], t["k_lowrank_paged"], t["k_cache_paged"], t["v_cache_paged"], t["cache_seqlens"], t["basis"]),
            {"rank": case["rank"], "top_k": case["top_k"], "scale": case["scale"], "block_table": t["block_table"]})
    return attnkit_auto(case, call, "attnkit:lowrank")


def paged_loki_lowrank_contiguous(case: Case) -> Runner:
    """The low-rank-buffer op on the contiguous buffers."""
    runner = loki_lowrank(case)
    runner.name = "attnkit:lowrank-contiguous"
    return runner


def _window_presets() -> dict[str, dict[str, list[dict]]]:
    def rows(Ts, W, **fixed):
        return [dict(fixed, T=T, S=T, W=W, causal=True, sweep=f"W={W}") for T in Ts]

    # T sweeps at a fixed window: a skipping implementation's time grows like T (cost/full falls),
    # a masking one's like T^2
    return {
        "quick": {"cpu": rows([2 * K, 4 * K], 512, B=1, H=2, D=32),
                  "cuda": rows([8 * K, 32 * K], 4 * K, B=1, H=16, D=128)},
        "default": {"cpu": rows([2 * K, 4 * K, 8 * K, 16 * K], 512, B=1, H=4, D=64),
                    "cuda": rows([4 * K, 8 * K, 16 * K, 32 * K], 4 * K, B=1, H=16, D=128)
                    + rows([8 * K, 32 * K], 1 * K, B=1, H=16, D=128)},
        "full": {"cpu": rows([2 * K, 4 * K, 8 * K, 16 * K], 512, B=1, H=4, D=64)
                 + rows([2 * K, 8 * K], 128, B=1, H=8, Hk=2, D=64),
                 "cuda": rows([4 * K, 8 * K, 16 * K, 32 * K, 64 * K], 4 * K, B=1, H=16, D=128)
                 + rows([8 * K, 32 * K, 64 * K], 1 * K, B=1, H=32, Hk=8, D=128)},
    }


_WIN_BASE = {"cpu": dict(B=1, T=4 * K, W=512, H=4, D=64, causal=True),  # S = T
             "cuda": dict(B=1, T=32 * K, W=4 * K, H=16, D=128, causal=True)}
_PAGED_BASE = {"cpu": dict(_DEC_BASE["cpu"], block_size=16, Tq=1), "cuda": dict(_DEC_BASE["cuda"], block_size=16, Tq=1)}

OPS["window_attention"] = _OwnPeers(
    "window_attention", "causal sliding-window attention (window W) vs T/W causal chunks of W",
    ("fwd", "bwd", "fwd+bwd"), "fwd", "T", "flops", _WIN_BASE, _window_presets(),
    build_window, call_window, model_window,
    comparators={"attnkit:chunks": window_chunks, "attnkit:full": window_full}, baseline="attnkit:chunks",
    cost_vs="attnkit:full", case_info=window_tile_info,
    extra_columns=(("cost/full", "cost_ratio", ".3g"), ("tiles/qtile", "kernel_tiles", ".4g"),
                   ("full tiles/qtile", "kernel_tiles_full", ".4g"), ("tile ratio", "kernel_tile_ratio", ".3g")))
OPS["paged_decode"] = _OwnPeers(
    "paged_decode", "decoding through a shuffled paged KV cache (block_size 16) vs the contiguous cache",
    ("decode",), "decode", "S", "bandwidth", _PAGED_BASE, _decode_presets({"block_size": 16, "Tq": 1}),
    build_paged, call_paged, model_decode,
    comparators={"attnkit:contiguous": paged_contiguous}, baseline="attnkit:contiguous")
OPS["paged_loki_decode"] = _OwnPeers(
    "paged_loki_decode", "Loki decoding through a shuffled paged cache (block_size 16, rank = D/4, top_k = S/8) "
    "vs the contiguous cache", ("decode",), "decode", "S", "bandwidth", _PAGED_BASE,
    _decode_presets({"block_size": 16, "Tq": 1}), build_paged_loki, call_paged_loki, model_loki,
    comparators={"attnkit:contiguous": paged_loki_contiguous, "attnkit:lowrank": paged_loki_lowrank,
                 "attnkit:lowrank-contiguous": paged_loki_lowrank_contiguous},
    baseline="attnkit:contiguous")
ALL = tuple(OPS)
