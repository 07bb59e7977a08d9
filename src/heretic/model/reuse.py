"""Reusing the original model's work in the layers an ablation leaves as they are.

A trial changes only the layers where its kernels are non-zero; below the first changed layer every
layer computes exactly what the original model computes. The prompt passes of a trial (the KL
divergence's, and the prefill before its responses are generated) read the same prompts every trial,
so the original's part of them is recorded once: for every layer, its input and the keys and values
it puts in the cache, at the prompts' positions. A trial's pass then starts at its first changed
layer: the layers below only put the recorded keys and values in the cache, and the first changed
layer reads the recorded input. Exact: the layers skipped are the original's, and every recorded
tensor comes from a pass over the same batch of the same prompts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .offload import execution_device

log = logging.getLogger(__name__)

# Recorded states are kept in CPU memory, at most this many bytes; batches beyond it are not recorded.
MAX_RECORDED_BYTES = 2**30


@dataclass
class Recorded:
    """The original model's pass over one batch (rows, width suffix positions)."""

    inputs: list[torch.Tensor]  # per layer: its input, (rows, width, hidden)
    keys: list[torch.Tensor]  # per layer: the keys it cached, (rows, kv_heads, width, head_dim)
    values: list[torch.Tensor]

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.inputs, *self.keys, *self.values))


class PassRecord:
    """What a recording pass hands back: its cache, read once the pass is over."""

    def __init__(self) -> None:
        self.cache: object | None = None


class LayerReuse:
    """Records the original's prompt passes and replays them below a trial's first changed layer.

    `unchanged` tells how many leading layers the model's current adapters leave as they are (all of
    them for the original); it is asked at every pass, so a replay always matches the adapters."""

    def __init__(self, layers: Sequence[nn.Module], unchanged: Callable[[], int], budget: int = MAX_RECORDED_BYTES) -> None:
        self.layers = list(layers)
        self.unchanged = unchanged
        self.budget = budget
        self.records: dict[tuple, Recorded] = {}
        self.recording = False  # set while the original model's passes are recorded
        self.used = 0  # bytes recorded
        self.skipped_layers = 0  # layers passes have skipped so far (for tests and logs)

    @staticmethod
    def key(prefix: list[int], suffixes: list[list[int]]) -> tuple:
        return (tuple(prefix), tuple(map(tuple, suffixes)))

    @contextlib.contextmanager
    def recording_original(self) -> Iterator[None]:
        """Record the passes made inside (the model must be the original: no adapter changes a layer)."""
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    def start_layer(self, key: tuple) -> int:
        """The layer a pass over this batch starts at: 0 (a whole pass) unless it is recorded and the
        adapters leave leading layers unchanged. The last layer always runs (it reads the recorded input)."""
        if key not in self.records:
            return 0
        return max(0, min(self.unchanged(), len(self.layers) - 1))

    def should_record(self, key: tuple) -> bool:
        return self.recording and key not in self.records and self.used < self.budget and self.unchanged() >= len(self.layers)

    @contextlib.contextmanager
    def record(self, key: tuple, cached_positions: int) -> Iterator[PassRecord]:
        """Record the pass made inside: every layer's input, and the keys and values the cache holds after
        the first `cached_positions` (those of an earlier pass, the shared prefix) once it is over."""
        inputs: list[torch.Tensor] = []

        def keep_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs.append(hidden.detach().to("cpu", copy=True))

        outputs: list[bool] = []

        def check_output(_module: nn.Module, _args: tuple, output: object) -> None:
            outputs.append(isinstance(output, torch.Tensor))  # a skipped layer returns its input as a tensor

        handles = [layer.register_forward_pre_hook(keep_input, with_kwargs=True) for layer in self.layers]
        handles.append(self.layers[0].register_forward_hook(check_output))
        result = PassRecord()
        try:
            yield result
        finally:
            for handle in handles:
                handle.remove()
        cached = cache_layers(result.cache, len(self.layers))
        if cached is None or len(inputs) != len(self.layers) or outputs != [True]:
            return  # another cache layout (sliding windows, linear attention, offloading): passes run whole
        keys = [layer.keys[:, :, cached_positions:, :].to("cpu", copy=True) for layer in cached]
        values = [layer.values[:, :, cached_positions:, :].to("cpu", copy=True) for layer in cached]
        recorded = Recorded(inputs, keys, values)
        if self.used + recorded.bytes > self.budget:
            log.debug("Not recording a batch of %d bytes: the recorded passes would exceed %d.", recorded.bytes, self.budget)
            self.used = self.budget  # stop recording: later batches would not fit either
            return
        self.records[key] = recorded
        self.used += recorded.bytes

    @contextlib.contextmanager
    def replay(self, key: tuple, start: int, device: torch.device) -> Iterator[None]:
        """Inside, a pass over the recorded batch skips layers 0 .. start-1: each only puts its recorded keys
        and values in the cache, and layer `start` reads its recorded input. Each recorded tensor goes to
        the device its own layer computes on (`execution_device`; `device` where nothing says otherwise), and a
        forward wrapper a layer already has (accelerate's hook, when the model spans devices or is
        offloaded) is put back afterwards."""
        recorded = self.records[key]

        def skipped(index: int) -> Callable[..., torch.Tensor]:
            where = execution_device(self.layers[index], device)

            def forward(hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                if cache is not None:
                    keys, values = recorded.keys[index].to(where), recorded.values[index].to(where)
                    cache.update(keys, values, index)  # type: ignore[attr-defined]
                return hidden_states

            return forward

        first = execution_device(self.layers[start], device)

        def recorded_input(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = recorded.inputs[start].to(first, copy=True)  # the record stays intact whatever the layer does
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        wrappers = [vars(layer).get("forward") for layer in self.layers[:start]]  # None: the class's own forward
        for index in range(start):
            self.layers[index].forward = skipped(index)  # type: ignore[method-assign]  # nn.Module calls self.forward
        handle = self.layers[start].register_forward_pre_hook(recorded_input, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for layer, wrapper in zip(self.layers[:start], wrappers, strict=True):
                if wrapper is None:
                    del layer.forward
                else:
                    layer.forward = wrapper
        self.skipped_layers += start


def cache_layers(cache: object, count: int) -> list | None:
    """The cache's per-layer stores when it is a plain dynamic cache with one full-attention layer per
    decoder layer (keys and values of shape (rows, kv_heads, positions, head_dim)), else None."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or len(layers) != count or getattr(cache, "offloading", False):
        return None
    if any(type(layer).__name__ != "DynamicLayer" or getattr(layer, "keys", None) is None for layer in layers):
        return None
    return layers
