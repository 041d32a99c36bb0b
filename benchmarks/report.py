"""Outputs: the machine header, the stdout table, CSV, JSON and PNG plots."""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from attnkit._labels import backend_label, short_tag

from . import models

REPO = Path(__file__).resolve().parent.parent

COLUMNS = (
    "op", "mode", "device", "dtype", "backend", "status", "note", "sweep",
    "B", "T", "S", "H", "Hk", "D", "Dv", "Tq", "causal", "rank", "top_k", "kind", "W", "block_size",
    "reps", "time_ms", "time_p20_ms", "time_p80_ms",
    "flops", "tflops", "pct_peak_flops", "bytes", "gbps", "pct_peak_bw", "tokens_per_s",
    "peak_mem_mb", "speedup", "speedup_vs", "cost_ratio", "cost_ratio_vs",
    "kernel_tiles", "kernel_tiles_max", "kernel_tiles_full", "kernel_tile_ratio", "kernel_tile", "runs",
)


# ------------------------------------------------------------------------------------ machine


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def device_label(device: torch.device) -> str:
    """The device as the headers say it: the GPU's name, or ``CPU: <model>, <n> threads``."""
    if device.type == "cuda":
        return device_name(device)
    n = torch.get_num_threads()
    return f"CPU: {_cpu_name()}, {n} thread{'s' if n != 1 else ''}"


