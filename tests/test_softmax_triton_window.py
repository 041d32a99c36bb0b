"""Sliding windows and logit softcapping in the Triton `attention` kernels (forward and every
gradient), against an explicit float64 masked-softmax oracle written here.

The kernels are called through the backend entry point (`triton_attention.attention`, the
function the dispatcher calls with the normalised `window=`/`softcap=` kwargs), so these tests do
not depend on the public op's argument handling. Each case runs the oracle in float64 (golden), the
oracle in float32 on inputs rounded to the test dtype (what the reference backend does), and the
kernel; the kernel's error must be within 2x the same-dtype oracle's (harness rule). Outputs start
as NaN (`nan_empty`). A second group proves that tiles outside every window are never loaded:
NaN-poisoned keys/queries there leave the result finite and exact.
"""

import pytest
import torch

from attnkit.ops.softmax import triton_attention as ta

from .harness import DEVICE, assert_close_to_golden, kernel_dtypes, params

F64 = torch.float64


def oracle(q, k, v, *, causal, scale, window, softcap, norm=None, q_w=None, k_w=None, eps=1e-6,
           cu_q=None, cu_k=None):
    """Masked softmax attention, flash-attn window semantics, computed in float64 for float64
    inputs and in float32 otherwise; returns (o in q's dtype, lse float32/float64)."""
    cdt = F64 if q.dtype == F64 else torch.float32
    B, T, H, _ = q.shape
    S, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    if norm is not None:
        def nrm(x, w):
            ss = x.square().mean(-1, keepdim=True) if norm == "rms" else x.square().sum(-1, keepdim=True)
            y = x * torch.rsqrt(ss + eps)
            return y * w.to(cdt) if w is not None else y
        qc, kc = nrm(qc, q_w), nrm(kc, k_w)
    sc = scale.to(cdt) if isinstance(scale, torch.Tensor) else scale
    bounds = ([(0, T, 0, S)] * B if cu_q is None else
              [(int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])) for i in range(len(cu_q) - 1)])
    o_parts, lse_parts = [], []
    for i, (q0, q1, k0, k1) in enumerate(bounds):
        b = i if cu_q is None else 0
        qi, ki, vi = qc[b, q0:q1], kc[b, k0:k1], vc[b, k0:k1]  # [t, H, D], [s, Hk, D]
        t_len, s_len = q1 - q0, k1 - k0
        ki, vi = ki.repeat_interleave(G, 1), vi.repeat_interleave(G, 1)
        z = torch.einsum("thd,shd->hts", qi, ki) * sc
        if softcap > 0:
            z = softcap * torch.tanh(z / softcap)
        p_pos = torch.arange(t_len, device=q.device)[:, None] + s_len - t_len
        s_pos = torch.arange(s_len, device=q.device)[None, :]
        vis = torch.ones(t_len, s_len, dtype=torch.bool, device=q.device)
        if window[0] >= 0:
            vis &= s_pos >= p_pos - window[0]
        if window[1] >= 0:
            vis &= s_pos <= p_pos + window[1]
        if causal:
            vis &= s_pos <= p_pos
        empty = ~vis.any(1)  # [t]
        z = z.masked_fill(~vis, float("-inf")).masked_fill(empty[:, None], 0.)
        lse = torch.logsumexp(z, -1)  # [H, t]
        p = torch.exp(z - lse[..., None]).masked_fill(~vis, 0.)
        o_parts.append(torch.einsum("hts,shd->thd", p, vi))
        lse_parts.append(lse.masked_fill(empty, float("-inf")))
    if cu_q is None:
        o, lse = torch.stack(o_parts), torch.stack(lse_parts)
    else:
        o, lse = torch.cat(o_parts)[None], torch.cat(lse_parts, 1)[None]
    return o.to(q.dtype), lse


def _kernel(q, k, v, **kw):
    return ta.attention(q, k, v, kw["causal"], kw["scale"], kw.get("norm"), kw.get("q_w"), kw.get("k_w"),
                        kw.get("eps", 1e-6), kw.get("cu_q"), kw.get("cu_k"), True,
                        window=kw["window"], softcap=kw["softcap"])


def _leaf(x, dt):
    return None if x is None else x.detach().to(dt).clone().requires_grad_(True)


