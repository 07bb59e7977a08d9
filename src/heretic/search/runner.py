"""The search loop: sample a trial, ablate, score KL, count refusals, record."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import optuna
import torch
from optuna.samplers import TPESampler
from optuna.trial import TrialState

from ..ablation.adapters import Ablator
from ..model.batching import halving_on_oom
from ..model.memory import stage
from ..scoring.evaluator import Evaluator, ProgressFactory
from ..scoring.objectives import score_objectives
from .pareto import TrialResult, is_dominated, study_directions, trial_results
from .space import LayerRanges, suggest_parameters
from .workers import Liveness

log = logging.getLogger(__name__)


@dataclass
class SearchSetup:
    ablator: Ablator
    evaluator: Evaluator
    directions: torch.Tensor
    num_layers: int
    components: list[str]
    seed: int
    n_startup_trials: int
    cut_hopeless_trials: bool
    sampler_kl_floor: float
    direction_index_range: list[float]
    peak_position_range: list[float]

    @property
    def ranges(self) -> LayerRanges:
        return LayerRanges.of(self.direction_index_range, self.peak_position_range)


def make_sampler(seed: int, completed: int, n_startup_trials: int, worker: str = "") -> TPESampler:
    """A univariate TPE sampler with Optuna's 24 candidates per trial, seeded by the number of finished trials:
    a resumed search samples exactly what an uninterrupted one would have. Workers sharing a study add their
    own name to the seed: two of them asking after the same number of finished trials would otherwise sample
    the same parameters."""
    trial_seed = zlib.crc32(f"{seed}:{completed}".encode() + (f":{worker}".encode() if worker else b""))
    return TPESampler(n_startup_trials=n_startup_trials, n_ei_candidates=24, multivariate=False, seed=trial_seed)


def sampler_values(refusals: int, kl: float, n_prompts: int, kl_floor: float) -> list[float]:
    """The objectives the sampler sees: (refusals, KL), except that a KL below the floor becomes
    floor * (refusals + 1) / (n_prompts + 1) <= floor, so that among such near-identity trials the
    one with fewer refusals dominates and the sampler is not drawn towards ablations that do nothing."""
    if kl < kl_floor:
        kl = kl_floor * (refusals + 1) / (n_prompts + 1)
    return [float(refusals), kl]


def objective_values(objectives: dict[str, float], directions: dict[str, str]) -> list[float]:
    """The values of the optimized objectives (not the reported ones), in the order of the study's directions."""
    return [objectives[name] for name, direction in directions.items() if direction != "report"]


def completed_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def run_trial(
    setup: SearchSetup,
    study: optuna.Study,
    progress: ProgressFactory | None = None,
    liveness: Liveness | None = None,
    limit: int | None = None,
) -> TrialResult | None:
    """Run one trial to completion and record it in the study.

    `limit` (workers sharing the study): the study's target. A trial asked for when the finished ones
    and those running with lower numbers already reach it (another worker asked at the same moment)
    is given up at once, as FAIL marked `surplus`, and None is returned."""
    done = completed_trials(study)
    worker = liveness.token if liveness is not None and not liveness.exclusive else ""
    study.sampler = make_sampler(setup.seed, done, setup.n_startup_trials, worker)
    with signals_deferred():
        trial = study.ask()
    if limit is not None and surplus(study, trial.number, limit):
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    with liveness.running(trial) if liveness is not None else contextlib.nullcontext():
        return _measure(setup, study, trial, progress)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl+C and SIGTERM held back until the block has run, then raised as KeyboardInterrupt.

    For the study's writes: optuna's journal storage counts a record as read before it applies it, so an
    interrupt between the two loses a finished trial from this run's view of the study (it stays in the
    file) and the front shown after an interrupted search would miss it. A signal the process ignores
    (started with `nohup`, or in the background of a script) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = [signum for signum in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(signum) is not signal.SIG_IGN]
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise KeyboardInterrupt


def surplus(study: optuna.Study, number: int, limit: int) -> bool:
    """Whether the finished trials and the running ones numbered below `number` already make `limit`."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    ahead = sum(1 for t in trials if t.state == TrialState.COMPLETE or t.number < number)
    return ahead >= limit


def _measure(setup: SearchSetup, study: optuna.Study, trial: optuna.Trial, progress: ProgressFactory | None) -> TrialResult:
    """Ablate with the trial's parameters, score it and tell the study (a failure is told as FAIL)."""
    try:
        with stage(f"running trial {trial.number}"):
            return _evaluate(setup, study, trial, progress)
    except BaseException:
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise


def _evaluate(setup: SearchSetup, study: optuna.Study, trial: optuna.Trial, progress: ProgressFactory | None) -> TrialResult:
    """Score the trial's ablation and tell the study."""
    started = time.perf_counter()
    parameters = suggest_parameters(trial, setup.num_layers, setup.components, setup.ranges)
    setup.ablator.apply(parameters, setup.directions)
    evaluator = setup.evaluator
    evaluator.progress = progress or evaluator.progress
    kl = halving_on_oom(evaluator.engine, evaluator.kl)  # out of memory: smaller batches, never the search's end
    history = trial_results(study)
    # With further objectives a trial worse in refusals and KL may still be on the front: never cut.
    cut = setup.cut_hopeless_trials and not evaluator.objectives
    cutoff = (lambda found: is_dominated(found, kl, history)) if cut else None
    count = halving_on_oom(evaluator.engine, lambda: evaluator.count_refusals(cutoff))
    objectives = halving_on_oom(evaluator.engine, lambda: score_objectives(evaluator.objectives, evaluator, count, kl))
    seconds = time.perf_counter() - started
    n_prompts = len(setup.evaluator.harmful)
    values = sampler_values(count.refusals, kl, n_prompts, setup.sampler_kl_floor)
    with signals_deferred():
        trial.set_user_attr("parameters", parameters.to_dict())
        trial.set_user_attr("kl", kl)
        trial.set_user_attr("refusals", count.refusals)
        trial.set_user_attr("cut", not count.complete)
        trial.set_user_attr("seconds", seconds)
        if count.complete:  # the tokens of its responses: how fast this search generates (heretic/verify.py)
            trial.set_user_attr("tokens", sum(count.token_counts))
        if objectives:
            trial.set_user_attr("objectives", objectives)
        # skip_if_finished: a worker whose heartbeat stopped long enough (a paused machine) finds its
        # trial failed and queued again by another worker; its result is then dropped, not an error.
        told = study.tell(trial, values + objective_values(objectives, study_directions(study)), skip_if_finished=True)
    if told.state != TrialState.COMPLETE:
        log.warning("Trial %d was taken over by another worker (its heartbeat had stopped); its result is dropped", trial.number)
    return TrialResult(trial.number, count.refusals, kl, not count.complete, seconds, parameters.to_dict(), objectives)
