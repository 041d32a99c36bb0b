"""Triton Loki kernels against the reference: decode (both selections, both cache layouts, split-K),
the fused append, the exactness cases (top_k >= length is dense, rank = D is exact top-k)."""

import pytest
import torch

import attnkit
import attnkit.ops.loki.triton_register  # noqa: F401  (the triton backend of the Loki ops)
from attnkit.ops.loki import triton_loki
from attnkit.ops.loki.cache import LokiCache, loki_attention_decode_lowrank, loki_cache_append

from .harness import DEVICE, assert_close_to_golden, kernel_dtypes


def _basis(Hk: int, D: int):
    # Keys with a decaying spectrum, so that the leading rotated dims carry most of the variance.
    spectrum = torch.logspace(0, -2, D, dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))[0]
    keys = torch.randn(512, Hk, D, dtype=torch.float64) * spectrum @ mix
    return attnkit.loki_calibrate(keys).to(DEVICE)


def _decode_data(c: dict):
    """float64 data of a case: q, rotated keys, values (NaN past each row's length), lengths, basis."""
    B, S, H, Hk, D, Dv = (c[k] for k in ("B", "S", "H", "Hk", "D", "Dv"))
    basis = _basis(Hk, D)
    q = torch.randn(B, 1, H, 2 * D, dtype=torch.float64, device=DEVICE)  # strided view below
    k_rot = attnkit.loki_rotate(torch.randn(B, S, Hk, D, dtype=torch.float64, device=DEVICE), basis)
    v = torch.randn(B, S, Hk, Dv, dtype=torch.float64, device=DEVICE)
    lens = torch.tensor(c["lens"], dtype=torch.int32, device=DEVICE)
    tail = torch.arange(S, device=DEVICE)[None, :] >= lens[:, None].long()  # [B, S]
    k_rot[tail] = float("nan")  # the unused part of a cache may hold anything
    v[tail] = float("nan")
    return q, k_rot, v, lens, basis


def _args(data, c: dict, dtype):
    q, k_rot, v, lens, basis = data
    # q is a strided view (every other element of a wider last dim)
    args = (q.to(dtype)[..., ::2], k_rot.to(dtype), v.to(dtype), lens, basis)
    return args, dict(rank=c["rank"], top_k=c["top_k"], selection=c["sel"])


def _compare(fn, data, c: dict, dtype, backend="triton"):
    """flash-attn style: the kernel's error vs the float64 reference is at most 2x the error of
    the same-dtype reference run (plus a dtype floor)."""
    golden = attnkit.loki_attention_decode(*_args(data, c, torch.float64)[0], backend="reference",
                                           **_args(data, c, torch.float64)[1])
    args, kw = _args(data, c, dtype)
    ref = attnkit.loki_attention_decode(*args, backend="reference", **kw)
    out = fn(*args, backend=backend, **kw) if backend is not None else fn(*args, **kw)
    assert not torch.isnan(golden).any()
    assert_close_to_golden("o", out, ref, golden)
    return out


DECODE_CASES = [
    dict(B=3, S=70, H=4, Hk=2, D=32, Dv=16, rank=4, top_k=8, sel="head", lens=[63, 0, 5]),
    dict(B=3, S=70, H=4, Hk=2, D=32, Dv=16, rank=4, top_k=8, sel="group", lens=[63, 0, 5]),
    dict(B=2, S=100, H=4, Hk=4, D=64, Dv=64, rank=16, top_k=33, sel="head", lens=[100, 37]),
    dict(B=2, S=257, H=8, Hk=1, D=32, Dv=32, rank=8, top_k=40, sel="group", lens=[257, 129]),
    dict(B=2, S=257, H=8, Hk=1, D=32, Dv=32, rank=8, top_k=40, sel="head", lens=[1, 200]),
    dict(B=2, S=63, H=6, Hk=2, D=80, Dv=48, rank=7, top_k=20, sel="head", lens=[1, 63]),
    dict(B=2, S=45, H=16, Hk=1, D=32, Dv=32, rank=5, top_k=12, sel="group", lens=[45, 20]),
    dict(B=2, S=70, H=4, Hk=2, D=32, Dv=32, rank=6, top_k=10, sel="group", lens=[5, 70]),
]


