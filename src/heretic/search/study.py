"""The study of a run: its fingerprint and checkpoint, resuming or restarting it, and the search loop."""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import optuna

from ..ablation.parameters import AblationParameters
from ..config import ResumePolicy, Role, Settings, fields_with, fingerprint_entry, plain
from ..model.loading import LoadedModel
from ..prompts import Prompt, prompts_digest
from ..scoring.judges import judge_identity
from ..scoring.objectives import LoadedObjective
from ..ui import ProgressBars, console, format_duration
from . import checkpoint
from .pareto import TrialResult, objective_text, trial_results
from .runner import SearchSetup, completed_trials, run_trial
from .space import describe

log = logging.getLogger(__name__)

# (fingerprinted values, fingerprint, journal path) of a search.
Location = tuple[dict[str, object], str, Path]


def study_fingerprint(
    settings: Settings,
    loaded: LoadedModel,
    prompt_sets: dict[str, list[Prompt]],
    response_prefix: str,
    objectives: list[LoadedObjective] | None = None,
) -> dict[str, object]:
    """Everything that changes what a trial measures: a search resumes only under identical values.

    One entry per setting tagged `score`: its value, or, for settings tagged with a `fingerprint` entry,
    what they produce (the model's identity, the loaded dtype, the prompts' digests, the prefilled
    response prefix, the judge and the further objectives)."""
    derived = derived_entries(settings, loaded, prompt_sets, response_prefix, objectives)
    values: dict[str, object] = {}
    for name in fields_with(Role.score):
        entry = fingerprint_entry(name)
        if entry is None:
            values[name] = plain(getattr(settings, name))
        else:
            values[entry] = derived[entry]
    return values


def derived_entries(
    settings: Settings,
    loaded: LoadedModel,
    prompt_sets: dict[str, list[Prompt]],
    response_prefix: str,
    objectives: list[LoadedObjective] | None = None,
) -> dict[str, object]:
    """The fingerprint entries of score settings that count through what they produce, not their value."""
    source = loaded.source
    model_identity: dict[str, object] = {"name": source.name, "revision": settings.model_revision}
    if source.gguf_file is not None:
        model_identity.update(size=source.gguf_file.stat().st_size)
    return {
        "model": model_identity,
        "dtype": str(loaded.dtype),
        "prompts": {name: prompts_digest(prompts) for name, prompts in prompt_sets.items()},
        "response_prefix": response_prefix,
        "judge": scoring_identity(settings, objectives),
    }


def scoring_identity(settings: Settings, objectives: list[LoadedObjective] | None) -> object:
    """The judge and, when there are any, the further objectives (each as what it is, its direction, settings,
    prompts' digest and plug-in file's digest; the tables' values when they are not loaded). Without
    objectives: the judge alone, as it always was, so that existing checkpoints still resume."""
    judge = judge_identity(settings)
    changed = changed_variant_settings(settings)
    if not settings.objectives and not changed:
        return judge
    identity: dict[str, object] = {"judge": judge}
    if changed:
        identity["variant"] = changed
    if settings.objectives and objectives is None:
        identity["objectives"] = {name: table.model_dump(mode="json") for name, table in settings.objectives.items()}
    elif settings.objectives:
        identity["objectives"] = {objective.name: objective.identity() for objective in objectives or []}
    return identity


# Score settings added after checkpoints existed; they enter through the scoring identity (tagged
# fingerprint="judge"), and only where they differ from their defaults, so that at their defaults a
# fingerprint stays what it was before they existed and existing checkpoints still resume.
VARIANT_SETTINGS = ("direction_positions", "subspace_rank", "search_mlp_off", "kl_tokens")


def changed_variant_settings(settings: Settings) -> dict[str, object]:
    """{name: value} of the VARIANT_SETTINGS that differ from their defaults."""
    defaults = Settings.model_fields
    return {
        name: plain(getattr(settings, name)) for name in VARIANT_SETTINGS if getattr(settings, name) != defaults[name].default
    }


def checkpoint_location(
    settings: Settings,
    loaded: LoadedModel,
    prompt_sets: dict[str, list[Prompt]],
    response_prefix: str,
    objectives: list[LoadedObjective] | None = None,
) -> Location:
    """(fingerprinted values, fingerprint, journal path) of the search these settings run."""
    values = study_fingerprint(settings, loaded, prompt_sets, response_prefix, objectives)
    digest = checkpoint.fingerprint(values)
    return values, digest, checkpoint.checkpoint_path(settings.checkpoint_dir, loaded.source.display_name, digest)


