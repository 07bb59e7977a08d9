"""Many workers, one search: one worker with 2 threads against two workers with 1 thread each.

Both runs do the same search (the demo preset, the same number of trials, the same seed) on this
machine, one after the other, each in a fresh checkpoint folder:

    one worker   OMP_NUM_THREADS=2 heretic --demo --n-trials N --workers 1
    two workers  heretic --demo --n-trials N --workers 2     (each worker pinned to 1 core)

and records, for each: the wall time of the command, the search's span (first trial started to
last trial finished), trials per hour over that span, the median seconds of one trial, the
start-up before the first trial (load, batch size, directions, the original's refusals: the part
that stays serial), and the Pareto front with its hypervolume. Writes bench/results/scaleout.json
and prints a table.

On paper (no GPU here), for an 8B model on 1, 2, 4 and 8 GPUs, one worker per GPU:

    T(n)        = S + J + ceil(M / n) * t          seconds for M trials on n workers
    trials/h(n) = 3600 * M / T(n)
    serial(n)   = (S + J) / T(n)                   the share that does not shrink with n
    speedup(n)  = T(1) / T(n)

where t is the seconds of one trial, S the serial start-up of the first worker (loading, batch
size, directions, the original's refusals; the other workers read these from the study) and J
the start-up of a joining worker (loading and the KL reference; measured as the time from the
first worker's first trial to the second worker's first; J = 0 for n = 1), counted in full although
the first worker runs trials meanwhile: an upper bound on T(n). t, S and J come from the measured one-worker run, scaled by the models' parameter count
ratio (both are dominated by forward passes through every weight) and divided by `--gpu-factor`,
the assumed throughput of one GPU over this machine's 2 CPU threads for the same work (an
assumption, printed with the table; replace it with a measured ratio when one exists).

    python -m bench.scaleout                        # the demo preset, 12 trials (needs an idle machine)
    python -m bench.scaleout --model PATH --n-trials 4 --quick   # a quick end-to-end check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from bench.harness.machine import cpu_flags, git_commit
from bench.harness.paths import RESULTS
from bench.harness.publish import update_section

DEMO_PARAMETERS = 0.494e9  # Qwen2.5-Coder-0.5B-Instruct
PAPER_PARAMETERS = 8.0e9
PAPER_TRIALS = 200
KL_CAP = 1.0  # hypervolume reference point: (harmful prompts, this KL), as in bench/run_bench.py


def command(args: argparse.Namespace, workers: int, checkpoints: Path) -> list[str]:
    model = ["--model", args.model] if args.model else ["--demo"]
    return [
        sys.executable,
        "-m",
        "heretic",
        *model,
        "--n-trials",
        str(args.n_trials),
        "--workers",
        str(workers),
        "--checkpoint-dir",
        str(checkpoints),
        "--headless",
        "--action",
        "[]",
        "--resume",
        "restart",
        *args.extra,
    ]


def read_study(checkpoints: Path) -> dict[str, Any]:
    """Trials (number, refusals, KL, seconds, start, end, worker) and the baseline of the one study in the folder."""
    import optuna
    from optuna.trial import TrialState

    from heretic.search import checkpoint

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    (journal,) = [path for path in checkpoints.glob("*.jsonl") if ".old" not in path.name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.load_study(study_name=checkpoint.STUDY_NAME, storage=checkpoint.open_storage(journal))
    trials = [
        {
            "number": t.number,
            "refusals": int(t.user_attrs["refusals"]),
            "kl": float(t.user_attrs["kl"]),
            "seconds": float(t.user_attrs["seconds"]),
            "start": t.datetime_start.timestamp(),
            "end": t.datetime_complete.timestamp(),
            "worker": t.user_attrs.get("worker", ""),
        }
        for t in study.get_trials(states=(TrialState.COMPLETE,))
    ]
    return {"trials": trials, "n_prompts": len(study.user_attrs.get("baseline_verdicts", [])), "created": journal.stat().st_ctime}


def measure(args: argparse.Namespace, workers: int, threads: int, work: Path) -> dict[str, Any]:
    """Run one configuration; its timings and front."""
    from heretic.search.pareto import hypervolume  # the same measure as bench/run_bench.py

    checkpoints = work / f"workers-{workers}"
    shutil.rmtree(checkpoints, ignore_errors=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if workers == 1:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.time()
    result = subprocess.run(command(args, workers, checkpoints), cwd=work, env=env, capture_output=True, text=True)
    wall = time.time() - started
    if result.returncode != 0:
        raise SystemExit(f"heretic failed ({workers} workers):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    study = read_study(checkpoints)
    trials = study["trials"]
    first, last = min(t["start"] for t in trials), max(t["end"] for t in trials)
    span = last - first
    starts: dict[str, float] = {}
    for trial in trials:  # each worker's first trial: the later ones started after their own start-up
        starts[trial["worker"]] = min(starts.get(trial["worker"], trial["start"]), trial["start"])
    n_prompts = study["n_prompts"] or max(t["refusals"] for t in trials)
    points = [(t["refusals"], t["kl"]) for t in trials]
    front = sorted({p for p in points if not any(q != p and q[0] <= p[0] and q[1] <= p[1] for q in points)})
    return {
        "workers": workers,
        "threads_per_worker": threads,
        "trials": len(trials),
        "wall_seconds": round(wall, 1),
        "search_seconds": round(span, 1),
        "startup_seconds": round(first - started, 1),
        "trials_per_hour": round(3600 * len(trials) / span, 1) if span > 0 else None,
        "median_trial_seconds": round(sorted(t["seconds"] for t in trials)[len(trials) // 2], 2),
        "trials_by_worker": _by_worker(trials),
        "join_seconds": round(max(starts.values()) - min(starts.values()), 1),
        "front": [{"refusals": r, "kl": round(k, 5)} for r, k in front],
        "hypervolume": round(hypervolume(points, (n_prompts, KL_CAP)), 4),
    }


def _by_worker(trials: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial["worker"] or "single"] = counts.get(trial["worker"] or "single", 0) + 1
    return counts


def paper(one: dict[str, Any], two: dict[str, Any], gpu_factor: float, model_parameters: float) -> list[dict[str, Any]]:
    """The projection of the module docstring: T(n) = S + J + ceil(M / n) * t, for n = 1, 2, 4, 8."""
    scale = PAPER_PARAMETERS / model_parameters / gpu_factor
    t = one["median_trial_seconds"] * scale
    s = one["startup_seconds"] * scale
    # A joining worker's start-up: from the first worker's first trial to the second worker's first trial.
    j = two["join_seconds"] * scale
    rows = []
    total_one = s + PAPER_TRIALS * t
    for n in (1, 2, 4, 8):
        total = s + (j if n > 1 else 0.0) + math.ceil(PAPER_TRIALS / n) * t
        rows.append(
            {
                "gpus": n,
                "trial_seconds": round(t, 1),
                "hours_to_200": round(total / 3600, 2),
                "trials_per_hour": round(3600 * PAPER_TRIALS / total, 1),
                "serial_share": round((s + (j if n > 1 else 0.0)) / total, 3),
                "speedup": round(total_one / total, 2),
            }
        )
    return rows


def table(runs: list[dict[str, Any]], projection: list[dict[str, Any]], gpu_factor: float) -> str:
    lines = [
        "| Workers x threads | Trials | Wall (s) | Start-up (s) | Search (s) | Trials/hour | Median trial (s) | Front (refusals, KL) | Hypervolume |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        front = ", ".join(f"({p['refusals']}, {p['kl']:.3f})" for p in run["front"])
        lines.append(
            f"| {run['workers']} x {run['threads_per_worker']} | {run['trials']} | {run['wall_seconds']} | {run['startup_seconds']} | "
            f"{run['search_seconds']} | {run['trials_per_hour']} | {run['median_trial_seconds']} | {front} | {run['hypervolume']} |"
        )
    ratio = runs[1]["search_seconds"] / runs[0]["search_seconds"] if runs[0]["search_seconds"] else float("nan")
    lines.append("")
    speedups = ", ".join(f"{r['speedup']}x on {r['gpus']}" for r in projection if r["gpus"] > 1)
    shares = [r["serial_share"] for r in projection]
    lines.append(
        f"Two workers / one worker, search time: {ratio:.2f}x. On paper (8B model, {PAPER_TRIALS} trials, one GPU = {gpu_factor:g}x this machine's 2 threads, assumed): "
        f"{projection[0]['hours_to_200']} h on one GPU; speed-up {speedups} GPUs (serial share "
        f"{min(shares):.1%}–{max(shares):.1%}; per GPU count in bench/results/scaleout.json; the projection: "
        "[research note](docs/research/2026-12-02-many-workers.md))."
    )
    return "\n".join(lines)


def publish(record: dict[str, Any]) -> None:
    """The "scaleout" section of BENCHMARKS.md: both configurations, the ratio of their searches and the projection."""
    runs, projection = record["runs"], record["paper"]["rows"]
    section = (
        f"{record['model']}, demo preset, {runs[0]['trials']} trials, seed 42, {record['machine']['cpus']} CPU cores: one "
        "worker with both threads against two workers with one thread each (the same cores, so about 1.0× is the best "
        "they allow). Then on paper for an 8B model on 1–8 GPUs, one worker each, from the measured trial, start-up and "
        f"join times scaled by parameters and an assumed GPU factor of {record['paper']['gpu_factor']:g} (the speed-ups "
        "and serial shares do not depend on it, the hours do).\n\n" + table(runs, projection, record["paper"]["gpu_factor"])
    )
    update_section(section, "scaleout", {**record, "cpu_flags": record.get("cpu_flags")}, record["command"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model instead of the demo model (with the demo's other settings)")
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--gpu-factor", type=float, default=50.0, help="assumed GPU / 2-thread CPU throughput ratio")
    parser.add_argument("--model-parameters", type=float, default=DEMO_PARAMETERS, help="parameters of the measured model")
    parser.add_argument("--quick", action="store_true", help="label the result a quick check (not the benchmark)")
    parser.add_argument("--output", type=Path, default=RESULTS / "scaleout.json")
    parser.add_argument("--table", action="store_true", help="measure nothing: rewrite the BENCHMARKS.md section from --output")
    parser.add_argument("extra", nargs="*", help="more heretic flags (after --)")
    args = parser.parse_args()
    if args.table:
        publish(json.loads(args.output.read_text()))
        return
    work = Path(tempfile.mkdtemp(prefix="heretic-scaleout-"))
    try:
        runs = [measure(args, 1, 2, work), measure(args, 2, 1, work)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    projection = paper(runs[0], runs[1], args.gpu_factor, args.model_parameters)
    record = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "model": args.model or "demo (Qwen2.5-Coder-0.5B-Instruct Q4_K_M)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "cpu_flags": cpu_flags(),
        "commit": git_commit(),
        "command": " ".join(["python", "-m", "bench.scaleout", *sys.argv[1:]]),
        "runs": runs,
        "search_time_ratio": round(runs[1]["search_seconds"] / runs[0]["search_seconds"], 3),
        "paper": {
            "gpu_factor": args.gpu_factor,
            "model_parameters": PAPER_PARAMETERS,
            "trials": PAPER_TRIALS,
            "rows": projection,
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(table(runs, projection, args.gpu_factor))
    print(f"\nWritten to {args.output}")
    if not args.quick:
        publish(record)


if __name__ == "__main__":
    main()
