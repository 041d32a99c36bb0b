"""attnkit benchmark CLI.

    python benchmarks/run.py --op lightning_attention               # default preset, this device
    python benchmarks/run.py --op all                               # every op, default modes, quick preset
    python benchmarks/run.py --op attention --mode fwd+bwd --T 1024,4096 --B 2 --H 16 --Hk 4 --D 128
    python benchmarks/run.py --list                                 # ops, modes, presets, peers
    python benchmarks/run.py --op cp_lightning_attention --nproc 2  # context parallel (benchmarks/distributed.py)

Prints a table per op and mode and writes ``<op>_<mode>_<device>_<dtype>.{csv,json,png}`` under
``--out`` (default ``bench_results/``). Method: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import models, report  # noqa: E402
from benchmarks.case import Case, Runner, Unavailable, primary  # noqa: E402
from benchmarks.registry import (  # noqa: E402
    ALL,
    MODES,
    OPS,
    OpConfig,
    all_runner_names,
    canonical_name,
    default_backends,
    explicit_cases,
    make_runner,
)
from benchmarks.timing import Budget, L2Flush, peak_memory_bytes, time_step  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HALF = (torch.float16, torch.bfloat16)
SHAPE_FLAGS = {"B": int, "T": int, "S": int, "H": int, "Hk": int, "D": int, "Dv": int, "Tq": int,
               "causal": lambda s: bool(int(s)), "rank": int, "top_k": int, "kind": str, "W": int}


def budget_for(device: torch.device, preset: str, args: argparse.Namespace) -> Budget:
    if device.type == "cuda":
        b = Budget(warmup=5, warmup_s=0.1, min_reps=10, max_reps=200, budget_s=0.2 if preset == "quick" else 0.5)
    else:
        b = Budget(warmup=1 if preset == "quick" else 2, warmup_s=0.0 if preset == "quick" else 0.05,
                   min_reps=3 if preset == "quick" else 5, max_reps=20 if preset == "quick" else 30,
                   budget_s=0.2 if preset == "quick" else 0.5)
    return Budget(warmup=args.warmup if args.warmup is not None else b.warmup,
                  warmup_s=b.warmup_s,
                  min_reps=args.min_reps if args.min_reps is not None else b.min_reps,
                  max_reps=args.max_reps if args.max_reps is not None else b.max_reps,
                  budget_s=args.budget_s if args.budget_s is not None else b.budget_s)


# ------------------------------------------------------------------------------------ measuring


def _steps(case: Case, runner: Runner) -> tuple[Any, Any]:
    """The timed step and the untimed per-repeat reset for the case's mode."""
    if case.mode in ("fwd", "decode"):
        def step():
            with torch.no_grad():
                runner.fn()
        return step, None

    def reset():
        for t in runner.leaves:
            t.grad = None

    out = primary(runner.fn())  # untimed: the graph to differentiate (bwd), or the output shape
    grad = torch.randn_like(out)
    reset()
    if case.mode == "bwd":
        def step():
            torch.autograd.backward(out, grad, retain_graph=True)
    else:
        del out

        def step():
            torch.autograd.backward(primary(runner.fn()), grad)
    return step, reset


def _metrics(cfg: OpConfig, case: Case, runner: Runner, median_s: float,
             peak: models.Peak | None) -> dict[str, Any]:
    flops, nbytes, tokens = (runner.model or cfg.model)(case)
    m: dict[str, Any] = {"flops": flops, "bytes": nbytes, "tokens_per_s": tokens / median_s,
                         "tflops": None, "gbps": None, "pct_peak_flops": None, "pct_peak_bw": None}
    if flops is not None:
        m["tflops"] = flops / median_s / 1e12
        if peak is not None and case.dtype in HALF:
            m["pct_peak_flops"] = 100.0 * m["tflops"] / peak.bf16_tflops
    if nbytes is not None:
        m["gbps"] = nbytes / median_s / 1e9
        if peak is not None:
            m["pct_peak_bw"] = 100.0 * m["gbps"] / peak.hbm_gbps
    return m


