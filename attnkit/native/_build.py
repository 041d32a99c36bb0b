"""Building, caching and loading the native extension (csrc/), and the compile-only check.

One extension module, built with torch's JIT extension API (`torch.utils.cpp_extension.load`,
ninja) on first use and cached:

* always the CPU sources (`bindings.cpp`, `cpu/*.cpp`), compiled with the host C++ compiler;
* plus the CUDA sources (`cuda/*.cu`) when torch has CUDA and nvcc is found (`CUDA_HOME` or
  `PATH`); `bindings.cpp` is then compiled with `-DATTNKIT_WITH_CUDA`.

The module name holds a hash of every source and header, the flags and the torch version, so a
cached build is never stale and never shared between configurations. It lives in
`$ATTNKIT_BUILD_DIR/<name>/` or torch's extension directory. A failed build leaves
`build.log` (the compiler output) and `FAILED` in that folder: the backend then reports the
failure instead of rebuilding in every process; `python -m attnkit.native --build` retries.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ("bindings.cpp", "cpu/attention_decode.cpp", "cpu/loki.cpp", "cpu/linear_step.cpp", "cpu/qk_norm.cpp")
CUDA_SOURCES = ("cuda/attend.cu", "cuda/loki.cu", "cuda/linear_step.cu", "cuda/norm.cu")
HEADERS = ("attnkit_native.h", "cpu/cpu_common.h", "cpu/attend.h", "cuda/common.cuh")
CHECK_ARCHS = ("80", "90")

_lock = threading.Lock()
_module: ModuleType | None = None
_failure: str | None = None  # log path of a failed build in this process
_warned = False


# ------------------------------------------------------------------------------------ toolchain


@functools.lru_cache(maxsize=1)
def cxx() -> str | None:
    """The host C++ compiler torch's JIT would use (`$CXX`, else `c++`), or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


@functools.lru_cache(maxsize=1)
def cuda_home() -> str | None:
    """The CUDA toolkit root holding bin/nvcc (`$CUDA_HOME`/`$CUDA_PATH`, else nvcc on PATH)."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None


def nvcc() -> str | None:
    home = cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


@functools.lru_cache(maxsize=1)
def ninja_ok() -> bool:
    try:
        subprocess.run(["ninja", "--version"], check=True, capture_output=True)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def with_cuda() -> bool:
    """Whether the build includes the CUDA kernels: torch has CUDA and nvcc is available."""
    return torch.version.cuda is not None and cuda_home() is not None


@functools.lru_cache(maxsize=1)
def cpu_isa() -> tuple[str, tuple[str, ...]]:
    """(tag, flags) for the host CPU's vector ISA. The JIT build runs on the machine that uses it,
    so it targets that machine (as vLLM's CPU build does); the tag is part of the module name."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "base", ()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if {"avx2", "fma", "f16c"} <= set(flags):
        return "avx2", ("-mavx2", "-mfma", "-mf16c")
    return "base", ()


# ---------------------------------------------------------------------------------------- flags


def cflags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=fast", *cpu_isa()[1]]
    if with_cuda():
        flags.append("-DATTNKIT_WITH_CUDA")
    return flags


def cuda_cflags() -> list[str]:
    return ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]


def ldflags() -> list[str]:
    return ["-fopenmp"]


def sources_present() -> bool:
    return all((CSRC / s).is_file() for s in (*CPU_SOURCES, *CUDA_SOURCES, *HEADERS))


@functools.lru_cache(maxsize=1)
def name() -> str:
    """`attnkit_native_<cpu|cuda>_<isa>_<hash>`: the hash covers sources, headers, flags, torch."""
    h = hashlib.sha256()
    srcs = (*CPU_SOURCES, *(CUDA_SOURCES if with_cuda() else ()), *HEADERS)
    for s in srcs:
        h.update(s.encode())
        h.update((CSRC / s).read_bytes())
    h.update(" ".join([*cflags(), *cuda_cflags(), *ldflags(), torch.__version__, sys.version]).encode())
    kind = "cuda" if with_cuda() else "cpu"
    return f"attnkit_native_{kind}_{cpu_isa()[0]}_{h.hexdigest()[:12]}"