def open_study(
    settings: Settings, location: Location, interactive: bool, objective_directions: dict[str, str] | None = None
) -> optuna.Study:
    """The study at `location`: created, or resumed, added to or restarted as --resume (or the user) says.

    Its `target_trials` attribute is the number of finished trials the search runs up to; its
    `objective_directions` are the further objectives' (the optimized ones are study directions too)."""
    values, digest, path = location
    extra = objective_directions or {}
    directions = ["minimize", "minimize"] + [direction for direction in extra.values() if direction != "report"]
    study, existed = checkpoint.load_or_create(path, digest, values, directions)
    stale = checkpoint.fail_stale_trials(study)
    if stale:
        log.info("%d interrupted trial(s) of an earlier run marked as failed", stale)
    done = completed_trials(study)
    target = settings.n_trials
    if existed and done > 0:
        policy = settings.resume
        if policy == ResumePolicy.ask:
            policy = ask_resume(done, settings.n_trials) if interactive else ResumePolicy.continue_
        if policy == ResumePolicy.restart:
            moved = checkpoint.archive(path)
            console.print(f"Earlier search moved to {moved}")
            study, _ = checkpoint.load_or_create(path, digest, values, directions)
            done = 0
        elif policy == ResumePolicy.add:
            target = done + settings.n_trials
        console.print(f"Checkpoint {path}: {done} finished trials; running up to {max(target, done)}")
    else:
        console.print(f"Checkpoint: {path}")
    study.set_user_attr("target_trials", max(target, done))
    if extra:
        study.set_user_attr("objective_directions", extra)
    return study


def ask_resume(done: int, n_trials: int) -> ResumePolicy:
    """Ask what to do with a checkpoint that has `done` finished trials."""
    import questionary

    choices = [
        questionary.Choice(
            f"Continue (up to {n_trials} trials)" if done < n_trials else "Use the finished search", ResumePolicy.continue_
        ),
        questionary.Choice(f"Add {n_trials} more trials", ResumePolicy.add),
        questionary.Choice("Restart (the old checkpoint is kept aside)", ResumePolicy.restart),
    ]
    answer = questionary.select(f"A checkpoint with {done} finished trials exists.", choices=choices).ask()
    if answer is None:
        raise KeyboardInterrupt
    return ResumePolicy(answer)


def run_search(setup: SearchSetup, study: optuna.Study, n_trials: int) -> None:
    """Run trials until the study has its `target_trials` finished ones (default `n_trials`); Ctrl+C stops early."""
    target = int(study.user_attrs.get("target_trials", n_trials))
    done = completed_trials(study)
    remaining = target - done
    if remaining <= 0:
        return
    n_prompts = len(setup.evaluator.harmful)
    console.print(f"Searching: {remaining} trials (Ctrl+C stops the search and keeps every finished trial)")
    started = time.perf_counter()
    try:
        with ProgressBars() as bars:
            for index in range(1, remaining + 1):
                result = run_trial(setup, study, progress=bars)
                eta = eta_seconds(study, remaining - index)
                console.print(trial_line(result, n_prompts, done + index, target, eta))
    except KeyboardInterrupt:
        console.print("[yellow]Search interrupted[/]; rerun the same command to continue it.")
    finally:
        setup.ablator.reset()
    console.print(f"Search time: {format_duration(time.perf_counter() - started)}")


def eta_seconds(study: optuna.Study, remaining: int) -> float:
    """The median time of the last 20 finished trials, times the trials remaining."""
    times = [r.seconds for r in trial_results(study)[-20:]]
    return statistics.median(times) * remaining if times else 0.0


def trial_line(result: TrialResult, n_prompts: int, index: int, total: int, eta: float) -> str:
    """The console line of a finished trial: refusals, KL, time, eta and parameters."""
    parameters = describe(AblationParameters.from_dict(result.parameters))
    cut = " [dim](cut: dominated)[/]" if result.cut else ""
    objectives = "".join(f"{name} [bold]{objective_text(value)}[/]  " for name, value in result.objectives.items())
    return (
        f"Trial {result.number:>3} ({index}/{total})  refusals [bold]{result.refusals_text:>3}[/]/{n_prompts}{cut}  "
        f"KL [bold]{result.kl:.4f}[/]  {objectives}{format_duration(result.seconds)}  eta {format_duration(eta)}  "
        f"[dim]{parameters}[/]"
    )
