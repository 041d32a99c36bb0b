"""Paged vs contiguous decode, the native kernel alone and through the public op (CPU).

    python benchmarks/bench_paged_kernel.py                      # the CPU `paged_decode` default shapes
    python benchmarks/bench_paged_kernel.py --shapes 1x4096 --block-size 17
    python benchmarks/bench_paged_kernel.py --modules NAME_A,NAME_B   # A/B of two built extensions

`benchmarks/run.py --op paged_decode` times the public op, which adds the per-call validation
(on CPU tensors it reads `cache_seqlens` and the used `block_table` entries every call) to the
kernel. This script separates the two: `kernel` calls the extension's `attention_decode` directly
with the same tensors (a shuffled block pool next to the contiguous cache, `--dtype`, 1 thread),
`api` calls `attnkit.attention_decode`. Variants run in bursts (`--burst` timed calls after 5
untimed ones, as run.py does), cycled `--rounds` times so that load changes hit every variant alike;
medians over all timed calls. `--modules` loads already built extension modules by name (see
`python -m attnkit.native --status`) from torch's extension folder or `$ATTNKIT_BUILD_DIR`, to
compare kernel versions in one process (then only `kernel` variants run).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import torch

import attnkit
from attnkit.native import _build


def load_module(name: str):
    path = _build.build_root() / name / f"{name}.so"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="1x1024,1x4096,1x16384,4x1024,4x4096", help="BxS list")
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--Hk", type=int, default=2)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--burst", type=int, default=25)
    ap.add_argument("--modules", default="", help="comma list of built extension module names")
    args = ap.parse_args()
    torch.set_num_threads(1)
    mods = {n[-6:]: load_module(n) for n in args.modules.split(",") if n}
    if not mods:
        mods = {"kernel": attnkit.native.load()}
    H, Hk, D, bs = args.H, args.Hk, args.D, args.block_size
    dt = getattr(torch, args.dtype)
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, load average {os.getloadavg()[0]:.1f}, "
          f"H={H} Hk={Hk} D={D} block_size={bs}, {args.dtype}, 1 thread; medians in ms, GB/s of the KV read")
    for shape in args.shapes.split(","):
        B, S = (int(x) for x in shape.split("x"))
        torch.manual_seed(0)
        nb = -(-S // bs)
        q = torch.randn(B, 1, H, D, dtype=dt)
        k, v = torch.randn(B, nb * bs, Hk, D, dtype=dt), torch.randn(B, nb * bs, Hk, D, dtype=dt)
        perm = torch.randperm(B * nb)
        table = perm.view(B, nb).to(torch.int32).contiguous()
        kp, vp = torch.empty(B * nb, bs, Hk, D, dtype=dt), torch.empty(B * nb, bs, Hk, D, dtype=dt)
        kp[perm], vp[perm] = k.view(B * nb, bs, Hk, D), v.view(B * nb, bs, Hk, D)
        lens = torch.full((B,), S, dtype=torch.int32)
        scale = D ** -0.5
        fns = {}
        for tag, m in mods.items():
            fns[f"{tag} contiguous"] = (lambda m=m: m.attention_decode(q, k, v, lens, None, None, scale, -1, 0.0,
                                                                       None, 0, 0))
            fns[f"{tag} paged"] = (lambda m=m: m.attention_decode(q, kp, vp, lens, None, None, scale, -1, 0.0,
                                                                  table, 0, 0))
        if not args.modules:
            fns["api contiguous"] = lambda: attnkit.attention_decode(q, k, v, lens, scale=scale)
            fns["api paged"] = lambda: attnkit.attention_decode(q, kp, vp, lens, scale=scale, block_table=table)
        ref = next(iter(fns.values()))()
        for name, f in fns.items():  # every variant attends over the same tokens
            tol = dict(rtol=1e-5, atol=1e-6) if dt == torch.float32 else {}
            torch.testing.assert_close(f(), ref, **tol, msg=lambda m, n=name: f"{n}: {m}")
        times: dict[str, list[float]] = {n: [] for n in fns}
        for _ in range(args.rounds):
            for name, f in fns.items():
                for _ in range(5):
                    f()
                for _ in range(args.burst):
                    t0 = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t0)
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        kv = 2 * B * S * Hk * D * k.element_size()
        cells = [f"{n} {m:.3f} ({kv / m / 1e6:.2f})" for n, m in med.items()]
        tags = list(mods) + ([] if args.modules else ["api"])
        ratios = [f"{t} paged/contiguous GB/s {med[f'{t} contiguous'] / med[f'{t} paged']:.3f}" for t in tags]
        print(f"B{B} S{S}: " + "  ".join(cells) + "  | " + "  ".join(ratios), flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
