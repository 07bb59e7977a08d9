"""The responses behind a stored run's refusal counts: chosen trials replayed, every response kept.

A run_bench results file stores each trial's parameters, refusals and KL, not its responses. This script
loads the benchmark model as a search at the benchmark's settings does (`--judge rules`), replays the
named trials and the original (no cut-off; a response stops once the judge's verdict on it is fixed, as
in the search), and prints each refused response beside its prompt and the original's verdict on it, so
that what the remaining refusals are can be read.

    python -m bench.research.trial_responses bench/results/20261203-140005.json 385,504

Pass the searched run's own search-space options after the trials if it changed them (e.g.
`--direction-index-range [0.4,1.0]`). Writes bench/results/trial-responses-<results file>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.harness.models import prepare_model
from bench.harness.paths import RESULTS, WORK
from bench.harness.tools import REFERENCE_MARKERS, our_command, stored_trial_parameters
from heretic.cli import settings_from_argv
from heretic.session import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a run_bench results file whose trials have parameters")
    parser.add_argument("trials", help="trial numbers, comma-separated")
    args, extra = parser.parse_known_args()
    data = json.loads(args.results.read_text())
    ((label, tool),) = data["tools"].items()
    stored = {trial["number"]: trial for trial in tool["trials"]}
    argv = our_command(data["settings"], prepare_model(), REFERENCE_MARKERS, ["--checkpoint-dir", str(WORK / "responses")])
    session = prepare(settings_from_argv([*argv[1:], "--judge", "rules", *extra]), interactive=False)
    evaluator = session.evaluator
    prompts = [prompt.user for prompt in evaluator.harmful]
    original = evaluator.count_refusals()
    runs: dict[str, Any] = {
        "original": {"refusals": original.refusals, "responses": original.responses, "verdicts": original.verdicts}
    }
    for number in (int(n) for n in args.trials.split(",")):
        trial = stored[number]
        session.ablator.apply(stored_trial_parameters(session, trial["params"]), session.directions)
        kl = evaluator.kl()
        count = evaluator.count_refusals()
        session.ablator.reset()
        runs[str(number)] = {
            "stored": {"refusals": trial["refusals"], "kl": trial["kl"]},
            "refusals": count.refusals,
            "kl": kl,
            "responses": count.responses,
            "verdicts": count.verdicts,
        }
        print(f"\ntrial {number}: {count.refusals} refusals, KL {kl:.4f} (in the search: {trial['refusals']}, {trial['kl']:.4f})")
        assert count.verdicts is not None and count.responses is not None
        for index, (response, refused) in enumerate(zip(count.responses, count.verdicts)):
            if refused:
                original_verdict = "refused" if original.verdicts and original.verdicts[index] else "answered"
                print(f"  [{index}] {prompts[index][:90]}  (original: {original_verdict})")
                print(f"      -> {' '.join(response.split())[:240]}")
    out = RESULTS / f"trial-responses-{args.results.stem}.json"
    out.write_text(json.dumps({"source": args.results.name, "label": label, "prompts": prompts, "runs": runs}, indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
