"""Records the Triton launches of a call without executing any kernel.

While :func:`recording` is active:

* ``JITFunction.run`` (what ``kernel[grid](...)`` ends in) binds the arguments exactly as Triton
  does for a launch, but against a GPU target (the backend's own binder, so pointer alignment
  and integer specialisation are Triton's), evaluates the grid, appends a :class:`Launch` and
  returns without compiling or launching anything;
* ``Autotuner.run`` runs the kernel's own prune (``early_config_prune`` / ``perf_model``) and
  forwards one launch per kept config, each tagged with its place in the tuning set, instead of
  benchmarking;
* the dispatcher chooses the ``triton`` backend for every op that has one, on CPU tensors and
  without ``TRITON_INTERPRET`` (the kernels keep their GPU configs).

Kernels are discovered by interception, never by name: a kernel added to any module is recorded
as soon as a public op launches it. Outputs of skipped kernels stay uninitialised; the host code
of attnkit never reads kernel results on the host (no sync), which is what makes this work.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

if os.environ.get("TRITON_INTERPRET") == "1":  # pragma: no cover - guarded by the CLIs
    raise RuntimeError("attnkit.tools records GPU launches: unset TRITON_INTERPRET before importing it "
                       "(the interpreter replaces the kernels and their GPU configs)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

#: Targets by the names the CLIs take (warp size 32 on NVIDIA).
TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_86": GPUTarget("cuda", 86, 32),
           "sm_89": GPUTarget("cuda", 89, 32), "sm_90": GPUTarget("cuda", 90, 32)}

#: Shared memory a block may use (opt-in maximum, bytes) per compute capability.
SHARED_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_RECORD_TARGET = TARGETS["sm_90"]


@dataclass
class Launch:
    """One recorded launch (one autotune config of one kernel call)."""

    kernel: str                     # the JIT function's name, e.g. "_attention_fwd_kernel"
    module: str                     # its module
    fn: Any                         # the JITFunction (for compiling)
    grid: tuple[int, int, int]
    config: dict[str, Any]          # tuned meta-parameters + num_warps/num_stages of this launch
    tune: tuple[int, int, int] | None  # (index among kept, kept, declared) when autotuned
    tune_key: tuple | None          # the autotuner's key values (what a cached choice is reused for)
    signature: dict[str, str]
    constexprs: dict[tuple, Any]
    attrs: dict[tuple, Any]
    options: dict[str, Any]         # the raw launch options (num_warps, num_stages, ...)
    args: dict[str, str]            # a readable summary of every argument
    tensor_bytes: dict[str, int]    # bytes of each tensor argument (its storage span)
    case: str = ""
    call: int = 0                   # which launch of the case (same for all configs of one launch)
    phase: str = "fwd"              # "fwd" or "bwd" (set by the call around its backward)
    scalars: dict[str, Any] = field(default_factory=dict)  # non-tensor argument values (ints, flags)
    dtype: str = ""                 # dtype of the first floating-point tensor argument
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def config_str(self) -> str:
        meta = ",".join(f"{k}={v}" for k, v in self.config.items() if k not in ("num_warps", "num_stages"))
        base = f"w{self.config.get('num_warps', 4)}s{self.config.get('num_stages', 3)}"
        return f"{meta} {base}".strip()


@dataclass
class _State:
    launches: list[Launch] = field(default_factory=list)
    case: str = ""
    calls: int = 0
    phase: str = "fwd"


def set_phase(phase: str) -> None:
    """Tag the launches that follow (`"fwd"` or `"bwd"`); a no-op outside :func:`recording`."""
    state = _STATE.get()
    if state is not None:
        state.phase = phase


class _Slot:
    """A process-wide slot (not thread-local: the autograd engine may run a backward elsewhere)."""

    def __init__(self):
        self.value = None

    def get(self):
        return self.value

    def set(self, value):
        old, self.value = self.value, value
        return old

    def reset(self, old):
        self.value = old


_STATE = _Slot()
_TUNE = _Slot()
_BINDERS: dict[int, tuple[Any, Callable]] = {}


def _binder(fn: JITFunction):
    entry = _BINDERS.get(id(fn))
    if entry is None or entry[0] is not fn:
        backend = make_backend(_RECORD_TARGET)
        entry = (fn, backend, create_function_from_signature(fn.signature, fn.params, backend))
        _BINDERS[id(fn)] = entry
    return entry[1], entry[2]


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"
    return repr(x)


def _span_bytes(x: torch.Tensor) -> int:
    if x.numel() == 0:
        return 0
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(x.shape, x.stride()))
    return span * x.element_size()


def _grid3(grid, bound_args) -> tuple[int, int, int]:
    if callable(grid):
        grid = grid(bound_args)
    grid = tuple(int(g) for g in grid)
    return (grid + (1, 1, 1))[:3]


def _recording_jit_run(self: JITFunction, *args, grid, warmup, **kwargs):
    state = _STATE.get()
    if state is None:  # not ours (another thread, or a nested real launch)
        return _ORIGINAL_JIT_RUN(self, *args, grid=grid, warmup=warmup, **kwargs)
    backend, binder = _binder(self)
    kwargs.setdefault("debug", bool(self.debug))
    bound_args, specialization, options = binder(*args, **kwargs)
    launch_options = {k: v for k, v in kwargs.items() if k not in bound_args}
    options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
    tune = _TUNE.get()
    config = {}
    if tune is not None:
        config.update(tune[3].kwargs)
    config["num_warps"] = options.num_warps
    config["num_stages"] = options.num_stages
    tensors = {k: v for k, v in bound_args.items() if isinstance(v, torch.Tensor)}
    float_dtypes = [v.dtype for v in tensors.values() if v.is_floating_point()]
    if tune is None or tune[0] == 0:
        state.calls += 1
    state.launches.append(Launch(
        kernel=self.fn.__name__, module=self.module, fn=self, grid=_grid3(grid, bound_args), config=config,
        tune=None if tune is None else tune[:3], tune_key=None if tune is None else tune[4],
        signature=dict(signature), constexprs=dict(constexprs), attrs=dict(attrs), options=launch_options,
        args={k: _describe(v) for k, v in bound_args.items()},
        tensor_bytes={k: _span_bytes(v) for k, v in tensors.items()},
        case=state.case, call=state.calls, phase=state.phase,
        scalars={k: v for k, v in bound_args.items() if isinstance(v, (int, float, bool, str)) or v is None},
        dtype=str(float_dtypes[0]).replace("torch.", "") if float_dtypes else ""))
    return None


def _recording_autotuner_run(self: Autotuner, *args, **kwargs):
    if _STATE.get() is None:
        return _ORIGINAL_AUTOTUNER_RUN(self, *args, **kwargs)
    self.nargs = dict(zip(self.arg_names, args))
    try:
        kept = self.prune_configs(kwargs) if len(self.configs) > 1 else list(self.configs)
        all_args = {**self.nargs, **kwargs}
        key = tuple(all_args.get(k) for k in self.keys)
    finally:
        self.nargs = None
    for i, cfg in enumerate(kept):
        token = _TUNE.set((i, len(kept), len(self.configs), cfg, key))
        try:
            self.fn.run(*args, **kwargs, **cfg.all_kwargs())
        finally:
            _TUNE.reset(token)
    return None


_ORIGINAL_JIT_RUN = JITFunction.run
_ORIGINAL_AUTOTUNER_RUN = Autotuner.run


def _forced_triton_choice(original):
    def choose(op_name, inputs, backend):
        from .. import dispatch
        impl = dispatch.registered(op_name).get("triton")
        if impl is None:
            return original(op_name, inputs, backend)
        return impl, {}
    return choose


def _meta_aware(original):
    """`value_checks_enabled` that skips value checks on meta tensors (they have no values)."""
    def value_checks_enabled(*tensors):
        if any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tensors):
            return False
        return original(*tensors)
    value_checks_enabled.__wrapped__ = original
    return value_checks_enabled


@contextlib.contextmanager
def recording() -> Iterator[_State]:
    """Record (and skip) every Triton launch in the block; yields the state with `.launches`.

    Inputs may be meta tensors (no memory; value checks are skipped for them) or CPU tensors.
    """
    from .. import _validation, dispatch

    state = _State()
    token = _STATE.set(state)
    saved = (JITFunction.run, Autotuner.run, dispatch._choose)
    JITFunction.run = _recording_jit_run
    Autotuner.run = _recording_autotuner_run
    dispatch._choose = _forced_triton_choice(saved[2])
    # every attnkit module that imported the value-check gate by name gets the meta-aware one
    original = _validation.value_checks_enabled
    patched = []
    for name, module in list(sys.modules.items()):
        if (name == "attnkit" or name.startswith("attnkit.")) and module is not None \
                and getattr(module, "value_checks_enabled", None) is original:
            module.value_checks_enabled = _meta_aware(original)
            patched.append(module)
    # Calls go straight to the backend function, not through the torch.ops.attnkit custom ops:
    # on meta tensors a custom op runs its fake implementation and no kernel would be launched.
    # (dispatch.run calls the implementation directly for an op without a registered caller.)
    callers = getattr(importlib.import_module("attnkit._custom_ops"), "CALLERS", None) \
        if importlib.util.find_spec("attnkit._custom_ops") is not None else None
    saved_callers = dict(callers) if callers is not None else None
    if callers is not None:
        callers.clear()
    try:
        yield state
    finally:
        if callers is not None:
            callers.update(saved_callers)
        JITFunction.run, Autotuner.run, dispatch._choose = saved
        for module in patched:
            module.value_checks_enabled = original
        _STATE.reset(token)


def record(fn: Callable[[], Any], case: str = "") -> list[Launch]:
    """Run `fn` (a call of public ops on CPU tensors) and return its launches, none executed."""
    with recording() as state:
        state.case = case
        fn()
    return state.launches


def triton_version() -> str:
    return triton.__version__
