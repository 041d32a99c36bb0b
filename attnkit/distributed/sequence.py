"""Sequence layouts of context parallelism: which tokens each rank holds.

`contiguous`: with `P` ranks, rank `r` holds tokens `[r·T/P, (r+1)·T/P)`.
`zigzag`: the sequence is cut into `2P` equal chunks and rank `r` holds chunks `r` and `2P-1-r`,
in that order, so that under a causal mask every rank gets the same amount of work.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from .._validation import expect_tensor
from . import _comm

LAYOUTS = ("contiguous", "zigzag")

__all__ = ["LAYOUTS", "gather_sequence", "shard_sequence"]


def check_layout(layout: Any) -> str:
    if not isinstance(layout, str):
        raise TypeError(f"layout must be one of {list(LAYOUTS)}, got {type(layout).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    return layout


def _check_dim(dim: Any, x: torch.Tensor, name: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must index a dim of {name} (shape {list(x.shape)}), got {dim}")
    return dim % x.dim()


def chunk_ranges(layout: str, world: int, rank: int, total: int) -> list[tuple[int, int]]:
    """The global token ranges `[start, end)` rank `rank` holds, in local order."""
    if layout == "contiguous":
        n = total // world
        return [(rank * n, (rank + 1) * n)]
    c = total // (2 * world)
    return [(rank * c, (rank + 1) * c), ((2 * world - 1 - rank) * c, (2 * world - rank) * c)]


def check_local_length(name: str, length: int, layout: str) -> None:
    """A local shard must hold whole chunks: any length for contiguous, an even one for zigzag."""
    if layout == "zigzag" and length % 2:
        raise ValueError(f"{name} must hold an even number of tokens with layout='zigzag' (two equal chunks "
                         f"r and 2P-1-r), got {length}; pad the sequence to a multiple of 2P")


def shard_sequence(x: torch.Tensor, *, group=None, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """This rank's shard of `x` (the full sequence, identical on every rank) along `dim`.

    Args:
        x: the whole tensor, e.g. `[B, T, H, D]` with `T` along `dim`.
        group: process group (default: the whole world).
        layout: `"contiguous"` (rank `r` holds `[r·T/P, (r+1)·T/P)`) or `"zigzag"` (chunks `r` and
            `2P-1-r` of `2P`).
        dim: the sequence dim. Default 1.

    Returns:
        A new tensor with `T/P` tokens along `dim` (differentiable; the gradient flows back to `x`).

    Raises:
        ValueError: `T` not divisible by `P` (by `2P` for zigzag), or an unknown layout.

    Example:
        >>> q_local = akd.shard_sequence(q, layout="zigzag")  # [B, T/P, H, D]
    """
    expect_tensor("x", x)
    layout = check_layout(layout)
    dim = _check_dim(dim, x, "x")
    group, world, rank = _comm.resolve_group(group)
    total = x.shape[dim]
    parts = world if layout == "contiguous" else 2 * world
    if total % parts:
        raise ValueError(f"x must have a sequence length divisible by {parts} ({'P' if parts == world else '2P'}, "
                         f"P = {world}) for layout={layout!r}, got T = {total} along dim {dim}")
    pieces = [x.narrow(dim, a, b - a) for a, b in chunk_ranges(layout, world, rank, total)]
    return torch.cat(pieces, dim=dim) if len(pieces) > 1 else pieces[0].clone()


def reassemble(gathered: torch.Tensor, layout: str, dim: int) -> torch.Tensor:
    """`[P, *local]` (rank-major) -> the whole sequence along `dim` of the local shape."""
    world = gathered.shape[0]
    if layout == "contiguous":
        return torch.cat(list(gathered.unbind(0)), dim=dim)
    halves = [g.chunk(2, dim=dim) for g in gathered.unbind(0)]
    order = [halves[j][0] for j in range(world)] + [halves[world - 1 - i][1] for i in range(world)]
    return torch.cat(order, dim=dim)


def gather_sequence(x_local: torch.Tensor, *, group=None, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """Reassemble the whole sequence from every rank's shard (the inverse of `shard_sequence`).

    One all-gather; differentiable: the backward is a reduce-scatter, so under the SPMD convention
    (the loss is the sum of the ranks' losses) `x_local.grad` is the gradient of its shard.

    Args:
        x_local: this rank's shard, the same shape on every rank.
        group, layout, dim: as in `shard_sequence`.

    Returns:
        The whole tensor, `P` times longer along `dim`, identical on every rank.

    Example:
        >>> o = akd.gather_sequence(o_local, layout="zigzag")  # [B, T, H, D]
    """
    expect_tensor("x_local", x_local)
    layout = check_layout(layout)
    dim = _check_dim(dim, x_local, "x_local")
    group, world, _ = _comm.resolve_group(group)
    check_local_length("x_local", x_local.shape[dim], layout)
    _comm.check_same_everywhere("x_local's shape and dtype", [*x_local.shape, _dtype_code(x_local.dtype)],
                                group, world, x_local.device, x_local)
    return reassemble(_comm.all_gather(x_local, group, world), layout, dim)


def _dtype_code(dtype: torch.dtype) -> int:
    return zlib.crc32(str(dtype).encode())
