"""Memory in use: the process's RAM (resident and peak) and every CUDA (or Intel XPU) device's, by stage.

On Linux the peak resident size (VmHWM) can be reset (writing 5 to /proc/self/clear_refs), so a
stage's peak is its own, not the largest since the process started; elsewhere it is the process's
peak so far (getrusage). GPUs report their peak since the last reset of their statistics.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import device as backends

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class DeviceMemory:
    device: str  # "cpu" (the process), "cuda:N" or "xpu:N"
    used: int  # bytes: resident set (cpu) or allocated tensors (a GPU)
    peak: int  # bytes: the most since the last reset
    total: int | None = None  # bytes the device has (a GPU), None for the process


def _status_bytes(field: str) -> int | None:
    """A kB field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is no such file."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def process_memory() -> DeviceMemory:
    """The process's resident memory now and at its peak."""
    peak_units = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rusage_peak = peak_units if sys.platform == "darwin" else peak_units * 1024
    used = _status_bytes("VmRSS")
    peak = _status_bytes("VmHWM")
    if used is None:
        import psutil

        used = int(psutil.Process().memory_info().rss)
    return DeviceMemory("cpu", used, peak if peak is not None else max(rusage_peak, used))


def gpu_backends() -> list[tuple[str, Any]]:
    """(name, torch module) of the GPU backends whose memory this torch counts: CUDA, and Intel XPU."""
    found: list[tuple[str, Any]] = [("cuda", torch.cuda)] if torch.cuda.is_available() else []
    xpu = backends.xpu_backend()
    if xpu is not None and hasattr(xpu, "memory_allocated"):
        found.append(("xpu", xpu))
    return found


def device_memory() -> list[DeviceMemory]:
    """The process's memory, then every GPU's (not only the first)."""
    devices = [process_memory()]
    for name, backend in gpu_backends():
        for index in range(backend.device_count()):
            total = backend.get_device_properties(index).total_memory
            allocated, peak = backend.memory_allocated(index), backend.max_memory_allocated(index)
            devices.append(DeviceMemory(f"{name}:{index}", allocated, peak, total))
    return devices


def reset_peaks() -> None:
    """Start a new stage: the peaks measured from now on are its own (where the system allows)."""
    # Not Linux, or not allowed: the process's peak stays the one since it started.
    with contextlib.suppress(OSError):
        CLEAR_REFS.write_text("5")
    for _, backend in gpu_backends():
        for index in range(backend.device_count()):
            backend.reset_peak_memory_stats(index)


def gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def describe(stage: str, devices: list[DeviceMemory]) -> str:
    """One line: the stage, then each device's memory now and its peak in the stage (RAM: the
    process's resident memory)."""
    parts = []
    for device in devices:
        name = "RAM" if device.device == "cpu" else device.device
        of = f" of {gib(device.total)}" if device.total else ""
        parts.append(f"{name} {gib(device.used)}{of} (peak {gib(device.peak)})")
    return f"Memory after {stage}: " + ", ".join(parts)


# --- Stages ----------------------------------------------------------------------------------------
# The stage the run is in (named in out-of-memory errors) and, with --print-memory, where each
# stage's memory is reported.

# What helps when memory runs out in a stage, by the stage's first word.
REMEDIES = {
    "loading": "set --max-memory or --device-map to spread the model over devices and the CPU, or load it with --quantization bnb-4bit",
    "computing": "lower --max-batch-size (the residuals are computed in batches), or load the model with --quantization bnb-4bit",
    "choosing": "set --batch-size to a smaller batch size, or lower --max-batch-size",
    "scoring": "lower --batch-size or --max-batch-size, or --max-response-length",
    "running": "lower --batch-size or --max-batch-size, or --max-response-length, or load the model with --quantization bnb-4bit",
    "saving": "save the adapter instead (save-adapter) or use a machine with more memory",
    "exporting": "save the merged model instead, or use a machine with more memory",
}
DEFAULT_REMEDY = "lower --batch-size or --max-batch-size, or load the model with --quantization bnb-4bit"

_current: list[str] = []
_report: list[Callable[[str], None]] = []


def set_reporter(report: Callable[[str], None] | None) -> None:
    """Where each stage's memory line goes at its end (None: nowhere; --print-memory sets it)."""
    _report.clear()
    if report is not None:
        _report.append(report)


def current_stage() -> str | None:
    return _current[-1] if _current else None


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Run a stage: it is the one named if memory runs out; with a reporter, its memory (now and its
    own peak) is reported when it ends. `name` reads after "while", e.g. "loading the model"."""
    _current.append(name)
    if _report:
        reset_peaks()
    try:
        yield
    except BaseException as error:
        if getattr(error, "heretic_stage", None) is None:  # the innermost stage names it
            with contextlib.suppress(AttributeError, TypeError):
                error.heretic_stage = name  # type: ignore[attr-defined]
        raise
    finally:
        _current.pop()
    if _report:
        _report[0](describe(name, device_memory()))


def stage_of(error: BaseException) -> str | None:
    """The stage in which `error` was raised (None outside every stage)."""
    value = getattr(error, "heretic_stage", None)
    return value if isinstance(value, str) else None


def out_of_memory_message(stage_name: str | None) -> str:
    """One sentence for memory running out: where, and the setting that helps there."""
    where = f" while {stage_name}" if stage_name else ""
    remedy = REMEDIES.get((stage_name or "").split(" ", 1)[0], DEFAULT_REMEDY)
    return f"Out of memory{where}; {remedy}."
