"""Smoke test of the benchmark harness (benchmarks/): the CLI end to end on tiny CPU shapes, the
CPU memory measurement against known allocations, and the models' conventions."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repo, not part of the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import models, run  # noqa: E402
from benchmarks.timing import Budget, peak_memory_bytes, time_step  # noqa: E402

MiB = 2**20


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def test_cli_writes_table_csv_json_png(tmp_path, capsys):
    rc = run.main(["--op", "lightning_attention", "--device", "cpu", "--mode", "fwd+bwd",
                   "--T", "64,128", "--B", "1", "--H", "2", "--D", "16", "--backends", "reference,sdpa",
                   "--warmup", "1", "--min-reps", "2", "--max-reps", "3", "--out", str(tmp_path)])
    assert rc == 0
    stem = "lightning_attention_fwd_bwd_cpu_float32"
    for ext in ("csv", "json", "png"):
        assert (tmp_path / f"{stem}.{ext}").stat().st_size > 0, ext
    assert (tmp_path / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = _rows(tmp_path / f"{stem}.csv")
    assert [(r["backend"], r["T"]) for r in rows] == [
        ("attnkit:reference", "64"), ("sdpa", "64"), ("attnkit:reference", "128"), ("sdpa", "128")]
    for r in rows:
        assert r["status"] == "ok"
        assert float(r["time_p20_ms"]) <= float(r["time_ms"]) <= float(r["time_p80_ms"])
        assert float(r["peak_mem_mb"]) > 0
        assert float(r["tokens_per_s"]) > 0
    assert all(float(r["speedup"]) > 0 for r in rows)

    doc = json.loads((tmp_path / f"{stem}.json").read_text())
    for key in ("device_name", "torch", "triton", "attnkit", "git_commit", "date_utc"):
        assert key in doc["machine"]
    assert "hostname" not in json.dumps(doc["machine"]).lower()
    assert doc["config"]["mode"] == "fwd+bwd" and len(doc["rows"]) == 4

    out = capsys.readouterr().out
    assert "lightning_attention fwd+bwd" in out and "attnkit:reference" in out


def test_cpu_memory_measures_a_known_temporary():
    n = 64 * MiB // 4  # a 64 MiB float32 temporary, freed before the call returns
    held = torch.ones(32 * MiB // 4)  # allocated before the call: must not count

    def step():
        x = torch.empty(n)
        x.fill_(1.0)
        s = x.sum()
        del x
        return torch.ones(1024) * s  # a small output that outlives the call

    peak = peak_memory_bytes(step, torch.device("cpu"))
    assert abs(peak - 64 * MiB) <= 0.03 * 64 * MiB, peak / MiB
    assert held.numel() > 0


def test_cpu_memory_counts_autograd_saved_tensors():
    x = torch.randn(1024, 1024, requires_grad=True)  # 4 MiB, allocated before

    def step():
        # exp saves its 4 MiB output for backward; the sum is tiny
        return x.exp().sum()

    peak = peak_memory_bytes(step, torch.device("cpu"))
    assert abs(peak - 4 * MiB) <= 0.03 * 4 * MiB, peak / MiB


def test_time_step_bounds_repeats():
    calls = []
    stats = time_step(lambda: calls.append(1), torch.device("cpu"),
                      Budget(warmup=2, warmup_s=0.0, min_reps=4, max_reps=7, budget_s=1.0))
    assert 4 <= stats.reps <= 7 and len(calls) == 2 + stats.reps
    assert stats.p20_s <= stats.median_s <= stats.p80_s


@pytest.mark.parametrize("causal, factor", [(False, 1.0), (True, 0.5)])
def test_attention_flops_convention(causal, factor):
    B, H, T, D = 2, 16, 4096, 128
    assert models.attention_flops(B, H, T, T, D, D, causal, "fwd") == factor * 4 * B * H * T * T * D
    assert models.attention_flops(B, H, T, T, D, D, causal, "fwd+bwd") == 3.5 * factor * 4 * B * H * T * T * D


def test_peaks_by_device_name():
    assert models.peak_for("NVIDIA H100 80GB HBM3") == models.Peak("H100 SXM", 989.0, 3350.0)
    assert models.peak_for("NVIDIA H200").hbm_gbps == 4800.0
    assert models.peak_for("NVIDIA GH200 480GB").name.startswith("GH200")
    assert models.peak_for("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert models.peak_for("AMD EPYC") is None and models.peak_for(None) is None


def test_cli_without_matplotlib_writes_table_csv_json_and_says_plots_skipped(tmp_path, capsys, monkeypatch):
    # issue 9: a machine without matplotlib still gets every result, and one line saying how to get plots
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    rc = run.main(["--op", "lightning_attention", "--device", "cpu", "--mode", "fwd", "--T", "32",
                   "--B", "1", "--H", "2", "--D", "16", "--backends", "reference", "--warmup", "1",
                   "--min-reps", "2", "--max-reps", "2", "--no-memory", "--out", str(tmp_path)])
    assert rc == 0
    stem = "lightning_attention_fwd_cpu_float32"
    assert (tmp_path / f"{stem}.csv").stat().st_size > 0 and (tmp_path / f"{stem}.json").stat().st_size > 0
    assert not (tmp_path / f"{stem}.png").exists()
    assert [r["status"] for r in _rows(tmp_path / f"{stem}.csv")] == ["ok"]
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if "plots skipped" in line]
    assert len(skipped) == 1 and 'pip install -e ".[bench]"' in skipped[0], out
    assert "attnkit:reference" in out  # the table is printed


def test_time_step_without_warmup():
    # --warmup 0 used to divide by zero calls
    stats = time_step(lambda: None, torch.device("cpu"),
                      Budget(warmup=0, warmup_s=0.0, min_reps=2, max_reps=3, budget_s=0.1))
    assert 2 <= stats.reps <= 3
