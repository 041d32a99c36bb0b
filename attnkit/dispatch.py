"""Backend registry and dispatch.

Every dispatched op is split in two:

* a *prepare* function (registered with :func:`op`) that validates the public arguments and
  returns a :class:`Call`: the normalised keyword arguments that every backend implementation
  takes, plus the :class:`Inputs` summary (device, dtype, head dims, features) that backends
  use to accept or refuse the call;
* one implementation per backend (registered with :func:`register`), each stating what it
  supports and giving reasons when it refuses an input.

The public function is then ``run(name, prepare(...), backend)``; adding a backend for an op
never touches the op's public function. ``explain`` runs only the prepare step and the
acceptance checks, never a kernel.

``run`` picks the backend once per call signature (op, :class:`Inputs`, requested backend and the
environment switches it depends on) and caches the choice, then calls the op's
``torch.ops.attnkit.<name>`` custom op (:mod:`attnkit._custom_ops`) with the chosen backend's
name, so that ``torch.compile``/``torch.export`` see one opaque op with a fake implementation and
registered autograd. Under ``torch.compile`` the choice is made once, at trace time.

The public functions call :class:`FastOp` rather than ``run`` directly: run eagerly, it caches the
prepare step's result and the choice per call signature, so a repeated signature costs a key
lookup, the op's value checks and the backend call (docs/compile.md, docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

BACKENDS = ("reference", "triton", "cuda")

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "Call",
    "choose",
    "Explanation",
    "Inputs",
    "explain",
    "op",
    "fast",
    "FastOp",
    "register",
    "register_keyed",
    "registered",
    "run",
]


_GENERATION = 0  # bumped by register(): invalidates cached choices


class BackendUnavailable(RuntimeError):
    """A named backend is not installed, has no kernel for the op, or cannot run this input."""


@dataclass(frozen=True)
class Inputs:
    """What a backend needs to know to accept or refuse a call (no tensor values)."""

    op: str
    device: torch.device
    dtype: torch.dtype
    head_dims: tuple[int, ...] = ()
    # Free-form feature tags, e.g. {"varlen", "grad", "qk_norm=rms", "feature_map=callable"}.
    features: frozenset[str] = frozenset()

    def has(self, feature: str) -> bool:
        return feature in self.features


@dataclass
class Call:
    """A validated call: `kwargs` are the normalised arguments every implementation takes."""

    inputs: Inputs
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Implementation:
    op: str
    backend: str
    target: Callable[..., Any] | str  # a function, or "module:attr" imported on first use
    priority: int
    devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...] | None
    head_dim_range: tuple[int, int] | None
    check: Callable[[Inputs], Iterable[str]] | None
    automatic: bool

    def function(self) -> Callable[..., Any]:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            self.target = getattr(importlib.import_module(module), attr)
        return self.target

    def reasons(self, inputs: Inputs) -> list[str]:
        out = list(_backend_reasons(self.backend, inputs))
        if out:
            return out
        if self.devices is not None and inputs.device.type not in self.devices:
            out.append(f"runs on {'/'.join(self.devices)} tensors, got {inputs.device.type}")
        if self.dtypes is not None and inputs.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            out.append(f"supports dtypes {names}, got {str(inputs.dtype).replace('torch.', '')}")
        if self.head_dim_range is not None:
            lo, hi = self.head_dim_range
            bad = [d for d in inputs.head_dims if not lo <= d <= hi]
            if bad:
                out.append(f"supports head dims {lo}..{hi}, got {bad}")
        if self.check is not None:
            out.extend(self.check(inputs))
        return out


_OPS: dict[str, Callable[..., Call]] = {}
_IMPLS: dict[str, dict[str, Implementation]] = {}


def op(name: str) -> Callable[[Callable[..., Call]], Callable[..., Call]]:
    """Register the prepare (validation) function of a dispatched op."""

    def deco(prepare: Callable[..., Call]) -> Callable[..., Call]:
        if name in _OPS:
            raise RuntimeError(f"op {name!r} registered twice")
        _OPS[name] = prepare
        return prepare

    return deco


def register(
    op_name: str,
    backend: str,
    target: Callable[..., Any] | str,
    *,
    priority: int = 0,
    devices: Iterable[str] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    head_dim_range: tuple[int, int] | None = None,
    check: Callable[[Inputs], Iterable[str]] | None = None,
    automatic: bool = True,
) -> None:
    """Register `target` as `backend`'s implementation of `op_name`.

    `target` is a function or a ``"module:attr"`` string imported on first use (so that, e.g.,
    Triton kernels are only compiled/decorated once they are needed). `priority` orders the
    automatic choice (highest first); `automatic=False` keeps an implementation out of the
    automatic choice (it still runs when named). `check(inputs)` returns refusal reasons.
    """
    global _GENERATION
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _GENERATION += 1
    _CHOICES.clear()
    _IMPLS.setdefault(op_name, {})[backend] = Implementation(
        op=op_name,
        backend=backend,
        target=target,
        priority=priority,
        devices=tuple(devices) if devices is not None else None,
        dtypes=tuple(dtypes) if dtypes is not None else None,
        head_dim_range=head_dim_range,
        check=check,
        automatic=automatic,
    )


def registered(op_name: str) -> dict[str, Implementation]:
    """The implementations registered for `op_name`, by backend name."""
    return dict(_IMPLS.get(op_name, {}))


# --------------------------------------------------------------------------- backend-level checks


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreter_mismatch() -> str | None:
    """Why Triton's interpreter cannot run although ``TRITON_INTERPRET=1`` is set, or None.

    Triton reads ``TRITON_INTERPRET`` when its functions are decorated: if ``triton`` was imported
    before the variable was set, its own library functions (``tl.cdiv``, ``tl.sum``, ...) are GPU
    JIT functions and every interpreted launch fails with a cryptic ``InterpreterError``.
    """
    import sys

    standard = sys.modules.get("triton.language.standard")
    if standard is None:  # triton not imported yet: it will read the variable when it is
        return None
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    compiled = [n for n, f in vars(standard).items()
                if isinstance(f, JITFunction) and not isinstance(f, InterpretedFunction)]
    if not compiled:
        return None
    return ("TRITON_INTERPRET=1 was set after triton was imported, so triton's own functions "
            f"(e.g. tl.{compiled[0]}) were compiled for the GPU and cannot run in the CPU interpreter; "
            "set TRITON_INTERPRET=1 in the environment before anything imports triton "
            "(e.g. `TRITON_INTERPRET=1 python ...`, or at the very top of the script/conftest)")


def _triton_reasons(inputs: Inputs) -> list[str]:
    if not _triton_installed():
        return ["triton is not installed (pip install triton)"]
    if inputs.device.type == "cuda":
        return []
    if inputs.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            mismatch = _interpreter_mismatch()
            return [mismatch] if mismatch else []
        return ["CPU tensors run on the triton backend only under TRITON_INTERPRET=1 "
                "(set it before triton is imported)"]
    return [f"runs on CUDA tensors, got {inputs.device.type}"]


def _cuda_reasons(inputs: Inputs) -> list[str]:
    try:
        native = importlib.import_module("attnkit.native")
    except ImportError:
        return ["the compiled extension (attnkit.native) is not part of this install"]
    return list(native.unavailable_reasons(inputs))


def _backend_reasons(backend: str, inputs: Inputs) -> list[str]:
    if backend == "triton":
        return _triton_reasons(inputs)
    if backend == "cuda":
        return _cuda_reasons(inputs)
    return []


def _automatic_reasons(impl: Implementation, inputs: Inputs) -> list[str]:
    if not impl.automatic:
        return ["not chosen automatically for this op; pass backend=" + repr(impl.backend)]
    if impl.backend == "triton" and inputs.device.type == "cpu":
        return ["the Triton interpreter (CPU) is for testing and is never chosen automatically; "
                "pass backend='triton'"]
    return []


# --------------------------------------------------------------------------------------- choice


def _requested(backend: str | None) -> str | None:
    name = backend if backend is not None else (os.environ.get("ATTNKIT_BACKEND") or None)
    if name is not None and name not in BACKENDS:
        source = "backend" if backend is not None else "ATTNKIT_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {name!r}")
    return name


def _refusals(op_name: str, inputs: Inputs, automatic: bool) -> dict[str, list[str]]:
    impls = _IMPLS.get(op_name, {})
    out: dict[str, list[str]] = {}
    for name in BACKENDS:
        impl = impls.get(name)
        if impl is None:
            out[name] = [f"has no implementation of {op_name}"]
            continue
        reasons = impl.reasons(inputs)
        if automatic and not reasons:
            reasons = _automatic_reasons(impl, inputs)
        out[name] = reasons
    return out


def _choose(op_name: str, inputs: Inputs, backend: str | None) -> tuple[Implementation | None, dict]:
    requested = _requested(backend)
    impls = _IMPLS.get(op_name, {})
    refusals = _refusals(op_name, inputs, automatic=requested is None)
    if requested is not None:
        ok = not refusals[requested]
        return (impls[requested] if ok else None), refusals
    ranked = sorted(impls.values(), key=lambda i: -i.priority)
    for impl in ranked:
        if not refusals[impl.backend]:
            return impl, refusals
    return None, refusals


def _format(refusals: dict[str, list[str]], only: str | None = None) -> str:
    lines = []
    for name, reasons in refusals.items():
        if only is not None and name != only:
            continue
        for r in reasons:
            lines.append(f"  {name}: {r}")
    return "\n".join(lines)


def _make_ready(impl: Implementation) -> bool:
    """Load what an automatically chosen backend needs before it runs (the native extension is
    built on first use). False if that failed: the backend then refuses (its reasons name the
    build log) and the automatic choice moves on. A named backend is never made ready here: its
    own first call raises :class:`BackendUnavailable` with the reason."""
    if impl.backend != "cuda":
        return True
    native = importlib.import_module("attnkit.native")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            native.load()
    except RuntimeError as e:
        log = getattr(importlib.import_module("attnkit.native._build"), "_failure", None) or str(e)
        if log in _WARNED:
            return False
        _WARNED.add(log)
        warnings.warn(f"attnkit: the native extension failed to build, so the automatic backend choice "
                      f"skips the 'cuda' backend and uses the next one (build log: {log}); "
                      "`python -m attnkit.native --build` retries", RuntimeWarning, stacklevel=4)
        del caught
        return False
    for w in caught:  # not a failure: pass other warnings on
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return True


class _ChoiceCache(dict):
    """The cached backend choices. Clearing it (tests, :func:`register`) also clears the
    per-signature caches of the public functions (:class:`FastOp`), which hold choices too."""

    def clear(self) -> None:
        super().clear()
        for fast in _FAST_OPS:
            fast.cache.clear()


_FAST_OPS: list[FastOp] = []
_CHOICES: dict[tuple, str] = _ChoiceCache()
_WARNED: set[str] = set()


_ENV_SWITCHES = ("ATTNKIT_BACKEND", "TRITON_INTERPRET", "ATTNKIT_DISABLE_NATIVE", "ATTNKIT_EAGER_CUSTOM_OPS",
                 "ATTNKIT_CHECKS")
# os.environ's own storage (bytes keys on POSIX): a plain dict lookup, ~10x cheaper than os.environ.get
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_SWITCH_KEYS = tuple(os.environ.encodekey(k) for k in _ENV_SWITCHES) if _ENV_DATA is not None else None


def _env_key() -> tuple:
    if _ENV_SWITCH_KEYS is not None:
        return tuple(map(_ENV_DATA.get, _ENV_SWITCH_KEYS))
    return tuple(map(os.environ.get, _ENV_SWITCHES))


def choose(op_name: str, inputs: Inputs, backend: str | None = None, env: tuple | None = None) -> str:
    """The backend that runs a validated call (raises :class:`BackendUnavailable` if none can).

    Cached per (op, inputs, requested backend, environment switches): availability probes
    (imports, compiler checks, building the native extension) run once per call signature.
    """
    # _choose is in the key so that a replaced chooser (attnkit.tools' launch recorder) is honoured
    key = (op_name, inputs, backend, _env_key() if env is None else env, _GENERATION, _choose)
    name = _CHOICES.get(key)
    if name is not None:
        return name
    while True:
        impl, refusals = _choose(op_name, inputs, backend)
        if impl is None:
            requested = _requested(backend)
            if requested is not None:
                source = "backend" if backend is not None else "ATTNKIT_BACKEND"
                raise BackendUnavailable(
                    f"{op_name}: {source}={requested!r} cannot run this input:\n"
                    + _format(refusals, only=requested))
            raise BackendUnavailable(f"{op_name}: no backend can run this input:\n" + _format(refusals))
        if _requested(backend) is not None or _make_ready(impl):
            break
        # the automatic choice's backend failed to load: it now refuses, choose again
    _CHOICES[key] = impl.backend
    return impl.backend


def _traced_choose(op_name: str, device_type: str, device_index: int | None, dtype: torch.dtype,
                   head_dims: tuple, features: tuple, backend: str | None) -> str:
    """`choose` with plain arguments, evaluated once at trace time under torch.compile."""
    inputs = Inputs(op_name, torch.device(device_type, device_index), dtype, head_dims, frozenset(features))
    return choose(op_name, inputs, backend)


# What torch._dynamo.assume_constant_result(_traced_choose) does (dynamo calls the function at
# trace time and bakes its result in as a constant), without importing torch._dynamo (seconds)
# when attnkit is imported.
_traced_choose._dynamo_marked_constant = True
_traced_choose_constant = _traced_choose


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_TRACING_MODES = tuple(getattr(torch._C._TorchDispatchModeKey, k) for k in ("FAKE", "PROXY", "FUNCTIONAL")
                       if hasattr(torch._C._TorchDispatchModeKey, k))


def _subclass(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and type(x) not in _PLAIN


def _traced(kwargs: dict[str, Any]) -> bool:
    """Whether the call is being traced rather than run: a fake-tensor, proxy (make_fx) or
    functionalization mode is active, or an input is a tensor subclass (FakeTensor,
    FunctionalTensor, DTensor, ...). torch.compile/export are checked by the caller. Other
    (observing) dispatch modes, e.g. FlopCounterMode or attnkit.tools' launch recorder, see the
    backend's own torch calls and kernel launches."""
    for key in _TRACING_MODES:
        if torch._C._get_dispatch_mode(key) is not None:
            return True
    for x in kwargs.values():
        if type(x) in _PLAIN or x is None:
            continue
        if _subclass(x) or (isinstance(x, (tuple, list)) and any(_subclass(t) for t in x)):
            return True
    return False


