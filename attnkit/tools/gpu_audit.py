"""Static GPU audit of every Triton kernel: ``python -m attnkit.tools.gpu_audit``.

Records the Triton launches of the public ops at GPU-like shapes (meta tensors: nothing is
allocated or executed), compiles each specialisation for the requested architectures at every
autotune config the kernel's prune keeps, and reports per variant: kernel, config, dtype, head
dim, shared memory, registers, spill bytes and the MMA kind of its products. Exits 1 when a
variant fails to compile, a kept config needs more shared memory than the architecture has, a
(non-optional) call fails to record, or a variant violates an ``AUDIT_REQUIREMENTS`` entry of
a kernel module under ``attnkit/ops`` (``attnkit/tools/_requirements.py``; a requirement that
matches no audited variant fails too). See ``docs/gpu_audit.md``.

    python -m attnkit.tools.gpu_audit --arch sm_90 --arch sm_80 --quick   # CI: hot kernels
    python -m attnkit.tools.gpu_audit --arch sm_90 --arch sm_80 --json audit.json
"""

from __future__ import annotations

import os

if os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in __import__("sys").modules:
    # the audit needs the real (GPU) kernels and configs, not the interpreter's
    del os.environ["TRITON_INTERPRET"]
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default; silences its warning

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from . import DEFAULT_SM_COUNT, SM_COUNT_ENV  # noqa: E402

#: Read by host code that prunes configs for the device's shared memory when the tensors are on
#: the CPU/meta device (attnkit/ops/softmax/triton_attention.py); the audit sets it per arch.
TARGET_ARCH_ENV = "ATTNKIT_TARGET_ARCH"
from ._compile import (ResultCache, compile_launch, default_cache_dir, shared_limit, variant_key,  # noqa: E402
                       verify_launch)
from ._recorder import TARGETS, Launch, record, triton_version  # noqa: E402
from ._requirements import Requirement, Scope, check as check_requirements, collect as collect_requirements  # noqa: E402
from .cases import SHORT_DTYPE, Case, audit_cases, make_call  # noqa: E402


@dataclass
class Variant:
    """One compiled specialisation of one kernel for one arch (all the calls that reach it)."""

    key: str
    arch: str
    launch: Launch
    case: Case
    cases: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    def row(self) -> dict[str, Any]:
        r = self.result
        limit = shared_limit(self.arch)
        return dict(
            kernel=self.launch.kernel, module=self.launch.module, arch=self.arch, config=self.launch.config_str(),
            num_warps=self.launch.config.get("num_warps"), num_stages=self.launch.config.get("num_stages"),
            tune=list(self.launch.tune) if self.launch.tune else None,
            dtype=SHORT_DTYPE[self.case.dtype], head_dim=self.case.head_dim, case=self.case.name,
            cases=self.cases, grid=list(self.launch.grid),
            shared=r.get("shared"), shared_limit=limit,
            shared_ok=None if r.get("shared") is None else r["shared"] <= limit,
            registers=r.get("registers"), spill_stores=r.get("spill_stores"), spill_loads=r.get("spill_loads"),
            stack_frame=r.get("stack_frame"), mma=r.get("mma"), wgmma=r.get("wgmma"), mma_sync=r.get("mma_sync"),
            compile_s=r.get("compile_s"), cached=self.cached, error=r.get("error"))


# ------------------------------------------------------------------------------ compilation

_JOBS: list[Variant] = []


def _work(i: int) -> dict[str, Any]:
    v = _JOBS[i]
    return compile_launch(v.launch, v.arch)


def _compile_all(jobs: list[Variant], n_jobs: int, progress) -> None:
    global _JOBS
    _JOBS = jobs
    if not jobs:
        return
    if n_jobs <= 1 or len(jobs) == 1:
        for i, v in enumerate(jobs):
            v.result = _work(i)
            progress(i + 1, v)
        return
    ctx = multiprocessing.get_context("fork")  # workers inherit the recorded launches
    with ctx.Pool(n_jobs) as pool:
        for n, (i, res) in enumerate(pool.imap_unordered(_indexed, range(len(jobs))), 1):
            jobs[i].result = res
            progress(n, jobs[i])


def _indexed(i: int) -> tuple[int, dict[str, Any]]:
    return i, _work(i)


# ------------------------------------------------------------------------------------ audit


