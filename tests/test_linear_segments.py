"""Sequence-parallel segments of the chunked linear/lightning Triton kernels.

The kernels cut every sequence into segments (local states, a scan over segments, per-segment
output and gradients). Real inputs get segments of >= 256 tokens; here `force_segment_len` cuts
tiny inputs into many odd-sized segments (not chunk multiples, shorter than a chunk, one token),
so the scan, the varlen segment table and the reverse gradient scan are all exercised against the
float64 reference. Also: the host plan's program counts (the GPU-occupancy contract).
"""

import pytest
import torch

import attnkit
from attnkit.ops.linear import triton_chunk, triton_register  # noqa: F401  (registers the triton backend)

from .harness import DEVICE, cast_input, clone_as, compare_op, params

BACKEND = "triton"


def _data(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE)


def _state(x64, dt):
    return None if x64 is None else clone_as(x64, torch.float64 if dt == torch.float64 else torch.float32,
                                             requires_grad=True)


def _decay(H):
    return (torch.rand(H, device=DEVICE) * 0.3 + 0.01).float()


class _Seg:
    """Runs the wrapped op with segments of `seg` tokens (the reference ignores it)."""

    def __init__(self, fn, seg):
        self.fn, self.seg = fn, seg

    def __call__(self, *args, **kw):
        with triton_chunk.force_segment_len(self.seg):
            return self.fn(*args, **kw)


CASES = params([
    dict(kind="lightning", B=2, T=45, H=4, Hk=2, Dk=32, Dv=48, seg=7, h0=1),
    dict(kind="lightning", B=1, T=70, H=2, Hk=2, Dk=16, Dv=16, seg=33, h0=0),
    dict(kind="lightning", B=1, T=29, H=2, Hk=1, Dk=160, Dv=144, seg=10, h0=1),  # dk/dv in two launches
    # GQA groups of 4 and 3 summed inside the dk/dv kernel: segments of several chunks (the running
    # per-head gradients cross chunks in their slots), one launch and two launches (scratch copy)
    dict(kind="lightning", B=1, T=77, H=8, Hk=2, Dk=32, Dv=32, seg=40, h0=1),
    dict(kind="lightning", B=2, T=70, H=6, Hk=2, Dk=80, Dv=96, seg=50, h0=1),
    dict(kind="linear", B=2, T=45, H=4, Hk=2, Dk=32, Dv=32, seg=1, h0=1, fm="elu", norm=1, causal=1),
    dict(kind="linear", B=1, T=61, H=2, Hk=1, Dk=32, Dv=16, seg=24, h0=1, fm="relu", norm=1, causal=1),
    dict(kind="linear", B=2, T=37, H=2, Hk=2, Dk=16, Dv=32, seg=9, h0=1, fm=None, norm=0, causal=1),
    dict(kind="linear", B=2, T=50, H=4, Hk=2, Dk=32, Dv=32, seg=11, h0=1, fm="elu", norm=1, causal=0),
    # dd = -(do·o)/d computed in the first backward pass over two Dv blocks of the state block
    dict(kind="linear", B=1, T=40, H=2, Hk=1, Dk=128, Dv=256, seg=24, h0=1, fm="elu", norm=1, causal=1),
])


