"""Process-group plumbing shared by the context-parallel ops.

Every collective of `attnkit.distributed` goes through this module and calls the
`torch.distributed` function by attribute at call time, so a wrapper installed on
`torch.distributed` (a tracer, or :class:`ByteCounter`, the payload counter the tests and
`benchmarks/distributed.py` share) sees every byte the ops send.

The one differentiable collective is :class:`_GatherFinish`: an all-gather along a new leading
dim whose backward is the mirrored reduce-scatter (sum) of the same size. It is split in a
*start* (launch the async all-gather) and a *finish* (wait, and hook into autograd), so callers
can overlap local work with the transfer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .._validation import value_checks_enabled


def _all_gather_fn():
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter_fn():
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# The torch.distributed functions this module may call for a payload (the newer name first).
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor")


@dataclass(frozen=True)
class Transfer:
    """One collective call as a byte counter saw it: the payload this rank contributes."""

    name: str
    nbytes: int
    dtype: torch.dtype


class ByteCounter:
    """Counts the payload bytes this rank contributes to the collectives of this module.

    Installing it wraps the :data:`COLLECTIVES` on `torch.distributed` (which this module calls by
    attribute at call time, so every payload of `attnkit.distributed` passes through the wrapper);
    :meth:`uninstall` (or leaving a ``with`` block) puts the originals back. An all-gather counts the
    input this rank sends; a reduce-scatter the output-sized share it receives, the same size the
    mirrored all-gather sends. Wire bytes of ring algorithms are `(P - 1)×` the payload.

        counter = ByteCounter()            # installed
        ...; transfers = counter.take()     # the floating-point payloads since the last take()
        counter.uninstall()
    """

    def __init__(self, install: bool = True) -> None:
        self.log: list[Transfer] = []
        self._originals: dict[str, Any] = {}
        if install:
            self.install()

    def install(self) -> ByteCounter:
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None and name not in self._originals:
                self._originals[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        return self

    def uninstall(self) -> None:
        for name, fn in self._originals.items():
            setattr(dist, name, fn)
        self._originals.clear()

    def __enter__(self) -> ByteCounter:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def _wrap(self, name: str, fn: Any) -> Any:
        def wrapped(output, input, *args, **kwargs):
            t = input if name.startswith("all_gather") else output
            self.log.append(Transfer(name, t.numel() * t.element_size(), t.dtype))
            return fn(output, input, *args, **kwargs)
        return wrapped

    def take(self, floating_only: bool = True) -> list[Transfer]:
        """The transfers since the last call (float payloads only by default: the int64 shape
        checks of :func:`check_same_everywhere` are left out), and start a new count."""
        out = [t for t in self.log if t.dtype.is_floating_point or not floating_only]
        self.log.clear()
        return out

    def take_bytes(self) -> int:
        """The floating-point payload bytes since the last take, and start a new count."""
        return sum(t.nbytes for t in self.take())


def resolve_group(group: Any) -> tuple[Any, int, int]:
    """`(group, world_size, rank)` of `group` (None: the default group); raises when not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("attnkit.distributed needs an initialised torch.distributed process group: call "
                           "torch.distributed.init_process_group(...) first (e.g. under torchrun)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group: every rank that calls an attnkit.distributed "
                         "op must belong to the group it passes")
    return group, world, rank


@dataclass
class Pending:
    """An all-gather in flight: `out [P, *x.shape]` is valid after `work.wait()`."""

    out: torch.Tensor
    work: Any
    group: Any


def gather_start(x: torch.Tensor, group: Any, world: int) -> Pending:
    """Launch an async all-gather of `x` (no autograd); finish it with :func:`gather_finish`."""
    x = x.detach().contiguous()
    # a flat output: gloo wants [P·n] (NCCL takes any shape of that size)
    out = x.new_empty(world * x.numel())
    work = _all_gather_fn()(out, x.reshape(-1), group=group, async_op=True)
    return Pending(out.view(world, *x.shape), work, group)


class _GatherFinish(torch.autograd.Function):
    """`[*s]` -> `[P, *s]` (every rank's tensor); backward: reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pending: Pending) -> torch.Tensor:
        pending.work.wait()
        ctx.group = pending.group
        ctx.shape = x.shape
        return pending.out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # rank j's shard fed every rank's loss: its gradient is the sum over ranks of grad[j]
        out = grad.new_empty(ctx.shape)
        _reduce_scatter_fn()(out.view(-1), grad.contiguous().view(-1), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def gather_finish(x: torch.Tensor, pending: Pending) -> torch.Tensor:
    """Wait for `pending` (started from `x`) and return `[P, *x.shape]`, differentiable w.r.t. `x`."""
    return _GatherFinish.apply(x, pending)


def all_gather(x: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    """Differentiable all-gather along a new leading dim (no overlap)."""
    return gather_finish(x, gather_start(x, group, world))


_META_LEN = 32


def check_same_everywhere(what: str, values: list[int], group: Any, world: int, device: torch.device,
                          *tensors: torch.Tensor | None) -> None:
    """Raise the same ValueError on every rank when `values` (shapes, flags) differ between ranks.

    A constant-size int64 all-gather (independent of T). Mismatched shapes would otherwise make the
    payload collective fail or hang, so this runs whenever value checks may run (always on CPU;
    on CUDA with `ATTNKIT_CHECKS=1`, since it synchronises the host).
    """
    if world == 1 or not value_checks_enabled(*tensors):
        return
    if len(values) > _META_LEN - 1:
        raise ValueError(f"{what}: at most {_META_LEN - 1} values can be compared, got {len(values)}")
    # fixed length (count first), so that ranks with different ranks of shapes still exchange equal sizes
    padded = [len(values), *values] + [0] * (_META_LEN - 1 - len(values))
    mine = torch.tensor(padded, dtype=torch.int64, device=device)
    out = mine.new_empty(world * _META_LEN)
    _all_gather_fn()(out, mine, group=group)
    out = out.view(world, _META_LEN)
    rows = [row[1:1 + row[0]] for row in out.tolist()]
    if any(row != rows[0] for row in rows):
        raise ValueError(f"{what} must be the same on every rank of the group, got {rows} (one row per rank); "
                         "every rank must hold an equal-length shard of the same batch")