def measure(cfg: OpConfig, case: Case, runner: Runner, budget: Budget, peak: models.Peak | None,
            memory: bool, flush: L2Flush | None) -> dict[str, Any]:
    step, reset = _steps(case, runner)

    def before():
        if reset is not None:
            reset()
        if flush is not None:
            flush()

    stats = time_step(step, case.device, budget, before)
    row: dict[str, Any] = {"status": "ok", "reps": stats.reps, "time_ms": stats.median_s * 1e3,
                           "time_p20_ms": stats.p20_s * 1e3, "time_p80_ms": stats.p80_s * 1e3}
    row.update(_metrics(cfg, case, runner, stats.median_s, peak))
    row["peak_mem_mb"] = peak_memory_bytes(step, case.device, before) / 2**20 if memory else None
    return row


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_op(cfg: OpConfig, mode: str, shapes: list[dict], device: torch.device, dtype: torch.dtype,
           backends: list[str] | None, budget: Budget, peak: models.Peak | None, args: argparse.Namespace,
           out_dir: Path, machine: dict[str, Any]) -> list[dict[str, Any]]:
    title = f"{cfg.name} {mode} ({cfg.summary}) on {machine['device_name']}, {str(dtype).replace('torch.', '')}"
    table = report.Table(cfg.metric, percent=peak is not None, extra=cfg.extra_columns)
    table.header(title)
    flush = L2Flush(device) if device.type == "cuda" and not args.no_l2_flush else None
    shown: set[tuple[str, str]] = set()

    def skip(name: str, reason: str) -> None:
        if (name, reason) not in shown:
            shown.add((name, reason))
            print(f"   skip {name}: {reason}", flush=True)

    rows: list[dict[str, Any]] = []
    for shape in shapes:
        case = Case(cfg.name, mode, device, dtype, shape, grad=mode in ("bwd", "fwd+bwd"))
        try:
            cfg.build(case)
        except torch.cuda.OutOfMemoryError:
            print(f"   {report.shape_label({'op': cfg.name, **shape})}: out of memory building inputs")
            _free(device)
            continue
        except (NotImplementedError, ValueError, TypeError) as e:
            skip(cfg.name, f"inputs cannot be built ({type(e).__name__}: {e})")
            continue
        if backends is None:
            names, skipped = default_backends(cfg, case)
            for n, why in skipped.items():
                skip(n, why)
        else:
            names = backends
        case_rows = []
        case_info = cfg.case_info(case) if cfg.case_info is not None else {}
        for name in names:
            base = {"op": cfg.name, "mode": mode, "device": device.type,
                    "dtype": str(dtype).replace("torch.", ""), "backend": name, "note": "",
                    "sweep": shape.get("sweep", ""), **{k: v for k, v in shape.items() if k in report.COLUMNS},
                    **case_info}
            try:
                runner = make_runner(cfg, case, name)
            except Unavailable as e:
                skip(name, str(e))
                continue
            except torch.cuda.OutOfMemoryError:
                case_rows.append({**base, "status": "oom"})
                _free(device)
                continue
            base["note"] = runner.note
            base["runs"] = report.runs_label(name, device, runner.note)
            try:
                row = {**base, **measure(cfg, case, runner, budget, peak, not args.no_memory, flush)}
            except torch.cuda.OutOfMemoryError:
                row = {**base, "status": "oom"}
            except Exception as e:  # a broken backend must not end the whole run; it is reported
                first = (str(e).strip().splitlines() or [""])[0][:160]
                row = {**base, "status": f"error: {type(e).__name__}: {first}"}
            del runner
            _free(device)
            case_rows.append(row)
        _speedups(cfg, case_rows)
        for row in case_rows:
            table.row(row)
        rows.extend(case_rows)
        del case
        _free(device)
    _write(cfg, mode, device, dtype, rows, machine, args, out_dir, budget)
    return rows


def _speedups(cfg: OpConfig, rows: list[dict[str, Any]]) -> None:
    base = next((r for r in rows if r["backend"] == cfg.baseline and r["status"] == "ok"), None)
    for r in rows:
        r["speedup"] = (base["time_ms"] / r["time_ms"]) if base and r["status"] == "ok" else None
        r["speedup_vs"] = cfg.baseline if base else None
    if cfg.cost_vs is not None:  # the inverse view against a second runner: time / its time
        ref = next((r for r in rows if r["backend"] == cfg.cost_vs and r["status"] == "ok"), None)
        for r in rows:
            r["cost_ratio"] = (r["time_ms"] / ref["time_ms"]) if ref and r["status"] == "ok" else None
            r["cost_ratio_vs"] = cfg.cost_vs if ref else None


def _write(cfg: OpConfig, mode: str, device: torch.device, dtype: torch.dtype, rows: list[dict[str, Any]],
           machine: dict[str, Any], args: argparse.Namespace, out_dir: Path, budget: Budget) -> None:
    stem = report.out_stem(cfg.name, mode, device, dtype)
    config = {"op": cfg.name, "mode": mode, "preset": args.preset, "metric": cfg.metric, "x": cfg.x,
              "baseline": cfg.baseline, "budget": dataclasses.asdict(budget), "memory": not args.no_memory,
              "l2_flush": device.type == "cuda" and not args.no_l2_flush,
              "command": " ".join(["python", "benchmarks/run.py", *args.argv])}
    report.write_csv(out_dir / f"{stem}.csv", rows, machine, config)
    report.write_json(out_dir / f"{stem}.json", rows, machine, config)
    written = [f"{stem}.csv", f"{stem}.json"]
    if getattr(args, "plot", not args.no_plot) and report.plot(out_dir / f"{stem}.png", rows, cfg.x, cfg.metric,
                                        f"{cfg.name} {mode} — {machine['device_name']}, "
                                        f"{str(dtype).replace('torch.', '')}"):
        written.append(f"{stem}.png")
    print(f"   wrote {', '.join(str(out_dir / w) for w in written)}", flush=True)


# ------------------------------------------------------------------------------------------- CLI