def run(op_name: str, call: Call, backend: str | None = None) -> Any:
    """Choose a backend for a validated call (cached) and run it.

    Traced (``torch.compile``, ``torch.export``, make_fx, fake/functional tensors) the
    call goes through ``torch.ops.attnkit.<op_name>`` (an opaque node with a fake implementation
    and autograd); run eagerly it calls the backend implementation directly, with the backend's
    own autograd, because torch's Python custom-op path costs hundreds of µs per call (see
    docs/compile.md). ``ATTNKIT_EAGER_CUSTOM_OPS=1`` sends eager calls through the ops too.
    """
    inputs = call.inputs
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        name = _traced_choose_constant(op_name, inputs.device.type, inputs.device.index, inputs.dtype,
                                       tuple(inputs.head_dims), tuple(sorted(inputs.features)), backend)
    else:
        env = _env_key()
        name = choose(op_name, inputs, backend, env)
        if env[3] not in (b"1", "1") and not _traced(call.kwargs):  # env[3]: ATTNKIT_EAGER_CUSTOM_OPS
            return _IMPLS[op_name][name].function()(**call.kwargs)
    caller = _custom_ops.CALLERS.get(op_name)
    if caller is None:  # an op registered without a custom op (yet): traced as Python
        return _IMPLS[op_name][name].function()(**call.kwargs)
    return caller(call.kwargs, name)


