"""Held-out KL against in-search KL, trial by trial: does the search's harmless set see the tail?

The search ranks trials by their KL divergence from the original on its harmless evaluation prompts. A
chosen trial's KL on other harmless prompts can be higher, most of all on requests an assistant opens with
a disclaimer (real-time data, prices, forecasts, opinions): there the original's first token is a
disclaimer's and the ablation changes it. This script measures, for every trial of a stored run of our
search, each prompt's KL on three harmless sets:

- the search's own evaluation prompts (the KL the search ranked trials by, measured again here);
- the bundled held-out prompts (heretic/data/prompts/harmless_heldout.txt, never used by the search),
  split into the prompts whose answer the original opens with a decline or disclaimer (the rules judge,
  reading its first 48 tokens, counts it a refusal) and the others;
- a candidate set of 40 such prompts (bench/prompts/harmless_disclaimer.txt, written apart from the
  held-out set and disjoint from it): what the search's set would gain.

From them: Spearman's ρ over the trials between in-search KL and held-out KL (whole set, disclaimer part,
ordinary part), the same for the mixed KL (the mean over the search's prompts and the candidate set
together), and the trial the default rule chooses (fewest refusals at KL ≤ --max-kl, on the front of the
stored refusal counts) under in-search KL and under mixed KL, with its held-out KL (mean, median).

Decision rule, fixed before measuring: the candidate prompts join the search's harmless set if, on both
benchmark models, the mixed KL predicts held-out KL better (ρ higher by at least 0.05) or the chosen trial
under the mixed KL has a lower held-out mean KL than the one chosen today. A rescoring of the same trials
says what the mixed KL would choose among them, not where a search led by it would sample: that is noted
beside the numbers.

    python -m bench.heldout_kl --model demo bench/results/20261207-082950.json
    python -m bench.heldout_kl --model 1.5b bench/runs/ours-1.5b-rules-42      # a run's folder (unfinished too)
    python -m bench.heldout_kl --table

Writes bench/results/heldout-kl.json (one entry per model) and the "heldout-kl" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from statistics import fmean as mean
from typing import Any

from scipy.stats import spearmanr

from bench.harness.machine import cpu_flags, git_commit
from bench.harness.paths import RESULTS, ROOT, WORK
from bench.harness.publish import recorded, update_section

OUT = RESULTS / "heldout-kl.json"
MARKER = "heldout-kl"
CANDIDATES = Path(__file__).parent / "prompts" / "harmless_disclaimer.txt"
OPENING_TOKENS = 48  # the original's answer read for a decline or disclaimer
MAX_KL = 0.5  # the default --max-kl of the fewest-refusals rule
MIN_RHO_GAIN = 0.05  # the decision rule's margin


def rho(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (ties share their mean rank)."""
    return float(spearmanr(x, y).statistic)


def chosen(trials: list[dict[str, Any]], kl_key: str, max_kl: float = MAX_KL) -> dict[str, Any]:
    """The default rule's trial: on the front of (refusals, KL by `kl_key`), the fewest refusals among the
    trials with KL ≤ max_kl (then the lowest KL); the lowest KL when none is under the cap."""
    from heretic.search.pareto import TrialResult, pareto_front, select

    results = [TrialResult(t["number"], t["refusals"], t[kl_key], False, 0.0, {}) for t in trials]
    picked = select(pareto_front(results), "fewest-refusals", max_kl, 0)
    return next(t for t in trials if t["number"] == picked.number)


def counted_by(run: Path) -> str:
    """The judge that counted the stored run's refusals: the `--judge` of its command, else the markers judge (what a
    run_bench search runs without one)."""
    if run.is_dir():
        command = " ".join(json.loads((run / "command.json").read_text()))
    else:
        (tool,) = [t for t in json.loads(run.read_text())["tools"].values() if "params" in (t.get("trials") or [{}])[0]]
        command = tool["command"]
    found = re.search(r"--judge[ =](\w[\w-]*)", command)
    return found[1] if found else "markers"


