"""Softmax-attention modules: torch.nn.MultiheadAttention drop-in, GQA/MQA layers (Llama/Qwen3 parity),
KV-cache decoding, conversion MHA -> GQA."""

import pytest
import torch

from attnkit.nn import (
    GroupedQueryAttention,
    KVCache,
    MultiheadAttention,
    MultiQueryAttention,
    convert_mha_to_gqa,
    replace_multihead_attention,
)

from .harness import DEVICE

F64 = dict(dtype=torch.float64, device=DEVICE)


def _pair(**kw):
    ref = torch.nn.MultiheadAttention(**kw, **F64)
    ours = MultiheadAttention(**kw, **F64)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    return ref, ours


MHA_CASES = [
    dict(kw=dict(embed_dim=32, num_heads=4, batch_first=True), call=dict(need_weights=False)),
    dict(kw=dict(embed_dim=32, num_heads=4, batch_first=False), call=dict(need_weights=False)),
    dict(kw=dict(embed_dim=32, num_heads=2, bias=False, batch_first=True), call=dict(need_weights=False)),
    dict(kw=dict(embed_dim=32, num_heads=4, kdim=24, vdim=20, batch_first=True), call=dict(need_weights=False)),
    dict(kw=dict(embed_dim=32, num_heads=4, batch_first=True), call=dict(need_weights=False, causal=True)),
    dict(kw=dict(embed_dim=32, num_heads=4, batch_first=True), call=dict(need_weights=True)),
    dict(kw=dict(embed_dim=32, num_heads=4, batch_first=True), call=dict(need_weights=True,
                                                                         average_attn_weights=False)),
    dict(kw=dict(embed_dim=32, num_heads=4, batch_first=True), call=dict(need_weights=False, kpm=True)),
    dict(kw=dict(embed_dim=32, num_heads=4, batch_first=True), call=dict(need_weights=False, float_mask=True)),
    dict(kw=dict(embed_dim=32, num_heads=4, add_bias_kv=True, add_zero_attn=True, batch_first=True),
         call=dict(need_weights=False)),
]


MHA_PARAMS = [pytest.param(c, s, id=f"case{i}-{'self' if s else 'cross'}") for i, c in enumerate(MHA_CASES)
              for s in (True, False) if not (s and ("kdim" in c["kw"] or "vdim" in c["kw"]))]


@pytest.mark.parametrize("case,self_attn", MHA_PARAMS)
def test_multihead_attention_matches_torch(case, self_attn):
    ref, ours = _pair(**case["kw"])
    kw, call = case["kw"], dict(case["call"])
    B, T, S, E = 2, 7, 7 if self_attn or call.get("causal") else 5, kw["embed_dim"]
    kd, vd = kw.get("kdim", E), kw.get("vdim", E)
    q = torch.randn(B, T, E, **F64)
    k = q if self_attn else torch.randn(B, S, kd, **F64)
    v = q if self_attn else torch.randn(B, S, vd, **F64)
    if not kw.get("batch_first"):
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    extra = dict(need_weights=call["need_weights"])
    if "average_attn_weights" in call:
        extra["average_attn_weights"] = call["average_attn_weights"]
    if call.get("causal"):
        extra.update(attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(T, **F64), is_causal=True)
    if call.get("kpm"):
        kpm = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
        kpm[0, -2:] = True
        extra["key_padding_mask"] = kpm
    if call.get("float_mask"):
        extra["attn_mask"] = torch.randn(T, S, **F64)
    out_ref, w_ref = ref(q, k, v, **extra)
    out, w = ours(q, k, v, **extra)
    torch.testing.assert_close(out, out_ref)
    if w_ref is None:
        assert w is None
    else:
        torch.testing.assert_close(w, w_ref)


