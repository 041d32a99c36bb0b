"""Compiles one recorded launch for a GPU target without a GPU and measures what the GPU would see.

Per variant: shared memory (Triton's metadata), registers and spill bytes (the ``ptxas -v`` log of
the ptxas Triton itself runs on the PTX, so the figures belong to the cubin Triton would load),
and the MMA kind of its products from the PTX: ``wgmma`` (Hopper warp-group MMA), ``mma.sync``
(Ampere-style warp MMA), ``mixed`` (both) or ``none`` (FMA units only).

Results are cached on disk keyed on the kernel's source hash (Triton's ``JITFunction.cache_key``,
which covers the function and every ``@triton.jit`` helper it calls), the specialisation, the
options, the target and the Triton/ptxas versions: an unchanged kernel is not recompiled, a
changed one is.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from triton.compiler import ASTSource, make_backend
from triton.compiler import compile as triton_compile

from ._recorder import SHARED_LIMITS, TARGETS, Launch, triton_version

CACHE_VERSION = 1

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")
_WGMMA = re.compile(r"^\s*(?:@%p\d+\s+)?wgmma\.mma_async", re.M)
_MMA_SYNC = re.compile(r"^\s*(?:@%p\d+\s+)?mma\.sync", re.M)


def default_cache_dir() -> Path:
    root = os.environ.get("ATTNKIT_AUDIT_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attnkit" / "gpu_audit"


def mma_kind(ptx: str) -> tuple[str, int, int]:
    """(`wgmma` | `mma.sync` | `mixed` | `none`, count of wgmma, count of mma.sync) in a PTX text."""
    n_wg = len(_WGMMA.findall(ptx))
    n_mma = len(_MMA_SYNC.findall(ptx))
    if n_wg and n_mma:
        kind = "mixed"
    elif n_wg:
        kind = "wgmma"
    elif n_mma:
        kind = "mma.sync"
    else:
        kind = "none"
    return kind, n_wg, n_mma


def parse_ptxas_log(log: str) -> dict[str, int | None]:
    """Registers, spill store/load bytes and stack frame of the (single) kernel in a `ptxas -v` log."""
    regs = _REGS.findall(log)
    spill = _SPILL.findall(log)
    stack = _STACK.findall(log)
    return dict(
        registers=int(regs[-1]) if regs else None,
        spill_stores=int(spill[-1][0]) if spill else None,
        spill_loads=int(spill[-1][1]) if spill else None,
        stack_frame=int(stack[-1]) if stack else None,
    )


def _arch_capability(arch: str) -> int:
    if arch not in TARGETS:
        raise ValueError(f"arch must be one of {sorted(TARGETS)}, got {arch!r}")
    return TARGETS[arch].arch


def compile_options(launch: Launch, arch: str):
    return make_backend(TARGETS[arch]).parse_options(dict(launch.options))


def variant_key(launch: Launch, arch: str) -> str:
    """Content hash of what decides the compiled code (source, specialisation, options, target)."""
    opts = compile_options(launch, arch)
    payload = repr((CACHE_VERSION, triton_version(), launch.fn.cache_key, launch.module, launch.kernel,
                    sorted(launch.signature.items()), sorted((repr(k), repr(v)) for k, v in launch.constexprs.items()),
                    sorted((repr(k), repr(v)) for k, v in launch.attrs.items()), sorted(opts.__dict__.items()), arch))
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _ptxas_log_of(ptx: str, arch: str, opts) -> str:
    """Fallback when Triton's own ptxas log was not captured: run the same ptxas with -v."""
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    cap = _arch_capability(arch)
    try:
        ptxas = get_ptxas(cap).path
    except TypeError:  # older Triton: one ptxas for every arch
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        fmad = [] if opts.enable_fp_fusion else ["--fmad=false"]
        cmd = [ptxas, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(cap)}",
               str(src), "-o", str(Path(tmp, "k.cubin"))]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def compile_launch(launch: Launch, arch: str, keep_asm: bool = False) -> dict[str, Any]:
    """Compile `launch` for `arch` (`"sm_90"`, `"sm_80"`, ...) and return its measurements.

    The dict has `shared`, `registers`, `spill_stores`, `spill_loads`, `stack_frame`, `mma`,
    `wgmma`, `mma_sync`, `num_warps`, `compile_s`, `error` (None when it compiled) and, with
    `keep_asm`, `ptx` and `cubin` (bytes).
    """
    from triton import knobs

    opts = compile_options(launch, arch)
    src = ASTSource(fn=launch.fn, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
    out: dict[str, Any] = dict(shared=None, registers=None, spill_stores=None, spill_loads=None, stack_frame=None,
                               mma=None, wgmma=0, mma_sync=0, num_warps=opts.num_warps, error=None)
    buf = io.StringIO()
    start = time.perf_counter()
    # Triton prints its `ptxas -v` log when asked (captured here); a Triton cache hit would skip
    # ptxas, so the cache is bypassed (the audit keeps its own). Knobs a Triton lacks are left alone:
    # the fallback then runs the same ptxas with -v on the PTX.
    knob_names = [(knobs.nvidia, "dump_ptxas_log"), (knobs.compilation, "always_compile")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in knob_names if hasattr(obj, name)]
    try:
        for obj, name, _ in saved:
            setattr(obj, name, True)
        with contextlib.redirect_stdout(buf):
            compiled = triton_compile(src, target=TARGETS[arch], options=opts.__dict__)
    except Exception as e:  # noqa: BLE001 - any compiler failure is a finding, reported per variant
        out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]
        out["compile_s"] = round(time.perf_counter() - start, 2)
        return out
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
    out["compile_s"] = round(time.perf_counter() - start, 2)
    ptx = compiled.asm["ptx"]
    log = buf.getvalue()
    if "registers" not in log:
        log = _ptxas_log_of(ptx, arch, opts)
    out.update(parse_ptxas_log(log))
    out["shared"] = int(compiled.metadata.shared)
    out["mma"], out["wgmma"], out["mma_sync"] = mma_kind(ptx)
    if keep_asm:
        out["ptx"] = ptx
        out["cubin"] = compiled.asm["cubin"]
    return out


