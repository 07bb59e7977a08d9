"""The machine the model runs on: the cores this process may use, and the fastest compute dtype.

Speed differs by dtype far more than by anything else we control: on a CPU without bf16
instructions a bfloat16 matrix product runs on a scalar fallback ~20-40x slower than float32,
while on a CPU with AMX or a recent GPU bfloat16 is the faster one. So the dtype is measured,
like the batch size, instead of assumed.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import DEVICE_MAP_STRATEGIES, device_map_value
from .device import accelerator, synchronize

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Rows of the probe's matrix products: a typical decoding batch.
PROBE_ROWS = 64
# Largest single product of the probe (FLOPs): a dtype on a scalar fallback (~1 GFLOP/s) then costs
# about a second to measure, not a minute, for the largest models.
MAX_PRODUCT_FLOPS = 5e8
# A dtype must be this much faster than a preferred one to be chosen over it.
SPEED_MARGIN = 1.10
# Below this share of the threads' time, another process is taking the CPU from us.
BUSY_UTILIZATION = 0.6


# --- Cores ---------------------------------------------------------------------------------------


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup's quota (quota / period), or None when unlimited or unknown.

    cgroup v2 keeps "<quota> <period>" in cpu.max ("max" when unlimited); v1 keeps them in
    cpu.cfs_quota_us and cpu.cfs_period_us (quota -1 when unlimited)."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            return None if quota == "max" else int(quota) / int(period or 100000)
        v1 = root / "cpu" / "cpu.cfs_quota_us"
        if v1.is_file():
            quota_us = int(v1.read_text())
            period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


def available_cores(root: Path = CGROUP_ROOT) -> int:
    """Cores this process may run on: its CPU affinity, capped by the cgroup's CPU quota.

    `os.cpu_count()` counts the machine's cores, which overcounts in containers and under
    taskset; threads beyond the real share only contend with each other."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        affinity = min(affinity, max(1, math.ceil(limit)))
    return max(1, affinity)


def configure_threads() -> tuple[int, str]:
    """Set PyTorch's intra-op threads to the cores available; (threads, where the number came from).

    OMP_NUM_THREADS (or a thread count the user set in code before) wins."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = available_cores()
    if torch.get_num_threads() != cores:
        torch.set_num_threads(cores)
    return cores, "cores available to this process"


# --- Compute dtype -------------------------------------------------------------------------------


@dataclass
class DtypeMeasurement:
    dtype: torch.dtype
    gflops: float | None  # None: the dtype does not run on this device
    utilization: float | None = None  # CPU: share of the threads' time the probe really got
    seconds: float = 0.0  # what measuring it took, warm-up included
    remembered: bool = False  # taken from an earlier run's measurement on this machine


def probe_device(device_map: str) -> torch.device:
    """The device that does the model's matrix products under this --device-map: the first device other than
    the CPU or disk that a JSON object names (a GPU index is one of this machine's accelerator), the first
    accelerator under a strategy (auto, balanced, balanced_low_0, sequential; the CPU where there is none),
    else the device named."""
    kind = accelerator()
    value = device_map_value(device_map)
    if isinstance(value, dict):
        named = [device for device in value.values() if device not in ("cpu", "disk")]
        value = named[0] if named else "cpu"
    if isinstance(value, int):
        return torch.device(kind or "cuda", value)
    if value in DEVICE_MAP_STRATEGIES:
        return torch.device("cpu" if kind is None else kind if kind == "mps" else f"{kind}:0")
    return torch.device(value)


def candidate_dtypes(native: torch.dtype, device: torch.device) -> list[torch.dtype]:
    """Dtypes worth measuring, most preferred first: the model's own, then bfloat16, then float32.

    float16 is a candidate only where it is the model's own dtype or bfloat16 is unsupported (older
    GPUs): models trained in bfloat16 often overflow float16's range, which a short test misses."""
    order = [native]
    order.append(torch.bfloat16 if native_bf16(device) else torch.float16)
    order.append(torch.float32)
    return list(dict.fromkeys(order))


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively: on CUDA from compute capability 8.0 (Ampere) on.

    torch.cuda.is_bf16_supported() alone also counts the emulation of older GPUs (T4, V100), slower than
    float16 there; its including_emulation keyword leaves that out (where this torch has it; else the compute
    capability decides)."""
    if device.type != "cuda":
        return True
    if "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return torch.cuda.get_device_capability(device)[0] >= 8


def probe_shape(hidden: int, intermediate: int) -> tuple[int, int]:
    """(inner, outer) sizes of the probe's weight: the model's hidden size by its MLP width, the
    width cut so that one product stays under MAX_PRODUCT_FLOPS (speed per FLOP barely depends on it)."""
    outer = min(intermediate, max(256, int(MAX_PRODUCT_FLOPS / (2 * PROBE_ROWS * hidden))))
    return hidden, outer


def measure_dtype(
    dtype: torch.dtype, device: torch.device, hidden: int, intermediate: int, seconds: float = 0.4
) -> DtypeMeasurement:
    """GFLOP/s of a decoding matrix product in `dtype`: x (rows, hidden) @ W^T (outer, hidden).

    Runs for about `seconds` after one warm-up product; on the CPU it also records which share of the
    threads' time the process got: CPU time / (wall time x threads)."""
    inner, outer = probe_shape(hidden, intermediate)
    begun = time.perf_counter()
    try:
        x = torch.randn(PROBE_ROWS, inner, device=device).to(dtype)
        weight = (torch.randn(outer, inner, device=device) / math.sqrt(inner)).to(dtype)
        torch.nn.functional.linear(x, weight)  # warm-up: kernel selection and allocation
        synchronize(device)
    except (RuntimeError, TypeError) as error:  # the dtype has no kernel on this device
        log.info("%s does not run on %s: %s", dtype, device, error)
        return DtypeMeasurement(dtype, None, seconds=time.perf_counter() - begun)
    products, elapsed = 0, 0.0
    started, cpu_started = time.perf_counter(), time.process_time()
    while elapsed < seconds:
        torch.nn.functional.linear(x, weight)
        synchronize(device)
        products += 1
        elapsed = time.perf_counter() - started
    utilization = None
    if device.type == "cpu":
        utilization = (time.process_time() - cpu_started) / (elapsed * torch.get_num_threads())
    flops = 2.0 * PROBE_ROWS * inner * outer * products
    return DtypeMeasurement(dtype, flops / elapsed / 1e9, utilization, time.perf_counter() - begun)