# ------------------------------------------------------------------- per-signature fast path

_SLOW = object()  # the cache entry of a signature that the fast path cannot serve
_CUDA_GATE = object()  # value checks run unless a CUDA graph is being captured
_FAST_MAX = 256  # signatures cached per op; the cache is emptied when full (bounded, no LRU cost)
_SCALARS = (bool, int, float, str)
_NONE = type(None)
_FUNCTION = type(lambda: None)  # a feature_map callable: a key by identity (its calls are not replayed)
_PYTHON_KEY = torch._C.DispatchKey.Python
_python_key_on = torch._C._dispatch_tls_is_dispatch_key_included
_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter
_is_compiling, _is_exporting = torch.compiler.is_compiling, torch.compiler.is_exporting
_get_mode = torch._C._get_dispatch_mode
# Argument types keyed by some of their tensor attributes (register_keyed): type -> attribute names
_KEYED: dict[type, tuple[str, ...]] = {}


def register_keyed(cls: type, *attrs: str) -> None:
    """Let :class:`FastOp` cache calls that take a `cls` object (e.g. a ``LokiBasis``): such an
    argument is keyed by its type and the signatures of its attributes `attrs` (tensors or None,
    read on every call), and a normalised argument that *is* one of those attributes is taken
    from the object on every call. Without this, a call with an argument of another type is
    never cached. Only for objects whose other attributes the prepare step does not depend on."""
    _KEYED[cls] = tuple(attrs)


