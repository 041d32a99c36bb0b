"""The window_attention, paged_decode and paged_loki_decode benchmark configs (issue 15) compute what they claim:
the paged call equals the contiguous one, the windowed call equals the definition, and the
chunked comparator is the same tokens cut into chunks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
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


def test_paged_loki_decode_config_matches_contiguous():
    # the paged Loki case: shuffled blocks, the low-rank buffer paged by the same table; the paged
    # portable op, the paged low-rank op and both contiguous comparators compute one result
    cfg, case = _case("paged_loki_decode", "decode", B=2, S=64, H=4, Hk=2, D=16, Tq=1, block_size=16)
    t = case.tensors
    assert case["rank"] == 4 and case["top_k"] == 8
    assert not torch.equal(t["block_table"].flatten().sort().values, t["block_table"].flatten())  # shuffled
    assert t["k_lowrank_paged"].shape == (2 * 4, 2, 16, 4)  # [num_blocks, Hk, block_size, R]
    _, fn, args, kwargs = cfg.call(case)
    assert kwargs["block_table"] is t["block_table"]
    paged = fn(*args, backend="reference", **kwargs)
    for name in ("attnkit:contiguous", "attnkit:lowrank", "attnkit:lowrank-contiguous"):
        torch.testing.assert_close(cfg.comparators[name](case).fn(), paged, rtol=1e-6, atol=1e-6)
    assert cfg.model(case)[1] > 0


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


# ------------------------------------------- the Triton kernel's key tiles (benchmarks/window_tiles)


def _tiles_brute_force(T, S, G, window, BM, BN):
    """Per query block of BM packed rows: key tiles holding a key some row sees, and tiles whose
    every key (< S) every valid row sees — from the definition, position by position."""
    left, right = window
    out = []
    for i in range(-(-T * G // BM)):
        pos = sorted({r // G for r in range(i * BM, (i + 1) * BM) if r // G < T})
        any_tiles, whole = 0, 0
        for n0 in range(0, S, BN):
            keys = range(n0, min(n0 + BN, S))

            def sees(t, s):
                p = t + S - T
                return (left < 0 or s >= p - left) and (right < 0 or s <= p + right)

            seen = [[sees(t, s) for s in keys] for t in pos]
            any_tiles += any(map(any, seen))
            whole += len(keys) == BN and all(map(all, seen))
        out.append((any_tiles, whole))
    return out


@pytest.mark.parametrize("T, S, G, window, BM, BN", [
    (200, 200, 1, (63, 0), 32, 32), (200, 200, 1, (-1, 0), 32, 32), (200, 200, 4, (40, 0), 32, 16),
    (150, 230, 2, (17, 5), 32, 32), (230, 150, 1, (9, 0), 16, 32), (100, 100, 1, (0, 0), 32, 32),
    (120, 120, 3, (-1, 30), 32, 32), (97, 97, 1, (-1, -1), 32, 32)])
def test_window_tile_probe_visits_exactly_the_tiles_with_visible_keys(T, S, G, window, BM, BN):
    from benchmarks import window_tiles
    got = window_tiles.tiles_per_block([dict(T=T, S=S, G=G, window=window, BM=BM, BN=BN)])[0]
    want = _tiles_brute_force(T, S, G, window, BM, BN)
    assert [m + w for m, w in got] == [a for a, _ in want]  # no tile with a visible key left out, no other
    assert all(w <= whole for (_, w), (_, whole) in zip(got, want))  # unmasked tiles are whole tiles


def test_window_tile_summary_at_the_issue_shape():
    from benchmarks import window_tiles
    s = window_tiles.summary(32 * 1024, 32 * 1024, 1, 4096)
    # a 128-row block reads its 4096 + 127 keys: 33 tiles once past the first window; causal 1..256
    assert s["tiles_max"] == 33 and s["full_tiles_mean"] == 128.5 and s["query_tiles"] == 256
    assert 0.2 < s["tile_ratio"] < 0.25


def test_window_attention_cli_reports_cost_ratio_and_tiles(tmp_path):
    import csv

    from benchmarks import run
    rc = run.main(["--op", "window_attention", "--T", "256", "--W", "64", "--H", "2", "--D", "16",
                   "--out", str(tmp_path), "--no-plot", "--no-memory", "--warmup", "0", "--min-reps", "1",
                   "--max-reps", "1", "--budget-s", "0"])
    assert rc == 0
    with open(tmp_path / "window_attention_fwd_cpu_float32.csv") as f:
        rows = {r["backend"]: r for r in csv.DictReader(line for line in f if not line.startswith("#"))}
    assert float(rows["attnkit:full"]["cost_ratio"]) == 1.0
    assert rows["attnkit:reference"]["cost_ratio_vs"] == "attnkit:full"
    from benchmarks import window_tiles
    s = window_tiles.summary(256, 256, 1, 64)
    for r in rows.values():
        assert float(r["kernel_tiles"]) == pytest.approx(s["tiles_mean"])
        assert float(r["kernel_tile_ratio"]) == pytest.approx(s["tile_ratio"])
