"""The reference's trial time on a CPU profile, measured with its own code, without its hour-long start-up.

The side-by-side benchmark runs the reference's whole command: on a CPU without bf16 instructions its
start-up alone (a batch-size probe that generates full responses at every size, a response-prefix check
on 200 prompts, the directions of 800 prompts) takes hours, in bf16 on the slow path. A trial's time does
not depend on any of that: each one writes the ablation, scores KL on the harmless prompts and generates
every harmful prompt's response to the full length. This script runs exactly that, with the reference's
own classes (its `Model`, `Evaluator`, parameter space and TPE sampler, seed 42, so the first trials are
its benchmark run's start-up trials), in its default dtype, on the benchmark's model, evaluation prompts,
markers and response length, in the reference's own environment (bench/.venv-reference). What it takes
from the start-up instead of measuring it: the batch size (64, the one its full benchmark run chose), no
response prefix (what its check found for this model), and directions from the first 64 training prompts
of each kind instead of 400 (their content changes the trial's scores, not its time).

    python -m bench.reference_trial --cpu-profile no-bf16 --trials 3
    python -m bench.reference_trial --cpu-profile no-bf16 --trials 3 --ours bench/results/<our run>.json

Writes bench/results/reference-trial-<profile>.json and prints each stage's time; with --ours, the
per-trial ratio against our run's median trial (a run of `bench/run_bench.py --tools ours` on the same
profile)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.harness.machine import CPU_PROFILES, cpu_flags, git_commit, machine
from bench.harness.models import prepare_model
from bench.harness.paths import DEFAULT_DATASETS, RESULTS, WORK
from bench.harness.publish import recorded, stamp, update_section
from bench.harness.tools import REFERENCE_MARKERS, REFERENCE_SPACE, ensure_reference_venv, reference_config, tool_env

BATCH_SIZE = 64  # the reference's choice in its full benchmark run on this model
DIRECTION_PROMPTS = 64

# Runs in the reference's environment, in a folder whose config.toml holds the benchmark's settings; prints
# one JSON line per stage and per trial.
TIMER = (
    REFERENCE_SPACE
    + r"""
import json, sys, time
n_trials = int(sys.argv[1])
sys.argv = ["heretic"]  # its Settings parse the command line
import optuna
import torch.nn.functional as F
from optuna.samplers import TPESampler
from heretic.config import Settings
from heretic.evaluator import Evaluator
from heretic.model import AbliterationParameters, Model
from heretic.utils import load_prompts
optuna.logging.set_verbosity(optuna.logging.WARNING)

def report(**entry):
    sys.stdout.write("@@" + json.dumps(entry) + "\n")
    sys.stdout.flush()

settings = Settings()
started = time.perf_counter()
model = Model(settings)
report(stage="load", seconds=time.perf_counter() - started, dtype=str(model.model.dtype))
started = time.perf_counter()
evaluator = Evaluator(settings, model)
report(stage="baseline", seconds=time.perf_counter() - started, refusals=evaluator.base_refusals)
started = time.perf_counter()
good_means = model.get_residuals_mean(load_prompts(settings, settings.good_prompts))
bad_means = model.get_residuals_mean(load_prompts(settings, settings.bad_prompts))
directions = F.normalize(bad_means - good_means, p=2, dim=1)
if settings.orthogonalize_direction:
    good = F.normalize(good_means, p=2, dim=1)
    directions = F.normalize(directions - (directions * good).sum(dim=1, keepdim=True) * good, p=2, dim=1)
report(stage="directions", seconds=time.perf_counter() - started)
last = len(model.get_layers()) - 1
sampler = TPESampler(n_startup_trials=settings.n_startup_trials, n_ei_candidates=128, multivariate=True, seed=settings.seed)
study = optuna.create_study(sampler=sampler, directions=["minimize", "minimize"])
for number in range(n_trials):
    trial = study.ask()
    suggest(trial, last)
    p = trial.params
    parameters = {
        c: AbliterationParameters(
            max_weight=p[c + ".max_weight"],
            max_weight_position=p[c + ".max_weight_position"],
            min_weight=p[c + ".min_weight"] * p[c + ".max_weight"],
            min_weight_distance=p[c + ".min_weight_distance"],
        )
        for c in model.get_abliterable_components()
    }
    started = time.perf_counter()
    model.reset_model()
    model.abliterate(directions, None if p["direction_scope"] == "per layer" else p["direction_index"], parameters)
    score, kl, refusals = evaluator.get_score()
    report(trial=number, seconds=time.perf_counter() - started, kl=kl, refusals=refusals, params=p)
    study.tell(trial, list(score))
