"""Loki for models built from attnkit layers: calibrate a key basis per layer, switch Loki decoding on.

:func:`calibrate_loki` runs a model over a few batches with forward pre-hooks on every
:class:`~attnkit.nn.GroupedQueryAttention` layer, records the keys each layer caches (after
QK-norm and RoPE: what Loki decoding scores against) as per-head second moments, and returns one
:class:`attnkit.LokiBasis` per layer. :func:`set_loki_bases` then turns Loki decoding on for
those layers (:meth:`GroupedQueryAttention.set_loki_basis`). Background: docs/loki.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .. import _validation as V
from ..ops.loki import LokiBasis
from ..ops.loki import reference as loki_reference
from .softmax import GroupedQueryAttention

__all__ = ["calibrate_loki", "set_loki_bases"]


class _KeyMoments:
    """Running float64 sums of the keys of one layer: `n`, `Σ x [Hk, D]`, `Σ x xᵀ [Hk, D, D]`."""

    def __init__(self) -> None:
        self.n = 0
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def add(self, k: torch.Tensor) -> None:
        x = k.detach().reshape(-1, k.shape[-2], k.shape[-1]).to(torch.float64)  # [N, Hk, D]
        s1 = x.sum(dim=0)
        s2 = torch.einsum("nhd,nhe->hde", x, x)  # [N, Hk, D] x [N, Hk, D] -> [Hk, D, D]
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += x.shape[0]

    def basis(self, center: bool, dtype: torch.dtype) -> LokiBasis:
        """The PCA of the recorded keys, as :func:`attnkit.loki_calibrate` computes it on them
        (centred second moment `Σ x xᵀ / n - μ μᵀ` when `center`)."""
        cov = self.s2 / self.n
        mean = self.s1 / self.n if center else None
        if mean is not None:
            cov = cov - mean[:, :, None] * mean[:, None, :]
        cov = 0.5 * (cov + cov.transpose(-1, -2))  # exactly symmetric for eigh
        components, ratio = loki_reference.eigh_descending(cov)
        return LokiBasis(components.to(dtype), ratio.to(dtype), mean.to(dtype) if mean is not None else None)


def _run(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def calibrate_loki(model: nn.Module, batches: Iterable[Any], *, center: bool = False,
                   dtype: torch.dtype = torch.float32) -> dict[str, LokiBasis]:
    """One Loki key basis per :class:`~attnkit.nn.GroupedQueryAttention` layer of `model`, from
    the keys the layers produce while `model` runs over `batches`.

    Every layer's keys are recorded as they would be cached (after QK-norm and RoPE, at the
    positions the call uses: ``0..T-1``, ``position_ids``, or continuing a KV cache), accumulated
    as float64 per-head moments (no key is kept), and diagonalised like
    :func:`attnkit.loki_calibrate` (same sorting and sign convention). The keys are recomputed
    from each layer's input by a forward pre-hook, so the model runs unchanged (under
    ``torch.no_grad()``); the hooks are removed afterwards, also on error.

    Args:
        model: a module containing `GroupedQueryAttention` layers (or one such layer).
        batches: model inputs, each passed as ``model(batch)``, ``model(*batch)`` for a tuple or
            list, ``model(**batch)`` for a mapping. A few batches of representative text suffice.
        center: calibrate on centred keys (see :func:`attnkit.loki_calibrate`).
        dtype: dtype of the bases' tensors, float32 by default.

    Returns:
        ``{layer name: LokiBasis}`` in module order (the name as in ``model.named_modules()``;
        ``""`` for `model` itself).

    Example:
        >>> bases = attnkit.nn.calibrate_loki(model, [ids[:, :512] for ids in calibration_ids])
        >>> attnkit.nn.set_loki_bases(model, bases, rank=32, top_k=256)
    """
    V.expect_bool("center", center)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GroupedQueryAttention)}
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no GroupedQueryAttention layer to calibrate")
    moments = {name: _KeyMoments() for name in layers}

    def recorder(stats: _KeyMoments):
        def hook(module: GroupedQueryAttention, args: tuple, kwargs: dict) -> None:
            call = dict(zip(("x", "cache", "position_ids"), args), **kwargs)
            stats.add(module.cached_keys(call["x"], call.get("cache"), call.get("position_ids")))
        return hook

    handles = [m.register_forward_pre_hook(recorder(moments[name]), with_kwargs=True) for name, m in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                _run(model, batch)
    finally:
        for h in handles:
            h.remove()
    unseen = [name or "<model>" for name, s in moments.items() if s.n == 0]
    if unseen:
        raise ValueError(f"no keys were recorded for layers {unseen}: batches must be non-empty and run "
                         f"through every GroupedQueryAttention layer")
    return {name: s.basis(center, dtype) for name, s in moments.items()}


def set_loki_bases(model: nn.Module, bases: Mapping[str, LokiBasis | None], *, rank: int, top_k: int,
                   selection: str = "head") -> None:
    """Turn Loki decoding on (or off, for a ``None`` basis) in the named layers of `model`:
    :meth:`GroupedQueryAttention.set_loki_basis` for each ``(name, basis)`` of `bases` (the
    output of :func:`calibrate_loki`). Every name must be a `GroupedQueryAttention` of `model`;
    nothing changes if one is not. Build KV caches afterwards (``KVCache.for_module``)."""
    modules = dict(model.named_modules())
    bad = [name for name in bases if not isinstance(modules.get(name), GroupedQueryAttention)]
    if bad:
        raise ValueError(f"bases has names that are not GroupedQueryAttention layers of the model: {bad}")
    before = {name: modules[name].loki for name in bases}
    try:
        for name, basis in bases.items():
            modules[name].set_loki_basis(basis, rank=rank, top_k=top_k, selection=selection)
    except (TypeError, ValueError):
        for name, loki in before.items():  # rejected: leave every layer as it was
            modules[name].loki = loki
        raise