def run_audit(archs: list[str], quick: bool, *, kernel: str | None = None, op: str | None = None,
              case: str | None = None, jobs: int = 1, cache: Path | None = None,
              verbose: bool = True, requirements: list[Requirement] | None = None,
              requirement_modules: list[str] | None = None) -> dict[str, Any]:
    """Record, compile and judge; returns the report (the JSON document). The requirements are
    `requirements`, else the ``AUDIT_REQUIREMENTS`` of `requirement_modules`, else those of every
    module under ``attnkit.ops``."""
    start = time.perf_counter()
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    pattern = re.compile(kernel) if kernel else None
    case_re = re.compile(case) if case else None
    cases = [c for c in audit_cases(quick)
             if (op is None or c.op == op) and (case_re is None or case_re.search(c.name))]
    failures: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    variants: dict[tuple[str, str], Variant] = {}
    launched: set[tuple[str, str, str, int, str]] = set()  # (arch, kernel, dtype, D, call), before --kernel
    n_launches = 0
    if requirements is None:
        requirements, req_errors = collect_requirements(modules=requirement_modules, known_archs=TARGETS)
        failures.extend(req_errors)
    saved_target = os.environ.get(TARGET_ARCH_ENV)
    try:
        for arch in archs:
            # host code that prunes configs by the device's shared memory reads the target arch
            # from ATTNKIT_TARGET_ARCH when the tensors are not on a GPU: record once per arch
            os.environ[TARGET_ARCH_ENV] = arch
            for c in cases:
                try:
                    launches = record(make_call(c.op, c.mode, c.dtype, c.shape, c.flags), c.name)
                except Exception as e:  # noqa: BLE001 - reported as a finding
                    entry = dict(case=c.name, arch=arch, error=f"{type(e).__name__}: {e}"[:400])
                    if not any(x["case"] == c.name for x in (skipped if c.optional else failures)):
                        (skipped if c.optional else failures).append(entry)
                    continue
                for launch in launches:
                    launched.add((arch, launch.kernel, SHORT_DTYPE[c.dtype], c.head_dim, c.name))
                    if pattern is not None and not pattern.search(launch.kernel):
                        continue
                    n_launches += 1
                    key = variant_key(launch, arch)
                    v = variants.get((key, arch))
                    if v is None:
                        v = variants[(key, arch)] = Variant(key, arch, launch, c)
                    if c.name not in v.cases:
                        v.cases.append(c.name)
    finally:
        if saved_target is None:
            os.environ.pop(TARGET_ARCH_ENV, None)
        else:
            os.environ[TARGET_ARCH_ENV] = saved_target
    recorded_s = time.perf_counter() - start
    store = ResultCache(cache)
    todo = []
    for v in variants.values():
        hit = store.get(v.key)
        if hit is not None:
            v.result, v.cached = hit, True
        else:
            todo.append(v)
    log(f"gpu_audit: {len(cases)} calls, {n_launches} launches, {len(variants)} variants "
        f"({len(variants) - len(todo)} cached, {len(todo)} to compile on {jobs} worker(s)); "
        f"recorded in {recorded_s:.1f}s")

    def progress(n, v):
        if n % 10 == 0 or n == len(todo):
            log(f"  compiled {n}/{len(todo)} ({time.perf_counter() - start:.0f}s)")
        store.put(v.key, v.result)

    _compile_all(todo, jobs, progress)
    rows = sorted((v.row() for v in variants.values()),
                  key=lambda r: (r["arch"], r["module"], r["kernel"], r["dtype"], r["head_dim"], r["case"],
                                 r["config"]))
    for r in rows:
        if r["error"]:
            failures.append(dict(case=r["case"], kernel=r["kernel"], arch=r["arch"], config=r["config"],
                                 error="compile failed: " + r["error"]))
        elif not r["shared_ok"]:
            failures.append(dict(case=r["case"], kernel=r["kernel"], arch=r["arch"], config=r["config"],
                                 error=f"shared memory {r['shared']} B exceeds the {r['arch']} limit "
                                       f"{r['shared_limit']} B"))
    scope = Scope(archs=list(archs), narrowed_calls=op is not None or case is not None, kernel_filter=kernel,
                  launched=frozenset(launched))
    req_table, req_failures = check_requirements(requirements, rows, scope)
    failures.extend(req_failures)
    report = dict(
        tool="attnkit.tools.gpu_audit", triton=triton_version(), archs=archs, quick=quick,
        sm_count=os.environ.get(SM_COUNT_ENV), calls=len(cases), launches=n_launches, variants=rows,
        summary=summarize(rows), requirements=req_table, failures=failures, skipped=skipped,
        compiled=len(todo), cached=len(variants) - len(todo), elapsed_s=round(time.perf_counter() - start, 1))
    report["_variants"] = list(variants.values())  # for --verify; dropped from the JSON
    return report


