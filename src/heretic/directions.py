"""Refusal directions from residuals (pure tensor math, no model)."""

from __future__ import annotations

import torch
from torch import Tensor


def winsorize(residuals: Tensor, quantile: float) -> Tensor:
    """Clamp each component to +-(the `quantile` of its prompt's and layer's absolute components).

    residuals: (prompts, positions, hidden). quantile 1.0 returns the input unchanged.
    """
    if quantile >= 1.0:
        return residuals
    bound = torch.quantile(residuals.abs().float(), quantile, dim=-1, keepdim=True)  # (prompts, positions, 1)
    return torch.maximum(torch.minimum(residuals, bound), -bound)


def refusal_directions(harmful: Tensor, harmless: Tensor, orthogonalize: bool = True) -> Tensor:
    """Per-position unit refusal directions r_j = normalize(mean_harmful_j - mean_harmless_j).

    harmful: (n1, positions, hidden), harmless: (n2, positions, hidden). Means in float64.
    With `orthogonalize`, r_j loses its component along normalize(mean_harmless_j) and is renormalized,
    so that ablation removes only what distinguishes harmful from harmless prompts.
    Returns (positions, hidden) float32.
    """
    mean_harmful = harmful.double().mean(dim=0)
    mean_harmless = harmless.double().mean(dim=0)
    directions = _normalize(mean_harmful - mean_harmless)
    if orthogonalize:
        harmless_unit = _normalize(mean_harmless)
        directions = directions - (directions * harmless_unit).sum(dim=-1, keepdim=True) * harmless_unit  # r - (r.u)u
        directions = _normalize(directions)
    return directions.float()


def _normalize(vectors: Tensor) -> Tensor:
    unit: Tensor = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit
