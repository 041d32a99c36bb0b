"""Context parallelism (attnkit.distributed) with gloo on CPU: 2 and 4 processes.

Each test launches P ranks of `tests/cp_worker.py` (torchrun-style environment, `file://`
rendezvous) and bounds them by a timeout, so a hang fails the test instead of stalling CI. Many
checks are bundled per launch because starting a rank costs seconds: outputs, final states and
every gradient against the shard of the single-process op (float64 reference and the default
backend), both layouts, bad layouts/lengths, shards that differ between ranks, bytes per rank
(by wrapping the torch.distributed collectives), and, with 2 ranks, a collective timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def launch(world: int, checks: str, tmp_path: Path, *, quick: bool = False, timeout: float = 300.0) -> list[str]:
    """Run `world` ranks of the worker; returns their outputs, or fails with them."""
    env = dict(os.environ, WORLD_SIZE=str(world), CP_INIT=f"file://{tmp_path}/rendezvous", CP_CHECKS=checks,
               CP_QUICK="1" if quick else "0", CP_TIMEOUT="60",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.cp_worker"], cwd=ROOT, env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        rest = [p.communicate()[0] for p in procs]
        pytest.fail(f"{world} ranks did not finish within {timeout:.0f} s:\n" + "\n".join(rest))
    bad = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    assert not bad, f"ranks failed (rank, exit code) {bad}:\n" + "\n".join(outs)
    return outs


def test_context_parallel_2_ranks(tmp_path):
    outs = launch(2, "layouts,linear,softmax,window,modules,bytes,timeout", tmp_path)
    assert all(" 0 failures" in o for o in outs), outs


def test_context_parallel_4_ranks(tmp_path):
    outs = launch(4, "layouts,linear,softmax,window,modules,bytes,subgroups", tmp_path, quick=True)
    assert all(" 0 failures" in o for o in outs), outs


def test_needs_an_initialised_group():
    import torch

    import attnkit.distributed as akd
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    x = torch.randn(1, 8, 2, 16)
    for call in (lambda: akd.shard_sequence(x), lambda: akd.gather_sequence(x),
                 lambda: akd.lightning_attention(x, x, x), lambda: akd.linear_attention(x, x, x),
                 lambda: akd.attention(x, x, x)):
        with pytest.raises(RuntimeError, match="init_process_group"):
            call()
    with pytest.raises(ValueError, match="layout"):
        akd.shard_sequence(x, layout="ring")


def test_byte_counter_wraps_and_restores_the_collectives():
    from attnkit.distributed._comm import COLLECTIVES, ByteCounter
    before = {n: getattr(dist, n, None) for n in COLLECTIVES}
    with ByteCounter() as counter:
        wrapped = [n for n in COLLECTIVES if before[n] is not None]
        assert wrapped and all(getattr(dist, n) is not before[n] for n in wrapped)
        assert counter.take() == [] and counter.take_bytes() == 0
    assert {n: getattr(dist, n, None) for n in COLLECTIVES} == before