def shared_limit(arch: str) -> int:
    return SHARED_LIMITS[_arch_capability(arch)]


class ResultCache:
    """One JSON file per variant key under `root` (safe for concurrent writers: atomic rename)."""

    def __init__(self, root: Path | None):
        self.root = root
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict | None:
        if self.root is None:
            return None
        path = self.root / f"{key}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: dict) -> None:
        if self.root is None or value.get("error"):
            return
        tmp = self.root / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(value))
        os.replace(tmp, self.root / f"{key}.json")


# ------------------------------------------------------------------- independent agreement

_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_PTX_VERSION_ERR = re.compile(r"current version is '(\d+\.\d+)'")


def toolkit_ptxas() -> str | None:
    """The CUDA toolkit's ptxas (not Triton's bundled one): `$ATTNKIT_PTXAS`, else
    `/usr/local/cuda/bin/ptxas`, else `ptxas` on PATH."""
    import shutil

    for cand in (os.environ.get("ATTNKIT_PTXAS"), "/usr/local/cuda/bin/ptxas", shutil.which("ptxas")):
        if cand and Path(cand).is_file():
            return cand
    return None


def _toolkit_ptxas_log(ptxas: str, ptx: str, arch: str) -> tuple[str, str | None]:
    """`ptxas -v` of the toolkit on Triton's PTX; `.version` is lowered to what it accepts when
    Triton's LLVM emitted a newer one. Returns (log, the PTX version used if it was lowered)."""
    import subprocess

    from triton.backends.nvidia.compiler import sm_arch_from_capability

    gpu = sm_arch_from_capability(_arch_capability(arch))
    lowered = None
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):
            src = Path(tmp, "k.ptx")
            src.write_text(ptx)
            cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(src),
                   "-o", str(Path(tmp, "k.cubin"))]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode == 0:
                return res.stderr, lowered
            m = _PTX_VERSION_ERR.search(res.stderr)
            if m is None or lowered is not None:
                raise RuntimeError(f"toolkit ptxas failed: {res.stderr.strip()[:400]}")
            lowered = m.group(1)
            ptx = re.sub(r"^\.version \d+\.\d+", f".version {lowered}", ptx, count=1, flags=re.M)
    raise AssertionError("unreachable")