@pytest.mark.parametrize("case", CASES)
def test_many_segments_match_reference(case, nan_empty):
    B, T, H, Hk, Dk, Dv = (case[n] for n in ("B", "T", "H", "Hk", "Dk", "Dv"))
    q, k, v = _data(B, T, H, Dk), _data(B, T, Hk, Dk), _data(B, T, Hk, Dv)
    if case["kind"] == "lightning":
        decay = _decay(H)
        s0 = _data(B, H, Dk, Dv) if case["h0"] else None

        def make_args(dt):
            return ((cast_input(q, dt), cast_input(k, dt), cast_input(v, dt), decay),
                    dict(scale=0.5, initial_state=_state(s0, dt), output_final_state=True))

        compare_op(_Seg(attnkit.lightning_attention, case["seg"]), make_args, torch.float32, BACKEND, grad=True,
                   output_names=["o", "S"])
        return
    norm = bool(case["norm"])
    s0 = _data(B, Hk, Dk, Dv)
    z0 = (torch.rand(B, Hk, Dk, dtype=torch.float64, device=DEVICE) + 0.5) * T if norm else None

    def make_args(dt):
        state = ((_state(s0, dt), _state(z0, dt)) if norm else _state(s0, dt)) if case["h0"] else None
        return ((cast_input(q, dt), cast_input(k, dt), cast_input(v, dt)),
                dict(causal=bool(case["causal"]), feature_map=case["fm"], normalize=norm, scale=0.7,
                     initial_state=state, output_final_state=True))

    compare_op(_Seg(attnkit.linear_attention, case["seg"]), make_args, torch.float32, BACKEND, grad=True,
               output_names=["o", "S", "z"] if norm else ["o", "S"])


CU = [0, 17, 17, 80, 81, 150]  # an empty sequence, a one-token one, lengths off the segment grid


@pytest.mark.parametrize("kind", ["lightning", "linear-normalize", "linear-noncausal"])
def test_many_segments_varlen(kind, nan_empty):
    total, N, H, Hk, Dk, Dv = CU[-1], len(CU) - 1, 4, 2, 32, 16
    q, k, v = _data(1, total, H, Dk), _data(1, total, Hk, Dk), _data(1, total, Hk, Dv)
    cu = torch.tensor(CU, dtype=torch.int32, device=DEVICE)
    decay = _decay(H)
    s0 = _data(N, H if kind == "lightning" else Hk, Dk, Dv)
    z0 = (torch.rand(N, Hk, Dk, dtype=torch.float64, device=DEVICE) + 0.5) * 10

    def fn(q, k, v, state, backend=None):
        if kind == "lightning":
            return attnkit.lightning_attention(q, k, v, decay, scale=0.5, initial_state=state,
                                               output_final_state=True, cu_seqlens=cu, backend=backend)
        return attnkit.linear_attention(q, k, v, causal=kind != "linear-noncausal", feature_map="elu",
                                        normalize=kind == "linear-normalize", scale=0.5, initial_state=state,
                                        output_final_state=True, cu_seqlens=cu, backend=backend)

    def make_args(dt):
        state = (_state(s0, dt), _state(z0, dt)) if kind == "linear-normalize" else _state(s0, dt)
        return (cast_input(q, dt), cast_input(k, dt), cast_input(v, dt), state), {}

    compare_op(_Seg(fn, 13), make_args, torch.float32, BACKEND, grad=True)


def test_segment_count_does_not_change_results():
    # the same op with 1, 3 and many segments per sequence agrees to float32 rounding (segments
    # only regroup float32 sums of the same terms: relative to each tensor's largest entry)
    B, T, H, Dk, Dv = 1, 90, 2, 32, 32
    q, k, v = (_data(B, T, H, d).float().requires_grad_() for d in (Dk, Dk, Dv))
    decay = _decay(H)
    runs = []
    for seg in (None, 32, 5):
        with triton_chunk.force_segment_len(seg):
            o, S = attnkit.lightning_attention(q, k, v, decay, output_final_state=True, backend=BACKEND)
            grads = torch.autograd.grad((o * o).sum() + S.sum(), (q, k, v))
        runs.append((o, S, *grads))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())


# --------------------------------------------------------------------------------------- host plan