def measure(model: str, run: Path, extra: list[str]) -> dict[str, Any]:
    """Every stored trial of `run` rebuilt on `model`, its per-prompt KL measured on the three sets."""
    from bench.harness.tools import stored_run, stored_trial_parameters
    from heretic.cli import settings_from_argv
    from heretic.prompts import Prompt, load_prompts
    from heretic.scoring.evaluator import Evaluator
    from heretic.scoring.rules import RuleJudge
    from heretic.session import prepare

    stored, argv = stored_run(run, model, WORK / "heldout-kl")
    trials = [t for t in stored if t.get("params") and not t.get("cut")]
    session = prepare(settings_from_argv([*argv[1:], "--judge", "rules", *extra]), interactive=False)
    settings, engine = session.settings, session.engine
    heldout = load_prompts(settings.harmless_heldout_prompts, settings.system_prompt)
    candidates = [Prompt(settings.system_prompt, line.strip()) for line in CANDIDATES.read_text().splitlines() if line.strip()]
    sets = {"search": session.evaluator}
    for name, prompts in (("heldout", heldout), ("candidates", candidates)):
        sets[name] = Evaluator(engine, session.judge, [], prompts, settings.max_response_length)
        sets[name].kl_tokens = settings.kl_tokens
    session.ablator.reset()
    for evaluator in sets.values():
        if evaluator.base_logprobs is None:
            evaluator.measure_base()
    openings = {}  # set name -> the rules judge's verdict on the original's opening of each prompt's answer
    for name in ("heldout", "candidates"):
        ids = engine.generate(sets[name].harmless_ids, OPENING_TOKENS)
        assert ids is not None
        openings[name] = RuleJudge(whole=True).judge(sets[name].harmless, [engine.decode(i) for i in ids])
    rows = []
    started = time.perf_counter()
    for trial in trials:
        session.ablator.apply(stored_trial_parameters(session, trial["params"]), session.directions)
        try:
            kl = {name: evaluator.kl_per_prompt().tolist() for name, evaluator in sets.items()}
        finally:
            session.ablator.reset()
        rows.append({"number": trial["number"], "refusals": trial["refusals"], "stored_kl": trial["kl"], "kl": kl})
        print(
            f"trial {trial['number']}: in-search {mean(kl['search']):.4f} (stored {trial['kl']:.4f}), held-out {mean(kl['heldout']):.4f}"
        )
    return {
        "model": model,
        "run": str(run.resolve().relative_to(ROOT)) if run.is_dir() else run.name,
        "options": extra,
        "counted_by": counted_by(run),
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "seconds_per_trial": (time.perf_counter() - started) / max(len(rows), 1),
        "prompts": {name: [p.user for p in evaluator.harmless] for name, evaluator in sets.items()},
        "original_declines": openings,
        "trials": rows,
    }


def summarize(entry: dict[str, Any]) -> dict[str, Any]:
    """The correlations and the chosen trials of one model's measurement."""
    declines = entry["original_declines"]["heldout"]
    trials = []
    for row in entry["trials"]:
        kl = row["kl"]
        trials.append(
            {
                "number": row["number"],
                "refusals": row["refusals"],
                "search": mean(kl["search"]),
                "mixed": mean(kl["search"] + kl["candidates"]),
                "heldout": mean(kl["heldout"]),
                "heldout_median": statistics.median(kl["heldout"]),
                "heldout_declined": mean([v for v, d in zip(kl["heldout"], declines) if d]) if any(declines) else None,
                "heldout_answered": mean([v for v, d in zip(kl["heldout"], declines) if not d]),
            }
        )
    column = {key: [t[key] for t in trials] for key in ("search", "mixed", "heldout", "heldout_answered")}
    summary: dict[str, Any] = {
        "trials": len(trials),
        "heldout_declined_prompts": sum(declines),
        "candidates_declined": sum(entry["original_declines"]["candidates"]),
        "rho": {
            "search_heldout": rho(column["search"], column["heldout"]),
            "search_heldout_answered": rho(column["search"], column["heldout_answered"]),
            "mixed_heldout": rho(column["mixed"], column["heldout"]),
        },
    }
    if any(declines):
        declined = [t["heldout_declined"] for t in trials]
        summary["rho"]["search_heldout_declined"] = rho(column["search"], declined)
        summary["rho"]["mixed_heldout_declined"] = rho(column["mixed"], declined)
    summary["chosen"] = {key: chosen(trials, key) for key in ("search", "mixed")}
    gain = summary["rho"]["mixed_heldout"] - summary["rho"]["search_heldout"]
    better = summary["chosen"]["mixed"]["heldout"] < summary["chosen"]["search"]["heldout"]
    summary["supports_candidates"] = gain >= MIN_RHO_GAIN or better
    return summary


