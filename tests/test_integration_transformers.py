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


# --------------------------------------------- masks of every SDPA shape (issue 9, defect 3)


class _Causal(torch.nn.Module):
    is_causal = True


def _sdpa_ref(q, k, v, mask, scale):
    G = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask, scale=scale).transpose(1, 2)


def _padding(B, S, lens, side="left"):
    keep = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
    for b, n in enumerate(lens):
        if side == "left":
            keep[b, S - n:] = True
        else:
            keep[b, :n] = True
    return keep


@pytest.mark.parametrize("form", ["bool", "float"])
@pytest.mark.parametrize("shape", ["B11S", "B1TS", "11TS", "TS", "BHTS"])
def test_broadcastable_masks_match_sdpa(shape, form, packed_calls):
    B, H, Hk, T, S, D = 3, 4, 2, 5, 9, 8
    q, k, v = (torch.randn(B, h, t, D, device=DEVICE) for h, t in ((H, T), (Hk, S), (Hk, S)))
    keep = _padding(B, S, [9, 6, 4])
    causal = torch.ones(T, S, dtype=torch.bool, device=DEVICE).tril(S - T)
    if shape == "B11S":  # a decoding-style padding mask, no causal part: T = 1
        q = q[:, :, -1:]
        mask = keep[:, None, None, :]
    elif shape == "B1TS":
        mask = (keep[:, None, :] & causal)[:, None]
    elif shape == "BHTS":
        mask = (keep[:, None, :] & causal)[:, None].expand(B, H, T, S)
    elif shape == "11TS":
        mask = causal[None, None]
    else:
        mask = causal
    if form == "float":
        mask = torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, torch.finfo(torch.float32).min)
    out, _ = akt.attnkit_attention_forward(_Causal().eval(), q, k, v, mask, scaling=0.3)
    ref = _sdpa_ref(q, k, v, mask, 0.3)
    # rows that see no key (padded queries) are garbage in SDPA (mean or NaN) and zeros here
    sees = ((mask if mask.dtype == torch.bool else mask == 0).expand(B, H, q.shape[2], S).any(-1)).transpose(1, 2)
    torch.testing.assert_close(out[sees], ref[sees])
    assert len(packed_calls) == 1 or shape in ("11TS", "TS")  # padding patterns ran as varlen


def test_additive_bias_mask_runs_the_exact_fallback():
    q, k, v = (torch.randn(2, 4, 6, 8, device=DEVICE) for _ in range(3))
    bias = torch.randn(2, 1, 6, 6, device=DEVICE)
    out, _ = akt.attnkit_attention_forward(_Causal().eval(), q, k, v, bias, scaling=0.4)
    torch.testing.assert_close(out, _sdpa_ref(q, k, v, bias, 0.4))


def test_bad_mask_shape_is_rejected():
    q, k, v = (torch.randn(2, 4, 6, 8, device=DEVICE) for _ in range(3))
    with pytest.raises(ValueError, match="attention_mask"):
        akt.attnkit_attention_forward(_Causal().eval(), q, k, v, torch.ones(2, 1, 6, 5, dtype=torch.bool))


# ------------------------------------------------- softcap and sliding window (defect 2, #15)


def _eager_softcap(q, k, v, mask, scale, softcap):
    G = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(G, 1).transpose(-1, -2) * scale
    s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ v.repeat_interleave(G, 1)).transpose(1, 2)


@pytest.mark.parametrize("mask_kind", ["none", "padding", "random"])
def test_softcap_is_applied_exactly(mask_kind, packed_calls, monkeypatch):
    B, H, Hk, T, D = 2, 4, 2, 7, 16
    q, k, v = (torch.randn(B, h, T, D, device=DEVICE) * 3 for h in (H, Hk, Hk))
    causal = torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril()
    mask = None
    if mask_kind == "padding":
        mask = (_padding(B, T, [7, 4])[:, None, :] & causal)[:, None]
    elif mask_kind == "random":
        mask = (torch.rand(B, 1, T, T, device=DEVICE) > 0.4) | torch.eye(T, dtype=torch.bool, device=DEVICE)
    out, _ = akt.attnkit_attention_forward(_Causal().eval(), q, k, v, mask, scaling=0.5, softcap=5.0)
    ref = _eager_softcap(q, k, v, causal if mask is None else mask, 0.5, 5.0)
    valid = slice(None) if mask_kind != "padding" else None
    if mask_kind == "padding":
        rows = _padding(B, T, [7, 4])
        torch.testing.assert_close(out[rows], ref[rows])
    else:
        torch.testing.assert_close(out[valid], ref[valid])
    assert len(packed_calls) == (1 if mask_kind == "padding" else 0)


def test_sliding_window_without_mask_uses_the_kernel_window():
    B, H, T, D = 1, 2, 12, 8
    q, k, v = (torch.randn(B, H, T, D, device=DEVICE) for _ in range(3))
    out, _ = akt.attnkit_attention_forward(_Causal().eval(), q, k, v, None, scaling=0.3, sliding_window=4)
    i = torch.arange(T, device=DEVICE)
    band = (i[None] <= i[:, None]) & (i[None] > i[:, None] - 4)  # transformers: kv > q - W
    torch.testing.assert_close(out, _sdpa_ref(q, k, v, band, 0.3))


def _model_config(kind):
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    if kind == "gemma2":
        return transformers.Gemma2Config(head_dim=16, sliding_window=4, attn_logit_softcapping=2.0,
                                         final_logit_softcapping=30.0, query_pre_attn_scalar=16, **common)
    if kind == "gemma3":
        return transformers.Gemma3TextConfig(head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                             layer_types=["sliding_attention", "full_attention"], **common)
    if kind == "qwen2":
        return transformers.Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=0,
                                        layer_types=["sliding_attention", "sliding_attention"], **common)
    return transformers.MistralConfig(sliding_window=4, **common)


def _model_pair(kind):
    akt.register()
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(_model_config(kind), attn_implementation="eager")
    ours = transformers.AutoModelForCausalLM.from_config(_model_config(kind), attn_implementation="attnkit")
    eager, ours = eager.to(DEVICE).eval(), ours.to(DEVICE).eval()
    ours.load_state_dict(eager.state_dict())
    return eager, ours


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if the exact PyTorch fallback runs: these models must run on attnkit's kernels."""
    def refuse(*args, **kwargs):
        raise AssertionError("the SDPA/eager fallback ran")

    monkeypatch.setattr(akt, "_exact", refuse)


@pytest.mark.parametrize("kind", ["gemma2", "mistral", "qwen2", "gemma3"])
def test_window_softcap_models_match_eager_padded(kind, no_fallback, packed_calls):
    eager, ours = _model_pair(kind)
    ids = torch.randint(1, 101, (3, 11), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :9] = 0
    ids = ids * mask
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        e = eager(ids, attention_mask=mask).logits
        torch.testing.assert_close(a[mask.bool()], e[mask.bool()])
        assert len(packed_calls) == 2
        torch.testing.assert_close(ours(ids[:1]).logits, eager(ids[:1]).logits)  # no mask


@pytest.mark.parametrize("kind", ["gemma2", "mistral"])
def test_window_softcap_models_generate_matches_eager(kind, no_fallback):
    eager, ours = _model_pair(kind)
    ids = torch.randint(1, 101, (2, 7), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        g_e = eager.generate(ids, attention_mask=mask, **kw)
        g_o = ours.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(g_o.sequences, g_e.sequences)
    for so, se in zip(g_o.scores, g_e.scores):
        torch.testing.assert_close(so, se)
