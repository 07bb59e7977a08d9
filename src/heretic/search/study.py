"""The study of a run: its fingerprint and checkpoint, resuming or restarting it, and the search loop."""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..ablation.parameters import AblationParameters
from ..config import (
    RETIRED_FINGERPRINT_ENTRIES,
    RETIRED_SETTINGS,
    ResumePolicy,
    Role,
    RowNormalization,
    Settings,
    fields_with,
    fingerprint_entry,
    plain,
    variant_settings,
)
from ..errors import HereticError
from ..model.loading import LoadedModel
from ..prompts import Prompt, prompts_digest
from ..scoring.judges import judge_identity
from ..scoring.objectives import LoadedObjective
from ..ui import ProgressBars, console, format_duration
from . import checkpoint
from .pareto import TrialResult, objective_text, trial_results
from .runner import SearchSetup, completed_trials, run_trial
from .space import describe
from .workers import WORKER_ATTR, Liveness, counts

log = logging.getLogger(__name__)
POLL_SECONDS = 2.0  # how often a worker with nothing to run looks at the study again


@dataclass(frozen=True)
class Location:
    """Where the trials of a search are kept."""

    values: dict[str, object]  # the fingerprinted settings
    digest: str  # their fingerprint
    storage: Path | str  # a journal file, or a database URL
    study_name: str
    shared: bool  # workers may join (--storage, --workers, --search-only): no run holds it alone

    @property
    def journal(self) -> Path | None:
        return None if checkpoint.is_database(self.storage) else Path(self.storage)

    def shown(self) -> str:
        return checkpoint.redacted(str(self.storage)) if self.journal is None else str(self.storage)


def study_fingerprint(
    settings: Settings,
    loaded: LoadedModel,
    prompt_sets: dict[str, list[Prompt]],
    response_prefix: str,
    objectives: list[LoadedObjective] | None = None,
    fused_experts: bool = False,
) -> dict[str, object]:
    """Everything that changes what a trial measures: a search resumes only under identical values.

    One entry per setting tagged `score`: its value, or, for settings tagged with a `fingerprint` entry,
    what they produce (the model's identity, the loaded dtype, the prompts' digests, the prefilled
    response prefix, the judge and the further objectives)."""
    derived = derived_entries(settings, loaded, prompt_sets, response_prefix, objectives, fused_experts)
    values: dict[str, object] = {}
    for name in fields_with(Role.score):
        entry = fingerprint_entry(name)
        if entry is None:
            values[name] = plain(getattr(settings, name))
        else:
            values[entry] = derived[entry]
    values.update((name, RETIRED_SETTINGS[name]) for name in RETIRED_FINGERPRINT_ENTRIES)
    return values


def derived_entries(
    settings: Settings,
    loaded: LoadedModel,
    prompt_sets: dict[str, list[Prompt]],
    response_prefix: str,
    objectives: list[LoadedObjective] | None = None,
    fused_experts: bool = False,
) -> dict[str, object]:
    """The fingerprint entries of score settings that count through what they produce, not their value."""
    source = loaded.source
    model_identity: dict[str, object] = {"name": source.name, "revision": settings.model_revision}
    if source.gguf_file is not None:
        model_identity.update(size=source.gguf_file.stat().st_size)
    return {
        "model": model_identity,
        "dtype": _dtype_entry(loaded),
        "prompts": {name: prompts_digest(prompts) for name, prompts in prompt_sets.items()},
        "response_prefix": response_prefix,
        "judge": scoring_identity(settings, objectives, fused_experts),
    }


def scoring_identity(settings: Settings, objectives: list[LoadedObjective] | None, fused_experts: bool = False) -> object:
    """The judge and, when there are any, the further objectives (each as what it is, its direction, settings,
    prompts' digest and plug-in file's digest; the tables' values when they are not loaded). Without
    objectives: the judge alone, as it always was, so that existing checkpoints still resume."""
    judge = judge_identity(settings)
    changed = changed_variant_settings(settings, fused_experts)
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


def changed_variant_settings(settings: Settings, fused_experts: bool = False) -> dict[str, object]:
    """{name: value} of the score settings added after checkpoints existed (`config.tags(earlier=...)`) that
    differ from what earlier searches had (the exactness of the full ablation only where the ablation is full
    and can be exact: not on fused MoE experts, which keep the approximation whatever the setting says)."""
    changed = {
        name: plain(getattr(settings, name)) for name, earlier in variant_settings().items() if getattr(settings, name) != earlier
    }
    if settings.row_normalization != RowNormalization.full or fused_experts:
        changed.pop("full_normalization_exact", None)
    return changed


def _dtype_entry(loaded: LoadedModel) -> str:
    """The compute dtype, and the quantization when the weights are quantized (scores differ)."""
    quantization = getattr(loaded, "quantization", "none")
    return str(loaded.dtype) if quantization == "none" else f"{loaded.dtype} {quantization}"


