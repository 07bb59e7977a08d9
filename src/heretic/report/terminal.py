"""The research views in the terminal: --print-residual-geometry (a table) and --plot-residuals (images)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..directions import read_positions_text
from ..session import Session
from ..ui import console
from .geometry import COLUMNS, LayerGeometry, residual_geometry
from .projection import projection_method
from .research import MAX_PROJECTED_PROMPTS, original_projections, original_residuals


def geometry_table(rows: list[LayerGeometry], positions: str) -> Table:
    table = Table(title=f"Residual geometry ({positions}, output of each layer)", title_justify="left")
    table.add_column("layer", justify="right")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    for row in rows:
        values = row.to_dict()
        table.add_row(
            str(row.layer),
            *(f"{values[name]:.4f}" if name.startswith(("cos", "sil")) else f"{values[name]:.2f}" for name, _, _ in COLUMNS),
        )
    return table


def print_residual_geometry(session: Session) -> None:
    residuals = original_residuals(session)
    with console.status("Computing the residual geometry..."):
        rows = residual_geometry(residuals["harmful"], residuals["harmless"])
    console.print(geometry_table(rows, read_positions_text(session.settings.direction_positions)))
    console.print("g, b: means of the harmless and harmful residuals; g*, b*: their geometric medians; r = b - g, r* = b* - g*")
    for _, header, meaning in COLUMNS:
        console.print(f"  [bold]{header}[/]: {meaning}")


def plot_residual_images(session: Session, folder: Path) -> None:
    from .plots import plot_residuals

    residuals = original_residuals(session)
    method = projection_method()
    with console.status(f"Projecting the residuals of each layer ({method})..."):
        layers = original_projections(residuals, method)
    n_harmful = min(len(residuals["harmful"]), MAX_PROJECTED_PROMPTS)
    title = f"{session.loaded.source.display_name}: residuals ({method.upper() if method == 'pca' else 'PaCMAP'})"
    with console.status(f"Drawing {len(layers)} layers and the animation..."):
        written = plot_residuals(layers, n_harmful, folder, title)
    console.print(f"Residual plots: {len(written) - 1} PNG files and {written[-1].name} in [bold]{folder.resolve()}[/]")


def research_views(session: Session) -> None:
    """What --print-residual-geometry and --plot-residuals ask for, right after the directions."""
    settings = session.settings
    if settings.print_residual_geometry:
        print_residual_geometry(session)
    if settings.plot_residuals:
        plot_residual_images(session, Path(settings.plot_residuals))
