"""GroupedQueryAttention: sliding window, softcap and padded (ragged) batches (issue 15)."""

from __future__ import annotations

import pytest
import torch

from attnkit.nn import GroupedQueryAttention, KVCache

from .harness import DEVICE
from .test_softmax_features import oracle_attention

F64 = torch.float64


def _layer(**kw):
    torch.manual_seed(1)
    kw.setdefault("rope_theta", 10000.0)
    return GroupedQueryAttention(32, 4, 2, 8, device=DEVICE, dtype=F64, **kw).eval()


@pytest.mark.parametrize("qk_norm", [None, "rms"])
@pytest.mark.parametrize("window,softcap", [((3, 0), None), (None, 1.5), ((4, 0), 2.0)])
def test_gqa_window_softcap_matches_oracle(window, softcap, qk_norm):
    layer = _layer(window=window, softcap=softcap, qk_norm=qk_norm)
    x = torch.randn(2, 11, 32, dtype=F64, device=DEVICE)
    with torch.no_grad():
        q, k, v, fused = layer.project_qkv(x)
        if fused:
            q, k = layer._norm_unfused(q, k, fused)
        o, _ = oracle_attention(q, k, v, causal=True, window=window or (-1, -1), softcap=softcap,
                                scale=layer.scaling)
        want = layer.o_proj(o.reshape(2, 11, 32))
        torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window,softcap", [((3, 0), None), ((5, 0), 2.0)])
def test_gqa_window_softcap_prefill_then_decode_equals_full(window, softcap):
    layer = _layer(window=window, softcap=softcap, qk_norm="rms")
    x = torch.randn(2, 12, 32, dtype=F64, device=DEVICE)
    with torch.no_grad():
        full = layer(x)
        cache = KVCache.for_module(layer, batch_size=2, max_seqlen=16)
        steps = [layer(x[:, :5], cache)] + [layer(x[:, t:t + 1], cache) for t in range(5, 9)] + [layer(x[:, 9:], cache)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("qk_norm", [None, "rms"])
def test_gqa_padded_batch_equals_rows_alone(side, qk_norm):
    layer = _layer(window=(3, 0), softcap=3.0, qk_norm=qk_norm)
    T, lens = 9, [9, 5, 2]
    x = torch.randn(3, T, 32, dtype=F64, device=DEVICE)
    mask = torch.zeros(3, T, dtype=torch.long, device=DEVICE)
    for b, n in enumerate(lens):
        if side == "left":
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    with torch.no_grad():
        y = layer(x, attention_mask=mask)
        for b, n in enumerate(lens):
            sel = mask[b].bool()
            alone = layer(x[b:b + 1, sel])
            torch.testing.assert_close(y[b, sel], alone[0], rtol=1e-10, atol=1e-10)
            assert bool((y[b, ~sel] == 0).all())


def test_gqa_padded_prefill_into_cache_then_decode():
    layer = _layer(window=(4, 0), softcap=2.0)
    T, lens = 7, [7, 3]
    x = torch.randn(2, T, 32, dtype=F64, device=DEVICE)
    nxt = torch.randn(2, 3, 32, dtype=F64, device=DEVICE)
    mask = torch.zeros(2, T, dtype=torch.bool, device=DEVICE)
    mask[0], mask[1, T - 3:] = True, True  # left padding
    with torch.no_grad():
        cache = KVCache.for_module(layer, batch_size=2, max_seqlen=12)
        layer(x, cache, attention_mask=mask)
        assert cache.seqlens.tolist() == lens
        steps = torch.cat([layer(nxt[:, t:t + 1], cache) for t in range(3)], 1)
        for b in range(2):
            alone = layer(torch.cat([x[b:b + 1, mask[b]], nxt[b:b + 1]], 1))
            torch.testing.assert_close(steps[b], alone[0, -3:], rtol=1e-10, atol=1e-10)


def test_gqa_bad_arguments_rejected():
    with pytest.raises(TypeError, match="window"):
        _layer(window=4)
    with pytest.raises(ValueError, match="softcap"):
        _layer(softcap=-1.0)
    layer = _layer()
    x = torch.randn(2, 5, 32, dtype=F64, device=DEVICE)
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x, attention_mask=torch.ones(2, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x, attention_mask=torch.full((2, 5), 2, device=DEVICE))