def test_multihead_attention_unbatched_and_training_dropout():
    ref, ours = _pair(embed_dim=16, num_heads=2, dropout=0.5)
    ref.eval()
    ours.eval()
    x = torch.randn(5, 16, **F64)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0])
    ref.train()
    ours.train()
    torch.manual_seed(3)
    a = ref(x, x, x, need_weights=False)[0]
    torch.manual_seed(3)
    b = ours(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(a, b)  # dropout in training: PyTorch's own path, same RNG stream


def test_multihead_attention_fused_path_is_taken_and_differentiable():
    _, ours = _pair(embed_dim=16, num_heads=2, batch_first=True)
    x = torch.randn(2, 6, 16, **F64, requires_grad=True)
    assert ours.fused_refusal(x, x, x, need_weights=False) is None
    assert "need_weights" in ours.fused_refusal(x, x, x, need_weights=True)
    out, _ = ours(x, x, x, need_weights=False)
    out.sum().backward()
    assert x.grad is not None and ours.in_proj_weight.grad is not None


def test_replace_multihead_attention():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True))
    model = model.to(**F64).eval()
    x = torch.randn(2, 5, 8, **F64)
    with torch.no_grad():
        before = model(x)
    replace_multihead_attention(model)
    assert isinstance(model[1].self_attn, MultiheadAttention)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before)


def test_fused_refusal_takes_forward_arguments():
    # issue 9 defect 8: like forward -- keywords, forward's defaults and positional order
    _, ours = _pair(embed_dim=16, num_heads=2, batch_first=True)
    x = torch.randn(2, 6, 16, **F64)
    assert "need_weights" in ours.fused_refusal(x, x, x)  # forward's default need_weights=True
    assert ours.fused_refusal(query=x, key=x, value=x, need_weights=False) is None
    assert "key_padding_mask" in ours.fused_refusal(x, x, x, torch.zeros(2, 6, dtype=torch.bool), False)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6, **F64)
    assert ours.fused_refusal(x, x, x, None, False, causal, True, True) is None  # forward's positional order
    assert "attn_mask" in ours.fused_refusal(x, x, x, need_weights=False, attn_mask=causal, is_causal=False)


def _count_attnkit_calls(monkeypatch) -> list:
    import attnkit.nn.softmax as mod

    calls, real = [], mod.attention

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(mod, "attention", counted)
    return calls


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("padding", [False, True])
def test_replace_multihead_attention_under_encoder_fast_path(monkeypatch, context, padding):
    # issue 9 defect 5: in eval() + no_grad/inference_mode torch's TransformerEncoder(Layer) fast path
    # never called self_attn, so the replacement did nothing; now attnkit runs and results agree
    import copy

    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    original = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).to(**F64).eval()
    model = replace_multihead_attention(copy.deepcopy(original))
    assert all(isinstance(m.self_attn, MultiheadAttention) for m in model.layers)
    x = torch.randn(3, 7, 16, **F64)
    mask = None
    if padding:  # the encoder's nested-tensor path; a key padding mask is PyTorch's own path in the layer
        mask = torch.zeros(3, 7, dtype=torch.bool, device=DEVICE)
        mask[1, 5:] = True
    calls = _count_attnkit_calls(monkeypatch)
    with getattr(torch, context)():
        before = original(x, src_key_padding_mask=mask)
        assert calls == []
        after = model(x, src_key_padding_mask=mask)
    if padding:  # padded positions: whatever each path leaves there; the others agree
        keep = ~mask[..., None]
        torch.testing.assert_close(after * keep, before * keep)
    else:
        assert len(calls) == 2, "attnkit's attention ran once per layer"
        torch.testing.assert_close(after, before)


# ------------------------------------------------------------------------------------ GQA module

def test_gqa_state_dict_names():
    m = GroupedQueryAttention(64, 8, 2, qk_norm="rms", rope_theta=1e4)
    assert set(m.state_dict()) == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                   "q_norm.weight", "k_norm.weight"}
    assert m.k_proj.weight.shape == (2 * 8, 64) and m.q_norm.weight.shape == (8,)
    mq = MultiQueryAttention(64, 8)
    assert mq.num_kv_heads == 1 and mq.k_proj.weight.shape == (8, 64)


@pytest.mark.parametrize("kv,qk_norm,rope", [(2, "rms", 1e4), (4, None, 1e4), (1, "rms", None), (2, "l2", None),
                                              (2, "l2", 500.0)])