def machine_info(device: torch.device, peak: models.Peak | None) -> dict[str, Any]:
    """Where and with what the numbers were taken (no host name)."""
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "device_name": device_label(device),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "triton": _version("triton"),
        "attnkit": _version("attnkit"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "fla": _version("flash-linear-attention") or _version("fla-core"),
        "lightning_attn": _version("lightning_attn") or _version("lightning-attn"),
        "git_commit": _run(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"])),
        "peak": None if peak is None else {"name": peak.name, "bf16_tflops": peak.bf16_tflops,
                                           "hbm_gbps": peak.hbm_gbps},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_sms"] = props.multi_processor_count
        info["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                               f"--id={device.index or 0}"])
    return info


# ---------------------------------------------------------------------------------------- table


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None or x == "":
        return "n/a"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def shape_label(row: dict[str, Any]) -> str:
    heads = f"H{row['H']}" + (f"/{row['Hk']}" if row["Hk"] != row["H"] else "")
    dims = f"D{row['D']}" + (f"/{row['Dv']}" if row["Dv"] != row["D"] else "")
    op = row["op"]
    if op == "linear_attention_step":
        return f"{row['kind']} B{row['B']} {heads} {dims}"
    if op in ("attention_decode", "loki_decode", "paged_decode", "paged_loki_decode"):
        s = f"B{row['B']} S{row['S']} {heads} {dims}"
        if row.get("block_size") is not None:
            s += f" bs{row['block_size']}"
        if row.get("Tq", 1) != 1:
            s += f" Tq{row['Tq']}"
        if op in ("loki_decode", "paged_loki_decode"):
            s += f" r{row['rank']} k{row['top_k']}"
        return s
    s = f"B{row['B']} T{row['T']}"
    if row.get("S") not in (None, row["T"]):
        s += f" S{row['S']}"
    s += f" {heads} {dims}"
    if row.get("causal") is not None:
        s += " causal" if row["causal"] else " full"
    if row.get("W") is not None:
        s += f" W{row['W']}"
    return s


def display_backend(row: dict[str, Any]) -> str:
    """The backend as tables and plot legends show it: ``attnkit:cuda [C++ CPU]`` for the cuda
    backend's C++ kernels on CPU tensors, so a name never claims hardware that did not run."""
    name = row["backend"]
    prefix, _, backend = name.partition(":")
    tag = short_tag(backend, row["device"]) if prefix == "attnkit" else None
    if tag is None and (row.get("note") or "").startswith("auto="):
        tag = short_tag(row["note"][len("auto="):].split()[0], row["device"])
    return f"{name} [{tag}]" if tag else name


def runs_label(name: str, device: torch.device, note: str = "") -> str:
    """What ran, in words, for the CSV/JSON ``runs`` column (empty for peers and comparators
    that are not an attnkit backend)."""
    prefix, _, backend = name.partition(":")
    if prefix == "attnkit" and backend in ("reference", "triton", "cuda"):
        return backend_label(backend, device)
    if note.startswith("auto="):
        return "automatic choice: " + backend_label(note[len("auto="):].split()[0], device)
    return ""


def table_columns(metric: str, percent: bool = True,
                  extra: tuple[tuple[str, str, str], ...] = ()) -> list[tuple[str, str, str]]:
    """(header, row key, format) of the stdout table for an op's metric kind. ``percent=False``
    (no peak known, e.g. every CPU run) leaves out the %-of-peak columns, which would be empty.
    ``extra`` columns (an op's own, e.g. window_attention's cost ratio) come last."""
    common_head = [("backend", "backend", "s"), ("shape", "_shape", "s"), ("ms", "time_ms", ".4g"),
                   ("p20-p80 ms", "_spread", "s")]
    tail = [("mem MB", "peak_mem_mb", ".4g"), ("speedup", "speedup", ".3g")]
    if metric == "flops":
        mid = [("TFLOP/s", "tflops", ".4g"), ("%peak", "pct_peak_flops", ".3g")]
    elif metric == "floor":
        mid = [("Mtok/s", "_mtok", ".4g"), ("floor GB/s", "gbps", ".4g"), ("%floor", "pct_peak_bw", ".3g"),
               ("TFLOP/s", "tflops", ".3g")]
    else:
        mid = [("GB/s", "gbps", ".4g"), ("%HBM", "pct_peak_bw", ".3g"), ("TFLOP/s", "tflops", ".3g")]
    if not percent:
        mid = [c for c in mid if not c[0].startswith("%")]
    return common_head + mid + tail + list(extra)


def _cell(row: dict[str, Any], key: str, spec: str) -> str:
    if row["status"] != "ok" and key not in ("backend", "_shape"):
        return ""
    if key == "_shape":
        return shape_label(row)
    if key == "backend":
        return display_backend(row)
    if key == "_spread":
        return f"{row['time_p20_ms']:.4g}-{row['time_p80_ms']:.4g}"
    if key == "_mtok":
        return _fmt(None if row["tokens_per_s"] is None else row["tokens_per_s"] / 1e6, spec)
    if spec == "s":
        return str(row[key])
    return _fmt(row[key], spec)


class Table:
    """Prints rows as they are measured, in fixed-width columns."""

    WIDTHS = {"backend": 26, "shape": 34}

    def __init__(self, metric: str, stream=None, percent: bool = True,
                 extra: tuple[tuple[str, str, str], ...] = ()):
        self.cols = table_columns(metric, percent, extra)
        self.explained: set[str] = set()
        self.stream = stream or sys.stdout

    def _line(self, cells: list[str]) -> str:
        parts = []
        for (head, _, _), cell in zip(self.cols, cells):
            w = self.WIDTHS.get(head, max(len(head), 9))
            parts.append(cell.ljust(w) if head in self.WIDTHS else cell.rjust(w))
        return "  ".join(parts).rstrip()

    def header(self, title: str) -> None:
        print(f"\n== {title}", file=self.stream)
        heads = [h for h, _, _ in self.cols]
        line = self._line(heads)
        print(line, file=self.stream)
        print("-" * len(line), file=self.stream)

    def row(self, row: dict[str, Any]) -> None:
        shown = display_backend(row)
        if shown != row["backend"] and shown not in self.explained and row.get("runs"):
            self.explained.add(shown)
            print(f"   ({shown}: {row['runs']})", file=self.stream)
        cells = [_cell(row, key, spec) for _, key, spec in self.cols]
        line = self._line(cells)
        if row["status"] != "ok":
            line = f"{self._line(cells[:2])}  {row['status']}"
        print(line, file=self.stream, flush=True)


# --------------------------------------------------------------------------------- CSV / JSON


def write_csv(path: Path, rows: list[dict[str, Any]], machine: dict[str, Any], config: dict[str, Any]) -> None:
    """CSV with the machine header as leading ``# key: value`` lines (pandas: ``comment='#'``)."""
    with open(path, "w", newline="") as f:
        for k, v in {**machine, **{f"config.{k}": v for k, v in config.items()}}.items():
            f.write(f"# {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}\n")
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})


def write_json(path: Path, rows: list[dict[str, Any]], machine: dict[str, Any], config: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump({"machine": machine, "config": config,
                   "rows": [{k: r.get(k) for k in COLUMNS} for r in rows]}, f, indent=1)
        f.write("\n")


# ---------------------------------------------------------------------------------------- plots

SHAPE_KEYS = ("B", "T", "S", "H", "Hk", "D", "Dv", "Tq", "causal", "rank", "top_k", "kind")


def _covarying(rows: list[dict[str, Any]], x: str) -> dict[str, set[str]]:
    """Per sweep, the shape keys that move with the swept axis (``S = T``, ``B = N / T`` in a
    ``BxT=N`` sweep, ``top_k = S / 8``): a function of x taking as many values as x does."""
    by_sweep: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_sweep.setdefault(r.get("sweep") or "", []).append(r)
    out: dict[str, set[str]] = {}
    for sweep, rs in by_sweep.items():
        n = len({r[x] for r in rs})
        out[sweep] = {k for k in SHAPE_KEYS if k != x and n > 1
                      and len({r.get(k) for r in rs}) == n == len({(r[x], r.get(k)) for r in rs})}
    return out


def _series(rows: list[dict[str, Any]], x: str) -> dict[str, list[dict[str, Any]]]:
    """Group rows into plot lines: one per backend and sweep, split further by any shape key that
    varies across the rows (head dim, causal, GQA ratio, ...) except those moving with x."""
    varying = {k for k in SHAPE_KEYS if k != x and len({r.get(k) for r in rows}) > 1}
    covarying = _covarying(rows, x)
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        sweep = r.get("sweep") or ""
        keys = [k for k in sorted(varying - covarying[sweep])  # S = T is no news in a T sweep
                if not (k == "S" and x == "T" and r.get("S") == r.get("T"))]
        extra = " ".join(f"{k}={r.get(k)}" for k in keys if f"{k}={r.get(k)}" not in sweep.split())
        label = " ".join(p for p in (display_backend(r), sweep, extra) if p)
        out.setdefault(label, []).append(r)
    return out


PLOTS_SKIPPED = ('plots skipped: matplotlib is not installed (pip install -e ".[bench]" to get them); '
                 "the table, CSV and JSON are written")


def can_plot() -> bool:
    """Whether matplotlib can be imported (the ``bench`` extra); without it only the plots are skipped."""
    import importlib.util

    try:
        import matplotlib  # noqa: F401

        return importlib.util.find_spec("matplotlib.pyplot") is not None
    except (ImportError, ValueError):
        return False


def plot(path: Path, rows: list[dict[str, Any]], x: str, metric: str, title: str) -> bool:
    """Throughput and peak memory against the swept axis; returns False if nothing to plot."""
    ok = [r for r in rows if r["status"] == "ok" and r.get(x) is not None]
    if not ok:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ykey, ylabel = {"flops": ("tflops", "TFLOP/s"), "floor": ("tokens_per_s", "tokens/s"),
                    "bandwidth": ("gbps", "GB/s (modelled bytes)")}[metric]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    if all(r.get("peak_mem_mb") is None for r in ok):
        ax2.text(0.5, 0.5, "not measured (--no-memory)", transform=ax2.transAxes, ha="center")
    for label, rs in _series(ok, x).items():
        rs = sorted(rs, key=lambda r: r[x])
        xs = [r[x] for r in rs]
        ax1.plot(xs, [r[ykey] for r in rs], marker="o", label=label)
        mem = [(r[x], r["peak_mem_mb"]) for r in rs if r.get("peak_mem_mb") is not None]
        if mem:
            ax2.plot(*zip(*mem), marker="o", label=label)
    xlabel = {"T": "sequence length T", "S": "context length S", "B": "batch B"}[x]
    for ax, yl in ((ax1, ylabel), (ax2, "peak memory above inputs (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def out_stem(op: str, mode: str, device: torch.device, dtype: torch.dtype) -> str:
    return f"{op}_{mode.replace('+', '_')}_{device.type}_{str(dtype).replace('torch.', '')}"


def ensure_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p
