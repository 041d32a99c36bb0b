"""Loki: low-rank-key sparse attention for decoding (public functions and the basis object).

Loki (Singhania et al., 2024) rotates keys into their per-head PCA basis once, scores every
cached position cheaply with the leading ``rank`` rotated dimensions, and runs exact softmax
attention over the ``top_k`` best positions only. Semantics and decisions: docs/loki.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ... import _custom_ops, dispatch
from ... import _validation as V
from . import reference

__all__ = ["LokiBasis", "loki_attention_decode", "loki_calibrate", "loki_rotate"]

_STATE_KEYS = ("components", "explained_variance_ratio", "mean")
_BASIS_LAYOUT = "[Hk, D, D]"


class LokiBasis:
    """Per-KV-head PCA basis of the keys, as returned by :func:`loki_calibrate`.

    Attributes:
        components: `[Hk, D, D]` orthonormal, float32 by default; column `j` of head `h` is the
            `j`-th principal axis (columns sorted by explained variance, descending).
        explained_variance_ratio: `[Hk, D]`, the share of the keys' variance along each column
            (each head's row sums to 1, or is all zeros if that head's keys had no variance).
        mean: `[Hk, D]` mean key per head when calibrated with ``center=True``, else ``None``.
            The axes are then those of the centred keys; :func:`loki_rotate` never subtracts the
            mean (a rotation keeps dot products, a shift would not).

    Construction validates shapes, dtypes and devices, and (for CPU tensors, or under
    ``ATTNKIT_CHECKS=1``) that the components are orthonormal.

    Example:
        >>> basis = attnkit.loki_calibrate(keys)          # keys [N, Hk, D]
        >>> torch.save(basis.state_dict(), "basis.pt")
        >>> basis = attnkit.LokiBasis.from_state_dict(torch.load("basis.pt")).to("cuda")
    """

    def __init__(self, components: torch.Tensor, explained_variance_ratio: torch.Tensor,
                 mean: torch.Tensor | None = None) -> None:
        _check_basis_tensors(components, explained_variance_ratio, mean)
        self.components = components
        self.explained_variance_ratio = explained_variance_ratio
        self.mean = mean

    @property
    def num_kv_heads(self) -> int:
        """`Hk`, the number of key/value heads the basis serves."""
        return self.components.shape[0]

    @property
    def head_dim(self) -> int:
        """`D`, the key head dim."""
        return self.components.shape[-1]

    @property
    def device(self) -> torch.device:
        """The device of the basis' tensors."""
        return self.components.device

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors by name (``mean`` only when present), detached, not copied."""
        out = {"components": self.components.detach(),
               "explained_variance_ratio": self.explained_variance_ratio.detach()}
        if self.mean is not None:
            out["mean"] = self.mean.detach()
        return out

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> LokiBasis:
        """A basis from :meth:`state_dict` output (keys ``components``,
        ``explained_variance_ratio`` and optionally ``mean``; any other key is an error)."""
        _check_state_keys(state_dict)
        return cls(state_dict["components"], state_dict["explained_variance_ratio"],
                   state_dict.get("mean"))

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Replace this basis' tensors with those of `state_dict`, kept on this basis' device
        and in its dtypes. `Hk` and `D` must match; ``mean`` follows the state dict. Nothing
        changes if the state dict is rejected."""
        loaded = LokiBasis.from_state_dict(state_dict)
        if loaded.components.shape != self.components.shape:
            raise ValueError(f"state_dict['components'] must have shape {_BASIS_LAYOUT} = "
                             f"{V.shape_str(self.components)} to load into this basis, "
                             f"got {V.shape_str(loaded.components)}")
        ratio_dtype = self.explained_variance_ratio.dtype
        mean_dtype = self.mean.dtype if self.mean is not None else ratio_dtype
        self.components = _to(loaded.components, self.device, self.components.dtype)
        self.explained_variance_ratio = _to(loaded.explained_variance_ratio, self.device, ratio_dtype)
        self.mean = _to(loaded.mean, self.device, mean_dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LokiBasis:
        """A basis on `device` (default: unchanged) with its tensors in `dtype` (default:
        unchanged, so components stay float32). Returns ``self`` when nothing changes."""
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        moved = [_to(t, device, dtype) for t in (self.components, self.explained_variance_ratio, self.mean)]
        if all(a is b for a, b in zip(moved, (self.components, self.explained_variance_ratio, self.mean))):
            return self
        return LokiBasis(*moved)

    def __repr__(self) -> str:
        return (f"LokiBasis(num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"centered={self.mean is not None}, dtype={V.dtype_name(self.components.dtype)}, "
                f"device={self.device})")


def _to(t: torch.Tensor | None, device, dtype) -> torch.Tensor | None:
    if t is None:
        return None
    return t.to(device=device if device is not None else t.device, dtype=dtype if dtype is not None else t.dtype)


def _check_state_keys(state_dict: Mapping[str, Any]) -> None:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of tensors, got {type(state_dict).__name__}")
    missing = [k for k in _STATE_KEYS[:2] if k not in state_dict]
    unexpected = [k for k in state_dict if k not in _STATE_KEYS]
    if missing or unexpected:
        raise ValueError(f"state_dict must have keys {list(_STATE_KEYS[:2])} and optionally 'mean'; "
                         f"missing {missing}, unexpected {unexpected}")


def _check_basis_tensors(components: Any, ratio: Any, mean: Any) -> None:
    V.expect_ndim("components", components, 3, _BASIS_LAYOUT)
    hk, d, d2 = components.shape
    if d != d2 or hk < 1 or d < 1:
        raise ValueError(f"components must have shape {_BASIS_LAYOUT} with Hk, D >= 1 (one square "
                         f"matrix per KV head), got {V.shape_str(components)}")
    V.expect_float("components", components)
    V.expect_shape("explained_variance_ratio", ratio, (hk, d), "[Hk, D]")
    V.expect_float("explained_variance_ratio", ratio)
    names, tensors = ["components", "explained_variance_ratio"], [components, ratio]
    if mean is not None:
        V.expect_shape("mean", mean, (hk, d), "[Hk, D]")
        V.expect_float("mean", mean)
        names.append("mean")
        tensors.append(mean)
    V.expect_same_device(names, tensors)
    if components.device.type != "meta" and V.value_checks_enabled(components):  # meta: no values
        c = components.detach().to(torch.float64)
        err = float((c.transpose(-1, -2) @ c - torch.eye(d, dtype=torch.float64, device=c.device)).abs().max())
        # Rounding orthonormal columns to a dtype moves C^T C by at most ~eps; PCA noise ~1e-6.
        tol = max(1e-4, 4 * torch.finfo(components.dtype).eps)
        if not err <= tol:
            raise ValueError(f"components must be orthonormal per head (components[h]^T components[h] "
                             f"= I); max deviation is {err:.3g}, allowed {tol:.3g}. "
                             f"Build the basis with loki_calibrate")


def _check_basis(basis: Any, hk: int, d: int, device: torch.device, against: str) -> None:
    """`basis` handed to an op must be a LokiBasis for `hk` KV heads of dim `d` on `device`."""
    if not isinstance(basis, LokiBasis):
        raise TypeError(f"basis must be a LokiBasis (from loki_calibrate), got {type(basis).__name__}")
    if basis.num_kv_heads != hk or basis.head_dim != d:
        raise ValueError(f"basis must have components of shape {_BASIS_LAYOUT} = [{hk}, {d}, {d}] to "
                         f"match {against} ({hk} KV heads, head dim {d}), got "
                         f"{V.shape_str(basis.components)}")
    if basis.device != device:
        raise ValueError(f"basis must be on the same device as {against} ({device}), got "
                         f"{basis.device}; move it with basis.to({str(device)!r})")


# ------------------------------------------------------------------------------ calibrate, rotate


def loki_calibrate(keys: torch.Tensor, *, center: bool = False,
                   dtype: torch.dtype = torch.float32) -> LokiBasis:
    """PCA of a sample of keys, per KV head: the basis Loki scores in.

    Accumulates in float64 and diagonalises each head's (centred) second-moment matrix with
    ``torch.linalg.eigh``. Columns are sorted by explained variance, descending; the sign of
    each column is fixed so that its largest-magnitude entry is positive (first one on ties),
    so equal inputs give equal bases. Columns that share an eigenvalue are only defined up to a
    rotation among themselves.

    Args:
        keys: `[N, Hk, D]` sample of (pre-RoPE or post-RoPE, as the model caches them) keys, any
            float dtype, `N >= 1`. Flatten batch and time first: ``k.reshape(-1, Hk, D)``.
        center: if True, the axes are those of the centred keys and the mean is kept in
            ``basis.mean``. Scores still use plain rotated keys: the dropped trailing dims then
            add about ``q_rot[rank:] · mean_rot[rank:]`` to every position alike (mean_rot: the
            rotated mean), which does not change the ranking. Default False.
        dtype: dtype of the returned tensors, float32 by default; ``torch.float64`` keeps the
            float64 PCA as is (orthonormal to float64 precision, for golden runs).

    Returns:
        A :class:`LokiBasis` with `components [Hk, D, D]`, `explained_variance_ratio [Hk, D]`
        and `mean [Hk, D]` (or None) in `dtype` (float32), on the keys' device.

    Example:
        >>> keys = k_prefill.reshape(-1, Hk, D)           # k_prefill [B, T, Hk, D]
        >>> basis = attnkit.loki_calibrate(keys)
        >>> basis.explained_variance_ratio[:, :32].sum(-1)  # variance kept at rank 32
    """
    V.expect_ndim("keys", keys, 3, "[N, Hk, D]")
    V.expect_float("keys", keys)
    n, hk, d = keys.shape
    if n < 1 or hk < 1 or d < 1:
        raise ValueError(f"keys must have shape [N, Hk, D] with N, Hk, D >= 1, got {V.shape_str(keys)}")
    if not isinstance(center, bool):
        raise TypeError(f"center must be a bool, got {type(center).__name__}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    if _custom_ops.through_op(keys):  # traced: torch.ops.attnkit.loki_calibrate (docs/compile.md)
        # detached: calibration is not differentiable (the op registers no autograd)
        components, ratio, mean = _custom_ops.OPS["loki_calibrate"](keys.detach(), center=center, dtype=dtype)
        return LokiBasis(components, ratio, mean if center else None)
    return LokiBasis(*_calibrate(keys, center, dtype))


def _calibrate(keys: torch.Tensor, center: bool, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The tensors of :func:`loki_calibrate`'s basis (validated arguments; also the body of the
    op ``torch.ops.attnkit.loki_calibrate``): `(components, explained_variance_ratio, mean or
    None)` in `dtype`. The finite-covariance check reads values: skipped while tracing."""
    with torch.no_grad():
        cov, mean = reference.key_covariance(keys, center)  # float64 [Hk, D, D], [Hk, D]
        # eigh cannot digest NaN/Inf (it raises a LinAlgError): say why instead.
        if V.value_checks_enabled(keys) and not bool(torch.isfinite(cov).all()):
            raise ValueError("keys must be finite to calibrate a basis: their float64 covariance "
                             "has NaN/Inf entries")
        components, ratio = reference.eigh_descending(cov)
    return components.to(dtype), ratio.to(dtype), mean.to(dtype) if mean is not None else None


def loki_rotate(x: torch.Tensor, basis: LokiBasis) -> torch.Tensor:
    """Rotate keys (or queries) into the basis: ``x @ basis.components[h]`` for each KV head h.

    A pure rotation (no mean is subtracted), so every dot product between two rotated vectors
    of the same head equals the one before rotation. Computed in float32 (float64 for float64
    input); differentiable with respect to `x`.

    Args:
        x: `[..., Hk, D]`, any float dtype; the head axis is the second to last.
        basis: a :class:`LokiBasis` for `Hk` KV heads of dim `D`, on x's device.

    Returns:
        `[..., Hk, D]` in x's dtype.

    Example:
        >>> k_cache_rot[:, :T] = attnkit.loki_rotate(k, basis)  # k [B, T, Hk, D]
    """
    V.expect_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape [..., Hk, D] (at least 2 dims), got {V.shape_str(x)}")
    V.expect_float("x", x)
    _check_basis(basis, x.shape[-2], x.shape[-1], x.device, against="x")
    components = basis.components
    if _custom_ops.through_op(x, components):  # traced: torch.ops.attnkit.loki_rotate (docs/compile.md)
        return _custom_ops.OPS["loki_rotate"](x, components)
    return _rotate(x, components)


_rotate = reference.rotate  # the body of loki_rotate and of its op


# ------------------------------------------------------------------------------------ decode


_PAGED_K, _PAGED_V = "[num_blocks, block_size, Hk, D]", "[num_blocks, block_size, Hk, Dv]"


def _check_caches(k_cache_rot: Any, v_cache: Any, B: int, D: int, block_table: Any, against: str,
                  k_name: str = "k_cache_rot") -> tuple[int, int, int, int]:
    """Rotated-key and value caches for `B` rows of head dim `D`: contiguous `[B, Smax, Hk, D]` /
    `[B, Smax, Hk, Dv]`, or with a `block_table` paged `[num_blocks, block_size, Hk, D]` /
    `[num_blocks, block_size, Hk, Dv]` (SPEC "paged KV cache"). Returns `(Smax, Hk, Dv, page)`:
    `Smax = max_blocks * block_size` and `page = block_size` when paged, `page = 0` otherwise.
    Shape and dtype of the table only; its values are checked by :func:`_check_table_values`."""
    paged = block_table is not None
    V.expect_ndim(k_name, k_cache_rot, 4, _PAGED_K if paged else "[B, Smax, Hk, D]")
    V.expect_ndim("v_cache", v_cache, 4, _PAGED_V if paged else "[B, Smax, Hk, Dv]")
    n0, n1, Hk, _ = k_cache_rot.shape
    Dv = v_cache.shape[3]
    if not paged:
        V.expect_shape(k_name, k_cache_rot, (B, n1, Hk, D), f"[B, Smax, Hk, D] (B and D from {against})")
        V.expect_shape("v_cache", v_cache, (B, n1, Hk, Dv),
                       f"[B, Smax, Hk, Dv] (B from {against}, Smax and Hk from {k_name})")
        return n1, Hk, Dv, 0
    V.expect_shape(k_name, k_cache_rot, (n0, n1, Hk, D), f"{_PAGED_K} (D from {against})")
    V.expect_shape("v_cache", v_cache, (n0, n1, Hk, Dv), f"{_PAGED_V} (num_blocks, block_size, Hk from {k_name})")
    if n1 < 1:
        raise ValueError(f"{k_name} must have a block size >= 1 in dim 1 when paged, got shape "
                         f"{V.shape_str(k_cache_rot)}")
    V.check_block_table(block_table, B, n0, n1, None, 0)  # type, dtype and shape
    return block_table.shape[1] * n1, Hk, Dv, n1


def _check_table_values(block_table: torch.Tensor | None, k_cache_rot: torch.Tensor,
                        cache_seqlens: torch.Tensor, new_tokens: int) -> None:
    """The table's value checks (part of the ops' value-check functions): every table entry a
    row uses (the blocks of its first `cache_seqlens[b] + new_tokens` tokens) is a block of the
    cache, the row fits the table, and (appending) no two rows write one cache slot."""
    if block_table is not None:
        V.block_table_values(block_table, k_cache_rot.shape[0], k_cache_rot.shape[1], cache_seqlens, new_tokens)


@dispatch.op("loki_attention_decode")
def _prepare_loki_attention_decode(q, k_cache_rot, v_cache, cache_seqlens, basis, *, rank, top_k,
                                   scale=None, selection="head", block_table=None) -> dispatch.Call:
    V.expect_ndim("q", q, 4, "[B, 1, H, D]")
    B, tq, H, D = q.shape
    if tq != 1:
        raise ValueError(f"q must have shape [B, 1, H, D] (one decoding step), got {V.shape_str(q)}")
    Smax, Hk, Dv, page = _check_caches(k_cache_rot, v_cache, B, D, block_table, against="q")
    V.expect_heads("q", H, "k_cache_rot", Hk)
    V.expect_float("q", q)
    V.expect_same_dtype(["q", "k_cache_rot", "v_cache"], [q, k_cache_rot, v_cache])
    V.expect_same_device(["q", "k_cache_rot", "v_cache", "cache_seqlens", "block_table"],
                         [q, k_cache_rot, v_cache, V.expect_tensor("cache_seqlens", cache_seqlens), block_table])
    V.check_index("cache_seqlens", cache_seqlens, B, Smax + 1, "", values=False)  # values: below
    if block_table is not None:
        block_table = block_table.contiguous()
    _check_basis(basis, Hk, D, q.device, against="k_cache_rot")
    rank = V.expect_int("rank", rank, 1, D)
    top_k = V.expect_int("top_k", top_k, 1)
    scale = V.check_float_scale(scale, D)
    V.expect_choice("selection", selection, ("head", "group"))

    features = {f"selection={selection}"}
    if H != Hk:
        features.add("gqa")
    if page:
        features.update(("paged", f"block_size={page}"))
    inputs = dispatch.Inputs(op="loki_attention_decode", device=q.device, dtype=q.dtype,
                             head_dims=(D, Dv), features=frozenset(features))
    # Backends get the components in their compute dtype: float32 (float64 for float64 q).
    components = basis.components.to(reference.compute_dtype(q.dtype))
    kwargs = dict(q=q, k_cache_rot=k_cache_rot, v_cache=v_cache, cache_seqlens=cache_seqlens,
                  components=components, rank=rank, top_k=top_k, scale=scale, selection=selection)
    if block_table is not None:  # only when set (backends' contract: docs/loki.md)
        kwargs["block_table"] = block_table
    if V.value_checks_enabled(cache_seqlens, block_table):
        _loki_attention_decode_values(kwargs)
    return dispatch.Call(inputs=inputs, kwargs=kwargs)


def _loki_attention_decode_values(kw: dict) -> None:
    """The checks of `loki_attention_decode[_lowrank]` that read tensor values: `cache_seqlens`
    in `0..Smax` and, paged, the `block_table` entries the rows use (:func:`_check_table_values`)."""
    lens, k_cache_rot, block_table = kw["cache_seqlens"], kw["k_cache_rot"], kw.get("block_table")
    if block_table is not None:
        Smax = block_table.shape[1] * k_cache_rot.shape[1]
        capacity = "max_blocks * block_size, the capacity of block_table"
    else:
        Smax, capacity = k_cache_rot.shape[1], "Smax, the capacity of k_cache_rot"
    V.index_values("cache_seqlens", lens, Smax + 1, f"Smax = {Smax}, {capacity}")
    _check_table_values(block_table, k_cache_rot, lens, 0)


_LOKI_ATTENTION_DECODE = dispatch.fast("loki_attention_decode", _prepare_loki_attention_decode,
                                       _loki_attention_decode_values)


def loki_attention_decode(q: torch.Tensor, k_cache_rot: torch.Tensor, v_cache: torch.Tensor,
                          cache_seqlens: torch.Tensor, basis: LokiBasis, *, rank: int, top_k: int,
                          scale: float | None = None, backend: str | None = None,
                          selection: str = "head", block_table: torch.Tensor | None = None) -> torch.Tensor:
    """One decoding step of Loki sparse attention over a cache of rotated keys.

    For each row `b` and query head `h` (reading KV head ``h // (H // Hk)``) the op rotates `q`
    with that KV head's basis (``q̃ = q @ components``), scores every valid position
    ``s < cache_seqlens[b]`` with the leading `rank` dims (``q̃[:rank] · k̃_s[:rank]``), keeps
    the `top_k` best and returns exact softmax attention (`scale`, all `D` rotated dims) over
    those positions only. ``top_k >= cache_seqlens[b]`` is dense attention over the row; a row
    of length 0 outputs zeros. Ties in the approximate score are broken arbitrarily.
    Inference only (no gradient).

    Args:
        q: `[B, 1, H, D]` queries, not rotated.
        k_cache_rot: `[B, Smax, Hk, D]` keys rotated with :func:`loki_rotate`, same dtype as q.
        v_cache: `[B, Smax, Hk, Dv]` values, same dtype as q.
        cache_seqlens: int32 `[B]`, valid cached tokens per row, each in `0..Smax` (read-only).
        basis: the :class:`LokiBasis` the keys were rotated with (`Hk` heads, dim `D`).
        rank: int in `1..D`, the number of leading rotated dims used for scoring.
        top_k: int `>= 1`, positions attended per row and head (more than a row has = dense).
        scale: softmax scale, a float; default ``D ** -0.5``.
        backend: ``None`` (automatic), ``"reference"``, ``"triton"`` or ``"cuda"``.
        selection: ``"head"`` (default, as in the Loki paper) selects per query head;
            ``"group"`` selects once per KV head, by the max over its query heads of the
            approximate scores, so the heads of a GQA group share one set of positions (one
            gather of K/V per group).
        block_table: int32 `[B, max_blocks]` for a paged cache (SPEC "paged KV cache"): the
            caches are then `k_cache_rot [num_blocks, block_size, Hk, D]` and `v_cache
            [num_blocks, block_size, Hk, Dv]`, token `s` of row `b` lives in block
            ``block_table[b, s // block_size]`` at offset ``s % block_size`` and `Smax` is
            ``max_blocks * block_size``. Blocks a row does not use are never read.

    Returns:
        `o [B, 1, H, Dv]` in q's dtype.

    Example:
        >>> basis = attnkit.loki_calibrate(k_sample)                 # [N, Hk, D]
        >>> k_cache_rot[:, :T] = attnkit.loki_rotate(k, basis)       # at append time
        >>> o = attnkit.loki_attention_decode(q, k_cache_rot, v_cache, cache_seqlens, basis,
        ...                                   rank=D // 4, top_k=T // 8)
    """
    return _LOKI_ATTENTION_DECODE(backend, q, k_cache_rot, v_cache, cache_seqlens, basis, rank, top_k, scale,
                                  selection, block_table)


dispatch.register("loki_attention_decode", "reference", reference.loki_attention_decode, priority=0,
                  dtypes=V.REFERENCE_DTYPES)
# A cached call reads the basis' components afresh (load_state_dict replaces them); the ops use
# nothing else of the basis, and _check_basis depends only on the components' shape and device.
dispatch.register_keyed(LokiBasis, "components")
