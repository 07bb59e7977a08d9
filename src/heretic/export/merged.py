"""An in-memory merged model (ablation folded into the weights) for exporters that read a state dict."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..ablation.parameters import AblationParameters
from ..session import Session


@contextmanager
def merged_model(session: Session, parameters: AblationParameters) -> Iterator[tuple[torch.nn.Module, set[str]]]:
    """(model, names of the changed parameters): a clean copy of the architecture, without adapters.

    The copy is built on the meta device and then takes the original tensors by reference (no copy)
    except for the ablated weights, which are merged. It is meant for reading its state dict and
    config; it does not run (non-persistent buffers such as rotary tables stay on the meta device).
    A quantized model's copy is built from the original reloaded in full precision on the CPU.
    """
    ablator = session.ablator
    if session.loaded.quantization != "none":  # merge into the original's full-precision weights
        from .save import reload_full_precision

        _, ablator = reload_full_precision(session.loaded, ablator)
    state = ablator.merged_state_dict(parameters, session.directions)
    changed = ablator.changed_parameters(parameters)
    base = ablator.base_model
    with torch.device("meta"):
        clean = type(base)(base.config)
    clean.load_state_dict(state, strict=False, assign=True)
    clean.generation_config = base.generation_config
    try:
        yield clean, changed
    finally:
        del clean, state
