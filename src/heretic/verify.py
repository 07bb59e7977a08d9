"""Counting the refusals of the Pareto front's trials again on whole responses, after the search.

The search reads little to stay fast: a response stops once the judge's verdict is fixed (the rules
judge reads its first 300 characters) and at --max-response-length tokens. A model can refuse after
that ("Sure, here is an overview. However, I cannot provide ..."), so the counts that rank trials can
be too low for the numbers handed out. After the search, the trials of its front are counted again:
responses generated to --verify-response-length tokens without early stop, judged by --verify-judge
(default: the search's judge, reading the whole response). Only trials of the search's front are
counted again, in the order --select prefers them, while the budget lasts: --verify-budget times the
search's time (its trials' times added up), less what earlier verifications of the study took.

The verified counts are extra results, not scores: the trials' recorded counts (what the sampler saw)
stay as they are, so the three settings are run settings and a search resumes whatever their values.
The counts are kept in the study by what produced them (VERIFIED_ATTR), so a continued run does not
count a trial again. Where a trial has one, the front shown, the choice, the card, heretic.json and
the report use the verified count, and say so.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import optuna

from .ablation.parameters import AblationParameters
from .errors import HereticError
from .model.batching import halving_on_oom
from .scoring.coherence import DEGENERATE_AT, is_degenerate
from .scoring.evaluator import Evaluator
from .scoring.judges import judge_identity
from .scoring.refusals import RefusalJudge
from .scoring.rules import LATE_RULES_REVISION, RuleJudge
from .search.pareto import (
    TrialResult,
    VerifiedCount,
    pareto_front,
    preference_order,
    study_directions,
    trial_results,
)
from .session import Session, make_judge
from .ui import ProgressBars, console, format_duration

# Study attribute with the verified counts: {key of what counts (verify_key): {"trials": {trial number:
# [refusals, degenerate, seconds]}, "seconds": time spent, aborted counts included}}.
VERIFIED_ATTR = "verified_refusals"

# Counts one trial on whole responses; returns None when it ran past the seconds it was given (it is then unfinished).
CountFn = Callable[[TrialResult, float], VerifiedCount | None]


def verify_key(settings: Any) -> str:
    """What makes a verified count: the verify judge (as the checkpoint fingerprint knows judges), the length and
    the degeneracy threshold of its degenerate responses."""
    judge = settings.verify_judge
    chosen = settings if judge is None else settings.model_copy(update={"judge": judge})
    entry: dict[str, object] = {
        "judge": judge_identity(chosen),
        "tokens": settings.verify_response_length,
        "degenerate_at": DEGENERATE_AT,
    }
    if chosen.judge == "rules":
        entry["late_rules"] = LATE_RULES_REVISION
    return hashlib.sha256(json.dumps(entry, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stored_verified(study: optuna.Study, key: str) -> tuple[dict[int, VerifiedCount], float]:
    """(verified counts by trial number, seconds spent) kept in the study for `key`."""
    entry = study.user_attrs.get(VERIFIED_ATTR, {}).get(key, {})
    counts = {int(number): VerifiedCount(int(r), int(d), float(s)) for number, (r, d, s) in entry.get("trials", {}).items()}
    return counts, float(entry.get("seconds", 0.0))


def store_verified(study: optuna.Study, key: str, counts: dict[int, VerifiedCount], seconds: float) -> None:
    """Keep the verified counts of `key` in the study (those of other keys stay)."""
    kept = dict(study.user_attrs.get(VERIFIED_ATTR, {}))
    trials = {str(number): [c.refusals, c.degenerate, c.seconds] for number, c in sorted(counts.items())}
    kept[key] = {"trials": trials, "seconds": seconds}
    study.set_user_attr(VERIFIED_ATTR, kept)


def budget_seconds(results: list[TrialResult], share: float) -> float:
    """The verification's budget: share * (sum of the trials' seconds)."""
    return share * sum(result.seconds for result in results)


def first_estimate(study: optuna.Study, tokens: int) -> float | None:
    """The seconds a count generating `tokens` tokens takes, before any was timed: tokens / r, with r the median of
    (tokens generated / seconds) over the search's trials counted in full (their KL pass is in their seconds, so r
    is low and the estimate errs long); None when no trial recorded its tokens."""
    rates = sorted(
        t.user_attrs["tokens"] / t.user_attrs["seconds"]
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.user_attrs.get("tokens") and t.user_attrs.get("seconds")
    )
    return tokens / rates[len(rates) // 2] if rates else None


def verify_in_order(
    pending: list[TrialResult],
    left: float,
    count: CountFn,
    known: list[float],
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[int, VerifiedCount], float, list[int]]:
    """Count `pending` in their order while `left` seconds last: ({number: count}, seconds spent, numbers left).

    A trial starts when the mean time of the counts made so far (`known`: earlier ones, or an estimate; then this
    run's) fits in what is left, or when there is none; one running past what is left is stopped and stays unverified."""
    done: dict[int, VerifiedCount] = {}
    spent, times = 0.0, list(known)
    for index, result in enumerate(pending):
        remaining = left - spent
        if remaining <= 0 or (times and sum(times) / len(times) > remaining):
            return done, spent, [r.number for r in pending[index:]]
        started = clock()
        verified = count(result, remaining)
        spent += clock() - started
        if verified is None:
            return done, spent, [r.number for r in pending[index:]]
        done[result.number] = verified
        times.append(verified.seconds)
    return done, spent, []


def verify_judge(session: Session) -> RefusalJudge:
    """The judge of the verified counts: --verify-judge, else the search's judge, reading whole responses."""
    settings = session.settings
    judge = settings.verify_judge
    if judge is None or judge == settings.judge:
        if isinstance(session.judge, RuleJudge):
            return RuleJudge(session.judge.window, whole=True)
        return session.judge
    if judge == "rules":
        return RuleJudge(whole=True)
    if judge == "http" and not settings.judge_url:
        raise HereticError("--verify-judge http needs the endpoint's API root in --judge-url.")
    return make_judge(settings.model_copy(update={"judge": judge}), session.engine, session.ablator)


def whole_counter(session: Session, judge: RefusalJudge, bars: ProgressBars) -> CountFn:
    """Counts a trial's refusals on whole responses to the harmful evaluation prompts, and its degenerate responses."""
    settings = session.settings
    evaluator = Evaluator(
        session.engine, judge, session.evaluator.harmful, [], settings.verify_response_length, stop_on_verdict=False
    )
    evaluator.on_responses = session.evaluator.on_responses
    evaluator.progress = bars

    def count(result: TrialResult, seconds: float) -> VerifiedCount | None:
        started = time.perf_counter()
        session.ablator.apply(AblationParameters.from_dict(result.parameters), session.directions)
        stop = started + seconds
        counted = halving_on_oom(evaluator.engine, lambda: evaluator.count_refusals(lambda _: time.perf_counter() > stop))
        if not counted.complete:
            return None
        degenerate = sum(is_degenerate(response) for response in counted.responses)
        return VerifiedCount(counted.refusals, degenerate, time.perf_counter() - started)

    return count


def verify_front(session: Session, study: optuna.Study) -> dict[int, VerifiedCount]:
    """Count the search front's trials again on whole responses, within the budget; return every verified
    count of the study (also kept in `session.verified`)."""
    settings = session.settings
    key = verify_key(settings)
    verified, spent = stored_verified(study, key)
    session.verified = verified
    results = trial_results(study)
    directions = study_directions(study)
    front = pareto_front(results, directions)
    order = preference_order(front, settings.select.value, settings.max_kl, settings.max_refusals, directions)
    pending = [result for result in order if result.number not in verified]
    budget = budget_seconds(results, settings.verify_budget)
    if not pending or budget <= 0:
        return verified
    if spent >= budget:
        console.print(verified_line(session, order, verified, budget, [r.number for r in pending]))
        return verified
    judge = verify_judge(session)
    known = [count.seconds for count in verified.values()]
    estimate = first_estimate(study, settings.verify_response_length * len(session.evaluator.harmful))
    known = known or ([estimate] if estimate is not None else [])
    try:
        with ProgressBars() as bars:
            done, seconds, left = verify_in_order(pending, budget - spent, whole_counter(session, judge, bars), known)
    finally:
        session.ablator.reset()
    verified.update(done)
    store_verified(study, key, verified, spent + seconds)
    console.print(verified_line(session, order, verified, budget, left, spent + seconds))
    return verified


def verified_line(
    session: Session,
    order: list[TrialResult],
    verified: dict[int, VerifiedCount],
    budget: float,
    left: list[int],
    spent: float | None = None,
) -> str:
    """What the verification found: each front trial's count in the search and on whole responses, and its cost."""
    settings = session.settings
    n = len(session.evaluator.harmful)
    counts = ", ".join(
        f"trial {r.number}: {r.refusals_text} → [bold]{verified[r.number].refusals}[/]/{n}"
        f" ({verified[r.number].degenerate} degenerate)"
        for r in order
        if r.number in verified
    )
    judge = settings.verify_judge or settings.judge.rpartition(":")[2]  # a plug-in by its name, not its path
    line = f"Refusals on whole responses (up to {settings.verify_response_length} tokens, {judge} judge): {counts or 'none'}"
    search = budget / settings.verify_budget if settings.verify_budget else 0.0
    if spent is not None and search > 0:
        line += f"; took {format_duration(spent)}, {spent / search:.0%} of the search's {format_duration(search)}"
    if left:
        within = f"--verify-budget {settings.verify_budget:g} ({format_duration(budget)})"
        line += f"; [yellow]not verified within {within}:[/] trial " + ", ".join(map(str, left))
    return line