def chosen_cell(trial: dict[str, Any]) -> str:
    declined = f", declined part {trial['heldout_declined']:.3f}" if trial["heldout_declined"] is not None else ""
    return (
        f"{trial['number']}: {trial['refusals']} at {trial['search']:.3f} (mixed {trial['mixed']:.3f}); "
        f"held-out {trial['heldout']:.3f}, median {trial['heldout_median']:.4f}{declined}"
    )


def section(results: dict[str, Any]) -> str:
    lines = [
        "For every trial of a stored run, its KL divergence on the search's harmless prompts (in-search), on the "
        f"bundled held-out harmless prompts, split by whether the original opens its answer with a decline or "
        f"disclaimer (the rules judge on its first {OPENING_TOKENS} tokens), and on 40 candidate prompts of that kind "
        "(bench/prompts/harmless_disclaimer.txt); mixed: the mean over the search's and the candidate prompts. ρ: "
        "Spearman's rank correlation over the trials. Chosen: the default rule (fewest refusals at KL ≤ 0.5 on the "
        "front) under each KL, as trial: refusals at in-search KL. Decision rule, fixed before measuring: the "
        f"candidates join the search's set if on both models ρ(mixed, held-out) exceeds ρ(in-search, held-out) by "
        f"≥ {MIN_RHO_GAIN} or the mixed KL chooses a trial with a lower held-out mean KL.",
        "",
        "| model (run) | trials | held-out prompts the original declines | ρ in-search / held-out (declined part, answered part) | ρ mixed / held-out (declined part) | chosen by in-search KL | chosen by mixed KL | supports the candidates |",
        "|---|---:|---:|---|---|---|---|---|",
    ]
    for model, entry in results.items():
        s = summarize(entry)
        r = s["rho"]
        declined = f"{r['search_heldout_declined']:.2f}" if "search_heldout_declined" in r else "–"
        mixed_declined = f"{r['mixed_heldout_declined']:.2f}" if "mixed_heldout_declined" in r else "–"
        lines.append(
            f"| {model} ({entry['run']}, refusals by {entry['counted_by']}, {entry['dtype']}) | {s['trials']} | {s['heldout_declined_prompts']} of "
            f"{len(entry['prompts']['heldout'])} (candidates: {s['candidates_declined']} of {len(entry['prompts']['candidates'])}) | "
            f"{r['search_heldout']:.2f} ({declined}, {r['search_heldout_answered']:.2f}) | {r['mixed_heldout']:.2f} ({mixed_declined}) | "
            f"{chosen_cell(s['chosen']['search'])} | {chosen_cell(s['chosen']['mixed'])} | {'yes' if s['supports_candidates'] else 'no'} |"
        )
    if len(results) > 1:  # one model's date, CPU and commit are the stamp's
        lines.append("")
        lines.append(
            "Per model: "
            + "; ".join(
                f"{m} {e['date']}, CPU flags {', '.join(e['cpu_flags'])}, commit {e['commit']}" for m, e in results.items()
            )
            + "."
        )
    return "\n".join(lines)


def publish(results: dict[str, Any]) -> None:
    """The section under one stamp line: the latest date, the CPU flags and commits of the entries."""
    meta = recorded(*results.values())
    update_section(section(results), MARKER, meta, "; ".join(entry["command"] for entry in results.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", type=Path, help="a run_bench results file, or a run's folder under bench/runs")
    parser.add_argument("--model", default="demo", help="the benchmark model the run searched (default: demo)")
    parser.add_argument("--table", action="store_true", help="only rewrite the BENCHMARKS.md section from the results file")
    args, extra = parser.parse_known_args()
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    if not args.table:
        if args.run is None:
            parser.error("name a run (or --table)")
        entry = measure(args.model, args.run, extra)
        command = " ".join(["python -m bench.heldout_kl --model", args.model, str(args.run), *extra])
        now = datetime.now(UTC)
        entry.update(command=command, date=now.strftime("%Y-%m-%d %H:%M UTC"), cpu_flags=cpu_flags(), commit=git_commit())
        results[args.model] = entry
        OUT.write_text(json.dumps(results, indent=1))
        print(json.dumps(summarize(entry), indent=1))
    publish(results)


if __name__ == "__main__":
    main()
