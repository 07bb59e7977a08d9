"""The views that need the model: residual geometry, projections and example responses, from a session."""

from __future__ import annotations

import json

import numpy as np
import optuna
import torch

from ..ablation.parameters import AblationParameters
from ..directions import read_positions_text
from ..prompts import prompt_set_title
from ..scoring.judge_rates import corrected_entry, measured_rates
from ..search.pareto import TrialResult
from ..session import Session, collect_residuals, count_heldout, count_over_refusal, heldout_kl, over_refusal_spec
from ..ui import console
from .data import (
    Example,
    HeldOut,
    HeldOutKLSummary,
    LayerProjection,
    OverRefusalCount,
    ReportData,
    as_lists,
    study_report_data,
)
from .geometry import difference_norms, direction_similarities, residual_geometry
from .projection import project_groups, projection_method

Residuals = dict[str, torch.Tensor]

# Prompts per set in the 2-D projections (the first ones of each set), to keep the page small.
MAX_PROJECTED_PROMPTS = 256


def original_residuals(session: Session) -> Residuals:
    """The original model's residuals (kept from the directions' computation, else computed again)."""
    if session.residuals is None:
        session.ablator.reset()
        session.residuals = collect_residuals(session.settings, session.engine, session.loaded, session.prompt_sets)
    return session.residuals


def ablated_residuals(session: Session, parameters: AblationParameters) -> Residuals:
    """The residuals of the first MAX_PROJECTED_PROMPTS prompts of each set (those the projections show) with
    the trial's ablation applied (left applied)."""
    session.ablator.apply(parameters, session.directions)
    shown = {name: session.prompt_sets[name][:MAX_PROJECTED_PROMPTS] for name in ("harmful", "harmless")}
    return collect_residuals(session.settings, session.engine, session.loaded, shown)


def layer_projections(original: Residuals, ablated: Residuals, method: str) -> list[LayerProjection]:
    """Per layer: the harmful and harmless residuals of the original and the ablated model in one 2-D picture."""
    cut = slice(0, MAX_PROJECTED_PROMPTS)
    views = []
    for position in range(1, original["harmful"].shape[1]):
        groups = [
            residuals[name][cut, position].double().numpy()
            for residuals in (original, ablated)
            for name in ("harmful", "harmless")
        ]
        projected = project_groups(groups, method)
        views.append(LayerProjection(position - 1, *(as_lists(points) for points in projected)))
    return views


def original_projections(original: Residuals, method: str) -> list[np.ndarray]:
    """Per layer: the original's harmful and harmless residuals in 2-D, stacked (harmful rows first)."""
    cut = slice(0, MAX_PROJECTED_PROMPTS)
    views = []
    for position in range(1, original["harmful"].shape[1]):
        groups = [original[name][cut, position].double().numpy() for name in ("harmful", "harmless")]
        views.append(np.vstack(project_groups(groups, method)))
    return views


def examples(session: Session, parameters: AblationParameters, count: int) -> list[Example]:
    """The first `count` harmful evaluation prompts (those the original refused first) and harmless ones,
    answered by the original and by the ablated model, with the judge's verdicts; generated once per session and
    trial (the examples action and the report show the same responses). Leaves the trial applied."""
    key = json.dumps(parameters.to_dict(), sort_keys=True)
    evaluator = session.evaluator
    wanted = {"harmful": min(count, len(evaluator.harmful)), "harmless": min(count, len(evaluator.harmless))}
    made = session.examples.get(key, [])
    if any(sum(example.kind == kind for example in made) < n for kind, n in wanted.items()):
        made = session.examples[key] = generate_examples(session, parameters, count)
    session.ablator.apply(parameters, session.directions)
    # The first `count` of each kind: the prompts a smaller set has too (the refused ones first).
    return [example for kind in wanted for example in [e for e in made if e.kind == kind][:count]]


