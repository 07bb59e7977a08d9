"""The geometry of harmful and harmless residuals, per layer (pure tensor math, no model).

Notation for one residual position: H (n1 x d) the harmful residuals, G (n2 x d) the harmless ones;
b = mean(H), g = mean(G), b* and g* their geometric medians; r = b - g and r* = b* - g* the
(unnormalized) refusal directions; S(x, y) = x.y / (|x| |y|) the cosine similarity.
Residuals come as (prompts, positions, hidden) with position 0 the embedding output and
position j + 1 the output of layer j.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

# The columns of the geometry table: (field, header, meaning), in order.
COLUMNS: list[tuple[str, str, str]] = [
    ("cos_means", "S(g,b)", "cosine similarity of the harmless and harmful means"),
    ("cos_medians", "S(g*,b*)", "cosine similarity of the harmless and harmful geometric medians"),
    ("cos_harmless_direction", "S(g,r)", "cosine similarity of the harmless mean and the direction r = b - g"),
    ("cos_harmless_direction_medians", "S(g*,r*)", "the same for the medians, r* = b* - g*"),
    ("cos_harmful_direction", "S(b,r)", "cosine similarity of the harmful mean and r"),
    ("cos_harmful_direction_medians", "S(b*,r*)", "the same for the medians"),
    ("norm_harmless", "|g|", "norm of the harmless mean"),
    ("norm_harmless_median", "|g*|", "norm of the harmless geometric median"),
    ("norm_harmful", "|b|", "norm of the harmful mean"),
    ("norm_harmful_median", "|b*|", "norm of the harmful geometric median"),
    ("norm_direction", "|r|", "norm of r = b - g"),
    ("norm_direction_median", "|r*|", "norm of r* = b* - g*"),
    ("silhouette", "silhouette", "silhouette score of the two clusters (1: apart, 0: overlapping, <0: mixed)"),
]


@dataclass(frozen=True)
class LayerGeometry:
    layer: int  # the layer whose output the residuals are (0-based)
    cos_means: float
    cos_medians: float
    cos_harmless_direction: float
    cos_harmless_direction_medians: float
    cos_harmful_direction: float
    cos_harmful_direction_medians: float
    norm_harmless: float
    norm_harmless_median: float
    norm_harmful: float
    norm_harmful_median: float
    norm_direction: float
    norm_direction_median: float
    silhouette: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def cosine(x: Tensor, y: Tensor) -> float:
    """S(x, y) = x.y / (|x| |y|) of two vectors (0 when either is zero)."""
    denominator = float(x.double().norm() * y.double().norm())
    return float(x.double() @ y.double()) / denominator if denominator > 0 else 0.0


def geometric_median(points: Tensor, iterations: int = 200, tolerance: float = 1e-9) -> Tensor:
    """argmin_y sum_i |x_i - y| by Weiszfeld's iteration: y <- sum_i (x_i / d_i) / sum_i (1 / d_i),
    d_i = max(|x_i - y|, eps), started at the mean. points: (n, d) -> (d,), float64."""
    x = points.double()
    y = x.mean(dim=0)
    for _ in range(iterations):
        inverse = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)  # (n,)
        moved: Tensor = (inverse.unsqueeze(1) * x).sum(dim=0) / inverse.sum()
        if (moved - y).norm() <= tolerance * (1.0 + y.norm()):
            return moved
        y = moved
    return y


def silhouette(first: Tensor, second: Tensor) -> float:
    """Mean silhouette s_i = (b_i - a_i) / max(a_i, b_i) over the points of two clusters (Euclidean),
    a_i = mean distance to the other points of its own cluster, b_i = mean distance to the other
    cluster's points. first: (n1, d), second: (n2, d), n1, n2 >= 2."""
    x = torch.cat([first, second]).double()
    label = torch.cat([torch.zeros(len(first)), torch.ones(len(second))]).bool()  # (n,)
    distances = torch.cdist(x, x)  # (n, n)
    same = label.unsqueeze(0) == label.unsqueeze(1)  # (n, n)
    own = (distances * same).sum(dim=1) / (same.sum(dim=1) - 1).clamp_min(1)
    other = (distances * ~same).sum(dim=1) / (~same).sum(dim=1).clamp_min(1)
    scores = (other - own) / torch.maximum(own, other).clamp_min(1e-12)
    return float(scores.mean())


def layer_geometry(layer: int, harmful: Tensor, harmless: Tensor) -> LayerGeometry:
    """The table row of one residual position. harmful: (n1, d), harmless: (n2, d)."""
    b, g = harmful.double().mean(dim=0), harmless.double().mean(dim=0)
    b_star, g_star = geometric_median(harmful), geometric_median(harmless)
    r, r_star = b - g, b_star - g_star
    return LayerGeometry(
        layer=layer,
        cos_means=cosine(g, b),
        cos_medians=cosine(g_star, b_star),
        cos_harmless_direction=cosine(g, r),
        cos_harmless_direction_medians=cosine(g_star, r_star),
        cos_harmful_direction=cosine(b, r),
        cos_harmful_direction_medians=cosine(b_star, r_star),
        norm_harmless=float(g.norm()),
        norm_harmless_median=float(g_star.norm()),
        norm_harmful=float(b.norm()),
        norm_harmful_median=float(b_star.norm()),
        norm_direction=float(r.norm()),
        norm_direction_median=float(r_star.norm()),
        silhouette=silhouette(harmful, harmless),
    )


def residual_geometry(harmful: Tensor, harmless: Tensor) -> list[LayerGeometry]:
    """One row per layer (residual positions 1..L; the embedding output, position 0, is left out).
    harmful: (n1, L + 1, d), harmless: (n2, L + 1, d)."""
    return [layer_geometry(j - 1, harmful[:, j], harmless[:, j]) for j in range(1, harmful.shape[1])]


def difference_norms(harmful: Tensor, harmless: Tensor) -> list[float]:
    """|mean_harmful_j - mean_harmless_j| for every layer j (positions 1..L): how strongly each layer's
    residuals separate the two sets before normalization. Same shapes as residual_geometry."""
    difference = harmful.double().mean(dim=0) - harmless.double().mean(dim=0)  # (L + 1, d)
    return [float(value) for value in difference[1:].norm(dim=-1)]


def direction_similarities(directions: Tensor) -> Tensor:
    """C[i, k] = S(r_i, r_k) between the layers' directions (positions 1..L). directions: (L + 1, d) -> (L, L)."""
    units = directions[1:].double()
    units = units / units.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarities: Tensor = units @ units.T
    return similarities
