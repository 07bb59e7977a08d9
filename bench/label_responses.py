"""Responses of a benchmark model to be labelled by reading: the original and ablations along a front of a stored search.

The hand-labelled set of the demo model (bench/judge-labels) measures judges on one model. This script makes
the responses of another: the original model and four trials of the front of a stored run of our search
(weak to strong ablation), each answering bundled harmful prompts, and the original and the strongest
ablation answering bundled harmless prompts, generated greedily to a fixed length without early stop (a
judge is measured on whole responses). The model, its refusal directions and each trial's ablation are
rebuilt from the run exactly as its search had them (bench.harness.tools.stored_run).

Nothing here judges a response: they are labelled by reading (bench/judge-labels/GUIDELINE.md) before
any judge runs on them. Each configuration's responses are written as soon as they are generated, and a
run that stops resumes after the last complete configuration.

    python -m bench.label_responses --model 1.5b bench/work/ours-1.5b-mean-42
    python -m bench.label_responses --model 1.5b bench/work/ours-1.5b-mean-42 --trials 1,3,2,4 --harmful 80 --harmless 30

Writes bench/judge-labels/MODEL/responses.jsonl (one response per line: `id`, `config`, `parameters`,
`kind`, `prompt_index`, `prompt`, `response`, `tokens`, `hit_limit`, and for a trial its number and
in-search refusals and KL) and prints the time of each configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from bench.harness.paths import BENCH, WORK

TOKENS = 200  # the response length of the labelled set (whole responses: no early stop)
FRONT_TRIALS = 4


def jobs(trials: list[dict[str, Any]], harmful: int, harmless: int) -> list[tuple[dict[str, Any] | None, str, str, int]]:
    """(trial or None for the original, kind, bundled split, first index): every configuration on the first
    `harmful` harmful prompts; the original on the first `harmless` harmless prompts and the strongest ablation
    (fewest refusals) on the next `harmless`."""
    strongest = min(trials, key=lambda trial: (trial["refusals"], trial["kl"]))
    return [
        *((trial, "harmful", f"harmful_test[:{harmful}]", 0) for trial in [None, *trials]),
        (None, "harmless", f"harmless_test[:{harmless}]", 0),
        (strongest, "harmless", f"harmless_test[{harmless}:{2 * harmless}]", harmless),
    ]


def config_name(trial: dict[str, Any] | None) -> str:
    return f"trial{trial['number']}" if trial else "original"


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line] if path.exists() else []


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """All rows, atomically: an interrupted write leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    os.replace(partial, path)


def generate(session: Any, trial: dict[str, Any] | None, kind: str, split: str, first: int) -> list[dict[str, Any]]:
    """One configuration's responses to the bundled `split`, as labelled-set rows."""
    from bench.harness.tools import stored_trial_parameters
    from heretic.config import PromptSet
    from heretic.prompts import load_prompts
    from heretic.search.space import describe

    engine = session.engine
    prompts = load_prompts(PromptSet(source="bundled", split=split), session.settings.system_prompt)
    parameters = stored_trial_parameters(session, trial["params"]) if trial else None
    if parameters is not None:
        session.ablator.apply(parameters, session.directions)
    try:
        responses = engine.generate(engine.encode(prompts), TOKENS)
    finally:
        session.ablator.reset()
    assert responses is not None
    config = config_name(trial)
    extra = {"trial": trial["number"], "in_search": {"refusals": trial["refusals"], "kl": trial["kl"]}} if trial else {}
    return [
        {
            "id": f"{config}/{kind}/{first + offset:03d}",
            "config": config,
            "parameters": describe(parameters) if parameters else "no ablation",  # as the search log says it
            "kind": kind,
            "prompt_index": first + offset,
            "prompt": prompt.user,
            "response": engine.decode(tokens),
            "tokens": len(tokens),
            "hit_limit": len(tokens) >= TOKENS,
            **extra,
        }
        for offset, (prompt, tokens) in enumerate(zip(prompts, responses))
    ]


def main() -> None:
    from bench.harness.tools import front_trials, stored_run
    from heretic.cli import settings_from_argv
    from heretic.session import prepare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["demo", "1.5b"], required=True, help="the benchmark model the run searched")
    parser.add_argument("run", type=Path, help="a run_bench results file with trial parameters, or a run folder under bench/runs")
    parser.add_argument("--trials", help=f"trial numbers, comma-separated (default: the first {FRONT_TRIALS} of its front)")
    parser.add_argument("--harmful", type=int, default=80, help="bundled harmful_test prompts per configuration")
    parser.add_argument("--harmless", type=int, default=30, help="bundled harmless_test prompts for each of two configurations")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="default: bench/judge-labels/MODEL/responses.jsonl")
    args = parser.parse_args()
    out = args.out or BENCH / "judge-labels" / args.model / "responses.jsonl"

    stored, argv = stored_run(args.run, args.model, WORK / "label-responses")
    by_number = {trial["number"]: trial for trial in stored if trial.get("params")}
    if args.trials:
        numbers = [int(number) for number in args.trials.split(",")]
        if missing := [number for number in numbers if number not in by_number]:
            raise SystemExit(f"{args.run} has no trial {', '.join(map(str, missing))} with parameters.")
        trials = [by_number[number] for number in numbers]
    else:
        trials = sorted(front_trials(stored, FRONT_TRIALS), key=lambda trial: -trial["refusals"])  # weak to strong
    rows = read_rows(out)
    done = {row["id"] for row in rows}
    todo = [job for job in jobs(trials, args.harmful, args.harmless) if not job_done(job, done)]
    if not todo:
        print(f"{out} is complete ({len(rows)} responses).")
        return
    session = prepare(settings_from_argv([*argv[1:], "--batch-size", str(args.batch_size)]), interactive=False)
    for trial, kind, split, first in todo:
        started = time.perf_counter()
        rows += generate(session, trial, kind, split, first)
        write_rows(out, rows)
        print(
            f"{config_name(trial)} {kind} {split}: {time.perf_counter() - started:.0f} s; {len(rows)} responses in {out}",
            flush=True,
        )


def job_done(job: tuple[dict[str, Any] | None, str, str, int], done: set[str]) -> bool:
    """Whether the configuration's first response is stored (a configuration is written whole)."""
    trial, kind, _, first = job
    return f"{config_name(trial)}/{kind}/{first:03d}" in done


if __name__ == "__main__":
    main()
