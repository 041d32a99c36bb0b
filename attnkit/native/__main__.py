"""`python -m attnkit.native --check | --build | --status`.

--check   compile every source without linking: each `.cu` file with nvcc for sm_80 and sm_90,
          the C++ files (and the CUDA branch of the bindings) with the host compiler, against
          torch's headers. Needs no GPU. One line per source/arch; exits 1 on any error.
--build   build (or rebuild) and load the extension now instead of on first use.
--status  where the extension is cached and whether it is built.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from . import _build


def _check(jobs: int, archs: list[str]) -> int:
    if _build.cxx() is None:
        print("FAIL no C++ compiler (set CXX or install g++)")
        return 1
    if _build.nvcc() is None:
        print("FAIL nvcc not found (set CUDA_HOME or put nvcc on PATH): the CUDA sources cannot be checked")
        return 1

    def run(job):
        label, cmd = job
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        out = cmd[cmd.index("-o") + 1]
        if os.path.exists(out):
            os.remove(out)
        return label, proc, time.perf_counter() - t0

    failed = 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for label, proc, dt in pool.map(run, _build.check_commands(archs)):
            ok = proc.returncode == 0
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {label} ({dt:.1f} s)", flush=True)
            if not ok:
                print((proc.stdout + proc.stderr).rstrip(), flush=True)
    print(f"{'all sources compile' if not failed else f'{failed} compile job(s) failed'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnkit.native", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="compile-only check of every source (no GPU needed)")
    mode.add_argument("--build", action="store_true", help="build and load the extension now")
    mode.add_argument("--status", action="store_true", help="print the cache location and build state")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")),
                        help="parallel compile jobs for --check (default: $MAX_JOBS or 2)")
    parser.add_argument("--arch", action="append", default=None,
                        help="SM architecture for --check, repeatable (default: 80 and 90)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler output of --build")
    args = parser.parse_args(argv)

    if args.check:
        return _check(max(1, args.jobs), args.arch or list(_build.CHECK_ARCHS))
    if args.status:
        print(f"module:   {_build.name()}")
        print(f"folder:   {_build.build_dir()}")
        print(f"kernels:  CPU ({_build.cpu_isa()[0]})" + (" + CUDA" if _build.with_cuda() else ""))
        print(f"built:    {_build.is_built()}")
        reasons = _build.static_reasons("cpu")
        print("state:    " + ("; ".join(reasons) if reasons else "usable"))
        return 0
    try:
        t0 = time.perf_counter()
        mod = _build.module(rebuild=True, verbose=args.verbose)
    except RuntimeError as e:
        print(f"FAIL {e}", file=sys.stderr)
        return 1
    print(f"built {_build.name()} in {time.perf_counter() - t0:.0f} s "
          f"({'CPU + CUDA' if mod.with_cuda else 'CPU'} kernels) in {_build.build_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
