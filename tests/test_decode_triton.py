"""Triton decode kernel: sliding window, softcap and the paged KV cache (issue 15), launch plan.

The kernel entry (`attnkit.ops.softmax.triton_decode.attention_decode`, the backend function the
dispatcher calls with the prepare step's kwargs) is compared with a float64 oracle written here
from SPEC "Sliding window, softcap, paged KV cache" (golden: float64 inputs; same-dtype reference:
the oracle on inputs rounded to the test dtype, computed in float32), by the flash-attn criterion
of `harness.assert_close_to_golden`. A paged cache must give the contiguous result exactly (same
tiles, same order) with its blocks shuffled; blocks the table does not reference are NaN and must
stay NaN and never reach the output.
"""

import math

import pytest
import torch

from attnkit.ops.softmax import triton_decode

from .harness import DEVICE, assert_close_to_golden, interpreted, kernel_dtypes, params

F64 = torch.float64


def _data(*shape):
    return torch.randn(*shape, dtype=F64, device=DEVICE)


def oracle(q, k_cache, v_cache, lens, k_new, v_new, scale, window=(-1, -1), softcap=0.0, compute=F64):
    """SPEC semantics, one (row, step, head) at a time; appends into copies of the caches."""
    B, Tq, H, D = q.shape
    Hk, Dv = k_cache.shape[2], v_cache.shape[3]
    G = H // Hk
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    o = torch.zeros(B, Tq, H, Dv, dtype=compute, device=q.device)
    for b in range(B):
        L = int(lens[b])
        if k_new is not None:
            k_cache[b, L:L + Tq], v_cache[b, L:L + Tq] = k_new[b], v_new[b]
            L += Tq
        for t in range(Tq):
            p = L - Tq + t
            s = torch.arange(k_cache.shape[1], device=q.device)
            vis = (s <= p) & (s < L)
            if window[0] >= 0:
                vis &= s >= p - window[0]
            if window[1] >= 0:
                vis &= s <= p + window[1]
            if not bool(vis.any()):
                continue
            for h in range(H):
                kk = k_cache[b, vis, h // G].to(compute)
                vv = v_cache[b, vis, h // G].to(compute)
                logit = (kk @ q[b, t, h].to(compute)) * scale
                if softcap > 0:
                    logit = softcap * torch.tanh(logit / softcap)
                o[b, t, h] = torch.softmax(logit, 0) @ vv
    return o, k_cache, v_cache


def to_paged(cache, page, n_extra, gen):
    """`[B, Smax, Hk, D]` -> (`[num_blocks, page, Hk, D]` with shuffled blocks, NaN in the
    `n_extra` blocks nobody references, int32 table `[B, Smax // page]`)."""
    B, Smax = cache.shape[:2]
    nb = Smax // page
    total = B * nb + n_extra
    perm = torch.randperm(total, generator=gen)
    table = perm[:B * nb].view(B, nb).to(torch.int32)
    paged = torch.full((total, page, *cache.shape[2:]), float("nan"), dtype=cache.dtype)
    paged[table.flatten().long()] = cache.reshape(B * nb, page, *cache.shape[2:])
    return paged.to(DEVICE), table.to(DEVICE), perm[B * nb:].to(DEVICE)


def from_paged(paged, table):
    B, nb = table.shape
    return paged[table.flatten().long()].reshape(B, nb * paged.shape[1], *paged.shape[2:])


def _run(q, kc, vc, lens, kn, vn, scale, **kw):
    return triton_decode.attention_decode(q, kc, vc, lens, kn, vn, scale, **kw)


WINDOW_CASES = params([
    dict(B=3, Tq=1, Smax=100, H=4, Hk=1, D=32, Dv=32, lens=(0, 37, 99), append=1, window=(8, -1), softcap=0.0),
    dict(B=2, Tq=3, Smax=129, H=8, Hk=2, D=64, Dv=48, lens=(5, 126), append=1, window=(40, 0), softcap=30.0),
    dict(B=2, Tq=4, Smax=63, H=6, Hk=3, D=40, Dv=40, lens=(2, 63), append=0, window=(0, -1), softcap=0.0),
    dict(B=2, Tq=1, Smax=130, H=4, Hk=4, D=32, Dv=32, lens=(130, 17), append=0, window=(-1, -1), softcap=2.5),
    dict(B=1, Tq=5, Smax=100, H=16, Hk=1, D=32, Dv=32, lens=(60,), append=1, window=(33, 7), softcap=5.0),
])


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("case", WINDOW_CASES)
def test_decode_window_softcap_vs_float64_oracle(case, dtype, nan_empty):
    B, Tq, Smax, H, Hk, D, Dv = (case[n] for n in ("B", "Tq", "Smax", "H", "Hk", "D", "Dv"))
    q, kc, vc = _data(B, Tq, H, D), _data(B, Smax, Hk, D), _data(B, Smax, Hk, Dv)
    kn, vn = (_data(B, Tq, Hk, D), _data(B, Tq, Hk, Dv)) if case["append"] else (None, None)
    lens = torch.tensor(case["lens"], dtype=torch.int32, device=DEVICE)
    kw = dict(window=case["window"], softcap=case["softcap"])
    scale = 0.3
    golden, gk, gv = oracle(q, kc, vc, lens, kn, vn, scale, **kw)
    cast = [None if x is None else x.to(dtype) for x in (q, kc, vc, kn, vn)]
    ref = oracle(*cast[:3], lens, *cast[3:], scale, **kw, compute=torch.float32)[0].to(dtype)
    kc_d, vc_d = cast[1].clone(), cast[2].clone()
    out = _run(cast[0], kc_d, vc_d, lens, cast[3], cast[4], scale, **kw)
    assert_close_to_golden("o", out, ref, golden)
    torch.testing.assert_close(kc_d, gk.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(vc_d, gv.to(dtype), rtol=0, atol=0)
    assert lens.tolist() == list(case["lens"])


def test_window_skips_keys_outside_it():
    # keys outside the window are NaN: a kernel that read them (instead of skipping) would leak NaN
    B, Tq, Smax, H, Hk, D = 2, 2, 200, 4, 2, 32
    q, kc, vc = _data(B, Tq, H, D).float(), _data(B, Smax, Hk, D).float(), _data(B, Smax, Hk, D).float()
    lens = torch.tensor([150, 61], dtype=torch.int32, device=DEVICE)
    left = 20
    ref = oracle(q, kc, vc, lens, None, None, 0.2, window=(left, -1))[0].float()
    for b, L in enumerate(lens.tolist()):
        kc[b, :L - Tq - left] = float("nan")
        vc[b, :L - Tq - left] = float("nan")
        kc[b, L:], vc[b, L:] = float("nan"), float("nan")
    out = _run(q, kc, vc, lens, None, None, 0.2, window=(left, -1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


PAGED_CASES = params([
    dict(B=3, Tq=1, Smax=128, H=4, Hk=1, D=32, page=16, lens=(0, 37, 120), append=1, window=(-1, -1), softcap=0.0),
    dict(B=2, Tq=3, Smax=96, H=8, Hk=2, D=64, page=32, lens=(5, 93), append=1, window=(40, -1), softcap=20.0),
    dict(B=2, Tq=2, Smax=64, H=2, Hk=2, D=16, page=16, lens=(64, 3), append=0, window=(-1, -1), softcap=0.0),
    dict(B=2, Tq=1, Smax=48, H=4, Hk=2, D=32, page=1, lens=(47, 20), append=1, window=(9, -1), softcap=0.0),
])


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("case", PAGED_CASES)
def test_paged_equals_contiguous_with_shuffled_blocks(case, dtype, nan_empty):
    B, Tq, Smax, H, Hk, D, page = (case[n] for n in ("B", "Tq", "Smax", "H", "Hk", "D", "page"))
    gen = torch.Generator().manual_seed(7)
    q, kc, vc = (x.to(dtype) for x in (_data(B, Tq, H, D), _data(B, Smax, Hk, D), _data(B, Smax, Hk, D)))
    kn, vn = ((_data(B, Tq, Hk, D).to(dtype), _data(B, Tq, Hk, D).to(dtype)) if case["append"] else (None, None))
    lens = torch.tensor(case["lens"], dtype=torch.int32, device=DEVICE)
    # the contiguous tail past each row's length is NaN too: never read in either layout
    for b, L in enumerate(case["lens"]):
        kc[b, L + (Tq if case["append"] else 0):] = float("nan")
        vc[b, L + (Tq if case["append"] else 0):] = float("nan")
    kw = dict(window=case["window"], softcap=case["softcap"])
    pk, table, unused = to_paged(kc.cpu(), page, 3, gen)
    pv, _, _ = to_paged(vc.cpu(), page, 3, torch.Generator().manual_seed(7))
    kc_c, vc_c = kc.clone(), vc.clone()
    o_contig = _run(q, kc_c, vc_c, lens, kn, vn, 0.25, **kw)
    o_paged = _run(q, pk, pv, lens, kn, vn, 0.25, block_table=table, **kw)
    assert not torch.isnan(o_paged).any()
    torch.testing.assert_close(o_paged, o_contig, rtol=0, atol=0)
    # the append went through the table; unreferenced blocks untouched (still all NaN)
    torch.testing.assert_close(from_paged(pk, table), kc_c, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(from_paged(pv, table), vc_c, rtol=0, atol=0, equal_nan=True)
    assert bool(torch.isnan(pk[unused.long()]).all()) and bool(torch.isnan(pv[unused.long()]).all())
    golden = oracle(q.double(), kc.double(), vc.double(), lens, None if kn is None else kn.double(),
                    None if vn is None else vn.double(), 0.25, **kw)[0]
    ref = oracle(q, kc, vc, lens, kn, vn, 0.25, **kw, compute=torch.float32)[0].to(dtype)
    assert_close_to_golden("o", o_paged, ref, golden)


def test_paged_table_entries_past_the_length_are_not_read():
    # entries of the table past each row's blocks point at a NaN block (or out of range on the
    # device); they must be ignored
    B, Smax, H, Hk, D, page = 2, 64, 4, 2, 32, 16
    q, kc, vc = _data(B, 1, H, D).float(), _data(B, Smax, Hk, D).float(), _data(B, Smax, Hk, D).float()
    lens = torch.tensor([17, 32], dtype=torch.int32, device=DEVICE)
    pk, table, unused = to_paged(kc.cpu(), page, 1, torch.Generator().manual_seed(1))
    pv, _, _ = to_paged(vc.cpu(), page, 1, torch.Generator().manual_seed(1))
    ref = _run(q, kc, vc, lens, None, None, 0.2)
    table[0, 2:] = unused[0]
    table[1, 2:] = unused[0]
    out = _run(q, pk, pv, lens, None, None, 0.2, block_table=table)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_softcap_bounds_the_logits():
    # with a tiny cap every visible key gets nearly the same weight: the output is the mean of V
    q, kc, vc = _data(1, 1, 2, 16).float() * 100, _data(1, 40, 1, 16).float(), _data(1, 40, 1, 16).float()
    lens = torch.tensor([40], dtype=torch.int32, device=DEVICE)
    out = _run(q, kc, vc, lens, None, None, 1.0, softcap=1e-4)
    torch.testing.assert_close(out[0, 0], vc[0, :, 0].mean(0).expand(2, 16), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------ launch plan


def test_plan_fits_grid_limits_and_scales_with_window():
    for B, H, Hk in ((65536, 1, 1), (4096, 16, 16), (1, 32, 8)):
        plan = triton_decode.decode_plan(B, 1, H, Hk, 128, 128, 32768, 2)
        grid = plan["grid_fwd"] + (1, 1)
        assert grid[1] <= 65535 and grid[2] <= 65535 and grid[0] < 2 ** 31
    full = triton_decode.decode_plan(1, 1, 32, 8, 128, 128, 32768, 2)
    win = triton_decode.decode_plan(1, 1, 32, 8, 128, 128, 32768, 2, window_left=4096)
    assert full["n_splits"] * full["chunk"] >= 32768
    assert win["n_splits"] * win["chunk"] >= 4097 and win["n_splits"] * win["chunk"] < 32768 // 4


@pytest.mark.skipif(not interpreted(), reason="the plan's GPU configuration is checked statically below")
def test_plan_gpu_configuration(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = triton_decode.decode_plan(1, 1, 32, 8, 128, 128, 32768, 2, num_sms=132, smem=227 * 1024)
    assert p["BN"] == 128 and p["num_stages"] == 4 and p["BM"] == 16
    # B * Hk = 8 programs on 132 SMs: split until the waves are efficient
    waves = p["n_splits"] * 8 / 132
    assert p["n_splits"] > 1 and waves / math.ceil(waves) >= 0.8
    p80 = triton_decode.decode_plan(1, 1, 32, 8, 256, 256, 32768, 2, smem=163 * 1024)
    assert (p80["num_stages"] - 1) * p80["BN"] * 512 * 2 <= 163 * 1024 - 8 * 1024
    assert triton_decode.num_splits_heuristic(200, 132, 100) == 1
    # windowed bf16 D = 128: 8 warps for the 128-key tile (4 spill on sm_90 with triton 3.6)
    w = triton_decode.decode_plan(8, 1, 32, 8, 128, 128, 65536, 2, window_left=4096, smem=227 * 1024)
    assert (w["BN"], w["num_warps"]) == (128, 8)
    assert triton_decode.decode_plan(8, 1, 32, 8, 128, 128, 65536, 2, smem=227 * 1024)["num_warps"] == 4


def test_decode_kernels_are_not_autotuned():
    # no autotuner on the decode kernels: the launch never benchmarks (CUDA-graph capture safe)
    import triton

    for kern in (triton_decode._attention_decode_fwd_kernel, triton_decode._attention_decode_reduce_kernel,
                 triton_decode._kv_append_kernel):
        assert not isinstance(kern, triton.runtime.Autotuner)



# --------------------------------------------------------------- in-place steps: duplicate rows


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_step_duplicate_state_indices_rejected_and_state_unchanged(backend):
    # two batch rows updating one state row in place would race on a GPU: refused when value checks
    # run (CPU; CUDA with ATTNKIT_CHECKS=1), before anything is written
    import attnkit
    from attnkit.ops.linear import triton_register  # noqa: F401  (registers the triton backend)

    B, H, D = 3, 2, 16
    q, k, v = (torch.randn(B, 1, H, D, device=DEVICE) for _ in range(3))
    state = torch.randn(5, H, D, D, device=DEVICE)
    before = state.clone()
    idx = torch.tensor([4, 1, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="state_indices must not repeat"):
        attnkit.linear_attention_step(q, k, v, state, state_indices=idx, backend=backend)
    assert torch.equal(state, before)
    # distinct rows are accepted
    attnkit.linear_attention_step(q, k, v, state, state_indices=torch.tensor([4, 1, 0], dtype=torch.int32,
                                                                            device=DEVICE), backend=backend)
    assert torch.equal(state[[2, 3]], before[[2, 3]]) and not torch.equal(state[4], before[4])
