"""Paged Loki caches (issue 15): `block_table=` on `loki_attention_decode`,
`loki_attention_decode_lowrank` and `loki_cache_append`, reference and Triton.

A paged cache holds the same tokens as the padded one, so every paged result must equal the
contiguous result on the same data: bit for bit on the same backend (same values, same order of
operations), with the blocks shuffled and every block nobody references filled with NaN (a NaN
that leaks changes the output). Against the float64 reference the flash-attn criterion of
`harness.assert_close_to_golden` applies, as for the contiguous op.
"""

import pytest
import torch

import attnkit
import attnkit.ops.loki.triton_register  # noqa: F401  (the triton backend of the Loki ops)
from attnkit.ops.loki.cache import LokiCache, loki_attention_decode_lowrank, loki_cache_append

from .harness import DEVICE, assert_close_to_golden, kernel_dtypes, load_native


def _basis(Hk: int, D: int):
    spectrum = torch.logspace(0, -2, D, dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))[0]
    keys = torch.randn(512, Hk, D, dtype=torch.float64) * spectrum @ mix
    return attnkit.loki_calibrate(keys).to(DEVICE)


def _page(cache: torch.Tensor, page: int, n_extra: int, gen: torch.Generator, *, lowrank: bool = False):
    """Padded `[B, Smax, ...]` (low-rank: `[B, Hk, Smax, R]`) -> paged blocks in shuffled order, NaN
    in the `n_extra` blocks nobody references, and the int32 table `[B, Smax // page]`."""
    if lowrank:  # [B, Hk, Smax, R] -> [B, Smax, Hk, R] for the cut, back to [nb, Hk, page, R] after
        cache = cache.transpose(1, 2)
    B, Smax = cache.shape[:2]
    nb = Smax // page
    total = B * nb + n_extra
    perm = torch.randperm(total, generator=gen)
    table = perm[:B * nb].view(B, nb).to(torch.int32)
    paged = torch.full((total, page, *cache.shape[2:]), float("nan"), dtype=cache.dtype, device=cache.device)
    paged[table.flatten().long().to(cache.device)] = cache.reshape(B * nb, page, *cache.shape[2:])
    if lowrank:
        paged = paged.transpose(1, 2).contiguous()
    return paged, table.to(DEVICE), perm[B * nb:]


def _data(B, S, H, Hk, D, Dv, lens, dtype=torch.float64):
    basis = _basis(Hk, D)
    q = torch.randn(B, 1, H, D, dtype=torch.float64, device=DEVICE)
    k_rot = attnkit.loki_rotate(torch.randn(B, S, Hk, D, dtype=torch.float64, device=DEVICE), basis)
    v = torch.randn(B, S, Hk, Dv, dtype=torch.float64, device=DEVICE)
    lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    tail = torch.arange(S, device=DEVICE)[None, :] >= lens[:, None].long()
    k_rot[tail] = float("nan")  # the unused tail of the padded cache (and of its blocks)
    v[tail] = float("nan")
    return q.to(dtype), k_rot.to(dtype), v.to(dtype), lens, basis


CASES = [
    # GQA ratios 1/2/8, MQA; group and head selection; odd lengths; page sizes 1, 5, 16
    dict(B=3, S=80, H=4, Hk=2, D=32, Dv=16, rank=4, top_k=9, sel="head", lens=[63, 0, 5], page=16),
    dict(B=3, S=80, H=4, Hk=2, D=32, Dv=16, rank=4, top_k=9, sel="group", lens=[63, 0, 5], page=16),
    dict(B=2, S=45, H=8, Hk=1, D=16, Dv=24, rank=3, top_k=7, sel="group", lens=[45, 22], page=5),
    dict(B=2, S=45, H=8, Hk=1, D=16, Dv=24, rank=3, top_k=7, sel="head", lens=[1, 44], page=5),
    dict(B=2, S=64, H=4, Hk=4, D=32, Dv=32, rank=8, top_k=20, sel="head", lens=[64, 33], page=16),
    dict(B=2, S=24, H=8, Hk=1, D=16, Dv=16, rank=2, top_k=5, sel="group", lens=[24, 13], page=1),
    dict(B=2, S=48, H=16, Hk=2, D=16, Dv=16, rank=4, top_k=48, sel="head", lens=[48, 17], page=16),  # dense
]


