"""One small call of each kernel family on a CUDA device (for `compute-sanitizer`, run by
`benchmarks/gpu_run.sh`): attention fwd+bwd (with and without QK-norm), qk_norm fwd+bwd,
attention_decode (append + split-KV), linear/lightning attention fwd+bwd, the recurrent steps,
Loki decode and cache append, and the native `cuda` backend's decode kernels when built.

    python benchmarks/gpu_smoke.py [--family NAME ...] [--dtype bfloat16]

Prints one line per family (`ok`, `skipped: reason` or the error) and exits 1 if one failed.
Shapes are small and odd (lengths not multiples of the tiles) so masking paths run too.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import attnkit  # noqa: E402


DEVICE = "cuda"


def _r(*shape, dtype, grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)


def attention(dtype):
    q, k, v = _r(2, 197, 8, 128, dtype=dtype, grad=True), _r(2, 197, 2, 128, dtype=dtype, grad=True), \
        _r(2, 197, 2, 128, dtype=dtype, grad=True)
    o = attnkit.attention(q, k, v, causal=True, backend="triton")
    o.float().sum().backward()
    w = torch.ones(128, device=DEVICE, requires_grad=True)
    o = attnkit.attention(q, k, v, causal=True, qk_norm="rms", q_norm_weight=w, k_norm_weight=w, backend="triton")
    o.float().sum().backward()


def qk_norm(dtype):
    x = _r(2, 77, 8, 128, dtype=dtype, grad=True)
    attnkit.qk_norm(x, torch.ones(128, device=DEVICE), backend="triton").float().sum().backward()


def decode(dtype):
    B, S, H, Hk, D = 3, 1000, 8, 2, 128
    kc, vc = _r(B, S, Hk, D, dtype=dtype), _r(B, S, Hk, D, dtype=dtype)
    seqlens = torch.tensor([0, 517, 998], device=DEVICE, dtype=torch.int32)
    attnkit.attention_decode(_r(B, 1, H, D, dtype=dtype), kc, vc, seqlens, k_new=_r(B, 1, Hk, D, dtype=dtype),
                             v_new=_r(B, 1, Hk, D, dtype=dtype), backend="triton")


def linear(dtype):
    q, k, v = (_r(2, 201, 4, 128, dtype=dtype, grad=True) for _ in range(3))
    o, _ = attnkit.lightning_attention(q, k, v, attnkit.lightning_slopes(4).to(DEVICE), output_final_state=True,
                                       backend="triton")
    o.float().sum().backward()
    o, _ = attnkit.linear_attention(q, k, v, feature_map="elu", normalize=True, backend="triton")
    o.float().sum().backward()


def step(dtype):
    q, k, v = (_r(3, 1, 4, 128, dtype=dtype) for _ in range(3))
    state = torch.zeros(3, 4, 128, 128, device=DEVICE)
    attnkit.linear_attention_step(q, k, v, state, decay=attnkit.lightning_slopes(4).to(DEVICE), backend="triton")


def loki(dtype):
    B, S, H, Hk, D = 2, 1000, 8, 2, 128
    basis = attnkit.loki_calibrate(torch.randn(512, Hk, D, device=DEVICE))
    from attnkit.ops.loki.cache import LokiCache

    cache = LokiCache(basis, B, S, max_rank=32, dtype=dtype, device=DEVICE)
    cache.append(_r(B, 300, Hk, D, dtype=dtype), _r(B, 300, Hk, D, dtype=dtype), backend="triton")
    cache.attend(_r(B, 1, H, D, dtype=dtype), rank=32, top_k=64, backend="triton")
    kc = attnkit.loki_rotate(_r(B, S, Hk, D, dtype=dtype), basis).contiguous()
    seqlens = torch.tensor([5, 999], device=DEVICE, dtype=torch.int32)
    attnkit.loki_attention_decode(_r(B, 1, H, D, dtype=dtype), kc, _r(B, S, Hk, D, dtype=dtype), seqlens, basis,
                                  rank=32, top_k=100, backend="triton")


def native(dtype):
    B, S, H, Hk, D = 3, 1000, 8, 2, 128
    kc, vc = _r(B, S, Hk, D, dtype=dtype), _r(B, S, Hk, D, dtype=dtype)
    seqlens = torch.tensor([1, 517, 998], device=DEVICE, dtype=torch.int32)
    ex = attnkit.explain("attention_decode", _r(B, 1, H, D, dtype=dtype), kc, vc, seqlens, backend="cuda")
    if ex.backend != "cuda":
        raise _Skip(str(ex))
    attnkit.attention_decode(_r(B, 1, H, D, dtype=dtype), kc, vc, seqlens, backend="cuda")


class _Skip(Exception):
    pass


FAMILIES = dict(attention=attention, qk_norm=qk_norm, decode=decode, linear=linear, step=step, loki=loki,
                native=native)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", action="append", choices=sorted(FAMILIES))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--device", default="cuda", help="cuda; cpu only to check this script (TRITON_INTERPRET=1, "
                                                     "float32)")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    failed = False
    for name in args.family or list(FAMILIES):
        torch.manual_seed(0)
        try:
            FAMILIES[name](dtype)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            print(f"{name}: ok", flush=True)
        except _Skip as e:
            print(f"{name}: skipped: {e}", flush=True)
        except Exception:  # noqa: BLE001 - report every family
            failed = True
            print(f"{name}: FAILED\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