def _id(c: dict) -> str:
    return (f"B{c['B']}-S{c['S']}-H{c['H']}-Hk{c['Hk']}-D{c['D']}-Dv{c['Dv']}-r{c['rank']}-k{c['top_k']}-"
            f"{c['sel']}-L{'_'.join(map(str, c['lens']))}")


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("case", [pytest.param(c, id=_id(c)) for c in DECODE_CASES])
def test_decode_matches_reference(case, dtype):
    _compare(attnkit.loki_attention_decode, _decode_data(case), case, dtype)


@pytest.mark.parametrize("sel", ["head", "group"])
def test_decode_split_k_matches_reference(sel):
    # A large selected set split over several programs, merged by log-sum-exp; one row of length 0
    # (every split empty) and one shorter than the first split.
    c = dict(B=3, S=300, H=4, Hk=2, D=32, Dv=16, rank=8, top_k=150, sel=sel, lens=[300, 0, 20])
    data = _decode_data(c)
    fn = lambda q, k, v, lens, basis, **kw: triton_loki.loki_decode_fwd(
        q, k, v, lens, basis.components, scale=32 ** -0.5, num_splits=5, **kw)
    _compare(fn, data, c, torch.float32, backend=None)


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=lambda h: f"H{h[0]}-Hk{h[1]}")
def test_top_k_at_least_length_is_dense_attention(heads, dtype):
    # top_k >= Smax takes the dense path (no scoring, no selection): softmax attention over every
    # valid position of the row, compared with plain dense decoding on the unrotated keys.
    H, Hk = heads
    c = dict(B=4, S=37, H=H, Hk=Hk, D=32, Dv=24, rank=3, top_k=37, sel="head", lens=[37, 0, 1, 19])
    q, k_rot, v, lens, basis = _decode_data(c)
    k = torch.einsum("bshd,hed->bshe", k_rot.nan_to_num(0.0), basis.components.double())  # unrotated keys
    golden = attnkit.attention_decode(q[..., ::2], k, v.nan_to_num(0.0), lens, backend="reference")
    args, kw = _args((q, k_rot, v, lens, basis), c, dtype)
    ref = attnkit.loki_attention_decode(*args, backend="reference", **kw)
    out = attnkit.loki_attention_decode(*args, backend="triton", **kw)
    assert_close_to_golden("o", out, ref, golden)


@pytest.mark.parametrize("sel", ["head", "group"])
def test_full_rank_is_exact_top_k(sel):
    # rank = D scores with q̃·k̃ = q·k: the selection is the exact top-k of the true scores.
    c = dict(B=2, S=50, H=4, Hk=2, D=32, Dv=32, rank=32, top_k=10, sel=sel, lens=[50, 12])
    q, k_rot, v, lens, basis = _decode_data(c)
    qq = q[:, 0, :, ::2]  # [B, H, D]
    golden = torch.zeros(2, 1, 4, 32, dtype=torch.float64)
    for b, L in enumerate(c["lens"]):
        for hk in range(2):
            heads = range(2 * hk, 2 * hk + 2)
            k_b = k_rot[b, :L, hk] @ basis.components[hk].double().T  # unrotated keys
            exact = torch.stack([k_b @ qq[b, h] for h in heads])  # [G, L] true scores
            chosen = [exact.amax(0).topk(10).indices] * 2 if sel == "group" else [s.topk(10).indices for s in exact]
            for h, idx in zip(heads, chosen):
                p = torch.softmax(32 ** -0.5 * exact[h - 2 * hk, idx], 0)
                golden[b, 0, h] = p @ v[b, idx, hk]
    args, kw = _args((q, k_rot, v, lens, basis), c, torch.float32)
    ref = attnkit.loki_attention_decode(*args, backend="reference", **kw)
    out = attnkit.loki_attention_decode(*args, backend="triton", **kw)
    assert_close_to_golden("o", out, ref, golden)