def sass_mma_kind(cubin: bytes) -> tuple[str, int, int]:
    """MMA kind from the SASS of a cubin (Triton's cuobjdump): HGMMA = wgmma, HMMA = mma.sync."""
    import subprocess

    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "k.cubin")
        path.write_bytes(cubin)
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
    n_wg = len(re.findall(r"\bHGMMA\.", sass))
    n_mma = len(re.findall(r"\bHMMA\.", sass))
    kind = "mixed" if n_wg and n_mma else "wgmma" if n_wg else "mma.sync" if n_mma else "none"
    return kind, n_wg, n_mma


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """`cuobjdump -res-usage` of a cubin: REG, STACK, SHARED (static), LOCAL."""
    import subprocess

    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "k.cubin")
        path.write_bytes(cubin)
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", str(path)], capture_output=True, text=True,
                             check=True).stdout
    m = _RES_USAGE.search(out)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output: {out[:300]}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))


def verify_launch(launch: Launch, arch: str) -> dict[str, Any]:
    """Independent figures for one variant, next to the audit's.

    * `cubin`: `cuobjdump -res-usage` of the very cubin Triton built (registers and stack frame
      must equal the audit's, which come from the ptxas log);
    * `sass_mma`: the MMA kind read from the SASS (HGMMA/HMMA) instead of the PTX;
    * `toolkit`: the CUDA toolkit's own ptxas (another version than Triton's) run on the same PTX:
      registers (must be equal) and spills (reported: amounts differ between ptxas versions).
    """
    r = compile_launch(launch, arch, keep_asm=True)
    if r["error"]:
        raise RuntimeError(f"{launch.kernel} does not compile for {arch}: {r['error']}")
    res = cubin_resources(r["cubin"])
    sass_kind = sass_mma_kind(r["cubin"])
    out: dict[str, Any] = dict(
        kernel=launch.kernel, arch=arch, config=launch.config_str(),
        audit=dict(registers=r["registers"], spill_stores=r["spill_stores"], stack_frame=r["stack_frame"],
                   mma=r["mma"]),
        cubin=dict(registers=res["REG"], stack_frame=res["STACK"]),
        sass_mma=sass_kind[0], toolkit=None)
    ptxas = toolkit_ptxas()
    if ptxas is not None:
        log, lowered = _toolkit_ptxas_log(ptxas, r["ptx"], arch)
        fig = parse_ptxas_log(log)
        out["toolkit"] = dict(ptxas=ptxas, ptx_version_lowered_to=lowered, registers=fig["registers"],
                              spill_stores=fig["spill_stores"], stack_frame=fig["stack_frame"])
    # Judged: the same cubin's registers and stack frame, the SASS's MMA kind, and the register
    # count of the other assembler. Spill amounts of two ptxas versions legitimately differ (and
    # small spills can vanish: 32 vs 0 B), so they are reported, not judged.
    out["agree"] = dict(
        registers=res["REG"] == r["registers"],
        stack_frame=res["STACK"] == r["stack_frame"],
        mma=sass_kind[0] == r["mma"],
        toolkit_registers=None if out["toolkit"] is None else out["toolkit"]["registers"] == r["registers"])
    out["toolkit_spills_too"] = None if out["toolkit"] is None else \
        (out["toolkit"]["spill_stores"] > 0) == (r["spill_stores"] > 0)
    return out
