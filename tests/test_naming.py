"""Names say what runs (issue 9, defect 7): the ``cuda`` backend on CPU tensors is the compiled C++
CPU kernels, and ``explain``, the benchmark tables, legends and headers say so; CPU runs are
labelled as CPU runs with their thread count and have no %-of-HBM columns."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import attnkit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import report, run  # noqa: E402


def _decode_inputs():
    q = torch.randn(1, 1, 2, 16)
    kc, vc = torch.randn(1, 8, 1, 16), torch.randn(1, 8, 1, 16)
    return q, kc, vc, torch.tensor([4], dtype=torch.int32)


def test_explain_says_cuda_backend_runs_cpp_cpu_kernels_on_cpu_tensors():
    text = str(attnkit.explain("attention_decode", *_decode_inputs(), backend="cuda"))
    assert text.splitlines()[0].startswith("attention_decode: runs on 'cuda' (cuda backend: compiled C++ CPU kernels)")
    text = str(attnkit.explain("attention_decode", *_decode_inputs(), backend="reference"))
    assert "reference backend: PyTorch ops on the CPU" in text.splitlines()[0]


def test_backend_display_in_tables_and_legends():
    cpu, gpu = {"device": "cpu", "note": ""}, {"device": "cuda", "note": ""}
    assert report.display_backend({**cpu, "backend": "attnkit:cuda"}) == "attnkit:cuda [C++ CPU]"
    assert report.display_backend({**gpu, "backend": "attnkit:cuda"}) == "attnkit:cuda"
    assert report.display_backend({**cpu, "backend": "attnkit:reference"}) == "attnkit:reference"
    assert report.display_backend({**cpu, "backend": "attnkit:dense", "note": "auto=cuda"}) == "attnkit:dense [C++ CPU]"
    assert report.display_backend({**cpu, "backend": "sdpa", "note": "softmax crossover"}) == "sdpa"
    assert report.runs_label("attnkit:cuda", torch.device("cpu")) == "cuda backend: compiled C++ CPU kernels"
    assert report.runs_label("attnkit:cuda", torch.device("cuda")) == "cuda backend: compiled CUDA kernels"
    # legend labels of the plots
    rows = [{"backend": "attnkit:cuda", "device": "cpu", "note": "", "S": s, "B": 1, "sweep": ""} for s in (8, 16)]
    assert list(report._series(rows, "S")) == ["attnkit:cuda [C++ CPU]"]


def test_table_has_no_percent_of_peak_columns_without_a_peak():
    for metric in ("flops", "floor", "bandwidth"):
        heads = [h for h, _, _ in report.table_columns(metric, percent=False)]
        assert not [h for h in heads if h.startswith("%")], heads
    assert "%HBM" in [h for h, _, _ in report.table_columns("bandwidth")]


def test_cli_cpu_header_names_cpu_and_threads(tmp_path, capsys):
    rc = run.main(["--op", "attention_decode", "--device", "cpu", "--S", "64", "--B", "1", "--H", "2", "--Hk", "1",
                   "--D", "16", "--backends", "reference", "--warmup", "1", "--min-reps", "2", "--max-reps", "2",
                   "--no-memory", "--no-plot", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("# CPU: ") and ", 1 thread |" in out.splitlines()[0]
    table_head = next(line for line in out.splitlines() if line.startswith("backend "))
    assert "%HBM" not in table_head and "GB/s" in table_head
    assert "on CPU: " in out
    csv_text = (tmp_path / "attention_decode_decode_cpu_float32.csv").read_text()
    assert "reference backend: PyTorch ops on the CPU" in csv_text


def test_public_ops_have_type_hints():
    # issue 9 defect 9: every public op is annotated (the package ships py.typed)
    import inspect
    import typing

    assert (ROOT / "attnkit" / "py.typed").exists()
    for name in attnkit.__all__:
        obj = getattr(attnkit, name)
        if not inspect.isfunction(obj) or name == "explain":
            continue
        hints = typing.get_type_hints(obj)
        params = [p for p in inspect.signature(obj).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        missing = [p.name for p in params if p.name not in hints]
        assert not missing and "return" in hints, f"{name}: no type hints for {missing or 'the return value'}"
