"""Sliding window, softcap and paged KV cache (SPEC "Sliding window, softcap, paged KV cache"),
and the decode-cache contract that nothing at or past a row's length is read (issue 9, defect 1).

Oracles are written here from the definition, in float64, independently of attnkit's reference
(dense scores, explicit masks); every backend that runs on this machine is compared with them.
"""

from __future__ import annotations

import os

import pytest
import torch

import attnkit
from attnkit import BackendUnavailable

from .harness import DEVICE, assert_close_to_golden, interpreted

F64 = torch.float64


def rand(*shape, dtype=F64, requires_grad=False):
    x = torch.randn(*shape, dtype=F64, device=DEVICE).to(dtype)
    return x.requires_grad_(requires_grad)


def lens_of(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


# ------------------------------------------------------------ decode never reads past the lengths


@pytest.mark.parametrize("append", [False, True], ids=["no-append", "append"])
def test_reference_decode_ignores_nan_past_cache_seqlens(append):
    """Issue 9 defect 1: NaN at positions >= L_b must not reach the output (0 * NaN = NaN)."""
    q = rand(1, 1, 2, 16)
    kc, vc = rand(1, 8, 1, 16), rand(1, 8, 1, 16)
    lens = lens_of([4])
    kn = vn = None
    if append:
        kn, vn = rand(1, 1, 1, 16), rand(1, 1, 1, 16)
    clean = attnkit.attention_decode(q, kc.clone(), vc.clone(), lens, k_new=kn, v_new=vn, backend="reference")
    kp, vp = kc.clone(), vc.clone()
    start = 5 if append else 4
    kp[:, start:], vp[:, start:] = float("nan"), float("nan")
    poisoned = attnkit.attention_decode(q, kp, vp, lens, k_new=kn, v_new=vn, backend="reference")
    assert not poisoned.isnan().any()
    assert torch.equal(poisoned, clean)


# ------------------------------------------------------------------------------------ oracles


def oracle_attention(q, k, v, *, causal=False, window=(-1, -1), softcap=None, scale=None, qk_norm=None,
                     wq=None, wk=None, eps=1e-6):
    """Dense float64 attention straight from the SPEC: returns (o, lse)."""
    B, T, H, D = q.shape
    S, Hk = k.shape[1], k.shape[2]
    if qk_norm is not None:
        def norm(x, w):
            stat = x.square().mean(-1, keepdim=True) if qk_norm == "rms" else x.square().sum(-1, keepdim=True)
            y = x * torch.rsqrt(stat + eps)
            return y * w if w is not None else y
        q, k = norm(q, wq), norm(k, wk)
    scale = D ** -0.5 if scale is None else scale
    kr, vr = k.repeat_interleave(H // Hk, dim=2), v.repeat_interleave(H // Hk, dim=2)
    x = torch.einsum("bthd,bshd->bhts", q, kr) * scale
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    p = torch.arange(T, device=q.device)[:, None] + S - T
    s = torch.arange(S, device=q.device)[None]
    vis = torch.ones(T, S, dtype=torch.bool, device=q.device)
    left, right = window
    if left >= 0:
        vis &= s >= p - left
    if right >= 0:
        vis &= s <= p + right
    if causal:
        vis &= s <= p
    x = x.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(x, -1)  # [B, H, T]; -inf for rows that see nothing
    w = torch.where(torch.isfinite(lse)[..., None], torch.exp(x - lse[..., None].clamp_min(-1e300)),
                    torch.zeros_like(x))
    o = torch.einsum("bhts,bshd->bthd", w, vr)
    return o, lse


def oracle_decode(q, k_rows, v_rows, lens, *, window=(-1, -1), softcap=None, scale=None):
    """Decode over contiguous per-row key lists `k_rows[b] [L_b, Hk, D]` (L_b = lens[b])."""
    outs = []
    for b, L in enumerate(lens):
        o, _ = oracle_attention(q[b:b + 1], k_rows[b][None, :L], v_rows[b][None, :L], causal=True,
                                window=window, softcap=softcap, scale=scale)
        outs.append(o)
    return torch.cat(outs)


def close64(a, b, tol=1e-10):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=False), float((a - b).abs().max())


# --------------------------------------------------------------------------- attention (fwd+bwd)

ATT_CASES = [
    dict(T=9, S=9, H=4, Hk=2, causal=True, window=(3, 0), softcap=None),
    dict(T=9, S=9, H=4, Hk=2, causal=True, window=(3, 0), softcap=2.0),
    dict(T=7, S=13, H=4, Hk=1, causal=False, window=(4, 2), softcap=1.5),
    dict(T=13, S=7, H=2, Hk=2, causal=True, window=(2, -1), softcap=None),  # rows that see nothing
    dict(T=8, S=11, H=6, Hk=3, causal=False, window=(-1, 0), softcap=3.0),
    dict(T=8, S=11, H=6, Hk=3, causal=False, window=(0, 0), softcap=None),
    dict(T=10, S=10, H=4, Hk=4, causal=False, window=(5, -1), softcap=0.5),
    dict(T=6, S=12, H=8, Hk=2, causal=False, window=(-1, -1), softcap=4.0),
]


def _ids(cases):
    return [pytest.param(c, id="-".join(f"{k}{v}" for k, v in c.items())) for c in cases]


@pytest.mark.parametrize("qk_norm", [None, "rms"])
@pytest.mark.parametrize("c", _ids(ATT_CASES))
def test_attention_float64_matches_oracle_with_gradients(c, qk_norm):
    B, D, Dv = 2, 8, 6
    q = rand(B, c["T"], c["H"], D, requires_grad=True)
    k = rand(B, c["S"], c["Hk"], D, requires_grad=True)
    v = rand(B, c["S"], c["Hk"], Dv, requires_grad=True)
    scale = torch.tensor(0.7, dtype=F64, device=DEVICE, requires_grad=True)
    wq = rand(D, requires_grad=True) if qk_norm else None
    wk = rand(D, requires_grad=True) if qk_norm else None
    leaves = [x for x in (q, k, v, scale, wq, wk) if x is not None]
    kw = dict(causal=c["causal"], window=c["window"], softcap=c["softcap"])
    o, lse = attnkit.attention(q, k, v, scale=scale, qk_norm=qk_norm, q_norm_weight=wq, k_norm_weight=wk,
                               return_lse=True, backend="reference", **kw)
    o_ref, lse_ref = oracle_attention(q, k, v, scale=scale, qk_norm=qk_norm, wq=wq, wk=wk, **kw)
    close64(o, o_ref)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    close64(lse.nan_to_num(neginf=0.0), lse_ref.nan_to_num(neginf=0.0))
    cot, cot_l = torch.randn_like(o), torch.randn_like(lse)
    finite = torch.isfinite(lse_ref)
    loss = (o * cot).sum() + (lse.nan_to_num(neginf=0.0) * cot_l * finite).sum()
    loss_ref = (o_ref * cot).sum() + (lse_ref.nan_to_num(neginf=0.0) * cot_l * finite).sum()
    g = torch.autograd.grad(loss, leaves)
    g_ref = torch.autograd.grad(loss_ref, leaves)
    for a, b in zip(g, g_ref):
        assert torch.isfinite(a).all()
        close64(a, b)


def test_attention_window_and_softcap_with_varlen():
    cu = torch.tensor([0, 5, 5, 17, 20], dtype=torch.int32, device=DEVICE)
    cuk = torch.tensor([0, 7, 9, 21, 21], dtype=torch.int32, device=DEVICE)
    q = rand(1, 20, 4, 8, requires_grad=True)
    k = rand(1, 21, 2, 8, requires_grad=True)
    v = rand(1, 21, 2, 8, requires_grad=True)
    kw = dict(causal=True, window=(3, 0), softcap=1.0)
    o, lse = attnkit.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cuk, return_lse=True, backend="reference", **kw)
    cot = torch.randn_like(o)
    g = torch.autograd.grad((o * cot).sum(), (q, k, v))
    outs = []
    for i in range(4):
        qs, ks = slice(int(cu[i]), int(cu[i + 1])), slice(int(cuk[i]), int(cuk[i + 1]))
        o_i, lse_i = oracle_attention(q[:, qs], k[:, ks], v[:, ks], **kw)
        close64(o[:, qs], o_i)
        assert torch.equal(torch.isinf(lse[..., qs]), torch.isinf(lse_i))
        outs.append(o_i)
    g_ref = torch.autograd.grad((torch.cat(outs, 1) * cot).sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        close64(a, b)


def test_window_off_and_causal_normalisation_are_exact():
    q, k, v = rand(2, 9, 4, 8), rand(2, 9, 2, 8), rand(2, 9, 2, 8)
    base = attnkit.attention(q, k, v, causal=True, backend="reference")
    for window in (None, (-1, -1), (-1, 0), (-1, 7), (100, 0)):
        assert torch.equal(attnkit.attention(q, k, v, causal=True, window=window, backend="reference"), base)
    assert torch.equal(attnkit.attention(q, k, v, softcap=0, backend="reference"),
                       attnkit.attention(q, k, v, backend="reference"))
    call = attnkit.ops.softmax.api._prepare_attention(q, k, v, causal=True, window=(5, 3), softcap=2)
    assert call.kwargs["window"] == (5, -1) and call.kwargs["softcap"] == 2.0
    assert {"window", "softcap"} <= call.inputs.features
    call = attnkit.ops.softmax.api._prepare_attention(q, k, v)
    assert call.kwargs["window"] == (-1, -1) and call.kwargs["softcap"] == 0.0
    assert not {"window", "softcap"} & call.inputs.features


# ----------------------------------------------------------------------------------- decode

def decode_backends():
    """Backends that can run decode on this machine: reference always; the compiled extension
    when a C++ compiler exists; Triton on a GPU or under the interpreter."""
    out = ["reference"]
    from attnkit.native import _build
    if _build.cxx() is not None and os.environ.get("ATTNKIT_DISABLE_NATIVE") != "1":
        out.append("cuda")
    if DEVICE == "cuda" or interpreted():
        from attnkit.ops.softmax import triton_register  # noqa: F401
        out.append("triton")
    return out


def paged_copy(k_cache, lens_after, block_size, *, spare=3, seed=0):
    """Scatter a contiguous cache `[B, Smax, Hk, D]` into a shuffled block pool.

    Returns `(pool, table, used)`: `pool [num_blocks, block_size, Hk, D]` (unreferenced blocks
    and every slot past a row's length hold NaN), `table` int32 `[B, max_blocks]` (-1 where a row
    has no block), `used` the sorted block ids the table references."""
    B, Smax, Hk, D = k_cache.shape
    max_blocks = -(-Smax // block_size)
    need = [-(-int(n) // block_size) for n in lens_after]
    num_blocks = sum(need) + spare
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    pool = torch.full((num_blocks, block_size, Hk, D), float("nan"), dtype=k_cache.dtype, device=k_cache.device)
    table = torch.full((B, max_blocks), -1, dtype=torch.int32)
    it = iter(perm)
    for b in range(B):
        for j in range(need[b]):
            blk = next(it)
            table[b, j] = blk
    for b in range(B):
        for j in range(need[b]):
            s0 = j * block_size
            n = min(block_size, int(lens_after[b]) - s0)
            pool[table[b, j], :n] = k_cache[b, s0:s0 + n]
    used = sorted(int(x) for x in table.flatten().tolist() if x >= 0)
    return pool, table.to(k_cache.device), used


def unpage(pool, table, lens):
    """The first lens[b] tokens of each row of a paged cache, as a list of `[L_b, Hk, D]`."""
    bs = pool.shape[1]
    rows = []
    for b, n in enumerate(lens):
        pos = torch.arange(int(n))
        rows.append(pool[table[b, pos // bs].long().cpu(), pos % bs])
    return rows


DECODE_CASES = [
    dict(B=3, Tq=1, H=4, Hk=2, D=16, Dv=16, Smax=40, lens=(0, 17, 33), append=True, window=(-1, -1), softcap=None),
    dict(B=3, Tq=1, H=4, Hk=2, D=16, Dv=16, Smax=40, lens=(0, 17, 33), append=True, window=(5, 0), softcap=None),
    dict(B=2, Tq=3, H=8, Hk=2, D=32, Dv=16, Smax=48, lens=(20, 45), append=True, window=(7, -1), softcap=2.0),
    dict(B=2, Tq=2, H=4, Hk=1, D=16, Dv=32, Smax=64, lens=(1, 60), append=False, window=(0, 0), softcap=1.0),
    dict(B=2, Tq=1, H=4, Hk=4, D=8, Dv=8, Smax=700, lens=(690, 3), append=True, window=(600, 0), softcap=None),
]


@pytest.mark.parametrize("block_size", [None, 1, 3, 16], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("c", _ids(DECODE_CASES))
def test_decode_window_softcap_paged_matches_oracle(c, block_size):
    """Every backend, contiguous and paged (shuffled blocks, NaN-poisoned unreferenced blocks),
    against the float64 oracle; the appended tokens land where they should and nothing else
    in the caches changes."""
    B, Tq, H, Hk, D, Dv, Smax = (c[n] for n in ("B", "Tq", "H", "Hk", "D", "Dv", "Smax"))
    q, kc, vc = rand(B, Tq, H, D), rand(B, Smax, Hk, D), rand(B, Smax, Hk, Dv)
    kn, vn = (rand(B, Tq, Hk, D), rand(B, Tq, Hk, Dv)) if c["append"] else (None, None)
    lens = lens_of(c["lens"])
    after = [n + (Tq if c["append"] else 0) for n in c["lens"]]
    # Golden: the full token lists after the append.
    k_rows, v_rows = [], []
    for b, n in enumerate(c["lens"]):
        k_rows.append(torch.cat([kc[b, :n], kn[b]]) if c["append"] else kc[b, :n])
        v_rows.append(torch.cat([vc[b, :n], vn[b]]) if c["append"] else vc[b, :n])
    golden = oracle_decode(q, k_rows, v_rows, after, window=c["window"], softcap=c["softcap"], scale=0.3)
    k_full = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, 0, 0, Smax - r.shape[0])) for r in k_rows])
    v_full = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, 0, 0, Smax - r.shape[0])) for r in v_rows])

    for backend in decode_backends():
        for dtype in ((F64, torch.float32) if backend == "reference" else (torch.float32, torch.float16)):
            cast = (lambda x: None if x is None else x.to(dtype))
            if block_size is None:
                k_in, v_in, table = cast(kc).clone(), cast(vc).clone(), None
                # poison everything past the row lengths (after the append): never read
                for b, n in enumerate(after):
                    k_in[b, n:], v_in[b, n:] = float("nan"), float("nan")
            else:
                # the table already holds the blocks the appended tokens go to
                k_in, table, used = paged_copy(cast(kc), after, block_size)
                v_in, _, _ = paged_copy(cast(vc), after, block_size)
                if c["append"]:  # the slots of the new tokens start as NaN: the append fills them
                    for b, n in enumerate(c["lens"]):
                        pos = torch.arange(n, n + Tq)
                        k_in[table[b, pos // block_size].long(), pos % block_size] = float("nan")
                        v_in[table[b, pos // block_size].long(), pos % block_size] = float("nan")
            k_before, v_before = k_in.clone(), v_in.clone()
            try:
                o = attnkit.attention_decode(cast(q), k_in, v_in, lens, k_new=cast(kn), v_new=cast(vn), scale=0.3,
                                             window=c["window"], softcap=c["softcap"], block_table=table,
                                             backend=backend)
            except BackendUnavailable as e:
                # Only a clear refusal of a feature this backend lacks is acceptable.
                lacking = [f for f in ("window", "softcap", "paged") if f"'{f}' is not supported yet" in str(e)]
                assert backend == "triton" and lacking, str(e)
                continue
            assert not o.isnan().any(), f"{backend} {dtype}: NaN leaked from an unread slot"
            if dtype == F64:
                close64(o, golden)
            else:
                # the same-dtype reference over the same tokens (contiguous, already appended)
                ref = attnkit.attention_decode(cast(q), cast(k_full), cast(v_full), lens_of(after), scale=0.3,
                                               window=c["window"], softcap=c["softcap"], backend="reference")
                assert_close_to_golden(f"{backend} {dtype}", o, ref, golden)
            # caches: the new tokens where they belong, every other element unchanged (NaN stays NaN)
            if block_size is None:
                k_want, v_want = k_before.clone(), v_before.clone()
                if c["append"]:
                    for b, n in enumerate(c["lens"]):
                        k_want[b, n:n + Tq], v_want[b, n:n + Tq] = cast(kn[b]), cast(vn[b])
            else:
                k_want, v_want = k_before.clone(), v_before.clone()
                if c["append"]:
                    for b, n in enumerate(c["lens"]):
                        pos = torch.arange(n, n + Tq)
                        k_want[table[b, pos // block_size].long(), pos % block_size] = cast(kn[b])
                        v_want[table[b, pos // block_size].long(), pos % block_size] = cast(vn[b])
            assert torch.equal(k_in.nan_to_num(7.0), k_want.nan_to_num(7.0)), f"{backend}: k_cache"
            assert torch.equal(v_in.nan_to_num(7.0), v_want.nan_to_num(7.0)), f"{backend}: v_cache"
            assert lens.tolist() == list(c["lens"])


def test_paged_decode_equals_contiguous_decode_on_every_backend():
    B, Tq, H, Hk, D, Smax, bs = 4, 1, 8, 2, 32, 96, 16
    q, kc, vc = rand(B, Tq, H, D, dtype=torch.float32), rand(B, Smax, Hk, D, dtype=torch.float32), \
        rand(B, Smax, Hk, D, dtype=torch.float32)
    lens = lens_of([95, 0, 40, 64])
    for backend in decode_backends():
        contiguous = attnkit.attention_decode(q, kc, vc, lens, window=(31, 0), softcap=5.0, backend="reference")
        pool_k, table, _ = paged_copy(kc, [95, 0, 40, 64], bs, seed=3)
        pool_v, _, _ = paged_copy(vc, [95, 0, 40, 64], bs, seed=3)
        try:
            paged = attnkit.attention_decode(q, pool_k, pool_v, lens, window=(31, 0), softcap=5.0, block_table=table,
                                             backend=backend)
        except BackendUnavailable as e:
            assert backend == "triton" and "is not supported yet" in str(e), str(e)
            continue
        torch.testing.assert_close(paged, contiguous, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ bad arguments


def _decode_args(paged=False):
    q = rand(2, 1, 4, 8)
    if paged:
        kc, vc = rand(6, 4, 2, 8), rand(6, 4, 2, 8)
        table = torch.tensor([[3, 0, -1], [5, 1, 2]], dtype=torch.int32, device=DEVICE)
    else:
        kc, vc, table = rand(2, 12, 2, 8), rand(2, 12, 2, 8), None
    return q, kc, vc, lens_of([5, 9]), rand(2, 1, 2, 8), rand(2, 1, 2, 8), table


BAD = [
    # (label, overrides, exception, words the message must contain)
    ("window-int", dict(window=4), TypeError, ["window", "pair of ints"]),
    ("window-3", dict(window=(1, 2, 3)), TypeError, ["window"]),
    ("window-float", dict(window=(1.0, 0)), TypeError, ["window"]),
    ("window-neg", dict(window=(-2, 0)), ValueError, ["window", ">= 0", "-1"]),
    ("softcap-neg", dict(softcap=-1.0), ValueError, ["softcap", "-1.0"]),
    ("softcap-nan", dict(softcap=float("nan")), ValueError, ["softcap"]),
    ("softcap-inf", dict(softcap=float("inf")), ValueError, ["softcap"]),
    ("softcap-bool", dict(softcap=True), TypeError, ["softcap", "bool"]),
    ("softcap-str", dict(softcap="1"), TypeError, ["softcap", "str"]),
]


@pytest.mark.parametrize("label,over,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_window_softcap_rejected(label, over, exc, words):
    q, k, v = rand(1, 4, 2, 8), rand(1, 4, 2, 8), rand(1, 4, 2, 8)
    with pytest.raises(exc) as e:
        attnkit.attention(q, k, v, **over)
    assert all(w in str(e.value) for w in words), str(e.value)
    q, kc, vc, lens, kn, vn, _ = _decode_args()
    k0, v0 = kc.clone(), vc.clone()
    with pytest.raises(exc):
        attnkit.attention_decode(q, kc, vc, lens, k_new=kn, v_new=vn, **over)
    assert torch.equal(kc, k0) and torch.equal(vc, v0)


BAD_TABLES = [
    ("int64", lambda t: t.long(), TypeError, ["block_table", "int32", "int64"]),
    ("1d", lambda t: t[0], ValueError, ["block_table", "[B, max_blocks]"]),
    ("batch", lambda t: t[:1], ValueError, ["block_table", "B = 2"]),
    ("out-of-range", lambda t: torch.tensor([[3, 6, -1], [5, 1, 2]], dtype=torch.int32), ValueError,
     ["block_table[0, 1] = 6", "0..5"]),
    ("negative-used", lambda t: torch.tensor([[3, -1, -1], [5, 1, 2]], dtype=torch.int32), ValueError,
     ["block_table[0, 1] = -1"]),
    ("capacity", lambda t: t[:, :2], ValueError, ["cache_seqlens", "0..8", "max_blocks * block_size"]),
    ("shared-append-slot", lambda t: torch.tensor([[3, 1, -1], [5, 0, 1]], dtype=torch.int32), ValueError,
     ["same cache slot"]),
    ("not-a-tensor", lambda t: t.tolist(), TypeError, ["block_table", "torch.Tensor"]),
]


@pytest.mark.parametrize("label,make,exc,words", BAD_TABLES, ids=[b[0] for b in BAD_TABLES])
def test_bad_block_table_rejected_and_nothing_modified(label, make, exc, words):
    q, kc, vc, lens, kn, vn, table = _decode_args(paged=True)
    bad = make(table.cpu())
    bad = bad.to(DEVICE) if isinstance(bad, torch.Tensor) else bad
    k0, v0 = kc.clone(), vc.clone()
    with pytest.raises(exc) as e:
        attnkit.attention_decode(q, kc, vc, lens, k_new=kn, v_new=vn, block_table=bad)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert torch.equal(kc, k0) and torch.equal(vc, v0)


def test_paged_append_past_the_table_capacity_rejected():
    q, kc, vc, lens, kn, vn, table = _decode_args(paged=True)
    k0 = kc.clone()
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] \+ Tq = 9 tokens do not fit in block_table row 1"):
        attnkit.attention_decode(q, kc, vc, lens_of([5, 8]), k_new=kn, v_new=vn, block_table=table[:, :2].contiguous())
    assert torch.equal(kc, k0)


def test_paged_cache_shapes_checked():
    q, kc, vc, lens, kn, vn, table = _decode_args(paged=True)
    with pytest.raises(ValueError, match="v_cache.*num_blocks"):
        attnkit.attention_decode(q, kc, vc[:5], lens, block_table=table)
    with pytest.raises(ValueError, match="v_cache.*block_size"):
        attnkit.attention_decode(q, kc, vc[:, :3], lens, block_table=table)
    with pytest.raises(ValueError, match="cache_seqlens"):
        attnkit.attention_decode(q, kc, vc, lens_of([5, 13]), block_table=table)  # capacity 12
    # a valid call: rows share no append slot, unused entries hold -1
    o = attnkit.attention_decode(q, kc, vc, lens, k_new=kn, v_new=vn, block_table=table)
    assert o.shape == (2, 1, 4, 8)


def test_feature_tags_and_triton_refusal_helper():
    """The tags backends refuse by, and the refusal the triton registration uses for a feature
    its kernels lack (none at present: ATTENTION_LACKS / DECODE_LACKS are empty)."""
    from attnkit.ops.softmax import triton_register
    q, kc, vc, lens, kn, vn, table = _decode_args(paged=True)
    inputs = attnkit.ops.softmax.api._prepare_attention_decode(q.float(), kc.float(), vc.float(), lens,
                                                              window=(3, 0), softcap=1.0, block_table=table).inputs
    assert {"window", "softcap", "paged", "block_size=4"} <= inputs.features
    reasons = list(triton_register._not_yet("attention_decode", ("window", "softcap", "paged"))(inputs))
    assert [r.split("'")[1] for r in reasons] == ["window", "softcap", "paged"]
    assert all("not supported yet by the triton attention_decode kernel" in r for r in reasons)
    q2, kc2, vc2, lens2, _, _, _ = _decode_args()
    plain = attnkit.ops.softmax.api._prepare_attention_decode(q2.float(), kc2.float(), vc2.float(), lens2).inputs
    assert not list(triton_register._not_yet("attention_decode", ("window", "softcap", "paged"))(plain))
    for lacking, op in ((triton_register.DECODE_LACKS, "attention_decode"),
                        (triton_register.ATTENTION_LACKS, "attention")):
        impl = attnkit.dispatch.registered(op)["triton"]
        got = " ".join(impl.check(inputs))
        assert all(f"'{f}' is not supported yet" in got for f in lacking)


# ------------------------------------------- kernels against the float64 golden (fwd and grads)


KERNEL_ATT_CASES = [
    dict(B=2, T=70, S=70, H=4, Hk=2, D=32, causal=True, window=(16, 0), softcap=None, qk_norm=None),
    dict(B=1, T=45, S=90, H=4, Hk=1, D=32, causal=False, window=(20, 7), softcap=3.0, qk_norm="rms"),
    dict(B=2, T=64, S=64, H=2, Hk=2, D=16, causal=True, window=(-1, -1), softcap=1.5, qk_norm=None),
    dict(B=1, T=80, S=40, H=2, Hk=1, D=16, causal=True, window=(5, 0), softcap=2.0, qk_norm=None),  # empty rows
]


@pytest.mark.parametrize("c", _ids(KERNEL_ATT_CASES))
def test_triton_attention_window_softcap_against_golden(c):
    """Triton (GPU, or the interpreter on CPU) against the float64 reference, forward and every
    gradient; while the kernel lacks a feature it must refuse it by name instead."""
    if not (DEVICE == "cuda" or interpreted()):
        pytest.skip("triton runs CPU tensors only under TRITON_INTERPRET=1")
    from attnkit.ops.softmax import triton_register  # noqa: F401

    from .harness import compare_op

    q64, k64, v64 = rand(c["B"], c["T"], c["H"], c["D"]), rand(c["B"], c["S"], c["Hk"], c["D"]), \
        rand(c["B"], c["S"], c["Hk"], c["D"])
    w64 = rand(c["D"]) if c["qk_norm"] else None

    def make_args(dt):
        leaves = [x.detach().to(dt).requires_grad_(True) for x in (q64, k64, v64)]
        kw = dict(causal=c["causal"], window=c["window"], softcap=c["softcap"], return_lse=True)
        if c["qk_norm"]:
            kw.update(qk_norm=c["qk_norm"], q_norm_weight=w64.float().requires_grad_(True))
        return tuple(leaves), kw

    args, kw = make_args(torch.float32)
    exp = attnkit.explain("attention", *args, backend="triton", **kw)
    if exp.backend is None:
        reasons = " ".join(exp.refusals.get("triton", []))
        assert "is not supported yet" in reasons, reasons
        return
    compare_op(attnkit.attention, make_args, torch.float32, "triton", grad=True, output_names=["o", "lse"])
