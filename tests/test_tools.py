"""attnkit.tools: sm_count, the GPU audit and the launch planner.

The audit and the planner need the real (non-interpreted) Triton kernels, and this process runs
the interpreter (conftest sets TRITON_INTERPRET=1 before triton is imported), so they run in
subprocesses with the variable removed. Each stays small: one cheap kernel compiled, or recording
only (no compilation).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attnkit.tools as tools

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path, timeout: float = 600, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ATTNKIT_SM_COUNT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["ATTNKIT_AUDIT_CACHE"] = str(tmp_path / "cache")
    env.update(env_extra)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------------- sm_count


def test_sm_count_env_overrides_every_device(monkeypatch):
    monkeypatch.setenv("ATTNKIT_SM_COUNT", "78")
    assert tools.sm_count() == 78
    assert tools.sm_count("cpu") == 78
    assert tools.sm_count(torch.device("cpu")) == 78
    assert tools.sm_count(0) == 78  # no CUDA query when the variable is set


def test_sm_count_default_off_cuda(monkeypatch):
    monkeypatch.delenv("ATTNKIT_SM_COUNT", raising=False)
    assert tools.sm_count("cpu") == tools.DEFAULT_SM_COUNT == 132
    assert tools.sm_count(torch.device("meta")) == 132
    if not torch.cuda.is_available():
        assert tools.sm_count() == 132
    else:
        assert tools.sm_count() == torch.cuda.get_device_properties(0).multi_processor_count


@pytest.mark.parametrize("bad", ["0", "-3", "abc", "1.5"])
def test_sm_count_rejects_bad_env(monkeypatch, bad):
    monkeypatch.setenv("ATTNKIT_SM_COUNT", bad)
    with pytest.raises(ValueError, match="ATTNKIT_SM_COUNT"):
        tools.sm_count("cpu")


def test_sm_count_rejects_bad_device(monkeypatch):
    monkeypatch.delenv("ATTNKIT_SM_COUNT", raising=False)
    with pytest.raises(TypeError, match="device"):
        tools.sm_count(1.5)
    with pytest.raises(TypeError, match="device"):
        tools.sm_count(True)


def test_importing_tools_imports_no_kernels(tmp_path):
    """`import attnkit.tools` (for sm_count) adds no Triton import and loads no kernel module.
    (Whether `import attnkit` itself imports triton depends on torch: torch._dynamo does.)"""
    code = textwrap.dedent("""
        import sys
        import attnkit
        before = "triton" in sys.modules
        import attnkit.tools
        assert ("triton" in sys.modules) == before, "attnkit.tools imported triton"
        kernels = [m for m in sys.modules
                   if m.startswith("attnkit.") and ".triton_" in m and not m.endswith("_register")]
        assert not kernels, kernels
        assert "attnkit.tools._recorder" not in sys.modules
    """)
    res = _run(["-c", code], tmp_path)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------------------------ audit


def test_audit_compiles_one_kernel_within_shared_memory(tmp_path):
    out = tmp_path / "audit.json"
    res = _run(["-m", "attnkit.tools.gpu_audit", "--quick", "--op", "attention", "--kernel",
                "^_attention_bwd_preprocess_kernel$", "--arch", "sm_90", "--arch", "sm_80", "--jobs", "1",
                "--json", str(out), "--verify", "2"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(out.read_text())
    assert not report["failures"]
    variants = report["variants"]
    assert {v["arch"] for v in variants} == {"sm_90", "sm_80"}
    for v in variants:
        assert v["kernel"] == "_attention_bwd_preprocess_kernel"
        assert v["error"] is None
        assert 0 <= v["shared"] <= v["shared_limit"] and v["shared_ok"]
        assert v["registers"] > 0 and v["spill_stores"] is not None
        assert v["mma"] in ("wgmma", "mma.sync", "mixed", "none")
        for field in ("config", "dtype", "head_dim", "spill_loads", "num_warps", "grid"):
            assert field in v
    # independent agreement: cuobjdump of the cubin, SASS MMA kind, the toolkit's ptxas
    assert len(report["verify"]) == 2
    for check in report["verify"]:
        assert "error" not in check, check
        assert check["agree"]["registers"] and check["agree"]["stack_frame"] and check["agree"]["mma"]
        assert check["agree"]["toolkit_registers"] in (True, None)
    assert "_attention_bwd_preprocess_kernel" in res.stdout  # the tables
    # a rerun is served from the cache
    res = _run(["-m", "attnkit.tools.gpu_audit", "--quick", "--op", "attention", "--kernel",
                "^_attention_bwd_preprocess_kernel$", "--arch", "sm_90", "--json", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["compiled"] == 0 and report["cached"] == len(report["variants"]) >= 1


# ----------------------------------------------------------------------------- requirements


def _row(kernel="_k", arch="sm_90", dtype="bf16", head_dim=128, config="BM=64 w4s2", case="op fwd bf16 D=128",
         spill=0, mma="wgmma", wgmma=8, mma_sync=0, error=None):
    return dict(kernel=kernel, arch=arch, dtype=dtype, head_dim=head_dim, config=config, case=case, cases=[case],
                spill_stores=spill, mma=mma, wgmma=wgmma, mma_sync=mma_sync, error=error)


def test_requirement_validation_names_the_key():
    from attnkit.tools._requirements import parse_requirement

    ok = dict(kernel="^_k$", arch="sm_90", dtypes=("bfloat16",), head_dims=(64, 128), max_spill_stores=0,
              mma="wgmma", why="issue 12")
    req = parse_requirement(ok, "m[0]", known_archs={"sm_80", "sm_90"})
    assert req.dtypes == ("bf16",) and req.archs == ("sm_90",) and req.head_dims == (64, 128)
    for bad, needle in ((dict(ok, spills=0), "spills"), (dict(ok, mma="wmma"), "mma"),
                        (dict(ok, dtypes=("bfloat17",)), "dtypes"), (dict(ok, arch="sm_91"), "arch"),
                        (dict(ok, head_dims=("64",)), "head_dims"), (dict(ok, max_spill_stores=-1), "max_spill_stores"),
                        (dict(ok, kernel="(["), "kernel"), (dict(ok, why=""), "why"),
                        ({k: v for k, v in ok.items() if k not in ("max_spill_stores", "mma")}, "check something")):
        with pytest.raises(ValueError, match=needle) as e:
            parse_requirement(bad, "mod[3]", known_archs={"sm_80", "sm_90"})
        assert "mod[3]" in str(e.value)


def test_requirements_fail_on_violations_and_on_matching_nothing():
    from attnkit.tools._requirements import Scope, check, parse_requirement

    def req(**kw):
        return parse_requirement(dict(dict(kernel="^_k$", arch="sm_90", dtypes=("bf16",), head_dims=(64, 128),
                                           max_spill_stores=0, mma="wgmma", why="test"), **kw), "m[0]")

    rows = [_row(head_dim=64), _row(head_dim=128), _row(head_dim=128, config="BM=128 w8s2", arch="sm_80",
                                                          mma="mma.sync", spill=96)]
    scope = Scope(archs=["sm_90", "sm_80"])
    table, failures = check([req()], rows, scope)
    assert not failures and table[0]["status"] == "ok" and table[0]["variants"] == 2
    # a spilling variant, a wrong MMA kind, a compile failure: one failure each, naming the config
    for bad, needle in ((dict(spill=8), "spills 8 B > 0 B"), (dict(mma="mma.sync"), "mma mma.sync != wgmma"),
                        (dict(mma="mixed"), "mixed"), (dict(error="boom", mma=None), "did not compile")):
        table, failures = check([req()], [rows[0], _row(head_dim=128, config="BM=32 w4s2", **bad)], scope)
        assert len(failures) == 1 and needle in failures[0]["error"], failures
        assert failures[0]["config"] == "BM=32 w4s2" and table[0]["status"] == "FAIL"
    # a named combination no variant matches: fails (cannot pass vacuously), naming what is missing
    table, failures = check([req()], [rows[0]], scope)
    assert len(failures) == 1 and "sm_90/bf16/128" in failures[0]["error"] and table[0]["missing"] == ["sm_90/bf16/128"]
    table, failures = check([req(kernel="^_renamed$")], rows, scope)
    assert len(failures) == 2 and table[0]["status"] == "FAIL"
    # an arch the run does not audit is not required
    table, failures = check([req(arch="sm_80", mma="mma.sync", max_spill_stores=None)], rows[:2], Scope(["sm_90"]))
    assert not failures and table[0]["status"].startswith("not audited")
    # --kernel excluding the requirement's kernel: out of scope; --kernel keeping it: still covered
    launched = frozenset({("sm_90", "_k", "bf16", 64, "op fwd D=64"), ("sm_90", "_other", "bf16", 64, "op fwd D=64")})
    table, failures = check([req()], [], Scope(["sm_90"], kernel_filter="_other", launched=launched))
    assert not failures and table[0]["status"] == "not in this run"
    table, failures = check([req()], [rows[0]], Scope(["sm_90"], kernel_filter="_k", launched=launched))
    assert [f["error"] for f in failures if "sm_90/bf16/128" in f["error"]], failures
    # --op/--case: only the dtype/head dims the narrowed calls launch the kernel with are required
    table, failures = check([req()], [rows[0]], Scope(["sm_90"], narrowed_calls=True, launched=launched))
    assert not failures and table[0]["status"] == "ok"
    # ... and only calls its `case` regex selects
    table, failures = check([req(case="norm=rms")], [], Scope(["sm_90"], narrowed_calls=True, launched=launched))
    assert not failures and table[0]["status"] == "not in this run"
    table, failures = check([req(case="D=64")], [], Scope(["sm_90"], narrowed_calls=True, launched=launched))
    assert len(failures) == 1 and "sm_90/bf16/64" in failures[0]["error"]


def test_requirement_same_mma_count():
    from attnkit.tools._requirements import Scope, check, parse_requirement

    req = parse_requirement(dict(kernel="^_k$", case="norm=rms", same_mma_count_as=r"^plain ", why="t"), "m[0]")
    plain = _row(case="plain D=128", wgmma=12)
    for n, ok in ((12, True), (16, False)):
        table, failures = check([req], [plain, _row(case="x norm=rms", wgmma=n)], Scope(["sm_90"]))
        assert (not failures) is ok, failures
        assert ok or "(16, 0) != [(12, 0)]" in failures[0]["error"]
    # no plain variant of the same config to compare with: a failure, not a pass
    table, failures = check([req], [plain, _row(case="x norm=rms", config="other", wgmma=12)], Scope(["sm_90"]))
    assert len(failures) == 1 and "same config" in failures[0]["error"]


def test_audit_enforces_requirements_end_to_end(tmp_path):
    """The CLI: requirements from a module (--requirements-from), a violated one and an uncovered
    one fail the run (exit 1) and are in the table and the JSON; satisfied ones pass. Compiles only
    the tiny preprocess kernel (cached for the second run)."""
    (tmp_path / "fake_reqs_bad.py").write_text(textwrap.dedent("""
        K = r"^_attention_bwd_preprocess_kernel$"
        AUDIT_REQUIREMENTS = [
            dict(kernel=K, arch="sm_90", dtypes=("bfloat16",), head_dims=(64, 128), max_spill_stores=0, mma="none",
                 why="satisfied"),
            dict(kernel=K, arch="sm_90", mma="wgmma", why="violated"),
            dict(kernel=K, arch="sm_90", head_dims=(96,), max_spill_stores=0, why="matches nothing"),
            dict(kernel=r"^_attention_fwd_kernel$", arch="sm_90", mma="wgmma", why="excluded by --kernel"),
            dict(kernel=K, arch="sm_80", max_spill_stores=0, why="arch not audited"),
        ]
    """))
    (tmp_path / "fake_reqs_good.py").write_text(textwrap.dedent("""
        AUDIT_REQUIREMENTS = [dict(kernel=r"^_attention_bwd_preprocess_kernel$", arch="sm_90", dtypes=("bf16",),
                                   head_dims=(64, 128), max_spill_stores=0, mma="none", why="satisfied")]
    """))
    out = tmp_path / "audit.json"
    args = ["-m", "attnkit.tools.gpu_audit", "--quick", "--kernel", "^_attention_bwd_preprocess_kernel$",
            "--arch", "sm_90", "--jobs", "1", "--json", str(out)]
    env = dict(PYTHONPATH=str(ROOT) + os.pathsep + str(tmp_path))
    res = _run([*args, "--requirements-from", "fake_reqs_bad"], tmp_path, **env)
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads(out.read_text())
    status = [r["status"] for r in report["requirements"]]
    assert status[0] == "ok" and status[1] == "FAIL" and status[2] == "FAIL", status
    assert status[3] == "not in this run" and status[4].startswith("not audited"), status
    errors = [f["error"] for f in report["failures"]]
    assert len(errors) == 3, errors  # one per preprocess variant (D=64, 128) + the uncovered D=96
    assert sum("mma none != wgmma" in e for e in errors) == 2
    assert any("fake_reqs_bad[2]" in e and "matches no audited variant" in e and "sm_90/96" in e for e in errors)
    assert "requirements (AUDIT_REQUIREMENTS" in res.stdout and "FAIL" in res.stdout
    res = _run([*args, "--requirements-from", "fake_reqs_good"], tmp_path, **env)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(out.read_text())
    assert [r["status"] for r in report["requirements"]] == ["ok"] and report["compiled"] == 0


def test_every_kernel_is_reached_by_the_audit_calls(tmp_path):
    """Recording only: every `*_kernel` JIT function defined under attnkit.ops is launched by some
    call of the full audit (a new kernel needs a case in attnkit/tools/cases.py)."""
    code = textwrap.dedent("""
        import importlib, json, pkgutil, sys
        import attnkit.ops
        from triton.runtime.jit import JITFunction
        from triton.runtime.autotuner import Autotuner, Heuristics
        from attnkit.tools._recorder import record
        from attnkit.tools.cases import audit_cases, make_call
        defined = set()
        for m in pkgutil.walk_packages(attnkit.ops.__path__, "attnkit.ops."):
            mod = importlib.import_module(m.name)
            for name, obj in vars(mod).items():
                fn = obj
                while isinstance(fn, (Autotuner, Heuristics)):
                    fn = fn.fn
                if isinstance(fn, JITFunction) and fn.fn.__name__.endswith("_kernel") and fn.module == m.name:
                    defined.add(fn.fn.__name__)
        reached, failed = set(), []
        for quick in (True, False):
            for c in audit_cases(quick):
                try:
                    launches = record(make_call(c.op, c.mode, c.dtype, c.shape, c.flags), c.name)
                except Exception as e:
                    if not c.optional:
                        failed.append(c.name + ": " + repr(e))
                    continue
                reached |= {l.kernel for l in launches}
        print(json.dumps(dict(defined=sorted(defined), reached=sorted(reached), failed=failed)))
    """)
    res = _run(["-c", code], tmp_path)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout.strip().splitlines()[-1])
    assert not data["failed"], data["failed"]
    assert data["defined"], "no kernels found"
    assert set(data["defined"]) <= set(data["reached"]), sorted(set(data["defined"]) - set(data["reached"]))


def test_compile_cache_key_follows_kernel_source(tmp_path):
    """A changed kernel (or a changed helper it calls) gets a new cache key; an unchanged one keeps it."""
    mod = tmp_path / "audit_probe_mod.py"
    body = textwrap.dedent("""
        import triton, triton.language as tl

        @triton.jit
        def helper(x):
            return x * {factor}

        @triton.jit
        def probe_kernel(x, n, BLOCK: tl.constexpr):
            o = tl.arange(0, BLOCK)
            tl.store(x + o, helper(tl.load(x + o, mask=o < n)), mask=o < n)
    """)
    code = textwrap.dedent(f"""
        import importlib, sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        from attnkit.tools._recorder import record
        from attnkit.tools._compile import variant_key
        def key():
            import audit_probe_mod as m
            importlib.reload(m)
            x = torch.empty(64, device="meta")
            (launch,) = record(lambda: m.probe_kernel[(1,)](x, 64, BLOCK=64))
            return variant_key(launch, "sm_90")
        path = {str(mod)!r}
        body = {body!r}
        open(path, "w").write(body.format(factor=2))
        a = key()
        b = key()
        open(path, "w").write(body.format(factor=3))
        c = key()
        print(a == b, a != c)
    """)
    res = _run(["-c", code], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-2:] == ["True", "True"]


# ------------------------------------------------------------------------------ launch plan


def test_launch_plan_attention_fwd_bwd(tmp_path):
    out = tmp_path / "plan.json"
    res = _run(["-m", "attnkit.tools.launch_plan", "--op", "attention", "--mode", "fwd+bwd", "--shape",
                "B=2,T=4096,H=16,Hk=4,D=128", "--dtype", "bfloat16", "--sms", "77", "--json", str(out)], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    plan = json.loads(out.read_text())
    assert plan["sm_count"] == 77 and plan["sm_count_source"] == "ATTNKIT_SM_COUNT"
    phases = {r["phase"] for r in plan["launches"]}
    assert phases == {"fwd", "bwd"}
    for r in plan["launches"]:
        assert r["programs"] == r["grid"][0] * r["grid"][1] * r["grid"][2] > 0
        assert r["programs_per_sm"] == round(r["programs"] / 77, 2)
    # the outputs the op returns must be allocated by the host code: o, dq (B,T,H,D) and dk, dv (B,S,Hk,D)
    B, T, H, Hk, D, e = 2, 4096, 16, 4, 128, 2
    assert plan["host_alloc_bytes"] >= (2 * B * T * H * D + 2 * B * T * Hk * D) * e
    sys.path.insert(0, str(ROOT))
    from benchmarks import models
    assert plan["byte_floor"] == models.attention_bytes(B, H, Hk, T, T, D, D, torch.bfloat16, "fwd+bwd")
    assert "launch plan: attention fwd+bwd" in res.stdout and "byte floor" in res.stdout


def test_launch_plan_rejects_bad_arguments(tmp_path):
    code = textwrap.dedent("""
        import contextlib, io, json
        from attnkit.tools.launch_plan import main
        out = []
        for argv in (["--op", "attention", "--mode", "fwd", "--shape", "B=two"],
                     ["--op", "attention_decode", "--mode", "fwd"],
                     ["--op", "attention", "--mode", "fwd", "--flags", "bogus=1"],
                     ["--op", "attention", "--mode", "fwd", "--sms", "0"]):
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    main(argv)
                code = 0
            except SystemExit as e:
                code = e.code
            out.append([code, err.getvalue()])
        print(json.dumps(out))
    """)
    res = _run(["-c", code], tmp_path)
    assert res.returncode == 0, res.stderr
    results = json.loads(res.stdout.strip().splitlines()[-1])
    for (code, err), needle in zip(results, ["B=two", "decode", "bogus", "--sms"]):
        assert code == 2 and needle in err, (code, err)
