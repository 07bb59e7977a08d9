"""Directions from the prompts the original refuses: a screening at fixed parameters.

The refusal direction is the difference between the mean residuals of the harmful and the harmless training
prompts. The original answers many harmful training prompts (the demo model about half), so the harmful
mean mixes the state "about to refuse" with "about to answer a harmful request": the direction carries the
topic as well as the refusal. This screen reads the direction from the harmful prompts the original refuses
only (its greedy answers judged by the rules judge, as in a search):

    r_j = normalize(mean_{i ∈ refused} h_ij − mean_{i ∈ harmless} h_ij)    (then orthogonalized, as the tool does)

and scores the front trials of a stored search with their parameters unchanged and only the directions
replaced: refusals on the harmful evaluation prompts and KL on the harmless ones, against the directions of
every harmful prompt. A screening, not a search (as in docs/research/2026-12-07-direction-kinds.md).

    python -m bench.research.refused_directions bench/results/20261207-082950.json --model demo --trials 4

Writes bench/results/refused-directions-<model>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.harness.paths import RESULTS, WORK
from bench.harness.tools import front_trials, stored_run, stored_trial_parameters
from heretic.cli import settings_from_argv
from heretic.directions import refusal_directions
from heretic.scoring.evaluator import Evaluator
from heretic.session import prepare


def score(session: Any, parameters: Any, directions: torch.Tensor) -> dict[str, Any]:
    """Refusals (complete count) and KL of one ablation with `directions`."""
    session.ablator.apply(parameters, directions)
    try:
        kl = session.evaluator.kl()
        count = session.evaluator.count_refusals()
    finally:
        session.ablator.reset()
    return {"refusals": count.refusals, "kl": kl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run_bench results file (or a run's folder under bench/work)")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--trials", type=int, default=4, help="the front's trials with the fewest refusals to score")
    args, extra = parser.parse_known_args()
    stored, argv = stored_run(args.run, args.model, WORK / "refused-directions")
    session = prepare(settings_from_argv([*argv[1:], "--judge", "rules", *extra]), interactive=False)
    assert session.residuals is not None, "a fresh checkpoint folder computes the residuals"
    started = time.perf_counter()
    training = Evaluator(session.engine, session.judge, session.prompt_sets["harmful"], [], session.settings.max_response_length)
    verdicts = torch.tensor(training.count_refusals().verdicts)
    verdict_s = time.perf_counter() - started
    harmful, harmless = session.residuals["harmful"], session.residuals["harmless"]
    refused = refusal_directions(harmful[verdicts], harmless, session.settings.orthogonalize_direction)
    cosine = (refused * session.directions).sum(-1)  # (layers + 1,) both unit rows
    print(f"the original refuses {int(verdicts.sum())} of {len(verdicts)} harmful training prompts ({verdict_s:.0f} s)")
    print(
        "cosine with the directions of every harmful prompt, by residual index: " + " ".join(f"{c:.2f}" for c in cosine.tolist())
    )
    rows = []
    for trial in front_trials(stored, args.trials):
        parameters = stored_trial_parameters(session, trial["params"])
        row = {
            "trial": trial["number"],
            "stored": {"refusals": trial["refusals"], "kl": trial["kl"]},
            "mean": score(session, parameters, session.directions),
            "refused": score(session, parameters, refused),
        }
        rows.append(row)
        print(
            f"trial {row['trial']}: every harmful prompt {row['mean']['refusals']} / {row['mean']['kl']:.3f}, "
            f"refused only {row['refused']['refusals']} / {row['refused']['kl']:.3f} (stored {trial['refusals']} / {trial['kl']:.3f})"
        )
    out = RESULTS / f"refused-directions-{args.model}.json"
    out.write_text(
        json.dumps(
            {
                "run": args.run.name,
                "model": args.model,
                "refused_training_prompts": int(verdicts.sum()),
                "training_prompts": len(verdicts),
                "cosine": cosine.tolist(),
                "trials": rows,
            },
            indent=1,
        )
    )
    print(f"written: {out}")


if __name__ == "__main__":
    main()