def build_root() -> Path:
    root = os.environ.get("ATTNKIT_BUILD_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    acc = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_{acc}"


def build_dir() -> Path:
    return build_root() / name()


def _built_library() -> Path | None:
    """The library torch's JIT build leaves in the build folder, if it exists."""
    lib = build_dir() / f"{name()}.so"
    return lib if lib.is_file() else None


# -------------------------------------------------------------------------------------- status


def static_reasons(device: str) -> list[str]:
    """Why the extension cannot serve `device` tensors, without building anything."""
    if _module is not None:
        if device == "cuda" and not _module.with_cuda:
            return ["the extension was built without CUDA kernels (torch without CUDA, or nvcc missing)"]
        return []
    if _failure is not None:
        return [f"the native extension failed to build (see {_failure}); "
                "`python -m attnkit.native --build` retries"]
    if not sources_present():
        return [f"the C++/CUDA sources are not part of this install (expected them in {CSRC})"]
    if cxx() is None:
        return ["no C++ compiler found to build the native extension (install g++ or set CXX)"]
    if not ninja_ok():
        return ["ninja is needed to build the native extension (pip install ninja)"]
    if device == "cuda" and torch.version.cuda is None:
        return ["torch has no CUDA support"]
    if device == "cuda" and cuda_home() is None:
        return ["nvcc not found to build the CUDA kernels (set CUDA_HOME or put nvcc on PATH)"]
    failed = build_dir() / "FAILED"
    if failed.is_file():
        return [f"the native extension failed to build (see {build_dir() / 'build.log'}); "
                "`python -m attnkit.native --build` retries"]
    # Not built yet, or built: either way it can serve this input (first use builds it).
    return []


def is_built() -> bool:
    return _module is not None or _built_library() is not None


# --------------------------------------------------------------------------------- build, load


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name(), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(verbose: bool) -> ModuleType:
    from torch.utils.cpp_extension import load

    srcs = [str(CSRC / s) for s in (*CPU_SOURCES, *(CUDA_SOURCES if with_cuda() else ()))]
    d = build_dir()
    d.mkdir(parents=True, exist_ok=True)
    return load(name=name(), sources=srcs, extra_cflags=cflags(), extra_cuda_cflags=cuda_cflags(),
                extra_ldflags=ldflags(), extra_include_paths=[str(CSRC)], build_directory=str(d),
                verbose=verbose)


def module(*, rebuild: bool = False, verbose: bool = False) -> ModuleType:
    """The loaded extension, building it first if needed (one line on stderr while it compiles).

    Raises:
        RuntimeError: the build failed; the message names the log file.
    """
    global _module, _failure, _warned
    if _module is not None and not rebuild:
        return _module
    with _lock:
        if _module is not None and not rebuild:
            return _module
        if _failure is not None and not rebuild:
            raise RuntimeError(f"the attnkit native extension failed to build; see {_failure}")
        d = build_dir()
        failed, log = d / "FAILED", d / "build.log"
        if failed.is_file() and not rebuild:
            _failure = str(log)
            raise RuntimeError(f"the attnkit native extension failed to build; see {log}")
        lib = _built_library()
        if lib is not None and not rebuild:
            _module = _import(lib)
            return _module
        print(f"attnkit: compiling the native extension ({'CPU + CUDA' if with_cuda() else 'CPU'} kernels, "
              f"first use, about 1-3 minutes; cached in {d})", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            failed.unlink(missing_ok=True)
            _module = _compile(verbose)
        except Exception as e:  # the compiler's output is in the message
            d.mkdir(parents=True, exist_ok=True)
            log.write_text(f"{type(e).__name__}: {e}\n", encoding="utf-8")
            failed.write_text("see build.log\n", encoding="utf-8")
            _failure = str(log)
            if not _warned:
                _warned = True
                warnings.warn(f"attnkit: building the native extension failed; the 'cuda' backend is "
                              f"unavailable (log: {log})", RuntimeWarning, stacklevel=3)
            raise RuntimeError(f"the attnkit native extension failed to build; see {log}") from e
        if verbose:
            print(f"attnkit: built {name()} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return _module


# ------------------------------------------------------------------------------ compile check


def _torch_includes() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    return include_paths()


def check_commands(archs=CHECK_ARCHS) -> list[tuple[str, list[str]]]:
    """(label, argv) of every compile-only job of `python -m attnkit.native --check`."""
    out_dir = tempfile.gettempdir()
    incs = [f"-I{p}" for p in (str(CSRC), *_torch_includes(), sysconfig.get_paths()["include"])]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    host = [cxx() or "c++", "-c", "-fPIC", *[f for f in cflags() if f != "-DATTNKIT_WITH_CUDA"], abi,
            "-DTORCH_EXTENSION_NAME=attnkit_native_check", "-DTORCH_API_INCLUDE_EXTENSION_H", *incs]
    jobs = []
    for s in CPU_SOURCES:
        o = os.path.join(out_dir, f"attnkit_check_{os.getpid()}_{s.replace('/', '_')}.o")
        jobs.append((s, [*host, str(CSRC / s), "-o", o]))
    # The CUDA branch of the bindings, which only a CUDA torch would otherwise compile.
    o = os.path.join(out_dir, f"attnkit_check_{os.getpid()}_bindings_cuda.o")
    jobs.append(("bindings.cpp (-DATTNKIT_WITH_CUDA)", [*host, "-DATTNKIT_WITH_CUDA", str(CSRC / "bindings.cpp"),
                                                         "-o", o]))
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    for s in CUDA_SOURCES:
        for arch in archs:
            o = os.path.join(out_dir, f"attnkit_check_{os.getpid()}_{s.replace('/', '_')}_sm{arch}.o")
            cmd = [nvcc() or "nvcc", "-c", *cuda_cflags(), *COMMON_NVCC_FLAGS, abi, "-Xcompiler", "-fPIC",
                   f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{CSRC}",
                   *[f"-I{p}" for p in _torch_includes()], str(CSRC / s), "-o", o]
            jobs.append((f"{s} sm_{arch}", cmd))
    return jobs