# ------------------------------------------------------------------------------ cache layout


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
def test_append_matches_reference(dtype):
    B, S, Hk, D, Dv, R = 3, 40, 2, 32, 24, 8
    basis = _basis(Hk, D)
    lens = torch.tensor([0, 17, 33], dtype=torch.int32, device=DEVICE)
    k64 = torch.randn(B, 7, Hk, D, dtype=torch.float64, device=DEVICE)
    v64 = torch.randn(B, 7, Hk, Dv, dtype=torch.float64, device=DEVICE)
    out = {}
    for key, dt, backend in (("golden", torch.float64, "reference"), ("ref", dtype, "reference"),
                             ("out", dtype, "triton")):
        k_rot = torch.full((B, S, Hk, D), float("nan"), dtype=dt, device=DEVICE)
        v = torch.full((B, S, Hk, Dv), float("nan"), dtype=dt, device=DEVICE)
        k_low = torch.full((B, Hk, S, R), float("nan"), dtype=dt, device=DEVICE)
        loki_cache_append(k64.to(dt).transpose(1, 2).contiguous().transpose(1, 2), v64.to(dt), k_rot, v, lens,
                          basis, k_lowrank=k_low, backend=backend)
        out[key] = (k_rot, v, k_low)
    written = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
    for b, L in enumerate(lens.tolist()):
        written[b, L:L + 7] = True
    k_rot, v, k_low = out["out"]
    # Only the new positions are written; the low-rank buffer holds the same values as the cache.
    assert torch.isnan(k_rot[~written]).all() and torch.isnan(v[~written]).all()
    assert torch.equal(k_low.transpose(1, 2)[written], k_rot[written][..., :R])
    assert torch.equal(v[written], out["ref"][1][written])
    assert_close_to_golden("k_rot", k_rot[written], out["ref"][0][written], out["golden"][0][written])


@pytest.mark.parametrize("sel", ["head", "group"])
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
def test_lowrank_layout_equals_portable_path(dtype, sel):
    # Fill a LokiCache by prefill + decode appends (triton), then decode from the low-rank buffer:
    # bit-identical to the portable triton path (same values, same scores, same selection) and
    # as close to the float64 reference as the same-dtype reference.
    B, S, H, Hk, D, Dv, R = 3, 90, 4, 2, 32, 16, 12
    basis = _basis(Hk, D)
    cache = LokiCache(basis, B, S, max_rank=R, v_head_dim=Dv, dtype=dtype, device=DEVICE)
    k = torch.randn(B, 71, Hk, D, device=DEVICE)
    v = torch.randn(B, 71, Hk, Dv, device=DEVICE)
    cache.append(k[:, :69].to(dtype), v[:, :69].to(dtype), backend="triton")
    cache.append(k[:, 69:70].to(dtype), v[:, 69:70].to(dtype), backend="triton")
    cache.append(k[:, 70:].to(dtype), v[:, 70:].to(dtype), backend="triton")
    assert cache.seqlens.tolist() == [71] * B
    q = torch.randn(B, 1, H, D, dtype=torch.float64, device=DEVICE)
    for rank, top_k in ((R, 9), (5, 30)):
        kw = dict(rank=rank, top_k=top_k, selection=sel)
        fast = cache.attend(q.to(dtype), backend="triton", **kw)
        portable = attnkit.loki_attention_decode(q.to(dtype), cache.k_rot, cache.v, cache.seqlens, basis,
                                                 backend="triton", **kw)
        assert torch.equal(fast, portable)
        ref = cache.attend(q.to(dtype), backend="reference", **kw)
        golden = attnkit.loki_attention_decode(q, cache.k_rot.double(), cache.v.double(), cache.seqlens, basis,
                                               backend="reference", **kw)
        assert_close_to_golden("o", fast, ref, golden)


