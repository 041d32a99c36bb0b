"""Launch plan of one call, without a GPU: ``python -m attnkit.tools.launch_plan``.

Prints every Triton launch of one public call (kernel, grid, programs, programs per SM, the
serial loop length where a program scans the sequence, the tensor bytes it is handed) and every
tensor the host code allocates around them, next to the op's byte floor from
``benchmarks/models.py``. Nothing executes: inputs are meta tensors and the launches are recorded
(see ``attnkit/tools/_recorder.py``). ``--sms N`` sets ``ATTNKIT_SM_COUNT`` so host code that sizes
grids from the device plans for an N-SM GPU.

    python -m attnkit.tools.launch_plan --op lightning_attention --mode fwd+bwd \\
        --shape B=2,T=16384,H=16,D=128 --dtype bfloat16 --sms 132
"""

from __future__ import annotations

import os

if os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in __import__("sys").modules:
    del os.environ["TRITON_INTERPRET"]  # plan the GPU kernels and configs, not the interpreter's
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import weakref  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from . import SM_COUNT_ENV, sm_count  # noqa: E402


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# Serial loop length per program: the number of iterations of the loop that scans the sequence
# (keys, queries, chunks, splits). Keyed by kernel name; a kernel without a rule shows "?" (add
# one here when adding a kernel). `a` holds the launch's scalar arguments and constexprs, `g` the grid.
LOOP_RULES: dict[str, tuple[str, Callable[[dict, tuple], int]]] = {
    "_attention_fwd_kernel": ("key tiles (max; causal rows see fewer)", lambda a, g: _cdiv(a["S"], a["BN"])),
    "_attention_bwd_dkdv_kernel": ("packed query tiles (max)", lambda a, g: _cdiv(a["T"] * a["G"], a["BM"])),
    "_attention_bwd_dq_kernel": ("key tiles (max)", lambda a, g: _cdiv(a["S"], a["BN"])),
    "_attention_decode_fwd_kernel": ("key tiles of one split", lambda a, g: _cdiv(a["chunk"], a["BN"])),
    "_attention_decode_reduce_kernel": ("splits", lambda a, g: a["n_splits"]),
    "_segment_state_kernel": ("chunks of one segment", lambda a, g: _cdiv(min(a["SEG"], a["T"]), a["BT"])),
    "_segment_output_kernel": ("chunks of one segment", lambda a, g: _cdiv(min(a["SEG"], a["T"]), a["BT"])),
    "_segment_dstate_kernel": ("chunks of one segment", lambda a, g: _cdiv(min(a["SEG"], a["T"]), a["BT"])),
    "_segment_dq_kernel": ("chunks of one segment", lambda a, g: _cdiv(min(a["SEG"], a["T"]), a["BT"])),
    "_segment_dkdv_kernel": ("chunks of one segment", lambda a, g: _cdiv(min(a["SEG"], a["T"]), a["BT"])),
    "_segment_scan_kernel": ("segments of one sequence (elementwise)", lambda a, g: a["NS"]),
    "_loki_sparse_attn_fwd_kernel": ("selected-key tiles of one split", lambda a, g: _cdiv(a["chunk"], a["BN"])),
    "_loki_sparse_attn_reduce_kernel": ("splits", lambda a, g: a["n_splits"]),
    "_loki_score_kernel": ("rank tiles", lambda a, g: _cdiv(a["rank"], a["BR"])),
    "_qk_norm_bwd_kernel": ("row blocks per persistent program", lambda a, g: _cdiv(_cdiv(a["R"], a["BR"]), g[0])),
    # one tile per program, no loop
    "_attention_bwd_preprocess_kernel": ("no loop", lambda a, g: 1),
    "_kv_append_kernel": ("no loop", lambda a, g: 1),
    "_qk_norm_fwd_kernel": ("no loop", lambda a, g: 1),
    "_loki_rotate_kernel": ("no loop", lambda a, g: 1),
}


def loop_length(launch) -> int | None:
    rule = LOOP_RULES.get(launch.kernel)
    if rule is None:
        return None
    args = {**launch.scalars, **{k: v for k, v in launch.config.items()}}
    try:
        return int(rule[1](args, launch.grid))
    except (KeyError, TypeError, ZeroDivisionError):
        return None


# ------------------------------------------------------------------------------ byte floor


