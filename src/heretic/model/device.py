"""The accelerator this process may use, and what PyTorch names differently by backend or version.

CUDA, Intel XPU and Apple MPS each have their own availability check and memory cache, and some
names exist only in releases later than the oldest PyTorch allowed (torch>=2.4): they are looked
up here, once, so that the rest of the package works on all of them alike.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

# Raised when a device runs out of memory: device-agnostic as torch.OutOfMemoryError from torch 2.5,
# before that torch.cuda.OutOfMemoryError (the same class in later releases).
OutOfMemoryError: type[Exception] = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError

# The accelerators the model may run on, in the order they are checked where torch cannot say which it has.
ACCELERATORS = ("cuda", "xpu", "mps")


def xpu_backend() -> Any | None:
    """torch.xpu where this torch has it and an Intel GPU is available, else None."""
    xpu = getattr(torch, "xpu", None)
    return xpu if xpu is not None and xpu.is_available() else None


def mps_available() -> bool:
    """Whether Apple's MPS backend is available."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _available(kind: str) -> bool:
    """Whether the accelerator `kind` ("cuda", "xpu" or "mps") is available, by its backend's own check."""
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "xpu":
        return xpu_backend() is not None
    return mps_available()


def accelerator() -> str | None:
    """The type of the accelerator this process may use ("cuda", "xpu" or "mps"), or None (the CPU only).

    torch.accelerator (torch 2.6 on) names the one this torch was built for, checked at run time; older
    releases are asked backend by backend."""
    api = getattr(torch, "accelerator", None)
    if api is None or not hasattr(api, "current_accelerator"):
        return next((kind for kind in ACCELERATORS if _available(kind)), None)
    if not api.is_available():  # torch 2.6's current_accelerator() raises when there is none
        return None
    found = api.current_accelerator()
    return found.type if found is not None and found.type in ACCELERATORS else None


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (an accelerator runs it asynchronously; the CPU has nothing queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def cuda_started() -> bool:
    """Whether CUDA has been started in this process (it then keeps the GPUs CUDA_VISIBLE_DEVICES named then)."""
    return bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]  # torch leaves it unannotated


def free_memory() -> None:
    """Collect Python's garbage, then give every backend's cached blocks back to its device (between stages,
    and after an out-of-memory error), so that the next stage, or another process, can use them."""
    gc.collect()
    if cuda_started():  # CUDA caches nothing before its first use (and checking would start it)
        torch.cuda.empty_cache()
    xpu = xpu_backend()
    if xpu is not None and hasattr(xpu, "empty_cache"):
        xpu.empty_cache()
    if mps_available():
        torch.mps.empty_cache()