def _programs(B, T, HS, sms=132):
    plan_seg = triton_chunk.segment_len(B * T, HS, sms)
    return HS * B * -(-T // plan_seg), plan_seg


@pytest.mark.parametrize("B,T,HS", [(2, 16384, 16), (1, 65536, 16), (1, 131072, 64), (8, 4096, 16)])
def test_plan_fills_the_gpu(B, T, HS):
    # every launch that walks tokens has >= 2 x SMs programs at the headline shapes
    programs, seg = _programs(B, T, HS)
    assert programs >= 2 * 132, (programs, seg)
    assert seg % 64 == 0


def test_plan_parallelism_flat_in_length():
    # at a fixed number of tokens per call the program count does not fall as T grows
    counts = [_programs(2 ** 16 // T, T, 16)[0] for T in (2048, 8192, 32768, 65536)]
    assert min(counts) >= 264 and max(counts) == min(counts), counts


def test_sm_count_env(monkeypatch):
    monkeypatch.setenv("ATTNKIT_SM_COUNT", "7")
    assert triton_chunk.sm_count(torch.device("cpu")) == 7


def test_varlen_plan_table():
    q = torch.zeros(1, 150, 1, 16)
    cu = torch.tensor(CU, dtype=torch.int32)
    plan = triton_chunk.plan_segments(q, len(CU) - 1, 1, cu, seg=13)
    lens = [b - a for a, b in zip(CU, CU[1:])]
    want = [(n, g) for n, L in enumerate(lens) for g in range(-(-L // 13))]
    got = [tuple(r) for r in plan.seg_info.tolist() if r[1] >= 0]
    assert got == want and plan.nseg >= len(want)
    assert plan.seg_cu.tolist() == [0] + list(torch.tensor([-(-L // 13) for L in lens]).cumsum(0).tolist())


def _launch_plan(op, shape, flags=""):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(ATTNKIT_SM_COUNT="132", PYTHONPATH=str(root) + os.pathsep + env.get("PYTHONPATH", ""))
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"attnkit_plan_{os.getpid()}_{op}.json"
    args = [sys.executable, "-m", "attnkit.tools.launch_plan", "--op", op, "--mode", "fwd+bwd", "--shape", shape,
            "--json", str(out)] + (["--flags", flags] if flags else [])
    res = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    plan = json.loads(out.read_text())
    out.unlink()
    return plan


@pytest.mark.parametrize("op,shape,flags", [
    ("lightning_attention", "B=2,T=16384,H=16,D=128", ""),
    ("lightning_attention", "B=1,T=65536,H=16,Hk=4,D=128", ""),  # GQA: dk/dv summed in the kernel
    ("linear_attention", "B=2,T=16384,H=16,Hk=4,D=128", "normalize=true,feature_map=elu"),
    ("linear_attention", "B=1,T=65536,H=16,Hk=4,D=128", "normalize=true,feature_map=elu"),  # 4 state heads
])
def test_launch_plan_contract(op, shape, flags):
    # issue 11: every launch that walks the sequence has >= 2 x 132 programs; around the kernels
    # the host allocates (beyond the outputs) at most 25% of the byte floor, and no float32 tensor
    # of per-token size (partial or per-query-head buffers, float32 copies of outputs; segment
    # states are D / SEG of that)
    plan = _launch_plan(op, shape, flags)
    for launch in plan["launches"]:
        assert launch["programs"] >= 264, launch
    assert plan["other_alloc_bytes"] <= 0.25 * plan["byte_floor"], plan["other_alloc_bytes"] / plan["byte_floor"]
    dims = dict(kv.split("=") for kv in shape.split(","))
    per_token = int(dims["B"]) * int(dims["T"]) * int(dims["H"]) * int(dims["D"])  # elements of q
    for a in plan["allocations"]:
        if a["dtype"] == "float32":
            assert torch.Size(a["shape"]).numel() <= per_token // 4, a


# ------------------------------------------------------------ triton-version rules (3.6 vs 3.9)

def _prune_args(pass_name, D, dtype, normalize=False, grouped=False):
    """The named arguments the autotuner's prune sees for one launch (meta tensors: no data)."""
    x = torch.empty(1, 1, 1, D, dtype=dtype, device="meta")
    args = dict(K=D, V=D, BK=D, BV=D, NORMALIZE=normalize, GPS=4 if grouped else 1)
    if pass_name == "state":
        return {**args, "k": x}
    args.update(q=x, k=x)
    if pass_name == "output":
        args["o"] = x
    if pass_name == "dq":
        args["dq"] = x
    elif pass_name in ("dk", "dv", "dkdv"):
        args.update(dk=x, STORE_DK=pass_name != "dv", STORE_DV=pass_name != "dk")
    return args


@pytest.mark.parametrize("version", [(3, 6), (3, 9)])
def test_prune_keeps_a_config_on_every_version(monkeypatch, version):
    # the version-aware prune (triton < 3.9: the dv-storing passes keep 3 stages on sm_90 in 16-bit)
    # still keeps at least one config of every (pass, flags, head dim, dtype, arch), and the 3.9
    # rules are unchanged; no GPU and no interpreter: the prune only reads shapes and flags
    from attnkit.ops.linear import triton_chunk_kernels as kern
    from attnkit.ops.softmax import triton_attention

    monkeypatch.setattr(kern, "TRITON_VERSION", version)
    monkeypatch.setattr(kern, "interpreted", lambda: False)
    monkeypatch.setattr(triton_attention, "interpreted", lambda: False)
    import triton
    configs = [triton.Config({"BT": 64}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]
    for arch in ("sm_90", "sm_80"):
        monkeypatch.setenv("ATTNKIT_TARGET_ARCH", arch)
        for dtype in (torch.bfloat16, torch.float32):
            for D in (64, 128, 256):
                for pass_name in ("state", "output", "dq", "dk", "dv", "dkdv"):
                    for normalize, grouped in ((False, False), (True, False), (False, True)):
                        kept = kern._prune_configs(configs, _prune_args(pass_name, D, dtype, normalize, grouped))
                        where = (arch, dtype, D, pass_name, normalize, grouped)
                        assert kept and all(c in configs for c in kept), where
                        stages = {c.num_stages for c in kept}
                        big = arch == "sm_90" and dtype == torch.bfloat16
                        stores_dv = pass_name in ("dv", "dkdv") and not normalize
                        if normalize and pass_name in ("dq", "dk"):
                            assert stages == {2}, where  # dq, dk with normalize: 3 stages spill
                        elif D > 128 and not big or D > 64 and arch == "sm_80" and dtype == torch.float32:
                            assert stages == {2}, where  # shared memory (sm_80, float32 tiles)
                        elif big and D > 128 and pass_name == "output" and version < (3, 9):
                            assert stages == {3}, where  # 3.6: the D = 256 output pass spills with 2
                        elif stores_dv and big and (D > 128 or version < (3, 9)):
                            assert stages == {3}, where  # spills with 2 stages (ptxas)
                        elif stores_dv and big and D <= 128:
                            assert stages == {2, 3}, where  # 3.9: both kept, as before
    assert kern.old_triton() == (version < (3, 9))


@pytest.mark.parametrize("version", [(3, 6), (3, 9)])
def test_old_triton_blocks_match_reference(monkeypatch, version, nan_empty):
    # lightning GQA's grouped dv takes at most 32 Dv columns below triton 3.9 (two Dv blocks here,
    # one on 3.9): both block choices against the float64 reference
    from attnkit.ops.linear import triton_chunk_kernels as kern

    monkeypatch.setattr(kern, "TRITON_VERSION", version)
    assert triton_chunk._narrow_dv(64, True) == (32 if version < (3, 9) else 64)
    assert triton_chunk._narrow_dv(64, False) == 64
    B, T, H, Hk, Dk, Dv = 1, 53, 4, 2, 32, 64
    q, k, v = _data(B, T, H, Dk), _data(B, T, Hk, Dk), _data(B, T, Hk, Dv)
    decay, s0 = _decay(H), _data(B, H, Dk, Dv)

    def make_args(dt):
        return ((cast_input(q, dt), cast_input(k, dt), cast_input(v, dt), decay),
                dict(scale=0.5, initial_state=_state(s0, dt), output_final_state=True))

    compare_op(_Seg(attnkit.lightning_attention, 20), make_args, torch.float32, BACKEND, grad=True,
               output_names=["o", "S"])