def pick_for_verify(variants: list[Variant], n: int) -> list[Variant]:
    """Up to `n` compiled variants, one per (arch, kernel) first, the worst spiller of each."""
    ok = [v for v in variants if not v.result.get("error")]
    best: dict[tuple[str, str], Variant] = {}
    for v in ok:
        k = (v.arch, v.launch.kernel)
        if k not in best or (v.result.get("spill_stores") or 0) > (best[k].result.get("spill_stores") or 0):
            best[k] = v
    picked = sorted(best.values(), key=lambda v: -(v.result.get("spill_stores") or 0))
    return picked[:n]


def run_verify(variants: list[Variant]) -> list[dict[str, Any]]:
    """Independent figures for each variant (cuobjdump of the cubin, SASS MMA kind, toolkit ptxas)."""
    out = []
    for v in variants:
        try:
            out.append(verify_launch(v.launch, v.arch))
        except Exception as e:  # noqa: BLE001
            out.append(dict(kernel=v.launch.kernel, arch=v.arch, config=v.launch.config_str(),
                            error=f"{type(e).__name__}: {e}"[:300], agree={}))
    return out


def format_verify(checks: list[dict[str, Any]]) -> str:
    rows = []
    for c in checks:
        if "error" in c:
            rows.append([c["arch"], c["kernel"], c["config"], "ERROR", c["error"], "", "", "", "", ""])
            continue
        a, cu, tk = c["audit"], c["cubin"], c["toolkit"] or {}
        rows.append([c["arch"], c["kernel"], c["config"], f"{a['registers']}/{cu['registers']}/{tk.get('registers')}",
                     f"{a['spill_stores']}/{tk.get('spill_stores')}", f"{a['stack_frame']}/{cu['stack_frame']}",
                     f"{a['mma']}/{c['sass_mma']}",
                     "yes" if all(x is not False for x in c["agree"].values()) else "NO"])
    return _fmt_table(["arch", "kernel", "config", "regs audit/cubin/toolkit", "spill audit/toolkit",
                       "stack audit/cubin", "mma ptx/sass", "agree"], rows)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (arch, kernel): variants, compile failures, max shared (and its limit), max registers,
    variants that spill, worst spill stores, and the MMA kinds seen."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["arch"], r["kernel"])].append(r)
    out = []
    for (arch, kernel), rs in sorted(groups.items()):
        ok = [r for r in rs if not r["error"]]
        spills = [r for r in ok if (r["spill_stores"] or 0) > 0]
        mma = sorted({r["mma"] for r in ok if r["mma"]})
        out.append(dict(
            arch=arch, kernel=kernel, variants=len(rs), failed=len(rs) - len(ok),
            max_shared=max((r["shared"] for r in ok), default=None), shared_limit=rs[0]["shared_limit"],
            over_shared=sum(1 for r in ok if not r["shared_ok"]),
            max_registers=max((r["registers"] or 0 for r in ok), default=None),
            spilling=len(spills), max_spill_stores=max((r["spill_stores"] for r in spills), default=0),
            mma="/".join(mma) if mma else "-"))
    return out


# ---------------------------------------------------------------------------------- printing


