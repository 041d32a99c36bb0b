"""The window_attention and paged_decode benchmark configs (issue 15) compute what they claim:
the paged call equals the contiguous one, the windowed call equals the definition, and the
chunked comparator is the same tokens cut into chunks."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import attnkit  # noqa: E402
from benchmarks.case import Case  # noqa: E402
from benchmarks.registry import OPS, resolve  # noqa: E402


def _case(op, mode, **shape):
    cfg = OPS[op]
    case = Case(op, mode, torch.device("cpu"), torch.float32, resolve(op, shape))
    cfg.build(case)
    return cfg, case


def test_paged_decode_config_matches_contiguous():
    cfg, case = _case("paged_decode", "decode", B=2, S=64, H=4, Hk=2, D=16, Tq=1, block_size=16)
    t = case.tensors
    assert not torch.equal(t["block_table"].flatten().sort().values, t["block_table"].flatten())  # shuffled
    _, fn, args, kwargs = cfg.call(case)
    paged = fn(*args, backend="reference", **kwargs)
    contiguous = cfg.comparators["attnkit:contiguous"](case).fn()
    torch.testing.assert_close(paged, contiguous, rtol=1e-6, atol=1e-6)


def test_window_attention_config_and_chunks():
    cfg, case = _case("window_attention", "fwd", B=1, T=64, S=64, W=16, H=2, D=8, causal=True)
    t = case.tensors
    _, fn, args, kwargs = cfg.call(case)
    assert kwargs["window"] == (15, 0)
    o = fn(*args, backend="reference", **kwargs)
    torch.testing.assert_close(o, attnkit.attention(t["q"], t["k"], t["v"], causal=True, window=(15, 0)))
    chunks = cfg.comparators["attnkit:chunks"](case).fn()
    for c in range(4):
        sl = slice(16 * c, 16 * c + 16)
        want = attnkit.attention(t["q"][:, sl], t["k"][:, sl], t["v"][:, sl], causal=True)
        torch.testing.assert_close(chunks[c:c + 1], want)
    flops, _, tokens = cfg.model(case)
    assert tokens == 64 and flops == 2.0 * 2 * (sum(range(1, 17)) + 48 * 16) * 16
