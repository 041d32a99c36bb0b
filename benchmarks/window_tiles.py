"""Key tiles the Triton attention forward visits per query tile, from the kernel's own logic.

The forward kernel (`attnkit/ops/softmax/triton_attention.py`, `_attention_fwd_kernel`) gives a
block of `BM` packed query rows the key range of `key_range(t0, t1, ...)` and loops over the
tiles of `tile_split(...)`: `[a, u0)` and `[u1, b)` masked, `[u0, u1)` whole. This module runs
those two `@triton.jit` functions, unchanged, for every query block of a shape, in the Triton
interpreter, so the counts are what the kernel's loops do (no GPU needed, no copy of the
tile arithmetic here beyond the three lines that give each program its positions `t0, t1`).

The interpreter runs in a subprocess (`TRITON_INTERPRET=1` must be set before triton is
imported, and the calling process may be compiling real kernels on a GPU); a process that is
already interpreted (the test suite on CPU) runs it in place.

    python -m benchmarks.window_tiles --T 32768 --W 4096          # one shape, printed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attnkit.ops.softmax.triton_attention import key_range, tile_split, window_bounds  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The largest forward tile (fwd_configs); the tuned config on a GPU may be smaller (e.g. 128 x 64:
# twice the key tiles of half the size, the same keys).
BM, BN = 128, 128


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _probe(out, T, S, WL, WR, NB, G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
           HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, NBP: tl.constexpr):
    # lane i = the forward program of query block i_m = i (non-varlen: t_len = T, s_len = S); the
    # positions t0, t1 as in _attention_fwd_kernel, then the kernel's own key_range / tile_split
    i_m = tl.arange(0, NBP)
    rows_start = i_m * BM
    t0 = rows_start // G
    t1 = tl.minimum(T - 1, (rows_start + BM - 1) // G)
    lo, lo_full, hi, hi_full = key_range(t0, t1, S - T, S, WL, WR, HAS_WL, HAS_WR)
    a, u0, u1, b = tile_split(lo, lo_full, hi, hi_full, BN)
    masked = tl.cdiv(u0 - a, BN) + tl.cdiv(b - u1, BN)
    whole = tl.cdiv(u1 - u0, BN)
    keep = i_m < NB
    tl.store(out + i_m * 2, masked, mask=keep)
    tl.store(out + i_m * 2 + 1, whole, mask=keep)


def _count_here(T: int, S: int, G: int, window: tuple[int, int], bm: int, bn: int) -> list[tuple[int, int]]:
    wl, wr = window_bounds(window, causal=False)
    nb = triton.cdiv(T * G, bm)
    out = torch.zeros(2 * max(nb, 1), dtype=torch.int32)
    _probe[(1,)](out, T, S, max(wl, 0), max(wr, 0), nb, G=G, BM=bm, BN=bn, HAS_WL=wl >= 0,
                          HAS_WR=wr >= 0, NBP=triton.next_power_of_2(max(nb, 1)))
    return [(int(out[2 * i]), int(out[2 * i + 1])) for i in range(nb)]


def tiles_per_block(shapes: list[dict]) -> list[list[tuple[int, int]]]:
    """For each shape `{T, S, G, window, BM, BN}` (`window` = `(left, right)` with causal already
    folded in, i.e. causal is `right = 0`), the forward kernel's `(masked, whole)` key tiles of each
    query block."""
    if _interpreted():
        return [_count_here(s["T"], s["S"], s["G"], tuple(s["window"]), s["BM"], s["BN"]) for s in shapes]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    res = subprocess.run([sys.executable, "-m", "benchmarks.window_tiles", "--json"], input=json.dumps(shapes),
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"window tile probe failed: {res.stderr.strip().splitlines()[-1:]}")
    return [[tuple(x) for x in blocks] for blocks in json.loads(res.stdout)]


def summary(T: int, S: int, G: int, W: int, bm: int = BM, bn: int = BN) -> dict:
    """Tiles of causal attention with a window of `W` keys (`window=(W - 1, 0)`) next to full
    causal attention (`window=(-1, 0)`): mean and max key tiles per query tile, and the ratio of
    the totals (what a tile-skipping kernel's cost ratio should approach)."""
    win, full = tiles_per_block([dict(T=T, S=S, G=G, window=(W - 1, 0), BM=bm, BN=bn),
                                 dict(T=T, S=S, G=G, window=(-1, 0), BM=bm, BN=bn)])
    n_win = [m + w for m, w in win]
    n_full = [m + w for m, w in full]
    return {"BM": bm, "BN": bn, "query_tiles": len(win),
            "tiles_mean": sum(n_win) / max(len(n_win), 1), "tiles_max": max(n_win, default=0),
            "masked_mean": sum(m for m, _ in win) / max(len(win), 1),
            "full_tiles_mean": sum(n_full) / max(len(n_full), 1),
            "tile_ratio": sum(n_win) / max(sum(n_full), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.window_tiles", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="read shapes as JSON on stdin, write counts (internal)")
    p.add_argument("--T", type=int, default=32768)
    p.add_argument("--W", type=int, default=4096)
    p.add_argument("--G", type=int, default=1, help="query heads per KV head")
    p.add_argument("--BM", type=int, default=BM)
    p.add_argument("--BN", type=int, default=BN)
    args = p.parse_args(argv)
    if args.json:
        print(json.dumps(tiles_per_block(json.loads(sys.stdin.read()))))
        return 0
    s = summary(args.T, args.T, args.G, args.W, args.BM, args.BN)
    print(f"T={args.T} W={args.W} G={args.G} BM={s['BM']} BN={s['BN']}: {s['query_tiles']} query tiles, "
          f"{s['tiles_mean']:.2f} key tiles each on average (max {s['tiles_max']}, {s['masked_mean']:.2f} masked); "
          f"full causal {s['full_tiles_mean']:.2f}; windowed / full = {s['tile_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
