"""Refusal directions from residuals (pure tensor math, no model)."""

from __future__ import annotations

import torch
from torch import Tensor


def read_positions_text(positions: list[int]) -> str:
    """Where the residuals are read, in words: "last prompt token", "mean of the last 5 prompt tokens",
    or "mean of prompt positions -3, -1" (offsets counted from the end of the prompt)."""
    if positions == [-1]:
        return "last prompt token"
    if sorted(positions) == list(range(-len(positions), 0)):
        return f"mean of the last {len(positions)} prompt tokens"
    return "mean of prompt positions " + ", ".join(str(p) for p in positions)


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


def subspace_bases(harmful: Tensor, harmless: Tensor, directions: Tensor, rank: int) -> Tensor:
    """Per-position orthonormal bases (positions, rank, hidden) whose first rows are the `directions`.

    With paired per-prompt differences d_i = h_i - b_i (i < min(n1, n2)) at position j, and their parts
    orthogonal to r_j, d_i' = d_i - (d_i . r_j) r_j, the further rows are the top rank - 1 right singular
    vectors of D' = [d_1'; ...; d_n'] (the directions along which the differences vary most besides r_j),
    made orthonormal to r_j and each other by Gram-Schmidt. harmful: (n1, positions, hidden),
    harmless: (n2, positions, hidden), directions: (positions, hidden) unit rows.
    """
    if rank <= 1:
        return directions.unsqueeze(1)
    n = min(harmful.shape[0], harmless.shape[0])
    differences = (harmful[:n] - harmless[:n]).double().transpose(0, 1)  # (positions, n, hidden)
    r = directions.double().unsqueeze(1)  # (positions, 1, hidden)
    rest = differences - (differences * r).sum(dim=-1, keepdim=True) * r  # d - (d.r) r
    _, _, vh = torch.linalg.svd(rest, full_matrices=False)  # vh: (positions, min(n, hidden), hidden)
    extra = vh[:, : rank - 1, :]
    return torch.stack([orthonormal_rows(torch.cat([r[j], extra[j]])) for j in range(directions.shape[0])])


def orthonormal_rows(vectors: Tensor) -> Tensor:
    """Gram-Schmidt on the rows (k, hidden): u_i = normalize(x_i - sum_{j<i} (x_i . u_j) u_j); float32."""
    basis: list[Tensor] = []
    for vector in vectors.double():
        for unit in basis:
            vector = vector - (vector @ unit) * unit
        basis.append(vector / vector.norm().clamp_min(1e-12))
    return torch.stack(basis).float()


def _normalize(vectors: Tensor) -> Tensor:
    unit: Tensor = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit
