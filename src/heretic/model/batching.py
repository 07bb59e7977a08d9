"""Automatic batch-size choice: measure decoding throughput, back off on out-of-memory."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..prompts import Prompt
from . import device as backends
from .generation import Engine

log = logging.getLogger(__name__)

T = TypeVar("T")

PROBE_PROMPT = Prompt("You are a helpful assistant.", "Write a long story about a lighthouse keeper and a storm.")


@dataclass
class BatchMeasurement:
    batch_size: int
    tokens_per_second: float | None  # None: out of memory


def candidate_sizes(limit: int) -> list[int]:
    sizes, size = [], 1
    while size < limit:
        sizes.append(size)
        size *= 2
    sizes.append(limit)
    return sizes


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, backends.OutOfMemoryError) or any(
        words in text for words in ("out of memory", "can't allocate memory", "cannot allocate memory")
    )


@dataclass(frozen=True)
class Workload:
    """What the batch-size probe decodes: `steps` tokens for copies of one short prompt (`prompts` None),
    or for the first of `prompts` (token ids, longest first), as many as the batch holds."""

    steps: int = 6
    prompts: tuple[tuple[int, ...], ...] | None = None

    def batch(self, engine: Engine, batch_size: int) -> list[list[int]]:
        if self.prompts is None:
            return engine.encode([PROBE_PROMPT]) * batch_size
        return [list(self.prompts[index % len(self.prompts)]) for index in range(batch_size)]


def workload_for(device: torch.device, prompts: list[list[int]], response_length: int) -> Workload:
    """The probe's workload on `device`. On the CPU, 6 steps of one short prompt: speed is what matters
    there, and a full-length probe would cost as much as a trial. On an accelerator, the longest of the
    evaluation `prompts` for the whole `response_length`: memory is what limits the batch there, and a
    trial's peak is its longest prompts' cache at the last step, so a size that passes fits every trial."""
    if device.type == "cpu" or not prompts:
        return Workload()
    return Workload(max(1, response_length), tuple(tuple(ids) for ids in sorted(prompts, key=len, reverse=True)))


def measure(engine: Engine, batch_size: int, workload: Workload) -> float:
    """Generated tokens per second for a batch of `batch_size` of the workload's prompts (a shared prefix is
    computed once, so the short probe costs about `steps` decoding steps)."""
    ids = workload.batch(engine, batch_size)
    started = time.perf_counter()
    responses = engine.generate(ids, workload.steps, batch_size=batch_size)
    elapsed = time.perf_counter() - started
    assert responses is not None
    return sum(len(tokens) for tokens in responses) / max(elapsed, 1e-9)


def choose_batch_size(engine: Engine, limit: int, workload: Workload = Workload()) -> tuple[int, list[BatchMeasurement]]:
    """The batch size with the best decoding throughput among powers of two up to `limit`.

    Stops early once throughput has fallen twice in a row, or at the first out-of-memory error. A fall
    is measured twice before it counts: these measurements last about a second each, so other work on
    the machine can make one of them look slow.
    """
    measurements: list[BatchMeasurement] = []
    measure(engine, 1, Workload(steps=2))  # warm-up: first calls pay one-time kernel selection costs
    best_size, best_rate, falls = 1, 0.0, 0
    for size in candidate_sizes(max(1, limit)):
        rate = measure_if_it_fits(engine, size, workload)
        if rate is not None and rate <= best_rate:
            again = measure_if_it_fits(engine, size, workload)  # a fall counts only if measured twice
            rate = None if again is None else max(rate, again)
        if rate is None:
            measurements.append(BatchMeasurement(size, None))
            _free_memory()
            break
        measurements.append(BatchMeasurement(size, rate))
        log.info("batch size %d: %.1f tokens/s", size, rate)
        if rate > best_rate:
            best_size, best_rate, falls = size, rate, 0
        else:
            falls += 1
            if falls >= 2:
                break
    return best_size, measurements


def measure_if_it_fits(engine: Engine, batch_size: int, workload: Workload) -> float | None:
    """`measure`, or None when the batch does not fit in memory.

    On CPU, when oneDNN cannot allocate the buffer of a batched matmul, PyTorch finishes that product
    on a fallback path and turns oneDNN off for the rest of the process, so every later matmul runs
    about 2x slower and no error reaches us. That batch size counts as too big, and oneDNN goes back on.
    """
    onednn = torch.backends.mkldnn.enabled
    try:
        rate: float | None = measure(engine, batch_size, workload)
    except Exception as error:  # noqa: BLE001 - out-of-memory comes in several types
        if not is_out_of_memory(error):
            raise
        rate = None
    if onednn and not torch.backends.mkldnn.enabled:
        log.warning("batch size %d: oneDNN ran out of memory; switching it back on and using a smaller batch", batch_size)
        torch.backends.mkldnn.enabled = True
        rate = None
    return rate


def _free_memory() -> None:
    backends.free_memory()


def halving_on_oom(engine: Engine, run: Callable[[], T]) -> T:
    """run(), and again with the engine's batch size halved after each out-of-memory error (memory freed
    in between), down to a batch of 1: a trial whose longest prompts do not fit is scored in smaller
    batches instead of ending the search. The smaller size stays for the rest of the run."""
    while True:
        try:
            return run()
        except Exception as error:
            if not is_out_of_memory(error) or engine.batch_size <= 1:
                raise
        _free_memory()
        smaller = max(1, engine.batch_size // 2)
        log.warning("Out of memory with batches of %d; scoring again in batches of %d.", engine.batch_size, smaller)
        engine.batch_size = smaller