def _list(s: str, cast) -> list:
    return [cast(x) for x in s.split(",") if x != ""]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default=None, help="op name(s), comma separated, or 'all' (every op, default mode)")
    p.add_argument("--mode", choices=MODES, default=None, help="default: the op's own (see --list)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--preset", choices=("quick", "default", "full"), default=None,
                   help="shape set; default: quick with --op all, else default")
    for key in SHAPE_FLAGS:
        flag = "--top-k" if key == "top_k" else f"--{key}"
        p.add_argument(flag, dest=f"shape_{key}", default=None, metavar="LIST",
                       help="comma list; replaces the preset by the product over the op's base shape"
                       + (" (0/1)" if key == "causal" else ""))
    p.add_argument("--backends", default=None,
                   help="comma list of attnkit backends (reference, triton, cuda), comparators and peers; "
                        "default: every attnkit backend that accepts the input, comparators, installed peers")
    p.add_argument("--out", default="bench_results", help="output folder (default bench_results/)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--min-reps", type=int, default=None)
    p.add_argument("--max-reps", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=None, help="target measuring time per case and backend")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-l2-flush", action="store_true", help="CUDA: do not flush L2 between repeats")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the bf16 dense peak")
    p.add_argument("--peak-gbps", type=float, default=None, help="override the HBM bandwidth peak")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; default 1 on CPU (steadier timings on shared machines), "
                        "0 keeps torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="list ops, modes, presets and runners, then exit")
    return p


def _print_list(device: torch.device) -> None:
    kind = "cuda" if device.type == "cuda" else "cpu"
    for name, cfg in OPS.items():
        print(f"{name}: {cfg.summary}")
        print(f"  modes {', '.join(cfg.modes)} (default {cfg.default_mode}); metric {cfg.metric}; x {cfg.x}")
        for preset in ("quick", "default", "full"):
            print(f"  {preset} ({kind}): {len(cfg.presets[preset][kind])} shapes")
        print(f"  runners: {', '.join(all_runner_names(cfg))}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith("--op") and "cp_" in a or a.startswith("cp_") for a in argv):  # context parallel
        from benchmarks import distributed
        return distributed.main(argv)
    args = parser().parse_args(argv)
    args.argv = argv
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser().error("--device cuda but torch.cuda.is_available() is False")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.list:
        _print_list(device)
        return 0
    if args.op is None:
        parser().error("--op is required (an op name, a comma list, or 'all'); see --list")
    ops = list(ALL) if args.op == "all" else _list(args.op, str)
    args.preset = args.preset or ("quick" if args.op == "all" else "default")
    for op in ops:
        if op not in OPS:
            parser().error(f"--op must be one of {', '.join(OPS)} or 'all', got {op!r}")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    requested = None
    if args.backends:
        requested = _list(args.backends, str)
        unknown = [n for n in requested
                   if not any(canonical_name(OPS[op], n) in all_runner_names(OPS[op]) for op in ops)]
        if unknown:
            parser().error(f"--backends: {', '.join(unknown)} is not a runner of {', '.join(ops)} "
                           "(see --list)")
    overrides = {k: _list(getattr(args, f"shape_{k}"), cast) for k, cast in SHAPE_FLAGS.items()
                 if getattr(args, f"shape_{k}") is not None}

    torch.manual_seed(args.seed)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    peak = models.peak_for(report.device_name(device)) if device.type == "cuda" else None
    if args.peak_tflops is not None or args.peak_gbps is not None:
        base = peak or models.Peak("user", float("nan"), float("nan"))
        peak = models.Peak(f"{base.name} (overridden)", args.peak_tflops or base.bf16_tflops,
                           args.peak_gbps or base.hbm_gbps)
    machine = report.machine_info(device, peak)
    out_dir = report.ensure_dir(args.out)
    args.plot = not args.no_plot and report.can_plot()
    budget = budget_for(device, args.preset, args)
    print(f"# {machine['device_name']} | torch {machine['torch']} | triton {machine['triton']} | "
          f"attnkit {machine['attnkit']} | peak "
          + (f"{peak.bf16_tflops:g} TFLOP/s bf16, {peak.hbm_gbps:g} GB/s ({peak.name})" if peak else "n/a"))
    if not args.no_plot and not args.plot:
        print(f"# {report.PLOTS_SKIPPED}", flush=True)

    for op in ops:
        cfg = OPS[op]
        mode = args.mode or cfg.default_mode
        if mode not in cfg.modes:
            if len(ops) > 1:
                print(f"\n== {op}: no {mode} mode (has {', '.join(cfg.modes)}), skipped")
                continue
            parser().error(f"{op} has modes {', '.join(cfg.modes)}, got --mode {mode}")
        backends = None
        if requested:
            valid = all_runner_names(cfg)
            backends = [n for n in (canonical_name(cfg, r) for r in requested) if n in valid]
            if not backends:
                print(f"\n== {op}: none of --backends {args.backends} applies (runners: {', '.join(valid)})")
                continue
        shapes = explicit_cases(cfg, device, overrides) if overrides else cfg.cases(args.preset, device)
        run_op(cfg, mode, shapes, device, dtype, backends, budget, peak, args, out_dir, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
