"""Models that accelerate spreads over several devices or offloads to CPU memory or disk.

With a device map that spans devices (`--device-map auto` on a model larger than the GPU, or a map
naming "cpu"/"disk"), accelerate puts a hook on the modules it places: the hook moves a module's inputs
to its execution device, and for an offloaded module keeps the weights elsewhere (CPU memory, or a
memory-mapped file on disk) and leaves the module's own parameters on the meta device, without data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def hooks_of(module: nn.Module) -> list[Any]:
    """The accelerate hooks on `module` itself (a SequentialHook is opened into its parts)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def execution_device(module: nn.Module, fallback: torch.device) -> torch.device:
    """The device `module` computes on: the execution device of an accelerate hook on it or on one of
    its modules, else the device of its first parameter that has data (not meta), else `fallback`."""
    for child in module.modules():
        for hook in hooks_of(child):
            placed = getattr(hook, "execution_device", None)
            if placed is not None:
                return torch.device(f"cuda:{placed}" if isinstance(placed, int) else placed)
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return fallback


def stored_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """The data of `module`'s parameter or buffer `name`: the tensor itself, or for an offloaded module the
    copy its accelerate hook keeps (in CPU memory, or read from the offload folder on disk)."""
    tensor: torch.Tensor = getattr(module, name)
    if tensor.device.type != "meta":
        return tensor
    for hook in hooks_of(module):
        weights = getattr(hook, "weights_map", None)
        if getattr(hook, "offload", False) and weights is not None:
            try:
                stored: torch.Tensor = weights[name]
            except KeyError:
                continue
            return stored
    raise RuntimeError(f"the weight {name} of {type(module).__name__} is on the meta device and no offload hook holds it")


def offloaded_entries(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """{state-dict name: (module, its tensor's name)} of the tensors that are on the meta device (offloaded),
    found before the model's modules are wrapped (their names change then; the module objects do not)."""
    entries = {}
    for module_name, module in model.named_modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor is not None and tensor.device.type == "meta":
                entries[f"{module_name}.{name}" if module_name else name] = (module, name)
    return entries