def _compare(dtype, data, kw, aux=()):
    """Golden (float64 oracle), ref (oracle at dtype) and kernel at dtype: outputs and gradients
    of every input (q, k, v and the tensors named in `aux`) under random cotangents on o and lse."""
    runs = {}
    for key, dt, fn in (("golden", F64, oracle), ("ref", dtype, oracle), ("out", dtype, _kernel)):
        leaves = {n: _leaf(x, dt) for n, x in data.items()}
        args = {**kw, **{n: leaves[n] for n in aux}}
        if "scale" in leaves:
            args["scale"] = leaves["scale"] if dt == F64 else leaves["scale"].float().detach().requires_grad_()
            leaves["scale"] = args["scale"]
        o, lse = fn(leaves["q"], leaves["k"], leaves["v"], **args)
        runs[key] = (o, lse, leaves)
    gold_o, gold_lse, _ = runs["golden"]
    assert_close_to_golden("o", runs["out"][0], runs["ref"][0], gold_o)
    assert_close_to_golden("lse", runs["out"][1], runs["ref"][1].float(), gold_lse)
    gen = torch.Generator().manual_seed(7)
    cot_o = torch.randn(gold_o.shape, generator=gen, dtype=F64).to(DEVICE)
    cot_l = torch.randn(gold_lse.shape, generator=gen, dtype=F64).to(DEVICE)
    cot_l = cot_l.masked_fill(torch.isinf(gold_lse), 0.)  # rows without keys: lse = -inf, no gradient
    names = [n for n in runs["golden"][2] if n in ("q", "k", "v") or n in aux or n == "scale"]
    grads = {}
    for key, (o, lse, leaves) in runs.items():
        lse_f = lse.masked_fill(torch.isinf(gold_lse), 0.)
        total = (o.to(F64) * cot_o).sum() + (lse_f.to(F64) * cot_l).sum()
        grads[key] = torch.autograd.grad(total, [leaves[n] for n in names])
    for j, n in enumerate(names):
        ref_g = grads["ref"][j]
        assert_close_to_golden(f"d{n}", grads["out"][j].to(ref_g.dtype), ref_g, grads["golden"][j])


def _data(*shape):
    return torch.randn(*shape, dtype=F64, device=DEVICE)


# (left, right) windows with causal and not; softcap off, mild and strong; odd lengths, T < S,
# T > S (rows without keys), GQA ratios 1, 2, 3 and all; QK-norm with weights; a tensor scale.
WINDOW_CASES = params([
    dict(T=77, S=77, H=2, Hk=2, D=32, causal=1, win=(16, -1), cap=0.0, norm=None, tscale=0),
    dict(T=50, S=70, H=4, Hk=2, D=32, causal=0, win=(9, 5), cap=2.0, norm=None, tscale=1),
    dict(T=70, S=45, H=4, Hk=1, D=16, causal=1, win=(7, 3), cap=0.0, norm=None, tscale=0),
    dict(T=45, S=60, H=3, Hk=1, D=48, causal=0, win=(-1, 4), cap=0.5, norm="rms", tscale=0),
    dict(T=60, S=60, H=2, Hk=1, D=32, causal=0, win=(0, 0), cap=0.0, norm="l2", tscale=1),
    dict(T=33, S=90, H=2, Hk=2, D=32, causal=1, win=(-1, -1), cap=5.0, norm="rms", tscale=1),
    dict(T=66, S=66, H=4, Hk=2, D=64, causal=0, win=(20, -1), cap=0.0, norm=None, tscale=0),
])


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("case", WINDOW_CASES)
def test_window_softcap(case, dtype, nan_empty):
    T, S, H, Hk, D = (case[n] for n in ("T", "S", "H", "Hk", "D"))
    data = dict(q=_data(1, T, H, D), k=_data(1, S, Hk, D), v=_data(1, S, Hk, D))
    aux = []
    if case["norm"] == "rms":
        data.update(q_w=_data(D) * 0.5 + 1, k_w=_data(D) * 0.5 + 1)
        aux = ["q_w", "k_w"]
    if case["tscale"]:
        data["scale"] = torch.tensor(0.4, dtype=F64, device=DEVICE)
    kw = dict(causal=bool(case["causal"]), scale=0.3, window=case["win"], softcap=case["cap"], norm=case["norm"])
    _compare(dtype, data, kw, aux)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_window_softcap_varlen(causal, nan_empty):
    # one empty sequence, one with T > S, lengths that are not tile multiples; GQA 2
    cu_q, cu_k = [0, 17, 17, 80, 100, 141], [0, 30, 31, 94, 94, 170]
    H, Hk, D = 4, 2, 32
    data = dict(q=_data(1, cu_q[-1], H, D), k=_data(1, cu_k[-1], Hk, D), v=_data(1, cu_k[-1], Hk, D),
                q_w=_data(D) * 0.5 + 1, k_w=_data(D) * 0.5 + 1)
    kw = dict(causal=causal, scale=0.3, window=(12, 6), softcap=3.0, norm="rms",
              cu_q=torch.tensor(cu_q, dtype=torch.int32, device=DEVICE),
              cu_k=torch.tensor(cu_k, dtype=torch.int32, device=DEVICE))
    _compare(torch.float32, data, kw, ["q_w", "k_w"])


