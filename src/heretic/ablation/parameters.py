"""The parameters of one ablation (what a search trial chooses)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .kernels import interpolate_direction, interpolate_subspace, kernel_weight


@dataclass(frozen=True)
class ComponentKernel:
    """Weight kernel of one component over the layers: W at P, linear to Wmin at distance D, 0 beyond."""

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def weight(self, layer: int) -> float:
        return kernel_weight(layer, self.max_weight, self.max_weight_position, self.min_weight, self.min_weight_distance)


@dataclass(frozen=True)
class AblationParameters:
    """direction_scope "global": every layer uses the direction at (fractional) layer `direction_index`;
    "per-layer": layer i uses its own direction."""

    direction_scope: str
    direction_index: float
    kernels: dict[str, ComponentKernel] = field(default_factory=dict)

    def direction_for(self, directions: torch.Tensor, layer: int) -> torch.Tensor:
        """Direction ablated in `layer`. directions: (layers + 1, hidden); index j+1 is the output of layer j.
        With bases (layers + 1, k, hidden) (a subspace per position), the (k, hidden) basis ablated in `layer`."""
        if self.direction_scope == "per-layer":
            return directions[layer + 1]
        if directions.dim() == 3:
            return interpolate_subspace(directions, self.direction_index + 1.0)
        return interpolate_direction(directions, self.direction_index + 1.0)

    def weight(self, component: str, layer: int) -> float:
        kernel = self.kernels.get(component)
        return kernel.weight(layer) if kernel is not None else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "direction_scope": self.direction_scope,
            "direction_index": self.direction_index,
            "kernels": {name: asdict(kernel) for name, kernel in self.kernels.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AblationParameters:
        kernels = {name: ComponentKernel(**values) for name, values in data.get("kernels", {}).items()}
        return cls(str(data["direction_scope"]), float(data["direction_index"]), kernels)
