"""Context-parallel benchmarks: `attnkit.distributed` ops over N ranks.

    python benchmarks/run.py --op cp_lightning_attention --nproc 2 --T 4096,16384
    python benchmarks/distributed.py --op cp_attention --nproc 4 --mode fwd+bwd --causal 1 --layout zigzag
    torchrun --nproc_per_node 8 benchmarks/distributed.py --op cp_lightning_attention --T 65536   # GPUs

Without torchrun's environment the script launches `--nproc` ranks itself (torchrun-style env,
TCP rendezvous on localhost), NCCL when there is one GPU per rank, gloo on CPUs otherwise. For
every `T` it reports, on rank 0: the median time of the context-parallel call (each repeat starts
after a barrier and ends when every rank is done), the payload bytes each rank contributes to the
collectives and the bytes it sends on the wire (ring algorithms: `(P-1)×` the payload, counted by
`attnkit.distributed._comm.ByteCounter`, the wrapper of the `torch.distributed` collectives that
tests/cp_worker.py uses too), the time of the single-process op over the whole sequence on one
rank, and the ratio of the two. Results also go to
`<out>/<op>_<mode>_np<N>_<device>.json`. Method and volume model: docs/distributed.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

OPS = ("cp_lightning_attention", "cp_linear_attention", "cp_attention")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", required=True, help=f"comma list of {', '.join(OPS)}")
    p.add_argument("--nproc", type=int, default=2, help="ranks to launch when not under torchrun (default 2)")
    p.add_argument("--mode", default="fwd", choices=("fwd", "fwd+bwd"))
    p.add_argument("--T", default=None, help="comma list of whole-sequence lengths (default: by device)")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--Hk", type=int, default=None, help="KV heads (default H; lightning: H)")
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--causal", type=int, default=1, help="softmax/linear: 1 causal, 0 not")
    p.add_argument("--layout", default="zigzag", help="softmax layout (contiguous or zigzag)")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--backend", default=None, help="attnkit backend of the local op (default automatic)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=600.0, help="collective timeout and launch bound")
    p.add_argument("--out", default="bench_results")
    return p


# ---------------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], nproc: int, timeout_s: float) -> int:
    """Start `nproc` ranks of this script (torchrun-style environment); bounded by `timeout_s`."""
    env = dict(os.environ, WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        print(f"benchmark ranks did not finish within {timeout_s:.0f} s", file=sys.stderr)
        return 1
    return max(p.returncode for p in procs)


# ---------------------------------------------------------------------------------- measuring


def _inputs(op: str, args, T: int, dtype, device, grad: bool):
    g = torch.Generator().manual_seed(0)
    H = args.H
    Hk = H if op == "cp_lightning_attention" or args.Hk is None else args.Hk

    def rnd(*s):
        return (torch.randn(*s, generator=g) * 0.5).to(device=device, dtype=dtype).requires_grad_(grad)
    q, k, v = rnd(args.B, T, H, args.D), rnd(args.B, T, Hk, args.D), rnd(args.B, T, Hk, args.D)
    return q, k, v


def _calls(op: str, args, world: int):
    import attnkit
    import attnkit.distributed as akd
    decay = attnkit.lightning_slopes(args.H)
    be = args.backend
    causal = bool(args.causal)
    layout = args.layout if op == "cp_attention" else "contiguous"
    if op == "cp_lightning_attention":
        return (lambda q, k, v: akd.lightning_attention(q, k, v, decay.to(q.device), backend=be)[0],
                lambda q, k, v: attnkit.lightning_attention(q, k, v, decay.to(q.device), backend=be)[0], layout)
    if op == "cp_linear_attention":
        kw = dict(causal=causal, feature_map="elu", normalize=True, backend=be)
        return (lambda q, k, v: akd.linear_attention(q, k, v, **kw)[0],
                lambda q, k, v: attnkit.linear_attention(q, k, v, **kw)[0], layout)
    return (lambda q, k, v: akd.attention(q, k, v, causal=causal, layout=layout, backend=be),
            lambda q, k, v: attnkit.attention(q, k, v, causal=causal, backend=be), layout)


def _time(fn, inputs, mode: str, reps: int, warmup: int, device, barrier: bool) -> float:
    def once():
        out = fn(*inputs)
        if mode == "fwd+bwd":
            out.float().sum().backward()
            for x in inputs:
                x.grad = None
    for _ in range(warmup):
        once()
    times = []
    for _ in range(reps):
        if barrier:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        once()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if barrier:
            dist.barrier()  # the step ends when the slowest rank is done
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_rank(args) -> int:
    import attnkit.distributed as akd
    from attnkit.distributed._comm import ByteCounter  # the payload counter tests/cp_worker.py uses too
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if use_cuda else "gloo",
                            timeout=datetime.timedelta(seconds=args.timeout_s))
    counter = ByteCounter()
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        args.dtype or ("bfloat16" if use_cuda else "float32")]
    Ts = [int(t) for t in args.T.split(",")] if args.T else ([16384, 65536] if use_cuda else [1024, 4096])
    rows = []
    for op in args.op.split(","):
        if op not in OPS:
            raise SystemExit(f"--op must be in {OPS}, got {op!r}")
        cp, single, layout = _calls(op, args, world)
        for T in Ts:
            grad = args.mode == "fwd+bwd"
            full = _inputs(op, args, T, dtype, device, False)
            local = [akd.shard_sequence(x, layout=layout).detach().requires_grad_(grad) for x in full]
            counter.take_bytes()
            out = cp(*local)
            if grad:
                out.float().sum().backward()
            payload = counter.take_bytes()
            t_cp = _time(cp, local, args.mode, args.reps, args.warmup, device, barrier=True)
            t_single = None
            if rank == 0:  # the whole sequence on one device, while the other ranks wait
                xs = [x.detach().requires_grad_(grad) for x in full]
                t_single = _time(single, xs, args.mode, args.reps, args.warmup, device, barrier=False)
            dist.barrier()
            row = dict(op=op, mode=args.mode, nproc=world, T=T, B=args.B, H=args.H, Hk=local[1].shape[2], D=args.D,
                       dtype=str(dtype).replace("torch.", ""), device=device.type, layout=layout,
                       time_ms=t_cp * 1e3, single_ms=None if t_single is None else t_single * 1e3,
                       ratio=None if t_single is None else t_cp / t_single,
                       payload_bytes_per_rank=payload, wire_bytes_per_rank=(world - 1) * payload)
            rows.append(row)
            if rank == 0:
                print(f"{op:24s} {args.mode:8s} P={world} T={T:7d} {row['time_ms']:9.2f} ms  single "
                      f"{row['single_ms']:9.2f} ms  ratio {row['ratio']:.2f}  payload/rank {payload:,} B  "
                      f"wire/rank {(world - 1) * payload:,} B", flush=True)
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = f"{args.op.replace(',', '+')}_{args.mode}_np{world}_{device.type}.json"
        (out / name).write_text(json.dumps(rows, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if "RANK" not in os.environ:
        return launch(argv, args.nproc, args.timeout_s)
    return run_rank(args)


if __name__ == "__main__":
    sys.exit(main())