def test_lowrank_op_validates():
    basis = _basis(2, 16)
    cache = LokiCache(basis, 2, 10, max_rank=4, device=DEVICE)
    q = torch.randn(2, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"k_lowrank must have shape \[B, Hk, Smax, R\] = \[2, 2, 10, R\] with "
                                         r"6 <= R <= 16"):
        cache.attend(q, rank=6, top_k=3)
    with pytest.raises(ValueError, match=r"k_lowrank must have shape"):
        loki_attention_decode_lowrank(q, cache.k_lowrank.transpose(1, 2), cache.k_rot, cache.v, cache.seqlens,
                                      basis, rank=2, top_k=3)
    with pytest.raises(TypeError, match="k_lowrank must have the same dtype as k_cache_rot"):
        loki_attention_decode_lowrank(q, cache.k_lowrank.half(), cache.k_rot, cache.v, cache.seqlens, basis,
                                      rank=2, top_k=3)
    with pytest.raises(ValueError, match=r"cache_seqlens\[b\] \+ T must be <= Smax = 10"):
        cache.append(torch.randn(2, 11, 2, 16, device=DEVICE), torch.randn(2, 11, 2, 16, device=DEVICE))
    assert cache.seqlens.tolist() == [0, 0]
    ex = attnkit.explain("loki_attention_decode_lowrank", q, cache.k_lowrank, cache.k_rot, cache.v, cache.seqlens,
                         basis, rank=4, top_k=3, selection="group")
    assert ex.inputs.has("lowrank") and ex.inputs.has("selection=group")


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's bfloat16 refusal is CPU-only")
def test_triton_refuses_interpreted_bfloat16():
    basis = _basis(2, 16)
    q = torch.randn(1, 1, 2, 16, dtype=torch.bfloat16)
    kv = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    lens = torch.tensor([8], dtype=torch.int32)
    ex = attnkit.explain("loki_attention_decode", q, kv, kv, lens, basis, rank=2, top_k=3, backend="triton")
    assert ex.backend is None and "bfloat16 matrix products are wrong" in str(ex.refusals["triton"])
    with pytest.raises(attnkit.BackendUnavailable, match="bfloat16"):
        attnkit.loki_attention_decode(q, kv, kv, lens, basis, rank=2, top_k=3, backend="triton")


# ------------------------------------------------------------------- fused selection (no sort)


def _selection_rule(v, length, k):
    """Positions of the min(k, length) largest of v[:length], ties at the threshold: lowest first."""
    v = v[:length]
    kk = min(k, length)
    if kk == 0:
        return []
    tau = v.sort(descending=True).values[kk - 1]
    gt = (v > tau).nonzero().flatten().tolist()
    eq = (v == tau).nonzero().flatten().tolist()[:kk - len(gt)]
    return sorted(gt + eq)


@pytest.mark.parametrize("S", [200, 300])  # the interpreter holds rows <= 256 in registers, streams longer ones
def test_select_is_exact_top_k_in_position_order_with_ties(S):
    from attnkit.ops.loki.triton_loki import loki_select

    B, HS = 3, 2
    sc = torch.randn(B, HS, S, device=DEVICE)
    sc[0, 1, :200] = 0.5  # a threshold inside a long run of ties
    sc[1, 0] = torch.randint(0, 4, (S,), device=DEVICE).float()  # only four distinct values
    sc[2, 1, 5] = -3.4028234663852886e38  # a valid -inf, raised to the lowest float by the scorer
    sc[2, 0, 7] = float("inf")
    lens = torch.tensor([S, S - 43, 20], dtype=torch.int32, device=DEVICE)
    for k in (1, 7, 64, S - 1):
        idx = loki_select(sc, lens, k)
        assert idx.shape == (B, HS, k) and idx.dtype == torch.int32
        for b in range(B):
            for h in range(HS):
                want = _selection_rule(sc[b, h].cpu(), int(lens[b]), k)
                got = idx[b, h].tolist()
                assert got[:len(want)] == want, (k, b, h)
                assert all(x == S for x in got[len(want):]), (k, b, h)  # short row: slots past it


