"""Comparison helpers shared by every op's tests (flash-attn style).

The check: run the op once in float64 (the golden result, on the reference backend), once on
the reference backend in the test dtype, and once on the backend under test in the test dtype.
The backend passes when its error against the golden result is at most `factor` times the
same-dtype reference's error plus a small floor. This scales tolerances with what the dtype can
do instead of hard-coding them, and it never loosens for a particular kernel.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Error floor added to the reference error, relative to the golden tensor's max magnitude.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def load_native():
    """Build (or load) the native extension; skip only when no compiler can build it."""
    import attnkit.native
    from attnkit.native import _build

    if _build.cxx() is None:
        pytest.skip("no C++ compiler to build the native extension (install g++ or set CXX)")
    if DEVICE == "cuda" and _build.cuda_home() is None:
        pytest.skip("nvcc not found to build the CUDA kernels (set CUDA_HOME)")
    return attnkit.native.load()


def interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()


def kernel_dtypes() -> list:
    """dtypes to test Triton kernels in: bf16 only on a GPU (the interpreter's bf16 tl.dot is wrong)."""
    dts = [torch.float32, torch.float16]
    if not interpreted():
        dts.append(torch.bfloat16)
    return dts


def randn(*shape: int, dtype=torch.float32, device=DEVICE, scale: float = 1.0,
          requires_grad: bool = False, strided: bool = False) -> torch.Tensor:
    """Fresh random normal data (never zeros). `strided=True` returns a non-contiguous view
    with the same shape (every other element of a wider last dim)."""
    if strided:
        base = torch.randn(*shape[:-1], shape[-1] * 2, dtype=torch.float64, device=device) * scale
        x = base.to(dtype)[..., ::2]
        assert not x.is_contiguous()
    else:
        x = (torch.randn(*shape, dtype=torch.float64, device=device) * scale).to(dtype)
    if requires_grad:
        x.requires_grad_(True)
    return x


def clone_as(x: torch.Tensor | None, dtype: torch.dtype | None = None, requires_grad: bool | None = None):
    """A detached copy (optionally cast), keeping requires_grad unless told otherwise."""
    if x is None:
        return None
    rg = x.requires_grad if requires_grad is None else requires_grad
    y = x.detach().to(dtype if dtype is not None else x.dtype).clone()
    return y.requires_grad_(rg) if y.is_floating_point() else y


def cast_input(x64: torch.Tensor | None, dtype: torch.dtype, *, grad: bool = True, strided: bool = False):
    """A float64 tensor in `dtype` as a fresh leaf; with `strided`, a non-contiguous view (every
    other element of a wider buffer) whose gaps hold NaN, so a kernel that ignores strides fails."""
    if x64 is None:
        return None
    if not strided:
        return clone_as(x64, dtype, requires_grad=grad)
    wide = torch.full((*x64.shape[:-1], 2 * x64.shape[-1]), float("nan"), dtype=dtype, device=x64.device)
    wide[..., ::2] = x64.to(dtype)
    wide.requires_grad_(grad)
    return wide[..., ::2]


def poison(*shape: int, dtype=torch.float32, device=DEVICE) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel forgets to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    both_inf = torch.isinf(a64) & torch.isinf(b64) & (torch.sign(a64) == torch.sign(b64))
    d = (a64 - b64).abs()
    d = torch.where(both_inf, torch.zeros_like(d), d)
    return float(d.max()) if d.numel() else 0.0


def assert_close_to_golden(name: str, out: torch.Tensor, ref: torch.Tensor, golden: torch.Tensor,
                           factor: float = 2.0, floor: float | None = None) -> None:
    """`out` (backend, test dtype) must be within `factor` x the error of `ref` (reference, same
    dtype) against `golden` (float64), plus a floor relative to the golden magnitude."""
    assert out.shape == golden.shape, f"{name}: shape {tuple(out.shape)} != {tuple(golden.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != reference dtype {ref.dtype}"
    assert not torch.isnan(out).any() or torch.isnan(golden).any(), f"{name}: NaN in output"
    nan_out, nan_gold = torch.isnan(out), torch.isnan(golden)
    assert torch.equal(nan_out, nan_gold), f"{name}: NaN pattern differs from golden"
    mag = float(golden.detach().double().nan_to_num(0.0, 0.0, 0.0).abs().max()) if golden.numel() else 0.0
    fl = (FLOOR[out.dtype] if floor is None else floor) * max(mag, 1.0)
    err = max_err(out.nan_to_num(0.0), golden.nan_to_num(0.0))
    ref_err = max_err(ref.nan_to_num(0.0), golden.nan_to_num(0.0))
    assert err <= factor * ref_err + fl, (
        f"{name}: max error {err:.3e} vs golden exceeds {factor} x reference error {ref_err:.3e} "
        f"+ floor {fl:.3e} (|golden| max {mag:.3e}, dtype {out.dtype})")


def grads(outputs: Sequence[torch.Tensor | None], inputs: Sequence[torch.Tensor | None],
          cotangents: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Gradients of sum(out * cot) w.r.t. each input that requires grad (None elsewhere)."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o is not None and c is not None]
    wrt = [i for i in inputs if i is not None and i.requires_grad]
    total = sum((o.float() * c.to(o.device).float()).sum() if o.dtype != torch.float64
                else (o * c.to(o.device).double()).sum() for o, c in pairs)
    gs = torch.autograd.grad(total, wrt, allow_unused=True)
    it = iter(gs)
    return [next(it) if (i is not None and i.requires_grad) else None for i in inputs]


def flat(x: Any) -> list:
    """Tensors of a nested tuple/list, depth first; None is skipped."""
    if x is None:
        return []
    if isinstance(x, (tuple, list)):
        return [y for item in x for y in flat(item)]
    return [x]


def compare_op(fn: Callable[..., Any], make_args: Callable[[torch.dtype], tuple[tuple, dict]],
               dtype: torch.dtype, backend: str, *, factor: float = 2.0,
               grad: bool = False, output_names: Iterable[str] | None = None,
               floor: float | None = None) -> None:
    """Run `fn` on float64/reference, `dtype`/reference and `dtype`/`backend`; compare outputs
    (and gradients of every floating input that requires grad, under random cotangents).

    `make_args(dtype)` must return fresh (args, kwargs) *from the same underlying random data*
    for each dtype; helpers above (clone_as) make that easy. `fn` returns a tensor or a
    tuple/list of tensors (nested tuples, e.g. states (S, z), are flattened; None is skipped).
    """

    runs = {}
    for key, dt, be in (("golden", torch.float64, "reference"), ("ref", dtype, "reference"),
                        ("out", dtype, backend)):
        args, kwargs = make_args(dt)
        outs = flat(fn(*args, backend=be, **kwargs))
        leaves = [a for a in flat(list(args) + list(kwargs.values()))
                  if isinstance(a, torch.Tensor) and a.requires_grad]
        runs[key] = (outs, leaves)

    names = list(output_names) if output_names is not None else [f"out{i}" for i in range(len(runs["golden"][0]))]
    for i, name in enumerate(names):
        assert_close_to_golden(name, runs["out"][0][i], runs["ref"][0][i], runs["golden"][0][i],
                               factor=factor, floor=floor)
    if grad:
        gen = torch.Generator(device="cpu").manual_seed(1234)
        cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64) if o.requires_grad or o.grad_fn
                else None for o in runs["golden"][0]]
        g = {k: grads(runs[k][0], runs[k][1], cots) for k in runs}
        for j in range(len(runs["golden"][1])):
            if g["golden"][j] is None:
                continue
            assert g["out"][j] is not None, f"grad of input {j}: backend returned no gradient"
            assert_close_to_golden(f"grad[{j}]", g["out"][j], g["ref"][j], g["golden"][j],
                                   factor=factor, floor=floor)


def compiled_variants(kernel) -> int:
    """How many compiled variants a (possibly autotuned/heuristics-wrapped) Triton kernel holds."""
    fn = kernel
    while not hasattr(fn, "device_caches"):
        fn = fn.fn
    return sum(len(cache[0]) for cache in fn.device_caches.values())


def case_id(**kw: Any) -> str:
    """Readable id: case_id(B=2, T=63, H=4) -> 'B2-T63-H4'."""
    return "-".join(f"{k}{v}" for k, v in kw.items())


def params(cases: Iterable[dict]) -> list:
    """pytest.param list with readable ids from dicts of case fields."""
    return [pytest.param(c, id=case_id(**c)) for c in cases]