# Environment variables that limit the kernels a library may use, and so the speed of a dtype.
KERNEL_LIMITS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")


def device_signature(device: torch.device) -> dict[str, object]:
    """What a dtype's speed depends on: the processor (model and instruction-set flags) or GPU, the
    threads, PyTorch's version and the environment variables that limit its kernels."""
    if device.type in ("cuda", "xpu"):
        name = getattr(torch, device.type).get_device_name(device)
    elif device.type == "cpu":
        name = _cpuinfo_digest()
    else:
        name = device.type
    return {
        "device": name,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": torch.__version__,
        "limits": {key: os.environ.get(key) for key in KERNEL_LIMITS if os.environ.get(key)},
    }


def _cpuinfo_digest() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:16]


def remembered(path: Path, key: str) -> list[DtypeMeasurement] | None:
    """The measurements an earlier run stored under `key`, if any (a damaged file counts as none)."""
    try:
        rows = json.loads(path.read_text())[key]
        return [
            DtypeMeasurement(getattr(torch, row["dtype"]), row["gflops"], row["utilization"], row["seconds"], True)
            for row in rows
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def remember(path: Path, key: str, measurements: list[DtypeMeasurement]) -> None:
    """Store the measurements under `key` (atomically; other keys are kept)."""
    try:
        stored = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(stored, dict):
            stored = {}
    except (OSError, ValueError):
        stored = {}
    stored[key] = [dict(asdict(m), dtype=dtype_name(m.dtype), remembered=False) for m in measurements]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.write_text(json.dumps(stored, indent=1, sort_keys=True))
        os.replace(staging, path)
    except OSError as error:  # a read-only cache only costs a new measurement next time
        log.info("Could not store the dtype measurements in %s: %s", path, error)


def measure_or_remember(
    path: Path, native: torch.dtype, device: torch.device, hidden: int, intermediate: int
) -> list[DtypeMeasurement]:
    """The candidate dtypes' speeds at these sizes on this device: measured once per machine, then
    remembered, so that every run (a resumed search too) computes in the same dtype. A measurement
    that another busy process disturbed is not remembered."""
    identity = {"sizes": [hidden, intermediate], "native": dtype_name(native), **device_signature(device)}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    earlier = remembered(path, key)
    if earlier is not None:
        return earlier
    measurements = [measure_dtype(dtype, device, hidden, intermediate) for dtype in candidate_dtypes(native, device)]
    if busy_warning(measurements, torch.get_num_threads()) is None:  # a disturbed measurement is made again next time
        remember(path, key, measurements)
    return measurements


def rank_dtypes(measurements: list[DtypeMeasurement]) -> list[torch.dtype]:
    """The measured dtypes, best first: the fastest, unless an earlier (preferred) one is within
    SPEED_MARGIN of it. Dtypes that did not run are dropped."""
    ranked: list[torch.dtype] = []
    remaining = [m for m in measurements if m.gflops]
    while remaining:
        fastest = max(m.gflops or 0.0 for m in remaining)
        pick = next(m for m in remaining if (m.gflops or 0.0) * SPEED_MARGIN >= fastest)
        ranked.append(pick.dtype)
        remaining.remove(pick)
    return ranked


def busy_warning(measurements: list[DtypeMeasurement], threads: int) -> str | None:
    """A warning when the probe got much less CPU than its threads could use (another busy process)."""
    shares = [m.utilization for m in measurements if m.utilization is not None and not m.remembered]
    if not shares or max(shares) >= BUSY_UTILIZATION:
        return None
    got = max(shares) * threads
    return (
        f"Another process is using this CPU: the speed probe got {got:.1f} of {threads} cores, so the search "
        "will run slower, and the dtype and batch size chosen now may not be the best once the machine is free."
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_choice(
    chosen: torch.dtype, native: torch.dtype | None, measurements: list[DtypeMeasurement], device: str, threads: str
) -> str:
    """One line saying which compute dtype was chosen and why (the start-up output)."""
    if not measurements:
        reason = "as --dtypes asked"
    else:
        rates = ", ".join(
            f"{dtype_name(m.dtype)} {m.gflops:.0f}" if m.gflops else f"{dtype_name(m.dtype)} does not run" for m in measurements
        )
        ranked = rank_dtypes(measurements)
        verdict = "the fastest" if ranked and ranked[0] == chosen else "the fastest that passed the test generation"
        took = sum(m.seconds for m in measurements)
        when = "by an earlier run" if measurements[0].remembered else f"in {took:.1f} s"
        reason = f"{verdict} measured on {device} {when}; GFLOP/s at this model's sizes: {rates}"
    line = f"Compute dtype [bold]{dtype_name(chosen)}[/] ({reason}); {threads}"
    if native is not None and native != chosen:
        line += f"; saved models are written in {dtype_name(native)}, the model's own dtype (--save-dtype)"
    return line