def test_decode_launches_no_sort_and_fit_grid_limits(monkeypatch):
    # the step is Triton launches only (no torch.topk/sort), each on grid axis 0
    calls = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            calls.append((self.name, grid))
            return self.kernel[grid]

    names = ("_loki_rotate_kernel", "_loki_score_kernel", "_loki_select_kernel", "_loki_select_hist_kernel",
             "_loki_select_write_kernel", "_loki_sparse_attn_fwd_kernel", "_loki_sparse_attn_reduce_kernel")
    for name in names:
        monkeypatch.setattr(triton_loki, name, Spy(name, getattr(triton_loki, name)))
    monkeypatch.setattr(torch.Tensor, "topk", lambda *a, **k: pytest.fail("torch.topk in the Loki step"))
    monkeypatch.setattr(torch, "topk", lambda *a, **k: pytest.fail("torch.topk in the Loki step"))
    monkeypatch.setattr(torch.Tensor, "sort", lambda *a, **k: pytest.fail("sort in the Loki step"))
    B, S, H, Hk, D = 2, 96, 4, 2, 32
    q, k, v = torch.randn(B, 1, H, D, device=DEVICE), torch.randn(B, S, Hk, D, device=DEVICE), torch.randn(
        B, S, Hk, D, device=DEVICE)
    basis = attnkit.loki_calibrate(k.reshape(-1, Hk, D))
    lens = torch.tensor([96, 50], dtype=torch.int32, device=DEVICE)
    for sel in ("head", "group"):
        attnkit.loki_attention_decode(q, attnkit.loki_rotate(k, basis), v, lens, basis, rank=8, top_k=12,
                                      selection=sel, backend="triton")
    names = {n for n, _ in calls}
    assert {"_loki_rotate_kernel", "_loki_score_kernel", "_loki_select_kernel",
            "_loki_sparse_attn_fwd_kernel"} <= names
    # few rows: the segmented selection (several programs per row), still no sort
    monkeypatch.setattr(triton_loki, "SEGMENT_MIN", 32)
    attnkit.loki_attention_decode(q, attnkit.loki_rotate(k, basis), v, lens, basis, rank=8, top_k=12,
                                  selection="group", backend="triton")
    seg = [g for n, g in calls if n == "_loki_select_hist_kernel"]
    # 96 slots in segments of 32; the first radix pass is fused into the score kernel
    assert len(seg) == 3 and seg[0] == (2 * Hk * 3,)
    attnkit.loki_attention_decode(q, attnkit.loki_rotate(k, basis), v, lens, basis, rank=8, top_k=12,
                                  selection="head", backend="triton")
    assert len([g for n, g in calls if n == "_loki_select_hist_kernel"]) == 3 + 4  # per head: all four
    assert "_loki_select_write_kernel" in {n for n, _ in calls}
    assert all(len(g) == 1 for _, g in calls)


@pytest.mark.parametrize("segment", [16, 64])
def test_segmented_select_equals_the_rule_and_single_program(segment):
    # Several programs per row (histograms of the segments added into the row's, an exclusive
    # prefix sum of the segments' counts): exactly the single-program selection, ties included.
    from attnkit.ops.loki.triton_loki import loki_select

    B, HS, S = 2, 3, 200
    sc = torch.randn(B, HS, S, device=DEVICE)
    sc[0, 1, :150] = 0.5  # a threshold inside a run of ties that spans several segments
    sc[1, 0] = torch.randint(0, 4, (S,), device=DEVICE).float()  # four distinct values
    sc[1, 2, 5] = -3.4028234663852886e38
    sc[0, 0, 7] = float("inf")
    lens = torch.tensor([S - 9, 37], dtype=torch.int32, device=DEVICE)
    for k in (1, 9, 64, S - 1):
        one = loki_select(sc, lens, k, segment=256)  # one segment: the single-program kernel
        seg = loki_select(sc, lens, k, segment=segment)
        assert torch.equal(seg, one), k
        for b in range(B):
            for h in range(HS):
                want = _selection_rule(sc[b, h].cpu(), int(lens[b]), k)
                got = seg[b, h].tolist()
                assert got[:len(want)] == want, (k, b, h)
                assert all(x == S for x in got[len(want):]), (k, b, h)


