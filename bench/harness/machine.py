"""The machine a measurement ran on: its CPU, the instruction sets that decide which dtype is fast,
the CPU profiles a run can emulate, and the commit of the code that ran."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from .paths import ROOT


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.release()}"


# Instruction-set flags that decide which dtype is fast on a CPU.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_int8")
# A CPU without bf16 instructions, emulated on one that has them: oneDNN, MKL and PyTorch's own
# kernels are each limited to AVX2 (bf16 then runs on conversion paths, as on such a CPU).
CPU_PROFILES: dict[str, dict[str, str]] = {
    "native": {},
    "no-bf16": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in SPEED_FLAGS if flag in present]
    except OSError:
        pass
    return []


def git_commit() -> str | None:
    """`git rev-parse --short HEAD` of the repository, or None outside a git checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def run_record() -> dict[str, Any]:
    """What every results file records at run time: the date, the CPU's speed flags and the commit."""
    return {"date": dt.date.today().isoformat(), "cpu_flags": cpu_flags(), "commit": git_commit()}