def _id(c):
    return (f"B{c['B']}-S{c['S']}-H{c['H']}-Hk{c['Hk']}-D{c['D']}-Dv{c['Dv']}-r{c['rank']}-k{c['top_k']}-"
            f"{c['sel']}-L{'_'.join(map(str, c['lens']))}-p{c['page']}")


def _paged_args(c, q, k_rot, v, lens, basis, gen_seed=1):
    pk, table, unused = _page(k_rot, c["page"], 3, torch.Generator().manual_seed(gen_seed))
    pv, table_v, _ = _page(v, c["page"], 3, torch.Generator().manual_seed(gen_seed))
    assert torch.equal(table, table_v)
    return pk, pv, table, unused


@pytest.mark.parametrize("case", [pytest.param(c, id=_id(c)) for c in CASES])
def test_reference_paged_equals_contiguous(case):
    c = case
    q, k_rot, v, lens, basis = _data(c["B"], c["S"], c["H"], c["Hk"], c["D"], c["Dv"], c["lens"])
    kw = dict(rank=c["rank"], top_k=c["top_k"], selection=c["sel"], backend="reference")
    want = attnkit.loki_attention_decode(q, k_rot, v, lens, basis, **kw)
    pk, pv, table, _ = _paged_args(c, q, k_rot, v, lens, basis)
    got = attnkit.loki_attention_decode(q, pk, pv, lens, basis, block_table=table, **kw)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _check_paged_backend(c, dtype, backend):
    """`backend`'s paged call equals its contiguous call bit for bit and is close to float64."""
    q, k_rot, v, lens, basis = _data(c["B"], c["S"], c["H"], c["Hk"], c["D"], c["Dv"], c["lens"])
    kw = dict(rank=c["rank"], top_k=c["top_k"], selection=c["sel"])
    golden = attnkit.loki_attention_decode(q, k_rot, v, lens, basis, backend="reference", **kw)
    pk, pv, table, _ = _paged_args(c, q, k_rot, v, lens, basis)
    qd, pk, pv = q.to(dtype), pk.to(dtype), pv.to(dtype)
    contiguous = attnkit.loki_attention_decode(qd, k_rot.to(dtype), v.to(dtype), lens, basis, backend=backend, **kw)
    out = attnkit.loki_attention_decode(qd, pk, pv, lens, basis, block_table=table, backend=backend, **kw)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, contiguous, rtol=0, atol=0)
    ref = attnkit.loki_attention_decode(qd, pk, pv, lens, basis, block_table=table, backend="reference", **kw)
    assert_close_to_golden("o", out, ref, golden)


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("case", [pytest.param(c, id=_id(c)) for c in CASES])
def test_triton_paged_equals_contiguous_and_reference(case, dtype):
    _check_paged_backend(case, dtype, "triton")


