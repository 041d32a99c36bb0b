"""Sliding window, softcap and paged KV cache (SPEC "Sliding window, softcap, paged KV cache"),
and the decode-cache contract that nothing at or past a row's length is read (issue 9, defect 1).

Oracles are written here from the definition, in float64, independently of attnkit's reference
(dense scores, explicit masks); every backend that runs on this machine is compared with them.
"""

from __future__ import annotations

import pytest
import torch

import attnkit

from .harness import DEVICE

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
