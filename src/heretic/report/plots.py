"""Residual projections as images: one PNG per layer and an animated GIF across the layers (matplotlib, pillow)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import HereticError

HARMFUL, HARMLESS = "#d62728", "#1f77b4"
LAYER_MS = 1000  # how long each layer stands in the animation
TRANSITION_FRAMES = 6  # frames moving each point from one layer's position to the next
TRANSITION_MS = 60


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HereticError(
            "--plot-residuals draws with matplotlib, which is not installed; install it with: pip install matplotlib"
        ) from None
    return plt


def render_frame(points: np.ndarray, n_harmful: int, title: str, label: str) -> Image.Image:
    """One picture: points (n, 2), harmful rows first, the rest harmless."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 5.5), dpi=100)
    axes.scatter(points[n_harmful:, 0], points[n_harmful:, 1], s=12, c=HARMLESS, alpha=0.6, label="harmless")
    axes.scatter(points[:n_harmful, 0], points[:n_harmful, 1], s=12, c=HARMFUL, alpha=0.6, label="harmful")
    axes.set_xlim(-1.1, 1.1)
    axes.set_ylim(-1.1, 1.1)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(loc="upper right")
    axes.set_title(title)
    figure.text(0.98, 0.02, label, ha="right", va="bottom")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def plot_residuals(layers: list[np.ndarray], n_harmful: int, folder: Path, title: str) -> list[Path]:
    """layer_NNN.png for each layer's 2-D points (n, 2; harmful rows first) and animation.gif through all
    of them, points gliding between layers. Returns the files written."""
    folder = folder.expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    written, frames, durations = [], [], []
    for layer, points in enumerate(layers):
        image = render_frame(points, n_harmful, title, f"layer {layer:03d}")
        path = folder / f"layer_{layer:03d}.png"
        _atomic_save(image, path)
        written.append(path)
        frames.append(image)
        durations.append(LAYER_MS)
        if layer + 1 < len(layers):
            for step in range(1, TRANSITION_FRAMES):
                blend = points + (step / TRANSITION_FRAMES) * (layers[layer + 1] - points)
                frames.append(render_frame(blend, n_harmful, title, f"layer {layer:03d} → {layer + 1:03d}"))
                durations.append(TRANSITION_MS)
    animation = folder / "animation.gif"
    _atomic_save(frames[0], animation, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return [*written, animation]


def _atomic_save(image: Image.Image, path: Path, **options: object) -> None:
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        image.save(staging, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"), **options)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
