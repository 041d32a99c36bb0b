"""Developer tools: a static GPU audit of the Triton kernels, a launch-plan model, and the
device-size helper that host code uses to size grids.

* ``python -m attnkit.tools.gpu_audit``: compiles every recorded Triton kernel variant for sm_90 /
  sm_80 without a GPU and reports shared memory, registers, spills and the MMA kind
  (``docs/gpu_audit.md``).
* ``python -m attnkit.tools.launch_plan``: every kernel launch of one call, its grid and the host
  allocations, next to the op's byte floor, without executing a kernel.
* :func:`sm_count`: streaming multiprocessors to size grids for (honours ``ATTNKIT_SM_COUNT``).

Importing this package imports neither Triton nor the kernels (``import attnkit`` stays light);
the two commands import them when they run.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["DEFAULT_SM_COUNT", "SM_COUNT_ENV", "sm_count"]

#: Environment variable that overrides the SM count on every device (e.g. ``132`` to plan for an
#: H100 SXM on a CPU-only machine; ``launch_plan --sms N`` sets it).
SM_COUNT_ENV = "ATTNKIT_SM_COUNT"

#: SM count used for non-CUDA devices (the CPU interpreter, planning) when the variable is unset:
#: an H100 SXM, the device the kernels are tuned for.
DEFAULT_SM_COUNT = 132


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _env_sm_count() -> int | None:
    raw = os.environ.get(SM_COUNT_ENV)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{SM_COUNT_ENV} must be a positive integer (streaming multiprocessors), got {raw!r}")
    return value


def sm_count(device: torch.device | str | int | None = None) -> int:
    """Streaming multiprocessors to size grids for (split-KV, segment counts, persistent grids).

    Order: the environment variable ``ATTNKIT_SM_COUNT`` (a positive integer, applied to every
    device, so a CPU-only machine can plan for a GPU); else, for a CUDA device, its multiprocessor
    count (cached per device index; ``None`` means the current CUDA device when CUDA is
    available); else :data:`DEFAULT_SM_COUNT` (132).

    Args:
        device: a ``torch.device``, a device string (``"cuda:1"``, ``"cpu"``), a CUDA device
            index, or ``None``.

    Returns:
        The SM count, an int ``>= 1``.

    Raises:
        ValueError: ``ATTNKIT_SM_COUNT`` is set but is not a positive integer.
        TypeError: `device` is not one of the accepted types.

    Example:
        >>> n_splits = max(1, min(cdiv(2 * sm_count(q.device), programs), max_splits))
    """
    env = _env_sm_count()
    if env is not None:
        return env
    if device is None:
        if not torch.cuda.is_available():
            return DEFAULT_SM_COUNT
        return _cuda_sm_count(torch.cuda.current_device())
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise TypeError(f"device must be a torch.device, str, int or None, got {type(device).__name__}")
    if isinstance(device, int):
        device = torch.device("cuda", device)
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)
