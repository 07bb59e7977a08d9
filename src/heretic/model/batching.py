"""Automatic batch-size choice: measure decoding throughput, back off on out-of-memory."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..prompts import Prompt
from .generation import Engine

log = logging.getLogger(__name__)

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
    return isinstance(error, torch.OutOfMemoryError) or any(
        words in text for words in ("out of memory", "can't allocate memory", "cannot allocate memory")
    )


def measure(engine: Engine, batch_size: int, steps: int) -> float:
    """Generated tokens per second for `batch_size` copies of a short prompt (the shared prefix is
    computed once, so the probe costs about `steps` decoding steps)."""
    ids = engine.encode([PROBE_PROMPT]) * batch_size
    started = time.perf_counter()
    responses = engine.generate(ids, steps, batch_size=batch_size)
    elapsed = time.perf_counter() - started
    assert responses is not None
    return sum(len(tokens) for tokens in responses) / max(elapsed, 1e-9)


def choose_batch_size(engine: Engine, limit: int, steps: int = 6) -> tuple[int, list[BatchMeasurement]]:
    """The batch size with the best decoding throughput among powers of two up to `limit`.

    Stops early once throughput has fallen twice in a row, or at the first out-of-memory error. A fall
    is measured twice before it counts: these measurements last about a second each, so other work on
    the machine can make one of them look slow.
    """
    measurements: list[BatchMeasurement] = []
    measure(engine, 1, 2)  # warm-up: first calls pay one-time kernel selection costs
    best_size, best_rate, falls = 1, 0.0, 0
    for size in candidate_sizes(max(1, limit)):
        rate = measure_if_it_fits(engine, size, steps)
        if rate is not None and rate <= best_rate:
            again = measure_if_it_fits(engine, size, steps)  # a fall counts only if measured twice
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


def measure_if_it_fits(engine: Engine, batch_size: int, steps: int) -> float | None:
    """`measure`, or None when the batch does not fit in memory.

    On CPU, when oneDNN cannot allocate the buffer of a batched matmul, PyTorch finishes that product
    on a fallback path and turns oneDNN off for the rest of the process, so every later matmul runs
    about 2x slower and no error reaches us. That batch size counts as too big, and oneDNN goes back on.
    """
    onednn = torch.backends.mkldnn.enabled
    try:
        rate: float | None = measure(engine, batch_size, steps)
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
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
