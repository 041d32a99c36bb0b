"""Dispatch overhead: what the public op adds on top of calling a backend implementation.

For tiny inputs (so the kernel itself costs little), each op is timed four ways:

* ``direct``: the backend implementation called with already-prepared keyword arguments
  (``attnkit.dispatch.implementation(op, backend)(**call.kwargs)``), no validation, no custom op;
* ``custom op``: the ``torch.ops.attnkit.<op>`` call the public function makes (torch's
  dispatcher, the op's autograd wrapper), no validation;
* ``public``: ``attnkit.<op>(..., backend=<backend>)``: validation (shape, dtype and, on CPU
  tensors, value checks) or its cached signature, cached backend choice, then the backend
  (eager calls run it directly; docs/compile.md);
* ``public auto``: the same with the automatic backend choice (``backend=None``);
* ``validate``: the prepare step alone (shape/dtype/option checks; on CPU tensors also the value
  checks, which read small tensors on the host);
* ``added``: ``public`` with the backend implementation replaced by a function that does nothing,
  i.e. exactly what the public op adds to the kernel call (validation or its cached signature,
  value checks, backend choice, argument building). ``public - direct`` estimates the same but
  subtracts two noisy timings of the kernel.

The table shows medians in µs, ``added``, and the overheads ``public - direct`` and
``custom op - direct``.
Each timing is the median of `--reps` batches of `--inner` calls after `--warmup` calls.
Other processes sharing the CPU inflate wall-clock times: ``--clock process`` measures this
process's CPU time instead (``time.process_time``; CPU tensors only, 1 thread), which contention
inflates far less.

Examples:
    python benchmarks/bench_dispatch_overhead.py
    python benchmarks/bench_dispatch_overhead.py --ops qk_norm attention_decode --reps 50
    python benchmarks/bench_dispatch_overhead.py --ops loki_attention_decode loki_cache_append --clock process
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnkit  # noqa: E402
from attnkit import _custom_ops, dispatch  # noqa: E402
from attnkit.ops import loki as loki_ops  # noqa: E402
from attnkit.native import _build  # noqa: E402


def _native() -> str:
    return "cuda" if not _build.static_reasons("cpu") else "reference"


def cases(device: str) -> dict[str, tuple[str, callable, dict]]:
    """case -> (backend, public function, tiny arguments); a case is an op name, optionally with a
    `[label]` (e.g. ``attention_decode[paged]``)."""
    r = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    lens = torch.tensor([5, 9], dtype=torch.int32, device=device)
    native = "cuda" if device == "cuda" else _native()
    decay = torch.tensor([0.1, 0.2, 0.3, 0.4], device=device)
    basis = attnkit.loki_calibrate(torch.randn(64, 2, 16)).to(device)
    table = torch.arange(8, dtype=torch.int32, device=device).view(2, 4)  # 8 blocks of 4 tokens
    return {
        "qk_norm": ("reference", attnkit.qk_norm, dict(args=(r(2, 1, 4, 16), r(16)))),
        "attention": ("reference", attnkit.attention,
                      dict(args=(r(1, 4, 2, 16), r(1, 4, 2, 16), r(1, 4, 2, 16)), kwargs=dict(causal=True))),
        "attention_decode": (native, attnkit.attention_decode,
                             dict(args=(r(2, 1, 4, 16), r(2, 16, 2, 16), r(2, 16, 2, 16), lens))),
        # paged: the block table's value checks run on every call
        "attention_decode[paged]": (native, attnkit.attention_decode,
                                    dict(args=(r(2, 1, 4, 16), r(8, 4, 2, 16), r(8, 4, 2, 16), lens),
                                         kwargs=dict(block_table=table))),
        "linear_attention_step": (native, attnkit.linear_attention_step,
                                  dict(args=(r(2, 1, 4, 16), r(2, 1, 2, 16), r(2, 1, 2, 16), torch.zeros(
                                      2, 2, 16, 16, device=device)))),
        "linear_attention": ("reference", attnkit.linear_attention,
                             dict(args=(r(1, 4, 2, 16), r(1, 4, 2, 16), r(1, 4, 2, 16)))),
        "lightning_attention": ("reference", attnkit.lightning_attention,
                                dict(args=(r(1, 4, 4, 16), r(1, 4, 2, 16), r(1, 4, 2, 16), decay))),
        "loki_attention_decode": (native, attnkit.loki_attention_decode,
                                  dict(args=(r(2, 1, 4, 16), r(2, 16, 2, 16), r(2, 16, 2, 16), lens, basis),
                                       kwargs=dict(rank=4, top_k=4))),
        "loki_attention_decode_lowrank[paged]": ("reference", loki_ops.loki_attention_decode_lowrank,
                                          dict(args=(r(2, 1, 4, 16), r(8, 2, 4, 4), r(8, 4, 2, 16), r(8, 4, 2, 16),
                                                     lens, basis), kwargs=dict(rank=4, top_k=4, block_table=table))),
        "loki_cache_append": ("reference", loki_ops.loki_cache_append,
                              dict(args=(r(2, 1, 2, 16), r(2, 1, 2, 16), r(2, 16, 2, 16), r(2, 16, 2, 16), lens,
                                         basis), kwargs=dict(k_lowrank=r(2, 2, 16, 4)))),
    }


CLOCK = time.perf_counter


def _time(fn, warmup: int, reps: int, inner: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(reps):
        t0 = CLOCK()
        for _ in range(inner):
            fn()
        sync()
        samples.append((CLOCK() - t0) / inner)
    return statistics.median(samples) * 1e6


def _noop(**kwargs):
    return None


def _time_added(name: str, backend: str, call, args, sync) -> float:
    """`call()` (a public op) with `backend`'s implementation replaced by a no-op."""
    impl = dispatch._IMPLS[name][backend]
    target = impl.target
    impl.target = _noop
    dispatch._CHOICES.clear()  # drops cached records that hold the real function
    try:
        return _time(call, args.warmup, args.reps, args.inner, sync)
    finally:
        impl.target = target
        dispatch._CHOICES.clear()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ops", nargs="*", default=None)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--inner", type=int, default=200)
    p.add_argument("--clock", choices=("wall", "process"), default="wall")
    args = p.parse_args(argv)
    global CLOCK
    if args.clock == "process":
        if args.device != "cpu":
            p.error("--clock process measures CPU time: CPU tensors only")
        CLOCK = time.process_time
    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    all_cases = cases(args.device)
    names = args.ops or list(all_cases)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"clock={args.clock} (median of {args.reps} x {args.inner} calls, µs per call)")
    head = f"{'op':36s} {'backend':10s} {'direct':>8s} {'custom op':>10s} {'public':>8s} {'auto':>8s}" \
           f" {'validate':>9s} {'added':>6s} {'public-direct':>14s} {'op-direct':>10s}"
    print(head)
    print("-" * len(head))
    with torch.no_grad():
        for case in names:
            backend, public, a = all_cases[case]
            name = case.split("[")[0]
            pos, kw = a["args"], a.get("kwargs", {})
            call = dispatch._OPS[name](*pos, **kw)
            impl = dispatch.implementation(name, backend)
            caller = _custom_ops.CALLERS[name]
            public(*pos, **kw, backend=backend)  # builds/loads what the backend needs, fills the choice cache
            t_direct = _time(lambda: impl(**call.kwargs), args.warmup, args.reps, args.inner, sync)
            t_op = _time(lambda: caller(call.kwargs, backend), args.warmup, args.reps, args.inner, sync)
            t_pub = _time(lambda: public(*pos, **kw, backend=backend), args.warmup, args.reps, args.inner, sync)
            t_auto = _time(lambda: public(*pos, **kw), args.warmup, args.reps, args.inner, sync)
            prepare = dispatch._OPS[name]
            t_val = _time(lambda: prepare(*pos, **kw), args.warmup, args.reps, args.inner, sync)
            t_add = _time_added(name, backend, lambda: public(*pos, **kw, backend=backend), args, sync)
            print(f"{case:36s} {backend:10s} {t_direct:8.1f} {t_op:10.1f} {t_pub:8.1f} {t_auto:8.1f}"
                  f" {t_val:9.1f} {t_add:6.1f} {t_pub - t_direct:14.1f} {t_op - t_direct:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
