"""Side-by-side benchmark: Heretic against the reference tool heretic-llm 1.4.0, on the same work.

Both tools run one after the other on this machine, on the demo model (Qwen2.5-Coder-0.5B-Instruct,
dequantized to a bf16 safetensors folder both can load), with the same prompts, response length,
batch-size policy (automatic), number of trials, start-up trials, seed and refusal markers.
The reference is installed by this script into its own virtual environment (bench/.venv-reference).
It has no headless trial choice, so it runs with standard input closed and its trials are read
from its Optuna checkpoint journal; ours are read from ours.

    python -m bench.run_bench                    # the full benchmark (hours: the reference is slow)
    python -m bench.run_bench --reuse-reference --noise-seeds 43,44,45   # ours again, plus three more seeds
    python -m bench.run_bench --add-noise-seeds 45   # one more seed of ours in the latest run's noise table
    python -m bench.run_bench --trials 4 --eval-prompts 20 --train-prompts 64   # a quick check
    python -m bench.run_bench --tools ours --trials 1000 --label L "--ours-args=--judge rules --search-minutes 140"
    python -m bench.run_bench --tools ours --trials 1000 --label L --resume-ours "--ours-args=--judge rules --search-minutes 120"
                                                 # a run longer than one sitting, continued in the next
                                                 # (each trial's one-sitting wall time is recorded: python -m bench.seed_fronts --timed)

Our runs live in bench/runs/LABEL (command, logs, checkpoint journal: small, and not ignored by git), so that an
unfinished run goes with the checkout to another clone or machine and continues there with --resume-ours.

Writes bench/results/latest.json, bench/results/<stamp>.json, bench/results/fronts.png and the
table in BENCHMARKS.md, with each performance target checked (a front metric that falls short by
less than the run-to-run noise counts as within noise: our seeds' spread combined with the
reference's where bench.reference_search has measured it). Quick runs are labelled as such
everywhere and keep the full run's files: they write only <stamp>.json, fronts-quick.png and their
own section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    CPU_PROFILES,
    DEFAULT_DATASETS,
    MODELS,
    RESULTS,
    WORK,
    machine,
    prepare_model,
    run_record,
)
from bench.harness.metrics import first_trials, noise
from bench.harness.side_by_side import every_cap_table, publish, table
from bench.harness.tools import (
    REFERENCE_MARKERS,
    ensure_reference_venv,
    log,
    reference_default_markers,
    run_ours,
    run_reference,
    tool_env,
)


def seed_runs(
    settings: dict[str, Any],
    model: Path,
    markers: list[str],
    env: dict[str, str],
    extra: list[str],
    seeds: list[int],
    n_trials: int,
) -> dict[str, dict[str, Any]]:
    """Our search again with each seed, compared at its first n_trials trials."""
    runs = {}
    for seed in seeds:
        data = run_ours(dict(settings, seed=seed), model, markers, env, extra, f"ours-seed{seed}")
        runs[str(seed)] = first_trials(data, n_trials, settings["eval_prompts"])
    return runs


def write_results(results: dict[str, Any], latest: bool) -> None:
    """bench/results/<stamp>.json and, for a complete side-by-side run, latest.json."""
    text = json.dumps(results, indent=2, default=str)
    (RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(text)
    if latest:
        (RESULTS / "latest.json").write_text(text)


def add_noise_seeds(seeds: list[int]) -> None:
    """Our search with more seeds, added to the noise of the latest full run (same settings, same model)."""
    results = json.loads((RESULTS / "latest.json").read_text())
    settings = dict(results["settings"], timeout_s=12 * 3600)
    if "noise" not in results:
        raise SystemExit("bench/results/latest.json has no noise table; run with --noise-seeds first.")
    if "--ours-args" in results["settings"].get("command", ""):
        raise SystemExit("The latest run passed --ours-args; run it again with --noise-seeds instead.")
    runs = dict(results["noise"]["seeds"])
    model = prepare_model()
    markers = reference_default_markers(ensure_reference_venv())
    env = dict(tool_env(), **CPU_PROFILES[settings.get("cpu_profile", "native")])
    n_trials = results["tools"].get("ours_same_trials", results["tools"]["ours"])["n_trials"]
    runs.update(seed_runs(settings, model, markers, env, [], seeds, n_trials))
    results["noise"] = noise(runs)
    added = ",".join(str(seed) for seed in seeds)
    results["settings"]["command"] += f"; python -m bench.run_bench --add-noise-seeds {added}"
    write_results(results, latest=True)
    publish(results)


def attach_flag_values(argv: list[str], options: tuple[str, ...] = ("--ours-args",)) -> list[str]:
    """`--ours-args --flag` as `--ours-args=--flag`: argparse takes a lone value that starts with a dash
    for an option of its own."""
    joined: list[str] = []
    values = iter(argv)
    for arg in values:
        value = next(values, None) if arg in options else None
        joined.append(arg if value is None else f"{arg}={value}")
    return joined


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="demo", help="the benchmark model (default: demo)")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--startup-trials", type=int, default=10)
    parser.add_argument("--train-prompts", type=int, default=400)
    parser.add_argument("--eval-prompts", type=int, default=100)
    parser.add_argument("--max-response-length", type=int, default=100)
    parser.add_argument("--max-batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS)
    parser.add_argument("--tools", default="reference,ours", help="comma-separated: reference, ours")
    parser.add_argument(
        "--reuse-reference", action="store_true", help="reuse the reference's results of an earlier run with identical settings"
    )
    parser.add_argument(
        "--resume-reference",
        action="store_true",
        help="continue the reference's unfinished study in bench/work/reference "
        "(a run that did not fit in one sitting) instead of starting it anew",
    )
    parser.add_argument(
        "--resume-ours",
        action="store_true",
        help="continue our unfinished study in bench/runs/LABEL (started with the same options, e.g. a run with "
        "--search-minutes that did not fit in one sitting) instead of starting it anew",
    )
    parser.add_argument("--ours-args", default="", help="extra flags for our tool (e.g. to switch a speed-up off)")
    parser.add_argument("--label", default="ours", help="name of our run in the results (for lever measurements)")
    parser.add_argument("--timeout-hours", type=float, default=12.0)
    parser.add_argument(
        "--cpu-profile",
        choices=sorted(CPU_PROFILES),
        default="native",
        help="no-bf16: both tools run with bf16 kernels taken away (a CPU without bf16 instructions)",
    )
    parser.add_argument(
        "--noise-seeds",
        default="",
        help="comma-separated extra seeds: our search runs again with each, "
        "and the spread of the results is the run-to-run noise the comparison allows",
    )
    parser.add_argument(
        "--add-noise-seeds",
        default="",
        help="comma-separated seeds: run only our search with each and add them "
        "to the noise table of bench/results/latest.json (nothing else is rerun)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rewrite the side-by-side section of BENCHMARKS.md from bench/results/latest.json",
    )
    return parser.parse_args(attach_flag_values(sys.argv[1:]))


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as recorded (and, less the machine, date and command, the key of the reference's cache)."""
    deviations = [
        f"{name} {value} instead of {full}"
        for name, value, full in (
            ("trials", args.trials, 30),
            ("training prompts", args.train_prompts, 400),
            ("evaluation prompts", args.eval_prompts, 100),
            ("max_response_length", args.max_response_length, 100),
        )
        if value != full and not (name == "trials" and value > full)
    ]
    quick = bool(deviations)
    settings = {
        "trials": args.trials,
        "startup_trials": args.startup_trials,
        "train_prompts": args.train_prompts,
        "eval_prompts": args.eval_prompts,
        "max_response_length": args.max_response_length,
        "max_batch_size": args.max_batch_size,
        "seed": args.seed,
        "datasets": str(args.datasets.resolve()),
        "quick": quick,
        "deviations": ", ".join(deviations),
        "machine": machine(),
        "timeout_s": args.timeout_hours * 3600,
        **run_record(),  # date, cpu_flags, commit
    }
    if args.cpu_profile != "native":  # the reference's cached results are keyed by it; native runs keep their old key
        settings["cpu_profile"] = args.cpu_profile
    if args.model != "demo":  # likewise: runs of the demo model keep their old key
        settings["model"] = args.model
    settings["command"] = ("python -m bench.run_bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])).strip()
    return settings


def run_tools(
    args: argparse.Namespace, settings: dict[str, Any], model: Path, python: Path | None, markers: list[str], env: dict[str, str]
) -> dict[str, Any]:
    """Each wanted tool's run (the reference's reused from its cache with --reuse-reference)."""
    key_settings = {
        k: v
        for k, v in settings.items()
        if k not in {"machine", "date", "timeout_s", "quick", "deviations", "command", "cpu_flags", "commit"}
    }
    reference_cache = (
        RESULTS / f"reference-{hashlib.sha256(json.dumps(key_settings, sort_keys=True).encode()).hexdigest()[:12]}.json"
    )
    tools: dict[str, Any] = {}
    if python is not None:
        if args.reuse_reference and reference_cache.exists():
            tools["reference"] = json.loads(reference_cache.read_text())
            settings["reference_reused"] = reference_cache.name
            log(f"reusing the reference's results from {reference_cache}")
        else:
            tools["reference"] = run_reference(settings, model, python, markers, env, resume=args.resume_reference)
            reference_cache.write_text(json.dumps(tools["reference"], indent=2))
    if "ours" in [name.strip() for name in args.tools.split(",")]:
        extra = shlex.split(args.ours_args)
        tools[args.label] = run_ours(settings, model, markers, env, extra, args.label, resume=args.resume_ours)
        reference_trials = tools.get("reference", {}).get("n_trials")
        if args.label == "ours" and reference_trials and reference_trials < tools["ours"]["n_trials"]:
            log(f"the reference finished only {reference_trials} trials; comparing with our first {reference_trials} as well")
            tools["ours_same_trials"] = first_trials(tools["ours"], reference_trials, args.eval_prompts)
    return tools


def main() -> None:
    args = parse_args()

    if args.report_only:
        results = json.loads((RESULTS / "latest.json").read_text())
        publish(results, plot_fronts=False)
        print(table(results))
        print(every_cap_table(results))
        return
    if args.add_noise_seeds:
        add_noise_seeds([int(seed) for seed in args.add_noise_seeds.split(",") if seed.strip()])
        return

    settings = run_settings(args)
    if settings["quick"]:
        log(f"REDUCED RUN ({settings['deviations']}): results are labelled as such")
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    model = prepare_model(args.model)
    wanted = [name.strip() for name in args.tools.split(",") if name.strip()]
    python = ensure_reference_venv() if "reference" in wanted else None
    # without the reference, the same 33 markers: no reference install needed for our runs alone
    markers = reference_default_markers(python) if python is not None else REFERENCE_MARKERS
    settings["n_markers"] = len(markers)
    env = dict(tool_env(), **CPU_PROFILES[args.cpu_profile])

    tools = run_tools(args, settings, model, python, markers, env)

    results: dict[str, Any] = {"settings": {k: v for k, v in settings.items() if k != "timeout_s"}, "tools": tools}
    seeds = [int(seed) for seed in args.noise_seeds.split(",") if seed.strip()]
    if seeds and args.label == "ours" and "ours" in tools:
        # compared at the number of trials the targets use: the reference's, where it stopped early
        compared = tools.get("ours_same_trials", tools["ours"])
        runs = {str(settings["seed"]): compared}
        runs.update(seed_runs(settings, model, markers, env, shlex.split(args.ours_args), seeds, compared["n_trials"]))
        results["noise"] = noise(runs)
    complete = args.label == "ours" and {"reference", "ours"} <= set(tools)
    write_results(results, latest=complete and not settings["quick"])  # latest.json stays the full run's
    if complete:
        publish(results)
    print(table(results))


if __name__ == "__main__":
    main()
