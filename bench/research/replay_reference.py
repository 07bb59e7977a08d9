"""Score the reference's own trials with our engine: same parameters in, same scores out?

The two tools implement the same ablation and the same scoring, so a trial's parameters should give
the same refusal count and KL divergence in both; what differs between their Pareto fronts is then
only which parameters each search happened to try. This script reads the reference's study from the
side-by-side benchmark (bench/work/reference), applies chosen trials' parameters with our tool on
the same model, prompts and markers, and prints both tools' scores next to each other.

    python -m bench.research.replay_reference                 # the reference's Pareto-front trials
    python -m bench.research.replay_reference --trials 9,20   # chosen trials

Writes bench/results/replay-reference.json and the "replay" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from bench.harness.machine import run_record
from bench.harness.metrics import pareto
from bench.harness.paths import RESEARCH, RESULTS, WORK
from bench.harness.publish import update_section
from bench.harness.tools import REFERENCE_VENV, our_command, our_parameters, reference_default_markers
from heretic.cli import settings_from_argv
from heretic.search.space import describe
from heretic.session import prepare


def reference_trials() -> list[optuna.trial.FrozenTrial]:
    journals = glob.glob(str(WORK / "reference" / "checkpoints" / "*.jsonl"))
    if not journals:
        raise SystemExit("No reference study in bench/work/reference; run `python -m bench.run_bench --tools reference` first.")
    study = optuna.load_study(study_name="heretic", storage=JournalStorage(JournalFileBackend(journals[0])))
    return [t for t in study.trials if t.state == TrialState.COMPLETE]


def front_numbers(trials: list[optuna.trial.FrozenTrial]) -> list[int]:
    """Numbers of the trials on the reference's Pareto front, by refusals."""
    score = {t.number: (t.user_attrs["refusals"], t.user_attrs["kl_divergence"]) for t in trials}
    front = set(pareto(list(score.values())))
    return sorted((n for n in score if score[n] in front), key=lambda n: (score[n], n))


def markdown(rows: list[dict[str, Any]], command: str, n_prompts: int) -> str:
    refusal_gap = max(abs(row["our_refusals"] - row["reference_refusals"]) for row in rows)
    kl_gap = max(abs(row["our_kl"] / row["reference_kl"] - 1) for row in rows)
    lines = [
        "### Same parameters, same scores: the reference's trials scored by our tool",
        "",
        f"The reference's Pareto-front trials of the run above, their parameters applied by our tool to the same "
        f"model, prompts and markers. Refusals differ by at most {refusal_gap} of {n_prompts} and KL by at most "
        f"{kl_gap:.1%}: bf16 rounding, which also flips the odd near-tie greedy continuation (see the lever table). The two tools "
        "score a given ablation alike, so the difference between their fronts comes from which parameters each "
        "search tried.",
        "",
        "| reference trial | parameters | reference: refusals / KL | ours: refusals / KL |",
        "|---:|---|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['trial']} | {row['parameters']} | {row['reference_refusals']} / {row['reference_kl']:.4f} "
            f"| {row['our_refusals']} / {row['our_kl']:.4f} |"
        )
    lines += ["", f"Reproduce: `{command}`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", default="", help="comma-separated reference trial numbers (default: its Pareto front)")
    args = parser.parse_args()

    latest = json.loads((RESULTS / "latest.json").read_text())
    settings_used = latest["settings"]
    trials = {t.number: t for t in reference_trials()}
    numbers = [int(n) for n in args.trials.split(",") if n.strip()] or front_numbers(list(trials.values()))
    markers = reference_default_markers(REFERENCE_VENV / "bin" / "python")
    argv = our_command(settings_used, WORK / "Qwen2.5-Coder-0.5B-Instruct", markers, ["--checkpoint-dir", str(WORK / "replay")])[
        1:
    ]
    settings = settings_from_argv(argv)
    session = prepare(settings, interactive=False)

    rows = []
    for number in numbers:
        trial = trials[number]
        parameters = our_parameters(trial.params)
        started = time.perf_counter()
        session.ablator.apply(parameters, session.directions)
        kl = session.evaluator.kl()
        refusals = session.evaluator.count_refusals().refusals
        rows.append(
            {
                "trial": number,
                "parameters": describe(parameters),
                "reference_refusals": trial.user_attrs["refusals"],
                "reference_kl": trial.user_attrs["kl_divergence"],
                "our_refusals": refusals,
                "our_kl": kl,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(
            f"trial {number}: reference {rows[-1]['reference_refusals']} / {rows[-1]['reference_kl']:.4f}, "
            f"ours {refusals} / {kl:.4f} ({rows[-1]['seconds']} s)",
            flush=True,
        )
    session.ablator.reset()

    command = "python -m bench.research.replay_reference" + (f" --trials {args.trials}" if args.trials else "")
    (RESULTS / "replay-reference.json").write_text(json.dumps({"rows": rows, "command": command}, indent=2) + "\n")
    update_section(
        markdown(rows, command, settings_used["eval_prompts"]),
        "replay",
        run_record(),
        command,
        RESEARCH / "2026-11-30-replay-reference.md",
    )


if __name__ == "__main__":
    main()