def checkpoint_location(
    settings: Settings,
    loaded: LoadedModel,
    prompt_sets: dict[str, list[Prompt]],
    response_prefix: str,
    objectives: list[LoadedObjective] | None = None,
    *,
    fused_experts: bool,
) -> Location:
    """Where the search these settings run is kept: --storage (a study named by the model and the
    settings' fingerprint), else a journal file of its own in --checkpoint-dir. `fused_experts`: the
    model's MoE experts are fused tensors (ArchitectureMap.fused_experts), which changes the fingerprint."""
    values = study_fingerprint(settings, loaded, prompt_sets, response_prefix, objectives, fused_experts)
    digest = checkpoint.fingerprint(values)
    shared = settings.storage is not None or settings.workers > 1 or settings.search_only
    name = loaded.source.display_name
    if settings.storage is None:
        path = checkpoint.checkpoint_path(settings.checkpoint_dir, name, digest)
        return Location(values, digest, path, checkpoint.STUDY_NAME, shared)
    storage: Path | str = settings.storage if checkpoint.is_database(settings.storage) else Path(settings.storage).expanduser()
    return Location(values, digest, storage, checkpoint.study_name_for(name, digest), shared)


def open_study(
    settings: Settings, location: Location, interactive: bool, objective_directions: dict[str, str] | None = None
) -> optuna.Study:
    """The study at `location`: created, or resumed, added to or restarted as --resume (or the user) says.

    Its `target_trials` attribute is the number of finished trials the search runs up to (in a shared
    study: the largest any of its workers asked for); its `objective_directions` are the further
    objectives' (the optimized ones are study directions too)."""
    extra = objective_directions or {}
    optimized = {name: direction for name, direction in extra.items() if direction != "report"}
    study, existed = _load(settings, location, optimized)
    if not location.shared:
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
            study, done = _restart(settings, location, optimized), 0
        elif policy == ResumePolicy.add:
            target = done + settings.n_trials
        elif location.shared:
            target = max(target, int(study.user_attrs.get("target_trials", 0)))
        console.print(f"Study {location.shown()}: {done} finished trials; running up to {max(target, done)}")
    else:
        console.print(f"Checkpoint: {location.shown()}" + (f" (study {location.study_name})" if settings.storage else ""))
    study.set_user_attr("target_trials", max(target, done))
    if extra:
        study.set_user_attr("objective_directions", extra)
    return study


def find_study(settings: Settings, location: Location) -> optuna.Study | None:
    """The study these settings would resume or join, if it exists (None with --resume restart)."""
    if settings.resume == ResumePolicy.restart:
        return None
    return checkpoint.find_study(
        location.storage,
        location.digest,
        study_name=location.study_name,
        shared=location.shared,
        heartbeat_interval=settings.heartbeat_interval,
    )


def _load(settings: Settings, location: Location, objectives: dict[str, str]) -> tuple[optuna.Study, bool]:
    return checkpoint.load_or_create(
        location.storage,
        location.digest,
        location.values,
        study_name=location.study_name,
        shared=location.shared,
        heartbeat_interval=settings.heartbeat_interval,
        objectives=objectives,
    )


def _restart(settings: Settings, location: Location, objectives: dict[str, str]) -> optuna.Study:
    """A new study in place of the old one, which is kept aside (a journal file is renamed)."""
    if location.journal is None or location.study_name != checkpoint.STUDY_NAME:
        raise HereticError(
            f"--resume restart cannot set the study {location.study_name} in {location.shown()} aside; delete it "
            f"(optuna delete-study --storage URL --study-name {location.study_name}) or use another --storage."
        )
    moved = checkpoint.archive(location.journal)
    console.print(f"Earlier search moved to {moved}")
    return _load(settings, location, objectives)[0]


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


def run_search(
    setup: SearchSetup, study: optuna.Study, n_trials: int, liveness: Liveness | None = None, minutes: float | None = None
) -> bool:
    """Run trials until the study has its `target_trials` finished ones (default `n_trials`), or until
    `minutes` are spent: after the run's first trial, none starts that would end past them by the median
    trial time. Ctrl+C stops early (False is returned then).

    With other workers on the study (`liveness` not exclusive) a worker starts a trial only while the
    finished and running trials together are fewer than the target (or a trial of a dead worker waits
    to be run again), and otherwise waits for the others, so that the study ends with the target, or
    a few more when workers ask at the same moment (at most one per worker)."""
    target = int(study.user_attrs.get("target_trials", n_trials))
    done, _, _ = counts(study)
    if done >= target:
        return True
    shared = liveness is not None and not liveness.exclusive
    others = " with the other workers of this study" if shared else ""
    console.print(f"Searching: {target - done} trials{others} (Ctrl+C stops the search and keeps every finished trial)")
    started = time.perf_counter()
    deadline = started + 60 * minutes if minutes is not None else None
    reporter = Reporter(study, len(setup.evaluator.harmful), target, shared, deadline)
    finished = False
    try:
        with ProgressBars() as bars, reporter.polling(shared):
            while not search_step(setup, study, target, bars, liveness, reporter):
                if deadline is not None and not budget_fits(study, done, deadline):
                    console.print(
                        f"[yellow]The search's time budget ({minutes:g} min) is spent[/]: {counts(study)[0]} of {target} "
                        "trials finished; the same command continues the search."
                    )
                    break
        finished = True
    except KeyboardInterrupt:
        console.print("[yellow]Search interrupted[/]; rerun the same command to continue it.")
    finally:
        setup.ablator.reset()
    console.print(f"Search time: {format_duration(time.perf_counter() - started)}")
    return finished


