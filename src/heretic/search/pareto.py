"""The Pareto front of (refusals, KL, and any optimized objectives) and the headless choice rules."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..errors import HereticError


@dataclass(frozen=True)
class TrialResult:
    number: int
    refusals: int
    kl: float
    cut: bool  # refusals is a lower bound: counting stopped once the trial was certainly dominated
    seconds: float
    parameters: dict[str, Any]
    objectives: dict[str, float] = field(default_factory=dict)  # the value of each further objective, by name
    # Set when `refusals` is the verified count (whole responses, heretic/verify.py): the search's count, and the
    # degenerate responses among the verified ones (scoring/coherence.py).
    search_refusals: int | None = None
    degenerate: int | None = None

    @property
    def refusals_text(self) -> str:
        return f"≥{self.refusals}" if self.cut else str(self.refusals)

    @property
    def verified(self) -> bool:
        return self.search_refusals is not None


@dataclass(frozen=True)
class VerifiedCount:
    """A trial's refusals counted again on whole responses after the search (heretic/verify.py)."""

    refusals: int
    degenerate: int  # degenerate responses among them (scoring/coherence.py)
    seconds: float  # what the count took


def with_verified(results: list[TrialResult], verified: dict[int, VerifiedCount]) -> list[TrialResult]:
    """The results with the verified count as `refusals` where a trial has one (the search's in `search_refusals`)."""
    return [
        replace(r, refusals=v.refusals, cut=False, search_refusals=r.refusals, degenerate=v.degenerate)
        if (v := verified.get(r.number)) is not None
        else r
        for r in results
    ]


def trial_results(study: optuna.Study) -> list[TrialResult]:
    results = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        results.append(from_frozen(trial))
    return results


def from_frozen(trial: FrozenTrial) -> TrialResult:
    attrs = trial.user_attrs
    return TrialResult(
        number=trial.number,
        refusals=int(attrs["refusals"]),
        kl=float(attrs["kl"]),
        cut=bool(attrs.get("cut", False)),
        seconds=float(attrs.get("seconds", 0.0)),
        parameters=dict(attrs.get("parameters", {})),
        objectives={str(name): float(value) for name, value in attrs.get("objectives", {}).items()},
    )


def objective_text(value: float) -> str:
    """An objective's value as tables and trial lines show it (4 significant digits)."""
    return f"{value:.4g}"


def study_directions(study: optuna.Study) -> dict[str, str]:
    """The further objectives of a study and their directions (minimize, maximize, report), by name."""
    return {str(name): str(direction) for name, direction in study.user_attrs.get("objective_directions", {}).items()}


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a is no worse than b in every coordinate and better in one (all minimized)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def point(result: TrialResult, directions: dict[str, str] | None = None) -> tuple[float, ...]:
    """The minimized coordinates of a trial: (refusals, KL, then each optimized objective, maximized ones negated)."""
    extra = [
        -result.objectives[name] if direction == "maximize" else result.objectives[name]
        for name, direction in (directions or {}).items()
        if direction != "report"
    ]
    return (result.refusals, result.kl, *extra)


def pareto_front(results: list[TrialResult], directions: dict[str, str] | None = None) -> list[TrialResult]:
    """Non-dominated trials over refusals, KL and the optimized objectives of `directions` (cut trials are
    dominated by construction), by refusals then KL."""
    exact = [r for r in results if not r.cut]
    points = {r.number: point(r, directions) for r in exact}
    front = [r for r in exact if not any(dominates(points[o.number], points[r.number]) for o in exact)]
    unique: dict[tuple[float, ...], TrialResult] = {}
    for result in sorted(front, key=lambda r: (*points[r.number], r.number)):
        unique.setdefault(points[result.number], result)
    return list(unique.values())


def is_dominated(refusals_lower_bound: int, kl: float, results: list[TrialResult]) -> bool:
    """True if a finished, exact trial already beats any outcome with at least these refusals and this KL."""
    return any(not r.cut and dominates((r.refusals, r.kl), (refusals_lower_bound, kl)) for r in results)


def select(
    front: list[TrialResult], rule: str, max_kl: float, max_refusals: int, directions: dict[str, str] | None = None
) -> TrialResult:
    """Headless choice.

    fewest-refusals: among front trials with KL <= max_kl, the fewest refusals (then lowest KL);
    lowest-kl: among front trials with refusals <= max_refusals, the lowest KL (then fewest refusals).
    When no trial meets the cap, the trial closest to it is taken. Remaining ties go to the trial best
    in the optimized objectives of `directions`, in their order.
    """
    if not front:
        raise HereticError("The search has no finished trial to choose from; run more trials.")

    def rest(r: TrialResult) -> tuple[float, ...]:
        return point(r, directions)[2:]

    if rule == "lowest-kl":
        eligible = [r for r in front if r.refusals <= max_refusals]
        if eligible:
            return min(eligible, key=lambda r: (r.kl, r.refusals, *rest(r)))
        return min(front, key=lambda r: (r.refusals, r.kl, *rest(r)))
    eligible = [r for r in front if r.kl <= max_kl]
    if eligible:
        return min(eligible, key=lambda r: (r.refusals, r.kl, *rest(r)))
    return min(front, key=lambda r: (r.kl, r.refusals, *rest(r)))


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by the points (minimization) and bounded by the reference point."""
    inside = sorted({p for p in points if p[0] < reference[0] and p[1] < reference[1]})
    area, best_y = 0.0, reference[1]
    for x, y in inside:
        if y < best_y:
            area += (reference[0] - x) * (best_y - y)
            best_y = y
    return area


def preference_order(
    front: list[TrialResult], rule: str, max_kl: float, max_refusals: int, directions: dict[str, str] | None = None
) -> list[TrialResult]:
    """The front in the order the headless choice prefers it: the trial `select` chooses, then the one it
    chooses among the others, and so on."""
    left, order = list(front), []
    while left:
        chosen = select(left, rule, max_kl, max_refusals, directions)
        order.append(chosen)
        left.remove(chosen)
    return order