"""
)


def config(settings: dict[str, Any], model: Path) -> str:
    """The benchmark's reference configuration, with the start-up's findings given (batch size, no prefix)
    and the directions from DIRECTION_PROMPTS prompts of each kind."""
    text = reference_config(settings, model, REFERENCE_MARKERS)
    text = text.replace("batch_size = 0\n", f'batch_size = {BATCH_SIZE}\nresponse_prefix = ""\n')
    for name in ("harmless_train.txt", "harmful_train.txt"):
        text = text.replace(f'{name}"\nsplit = "[:{settings["train_prompts"]}]"', f'{name}"\nsplit = "[:{DIRECTION_PROMPTS}]"')
    if f"batch_size = {BATCH_SIZE}\n" not in text or text.count(f'split = "[:{DIRECTION_PROMPTS}]"') != 2:
        raise SystemExit("bench/run_bench.py's reference configuration changed its layout; update config() here.")
    return text


def run(profile: str, trials: int) -> dict[str, Any]:
    python = ensure_reference_venv()
    model = prepare_model()
    settings = {
        "trials": trials,
        "startup_trials": 10,
        "train_prompts": 400,
        "eval_prompts": 100,
        "max_response_length": 100,
        "max_batch_size": BATCH_SIZE,
        "seed": 42,
        "datasets": str(DEFAULT_DATASETS.resolve()),
    }
    folder = WORK / f"reference-trial-{profile}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(config(settings, model))
    env = dict(tool_env(), **CPU_PROFILES[profile])
    entries = []
    with subprocess.Popen(
        [str(python), "-c", TIMER, str(trials)], cwd=folder, env=env, stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("@@"):
                entry = json.loads(line[2:])
                entries.append(entry)
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items() if k != "params"}, flush=True)
    if process.returncode != 0:
        raise SystemExit(f"The reference's timer failed (exit {process.returncode}); its output is above.")
    trial_seconds = [entry["seconds"] for entry in entries if "trial" in entry]
    return {
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "commit": git_commit(),
        "cpu_profile": profile,
        "settings": settings | {"batch_size": BATCH_SIZE, "direction_prompts": DIRECTION_PROMPTS},
        "command": "python -m bench.reference_trial " + " ".join(sys.argv[1:]),
        "stages": [entry for entry in entries if "stage" in entry],
        "trials": [entry for entry in entries if "trial" in entry],
        "median_trial_s": round(statistics.median(trial_seconds), 1),
    }


def compare(result: dict[str, Any], ours_file: Path) -> None:
    ours = json.loads(ours_file.read_text())
    (label, tool), *_ = ours["tools"].items()
    ratio = tool["median_trial_s"] / result["median_trial_s"]
    result["ours"] = {
        "file": ours_file.name,
        "label": label,
        "median_trial_s": tool["median_trial_s"],
        "dtype": tool.get("dtype"),
    }
    result["ratio"] = round(ratio, 3)
    print(
        f"median trial: reference {result['median_trial_s']:.1f} s ({len(result['trials'])} trials), "
        f"ours {tool['median_trial_s']:.1f} s ({label}, {tool['n_trials']} trials, {tool.get('dtype')}): {ratio:.3f}x"
    )


# The comparisons in the "machine-profiles" section of BENCHMARKS.md: (results file, what the CPU is).
PUBLISHED = (
    ("reference-trial-no-bf16.json", "AVX-512 with avx512_bf16, bf16 kernels taken away (`--cpu-profile no-bf16`)"),
    ("reference-trial-avx2.json", "AVX2 only, no AVX-512 (native)"),
)


def publish() -> None:
    """The "machine-profiles" section of BENCHMARKS.md: per-trial time of each tool on CPUs without fast bf16, one
    stamp per row (each row was measured on its own machine)."""
    lines = [
        "Per-trial time where the CPU has no fast bf16: the reference's trials timed with its own code in its own "
        "environment (its default bfloat16, batch size 64, its multivariate TPE with seed 42), ours a 10-trial run of "
        "our command at the benchmark's settings with `--judge rules` (our dtype probe chooses float32 there). "
        "Target: our median trial ≤ 0.1× the reference's.",
        "",
        "| CPU | reference median trial | ours | our dtype | ours / reference | target |",
        "|---|---:|---:|---|---:|---|",
    ]
    stamps, metas = [], []
    for name, cpu in PUBLISHED:
        result = json.loads((RESULTS / name).read_text())
        ours = json.loads((RESULTS / result["ours"]["file"]).read_text())["settings"]
        meta = {"date": ours.get("date"), "cpu_flags": result.get("cpu_flags"), "commit": result.get("commit")}
        metas.append(meta)
        compare = (
            f"python -m bench.reference_trial --reuse --output bench/results/{name} --ours bench/results/{result['ours']['file']}"
        )
        stamps.append(f"{cpu}: {stamp(meta, result['command'] + '; ' + ours['command'] + '; ' + compare)}")
        ratio = result["ratio"]
        lines.append(
            f"| {cpu} | {result['median_trial_s']:.1f} s | {result['ours']['median_trial_s']:.1f} s | {result['ours']['dtype']} | "
            f"{ratio:.3f}× | {'met' if ratio <= 0.1 else 'missed'} |"
        )
    lines += ["", *(f"- {line}" for line in stamps)]
    update_section("\n".join(lines), "machine-profiles", recorded(*metas), "python -m bench.reference_trial --table")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-profile", choices=sorted(CPU_PROFILES), default="native")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--ours", type=Path, help="our run's results (bench/results/<time>.json) on the same profile")
    parser.add_argument("--reuse", action="store_true", help="compare the recorded reference timing, run nothing")
    parser.add_argument("--output", type=Path, help="the results file (default: bench/results/reference-trial-PROFILE.json)")
    parser.add_argument("--table", action="store_true", help="run nothing: rewrite the BENCHMARKS.md section from PUBLISHED")
    args = parser.parse_args()
    if args.table:
        publish()
        return
    output = args.output or RESULTS / f"reference-trial-{args.cpu_profile}.json"
    result = json.loads(output.read_text()) if args.reuse else run(args.cpu_profile, args.trials)
    if args.ours:
        compare(result, args.ours)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {output}")


if __name__ == "__main__":
    main()
