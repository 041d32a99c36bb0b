"""Loki in attnkit.nn: per-layer calibration from a running model, Loki decoding through a KV cache
of rotated keys (dense at top_k >= length, the reference op's selection below it)."""

import pytest
import torch
from torch import nn

import attnkit
from attnkit.nn import GroupedQueryAttention, KVCache
from attnkit.nn.loki import calibrate_loki, set_loki_bases
from attnkit.nn.softmax import apply_rope, rope_cos_sin

from .harness import DEVICE

F64 = dict(dtype=torch.float64, device=DEVICE)


class TwoLayers(nn.Module):
    """RoPE + RMS QK-norm with GQA, then L2 QK-norm without RoPE (the norm fused into attention) and MQA."""

    def __init__(self) -> None:
        super().__init__()
        self.first = GroupedQueryAttention(32, 4, 2, qk_norm="rms", rope_theta=100.0, **F64)
        self.second = GroupedQueryAttention(32, 4, 1, qk_norm="l2", **F64)
        nn.init.normal_(self.first.k_norm.weight)

    def forward(self, x):
        return self.second(self.first(x))


def _keys_by_hand(layer: GroupedQueryAttention, x: torch.Tensor) -> torch.Tensor:
    """Post-norm, post-RoPE keys `[B, T, Hk, D]`, written out independently of the module."""
    B, T, _ = x.shape
    k = (x @ layer.k_proj.weight.T).view(B, T, layer.num_kv_heads, layer.head_dim)
    if layer.qk_norm == "rms":
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + layer.norm_eps) * layer.k_norm.weight
    elif layer.qk_norm == "l2":
        k = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + layer.norm_eps)
    if layer.rope_theta is not None:
        cos, sin = rope_cos_sin(torch.arange(T, device=x.device)[None].expand(B, T), layer.head_dim,
                                layer.rope_theta, k.dtype)
        k = apply_rope(k, cos, sin)
    return k


@pytest.mark.parametrize("center", [False, True])
def test_calibrate_loki_one_orthonormal_basis_per_layer(center):
    model = TwoLayers()
    batches = [torch.randn(2, T, 32, **F64) for T in (9, 16, 5)]
    bases = calibrate_loki(model, batches, center=center)
    assert list(bases) == ["first", "second"]
    inputs = {"first": batches, "second": [model.first(x).detach() for x in batches]}
    for name, basis in bases.items():
        layer = getattr(model, name)
        assert (basis.num_kv_heads, basis.head_dim) == (layer.num_kv_heads, layer.head_dim)
        c = basis.components.double()
        eye = torch.eye(layer.head_dim, **F64).expand_as(c)
        torch.testing.assert_close(c.transpose(-1, -2) @ c, eye, atol=1e-6, rtol=0)
        ratio = basis.explained_variance_ratio
        assert bool((ratio[:, :-1] >= ratio[:, 1:]).all())
        torch.testing.assert_close(ratio.sum(-1), torch.ones(layer.num_kv_heads, dtype=ratio.dtype))
        # Same basis as loki_calibrate on the keys the layer caches, written out by hand.
        keys = torch.cat([_keys_by_hand(layer, x).reshape(-1, layer.num_kv_heads, layer.head_dim)
                          for x in inputs[name]])
        want = attnkit.loki_calibrate(keys, center=center)
        torch.testing.assert_close(basis.components, want.components, atol=1e-5, rtol=0)
        torch.testing.assert_close(ratio, want.explained_variance_ratio, atol=1e-6, rtol=0)
        assert (basis.mean is None) == (not center)


def test_calibrate_loki_records_cache_positions_and_removes_hooks():
    # Keys recorded during prefill + decode through a cache sit at the cache's positions: the
    # basis equals the one of a single forward over the whole sequence.
    layer = GroupedQueryAttention(32, 4, 2, rope_theta=100.0, **F64)
    x = torch.randn(2, 12, 32, **F64)
    cache = KVCache.for_module(layer, 2, 16)
    steps = [(x[:, :7], cache)] + [(x[:, t:t + 1], cache) for t in range(7, 12)]
    stepped = calibrate_loki(layer, steps)[""]
    whole = calibrate_loki(layer, [x])[""]
    torch.testing.assert_close(stepped.components, whole.components, atol=1e-5, rtol=0)
    assert not layer._forward_pre_hooks
    with pytest.raises(ValueError, match="no GroupedQueryAttention layer"):
        calibrate_loki(nn.Linear(3, 3), [torch.randn(1, 3)])
    with pytest.raises(ValueError, match=r"no keys were recorded for layers \['<model>'\]"):
        calibrate_loki(layer, [])


def _calibrated(layer: GroupedQueryAttention, T: int = 24):
    return calibrate_loki(layer, [torch.randn(4, T, layer.hidden_size, **F64)])[""]


