"""The reference backend skips key blocks outside the window (issue 15): each block of query rows
reads only the keys some of its rows see, so a windowed call does O(T·W) work, not O(T·S), and
the results are those of the dense definition (float64 oracle of tests/test_softmax_features.py,
forward and every gradient) on problems long enough to be cut into many blocks.
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.ops.softmax import reference

from .harness import DEVICE
from .test_softmax_features import close64, oracle_attention, oracle_decode, rand
from .test_softmax_features import test_attention_float64_matches_oracle_with_gradients as check_against_oracle


# T large enough for several query blocks (MIN_BOUNDED_ROWS = 32 rows or more per block)
LONG_CASES = [
    dict(T=161, S=161, H=4, Hk=2, causal=True, window=(15, 0), softcap=None),
    dict(T=161, S=161, H=4, Hk=1, causal=True, window=(40, 0), softcap=2.0),
    dict(T=150, S=203, H=2, Hk=2, causal=True, window=(7, 3), softcap=None),  # right side cut by causal
    dict(T=203, S=150, H=2, Hk=2, causal=True, window=(9, 0), softcap=None),  # first rows see nothing
    dict(T=130, S=190, H=6, Hk=3, causal=False, window=(5, 12), softcap=1.5),
    dict(T=190, S=130, H=4, Hk=4, causal=False, window=(0, 0), softcap=None),
    dict(T=140, S=140, H=4, Hk=2, causal=False, window=(-1, 3), softcap=None),  # right bound only
    dict(T=140, S=140, H=4, Hk=2, causal=False, window=(20, -1), softcap=3.0),  # left bound only
    dict(T=300, S=300, H=2, Hk=1, causal=True, window=(-1, -1), softcap=None),  # causal, no window
    dict(T=97, S=97, H=2, Hk=2, causal=False, window=(200, 200), softcap=None),  # window wider than S
]


@pytest.mark.parametrize("qk_norm", [None, "rms"])
@pytest.mark.parametrize("c", [pytest.param(c, id="-".join(f"{k}{v}" for k, v in c.items())) for c in LONG_CASES])
def test_skipping_reference_matches_dense_oracle_with_gradients(c, qk_norm):
    check_against_oracle(c, qk_norm)  # B=2, D=8, Dv=6, forward, lse and every gradient


def test_skipping_with_batch_row_blocks(monkeypatch):
    # a budget of one query row of one batch row per block: the batch-row blocking path
    monkeypatch.setattr(reference, "MAX_SCORE_ELEMENTS", 4 * 90)
    check_against_oracle(dict(T=70, S=90, H=4, Hk=2, causal=True, window=(6, 0), softcap=1.0), "rms")


def test_skipping_with_varlen():
    cu = torch.tensor([0, 77, 77, 240, 301], dtype=torch.int32, device=DEVICE)
    cuk = torch.tensor([0, 90, 95, 258, 258], dtype=torch.int32, device=DEVICE)
    q = rand(1, 301, 4, 8, requires_grad=True)
    k = rand(1, 258, 2, 8, requires_grad=True)
    v = rand(1, 258, 2, 8, requires_grad=True)
    for kw in (dict(causal=True, window=(11, 0), softcap=1.0), dict(causal=False, window=(4, 9), softcap=None)):
        o = attnkit.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cuk, backend="reference", **kw)
        cot = torch.randn_like(o)
        outs = []
        for i in range(4):
            qs, ks = slice(int(cu[i]), int(cu[i + 1])), slice(int(cuk[i]), int(cuk[i + 1]))
            outs.append(oracle_attention(q[:, qs], k[:, ks], v[:, ks], **kw)[0])
        o_ref = torch.cat(outs, 1)
        close64(o, o_ref)
        g = torch.autograd.grad((o * cot).sum(), (q, k, v))
        g_ref = torch.autograd.grad((o_ref * cot).sum(), (q, k, v))
        for a, b in zip(g, g_ref):
            close64(a, b)


def test_skipping_decode_with_window():
    B, Smax, Tq, H, Hk, D = 3, 400, 3, 4, 2, 8
    lens = torch.tensor([397, 5, 250], dtype=torch.int32, device=DEVICE)
    q = rand(B, Tq, H, D)
    k_cache, v_cache = rand(B, Smax, Hk, D), rand(B, Smax, Hk, D)
    k_new, v_new = rand(B, Tq, Hk, D), rand(B, Tq, Hk, D)
    for window, softcap in (((20, 0), None), ((-1, -1), 2.0), ((0, 0), None)):
        kc, vc = k_cache.clone(), v_cache.clone()
        o = attnkit.attention_decode(q, kc, vc, lens, k_new=k_new, v_new=v_new, window=window, softcap=softcap,
                                     backend="reference")
        after = (lens + Tq).tolist()
        want = oracle_decode(q, [kc[b] for b in range(B)], [vc[b] for b in range(B)], after,
                             window=window, softcap=softcap)
        close64(o, want)


# ------------------------------------------------------------------------------- the work done


def _score_elements(monkeypatch) -> list[int]:
    """Spy on the block function: score elements (query rows x keys) of each block, per head."""
    seen: list[int] = []
    block = reference._softmax_block

    def spy(q, k, v, *rest):
        seen.append(q.shape[3] * k.shape[2])
        return block(q, k, v, *rest)

    monkeypatch.setattr(reference, "_softmax_block", spy)
    return seen


def _work(monkeypatch, T, window, causal=True):
    seen = _score_elements(monkeypatch)
    q, k, v = rand(1, T, 1, 4), rand(1, T, 1, 4), rand(1, T, 1, 4)
    attnkit.attention(q, k, v, causal=causal, window=window, backend="reference")
    return sum(seen)


def test_windowed_work_scales_with_the_window_not_with_T(monkeypatch):
    W = 64  # keys per query: window (W - 1, 0)
    works = {T: _work(monkeypatch, T, (W - 1, 0)) for T in (1024, 2048, 4096)}
    for T, w in works.items():
        rows = max(reference.MIN_BOUNDED_ROWS, min(reference.MAX_BOUNDED_ROWS, W))
        assert T * W / 2 <= w <= T * (rows + W)  # each block reads its rows' keys and no more
        assert w < T * T / 8  # far from the T²/2 of masking
    assert works[4096] / works[2048] == pytest.approx(2.0, rel=0.02)  # linear in T
    assert works[2048] / works[1024] == pytest.approx(2.0, rel=0.03)


def test_causal_work_skips_the_blocks_above_the_diagonal(monkeypatch):
    T = 2048
    w = _work(monkeypatch, T, (-1, -1))
    assert T * T / 2 <= w <= T * T / 2 + T * reference.MAX_BOUNDED_ROWS
    full = _work(monkeypatch, T, (-1, -1), causal=False)
    assert full == T * T  # nothing to skip without a bound