def test_gqa_prefill_then_decode_equals_full(kv, qk_norm, rope):
    m = GroupedQueryAttention(64, 4, kv, qk_norm=qk_norm, rope_theta=rope, **F64)
    if qk_norm == "rms":
        torch.nn.init.normal_(m.q_norm.weight)
        torch.nn.init.normal_(m.k_norm.weight)
    x = torch.randn(3, 11, 64, **F64)
    with torch.no_grad():
        full = m(x)
        cache = KVCache.for_module(m, 3, 16)
        ys = [m(x[:, :6], cache=cache)]
        ys += [m(x[:, t:t + 1], cache=cache) for t in range(6, 9)]
        ys.append(m(x[:, 9:], cache=cache))  # two tokens at once
    torch.testing.assert_close(torch.cat(ys, 1), full)
    assert cache.seqlens.tolist() == [11, 11, 11]


def test_gqa_cache_overflow_is_rejected():
    m = GroupedQueryAttention(32, 2, **F64)
    cache = KVCache.for_module(m, 1, 4)
    with torch.no_grad():
        m(torch.randn(1, 3, 32, **F64), cache=cache)
        with pytest.raises(ValueError):
            m(torch.randn(1, 2, 32, **F64), cache=cache)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("num_kv", [4, 2, 1])
def test_convert_mha_to_gqa(bias, num_kv):
    mha = torch.nn.MultiheadAttention(32, 4, bias=bias, batch_first=True, **F64)
    gqa = convert_mha_to_gqa(mha, num_kv)
    assert gqa.num_kv_heads == num_kv and not gqa.causal and gqa.rope_theta is None
    x = torch.randn(2, 6, 32, **F64)
    ref = mha(x, x, x, need_weights=False)[0]
    if num_kv == 4:
        torch.testing.assert_close(gqa(x), ref)
    else:  # pooled K/V: compare with the explicit recipe
        w_k = mha.in_proj_weight.chunk(3)[1].reshape(num_kv, 4 // num_kv, 8, 32).mean(1).reshape(-1, 32)
        torch.testing.assert_close(gqa.k_proj.weight, w_k)
    gqa2 = convert_mha_to_gqa(convert_mha_to_gqa(mha, 4), num_kv)
    torch.testing.assert_close(gqa2.v_proj.weight, gqa.v_proj.weight)
    with pytest.raises(ValueError, match="num_kv_heads"):
        convert_mha_to_gqa(mha, 3)


transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install .[transformers])")


def _hf_attention(model_type, H, Hk, D, hidden, bias):
    if model_type == "qwen3":
        from transformers.models.qwen3.configuration_qwen3 import Qwen3Config as C
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention as A
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding as R
    else:
        from transformers.models.llama.configuration_llama import LlamaConfig as C
        from transformers.models.llama.modeling_llama import LlamaAttention as A
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as R
    cfg = C(hidden_size=hidden, num_attention_heads=H, num_key_value_heads=Hk, head_dim=D, attention_bias=bias,
            intermediate_size=64, num_hidden_layers=1, rms_norm_eps=1e-6)
    cfg._attn_implementation = "sdpa"
    theta = cfg.rope_parameters["rope_theta"]
    return A(cfg, 0).to(DEVICE), R(cfg).to(DEVICE), theta


@pytest.mark.parametrize("model_type,H,Hk,D,bias", [("qwen3", 4, 2, 16, False), ("llama", 4, 1, 16, True),
                                                     ("qwen3", 2, 2, 32, True)])
def test_gqa_matches_transformers_layer(model_type, H, Hk, D, bias):
    hidden = 48
    hf, rope, theta = _hf_attention(model_type, H, Hk, D, hidden, bias)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = GroupedQueryAttention(hidden, H, Hk, D, bias=bias, qk_norm="rms" if model_type == "qwen3" else None,
                                 rope_theta=theta, device=DEVICE)
    ours.load_state_dict(hf.state_dict(), strict=True)
    # float32: transformers computes its RMS norms (and eager softmax) in float32 whatever the dtype,
    # so a float64 comparison would only measure its rounding.
    B, T = 2, 13
    x = torch.randn(B, T, hidden, device=DEVICE)
    pos = torch.arange(T, device=DEVICE)[None].expand(B, T)
    with torch.no_grad():
        y_hf, _ = hf(x, position_embeddings=rope(x, pos), attention_mask=None)
        torch.testing.assert_close(ours(x), y_hf)