def budget_fits(study: optuna.Study, done_before: int, deadline: float) -> bool:
    """Whether another trial fits before `deadline` (a perf_counter() time): it would end by then at the
    median time of the last trials. Until a trial of this run has finished, only the deadline counts,
    so that every run with a budget makes progress."""
    if counts(study)[0] <= done_before:
        return time.perf_counter() < deadline
    return budget_left(study, deadline) > 0


def budget_left(study: optuna.Study, deadline: float) -> float:
    """The time the trials that still fit before `deadline` take: whole median trial times."""
    median = eta_seconds(study, 1)
    left = max(0.0, deadline - time.perf_counter())
    return median * (left // median) if median > 0 else left


def search_step(
    setup: SearchSetup, study: optuna.Study, target: int, bars: ProgressBars, liveness: Liveness | None, reporter: Reporter
) -> bool:
    """Run one trial, or wait for the other workers; True once the study has `target` finished trials."""
    shared = liveness is not None and not liveness.exclusive
    if shared and liveness is not None and liveness.reap():
        console.print("[yellow]A trial of a worker that stopped is queued to run again[/]")
    done, running, waiting = counts(study)
    if done >= target:
        return True
    if not shared or waiting or done + running < target:
        if run_trial(setup, study, progress=bars, liveness=liveness, limit=target if shared else None) is not None:
            reporter.report()
    else:
        reporter.waiting(running)
        time.sleep(POLL_SECONDS)
    return False


class Reporter:
    """Prints one line per finished trial of the study, whichever worker ran it (once each)."""

    def __init__(
        self, study: optuna.Study, n_prompts: int, target: int, shared: bool = False, deadline: float | None = None
    ) -> None:
        self.study, self.n_prompts, self.target, self.shared = study, n_prompts, target, shared
        self.deadline = deadline  # perf_counter() time at which the time budget stops the search, if any
        self.shown = {r.number for r in trial_results(study)}
        self.lock = threading.Lock()
        self.told_waiting = False

    def report(self) -> None:
        with self.lock:
            trials = {t.number: t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
            # Two reads of a shared storage: a trial another worker finishes between them waits for the next report.
            results = [result for result in trial_results(self.study) if result.number in trials]
            done = len(results)
            for result in results:
                if result.number in self.shown:
                    continue
                self.shown.add(result.number)
                # Workers seen among the last 20 finished trials share the remaining ones (shared studies).
                recent = sorted(trials)[-20:]
                workers = len({trials[n].user_attrs.get(WORKER_ATTR) for n in recent}) if self.shared else 1
                eta = eta_seconds(self.study, self.target - done) / max(1, min(workers, self.target - done or 1))
                if self.deadline is not None:  # only the trials that fit in the time budget start
                    eta = min(eta, budget_left(self.study, self.deadline))
                worker = trials[result.number].user_attrs.get(WORKER_ATTR) if self.shared else None
                console.print(trial_line(result, self.n_prompts, done, self.target, eta, worker))

    def waiting(self, running: int) -> None:
        if not self.told_waiting:
            console.print(f"Waiting for {running} trial{'s' if running != 1 else ''} of other workers to finish")
            self.told_waiting = True

    @contextlib.contextmanager
    def polling(self, enabled: bool) -> Iterator[None]:
        """While the search runs: report the other workers' trials as they finish (every few seconds)."""
        if not enabled:
            yield
            return
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(POLL_SECONDS):
                with contextlib.suppress(Exception):  # a storage hiccup: the next poll reports it
                    self.report()

        thread = threading.Thread(target=poll, name="heretic-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.report()


def eta_seconds(study: optuna.Study, remaining: int) -> float:
    """The median time of the last 20 finished trials, times the trials remaining."""
    times = [r.seconds for r in trial_results(study)[-20:]]
    return statistics.median(times) * remaining if times else 0.0


def trial_line(result: TrialResult, n_prompts: int, index: int, total: int, eta: float, worker: object = None) -> str:
    """The console line of a finished trial: refusals, KL, time, eta and parameters (and its worker)."""
    parameters = describe(AblationParameters.from_dict(result.parameters))
    cut = " [dim](cut: dominated)[/]" if result.cut else ""
    objectives = "".join(f"{name} [bold]{objective_text(value)}[/]  " for name, value in result.objectives.items())
    by = f" [dim]by {worker}[/]" if worker else ""
    return (
        f"Trial {result.number:>3} ({index}/{total})  refusals [bold]{result.refusals_text:>3}[/]/{n_prompts}{cut}  "
        f"KL [bold]{result.kl:.4f}[/]  {objectives}{format_duration(result.seconds)}  eta {format_duration(eta)}  "
        f"[dim]{parameters}[/]{by}"
    )
