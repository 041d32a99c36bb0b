"""CPU decode benchmark: the native CPU kernel vs the reference vs PyTorch SDPA.

One single-token decode step (`Tq = 1`) over a full KV cache of `context` tokens per row, in the
cache layout attnkit uses (`[B, S, Hk, D]`). Backends:

* ``native``: ``attnkit.attention_decode(..., backend="cuda")`` (its CPU kernel, csrc/cpu);
* ``reference``: ``backend="reference"``;
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)`` on the
  same cache, viewed as `[B, Hk, S, D]` (no copy; what a model holding this cache would call).

Inputs are built outside the timed region; each case runs `--warmup` untimed calls, then
`--reps` timed ones; the table shows the median and the 20th/80th percentiles, the effective
bandwidth (K and V bytes read once, divided by the median) and the speed-ups of ``native``.
Other processes sharing the CPU inflate the times: run it several times and keep the best.

Examples:
    python benchmarks/bench_native_cpu.py                       # the target case: B=8, S=8k
    python benchmarks/bench_native_cpu.py --grid                # batch 1/8/32 x context 1k/8k/32k
    python benchmarks/bench_native_cpu.py --batch 1 4 --context 2048 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attnkit  # noqa: E402
import attnkit.native  # noqa: E402  (registers the native backend)

BACKENDS = ("native", "reference", "sdpa")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure(step, warmup: int, reps: int) -> tuple[float, float, float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return quantile(times, 0.5), quantile(times, 0.2), quantile(times, 0.8)


def steps(B: int, S: int, H: int, Hk: int, D: int, dtype: torch.dtype):
    q = torch.randn(B, 1, H, D, dtype=dtype)
    k_cache = torch.randn(B, S, Hk, D, dtype=dtype)
    v_cache = torch.randn(B, S, Hk, D, dtype=dtype)
    lens = torch.full((B,), S, dtype=torch.int32)
    q_sdpa, k_sdpa, v_sdpa = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    return {
        "native": lambda: attnkit.attention_decode(q, k_cache, v_cache, lens, backend="cuda"),
        "reference": lambda: attnkit.attention_decode(q, k_cache, v_cache, lens, backend="reference"),
        "sdpa": lambda: F.scaled_dot_product_attention(q_sdpa, k_sdpa, v_sdpa, enable_gqa=True),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--context", type=int, nargs="+", default=[8192])
    p.add_argument("--grid", action="store_true", help="batch 1 8 32 x context 1024 8192 32768")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--max-cache-gb", type=float, default=3.0, help="skip cases whose K+V cache is larger")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches, contexts = ([1, 8, 32], [1024, 8192, 32768]) if args.grid else (args.batch, args.context)
    dtype = getattr(torch, args.dtype)
    H, Hk, D = args.heads, args.kv_heads, args.head_dim

    attnkit.native.load()  # build (or load) before timing anything
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')} | {cpu_name()} | {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads | torch {torch.__version__} | "
          f"H={H} Hk={Hk} D={D} {args.dtype} | median of {args.reps} (p20-p80)")
    cols = " | ".join(f"{b:>22}" for b in args.backends)
    print(f"| {'B':>3} | {'context':>7} | {cols} | native GB/s | x ref | x sdpa |")
    print("|" + "---|" * (5 + len(args.backends)))
    for B in batches:
        for S in contexts:
            cache_bytes = 2 * B * S * Hk * D * torch.finfo(dtype).bits // 8
            if cache_bytes > args.max_cache_gb * 2**30:
                print(f"| {B:>3} | {S:>7} | skipped: K+V cache of {cache_bytes / 2**30:.1f} GiB > --max-cache-gb |")
                continue
            fns = steps(B, S, H, Hk, D, dtype)
            res = {name: measure(fns[name], args.warmup, args.reps) for name in args.backends}
            del fns
            cells = " | ".join(f"{res[n][0] * 1e3:8.2f} ({res[n][1] * 1e3:.1f}-{res[n][2] * 1e3:.1f})"
                               .rjust(22) for n in args.backends)
            gbs = f"{cache_bytes / res['native'][0] / 1e9:11.1f}" if "native" in res else " " * 11
            x_ref = (f"{res['reference'][0] / res['native'][0]:5.1f}" if {"native", "reference"} <= res.keys()
                     else " " * 5)
            x_sdpa = f"{res['sdpa'][0] / res['native'][0]:6.1f}" if {"native", "sdpa"} <= res.keys() else " " * 6
            print(f"| {B:>3} | {S:>7} | {cells} | {gbs} | {x_ref} | {x_sdpa} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