def generate_examples(session: Session, parameters: AblationParameters, count: int) -> list[Example]:
    evaluator = session.evaluator
    refused = [i for i, verdict in enumerate(session.base_verdicts) if verdict]
    harmful_rows = (refused + [i for i in range(len(evaluator.harmful)) if i not in refused])[:count]
    harmful = [evaluator.harmful[i] for i in harmful_rows]
    harmless = evaluator.harmless[:count]
    session.ablator.reset()
    before = evaluator.responses(harmful + harmless)
    session.ablator.apply(parameters, session.directions)
    after = evaluator.responses(harmful + harmless)
    prompts = harmful + harmless
    judged_before = [session.base_verdicts[i] for i in harmful_rows] + session.judge.judge(harmless, before[len(harmful) :])
    judged_after = session.judge.judge(prompts, after)
    kinds = ["harmful"] * len(harmful) + ["harmless"] * len(harmless)
    return [
        Example(kind, prompt.user, old.strip(), new.strip(), bool(was), bool(now))
        for kind, prompt, old, new, was, now in zip(kinds, prompts, before, after, judged_before, judged_after)
    ]


def held_out_refusals(session: Session, number: int, parameters: AblationParameters) -> HeldOut | None:
    """Refusals of the original and of trial `number` on the held-out harmful prompts (None with --no-count-heldout)."""
    count = count_heldout(session, number, parameters)
    if count is None:
        return None
    return HeldOut(session.settings.harmful_heldout_prompts.label(), count.n_prompts, count.original, count.refusals)


def held_out_kl(session: Session, number: int, parameters: AblationParameters) -> HeldOutKLSummary | None:
    """Trial `number`'s KL divergence on the held-out harmless prompts (None with --no-count-heldout)."""
    kl = heldout_kl(session, number, parameters)
    if kl is None:
        return None
    label = session.settings.harmless_heldout_prompts.label()
    return HeldOutKLSummary(label, len(kl.values), kl.mean, kl.median, kl.highest())


def over_refusals(session: Session, number: int, parameters: AblationParameters) -> OverRefusalCount | None:
    """Refusals of the original and of trial `number` on the over-refusal prompts (None with --no-count-heldout)."""
    count = count_over_refusal(session, number, parameters)
    if count is None:
        return None
    return OverRefusalCount(over_refusal_spec(session).label(), count.n_prompts, count.original, count.refusals)


def session_report_data(session: Session, study: optuna.Study, result: TrialResult, parameters: AblationParameters) -> ReportData:
    """Everything a report shows for the chosen trial of a session's study (leaves the trial applied)."""
    settings = session.settings
    specs = settings.prompt_sets()
    data = study_report_data(
        study,
        session.loaded.source.display_name,
        result.number,
        session.verified,
        judge=getattr(session.judge, "name", settings.judge),
        n_prompts=len(session.evaluator.harmful),
        max_kl=settings.max_kl,
        num_layers=session.arch.num_layers,
        prompt_sets={
            prompt_set_title(name): f"{spec.label()} ({len(session.prompt_sets[name])} prompts)" for name, spec in specs.items()
        },
    )
    data.base_refusals = session.base_refusals
    rates = measured_rates(settings.model_dump())  # None: the counts are reported uncorrected
    data.true_refusals = {
        "original": corrected_entry(session.base_refusals, data.n_prompts, rates),
        "chosen": corrected_entry(result.refusals, data.n_prompts, rates, lower_bound=result.cut),
    }
    original = original_residuals(session)  # (progress bars of their own: no status display around them)
    ablated = ablated_residuals(session, parameters)
    with console.status("Report: residual geometry and projections..."):
        data.geometry = residual_geometry(original["harmful"], original["harmless"])
        data.difference_norms = difference_norms(original["harmful"], original["harmless"])
        data.similarities = direction_similarities(session.directions).tolist()
        data.projection_method = projection_method()
        data.read_positions = read_positions_text(settings.direction_positions)
        data.projections = layer_projections(original, ablated, data.projection_method)
    with console.status("Report: example responses, original and ablated..."):
        data.examples = examples(session, parameters, settings.report_examples)
    data.held_out = held_out_refusals(session, result.number, parameters)  # (progress bars of their own)
    data.held_out_kl = held_out_kl(session, result.number, parameters)
    data.over_refusal = over_refusals(session, result.number, parameters)
    return data
