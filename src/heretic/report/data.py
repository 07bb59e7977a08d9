"""What a report shows, as plain data: gathered from a study (and, for the research views, a session
with its model), rendered by html.py, and testable without either."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from ..ablation.parameters import AblationParameters
from ..search.pareto import VerifiedCount, from_frozen, pareto_front, with_verified
from ..search.space import describe
from .geometry import LayerGeometry

# Parameter importances need a handful of trials to mean anything.
MIN_TRIALS_FOR_IMPORTANCE = 5


@dataclass(frozen=True)
class TrialPoint:
    number: int
    refusals: int
    kl: float
    cut: bool
    seconds: float
    started: float  # seconds since the study's first trial started
    finished: float
    parameters: dict[str, Any]
    summary: str  # one line (search.space.describe)
    verified: int | None = None  # refusals counted again on whole responses (heretic/verify.py); `refusals` is the search's
    degenerate: int | None = None  # degenerate responses among those whole ones (scoring/coherence.py)


@dataclass(frozen=True)
class Example:
    kind: str  # "harmful" | "harmless"
    prompt: str
    before: str
    after: str
    refused_before: bool
    refused_after: bool


@dataclass(frozen=True)
class HeldOut:
    """Refusals on harmful prompts the search never saw."""

    label: str
    prompts: int
    original: int
    chosen: int


@dataclass(frozen=True)
class HeldOutKLSummary:
    """The chosen trial's KL divergence from the original on harmless prompts the search never saw."""

    label: str
    prompts: int
    mean: float
    median: float
    highest: list[tuple[str, float]]  # (prompt, KL) where it is highest, highest first


@dataclass(frozen=True)
class OverRefusalCount:
    """Refusals of harmless prompts that look harmful."""

    label: str
    prompts: int
    original: int
    chosen: int


@dataclass(frozen=True)
class LayerProjection:
    """2-D points of one layer in shared coordinates: each (n, 2) as nested lists."""

    layer: int
    original_harmful: list[list[float]]
    original_harmless: list[list[float]]
    chosen_harmful: list[list[float]]
    chosen_harmless: list[list[float]]


@dataclass
class ReportData:
    model: str
    created: str
    judge: str
    n_prompts: int  # harmful evaluation prompts
    base_refusals: int | None
    max_kl: float
    num_layers: int
    components: list[str]
    trials: list[TrialPoint]
    front: list[int]  # trial numbers, by refusals then KL
    chosen: int | None
    prompt_sets: dict[str, str] = field(default_factory=dict)  # name -> "label (count)"
    importances: dict[str, dict[str, float]] = field(default_factory=dict)  # objective -> parameter -> importance
    geometry: list[LayerGeometry] = field(default_factory=list)
    difference_norms: list[float] = field(default_factory=list)
    similarities: list[list[float]] = field(default_factory=list)
    projections: list[LayerProjection] = field(default_factory=list)
    projection_method: str = "pca"
    read_positions: str = "last prompt token"  # where the residuals were read (directions.read_positions_text)
    examples: list[Example] = field(default_factory=list)
    held_out: HeldOut | None = None
    held_out_kl: HeldOutKLSummary | None = None
    over_refusal: OverRefusalCount | None = None
    notes: list[str] = field(default_factory=list)  # what could not be shown, and why
    # "original" and "chosen": their counts corrected for the judge's error rates (scoring/judge_rates.corrected_entry)
    true_refusals: dict[str, dict[str, Any]] = field(default_factory=dict)

    def trial(self, number: int) -> TrialPoint:
        return next(point for point in self.trials if point.number == number)


def trial_points(study: optuna.Study, verified: dict[int, VerifiedCount] | None = None) -> list[TrialPoint]:
    """Every finished trial with its scores, parameters and times (relative to the first start)."""
    frozen = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    starts = [trial.datetime_start for trial in frozen if trial.datetime_start is not None]
    origin = min(starts) if starts else datetime.now()
    points = []
    for trial in frozen:
        result = from_frozen(trial)
        start = trial.datetime_start or origin
        end = trial.datetime_complete or start
        points.append(
            TrialPoint(
                number=result.number,
                refusals=result.refusals,
                kl=result.kl,
                cut=result.cut,
                seconds=result.seconds,
                started=(start - origin).total_seconds(),
                finished=(end - origin).total_seconds(),
                parameters=result.parameters,
                summary=describe(AblationParameters.from_dict(result.parameters)) if result.parameters else "",
                verified=count.refusals if (count := (verified or {}).get(result.number)) is not None else None,
                degenerate=count.degenerate if count is not None else None,
            )
        )
    return points


def front_numbers(study: optuna.Study, verified: dict[int, VerifiedCount] | None = None) -> list[int]:
    """The front's trial numbers, with the verified counts where trials have them (heretic/verify.py)."""
    from ..search.pareto import trial_results

    return [result.number for result in pareto_front(with_verified(trial_results(study), verified or {}))]


def importances(study: optuna.Study, seed: int = 0) -> dict[str, dict[str, float]]:
    """Optuna's fANOVA importance of each sampled parameter for refusals and for log10 KL; empty with
    fewer than MIN_TRIALS_FOR_IMPORTANCE finished trials (or when every trial has the same parameters)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(trials) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}
    targets = {
        "refusals": lambda trial: float(trial.user_attrs["refusals"]),
        "KL (log10)": lambda trial: math.log10(max(float(trial.user_attrs["kl"]), 1e-9)),
    }
    found: dict[str, dict[str, float]] = {}
    for name, target in targets.items():
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        try:
            found[name] = dict(optuna.importance.get_param_importances(study, evaluator=evaluator, target=target))
        except (RuntimeError, ValueError, ZeroDivisionError):  # constant parameters or objective
            continue
    return found


def study_report_data(
    study: optuna.Study, model: str, chosen: int | None, verified: dict[int, VerifiedCount] | None = None, **extra: Any
) -> ReportData:
    """The search part of a report (front, trials, progress, importances), from the study and its `verified` counts."""
    points = trial_points(study, verified)
    components = sorted({name for point in points for name in point.parameters.get("kernels", {})})
    data = ReportData(
        model=model,
        created=datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        judge=str(extra.pop("judge", "unknown")),
        n_prompts=int(extra.pop("n_prompts", 0)),
        base_refusals=study.user_attrs.get("baseline_refusals"),
        max_kl=float(extra.pop("max_kl", 0.5)),
        num_layers=int(extra.pop("num_layers", 0)),
        components=components,
        trials=points,
        front=front_numbers(study, verified),
        chosen=chosen,
        importances=importances(study),
    )
    for key, value in extra.items():
        setattr(data, key, value)
    return data


def as_lists(points: np.ndarray) -> list[list[float]]:
    return [[round(float(x), 5), round(float(y), 5)] for x, y in points]
