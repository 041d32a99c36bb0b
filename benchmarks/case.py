"""The objects every op config and peer adapter shares: a benchmark case and a runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class Unavailable(Exception):
    """A backend or peer cannot run this case; the message says why (shown once per reason)."""


@dataclass
class Case:
    """One shape of one op, with its inputs already built (outside any timed region).

    ``shape`` holds the resolved shape parameters (``B``, ``T``, ``S``, ``H``, ``Hk``, ``D``,
    ``Dv``, ``causal``, ...); ``tensors`` the canonical attnkit-layout inputs (``[B, T, H, D]``).
    ``grad`` is True when the mode differentiates (inputs then require grad).
    """

    op: str
    mode: str
    device: torch.device
    dtype: torch.dtype
    shape: dict[str, Any]
    tensors: dict[str, Any] = field(default_factory=dict)
    grad: bool = False

    def __getitem__(self, key: str) -> Any:
        return self.shape[key]


@dataclass
class Runner:
    """A ready-to-time call: ``fn()`` runs the op once on prebuilt inputs and returns its outputs.

    ``leaves`` are the tensors whose ``.grad`` is reset (set to None) before each timed repeat.
    ``note`` is shown in the results (e.g. which backend an automatic attnkit call takes).
    ``model`` replaces the op's FLOP/byte model when the runner computes something else (softmax
    attention as the crossover of a linear op, dense decoding next to Loki).
    """

    name: str
    fn: Callable[[], Any]
    leaves: tuple[torch.Tensor, ...] = ()
    note: str = ""
    model: Callable[[Case], tuple[float | None, float | None, int]] | None = None


def primary(out: Any) -> torch.Tensor:
    """The tensor to differentiate: the output itself, or the first element of a tuple."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def fresh_leaf(x: torch.Tensor, grad: bool) -> torch.Tensor:
    """A detached contiguous copy that is a leaf (a peer's own-layout input, built untimed)."""
    y = x.detach().contiguous().clone()
    return y.requires_grad_(grad) if y.is_floating_point() else y
