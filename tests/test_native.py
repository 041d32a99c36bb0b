"""The compiled extension (`cuda` backend): CPU kernels here, CUDA kernels when a GPU is present.

Every kernel is compared with the reference backend through `harness.compare_op` (float64
golden, same-dtype reference, error at most 2x the reference's) and, for ops that write in place,
the caches/states after the call are compared with the reference's. The first test that needs the
extension builds it (about 30 s on 2 cores; cached afterwards).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import attnkit
import attnkit.native  # registers the cuda backend
from attnkit import BackendUnavailable

from .harness import DEVICE, assert_close_to_golden, clone_as, compare_op, load_native, params, poison

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


@pytest.fixture(scope="module", autouse=True)
def native():
    """Build (or load) the extension once; skip only when no C++ compiler can build it."""
    return load_native()


def rand(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE) * scale


def lens_of(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


# ------------------------------------------------------------------------------ attention_decode

DECODE_CASES = [
    dict(B=3, Tq=1, H=8, Hk=2, D=64, Dv=64, S=257, lens=(0, 17, 250), append=True),
    dict(B=2, Tq=3, H=4, Hk=4, D=32, Dv=48, S=130, lens=(5, 100), append=True),
    dict(B=1, Tq=2, H=8, Hk=1, D=128, Dv=128, S=3001, lens=(2999,), append=True),  # MQA, split keys
    dict(B=2, Tq=2, H=6, Hk=3, D=80, Dv=80, S=64, lens=(1, 63), append=False),  # a query sees nothing
    dict(B=4, Tq=1, H=16, Hk=4, D=128, Dv=128, S=600, lens=(0, 599, 1, 300), append=False),
    dict(B=2, Tq=4, H=4, Hk=2, D=16, Dv=16, S=40, lens=(36, 0), append=True),
]


def decode_data(c, layout="bshd"):
    """Base float64 tensors of a decode case; `layout="bhsd"` stores the caches head-major (a
    strided [B, S, Hk, D] view), `"strided"` gives them a non-unit last-dim stride."""
    B, Tq, H, Hk, D, Dv, S = (c[k] for k in ("B", "Tq", "H", "Hk", "D", "Dv", "S"))
    base = dict(q=rand(B, Tq, H, D), k_cache=rand(B, S, Hk, D), v_cache=rand(B, S, Hk, Dv),
                lens=lens_of(c["lens"]), layout=layout)
    if c["append"]:
        base.update(k_new=rand(B, Tq, Hk, D), v_new=rand(B, Tq, Hk, Dv))
    return base


def cache_as(x, dtype, layout):
    if layout == "bhsd":
        return x.transpose(1, 2).to(dtype).contiguous().transpose(1, 2)
    if layout == "strided":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=dtype, device=x.device)
        wide[..., ::2] = x.to(dtype)
        return wide[..., ::2]
    return clone_as(x, dtype)


def decode_args(base):
    def make(dtype):
        kw = dict(k_new=clone_as(base.get("k_new"), dtype), v_new=clone_as(base.get("v_new"), dtype))
        return (clone_as(base["q"], dtype), cache_as(base["k_cache"], dtype, base["layout"]),
                cache_as(base["v_cache"], dtype, base["layout"]), base["lens"]), kw
    return make


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", params(DECODE_CASES))
def test_attention_decode(case, dtype):
    compare_op(attnkit.attention_decode, decode_args(decode_data(case)), dtype, "cuda")


@pytest.mark.parametrize("layout", ["bhsd", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_decode_cache_layouts(layout, dtype):
    case = dict(B=2, Tq=2, H=8, Hk=2, D=64, Dv=64, S=200, lens=(150, 3), append=True)
    compare_op(attnkit.attention_decode, decode_args(decode_data(case, layout)), dtype, "cuda")


@pytest.mark.parametrize("layout", ["bshd", "bhsd", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attention_decode_appends_in_place(layout, dtype):
    case = dict(B=3, Tq=2, H=4, Hk=2, D=32, Dv=40, S=50, lens=(0, 20, 48), append=True)
    base = decode_data(case, layout)
    runs = {}
    for backend in ("reference", "cuda"):
        (q, kc, vc, lens), kw = decode_args(base)(dtype)
        ptr = kc.data_ptr()
        o = attnkit.attention_decode(q, kc, vc, lens, backend=backend, **kw)
        assert kc.data_ptr() == ptr
        runs[backend] = (o, kc, vc, lens)
    assert torch.equal(runs["cuda"][1], runs["reference"][1]), "k_cache after the call differs"
    assert torch.equal(runs["cuda"][2], runs["reference"][2]), "v_cache after the call differs"
    assert torch.equal(runs["cuda"][3], lens_of(case["lens"])), "cache_seqlens must not be advanced"


def test_attention_decode_noncontiguous_query():
    case = dict(B=2, Tq=1, H=8, Hk=2, D=64, Dv=64, S=100, lens=(99, 40), append=True)
    base = decode_data(case)

    def make(dtype):
        (q, kc, vc, lens), kw = decode_args(base)(dtype)
        wide = torch.zeros(*q.shape[:-1], 2 * q.shape[-1], dtype=dtype, device=DEVICE)
        wide[..., ::2] = q
        return (wide[..., ::2], kc, vc, lens), kw

    compare_op(attnkit.attention_decode, make, torch.float32, "cuda")


def test_attention_decode_empty():
    q = torch.randn(2, 0, 4, 32, device=DEVICE)
    kc, vc = torch.randn(2, 16, 2, 32, device=DEVICE), torch.randn(2, 16, 2, 24, device=DEVICE)
    o = attnkit.attention_decode(q, kc, vc, lens_of((3, 4)), backend="cuda")
    assert o.shape == (2, 0, 4, 24)


def test_attention_decode_rejected_inputs_change_nothing():
    kc, vc = torch.randn(2, 16, 2, 32, device=DEVICE), torch.randn(2, 16, 2, 32, device=DEVICE)
    before = kc.clone(), vc.clone()
    q = torch.randn(2, 2, 4, 32, device=DEVICE)
    kn, vn = torch.randn(2, 2, 2, 32, device=DEVICE), torch.randn(2, 2, 2, 32, device=DEVICE)
    if DEVICE == "cpu":  # capacity is a value check: it runs on CPU tensors
        with pytest.raises(ValueError, match="Smax"):
            attnkit.attention_decode(q, kc, vc, lens_of((3, 15)), k_new=kn, v_new=vn, backend="cuda")
    with pytest.raises(TypeError):
        attnkit.attention_decode(q, kc, vc, lens_of((3, 4)), k_new=kn.half(), v_new=vn, backend="cuda")
    with pytest.raises(BackendUnavailable, match="float64"):  # the native kernels refuse float64
        attnkit.attention_decode(q.double(), kc.double(), vc.double(), lens_of((3, 4)),
                                 k_new=kn.double(), v_new=vn.double(), backend="cuda")
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


# ---------------------------------------------------------------- attention_decode, paged cache
# The kernels walk a paged cache page by page (one table read per page run) and align their key
# blocks and split-KV partitions to pages; these cases cross page boundaries everywhere: block
# sizes that divide the key block (1, 16), that do not (3, 17) and larger (64), rows long
# enough to be split, windows starting mid-page, appends straddling two blocks.

PAGED_CASES = [
    dict(B=1, Tq=1, H=8, Hk=2, D=64, Dv=64, S=2100, lens=(2085,), append=True, window=None, softcap=None),
    dict(B=2, Tq=3, H=8, Hk=2, D=32, Dv=48, S=1400, lens=(1290, 40), append=True, window=(1100, 0), softcap=30.0),
    dict(B=3, Tq=1, H=4, Hk=4, D=16, Dv=16, S=210, lens=(0, 77, 199), append=False, window=(50, 0), softcap=None),
    dict(B=1, Tq=2, H=6, Hk=3, D=80, Dv=80, S=1500, lens=(1497,), append=True, window=None, softcap=5.0),
]
PAGED_BLOCK_SIZES = [1, 3, 16, 17, 64]


def page_cache(x, lens_after, block_size, seed):
    """`x [B, S, Hk, D]` scattered into a shuffled block pool with three spare blocks; NaN in
    every unreferenced block and every slot past a row's length. Returns (pool, table), table
    int32 `[B, ceil(S / block_size)]` with -1 where a row has no block."""
    B, S = x.shape[:2]
    need = [-(-int(n) // block_size) for n in lens_after]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(sum(need) + 3, generator=gen)
    pool = torch.full((perm.numel(), block_size, *x.shape[2:]), float("nan"), dtype=x.dtype, device=x.device)
    table = torch.full((B, -(-S // block_size)), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens_after):
        blocks = perm[used:used + need[b]]
        used += need[b]
        table[b, :need[b]] = blocks.to(torch.int32)
        pos = torch.arange(int(n))
        pool[blocks[pos // block_size].to(x.device), (pos % block_size).to(x.device)] = x[b, :int(n)]
    return pool, table.to(x.device)


def paged_args(base, c, block_size, poison_new=True):
    """make_args for compare_op: the case's caches paged (same blocks for every dtype)."""
    Tq = c["Tq"]
    after = [n + (Tq if c["append"] else 0) for n in c["lens"]]

    def make(dtype):
        (q, kc, vc, lens), kw = decode_args(base)(dtype)
        k_pool, table = page_cache(kc, after, block_size, seed=block_size)
        v_pool, _ = page_cache(vc, after, block_size, seed=block_size)
        if c["append"] and poison_new:  # the slots the append writes start as NaN
            for b, n in enumerate(c["lens"]):
                pos = torch.arange(n, n + Tq, device=DEVICE)
                blk = table[b, pos // block_size].long()
                k_pool[blk, pos % block_size] = float("nan")
                v_pool[blk, pos % block_size] = float("nan")
        kw.update(block_table=table, window=c["window"], softcap=c["softcap"])
        return (q, k_pool, v_pool, lens), kw
    return make


@pytest.mark.parametrize("block_size", PAGED_BLOCK_SIZES, ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", params(PAGED_CASES))
def test_attention_decode_paged(case, dtype, block_size):
    """Paged decode against the float64 oracle (shuffled blocks, NaN-poisoned unreferenced blocks
    and slots, window and softcap), and the pools after the in-place append equal the
    reference's: the new tokens where the table says, nothing else touched."""
    base = decode_data(case)
    make = paged_args(base, case, block_size)
    compare_op(attnkit.attention_decode, make, dtype, "cuda")
    pools = {}
    for backend in ("reference", "cuda"):
        (q, kp, vp, lens), kw = make(dtype)
        o = attnkit.attention_decode(q, kp, vp, lens, backend=backend, **kw)
        assert not o.isnan().any(), f"{backend}: NaN leaked from an unreferenced block or slot"
        pools[backend] = (kp, vp)
    for i, name in enumerate(("k_cache", "v_cache")):
        assert torch.equal(pools["cuda"][i].nan_to_num(7.0), pools["reference"][i].nan_to_num(7.0)), name


@pytest.mark.parametrize("block_size", PAGED_BLOCK_SIZES + [2048], ids=lambda b: f"bs{b}")
def test_attention_decode_paged_equals_contiguous(block_size):
    """The paged kernel attends over exactly the rows of the contiguous one. With a block size
    dividing the kernel's key block (16) both use the same key blocks and split bounds, so the
    outputs are bitwise equal; otherwise the split bounds move to page boundaries (2048: pages
    longer than a split, which the CPU kernel then cuts) and only the float32 summation order
    may differ."""
    c = dict(B=3, Tq=2, H=8, Hk=2, D=64, Dv=64, S=2400, lens=(2300, 5, 1033), append=True,
             window=(1500, 0), softcap=20.0)
    base = decode_data(c)
    (q, kc, vc, lens), kw = decode_args(base)(torch.float32)
    contiguous = attnkit.attention_decode(q, kc, vc, lens, window=c["window"], softcap=c["softcap"],
                                          backend="cuda", **kw)
    (q, kp, vp, lens), kw = paged_args(base, c, block_size)(torch.float32)
    paged = attnkit.attention_decode(q, kp, vp, lens, backend="cuda", **kw)
    if 16 % block_size == 0:
        assert torch.equal(paged, contiguous)
    else:
        torch.testing.assert_close(paged, contiguous, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(DEVICE != "cuda", reason="head-dim limits of the CUDA kernels")
def test_attention_decode_cuda_refuses_head_dim():
    kc, vc = torch.randn(1, 8, 1, 20, device=DEVICE), torch.randn(1, 8, 1, 20, device=DEVICE)
    q = torch.randn(1, 1, 2, 20, device=DEVICE)
    with pytest.raises(BackendUnavailable, match="head dims"):
        attnkit.attention_decode(q, kc, vc, lens_of((4,)), backend="cuda")
    assert attnkit.explain("attention_decode", q, kc, vc, lens_of((4,))).backend != "cuda"


# ------------------------------------------------------------------------- loki_attention_decode

LOKI_CASES = [
    dict(B=3, H=8, Hk=2, D=64, S=300, lens=(0, 17, 290), rank=16, top_k=20, sel="head"),
    dict(B=3, H=8, Hk=2, D=64, S=300, lens=(0, 17, 290), rank=16, top_k=20, sel="group"),
    dict(B=2, H=4, Hk=4, D=32, S=100, lens=(100, 63), rank=32, top_k=1, sel="head"),
    dict(B=2, H=6, Hk=1, D=128, S=2100, lens=(2100, 700), rank=32, top_k=1500, sel="group"),  # split keys
    dict(B=2, H=4, Hk=2, D=64, S=80, lens=(80, 5), rank=8, top_k=500, sel="head"),  # dense
]


def loki_args(c):
    B, H, Hk, D, S = (c[k] for k in ("B", "H", "Hk", "D", "S"))
    spread = torch.linspace(3.0, 0.1, D, dtype=torch.float64, device=DEVICE)  # low-rank-ish keys
    basis = attnkit.loki_calibrate((rand(400, Hk, D) * spread).float())
    k_rot = attnkit.loki_rotate(rand(B, S, Hk, D) * spread, basis)
    base = dict(q=rand(B, 1, H, D), k=k_rot, v=rand(B, S, Hk, D), lens=lens_of(c["lens"]))

    def make(dtype):
        return ((clone_as(base["q"], dtype), clone_as(base["k"], dtype), clone_as(base["v"], dtype),
                 base["lens"], basis), dict(rank=c["rank"], top_k=c["top_k"], selection=c["sel"]))
    return make


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", params(LOKI_CASES))
def test_loki_attention_decode(case, dtype):
    compare_op(attnkit.loki_attention_decode, loki_args(case), dtype, "cuda")


def test_loki_top_k_one_picks_the_best_key():
    # top_k = 1 must return exactly the value row of the best approximate score.
    B, H, Hk, D, S = 2, 4, 2, 32, 50
    basis = attnkit.loki_calibrate(torch.randn(200, Hk, D, device=DEVICE))
    q = torch.randn(B, 1, H, D, device=DEVICE)
    k = attnkit.loki_rotate(torch.randn(B, S, Hk, D, device=DEVICE), basis)
    v = torch.randn(B, S, Hk, D, device=DEVICE)
    lens = lens_of((50, 31))
    o = attnkit.loki_attention_decode(q, k, v, lens, basis, rank=8, top_k=1, backend="cuda")
    q_rot = torch.einsum("bhd,hde->bhe", q[:, 0], basis.components.repeat_interleave(H // Hk, 0))
    for b in range(B):
        for h in range(H):
            scores = k[b, : lens[b], h // (H // Hk), :8] @ q_rot[b, h, :8]
            torch.testing.assert_close(o[b, 0, h], v[b, int(scores.argmax()), h // (H // Hk)])


# ------------------------------------------------------------------------- linear_attention_step

STEP_CASES = [
    dict(mode="lightning", B=3, H=8, Hk=2, Dk=32, Dv=48, N=5, decay=True, fm=None, norm=False, idx="int32"),
    dict(mode="lightning", B=2, H=4, Hk=4, Dk=24, Dv=40, N=2, decay=False, fm=None, norm=False, idx=None),
    dict(mode="linear", B=3, H=8, Hk=2, Dk=32, Dv=32, N=4, decay=False, fm=None, norm=False, idx="int64"),
    dict(mode="linear", B=2, H=6, Hk=3, Dk=40, Dv=24, N=2, decay=False, fm="elu", norm=False, idx=None),
    dict(mode="linear", B=3, H=4, Hk=1, Dk=64, Dv=64, N=6, decay=False, fm="relu", norm=True, idx="int32"),
    dict(mode="linear", B=1, H=2, Hk=2, Dk=16, Dv=130, N=1, decay=False, fm="elu", norm=True, idx=None),
]


def step_fn(q, k, v, state, *, backend=None, **kw):
    """The step output and the state it updated (both compared)."""
    return attnkit.linear_attention_step(q, k, v, state, backend=backend, **kw), state


def step_args(c):
    B, H, Hk, Dk, Dv, N = (c[k] for k in ("B", "H", "Hk", "Dk", "Dv", "N"))
    Hs = H if c["mode"] == "lightning" else Hk
    base = dict(q=rand(B, 1, H, Dk), k=rand(B, 1, Hk, Dk), v=rand(B, 1, Hk, Dv), S=rand(N, Hs, Dk, Dv),
                z=rand(N, Hk, Dk).abs() + 1.0)
    decay = torch.rand(H, device=DEVICE) if c["decay"] else None
    perm = torch.randperm(N, device=DEVICE)[:B]
    idx = None if c["idx"] is None else perm.to(getattr(torch, c["idx"]))

    def make(dtype):
        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        S = clone_as(base["S"], sdt)
        state = (S, clone_as(base["z"], sdt)) if c["norm"] else S
        return ((clone_as(base["q"], dtype), clone_as(base["k"], dtype), clone_as(base["v"], dtype), state),
                dict(decay=decay, feature_map=c["fm"], normalize=c["norm"], state_indices=idx))
    return make


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", params(STEP_CASES))
def test_linear_attention_step(case, dtype):
    n_out = 3 if case["norm"] else 2
    compare_op(step_fn, step_args(case), dtype, "cuda", output_names=["o", "S", "z"][:n_out])


def test_linear_attention_step_untouched_rows_and_strided_state():
    # Rows not named by state_indices stay bit-identical; a state whose [Dk, Dv] blocks are not
    # contiguous is still updated in place.
    B, H, Hk, Dk, Dv, N = 2, 4, 2, 16, 24, 5
    q, k, v = torch.randn(B, 1, H, Dk, device=DEVICE), torch.randn(B, 1, Hk, Dk, device=DEVICE), \
        torch.randn(B, 1, Hk, Dv, device=DEVICE)
    idx = torch.tensor([3, 1], dtype=torch.int32, device=DEVICE)
    S_ref = torch.randn(N, Hk, Dk, Dv, device=DEVICE)
    S_nat = S_ref.transpose(2, 3).contiguous().transpose(2, 3)  # same values, column-major blocks
    untouched = S_ref[[0, 2, 4]].clone()
    o_ref = attnkit.linear_attention_step(q, k, v, S_ref, state_indices=idx, backend="reference")
    o_nat = attnkit.linear_attention_step(q, k, v, S_nat, state_indices=idx, backend="cuda")
    torch.testing.assert_close(o_nat, o_ref)
    torch.testing.assert_close(S_nat, S_ref)
    assert torch.equal(S_nat[[0, 2, 4]], untouched)


def test_linear_attention_step_rejected_inputs_change_nothing():
    q, k, v = torch.randn(2, 1, 4, 16, device=DEVICE), torch.randn(2, 1, 2, 16, device=DEVICE), \
        torch.randn(2, 1, 2, 16, device=DEVICE)
    S = torch.randn(3, 2, 16, 16, device=DEVICE)
    before = S.clone()
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="state_indices"):
            attnkit.linear_attention_step(q, k, v, S, state_indices=torch.tensor([0, 7], dtype=torch.int32),
                                          backend="cuda")
    with pytest.raises(TypeError):
        attnkit.linear_attention_step(q, k, v, S.double(), backend="cuda")
    assert torch.equal(S, before)


# ------------------------------------------------------------------------------------ qk_norm

NORM_CASES = [
    dict(shape=(2, 5, 3, 64), mode="rms", weight="f32"),
    dict(shape=(7, 80), mode="rms", weight="dtype"),
    dict(shape=(3, 4, 2, 128), mode="l2", weight=None),
    dict(shape=(1, 3, 100), mode="l2", weight="f32"),
]


def norm_args(c):
    x = rand(*c["shape"], scale=3.0)
    w = None if c["weight"] is None else rand(c["shape"][-1]) + 1.0

    def make(dtype):
        wdt = torch.float32 if c["weight"] == "f32" and dtype != torch.float64 else dtype
        return (clone_as(x, dtype), clone_as(w, wdt)), dict(mode=c["mode"])
    return make


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", params(NORM_CASES))
def test_qk_norm(case, dtype):
    compare_op(attnkit.qk_norm, norm_args(case), dtype, "cuda")


def test_qk_norm_refuses_grad():
    x = torch.randn(2, 4, 32, device=DEVICE, requires_grad=True)
    with pytest.raises(BackendUnavailable, match="forward-only"):
        attnkit.qk_norm(x, backend="cuda")
    ex = attnkit.explain("qk_norm", x)
    assert ex.backend != "cuda" and any("forward-only" in r for r in ex.refusals["cuda"])
    with torch.no_grad():
        assert not attnkit.explain("qk_norm", x).refusals["cuda"]


# ----------------------------------------------------------------------------- qk_norm_rope_


def rope_tables(B, T, rot, per_batch, dtype=torch.float64):
    """cos/sin as `transformers` rotary embeddings build them: `cat(freqs, freqs)` per position."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float64, device=DEVICE) / rot))
    pos = torch.arange(T, dtype=torch.float64, device=DEVICE)
    pos = pos[None] + 7 * torch.arange(B if per_batch else 1, device=DEVICE)[:, None]  # [B or 1, T]
    freqs = pos[..., None] * inv_freq  # [B or 1, T, rot / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def torch_norm_rope(x, w, cos, sin, mode, eps):
    """The PyTorch formulation (Llama / Qwen3): norm, then `x * cos + rotate_half(x) * sin` on the
    first `rot` dims, in x's dtype. x `[B, T, H, D]`, cos/sin `[B or 1, T, rot]`."""
    if mode is not None:
        sq = x.square()
        stat = sq.mean(-1, keepdim=True) if mode == "rms" else sq.sum(-1, keepdim=True)
        x = x * torch.rsqrt(stat + eps)
        if w is not None:
            x = x * w.to(x.dtype)
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    rotated = torch.cat((-xr[..., rot // 2:], xr[..., : rot // 2]), dim=-1)
    c, s = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
    return torch.cat((xr * c + rotated * s, xp), dim=-1)


ROPE_CASES = [
    dict(B=2, T=5, H=8, Hk=2, D=64, rot=64, mode="rms", weights=True, per_batch=False),
    dict(B=1, T=3, H=4, Hk=4, D=128, rot=64, mode="rms", weights=True, per_batch=True),  # partial rotary
    dict(B=3, T=2, H=2, Hk=1, D=32, rot=32, mode="l2", weights=False, per_batch=True),
    dict(B=2, T=4, H=4, Hk=2, D=80, rot=80, mode=None, weights=False, per_batch=False),  # RoPE only
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", params(ROPE_CASES))
def test_qk_norm_rope_matches_pytorch(case, dtype):
    B, T, H, Hk, D, rot = (case[k] for k in ("B", "T", "H", "Hk", "D", "rot"))
    q, k = rand(B, T, H, D, scale=2.0), rand(B, T, Hk, D, scale=2.0)
    qw, kw = (rand(D) + 1.0, rand(D) + 1.0) if case["weights"] else (None, None)
    cos, sin = rope_tables(B, T, rot, case["per_batch"])
    mode, eps = case["mode"], 1e-6
    qn, kn = clone_as(q, dtype), clone_as(k, dtype)
    out = attnkit.native.qk_norm_rope_(qn, kn, cos.to(dtype), sin.to(dtype), q_weight=clone_as(qw, torch.float32),
                                       k_weight=clone_as(kw, torch.float32), mode=mode, eps=eps)
    assert out[0] is qn and out[1] is kn
    # The op gets the tables in `dtype` (as a model holds them): golden and reference use the same
    # rounded tables; the reference does float32 maths on the rounded inputs, rounded once at the end.
    golden = [torch_norm_rope(x, w, cos.to(dtype).double(), sin.to(dtype).double(), mode, eps)
              for x, w in ((q, qw), (k, kw))]
    ref = [torch_norm_rope(clone_as(x, dtype).float(), clone_as(w, torch.float32), cos.to(dtype).float(),
                           sin.to(dtype).float(), mode, eps).to(dtype) for x, w in ((q, qw), (k, kw))]
    assert_close_to_golden("q", qn, ref[0], golden[0])
    assert_close_to_golden("k", kn, ref[1], golden[1])


def test_qk_norm_rope_strided_heads_in_place():
    # q and k as views of one fused qkv projection: updated in place, the v part untouched.
    B, T, H, Hk, D = 2, 3, 4, 2, 32
    qkv = torch.randn(B, T, H + 2 * Hk, D, device=DEVICE)
    q, k, v = qkv[:, :, :H], qkv[:, :, H:H + Hk], qkv[:, :, H + Hk:]
    v_before, q64, k64 = v.clone(), q.double(), k.double()
    cos, sin = rope_tables(B, T, D, per_batch=False, dtype=torch.float32)
    attnkit.native.qk_norm_rope_(q, k, cos, sin)
    torch.testing.assert_close(q, torch_norm_rope(q64, None, cos.double(), sin.double(), "rms", 1e-6).float())
    torch.testing.assert_close(k, torch_norm_rope(k64, None, cos.double(), sin.double(), "rms", 1e-6).float())
    assert torch.equal(v, v_before)


def test_qk_norm_rope_rejected_inputs_change_nothing():
    q, k = torch.randn(1, 2, 2, 16, device=DEVICE), torch.randn(1, 2, 1, 16, device=DEVICE)
    before = q.clone(), k.clone()
    cos, sin = rope_tables(1, 2, 16, per_batch=False, dtype=torch.float32)
    with pytest.raises(ValueError, match="rot"):
        attnkit.native.qk_norm_rope_(q, k, cos[..., :15], sin[..., :15])
    with pytest.raises(ValueError, match="unit stride"):
        attnkit.native.qk_norm_rope_(q.transpose(2, 3), k, cos, sin)
    with pytest.raises(ValueError, match="mode"):
        attnkit.native.qk_norm_rope_(q, k, cos, sin, mode="layer")
    with pytest.raises(ValueError, match="mode=None"):
        attnkit.native.qk_norm_rope_(q, k, cos, sin, q_weight=torch.ones(16, device=DEVICE), mode=None)
    assert torch.equal(q, before[0]) and torch.equal(k, before[1])


# ------------------------------------------------------------------------------ backend choice


def test_automatic_choice_on_cpu():
    q, kc, vc = torch.randn(1, 1, 4, 32), torch.randn(1, 8, 2, 32), torch.randn(1, 8, 2, 32)
    lens = torch.tensor([5], dtype=torch.int32)
    assert attnkit.explain("attention_decode", q, kc, vc, lens).backend == "cuda"
    ex = attnkit.explain("attention_decode", q.double(), kc.double(), vc.double(), lens)
    assert ex.backend == "reference" and any("float64" in r for r in ex.refusals["cuda"])


def test_import_and_explain_never_compile(tmp_path):
    # A fresh process with an empty build folder: importing and explaining must not build.
    code = (
        "import torch, attnkit, attnkit.native\n"
        "from attnkit.native import _build\n"
        "q, kc, vc = torch.randn(1, 1, 4, 32), torch.randn(1, 8, 2, 32), torch.randn(1, 8, 2, 32)\n"
        "ex = attnkit.explain('attention_decode', q, kc, vc, torch.tensor([5], dtype=torch.int32))\n"
        "assert ex.backend == 'cuda', ex\n"
        "assert _build._module is None and not attnkit.native.is_built()\n"
    )
    env = {**os.environ, "ATTNKIT_BUILD_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "compiling" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_disable_switch(monkeypatch):
    monkeypatch.setenv("ATTNKIT_DISABLE_NATIVE", "1")
    q, kc, vc = torch.randn(1, 1, 4, 32), torch.randn(1, 8, 2, 32), torch.randn(1, 8, 2, 32)
    lens = torch.tensor([5], dtype=torch.int32)
    ex = attnkit.explain("attention_decode", q, kc, vc, lens)
    assert ex.backend == "reference" and "ATTNKIT_DISABLE_NATIVE" in ex.refusals["cuda"][0]


def test_cache_past_seqlens_is_never_read():
    # NaN in the caches past cache_seqlens must not reach the output (it is never read).
    B, H, Hk, D, S = 2, 4, 2, 32, 64
    q = torch.randn(B, 1, H, D, device=DEVICE)
    kc, vc = poison(B, S, Hk, D), poison(B, S, Hk, D)
    kc[:, :10], vc[:, :10] = torch.randn(B, 10, Hk, D, device=DEVICE), torch.randn(B, 10, Hk, D, device=DEVICE)
    lens = lens_of((10, 3))
    o = attnkit.attention_decode(q, kc, vc, lens, backend="cuda")
    ref = attnkit.attention_decode(q, kc.nan_to_num(0.0), vc.nan_to_num(0.0), lens, backend="reference")
    assert not torch.isnan(o).any()
    torch.testing.assert_close(o, ref)