@pytest.mark.parametrize("selection", ["head", "group"])
@pytest.mark.parametrize("kv,qk_norm,rope", [(2, "rms", 1e4), (1, None, 1e4), (4, "l2", None)])
def test_loki_decode_top_k_at_least_length_equals_dense(kv, qk_norm, rope, selection):
    m = GroupedQueryAttention(64, 4, kv, qk_norm=qk_norm, rope_theta=rope, **F64)
    x = torch.randn(3, 12, 64, **F64)
    with torch.no_grad():
        full = m(x)
        m.set_loki_basis(_calibrated(m), rank=3, top_k=12, selection=selection)
        cache = KVCache.for_module(m, 3, 16)
        assert cache.loki_basis is m.loki.basis and cache.k_lowrank.shape == (3, kv, 16, 3)
        ys = [m(x[:, :6], cache=cache)]  # dense prefill
        ys += [m(x[:, t:t + 1], cache=cache) for t in range(6, 9)]  # Loki steps
        ys.append(m(x[:, 9:11], cache=cache))  # two tokens at once: dense, rotated queries
        ys.append(m(x[:, 11:], cache=cache))
    torch.testing.assert_close(torch.cat(ys, 1), full)
    assert cache.seqlens.tolist() == [12, 12, 12]
    # The cache holds rotated keys; the low-rank buffer mirrors their leading dims.
    k = _keys_by_hand(m, x)
    torch.testing.assert_close(cache.k[:, :12], attnkit.loki_rotate(k, m.loki.basis))
    assert torch.equal(cache.k_lowrank[:, :, :12], cache.k[:, :12, :, :3].transpose(1, 2))


@pytest.mark.parametrize("selection", ["head", "group"])
def test_loki_decode_small_top_k_is_the_reference_selection(selection):
    m = GroupedQueryAttention(64, 4, 2, qk_norm="rms", rope_theta=1e4, **F64)
    dense = GroupedQueryAttention(64, 4, 2, qk_norm="rms", rope_theta=1e4, **F64)
    dense.load_state_dict(m.state_dict(), strict=True)
    basis = _calibrated(m)
    m.set_loki_basis(basis, rank=2, top_k=3, selection=selection)
    x = torch.randn(2, 21, 64, **F64)
    cache, dense_cache = KVCache.for_module(m, 2, 32), KVCache.for_module(dense, 2, 32)
    with torch.no_grad():
        m(x[:, :20], cache=cache)
        dense(x[:, :20], cache=dense_cache)
        q = m.project_qkv(x[:, 20:], cache.seqlens[:, None].long())[0]  # [B, 1, H, D] post-RoPE
        y = m(x[:, 20:], cache=cache)
        y_dense = dense(x[:, 20:], cache=dense_cache)
    # Loki's output is the reference op on the same cache (the new key appended), through o_proj.
    o = attnkit.loki_attention_decode(q, cache.k, cache.v, cache.seqlens, basis, rank=2, top_k=3,
                                      scale=m.scaling, selection=selection, backend="reference")
    torch.testing.assert_close(y, m.o_proj(o.reshape(2, 1, -1)))
    assert not torch.allclose(y, y_dense)  # 3 of 21 positions: not dense attention


def test_loki_settings_state_dict_and_errors():
    m = GroupedQueryAttention(32, 4, 2, qk_norm="rms", rope_theta=1e4, **F64)
    keys = set(m.state_dict())
    basis = _calibrated(m)
    m.set_loki_basis(basis, rank=4, top_k=8)
    assert set(m.state_dict()) == keys and m.loki.rank == 4 and m.loki.selection == "head"
    with pytest.raises(ValueError, match=r"basis must have components of shape \[Hk, D, D\] = \[2, 8, 8\]"):
        m.set_loki_basis(attnkit.loki_calibrate(torch.randn(16, 1, 8)), rank=4, top_k=8)
    with pytest.raises(ValueError, match=r"rank must be in 1\.\.8, got 9"):
        m.set_loki_basis(basis, rank=9, top_k=8)
    with pytest.raises(TypeError, match="top_k must be an int"):
        m.set_loki_basis(basis, rank=4, top_k=None)
    assert m.loki.rank == 4  # rejected calls change nothing
    x = torch.randn(1, 5, 32, **F64)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache of keys rotated with this layer's basis"):
        m(x, cache=KVCache(1, 8, 2, 8, **F64))  # a plain cache holds unrotated keys
    # A Loki cache keeps working once Loki is switched off: dense attention in the rotated frame.
    cache = KVCache.for_module(m, 1, 8)
    m.set_loki_basis(None)
    with torch.no_grad():
        y = torch.cat([m(x[:, :3], cache=cache), m(x[:, 3:4], cache=cache), m(x[:, 4:], cache=cache)], 1)
        torch.testing.assert_close(y, m(x))
    with pytest.raises(ValueError, match="loki_max_rank needs loki_basis"):
        KVCache(1, 8, 2, 8, loki_max_rank=2)


def test_set_loki_bases():
    model = TwoLayers()
    bases = calibrate_loki(model, [torch.randn(2, 10, 32, **F64)])
    set_loki_bases(model, bases, rank=2, top_k=4, selection="group")
    assert model.first.loki.basis is not None and model.second.loki.top_k == 4
    with pytest.raises(ValueError, match=r"not GroupedQueryAttention layers of the model: \['third'\]"):
        set_loki_bases(model, {"third": bases["first"]}, rank=2, top_k=4)
    with pytest.raises(ValueError, match="rank must be in"):
        set_loki_bases(model, bases, rank=99, top_k=4)
    assert model.first.loki.rank == 2 and model.second.loki.rank == 2  # unchanged after the rejection
    set_loki_bases(model, {"first": None}, rank=2, top_k=4)
    assert model.first.loki is None
