"""Front metrics both tools are judged by: the Pareto front of (refusals, KL), its hypervolume, the best
KL within each refusal cap, per-run timing, and the run-to-run noise over seeds."""

from __future__ import annotations

import math
import statistics
from typing import Any

from heretic.search.pareto import hypervolume  # the same measure both tools are judged by

__all__ = ["KL_CAP", "REFUSAL_CAPS", "hypervolume"]

KL_CAP = 1.0  # hypervolume reference point: (number of harmful prompts, this KL)
REFUSAL_CAPS = (0, 2, 5, 10, 15, 20, 30)


def pareto(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    front = [p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)]
    return sorted(set(front))


def best_kl_at(points: list[Any], cap: int) -> float | None:
    """The lowest KL among (refusals, KL) points with at most `cap` refusals."""
    return min((kl for r, kl in points if r <= cap), default=None)


def trial_metrics(trials: list[dict[str, Any]], n_prompts: int) -> dict[str, Any]:
    """Timing and front of a list of trial rows ({number, refusals, kl, seconds, cut}); cut trials,
    whose refusals are only a lower bound, count for time but not for the front."""
    exact = [(t["refusals"], t["kl"]) for t in trials if not t["cut"]]
    durations = [t["seconds"] for t in trials]
    best = {str(k): best_kl_at(exact, k) for k in REFUSAL_CAPS}
    return {
        "median_trial_s": round(statistics.median(durations), 2),
        "total_trials_s": round(sum(durations), 1),
        "n_trials": len(trials),
        "trials_per_hour": round(3600 * len(trials) / sum(durations), 1),
        "cut_trials": sum(t["cut"] for t in trials),
        "pareto": [[r, round(kl, 6)] for r, kl in pareto(exact)],
        "hypervolume": round(hypervolume(exact, (n_prompts, KL_CAP)), 4),
        "best_kl_at_refusals": {k: (round(v, 6) if v is not None else None) for k, v in best.items()},
        "trials": trials,
    }


def metrics(runs: list[dict[str, Any]], journal: dict[str, Any], n_prompts: int, kind: str) -> dict[str, Any]:
    """Metrics of one study, run in one or more invocations (a resumed run continues the journal; its
    time to first trial is the first invocation's, its peak RSS the largest)."""
    complete = [t for t in journal["trials"] if t["state"] == "COMPLETE"]
    if not complete:
        raise RuntimeError(f"{kind}: no completed trial; see {runs[-1]['log']}")
    kl_key = "kl_divergence" if kind == "reference" else "kl"
    trials = [
        {
            "number": t["number"],
            "refusals": int(t["user_attrs"]["refusals"]),
            "kl": float(t["user_attrs"][kl_key]),
            "seconds": round(t["complete"] - t["start"], 2),
            "cut": bool(t["user_attrs"].get("cut", False)),
            # As sampled (each tool's own names): a trial can be scored again, e.g. under another judge.
            "params": t["params"],
        }
        for t in complete
    ]
    if kind == "reference":
        baseline = int(complete[0]["user_attrs"]["base_refusals"])
    else:
        baseline = int(journal["study_attrs"]["baseline_refusals"])
    for trial, wall in zip(trials, one_sitting_wall(complete, journal["trials"], runs)):
        trial["wall_s"] = wall
    first_start = min(t["start"] for t in journal["trials"])
    peaks = [run["peak_rss_mb"] for run in runs if run["peak_rss_mb"]]
    return {
        "time_to_first_trial_s": round(first_start - runs[0]["started"], 1),
        "peak_rss_mb": round(max(peaks), 0) if peaks else None,
        "baseline_refusals": baseline,
        "exit_code": runs[-1]["exit_code"],
        "wall_s": round(sum(run["elapsed_s"] or 0 for run in runs), 1),
        "invocations": len(runs),
        **trial_metrics(trials, n_prompts),
    }