def _signature(args: tuple | list) -> tuple | None:
    """What a prepare step's result depends on, besides tensor values: each tensor's shape,
    strides, dtype, device and requires_grad; every other argument with its type (``True``,
    ``1`` and ``1.0`` are different signatures); tuples and lists element by element. None for
    anything that cannot be a key (tensor subclasses such as FakeTensor/DTensor, unhashable
    objects): such calls are never cached. Objects of a :func:`register_keyed` type count by
    their registered tensor attributes."""
    out = []
    app = out.append
    for a in args:
        t = type(a)
        if t is _Tensor or t is _Parameter:  # flat: the types at the end say where tensors are
            app(a.shape)
            app(a.stride())
            app(a.dtype)
            app(a.device)
            app(a.requires_grad)
        elif t is tuple or t is list:
            inner = _signature(a)
            if inner is None:
                return None
            app(inner)
        elif t in _SCALARS or t is _NONE or t is _FUNCTION:
            app(a)
        elif t in _KEYED:  # by its tensor attributes, read now (they may be replaced in place)
            inner = _signature([getattr(a, n) for n in _KEYED[t]])
            if inner is None:
                return None
            app(inner)
        else:
            return None
    app(tuple(map(type, args)))
    return tuple(out)


class FastOp:
    """The public function's path to the backend: validation, backend choice and argument
    normalisation cached per call signature.

    ``FastOp(name, prepare, names, values)(backend, *args)`` (``args`` in the order of ``names``,
    the prepare function's parameters) is ``run(name, prepare(**args), backend)``. Run eagerly on
    plain tensors, the first call of a signature (:func:`_signature`, the requested backend, the
    environment switches, grad mode) runs the prepare step and the backend choice and records
    the result: the backend function and the normalised arguments (constants, and which argument
    each tensor comes from). Later calls with that signature only run `values(kwargs)`, the op's
    checks that read tensor values (the prepare step runs the same function), where value checks
    are on (:func:`attnkit._validation.value_checks_enabled`), and call the backend function.
    Traced calls (torch.compile, export, fake/proxy/functional modes, tensor subclasses),
    ``ATTNKIT_EAGER_CUSTOM_OPS=1`` and signatures the record cannot replay (a prepare step
    that makes new tensors, e.g. a `feature_map` callable) take the full path every time.
    An argument of a :func:`register_keyed` type (a ``LokiBasis``) is keyed by its registered
    tensor attributes, and a normalised argument that is one of them is read from the object on
    every call.
    """

    __slots__ = ("name", "prepare", "names", "values", "cache")

    def __init__(self, name: str, prepare: Callable[..., Call], names: tuple[str, ...],
                 values: Callable[[dict], None] | None = None) -> None:
        self.name, self.prepare, self.names, self.values = name, prepare, tuple(names), values
        self.cache: dict[tuple, Any] = {}
        _FAST_OPS.append(self)

    def slow(self, backend: str | None, args: tuple) -> Any:
        return run(self.name, self.prepare(**dict(zip(self.names, args))), backend)

    def __call__(self, backend: str | None, *args: Any) -> Any:
        if _is_compiling() or _is_exporting():
            return self.slow(backend, args)
        if _python_key_on(_PYTHON_KEY):  # some dispatch mode is active: is it a tracing one?
            for key in _TRACING_MODES:
                if _get_mode(key) is not None:
                    return self.slow(backend, args)
        env = _env_key()
        sig = _signature(args)
        if sig is None or env[3] in (b"1", "1"):  # env[3]: ATTNKIT_EAGER_CUSTOM_OPS
            return self.slow(backend, args)
        key = (sig, backend, env, torch.is_grad_enabled(), _choose)
        entry = self.cache.get(key)
        if entry is None:
            return self._first(key, backend, env, args)
        if entry is _SLOW:
            return self.slow(backend, args)
        fn, kw, slots, attr_slots, gate = entry
        kw = kw.copy()
        for name, i in slots:
            kw[name] = args[i]
        for name, i, attr in attr_slots:  # a tensor attribute of a register_keyed argument
            kw[name] = getattr(args[i], attr)
        if gate is not None and (gate is True or not torch.cuda.is_current_stream_capturing()):
            self.values(kw)
        return fn(**kw)

    def _first(self, key: tuple, backend: str | None, env: tuple, args: tuple) -> Any:
        call = self.prepare(**dict(zip(self.names, args)))  # value checks included
        name = choose(self.name, call.inputs, backend, env)
        if len(self.cache) >= _FAST_MAX:
            self.cache.clear()
        self.cache[key] = self._record(call, name, env, args)
        return run(self.name, call, backend)

    def _record(self, call: Call, backend: str, env: tuple, args: tuple) -> Any:
        const, slots, attr_slots = {}, [], []
        position = {n: i for i, n in enumerate(self.names)}
        for k, v in call.kwargs.items():
            if isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list))
                                               and any(isinstance(x, torch.Tensor) for x in v)):
                i = position.get(k)
                if i is not None and args[i] is v:
                    slots.append((k, i))
                    continue
                found = _attribute_slot(v, args)
                if found is None:  # a tensor the prepare step made: cannot be replayed
                    return _SLOW
                attr_slots.append((k, *found))
            else:
                const[k] = v
        kind = call.inputs.device.type
        if self.values is None or kind == "meta":
            gate = None
        elif kind == "cuda":
            gate = _CUDA_GATE if env[4] in (b"1", "1") else None  # env[4]: ATTNKIT_CHECKS
        else:
            gate = True
        return (_IMPLS[self.name][backend].function(), const, tuple(slots), tuple(attr_slots), gate)


