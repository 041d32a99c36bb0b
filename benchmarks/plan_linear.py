"""Launch plan of the chunked linear/lightning kernels at a given shape, without a GPU.

Runs the host launchers of `attnkit/ops/linear/triton_chunk.py` on CPU tensors under
`attnkit.tools._recorder.recording()` (kernels are recorded, not run) and prints each launch's
grid, program count and serial loop length, plus the host allocations, next to the op's byte floor.

    ATTNKIT_SM_COUNT=132 python benchmarks/plan_linear.py --B 2 --T 16384 --H 16 --D 128
"""

from __future__ import annotations

import argparse
import os

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from attnkit.tools._recorder import recording  # noqa: E402
from attnkit.ops.linear import triton_chunk as host  # noqa: E402


def plan(B, T, H, Hk, D, op="lightning", dtype=torch.bfloat16):
    q = torch.zeros(B, T, H, D, dtype=dtype)
    k = torch.zeros(B, T, Hk, D, dtype=dtype)
    v = torch.zeros(B, T, Hk, D, dtype=dtype)
    light = op == "lightning"
    HS = H if light else Hk
    decay = torch.rand(H) if light else None
    kw = dict(decay=decay, scale=D ** -0.5, feature_map=None if light else "elu", normalize=not light,
              causal=True, state_heads=HS)
    allocs = []
    real_empty, real_new_empty = torch.empty, torch.Tensor.new_empty

    def track(t):
        allocs.append((list(t.shape), t.dtype, t.numel() * t.element_size()))
        return t

    torch.empty = lambda *a, **k: track(real_empty(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: track(real_new_empty(self, *a, **k))
    try:
        with recording() as state:
            o, ht, zt, den, s_in, z_in, p = host.chunk_linear_fwd(
                q, k, v, eps=1e-6, h0=None, z0=None, output_final_state=False, cu_seqlens=None,
                keep_fp32_output=False, **kw)
            host.chunk_linear_bwd(q, k, v, torch.zeros_like(o, dtype=dtype), None, None, o=o if not light else None,
                                  den=den, s_in=s_in, z_in=z_in, plan=p, cu_seqlens=None, need_dh0=False, **kw)
    finally:
        torch.empty, torch.Tensor.new_empty = real_empty, real_new_empty
    return state, allocs, p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--Hk", type=int)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--op", default="lightning", choices=["lightning", "linear"])
    a = ap.parse_args()
    state, allocs, p = plan(a.B, a.T, a.H, a.Hk or a.H, a.D, a.op)
    print(f"{a.op} fwd+bwd bf16 B={a.B} T={a.T} H={a.H} D={a.D}; SMs={host.sm_count()} SEG={p.SEG} "
          f"segments/seq={p.NS} slots={p.nseg}")
    seen = set()
    for L in state.launches:
        key = (L.kernel, L.grid, str(sorted((k, str(v)) for k, v in L.scalars.items())))
        if key in seen:
            continue
        seen.add(key)
        g = L.grid
        prog = g[0] * g[1] * g[2]
        sc = {**L.scalars, **L.config}
        if L.kernel == "_segment_scan_kernel":
            loop = f"{sc['NS']} segments"
        else:
            loop = f"{-(-min(sc['SEG'], sc['T']) // sc.get('BT', 64))} chunks"
        print(f"  {L.kernel:24} grid={str(g):18} programs={prog:6d} loop={loop}")
    tot = sum(b for _, _, b in allocs)
    tensor = a.B * a.T * a.H * a.D * 2
    floor = 11 * tensor  # fwd: q k v o; bwd: q k v do dq dk dv (bf16)
    print(f"  host allocations: {len(allocs)} tensors, {tot / 2**20:.1f} MiB "
          f"(outputs {sum(b for s, d, b in allocs if d == torch.bfloat16) / 2**20:.1f} MiB, "
          f"float32 {sum(b for s, d, b in allocs if d == torch.float32) / 2**20:.1f} MiB); "
          f"byte floor {floor / 2**20:.1f} MiB")
    f32 = sum(b for s, d, b in allocs if d == torch.float32)
    print(f"  float32 scratch / byte floor = {f32 / floor:.3f}")


if __name__ == "__main__":
    main()
