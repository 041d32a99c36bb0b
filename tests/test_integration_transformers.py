"""attn_implementation="attnkit" in transformers: same logits as "eager" on tiny random models."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install .[transformers])")

import attnkit.integrations.transformers as akt  # noqa: E402

from .harness import DEVICE  # noqa: E402


def _config(kind):
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    if kind == "qwen3":
        return transformers.Qwen3Config(head_dim=16, **common)
    return transformers.MistralConfig(sliding_window=None, **common)


def _pair(kind):
    akt.register()
    torch.manual_seed(0)
    # one config object per model: from_config records the implementation on the config it is given
    eager = transformers.AutoModelForCausalLM.from_config(_config(kind), attn_implementation="eager")
    ours = transformers.AutoModelForCausalLM.from_config(_config(kind), attn_implementation="attnkit")
    eager, ours = eager.to(DEVICE).eval(), ours.to(DEVICE).eval()
    ours.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == "attnkit"
    assert eager.config._attn_implementation == "eager"
    return eager, ours


@pytest.mark.parametrize("kind", ["llama", "qwen3", "mistral"])
def test_logits_match_eager(kind):
    eager, ours = _pair(kind)
    ids = torch.randint(1, 101, (2, 19), device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, eager(ids).logits)


@pytest.fixture
def packed_calls(monkeypatch):
    """Count calls of the packed varlen path (so padded cases are known to use the kernels, not the fallback)."""
    calls = []
    real = akt._packed

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(akt, "_packed", spy)
    return calls


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_eager(side, packed_calls):
    eager, ours = _pair("qwen3")
    ids = torch.randint(1, 101, (3, 12), device=DEVICE)
    mask = torch.ones_like(ids)
    lens = [12, 7, 3]
    for b, n in enumerate(lens):
        if side == "left":
            mask[b, : 12 - n] = 0
        else:
            mask[b, n:] = 0
    ids = ids * mask
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        e = eager(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(a[valid], e[valid])
    assert len(packed_calls) == 2  # one per layer: the padded batch ran as one varlen call


def test_generate_with_cache_matches_eager(packed_calls):
    eager, ours = _pair("llama")
    ids = torch.randint(1, 101, (2, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        g_e = eager.generate(ids, attention_mask=mask, **kw)
        g_o = ours.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(g_o.sequences, g_e.sequences)
    assert len(packed_calls) >= 2 * 6  # prefill and every decoding step used the kernels
    for so, se in zip(g_o.scores, g_e.scores):
        torch.testing.assert_close(so, se)


def test_unusual_mask_falls_back_exactly():
    # a mask that is not causal+contiguous padding goes through SDPA with the mask
    q = torch.randn(1, 2, 5, 8, device=DEVICE)
    k = torch.randn(1, 2, 5, 8, device=DEVICE)
    v = torch.randn(1, 2, 5, 8, device=DEVICE)
    mask = torch.rand(1, 1, 5, 5, device=DEVICE) > 0.3
    mask[..., 0] = True

    class M(torch.nn.Module):
        is_causal = True

    out, _ = akt.attnkit_attention_forward(M().eval(), q, k, v, mask, scaling=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, ref)