def _attribute_slot(v: Any, args: tuple) -> tuple[int, str] | None:
    """`(i, attr)` if `v` is the keyed attribute `attr` of the argument `args[i]`, else None."""
    for i, a in enumerate(args):
        for attr in _KEYED.get(type(a), ()):
            if getattr(a, attr) is v:
                return i, attr
    return None


def fast(name: str, prepare: Callable[..., Call], values: Callable[[dict], None] | None = None) -> FastOp:
    """The :class:`FastOp` of a registered op; `names` are the prepare function's parameters."""
    import inspect

    names = tuple(inspect.signature(prepare).parameters)
    return FastOp(name, prepare, names, values)


def implementation(op_name: str, backend: str) -> Callable[..., Any]:
    """The function `backend` runs for `op_name` (imported on first use)."""
    return _IMPLS[op_name][backend].function()


@dataclass
class Explanation:
    """What the automatic (or requested) choice would do for a call, and why."""

    op: str
    backend: str | None
    requested: str | None
    refusals: dict[str, list[str]]
    inputs: Inputs

    def __str__(self) -> str:
        from ._labels import backend_label

        head = f"{self.op}: " + (f"runs on {self.backend!r} ({backend_label(self.backend, self.inputs.device)})"
                                 if self.backend else "no backend can run this input")
        if self.requested:
            head += f" (requested {self.requested!r})"
        body = []
        for name, reasons in self.refusals.items():
            if name == self.backend:
                continue
            body.append(f"  {name}: " + ("; ".join(reasons) if reasons else "accepts, lower priority"))
        return "\n".join([head, *body])


def explain(op_name: str, *args: Any, **kwargs: Any) -> Explanation:
    """Validate a call and report which backend would run it, without running anything.

    Args:
        op_name: the public name of a dispatched op, e.g. ``"lightning_attention"``.
        *args, **kwargs: the arguments the op would be called with (``backend=`` included).

    Returns:
        An :class:`Explanation`; ``str()`` of it is a readable report.

    Example:
        >>> print(attnkit.explain("attention", q, k, v, causal=True))
    """
    if op_name not in _OPS:
        raise ValueError(f"op_name must be one of {sorted(_OPS)}, got {op_name!r}")
    backend = kwargs.pop("backend", None)
    call = _OPS[op_name](*args, **kwargs)
    requested = _requested(backend)
    impl, refusals = _choose(op_name, call.inputs, backend)
    return Explanation(op_name, impl.backend if impl else None, requested, refusals, call.inputs)


def ops() -> list[str]:
    """Names of every dispatched op."""
    return sorted(_OPS)


from . import _custom_ops  # noqa: E402  (registers torch.ops.attnkit.*; needs the names above)