def test_table_entries_past_the_length_are_not_read():
    # entries past each row's used blocks point at a NaN block, or out of the pool: never read
    c = dict(B=2, S=64, H=4, Hk=2, D=16, Dv=16, rank=4, top_k=6, sel="head", lens=[17, 32], page=16)
    q, k_rot, v, lens, basis = _data(c["B"], c["S"], c["H"], c["Hk"], c["D"], c["Dv"], c["lens"], torch.float32)
    pk, pv, table, unused = _paged_args(c, q, k_rot, v, lens, basis)
    kw = dict(rank=4, top_k=6, selection="head")
    for backend in ("reference", "triton"):
        want = attnkit.loki_attention_decode(q, k_rot, v, lens, basis, backend=backend, **kw)
        t = table.clone()
        t[0, 2:] = int(unused[0])
        t[1, 2:] = -1
        got = attnkit.loki_attention_decode(q, pk, pv, lens, basis, block_table=t, backend=backend, **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ append


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("page", [1, 4, 16])
def test_append_writes_only_through_the_table(backend, page):
    B, S, Hk, D, Dv, R, T = 3, 48, 2, 32, 24, 8, 7
    basis = _basis(Hk, D)
    lens = torch.tensor([0, 17, 41], dtype=torch.int32, device=DEVICE)
    k_new = torch.randn(B, T, Hk, D, device=DEVICE)
    v_new = torch.randn(B, T, Hk, Dv, device=DEVICE)
    nan = float("nan")
    # contiguous run
    kc = torch.full((B, S, Hk, D), nan, device=DEVICE)
    vc = torch.full((B, S, Hk, Dv), nan, device=DEVICE)
    kl = torch.full((B, Hk, S, R), nan, device=DEVICE)
    loki_cache_append(k_new, v_new, kc, vc, lens, basis, k_lowrank=kl, backend=backend)
    # paged run: the same NaN-filled caches cut into shuffled blocks, 3 spare blocks
    pk, table, unused = _page(torch.full((B, S, Hk, D), nan, device=DEVICE), page, 3, torch.Generator().manual_seed(3))
    pv, _, _ = _page(torch.full((B, S, Hk, Dv), nan, device=DEVICE), page, 3, torch.Generator().manual_seed(3))
    pl, _, _ = _page(torch.full((B, Hk, S, R), nan, device=DEVICE), page, 3, torch.Generator().manual_seed(3),
                     lowrank=True)
    pk[unused], pv[unused], pl[unused] = 7.0, 7.0, 7.0  # blocks nobody references: must stay 7
    loki_cache_append(k_new, v_new, pk, pv, lens, basis, k_lowrank=pl, block_table=table, backend=backend)
    idx = table.flatten().long()
    nb = S // page
    torch.testing.assert_close(pk[idx].reshape(B, S, Hk, D), kc, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(pv[idx].reshape(B, S, Hk, Dv), vc, rtol=0, atol=0, equal_nan=True)
    low = pl[idx].reshape(B, nb, Hk, page, R).transpose(2, 3).reshape(B, S, Hk, R).transpose(1, 2)
    torch.testing.assert_close(low, kl, rtol=0, atol=0, equal_nan=True)
    assert (pk[unused] == 7).all() and (pv[unused] == 7).all() and (pl[unused] == 7).all()
    # and something was written
    assert not torch.isnan(kc[1, 17:24]).any()


@pytest.mark.parametrize("sel", ["head", "group"])
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
def test_paged_lowrank_equals_portable_and_contiguous(dtype, sel):
    # A paged LokiCache filled by prefill + decode appends (triton) decodes from its low-rank
    # buffer exactly as the portable paged path, and as a contiguous cache filled the same way.
    B, S, H, Hk, D, Dv, R, page = 3, 96, 4, 2, 32, 16, 12, 16
    basis = _basis(Hk, D)
    paged = LokiCache(basis, B, S, max_rank=R, v_head_dim=Dv, dtype=dtype, device=DEVICE, block_size=page,
                      num_blocks=B * S // page + 2)
    paged.block_table.copy_(torch.randperm(B * S // page + 2)[:B * S // page].view(B, -1).to(torch.int32))
    flat = LokiCache(basis, B, S, max_rank=R, v_head_dim=Dv, dtype=dtype, device=DEVICE)
    k = torch.randn(B, 71, Hk, D, device=DEVICE).to(dtype)
    v = torch.randn(B, 71, Hk, Dv, device=DEVICE).to(dtype)
    for cache in (paged, flat):
        cache.append(k[:, :69], v[:, :69], backend="triton")
        cache.append(k[:, 69:70], v[:, 69:70], backend="triton")
        cache.append(k[:, 70:], v[:, 70:], backend="triton")
    assert paged.seqlens.tolist() == [71] * B
    q = torch.randn(B, 1, H, D, dtype=torch.float64, device=DEVICE)
    for rank, top_k in ((R, 9), (5, 30)):
        kw = dict(rank=rank, top_k=top_k, selection=sel)
        fast = paged.attend(q.to(dtype), backend="triton", **kw)
        portable = attnkit.loki_attention_decode(q.to(dtype), paged.k_rot, paged.v, paged.seqlens, basis,
                                                 block_table=paged.block_table, backend="triton", **kw)
        torch.testing.assert_close(fast, portable, rtol=0, atol=0)
        torch.testing.assert_close(fast, flat.attend(q.to(dtype), backend="triton", **kw), rtol=0, atol=0)
        ref = paged.attend(q.to(dtype), backend="reference", **kw)
        golden = attnkit.loki_attention_decode(q, flat.k_rot.double(), flat.v.double(), flat.seqlens, basis,
                                               backend="reference", **kw)
        assert_close_to_golden("o", fast, ref, golden)


# -------------------------------------------------------------------------------- validation


def _small():
    basis = _basis(2, 16)
    q = torch.randn(2, 1, 4, 16, device=DEVICE)
    pk = torch.randn(6, 4, 2, 16, device=DEVICE)
    pv = torch.randn(6, 4, 2, 8, device=DEVICE)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([12, 5], dtype=torch.int32, device=DEVICE)
    return basis, q, pk, pv, table, lens


def test_bad_block_tables_are_rejected():
    basis, q, pk, pv, table, lens = _small()
    kw = dict(rank=2, top_k=3)
    run = lambda t, ln=lens, k=pk, v=pv: attnkit.loki_attention_decode(q, k, v, ln, basis, block_table=t, **kw)
    run(table)  # fine
    with pytest.raises(TypeError, match="block_table must be int32, got int64"):
        run(table.long())
    with pytest.raises(TypeError, match="block_table must be a torch.Tensor, got list"):
        run([[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match=r"block_table must have shape \[B, max_blocks\] with B = 2"):
        run(table[:1])
    bad = table.clone()
    bad[1, 1] = 6
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 6 is used by row 1 but is not a block"):
        run(bad)
    bad[1, 1] = -1
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = -1 is used by row 1"):
        run(bad)
    bad = table.clone()
    bad[1, 2] = 99  # past row 1's length (5 tokens = 2 blocks): never read, fine
    run(bad)
    # too few blocks for the length: 3 blocks of 4 hold 12 tokens
    with pytest.raises(ValueError, match=r"cache_seqlens values must be in 0\.\.12 \(Smax = 12, max_blocks \* "
                                         r"block_size"):
        run(table, torch.tensor([13, 5], dtype=torch.int32, device=DEVICE))
    # paged caches must agree with each other
    with pytest.raises(ValueError, match=r"v_cache must have shape \[num_blocks, block_size, Hk, Dv\]"):
        run(table, v=pv[:5])
    with pytest.raises(ValueError, match=r"k_cache_rot must have shape \[num_blocks, block_size, Hk, D\]"):
        run(table, k=torch.randn(6, 4, 2, 8, device=DEVICE))


def test_bad_paged_appends_and_lowrank_are_rejected():
    basis, q, pk, pv, table, lens = _small()
    k_new, v_new = torch.randn(2, 1, 2, 16, device=DEVICE), torch.randn(2, 1, 2, 8, device=DEVICE)
    pl = torch.randn(6, 2, 4, 4, device=DEVICE)
    # row 0 holds 12 tokens in its 3 blocks of 4: one more does not fit
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] \+ Tq = 13 tokens do not fit in block_table row 0"):
        loki_cache_append(k_new, v_new, pk, pv, lens, basis, k_lowrank=pl, block_table=table)
    lens2 = torch.tensor([3, 3], dtype=torch.int32, device=DEVICE)
    shared = torch.tensor([[0, 1, 2], [0, 4, 5]], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="two rows append k_new/v_new into the same cache slot"):
        loki_cache_append(k_new, v_new, pk, pv, lens2, basis, block_table=shared)
    before = pk.clone()
    with pytest.raises(ValueError, match=r"k_lowrank must have shape \[num_blocks, Hk, block_size, R\] = "
                                         r"\[6, 2, 4, R\]"):
        loki_cache_append(k_new, v_new, pk, pv, lens2, basis, k_lowrank=pl.transpose(1, 2), block_table=table)
    assert torch.equal(pk, before)  # nothing written when rejected
    with pytest.raises(ValueError, match=r"k_lowrank must have shape \[num_blocks, Hk, block_size, R\]"):
        loki_attention_decode_lowrank(q, pl.transpose(1, 2), pk, pv, lens, basis, rank=2, top_k=3, block_table=table)
    with pytest.raises(ValueError, match=r"with 3 <= R <= 16"):
        loki_attention_decode_lowrank(q, pl[..., :2], pk, pv, lens, basis, rank=3, top_k=3, block_table=table)
    loki_cache_append(k_new, v_new, pk, pv, lens2, basis, k_lowrank=pl, block_table=table)
    ex = attnkit.explain("loki_attention_decode_lowrank", q, pl, pk, pv, lens, basis, rank=2, top_k=3,
                         block_table=table)
    assert ex.inputs.has("paged") and ex.inputs.has("block_size=4") and ex.inputs.has("lowrank")


def test_custom_op_schema_takes_the_block_table():
    basis, q, pk, pv, table, lens = _small()
    for name in ("loki_attention_decode", "loki_attention_decode_lowrank", "loki_cache_append"):
        schema = str(getattr(torch.ops.attnkit, name).default._schema)
        assert "Tensor? block_table=None" in schema, schema
    comps = basis.components
    o = torch.ops.attnkit.loki_attention_decode(q, pk, pv, lens, comps, table, rank=2, top_k=3, scale=0.25,
                                                backend="reference")
    want = attnkit.loki_attention_decode(q, pk, pv, lens, basis, block_table=table, rank=2, top_k=3, scale=0.25,
                                         backend="reference")
    torch.testing.assert_close(o, want, rtol=0, atol=0)


def test_paged_custom_ops_pass_opcheck():
    basis, q, pk, pv, table, lens = _small()
    comps = basis.components
    pl = torch.randn(6, 2, 4, 4, device=DEVICE)
    opts = dict(rank=2, top_k=3, scale=0.25, selection="group", backend="reference")
    torch.library.opcheck(torch.ops.attnkit.loki_attention_decode.default, (q, pk, pv, lens, comps, table), opts)
    torch.library.opcheck(torch.ops.attnkit.loki_attention_decode_lowrank.default,
                          (q, pl, pk, pv, lens, comps, table), opts)
    k_new, v_new = torch.randn(2, 1, 2, 16, device=DEVICE), torch.randn(2, 1, 2, 8, device=DEVICE)
    lens2 = torch.tensor([3, 2], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.attnkit.loki_cache_append.default,
                          (k_new, v_new, pk, pv, lens2, comps, pl, table), dict(backend="reference"))


def test_paged_ops_compile_without_graph_breaks():
    basis, q, pk, pv, table, lens = _small()
    pl = torch.randn(6, 2, 4, 4, device=DEVICE)

    def step(q, pk, pv, pl, lens, table):
        k_new = q[:, :, :2] * 0.5  # [B, 1, Hk, D]
        v_new = q[:, :, 2:, :8]
        loki_cache_append(k_new, v_new, pk, pv, lens, basis, k_lowrank=pl, block_table=table)
        o1 = attnkit.loki_attention_decode(q, pk, pv, lens + 1, basis, rank=2, top_k=3, block_table=table)
        o2 = loki_attention_decode_lowrank(q, pl, pk, pv, lens + 1, basis, rank=2, top_k=3, block_table=table,
                                           selection="group")
        return o1, o2

    lens = torch.tensor([7, 5], dtype=torch.int32, device=DEVICE)
    eager_bufs = (pk.clone(), pv.clone(), pl.clone())
    want = step(q, *eager_bufs, lens, table)
    comp_bufs = (pk.clone(), pv.clone(), pl.clone())
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, *comp_bufs, lens, table)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(comp_bufs, eager_bufs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("sel", ["head", "group"])
def test_paged_with_segmented_selection(sel, monkeypatch):
    # few rows (B = 1): the segmented selection over scores read through the table; equal to the
    # contiguous call bit for bit, close to the float64 reference
    from attnkit.ops.loki import triton_loki

    monkeypatch.setattr(triton_loki, "SEGMENT_MIN", 32)
    c = dict(B=1, S=160, H=4, Hk=2, D=16, Dv=16, rank=4, top_k=24, sel=sel, lens=[151], page=16)
    q, k_rot, v, lens, basis = _data(c["B"], c["S"], c["H"], c["Hk"], c["D"], c["Dv"], c["lens"])
    assert triton_loki.select_segments(c["B"] * c["H"], c["S"], 132)[1] > 1
    kw = dict(rank=c["rank"], top_k=c["top_k"], selection=sel)
    golden = attnkit.loki_attention_decode(q, k_rot, v, lens, basis, backend="reference", **kw)
    pk, pv, table, _ = _paged_args(c, q, k_rot, v, lens, basis)
    f = torch.float32
    contiguous = attnkit.loki_attention_decode(q.to(f), k_rot.to(f), v.to(f), lens, basis, backend="triton", **kw)
    out = attnkit.loki_attention_decode(q.to(f), pk.to(f), pv.to(f), lens, basis, block_table=table, backend="triton",
                                        **kw)
    torch.testing.assert_close(out, contiguous, rtol=0, atol=0)
    ref = attnkit.loki_attention_decode(q.to(f), pk.to(f), pv.to(f), lens, basis, block_table=table,
                                        backend="reference", **kw)
    assert_close_to_golden("o", out, ref, golden)


# ------------------------------------------------------------------- native (`cuda` backend)
# The C++ CPU kernels (csrc/cpu/loki.cpp), and csrc/cuda/loki.cu on a GPU: scoring walks the cache
# page by page, the sparse attention reads the selected rows through the table.

NATIVE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NATIVE_CASES = CASES + [
    # a score chunk / CUDA score block straddles pages of 5; split keys (long dense-ish selection)
    dict(B=2, S=2100, H=6, Hk=1, D=64, Dv=64, rank=16, top_k=1500, sel="group", lens=[2100, 701], page=5),
    dict(B=2, S=320, H=8, Hk=2, D=32, Dv=32, rank=8, top_k=40, sel="head", lens=[319, 130], page=1),
]


@pytest.fixture(scope="module")
def native():
    """Build (or load) the extension; skip only when no compiler can build it."""
    return load_native()


@pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
@pytest.mark.parametrize("case", [pytest.param(c, id=_id(c)) for c in NATIVE_CASES])
def test_native_paged_equals_contiguous_and_reference(native, case, dtype):
    _check_paged_backend(case, dtype, "cuda")


def test_native_table_entries_past_the_length_are_not_read(native):
    c = dict(B=2, S=64, H=4, Hk=2, D=16, Dv=16, rank=4, top_k=6, sel="head", lens=[17, 32], page=16)
    q, k_rot, v, lens, basis = _data(c["B"], c["S"], c["H"], c["Hk"], c["D"], c["Dv"], c["lens"], torch.float32)
    pk, pv, table, unused = _paged_args(c, q, k_rot, v, lens, basis)
    for sel in ("head", "group"):
        kw = dict(rank=4, top_k=6, selection=sel, backend="cuda")
        want = attnkit.loki_attention_decode(q, k_rot, v, lens, basis, **kw)
        t = table.clone()
        t[0, 2:] = int(unused[0])  # a NaN block
        t[1, 2:] = -1  # not a block at all
        got = attnkit.loki_attention_decode(q, pk, pv, lens, basis, block_table=t, **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_native_is_chosen_for_paged_loki_on_cpu(native):
    # the paged call is no longer refused: on CPU tensors the automatic choice is the C++ kernel
    basis, q, pk, pv, table, lens = _small()
    ex = attnkit.explain("loki_attention_decode", q.cpu(), pk.cpu(), pv.cpu(), lens.cpu(), basis.to("cpu"),
                         rank=2, top_k=3, block_table=table.cpu())
    assert ex.inputs.has("paged") and not ex.refusals["cuda"], ex.refusals
    assert ex.backend == "cuda"


def test_native_paged_custom_op(native):
    basis, q, pk, pv, table, lens = _small()
    o = torch.ops.attnkit.loki_attention_decode(q, pk, pv, lens, basis.components, table, rank=2, top_k=3,
                                                scale=0.25, selection="group", backend="cuda")
    want = attnkit.loki_attention_decode(q, pk, pv, lens, basis, block_table=table, rank=2, top_k=3, scale=0.25,
                                         selection="group", backend="cuda")
    torch.testing.assert_close(o, want, rtol=0, atol=0)
