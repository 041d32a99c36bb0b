"""FLOP and byte models per op, and peak numbers of known GPUs.

Every model counts what the op must do, not what a given kernel happens to do, so that one
number compares every backend and peer. Conventions (derivations in ``docs/benchmarks.md``):

* Softmax attention: ``4·B·H·T·S·D`` forward FLOPs (two GEMMs, 2 FLOPs per multiply-add; with
  ``Dv != D`` the second GEMM counts ``Dv``), halved when causal with ``T == S`` (for ``T != S``
  the exact count of visible query-key pairs is used), ×2.5 for backward and ×3.5 for
  forward+backward (the flash-attn benchmark convention: backward = 5 GEMMs of the 2 forward
  ones' size, the recomputation of ``QKᵀ`` included).
* Linear / lightning attention: the chunked form with chunk ``C = 64``: per query head and token,
  an intra-chunk ``C×C`` block (``2·C·Dk`` for the scores, ``2·C·Dv`` for the weighted values,
  counted whole as kernels compute it) and the inter-chunk state read and update
  (``2·Dk·Dv`` each); backward ×2 (each forward GEMM gives two), forward+backward ×3.
  The *byte floor* is what must cross HBM at least once: read q, k, v (and dO), write o
  (and dq, dk, dv).
* Decode ops: bytes moved, with the KV cache read once per KV head (not once per query head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 64
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5, "decode": 1.0}
LINEAR_MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0, "decode": 1.0}


def elt(dtype: torch.dtype) -> int:
    """Bytes per element."""
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------- softmax


def visible_pairs(T: int, S: int, causal: bool) -> int:
    """Query-key pairs a query sees: all ``T·S``, or bottom-right causal (query t sees s <= t + S - T)."""
    if not causal:
        return T * S
    if T == S:
        # The flash-attn convention: exactly half (the diagonal's T/2 is not counted).
        return T * S // 2
    # sum over t of clamp(t + S - T + 1, 0, S)
    return int((torch.arange(T, dtype=torch.int64) + (S - T + 1)).clamp(0, S).sum())


def attention_flops(B: int, H: int, T: int, S: int, D: int, Dv: int, causal: bool, mode: str) -> float:
    """``2·B·H·pairs·(D + Dv)`` forward (= ``4·B·H·T·S·D`` when Dv == D, halved when causal)."""
    fwd = 2.0 * B * H * visible_pairs(T, S, causal) * (D + Dv)
    return fwd * MODE_FLOP_FACTOR[mode]


def attention_bytes(B: int, H: int, Hk: int, T: int, S: int, D: int, Dv: int, dtype: torch.dtype,
                    mode: str) -> float:
    """Byte floor: read q, k, v, write o (forward); read q, k, v, o, dO, write dq, dk, dv (backward)."""
    e = elt(dtype)
    q, k, v, o = B * T * H * D, B * S * Hk * D, B * S * Hk * Dv, B * T * H * Dv
    fwd = (q + k + v + o) * e
    bwd = (q + k + v + o + o + q + k + v) * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd, "decode": fwd}[mode]


# ------------------------------------------------------------------------------ linear / lightning


def linear_flops(B: int, H: int, Hk: int, T: int, Dk: int, Dv: int, mode: str, *,
                 per_query_state: bool = True, chunk: int = CHUNK) -> float:
    """Chunked-form FLOPs of causal linear (lightning) attention.

    Per query head and token: ``2·C·Dk`` (scores of the intra-chunk block) + ``2·C·Dv`` (block
    times values) + ``2·Dk·Dv`` (query times the carried state). State updates ``2·Dk·Dv`` per
    token and per state head (``H`` for lightning, ``Hk`` for linear attention).
    """
    c = min(chunk, max(T, 1))
    state_heads = H if per_query_state else Hk
    fwd = B * T * (H * (2.0 * c * (Dk + Dv) + 2.0 * Dk * Dv) + state_heads * 2.0 * Dk * Dv)
    return fwd * LINEAR_MODE_FLOP_FACTOR[mode]


def linear_bytes(B: int, H: int, Hk: int, T: int, Dk: int, Dv: int, dtype: torch.dtype, mode: str) -> float:
    """Byte floor: read q, k, v, write o (forward); read q, k, v, dO, write dq, dk, dv (backward)."""
    e = elt(dtype)
    q, k, v, o = B * T * H * Dk, B * T * Hk * Dk, B * T * Hk * Dv, B * T * H * Dv
    fwd = (q + k + v + o) * e
    bwd = (q + k + v + o + q + k + v) * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


# ------------------------------------------------------------------------------------ decoding


def decode_bytes(B: int, H: int, Hk: int, Tq: int, L: int, D: int, Dv: int, dtype: torch.dtype) -> float:
    """KV cache read once per KV head (``L`` valid tokens per row), q read, o written."""
    e = elt(dtype)
    return (B * L * Hk * (D + Dv) + B * Tq * H * (D + Dv)) * e


def decode_flops(B: int, H: int, Tq: int, L: int, D: int, Dv: int) -> float:
    return 2.0 * B * H * visible_pairs(Tq, L, True) * (D + Dv)


def step_bytes(B: int, H: int, Hk: int, state_heads: int, Dk: int, Dv: int, dtype: torch.dtype) -> float:
    """One recurrent step: the float32 state read and written, q/k/v read, o written."""
    e = elt(dtype)
    state = 2 * B * state_heads * Dk * Dv * 4
    return state + (B * H * Dk + B * Hk * (Dk + Dv) + B * H * Dv) * e


def step_flops(B: int, H: int, state_heads: int, Dk: int, Dv: int) -> float:
    """Decay and rank-1 update of the state (3 FLOPs per entry) and ``q·S`` (2 per entry)."""
    return B * (3.0 * state_heads + 2.0 * H) * Dk * Dv


def loki_bytes(B: int, H: int, Hk: int, L: int, D: int, Dv: int, rank: int, top_k: int,
               dtype: torch.dtype, selection: str = "head") -> float:
    """Loki decode: the first ``rank`` rotated key dims of every valid position (once per KV
    head), then ``top_k`` full keys and values per selecting head (``H`` heads for per-head
    selection, ``Hk`` for per-group: an upper bound, as heads may pick the same rows), q read,
    o written, the ``[Hk, D, D]`` float32 basis read."""
    e = elt(dtype)
    k_sel = min(top_k, L)
    sel_heads = H if selection == "head" else Hk
    return ((B * L * Hk * rank + B * sel_heads * k_sel * (D + Dv) + B * H * (D + Dv)) * e
            + Hk * D * D * 4)


def loki_flops(B: int, H: int, L: int, D: int, Dv: int, rank: int, top_k: int) -> float:
    """Approximate scores over all positions (``2·rank`` each) and exact attention over ``top_k``."""
    k_sel = min(top_k, L)
    return 2.0 * B * H * (L * rank + k_sel * (D + Dv))


# --------------------------------------------------------------------------------------- peaks


@dataclass(frozen=True)
class Peak:
    """Datasheet peaks: dense (no sparsity) bf16/fp16 tensor-core TFLOP/s and HBM GB/s."""

    name: str
    bf16_tflops: float
    hbm_gbps: float


# Most specific first: the first entry whose every key word occurs in the device name wins.
# Sources: NVIDIA datasheets (H100: SXM5 989 TFLOP/s dense bf16, 3.35 TB/s; PCIe 756, 2.0 TB/s;
# NVL 835, 3.9 TB/s; H200 SXM 989, 4.8 TB/s; H200 NVL 835, 4.8 TB/s; A100 312, 1.555/2.039 TB/s;
# L40S 362, 864 GB/s; RTX 4090 165 (fp32 accumulate), 1008 GB/s; B200 2250, 8 TB/s).
PEAKS: tuple[tuple[tuple[str, ...], Peak], ...] = (
    (("GH200",), Peak("GH200 (H100 SXM compute)", 989.0, 4000.0)),
    (("H200", "NVL"), Peak("H200 NVL", 835.0, 4800.0)),
    (("H200",), Peak("H200 SXM", 989.0, 4800.0)),
    (("H100", "NVL"), Peak("H100 NVL", 835.0, 3900.0)),
    (("H100", "PCIE"), Peak("H100 PCIe", 756.0, 2000.0)),
    (("H100",), Peak("H100 SXM", 989.0, 3350.0)),
    (("B200",), Peak("B200", 2250.0, 8000.0)),
    (("A100", "80GB", "PCIE"), Peak("A100 80GB PCIe", 312.0, 1935.0)),
    (("A100", "80GB"), Peak("A100 80GB SXM", 312.0, 2039.0)),
    (("A100",), Peak("A100 40GB", 312.0, 1555.0)),
    (("L40S",), Peak("L40S", 362.0, 864.0)),
    (("4090",), Peak("RTX 4090", 165.0, 1008.0)),
)


def peak_for(device_name: str | None) -> Peak | None:
    """The peak numbers of a GPU by its name (``torch.cuda.get_device_name``), None if unknown/CPU."""
    if not device_name:
        return None
    upper = device_name.upper()
    for keys, peak in PEAKS:
        if all(k in upper for k in keys):
            return peak
    return None