def byte_floor(op: str, mode: str, dtype: torch.dtype, shape: dict[str, int], flags: dict[str, Any]):
    """(bytes, formula) from benchmarks/models.py, or (None, reason)."""
    try:
        from benchmarks import models
    except ImportError:
        return None, "benchmarks/models.py is not importable (run from the repository root)"
    B, T, H = shape.get("B", 1), shape.get("T", 1024), shape.get("H", 16)
    S, Hk, D = shape.get("S", T), shape.get("Hk", H), shape.get("D", 128)
    Dv = shape.get("Dv", D)
    Tq = shape.get("Tq", 1)
    L = shape.get("L", max(0, S - Tq))
    if op == "attention":
        return models.attention_bytes(B, H, Hk, T, S, D, Dv, dtype, mode), "models.attention_bytes"
    if op in ("linear_attention", "lightning_attention"):
        return models.linear_bytes(B, H, Hk, T, D, Dv, dtype, mode), "models.linear_bytes"
    if op == "attention_decode":
        return models.decode_bytes(B, H, Hk, Tq, L + Tq, D, Dv, dtype), "models.decode_bytes"
    if op == "linear_attention_step":
        heads = H if flags.get("lightning") else Hk
        return models.step_bytes(B, H, Hk, heads, D, Dv, dtype), "models.step_bytes"
    if op in ("loki_attention_decode", "loki_cache_attend"):
        rank, top_k = shape.get("rank", max(1, D // 4)), shape.get("top_k", max(1, S // 8))
        return (models.loki_bytes(B, H, Hk, L, D, Dv, rank, top_k, dtype, flags.get("selection", "head")),
                "models.loki_bytes")
    return None, f"no byte model for {op} in benchmarks/models.py"


# ---------------------------------------------------------------------------------- planning


@dataclass
class Alloc:
    op: str
    dtype: str
    shape: list[int]
    bytes: int
    phase: str
    after: int  # number of launches recorded before it
    output: bool = False  # returned by the call (or a gradient it hands back): written by kernels, unavoidable


def plan(op: str, mode: str, dtype: torch.dtype, shape: dict[str, int], flags: dict[str, Any] | None = None
         ) -> dict[str, Any]:
    """Record one call; returns the plan (launches, allocations, byte floor) as a JSON-able dict."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ._recorder import recording
    from .cases import make_call

    flags = dict(flags or {})
    call = make_call(op, mode, dtype, shape, flags)
    allocs: list[Alloc] = []
    # parallel to allocs: the storage of each allocation, weakly (a strong reference would make
    # autograd copy the gradients it could otherwise take over)
    storages: list[Any] = []

    with recording() as state:
        class Allocations(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if any(r.alias_info is not None for r in func._schema.returns) or state.phase == "setup":
                    return out
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    if isinstance(t, torch.Tensor) and t.numel() > 0:
                        allocs.append(Alloc(str(func.overloadpacket.__name__), str(t.dtype).replace("torch.", ""),
                                            list(t.shape), t.numel() * t.element_size(), state.phase,
                                            len(state.launches)))
                        storages.append(weakref.ref(t.untyped_storage()))
                return out

        with Allocations():
            result = call()
    # outputs: what the call returns and the gradients it leaves on its inputs (same storage)
    returned = [x for x in (result if isinstance(result, (tuple, list)) else (result,))]
    returned = [y for x in returned for y in (x if isinstance(x, (tuple, list)) else (x,))]
    returned += [leaf.grad for leaf in getattr(call, "leaves", [])]
    out_storages = [x.untyped_storage() for x in returned if isinstance(x, torch.Tensor)]
    for a, ref in zip(allocs, storages):
        st = ref()
        a.output = st is not None and any(st.data_ptr() == o.data_ptr() and st._cdata == o._cdata
                                          for o in out_storages)
    launches = list(enumerate(state.launches))
    if mode == "bwd":
        launches = [(i, x) for i, x in launches if x.phase == "bwd"]
        allocs = [a for a in allocs if a.phase == "bwd"]
    sms = sm_count()
    rows = []
    seen = set()
    loops: dict[tuple, list[int]] = {}
    for _, x in launches:
        n = loop_length(x)
        if n is not None:
            loops.setdefault((x.call, x.phase), []).append(n)
    for index, x in launches:
        key = (x.call, x.phase)
        first = key not in seen
        seen.add(key)
        span = loops.get(key)
        rows.append(dict(
            index=index, call=x.call, phase=x.phase, kernel=x.kernel, config=x.config_str(),
            tune=list(x.tune) if x.tune else None,
            grid=list(x.grid), programs=x.programs, programs_per_sm=round(x.programs / sms, 2),
            loop=loop_length(x), loop_range=[min(span), max(span)] if span else None,
            loop_meaning=LOOP_RULES.get(x.kernel, ("?",))[0],
            arg_bytes=sum(x.tensor_bytes.values()), first_config=first))
    floor, formula = byte_floor(op, mode, dtype, shape, flags)
    return dict(
        tool="attnkit.tools.launch_plan", op=op, mode=mode, dtype=str(dtype).replace("torch.", ""), shape=shape,
        flags=flags, sm_count=sms, sm_count_source=SM_COUNT_ENV if os.environ.get(SM_COUNT_ENV) else "default",
        launches=rows, allocations=[a.__dict__ for a in allocs],
        host_alloc_bytes=sum(a.bytes for a in allocs), output_bytes=sum(a.bytes for a in allocs if a.output),
        other_alloc_bytes=sum(a.bytes for a in allocs if not a.output), byte_floor=floor, byte_floor_model=formula)


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def _alloc_row(a: dict[str, Any]) -> list[str]:
    kind = "output" if a.get("output") else "alloc"
    return ["", a["phase"], f"  {kind} {a['op']} {a['dtype']}{a['shape']}", "", "", "", "", "", _mib(a["bytes"])]


def format_plan(p: dict[str, Any]) -> str:
    from .gpu_audit import _fmt_table

    head = (f"launch plan: {p['op']} {p['mode']} {p['dtype']} "
            + ",".join(f"{k}={v}" for k, v in p["shape"].items())
            + "".join(f" {k}={v}" for k, v in p["flags"].items())
            + f"; {p['sm_count']} SMs ({p['sm_count_source']})")
    lines = [head, ""]
    table = []
    n_launch = 0
    allocs = list(p["allocations"])
    ai = 0
    # interleave: allocations made before launch i are listed before it
    for r in p["launches"]:
        while ai < len(allocs) and allocs[ai]["after"] <= r["index"]:
            a = allocs[ai]
            table.append(_alloc_row(a))
            ai += 1
        if not r["first_config"]:
            continue
        n_launch += 1
        kept = r["tune"][1] if r["tune"] else 1
        declared = r["tune"][2] if r["tune"] else 1
        grids = {tuple(x["grid"]) for x in p["launches"] if x["call"] == r["call"] and x["phase"] == r["phase"]}
        grid = "x".join(map(str, r["grid"])) + (f" (+{len(grids) - 1} more)" if len(grids) > 1 else "")
        table.append([str(n_launch), r["phase"], r["kernel"], grid, str(r["programs"]), str(r["programs_per_sm"]),
                      "?" if r["loop_range"] is None else "-".join(map(str, sorted(set(r["loop_range"])))),
                      f"{kept}/{declared}" + (f" {r['config']}" if kept == 1 else " e.g. " + r["config"]),
                      _mib(r["arg_bytes"])])
    for a in allocs[ai:]:
        table.append(_alloc_row(a))
    lines.append(_fmt_table(["#", "phase", "kernel / host allocation", "grid", "programs", "per SM", "loop",
                             "configs kept/declared", "tensor bytes"], [[c for c in row] for row in table]))
    lines.append("")
    lines.append(f"{n_launch} launches; host allocations {_mib(p['host_alloc_bytes'])}; byte floor "
                 f"{_mib(p['byte_floor'])} ({p['byte_floor_model']})"
                 + (f"; allocations / floor = {p['host_alloc_bytes'] / p['byte_floor']:.2f}"
                    if p["byte_floor"] else ""))
    lines.append(f"of which outputs (returned tensors and input gradients, written by kernels) "
                 f"{_mib(p['output_bytes'])}; other host allocations (scratch, copies, casts) "
                 f"{_mib(p['other_alloc_bytes'])}"
                 + (f"; other / floor = {p['other_alloc_bytes'] / p['byte_floor']:.2f}" if p["byte_floor"] else ""))
    lines.append("loop = serial iterations of the scan inside one program ("
                 + "; ".join(sorted({f"{r['kernel']}: {r['loop_meaning']}" for r in p["launches"]})) + ")")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .cases import DTYPES, OPS, parse_flags, parse_shape

    parser = argparse.ArgumentParser(prog="python -m attnkit.tools.launch_plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", required=True, choices=sorted(OPS))
    parser.add_argument("--mode", required=True, choices=sorted({m for ms in OPS.values() for m in ms}))
    parser.add_argument("--shape", default="", help="e.g. B=2,T=16384,H=16,D=128 (keys: B T S L Tq H Hk D Dv N "
                                                    "rank top_k)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--flags", default="", help="op flags, e.g. causal=false,norm=rms or selection=group")
    parser.add_argument("--sms", type=int, help=f"SM count to plan for (sets {SM_COUNT_ENV})")
    parser.add_argument("--arch", default=None, help="target arch whose shared memory the config prunes assume "
                        "(sets ATTNKIT_TARGET_ARCH; default: its value, else sm_90)")
    parser.add_argument("--json", metavar="OUT", help="also write the plan as JSON")
    args = parser.parse_args(argv)
    if args.arch is not None:
        if not (args.arch.startswith("sm_") and args.arch[3:].isdigit() and len(args.arch) >= 5):
            parser.error(f"--arch must look like sm_90 or sm_80, got {args.arch!r}")
        os.environ["ATTNKIT_TARGET_ARCH"] = args.arch
    os.environ.setdefault("ATTNKIT_TARGET_ARCH", "sm_90")
    if args.sms is not None:
        if args.sms < 1:
            parser.error(f"--sms must be a positive integer, got {args.sms}")
        os.environ[SM_COUNT_ENV] = str(args.sms)
    try:
        shape, flags = parse_shape(args.shape), parse_flags(args.flags)
        if args.mode not in OPS[args.op]:
            parser.error(f"--mode of {args.op} must be one of {OPS[args.op]}, got {args.mode!r}")
        p = plan(args.op, args.mode, DTYPES[args.dtype], shape, flags)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    print(format_plan(p))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(p, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
