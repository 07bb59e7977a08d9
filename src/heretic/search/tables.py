"""The Pareto front as a terminal table."""

from __future__ import annotations

from rich.table import Table

from ..ablation.parameters import AblationParameters
from .pareto import TrialResult, objective_text
from .space import describe


def front_table(
    front: list[TrialResult],
    n_prompts: int,
    title: str = "Pareto front",
    directions: dict[str, str] | None = None,
    true_refusals: dict[int, str] | None = None,
) -> Table:
    """The trials of the front: refusals (and, given per trial number, the true refusals: the count corrected
    for the judge's error rates), KL, every further objective (its direction under its name), parameters.
    Where trials were counted again on whole responses (heretic/verify.py), their count is marked ✓, and the
    search's count and the degenerate responses stand beside it."""
    table = Table(title=title, title_justify="left")
    table.add_column("trial", justify="right")
    table.add_column("refusals", justify="right")
    verified = any(result.verified for result in front)
    if verified:
        table.add_column("in the\nsearch", justify="right")
        table.add_column("degenerate", justify="right")
    if true_refusals is not None:
        table.add_column("true refusals\n(95 %)", justify="right")
    table.add_column("KL", justify="right")
    names = list(directions or {}) or list(dict.fromkeys(name for result in front for name in result.objectives))
    for name in names:
        direction = (directions or {}).get(name)
        table.add_column(f"{name}\n({direction})" if direction else name, justify="right")
    table.add_column("parameters")
    for result in front:
        parameters = describe(AblationParameters.from_dict(result.parameters)) if result.parameters else ""
        values = [objective_text(result.objectives[name]) if name in result.objectives else "-" for name in names]
        corrected = [true_refusals.get(result.number, "-")] if true_refusals is not None else []
        refusals = f"{result.refusals_text}/{n_prompts}" + (" ✓" if result.verified else "")
        search = [str(result.search_refusals), str(result.degenerate)] if result.verified else ["-", "-"]
        table.add_row(
            str(result.number), refusals, *(search if verified else []), *corrected, f"{result.kl:.4f}", *values, parameters
        )
    return table
