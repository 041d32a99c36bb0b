"""Context parallelism over `torch.distributed`: one sequence sharded across ranks.

Each rank of a process group holds one shard of the same batch of sequences along the time dim
and calls the op with its shard; the result is that rank's shard of the single-process op.

* `shard_sequence` / `gather_sequence`: cut and reassemble a whole tensor in the `contiguous` or
  `zigzag` layout.
* `lightning_attention`, `linear_attention`: LASP-2 style, only recurrent states travel (one
  all-gather of `[B, H, Dk, Dv]` per call, independent of `T`).
* `attention`: softmax attention, all-gather of K/V with `Hk` heads and a log-sum-exp merge.

Works with any backend of `torch.distributed` (NCCL on GPUs, gloo on CPUs). See `docs/distributed.md`.
"""

from .linear import lightning_attention, linear_attention
from .sequence import LAYOUTS, gather_sequence, shard_sequence
from .softmax import attention

__all__ = ["LAYOUTS", "attention", "gather_sequence", "lightning_attention", "linear_attention", "shard_sequence"]