def _fmt_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    def line(r: list[str]) -> str:
        # names left-aligned, numbers right-aligned
        return "  ".join(c.rjust(w) if i >= 2 and (c[:1].isdigit() or c == "-") else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def format_report(report: dict[str, Any], variants: bool = True) -> str:
    parts = []
    if variants:
        parts.append(_fmt_table(
            ["arch", "kernel", "config", "dtype", "D", "shared", "regs", "spill", "mma", "call"],
            [[r["arch"], r["kernel"], r["config"], r["dtype"], r["head_dim"],
              r["shared"], r["registers"], r["spill_stores"], r["mma"] if not r["error"] else "FAILED",
              r["case"].split(" ", 2)[0] + " " + r["case"].split(" ")[1] + _flags_of(r["case"])]
             for r in report["variants"]]))
        parts.append("")
    parts.append(_fmt_table(
        ["arch", "kernel", "variants", "failed", "max shared", "limit", "over", "max regs", "spilling",
         "worst spill", "mma"],
        [[s["arch"], s["kernel"], s["variants"], s["failed"], s["max_shared"], s["shared_limit"], s["over_shared"],
          s["max_registers"], s["spilling"], s["max_spill_stores"], s["mma"]] for s in report["summary"]]))
    if report.get("requirements"):
        parts.append("")
        parts.append("requirements (AUDIT_REQUIREMENTS of the kernel modules):")
        parts.append(_fmt_table(
            ["requirement", "kernel", "arch", "dtypes", "D", "checks", "variants", "worst spill", "mma",
             "mma count", "status"],
            [[q["requirement"], q["kernel"] + (f" case~{q['case']}" if q["case"] else ""), q["arch"], q["dtypes"],
              q["head_dims"], q["checks"], q["variants"], q["worst_spill"], q["mma"], q["mma_counts"],
              q["status"] + (f" (missing {', '.join(q['missing'])})" if q["missing"] else "")]
             for q in report["requirements"]]))
    for s in report["skipped"]:
        parts.append(f"skipped (optional feature): {s['case']}: {s['error']}")
    for f in report["failures"]:
        where = f" [{f['arch']} {f['kernel']} {f['config']}]" if "kernel" in f else ""
        parts.append(f"FAIL {f['case']}{where}: {f['error']}")
    parts.append(f"{len(report['variants'])} variants ({report['compiled']} compiled, {report['cached']} cached) "
                 f"from {report['calls']} calls in {report['elapsed_s']}s; triton {report['triton']}; "
                 f"{'OK' if not report['failures'] else str(len(report['failures'])) + ' FAILURE(S)'}")
    return "\n".join(parts)


def _flags_of(case: str) -> str:
    flags = [p for p in case.split(" ")[4:] if "=" in p]
    return (" " + " ".join(flags)) if flags else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnkit.tools.gpu_audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", choices=sorted(TARGETS),
                        help="target architecture (repeatable); default sm_90")
    parser.add_argument("--quick", action="store_true", help="hot kernels only (CI)")
    parser.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    parser.add_argument("--kernel", metavar="REGEX", help="only kernels whose name matches")
    parser.add_argument("--op", help="only the calls of this public op")
    parser.add_argument("--case", metavar="REGEX", help="only the calls whose name matches (see --list)")
    parser.add_argument("--list", action="store_true", help="list the calls (names as --case sees them) and exit")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel compile workers (default: min(2, cores))")
    parser.add_argument("--cache", metavar="DIR", help=f"result cache (default {default_cache_dir()}; "
                        "env ATTNKIT_AUDIT_CACHE)")
    parser.add_argument("--no-cache", action="store_true", help="compile everything, store nothing")
    parser.add_argument("--summary-only", action="store_true", help="print only the per-kernel summary")
    parser.add_argument("--requirements-from", action="append", metavar="MODULE",
                        help="take AUDIT_REQUIREMENTS from this importable module (repeatable) instead of "
                             "every module under attnkit.ops")
    parser.add_argument("--verify", type=int, default=0, metavar="N",
                        help="recompile N variants (one per kernel, worst spiller first) and compare with "
                             "cuobjdump of the cubin, the SASS and the CUDA toolkit's ptxas")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.list:
        for c in audit_cases(args.quick):
            print(("quick " if c.quick else "      ") + ("optional " if c.optional else "         ") + c.name)
        return 0
    os.environ.setdefault(SM_COUNT_ENV, str(DEFAULT_SM_COUNT))
    cache = None if args.no_cache else Path(args.cache) if args.cache else default_cache_dir()
    report = run_audit(args.arch or ["sm_90"], args.quick, kernel=args.kernel, op=args.op, case=args.case,
                       jobs=args.jobs, cache=cache, requirement_modules=args.requirements_from)
    variants = report.pop("_variants")
    print(format_report(report, variants=not args.summary_only))
    failed = bool(report["failures"])
    if args.verify:
        report["verify"] = run_verify(pick_for_verify(variants, args.verify))
        print()
        print(format_verify(report["verify"]))
        failed |= any(x is False for c in report["verify"] for x in c["agree"].values())
        failed |= any("error" in c for c in report["verify"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
