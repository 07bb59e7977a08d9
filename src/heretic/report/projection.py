"""2-D projections of residuals: PaCMAP where it is installed, PCA otherwise (numpy only)."""

from __future__ import annotations

import importlib.util

import numpy as np
from numpy.typing import NDArray

Points = NDArray[np.float64]


def projection_method() -> str:
    """ "pacmap" when the pacmap package is installed (pip install pacmap), else "pca"."""
    return "pacmap" if importlib.util.find_spec("pacmap") is not None else "pca"


def pca_2d(points: Points) -> Points:
    """The coordinates of the centered points along their two principal axes (the top right-singular
    vectors of X - mean(X)), signs fixed so that each axis's largest coordinate is positive. (n, d) -> (n, 2)."""
    centered = np.asarray(points, dtype=np.float64) - np.mean(points, axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    axes = vt[:2]  # (<=2, d)
    coordinates = centered @ axes.T
    for k in range(coordinates.shape[1]):
        if -coordinates[:, k].min() > coordinates[:, k].max():
            coordinates[:, k] = -coordinates[:, k]
    if coordinates.shape[1] < 2:  # one-dimensional data
        coordinates = np.hstack([coordinates, np.zeros((len(coordinates), 2 - coordinates.shape[1]))])
    result: Points = coordinates
    return result


def pacmap_2d(points: Points, seed: int = 0) -> Points:
    """PaCMAP embedding (Wang et al. 2021) of the points: local and global structure kept in 2-D."""
    import pacmap

    neighbors = max(2, min(10, len(points) - 2))
    embedding = pacmap.PaCMAP(n_components=2, n_neighbors=neighbors, random_state=seed)
    return np.asarray(embedding.fit_transform(np.asarray(points, dtype=np.float32), init="pca"), dtype=np.float64)


def project_2d(points: Points, method: str | None = None) -> Points:
    """(n, d) -> (n, 2) by `method` (default: projection_method())."""
    if (method or projection_method()) == "pacmap" and len(points) >= 8:
        return pacmap_2d(points)
    return pca_2d(points)


def align(points: Points, harmful: NDArray[np.bool_], harmless: NDArray[np.bool_]) -> Points:
    """Rotate (and scale to unit spread) 2-D points so that the centroid of the `harmless` rows lies left of
    the centroid of the `harmful` rows on the x axis: every layer's picture is then oriented alike."""
    centered = points - points.mean(axis=0)
    gap = centered[harmful].mean(axis=0) - centered[harmless].mean(axis=0)  # harmful - harmless centroid
    angle = -np.arctan2(gap[1], gap[0]) if np.linalg.norm(gap) > 0 else 0.0
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    rotated = centered @ rotation.T
    spread = float(np.abs(rotated).max())
    result: Points = rotated / spread if spread > 0 else rotated
    return result


def project_groups(groups: list[Points], method: str | None = None) -> list[Points]:
    """Groups of residuals of one layer projected together into one 2-D picture, aligned so that the
    first group (harmful) lies right of the second (harmless); e.g. [harmful, harmless] of the original
    followed by [harmful, harmless] of the ablated model, so both share coordinates. Each (n_k, d) -> (n_k, 2)."""
    points = project_2d(np.vstack(groups), method)
    bounds = np.cumsum([0] + [len(group) for group in groups])
    rows = np.arange(len(points))
    aligned = align(points, (rows >= bounds[0]) & (rows < bounds[1]), (rows >= bounds[1]) & (rows < bounds[2]))
    return [aligned[bounds[k] : bounds[k + 1]] for k in range(len(groups))]
