"""Static audit of the chunked linear/lightning Triton kernels for sm_90 (no GPU needed).

Compiles every kernel of `attnkit/ops/linear/triton_chunk_kernels.py`, in every autotune config
the prune keeps, for the cases below, with `triton.compile` + `GPUTarget("cuda", 90, 64)`; runs
`ptxas -v` on the PTX and reports registers, spill bytes, and whether the PTX uses `wgmma`
(Hopper tensor cores) or `mma.sync` (the Ampere path). Exit code 1 if a kept config spills at
D <= 128 or a bf16 product falls back to mma.sync.

    python benchmarks/audit_linear.py            # table
    python benchmarks/audit_linear.py --json out.json

`attnkit.tools.gpu_audit` is the general tool; this script is the kernel author's quick check.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attnkit.ops.linear import triton_chunk as host  # noqa: E402
from attnkit.ops.linear import triton_chunk_kernels as kern  # noqa: E402

def _find_ptxas() -> str:
    """A ptxas that reads the PTX version this Triton emits: $PTXAS, Triton's bundled CUDA 13
    `ptxas-blackwell` (it also assembles sm_90a), its `ptxas`, then /usr/local/cuda/bin/ptxas."""
    if os.environ.get("PTXAS"):
        return os.environ["PTXAS"]
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for cand in (os.path.join(bundled, "ptxas-blackwell"), os.path.join(bundled, "ptxas"),
                 "/usr/local/cuda/bin/ptxas"):
        if os.path.exists(cand):
            return cand
    raise FileNotFoundError("no ptxas found: set PTXAS")


PTXAS = _find_ptxas()
TARGET = GPUTarget("cuda", 90, 64)

# (name, op, D, flags)
CASES = [
    ("lightning-decay", "lightning", 64), ("lightning-decay", "lightning", 128),
    ("lightning-decay", "lightning", 256),
    ("linear-normalize", "linear", 64), ("linear-normalize", "linear", 128),
]


def _unwrap(k):
    """Heuristics -> Autotuner -> JITFunction; returns (jit fn, autotuner)."""
    tuner = None
    while not isinstance(k, triton.runtime.jit.JITFunction):
        if isinstance(k, triton.runtime.autotuner.Autotuner):
            tuner = k
        k = k.fn
    return k, tuner


def _launches(op: str, D: int):
    """(kernel, runtime args by name, constexprs) of every launch of fwd+bwd, as the host makes them."""
    K = V = D
    light = op == "lightning"
    H, HK = 16, (16 if light else 4)
    HS = H if light else HK
    flags = dict(FEATURE_MAP=0 if light else 1, NORMALIZE=not light, DOT_PRECISION="tf32")
    dec = "*fp32" if light else None
    budget = host._tile_budget(not light, False, K, V)
    nb = budget if light else budget // 2  # as chunk_linear_bwd: dq/dk at [Dv, 16] with normalize
    bkv, bkd = host._blocks_dv_split(K, V, budget), host._blocks_dk_split(K, V, nb)
    ptr = "*bf16"
    common_rt = dict(T="i32", NS="i32", SEG="i32", seg_info=None, cu_seqlens=None)
    out = []
    BK, BV = host._blocks_dv_split(K, V, host.STATE_BUDGET)
    out.append(("state", kern._segment_state_kernel,
                dict(k=ptr, v=ptr, hs="*fp32", zs="*fp32" if not light else None, decay=dec, **common_rt),
                dict(HK=HK, HS=HS, K=K, V=V, BK=BK, BV=BV, USE_DECAY=light, IS_VARLEN=False, **flags)))
    out.append(("output", kern._segment_output_kernel,
                dict(q=ptr, k=ptr, v=ptr, o=ptr, den="*fp32" if not light else None, decay=dec, hin="*fp32",
                     zin="*fp32" if not light else None, scale="fp32", eps="fp32", **common_rt),
                dict(H=H, HK=HK, HS=HS, K=K, V=V, BK=BK, BV=BV, CAUSAL=True, STATE_PER_SEQ=False,
                     USE_DECAY=light, IS_VARLEN=False, **flags)))
    out[-1][3].update(BK=bkv[0], BV=bkv[1])
    BK, BV = host._blocks_dv_split(K, V, host.STATE_BUDGET)
    nrm = None if light else "*fp32"
    out.append(("dstate", kern._segment_dstate_kernel,
                dict(q=ptr, do=ptr, o=None if light else ptr, den=nrm, delta=nrm, dhs="*fp32", dzs=nrm, decay=dec,
                     scale="fp32", **common_rt),
                dict(H=H, HS=HS, K=K, V=V, BK=BK, BV=BV, USE_DECAY=light, IS_VARLEN=False, **flags)))
    BK, BV = bkd
    out.append(("dq", kern._segment_dq_kernel,
                dict(q=ptr, k=ptr, v=ptr, do=ptr, den=nrm, delta=nrm, dq=ptr, decay=dec, hin="*fp32", zin=nrm,
                     scale="fp32", **common_rt),
                dict(H=H, HK=HK, HS=HS, K=K, V=V, BK=BK, BV=BV, CAUSAL=True, STATE_PER_SEQ=False,
                     USE_DECAY=light, IS_VARLEN=False, **flags)))
    dkdv = dict(q=ptr, k=ptr, v=ptr, do=ptr, den=nrm, delta=nrm, decay=dec, gin="*fp32", gzin=nrm, gwork=None,
                scale="fp32", **common_rt)
    cx = dict(H=H, HK=HK, HS=HS, K=K, V=V, GPS=1, CAUSAL=True, STATE_PER_SEQ=False, USE_DECAY=light,
              IS_VARLEN=False, **flags)
    if host._pow2(K) * host._pow2(V) <= budget and light:
        out.append(("dkdv", kern._segment_dkdv_kernel, dict(dkdv, dk=ptr, dv=ptr),
                    dict(cx, BK=host._pow2(K), BV=host._pow2(V), STORE_DK=True, STORE_DV=True)))
    else:
        out.append(("dk", kern._segment_dkdv_kernel, dict(dkdv, dk=ptr, dv=None),
                    dict(cx, BK=bkd[0], BV=bkd[1], STORE_DK=True, STORE_DV=False)))
        out.append(("dv", kern._segment_dkdv_kernel, dict(dkdv, dk=None, dv=ptr),
                    dict(cx, BK=bkv[0], BV=bkv[1] if light else min(bkv[1], 32), STORE_DK=False, STORE_DV=True)))
    return out


def _compile(fn, rt: dict, cx: dict, cfg: triton.Config):
    cx = dict(cx, **cfg.kwargs)
    signature, constexprs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in cx:
            signature[name] = "constexpr"
            constexprs[(i,)] = cx[name]
        elif rt.get(name) is None:
            signature[name] = "constexpr"
            constexprs[(i,)] = None
        else:
            signature[name] = rt[name]
    # what the runtime specialises on: pointers (torch allocations) are 16-byte aligned; the
    # integer arguments are not assumed divisible (T, NS, SEG are not specialised)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if isinstance(signature[name], str) and signature[name].startswith("*")}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def _ptxas(ptx: str) -> tuple[int, int, int]:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    arch = re.search(r"\.target\s+(\S+)", ptx).group(1)
    res = subprocess.run([PTXAS, "-v", f"-arch={arch}", f.name, "-o", os.devnull],
                         capture_output=True, text=True)
    os.unlink(f.name)
    txt = res.stderr + res.stdout
    if "Used" not in txt:
        raise RuntimeError(f"{PTXAS} failed: {txt[:300]}")
    regs = int(re.search(r"Used (\d+) registers", txt).group(1))
    st = re.search(r"(\d+) bytes spill stores", txt)
    ld = re.search(r"(\d+) bytes spill loads", txt)
    return regs, int(st.group(1)) if st else 0, int(ld.group(1)) if ld else 0


def audit(cases=CASES, all_configs=False, progress=False):
    rows = []
    for name, op, D in cases:
        for kname, kernel, rt, cx in _launches(op, D):
            fn, tuner = _unwrap(kernel)
            configs = tuner.configs
            if not all_configs:
                configs = kern._prune_configs(configs, dict.fromkeys(fn.arg_names), **cx)
            for cfg in configs:
                try:
                    ck = _compile(fn, rt, cx, cfg)
                except Exception as e:  # a config that does not compile is a finding, not a crash
                    rows.append(dict(case=name, D=D, kernel=kname, config=str(cfg), error=str(e)[:200]))
                    continue
                ptx = ck.asm["ptx"]
                regs, spill_st, spill_ld = _ptxas(ptx)
                rows.append(dict(case=name, D=D, kernel=kname, BK=cx["BK"], BV=cx["BV"], BT=cfg.kwargs["BT"],
                                 warps=cfg.num_warps, stages=cfg.num_stages, regs=regs, spill_stores=spill_st,
                                 spill_loads=spill_ld, shared=ck.metadata.shared,
                                 wgmma=ptx.count("wgmma.mma_async"), mma_sync=len(re.findall(r"\bmma\.sync", ptx))))
                if progress:
                    print("  ..", rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--all-configs", action="store_true", help="also the configs the prune drops")
    ap.add_argument("--d", type=int, nargs="*", help="only these head dims")
    ap.add_argument("--op", choices=["lightning", "linear"], help="only this op's cases")
    ap.add_argument("--progress", action="store_true", help="print each row as it is compiled")
    args = ap.parse_args(argv)
    cases = [c for c in CASES if (not args.d or c[2] in args.d) and (not args.op or c[1] == args.op)]
    rows = audit(cases, args.all_configs, args.progress)
    bad = 0
    hdr = f"{'case':18} {'D':>4} {'kernel':7} {'BK':>4} {'BV':>4} {'BT':>3} {'w':>2} {'s':>2} {'regs':>4} " \
          f"{'spill':>6} {'smem':>7} {'wgmma':>5} {'mma.sync':>8}"
    print(hdr)
    for r in rows:
        if "error" in r:
            print(f"{r['case']:18} {r['D']:>4} {r['kernel']:7} ERROR {r['config']}: {r['error']}")
            bad += 1
            continue
        flag = ""
        if r["spill_stores"] and r["D"] <= 128:
            flag, bad = " SPILL", bad + 1
        if r["mma_sync"] or not r["wgmma"]:
            flag, bad = flag + " NO-WGMMA", bad + 1
        print(f"{r['case']:18} {r['D']:>4} {r['kernel']:7} {r['BK']:>4} {r['BV']:>4} {r['BT']:>3} {r['warps']:>2} "
              f"{r['stages']:>2} {r['regs']:>4} {r['spill_stores']:>6} {r['shared']:>7} {r['wgmma']:>5} "
              f"{r['mma_sync']:>8}{flag}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
