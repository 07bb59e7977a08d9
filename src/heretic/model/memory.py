"""Memory in use: the process's RAM (resident and peak) and every CUDA device's, by stage.

On Linux the peak resident size (VmHWM) can be reset (writing 5 to /proc/self/clear_refs), so a
stage's peak is its own, not the largest since the process started; elsewhere it is the process's
peak so far (getrusage). CUDA devices report their peak since the last reset of their statistics.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class DeviceMemory:
    device: str  # "cpu" (the process) or "cuda:N"
    used: int  # bytes: resident set (cpu) or allocated tensors (cuda)
    peak: int  # bytes: the most since the last reset
    total: int | None = None  # bytes the device has (cuda), None for the process


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


def device_memory() -> list[DeviceMemory]:
    """The process's memory, then every CUDA device's (not only the first)."""
    devices = [process_memory()]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            total = torch.cuda.get_device_properties(index).total_memory
            devices.append(
                DeviceMemory(f"cuda:{index}", torch.cuda.memory_allocated(index), torch.cuda.max_memory_allocated(index), total)
            )
    return devices


def reset_peaks() -> None:
    """Start a new stage: the peaks measured from now on are its own (where the system allows)."""
    # Not Linux, or not allowed: the process's peak stays the one since it started.
    with contextlib.suppress(OSError):
        CLEAR_REFS.write_text("5")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)


def gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def describe(stage: str, devices: list[DeviceMemory]) -> str:
    """One line: the stage, then each device's memory now and its peak in the stage."""
    parts = []
    for device in devices:
        name = "RAM" if device.device == "cpu" else device.device
        of = f" of {gib(device.total)}" if device.total else ""
        parts.append(f"{name} {gib(device.used)}{of} (peak {gib(device.peak)})")
    return f"Memory after {stage}: " + ", ".join(parts)
