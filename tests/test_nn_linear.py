"""LightningAttention / LinearAttention modules: decode continuation and transformers parity."""

import pytest
import torch

from attnkit.nn import LightningAttention, LinearAttention

from .harness import DEVICE


def _prefill_then_decode(layer, x, split):
    with torch.no_grad():
        y_full = layer(x)
        y0, state = layer(x[:, :split], return_state=True)
        ys = [y0]
        for t in range(split, x.shape[1]):
            y, state = layer(x[:, t:t + 1], state=state, return_state=True)
            ys.append(y)
    return y_full, torch.cat(ys, 1)


@pytest.mark.parametrize("T,split", [(19, 11), (9, 1)])
def test_lightning_prefill_then_decode_equals_full(T, split):
    layer = LightningAttention(64, 4, layer_idx=1, num_layers=4, device=DEVICE, dtype=torch.float64)
    x = torch.randn(2, T, 64, dtype=torch.float64, device=DEVICE)
    y_full, y_inc = _prefill_then_decode(layer, x, split)
    torch.testing.assert_close(y_inc, y_full)


@pytest.mark.parametrize("kv,fm,norm", [(2, "elu", True), (4, "relu", False), (1, None, False)])
def test_linear_prefill_then_decode_equals_full(kv, fm, norm):
    layer = LinearAttention(64, 4, num_kv_heads=kv, feature_map=fm, normalize=norm, device=DEVICE,
                            dtype=torch.float64)
    x = torch.randn(2, 15, 64, dtype=torch.float64, device=DEVICE)
    y_full, y_inc = _prefill_then_decode(layer, x, 6)
    torch.testing.assert_close(y_inc, y_full)


def test_linear_noncausal_module_and_grad():
    layer = LinearAttention(32, 4, num_kv_heads=2, causal=False, bias=True, dtype=torch.float64)
    x = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    assert x.grad is not None and layer.k_proj.weight.grad is not None
    # non-causal: permuting the tokens permutes the outputs
    perm = torch.randperm(7)
    torch.testing.assert_close(layer(x[:, perm]), y[:, perm])


def test_lightning_state_dict_names_and_param_only_load():
    layer = LightningAttention(32, 4, layer_idx=0, num_layers=2, block_size=16)
    keys = set(layer.state_dict())
    assert keys == {"qkv_proj.weight", "out_proj.weight", "output_gate.weight", "norm.weight", "slope_rate",
                    "query_decay", "key_decay", "diagonal_decay"}
    params_only = {k: v for k, v in layer.state_dict().items() if "." in k}
    other = LightningAttention(32, 4, layer_idx=0, num_layers=2, block_size=16)
    other.load_state_dict(params_only, strict=True)
    torch.testing.assert_close(other.qkv_proj.weight, layer.qkv_proj.weight)


transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install .[transformers])")


def _hf_layer(H, D, hidden, layer_idx, num_layers, block_size):
    from transformers.models.minimax.configuration_minimax import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    cfg = MiniMaxConfig(hidden_size=hidden, num_attention_heads=H, head_dim=D, num_hidden_layers=num_layers,
                        block_size=block_size, num_key_value_heads=H, intermediate_size=64,
                        layer_types=["linear_attention"] * num_layers)
    return MiniMaxLightningAttention(cfg, layer_idx)


@pytest.mark.parametrize("layer_idx,T", [(0, 37), (2, 70)])
def test_lightning_matches_transformers_minimax(layer_idx, T):
    torch.manual_seed(1)
    H, D, hidden, L, bs = 4, 16, 64, 4, 32
    hf = _hf_layer(H, D, hidden, layer_idx, L, bs).double()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours = LightningAttention(hidden, H, layer_idx=layer_idx, num_layers=L, head_dim=D, block_size=bs).double()
    ours.load_state_dict(hf.state_dict(), strict=True)
    hf.load_state_dict(ours.state_dict(), strict=True)
    # transformers builds its decay buffers in float32; rebuild them in float64 from the same slopes so
    # the float64 comparison below is not limited by their float32 rounding.
    hf.query_decay, hf.key_decay, hf.diagonal_decay = hf.decay_factors(hf.slope_rate.double())
    x = torch.randn(2, T, hidden, dtype=torch.float64)
    y_hf, S_hf = hf(x, position_embeddings=None, attention_mask=None)
    y, S = ours(x, return_state=True)
    torch.testing.assert_close(y, y_hf)
    torch.testing.assert_close(S, S_hf)
    torch.testing.assert_close(ours.decay, hf.slope_rate[:, 0, 0].float())
