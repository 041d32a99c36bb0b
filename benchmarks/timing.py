"""Timing and peak-memory measurement.

Timing: the step runs ``warmup`` times first (Triton autotuning and compilation happen there, and
the loop keeps going until ``warmup_s`` of warm-up has passed), then once per repeat with
``before_each`` (grad reset, L2 flush) run outside the measured interval. On CUDA each repeat is
bracketed by a pair of CUDA events; on the CPU by ``time.perf_counter``. The number of repeats is
chosen from the warm-up time so that the measurement takes about ``budget_s``, within
``[min_reps, max_reps]``. Statistics: median, 20th and 80th percentile of the per-repeat times.

Memory: the peak of memory allocated during one call, minus what was allocated just before it.
CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the allocation
and free records of ``torch.profiler`` (``profile_memory=True``), summed in time order; the peak
of the running sum is the answer (every allocation the call makes through the CPU allocator is
recorded, including autograd's and temporaries freed before the call returns).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Step = Callable[[], Any]


@dataclass(frozen=True)
class Budget:
    """How long to measure one case."""

    warmup: int = 3          # at least this many warm-up calls
    warmup_s: float = 0.05   # and at least this much warm-up time (capped at 10 × warmup calls)
    min_reps: int = 5
    max_reps: int = 100
    budget_s: float = 0.5    # target measuring time per case


@dataclass(frozen=True)
class Stats:
    median_s: float
    p20_s: float
    p80_s: float
    reps: int


def quantile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated quantile of a sorted list (numpy's default method)."""
    if not sorted_xs:
        raise ValueError("no samples")
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times_s: list[float]) -> Stats:
    xs = sorted(times_s)
    return Stats(quantile(xs, 0.5), quantile(xs, 0.2), quantile(xs, 0.8), len(xs))


class L2Flush:
    """Overwrites a buffer larger than the GPU's L2 cache (as triton.testing.do_bench does), so
    each repeat reads its inputs from HBM, as in a real model where other layers ran between."""

    def __init__(self, device: torch.device, nbytes: int = 256 * 1024 * 1024):
        self.buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Step, device: torch.device, budget: Budget,
              before_each: Callable[[], None] | None = None) -> Stats:
    """Time ``step`` (see the module docstring). ``before_each`` runs untimed before every call."""
    device = torch.device(device)
    before = before_each or (lambda: None)

    # Warm-up: compile/autotune, and estimate the cost of one call.
    calls, spent = 0, 0.0
    while calls < budget.warmup or (spent < budget.warmup_s and calls < 10 * budget.warmup):
        before()
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        spent += time.perf_counter() - t0
        calls += 1
    per_call = spent / max(calls, 1)  # --warmup 0: no estimate, max_reps bounds the count
    reps = int(min(budget.max_reps, max(budget.min_reps, budget.budget_s / max(per_call, 1e-9))))

    times: list[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            before()
            starts[i].record()
            step()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            before()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return summarize(times)


# --------------------------------------------------------------------------------------- memory


def _quietly(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with the process's stderr (fd 2) sent to /dev/null: Kineto's C++ logger prints a
    line at every profiler start and stop. Only the start/stop calls are silenced, never the step."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        return fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak_bytes(step: Step) -> int:
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    _quietly(prof.start)
    try:
        step()
    finally:
        _quietly(prof.stop)
    records = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    records.sort(key=lambda r: r[0])
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_memory_bytes(step: Step, device: torch.device,
                      before_each: Callable[[], None] | None = None) -> int:
    """Peak bytes allocated during one call of ``step`` above what was allocated before it."""
    device = torch.device(device)
    if before_each is not None:
        before_each()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type == "cpu":
        return _cpu_peak_bytes(step)
    raise ValueError(f"device must be cpu or cuda, got {device}")
