"""The reference's search, driven by other seeds, with our engine doing the scoring.

The side-by-side benchmark runs the reference once (seed 42; about four hours here), so its
run-to-run noise is unknown. The replay (bench/research/replay_reference.py) shows that both tools score the
same parameters alike, so the reference's search can be re-run at our speed: its sampler (multivariate
TPE, 128 EI candidates, one seed for the whole study, 10 start-up trials), its parameter space
(MLP max weight 0.8 to 1.5, its parameter names in its order), run by its own Optuna, and its objectives (KL, or
refusals / base refusals × 0.01 when KL is below 0.01; refusals / base refusals), every trial scored
to the end (no cut). Our engine measures each trial's KL and refusals on the benchmark's model,
prompts and markers.

    python -m bench.reference_search                    # seeds 42, 43, 44 (about 25 min each)
    python -m bench.reference_search --seeds 45,46       # more seeds; finished ones are kept

Seed 42 is the benchmark's own seed; its start-up trials are the reference run's when both use the
same Optuna random streams. Writes bench/results/reference-search.json (one entry per seed, kept
between runs); `python -m bench.run_bench --report-only` then uses these seeds' spread.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.harness.metrics import trial_metrics
from bench.harness.paths import RESULTS, WORK
from bench.harness.side_by_side import search_settings
from bench.harness.tools import REFERENCE_SPACE, ensure_reference_venv, our_command, our_parameters, reference_default_markers
from heretic.ablation.parameters import AblationParameters
from heretic.cli import settings_from_argv
from heretic.session import prepare

OUTPUT = RESULTS / "reference-search.json"
KL_TARGET = 0.01  # the reference's kl_divergence_target (its default)


# The reference's sampler, run by the reference's own Optuna (its version's TPE), as a small server:
# it writes each trial's parameters as a JSON line and reads back the two objective values. The
# parameter space is the reference's, sampled in its order under its names.
SAMPLER_SERVER = (
    REFERENCE_SPACE
    + r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import optuna
from optuna.samplers import TPESampler
optuna.logging.set_verbosity(optuna.logging.WARNING)
seed, n_startup, last = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) - 1
sampler = TPESampler(n_startup_trials=n_startup, n_ei_candidates=128, multivariate=True, seed=seed)
study = optuna.create_study(sampler=sampler, directions=["minimize", "minimize"])
while True:
    trial = study.ask()
    suggest(trial, last)
    print(json.dumps(trial.params), flush=True)
    line = sys.stdin.readline()
    if not line:
        break
    study.tell(trial, json.loads(line))
"""
)


def reference_objectives(refusals: int, kl: float, base_refusals: int) -> list[float]:
    """The reference's two minimised scores: KL (replaced below the target by a refusal-based value) and
    refusals relative to the unmodified model."""
    refusal_score = refusals / base_refusals if base_refusals > 0 else float(refusals)
    kl_score = kl if kl >= KL_TARGET else refusal_score * KL_TARGET
    return [kl_score, refusal_score]


def run_seed(session: Any, python: Path, seed: int, n_trials: int, n_startup: int) -> list[dict[str, Any]]:
    server = subprocess.Popen(
        [str(python), "-c", SAMPLER_SERVER, str(seed), str(n_startup), str(session.arch.num_layers)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None and server.stdout is not None
    trials = []
    try:
        for number in range(n_trials):
            line = server.stdout.readline()
            if not line:
                raise SystemExit(f"The reference's sampler ({python}) stopped; its error is printed above.")
            params = json.loads(line)
            parameters: AblationParameters = our_parameters(params)
            started = time.perf_counter()
            session.ablator.apply(parameters, session.directions)
            kl = session.evaluator.kl()
            refusals = session.evaluator.count_refusals().refusals
            seconds = time.perf_counter() - started
            server.stdin.write(json.dumps(reference_objectives(refusals, kl, session.base_refusals)) + "\n")
            server.stdin.flush()
            trials.append(
                {"number": number, "refusals": refusals, "kl": kl, "seconds": round(seconds, 1), "cut": False, "params": params}
            )
            print(f"seed {seed} trial {number}: {refusals} refusals, KL {kl:.4f} ({seconds:.0f} s)", flush=True)
    finally:
        server.stdin.close()
        server.wait(timeout=60)
        session.ablator.reset()
    return trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="42,43,44", help="comma-separated sampler seeds")
    args = parser.parse_args()

    settings_used = json.loads((RESULTS / "latest.json").read_text())["settings"]
    if settings_used["quick"]:
        raise SystemExit("The latest benchmark run is a reduced one; run the full benchmark first.")
    done: dict[str, Any] = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else {}
    if done.get("settings") != search_settings(settings_used):
        done = {"settings": search_settings(settings_used), "seeds": {}}  # measured for other settings: start over
    seeds = [int(s) for s in args.seeds.split(",") if s.strip() and s.strip() not in done["seeds"]]
    if not seeds:
        print(f"Every seed asked for is already in {OUTPUT}.")
        return
    python = ensure_reference_venv()  # the reference's environment gives its markers and runs its sampler
    markers = reference_default_markers(python)
    argv = our_command(
        settings_used, WORK / "Qwen2.5-Coder-0.5B-Instruct", markers, ["--checkpoint-dir", str(WORK / "reference-search")]
    )[1:]
    session = prepare(settings_from_argv(argv), interactive=False)
    n_prompts = settings_used["eval_prompts"]
    for seed in seeds:
        trials = run_seed(session, python, seed, settings_used["trials"], settings_used["startup_trials"])
        done["seeds"][str(seed)] = dict(trial_metrics(trials, n_prompts), base_refusals=session.base_refusals)
        done["command"] = "python -m bench.reference_search --seeds " + ",".join(sorted(done["seeds"], key=int))
        OUTPUT.write_text(json.dumps(done, indent=2) + "\n")  # after each seed: an interruption loses one seed at most


if __name__ == "__main__":
    main()