@pytest.mark.parametrize("sel", ["head", "group"])
def test_decode_with_segmented_selection_matches_reference(sel, monkeypatch):
    # B = 1 style rows (few rows, long cache) take the segmented selection; same result as the
    # reference (and bit-identical to the single-program selection).
    c = dict(B=1, S=300, H=4, Hk=2, D=32, Dv=16, rank=6, top_k=40, sel=sel, lens=[287])
    data = _decode_data(c)
    single = _compare(attnkit.loki_attention_decode, data, c, torch.float32)
    monkeypatch.setattr(triton_loki, "SEGMENT_MIN", 32)
    assert triton_loki.select_segments(2, 300, 132)[1] > 1
    segmented = _compare(attnkit.loki_attention_decode, data, c, torch.float32)
    assert torch.equal(segmented, single)


def test_select_segments_fill_the_device_at_batch_one():
    # B = 1, S = 32k, Hk = 8 (group selection): 8 rows would leave most of 132 SMs idle
    seg_len, n_seg = triton_loki.select_segments(8, 32768, 132)
    assert 8 * n_seg >= 2 * 132 and seg_len * n_seg >= 32768
    assert triton_loki.select_segments(256, 32768, 132) == (32768, 1)  # rows fill the device already


def test_launch_plan_selection_fills_the_device_and_grids_fit():
    # Recorded on meta tensors in a subprocess without the interpreter (nothing compiles): at
    # B = 1, S = 32k, H = 32, Hk = 8, D = 128, rank = 32, top_k = 4096 with group selection, every
    # selection launch runs >= 2 programs per SM of an H100 and there is no sort/top-k pass; up to
    # B * H = 65,536 no launch of the decode or Loki ops puts more than 65,535 programs on axis 1/2.
    import json
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = textwrap.dedent("""
        import json, torch
        from attnkit.tools.launch_plan import plan
        out = {"target": plan("loki_attention_decode", "decode", torch.bfloat16,
                              dict(B=1, S=32768, H=32, Hk=8, D=128, rank=32, top_k=4096), {"selection": "group"})}
        grids = []
        for B, H, Hk in ((65536, 1, 1), (2048, 32, 8)):
            shape = dict(B=B, S=4096, H=H, Hk=Hk, D=128, rank=32, top_k=512)
            for op, flags in (("loki_attention_decode", {"selection": "head"}),
                              ("loki_attention_decode", {"selection": "group"}),
                              ("loki_cache_attend", {"selection": "group"}), ("loki_cache_append", {}),
                              ("attention_decode", {}), ("attention_decode", {"paged": 256})):
                grids += [(op, x["kernel"], x["grid"]) for x in plan(op, "decode", torch.bfloat16, shape,
                                                                    flags)["launches"]]
        out["grids"] = grids
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    env["ATTNKIT_SM_COUNT"] = "132"
    res = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    kernels = [x["kernel"] for x in out["target"]["launches"]]
    select = [x for x in out["target"]["launches"] if "select" in x["kernel"]]
    assert select and all(x["programs"] >= 2 * 132 for x in select), select
    assert not any("sort" in k or "topk" in k for k in kernels)
    assert out["grids"] and all(g[1] <= 65535 and g[2] <= 65535 for _, _, g in out["grids"]), out["grids"]
    assert any(g[0] >= 65536 for _, _, g in out["grids"])  # the B * H programs are there, on axis 0