def one_sitting_wall(
    complete: list[dict[str, Any]], journal_trials: list[dict[str, Any]], runs: list[dict[str, Any]]
) -> list[float]:
    """For each completed trial, the wall time one uninterrupted run would have taken up to its end:
    the first invocation's start-up, then each invocation's search span (from its first trial's start
    to this trial's end, or to its last trial's end for the invocations before). A later sitting's
    start-up and an earlier one's ending are left out: a run in one sitting has neither."""
    starts = sorted(run["started"] for run in runs)

    def sitting(time: float) -> int:
        return max(i for i, started in enumerate(starts) if started <= time) if time >= starts[0] else 0

    of = {t["number"]: sitting(t["start"]) for t in journal_trials}  # trial number -> its sitting
    first_start: dict[int, float] = {}
    last_end: dict[int, float] = {}
    for t in journal_trials:
        i = of[t["number"]]
        first_start[i] = min(first_start.get(i, t["start"]), t["start"])
    for t in complete:
        i = of[t["number"]]
        last_end[i] = max(last_end.get(i, t["complete"]), t["complete"])
    first = min(first_start)
    startup = first_start[first] - starts[first]
    walls = []
    for t in complete:
        i = of[t["number"]]
        before = sum(last_end.get(j, first_start[j]) - first_start[j] for j in first_start if j < i)
        walls.append(round(startup + before + t["complete"] - first_start[i], 1))
    return walls


def first_trials(data: dict[str, Any], n: int, n_prompts: int) -> dict[str, Any]:
    """Our metrics over only the first n trials: the study an n-trial run gives (trials are sampled in
    order, each from the ones before it), for comparing fronts with a reference run that stopped early."""
    return dict(data, **trial_metrics([t for t in data["trials"] if t["number"] < n], n_prompts))


def noise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Run-to-run noise of our search: each seed's front metrics, and per measure the spread (max - min)."""
    per_seed = {
        seed: {key: data[key] for key in ("hypervolume", "best_kl_at_refusals", "median_trial_s", "pareto", "n_trials")}
        for seed, data in runs.items()
    }
    spread: dict[str, float | None] = {
        "hypervolume": round(
            max(d["hypervolume"] for d in per_seed.values()) - min(d["hypervolume"] for d in per_seed.values()), 4
        )
    }
    for cap in REFUSAL_CAPS:
        values = [d["best_kl_at_refusals"][str(cap)] for d in per_seed.values()]
        known = [v for v in values if v is not None]
        spread[str(cap)] = round(max(known) - min(known), 6) if len(known) == len(values) and known else None
    return {"seeds": per_seed, "spread": spread}


def combined_noise(spreads: list[float | None]) -> float | None:
    """The run-to-run noise of a difference between one run of each tool: the measured spreads
    (max - min over each tool's runs) added as independent errors, sqrt(a^2 + b^2)."""
    known = [spread for spread in spreads if spread is not None]
    return math.sqrt(sum(spread**2 for spread in known)) if known else None


def spread_at(values: list[float | None]) -> float | None:
    """max - min, or None unless every run has a trial there."""
    known = [v for v in values if v is not None]
    return max(known) - min(known) if known and len(known) == len(values) else None


def median_at(values: list[float | None]) -> float | None:
    """The median of the runs' best KL (a run with no trial at that cap counts as worst); None when that
    median involves such a run."""
    if not values:
        return None
    median = statistics.median(float("inf") if v is None else v for v in values)
    return None if median == float("inf") else median


def compact_ranges(numbers: list[int]) -> str:
    """[24, 25, 26, 33] -> "24–26, 33"."""
    groups: list[list[int]] = []
    for n in numbers:
        if groups and n == groups[-1][-1] + 1:
            groups[-1].append(n)
        else:
            groups.append([n])
    return ", ".join(f"{g[0]}–{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


def best_kl(points: list[tuple[int, float]], cap: int) -> float | None:
    within = [kl for refusals, kl in points if refusals <= cap]
    return min(within) if within else None


def median_best(runs: list[dict[str, Any]], cap: int) -> float | None:
    """Median over runs of the best KL within the cap; a run with no trial within it counts as worst."""
    values = [best_kl(run["points"], cap) for run in runs]
    median = statistics.median(value if value is not None else float("inf") for value in values)
    return None if median == float("inf") else median


def fewest_refusals(points: list[tuple[int, float]], max_kl: float) -> int | None:
    within = [refusals for refusals, kl in points if kl <= max_kl]
    return min(within) if within else None