def test_no_window_equals_plain():
    # window (-1, -1) and softcap 0 are the plain kernel bit for bit; so is a window wider than S
    q, k, v = _data(1, 40, 2, 32).float(), _data(1, 50, 1, 32).float(), _data(1, 50, 1, 32).float()
    plain = ta.attention(q, k, v, True, 0.3, None, None, None, 1e-6, None, None, True)
    wide = ta.attention(q, k, v, True, 0.3, None, None, None, 1e-6, None, None, True, window=(1000, 1000),
                        softcap=0.0)
    for a, b in zip(plain, wide):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------ tiles outside a window

# Tiles are at most 128 keys/rows on any device, so 128-aligned regions are whole tiles.
TILE = 128


def _poisoned_forward_case(dtype):
    torch.manual_seed(3)
    T = S = 3 * TILE + 64
    q, k, v = (torch.randn(1, T, 1, 16, device=DEVICE).to(dtype) for _ in range(3))
    return T, q, k, v


@pytest.mark.parametrize("dtype", [torch.float32])
def test_keys_outside_every_window_are_never_read(dtype):
    # causal window of 64 keys: a block of rows starting at t0 >= 2*TILE needs keys >= TILE + 64
    # only, so with keys [0, TILE) poisoned (NaN in K and V) the rows t >= 2*TILE must stay finite
    # and exact for any power-of-two tiles <= TILE. A kernel that loaded the poisoned tiles and
    # masked them would turn them into NaN (0 · NaN in P·V).
    T, q, k, v = _poisoned_forward_case(dtype)
    kw = dict(causal=True, scale=0.2, window=(64, 0), softcap=0.0)
    ref_o, ref_lse = oracle(q, k, v, **kw)
    kp, vp = k.clone(), v.clone()
    kp[:, :TILE] = float("nan")
    vp[:, :TILE] = float("nan")
    qg = q.clone().requires_grad_()
    o, lse = _kernel(qg, kp, vp, **kw)
    far = 2 * TILE
    assert bool(torch.isfinite(o[:, far:]).all()) and bool(torch.isfinite(lse[..., far:]).all())
    torch.testing.assert_close(o[:, far:], ref_o[:, far:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[..., far:], ref_lse[..., far:].float(), rtol=1e-5, atol=1e-5)
    # dq of the far rows never touches the poisoned keys either (upstream gradient only there)
    do = torch.zeros_like(o)
    do[:, far:] = 1.
    (dq,) = torch.autograd.grad(o, [qg], do)
    assert bool(torch.isfinite(dq[:, far:]).all())


def test_queries_outside_every_window_are_never_read():
    # dk/dv of keys [0, TILE) under a causal window of 64 come from rows t < TILE + 64 only:
    # NaN-poisoned queries (and their upstream gradients) at t >= 3*TILE must not reach them
    T, q, k, v = _poisoned_forward_case(torch.float32)
    kw = dict(causal=True, scale=0.2, window=(64, 0), softcap=0.0)
    do = torch.randn(q.shape[:-1] + (v.shape[-1],), device=DEVICE)
    k64, v64 = k.double().requires_grad_(), v.double().requires_grad_()
    dk, dv = torch.autograd.grad(oracle(q.double(), k64, v64, **kw)[0], [k64, v64], do.double())
    qp = q.clone()
    qp[:, 3 * TILE:] = float("nan")
    dop = do.clone()
    dop[:, 3 * TILE:] = float("nan")
    kg, vg = k.clone().requires_grad_(), v.clone().requires_grad_()
    o, _ = _kernel(qp, kg, vg, **kw)
    dk2, dv2 = torch.autograd.grad(o, [kg, vg], dop)
    assert bool(torch.isfinite(dk2[:, :TILE]).all()) and bool(torch.isfinite(dv2[:, :TILE]).all())
    torch.testing.assert_close(dk2[:, :TILE], dk[:, :TILE].float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dv2[:, :TILE], dv[:, :TILE].float(), rtol=1e-4, atol=1e-4)


def test_tanh_helper_is_accurate_and_odd():
    """The kernels' float32 `tanh` (exp2 forms, no libdevice) against float64 torch.tanh: absolute
    error within 2 ulp of 1 everywhere, relative error within 4 ulp near 0 (where the softcap's
    logits are small), odd to rounding, saturating to +-1 for huge and infinite inputs."""
    import triton
    import triton.language as tl

    @triton.jit
    def tanh_kernel(x, y, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y + o, ta.tanh(tl.load(x + o, mask=o < n, other=0.)), mask=o < n)

    pos = torch.cat([torch.logspace(-30, 2, 3001, dtype=F64), torch.linspace(0, 20, 2001, dtype=F64),
                     torch.tensor([0.25, 0.2499999, 0.2500001, 15., 16., 1e30], dtype=F64)])
    x32 = torch.cat([pos, -pos]).float()
    x = torch.cat([x32, torch.tensor([float("inf"), float("-inf")])]).to(DEVICE)
    y = torch.full_like(x, float("nan"))
    tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    y = y.cpu().double()
    want = torch.tanh(x.cpu().double())
    eps = torch.finfo(torch.float32).eps
    assert torch.isfinite(y).all()
    assert (y - want).abs().max() <= 2 * eps
    small = x.cpu().abs() < 0.25
    assert ((y - want).abs() / want.abs().clamp_min(1e-300))[small & (x.cpu() != 0)].max() <= 4 * eps
    n = pos.numel()
    assert (y[:n] + y[n:2 * n]).abs().max() <= 2 * eps  # odd to rounding (each sign has its own exp2)
    assert y[-2] == 1. and y[-1] == -1.


# ------------------------------------------------------------------------------ configs and prune


def test_shared_memory_prune_is_device_aware():
    import triton

    cfgs = [triton.Config({"BM": bm, "BN": bn}, num_warps=8, num_stages=s)
            for bm in (64, 128) for bn in (64, 128) for s in (2, 3, 4)]
    for cap, limit in (((8, 0), 166_912), ((9, 0), 232_448), ((8, 9), 101_376)):
        assert ta.smem_limit(cap) == limit
        for BD in (64, 128, 256):
            kept = ta.prune_fwd(cfgs, BD, BD, 2, cap)
            assert kept and all(ta.fwd_smem_bytes(c, BD, BD, 2) <= limit for c in kept)
            outer = ta.bwd_outer_tile(BD, BD, 2)
            bcfgs = [triton.Config({"BM": n}, num_warps=8, num_stages=s) for n in (16, 32, 64) for s in (2, 3)]
            kept = ta.prune_bwd(bcfgs, outer, BD, BD, 2, cap)
            assert kept and all(ta.bwd_smem_bytes(c, outer, BD, BD, 2) <= limit for c in kept)
    # sm_90 keeps strictly more forward configs than sm_80 at head dim 128
    assert len(ta.prune_fwd(cfgs, 128, 128, 2, (9, 0))) > len(ta.prune_fwd(cfgs, 128, 128, 2, (8, 0)))


def test_forward_prune_drops_the_configs_the_sm90_audit_found_spilling(monkeypatch):
    """GPU config list (not the interpreter's): at 4 warps the register estimate carries
    FWD_4WARP_REGS, which drops the configs that spilled on sm_90 (64x64/D128/s3: 44 B,
    64x128/D64/s3: 56 B) and keeps the 4-warp ones that did not; 64x32 on 8 warps is a fallback
    only (Triton 3.6's ptxas crashes on it at D64), kept where nothing else fits."""
    monkeypatch.setattr(ta, "interpreted", lambda: False)
    cfgs = ta.fwd_configs()

    def kept(BD, elsize, cap):
        return {(c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages) for c in ta.prune_fwd(cfgs, BD, BD, elsize, cap)}

    sm90_128, sm90_64 = kept(128, 2, (9, 0)), kept(64, 2, (9, 0))
    assert (64, 64, 4, 3) not in sm90_128 and (64, 32, 4, 2) in sm90_128 and (128, 64, 8, 3) in sm90_128
    assert (64, 128, 4, 3) not in sm90_64 and (64, 64, 4, 3) in sm90_64 and (128, 128, 8, 2) in sm90_64
    assert (64, 32, 8, 2) not in sm90_64 | sm90_128 | kept(128, 2, (8, 0))
    assert kept(256, 2, (8, 0)) == {(64, 32, 8, 2)}  # the only config that fits: kept


def test_backward_prune_counts_window_and_softcap(monkeypatch):
    """GPU config list: a left window bound and a softcap each add BWD_FEATURE_REGS to the
    backward estimate; with both, the dq configs at the register edge on sm_90 (D64 inner 32 on 4
    warps: 24 B spilled under Triton 3.6; D128 inner 64 / w8 / s2: 254 registers) are dropped, while
    plain causal calls and either feature alone keep every config they had."""
    monkeypatch.setattr(ta, "interpreted", lambda: False)
    cfgs = ta.bwd_configs("BN")

    def kept(BD, features):
        outer = ta.bwd_outer_tile(BD, BD, 2)
        return {(c.kwargs["BN"], c.num_warps, c.num_stages)
                for c in ta.prune_bwd(cfgs, outer, BD, BD, 2, (9, 0), dkdv=False, features=features)}

    for BD, edge in ((64, (32, 4, 2)), (128, (64, 8, 2))):
        assert kept(BD, 0) == kept(BD, 1) and edge in kept(BD, 0)
        assert kept(BD, 2) == kept(BD, 0) - {edge}
    base = dict(HAS_WR=True, NORM=0)
    assert ta._bwd_features({**base, "HAS_WL": False, "SOFTCAP": False}) == 0  # causal alone
    assert ta._bwd_features({**base, "HAS_WL": True, "SOFTCAP": True}) == 2


def test_dkdv_key_tile_is_arch_aware_and_independent_of_dq(monkeypatch):
    """Before sm_90 the dk/dv programs own 64 keys at head dims above 64 (128 spilled on sm_80);
    sm_90 and small head dims keep the shared outer tile. The launcher sizes the dk/dv grid by its
    own tile: a dk/dv key tile unlike the dq row tile gives the same gradients."""
    assert ta.bwd_dkdv_tile(128, 128, 128, (8, 0)) == 64
    assert ta.bwd_dkdv_tile(128, 128, 128, (8, 6)) == 64
    assert ta.bwd_dkdv_tile(128, 128, 128, (9, 0)) == 128
    assert ta.bwd_dkdv_tile(128, 64, 64, (8, 0)) == 128
    assert ta.bwd_dkdv_tile(64, 256, 256, (8, 0)) == 64
    assert ta.bwd_dkdv_tile(32, 128, 128, None) == 32
    q, k, v = (_data(1, 70, 4, 32).float(), _data(1, 70, 2, 32).float(), _data(1, 70, 2, 32).float())
    do = _data(1, 70, 4, 32).float()

    def grads():
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        o = ta.attention(*leaves, True, 0.3, None, None, None, 1e-6, None, None, False, window=(20, 0), softcap=3.0)
        return torch.autograd.grad(o, leaves, do)

    base = grads()
    outer = ta.bwd_outer_tile(32, 32, 4)
    monkeypatch.setattr(ta, "bwd_dkdv_tile", lambda tile, BD, BDV, cap: tile // 2)
    half = grads()
    assert outer // 2 >= 16
    for name, a, b in zip(("dq", "dk", "dv"), base, half):
        torch.testing.assert_close(b, a, msg=name)


def test_length_bucket_is_coarse():
    assert ta.len_bucket(1) == ta.len_bucket(100) == ta.len_bucket(1025) == ta.len_bucket(2048)
    assert ta.len_bucket(2049) == ta.len_bucket(16384) != ta.len_bucket(16385)
    assert ta.len_bucket(16385) == ta.len_bucket(1 << 20)
