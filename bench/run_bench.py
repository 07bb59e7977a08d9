"""Side-by-side benchmark: Heretic against the reference tool heretic-llm 1.4.0, on the same work.

Both tools run one after the other on this machine, on the demo model (Qwen2.5-Coder-0.5B-Instruct,
dequantized to a bf16 safetensors folder both can load), with the same prompts, response length,
batch-size policy (automatic), number of trials, start-up trials, seed and refusal markers.
The reference is installed by this script into its own virtual environment (bench/.venv-reference).
It has no headless trial choice, so it runs with standard input closed and its trials are read
from its Optuna checkpoint journal; ours are read from ours.

    python bench/run_bench.py                    # the full benchmark (hours: the reference is slow)
    python bench/run_bench.py --reuse-reference --noise-seeds 43,44,45   # ours again, plus three more seeds
    python bench/run_bench.py --add-noise-seeds 45   # one more seed of ours in the latest run's noise table
    python bench/run_bench.py --trials 4 --eval-prompts 20 --train-prompts 64   # a quick check
    python bench/run_bench.py --tools ours --trials 1000 --label L "--ours-args=--judge rules --search-minutes 140"
    python bench/run_bench.py --tools ours --trials 1000 --label L --resume-ours "--ours-args=--judge rules --search-minutes 120"
                                                 # a run longer than one sitting, continued in the next
                                                 # (each trial's one-sitting wall time is recorded: bench/seed_fronts.py --timed)

Writes bench/results/latest.json, bench/results/<stamp>.json, bench/results/fronts.png and the
table in BENCHMARKS.md, with each performance target checked (a front metric that falls short by
less than the run-to-run noise counts as within noise: our seeds' spread combined with the
reference's where bench/reference_search.py has measured it). Quick runs are labelled as such
everywhere and keep the full run's files: they write only <stamp>.json, fronts-quick.png and their
own section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heretic.search.pareto import hypervolume  # the same measure both tools are judged by

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from heretic.ablation.parameters import AblationParameters
    from heretic.session import Session

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
WORK = BENCH / "work"
REFERENCE_VENV = BENCH / ".venv-reference"
REFERENCE_PACKAGE = "heretic-llm==1.4.0"
TORCH = "torch==2.13.0"
DEFAULT_DATASETS = ROOT.parent / "shared" / "datasets"
KL_CAP = 1.0  # hypervolume reference point: (number of harmful prompts, this KL)
REFUSAL_CAPS = (0, 2, 5, 10, 15, 20, 30)

# Reads an Optuna journal and prints its trials as JSON; run with each tool's own Python so that
# each journal is read by the Optuna version that wrote it.
READ_JOURNAL = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import optuna
from optuna.storages import JournalStorage
try:
    from optuna.storages.journal import JournalFileBackend
except ImportError:
    from optuna.storages import JournalFileStorage as JournalFileBackend
storage = JournalStorage(JournalFileBackend(sys.argv[1]))
study = optuna.load_study(study_name="heretic", storage=storage)
trials = []
for t in study.get_trials(deepcopy=False):
    trials.append({
        "number": t.number, "state": t.state.name, "params": t.params,
        "start": t.datetime_start.timestamp() if t.datetime_start else None,
        "complete": t.datetime_complete.timestamp() if t.datetime_complete else None,
        "user_attrs": t.user_attrs,
    })
print(json.dumps({"trials": trials, "study_attrs": study.user_attrs}, default=str))
"""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- Set-up ------------------------------------------------------------------------------------


def ensure_reference_venv() -> Path:
    python = REFERENCE_VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import heretic.main"], capture_output=True).returncode == 0:
        return python
    log(f"installing {REFERENCE_PACKAGE} into {REFERENCE_VENV}")
    subprocess.run([sys.executable, "-m", "venv", str(REFERENCE_VENV)], check=True)
    pip = [str(python), "-m", "pip", "--quiet", "--disable-pip-version-check", "install"]
    subprocess.run(pip + [TORCH], check=True)  # first, so that pip keeps this build
    subprocess.run(pip + [REFERENCE_PACKAGE], check=True)
    return python


# The benchmark's models: the demo model, and a second refusing model three times its size.
MODELS = {"demo": "Qwen2.5-Coder-0.5B-Instruct", "1.5b": "Qwen2.5-Coder-1.5B-Instruct"}


def prepare_model(model: str = "demo") -> Path:
    """A benchmark model (MODELS) as a bf16 safetensors folder (assembled, hash-verified, dequantized once).

    Our GGUF cache holds float32 weights; both tools get this folder, cast to bf16 tensor by tensor,
    with `config.json` saying so (the reference loads a model in the dtype its config names)."""
    import torch
    from safetensors.torch import load_file, save_file

    from heretic.model.loading import dequantize_gguf_to_cache, resolve_source

    target = WORK / MODELS[model]
    if (target / "config.json").is_file():
        return target
    gguf = model_gguf(model)
    folder, _ = dequantize_gguf_to_cache(resolve_source(str(gguf)), Path("~/.cache/heretic"))
    staging = WORK / f".{MODELS[model]}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(folder, staging, ignore=shutil.ignore_patterns("heretic-source.json", "*.safetensors"))
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = {name: tensor.to(torch.bfloat16) for name, tensor in load_file(shard).items()}
        save_file(tensors, staging / shard.name, metadata={"format": "pt"})
    config = json.loads((staging / "config.json").read_text())
    config.update({key: "bfloat16" for key in ("torch_dtype", "dtype") if key in config} or {"torch_dtype": "bfloat16"})
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    os.replace(staging, target)
    return target


def model_gguf(model: str) -> Path:
    """The GGUF file of a benchmark model: the demo's from its PyPI packages, the 1.5B one from its 22 chunks."""
    if model == "demo":
        from heretic.demo import demo_model_file

        return demo_model_file("~/.cache/heretic")
    from gguf_memory import assemble_big_model

    return assemble_big_model(Path("~/.cache/heretic").expanduser() / "bench")


def reference_default_markers(python: Path) -> list[str]:
    code = "import json; from heretic.config import Settings; print(json.dumps(Settings.model_fields['refusal_markers'].default))"
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


# --- Running a tool ------------------------------------------------------------------------------


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_tool(name: str, command: list[str], cwd: Path, env: dict[str, str], timeout: float, record: Path) -> dict[str, Any]:
    """Run a command with stdin closed, logging its output with time stamps. Its record (start time,
    peak RSS, exit code, log) is appended to `record` as soon as it starts and kept up to date while
    it runs, so a run that is killed (or outlived by this script) still counts."""
    cwd.mkdir(parents=True, exist_ok=True)
    runs = json.loads(record.read_text()) if record.exists() else []
    log_path = cwd / ("output.log" if not runs else f"output-{len(runs) + 1}.log")
    log(f"{name}: {shlex.join(command)}  (in {cwd})")
    started = time.time()
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    run: dict[str, Any] = {"started": started, "elapsed_s": 0.0, "exit_code": None, "peak_rss_mb": None, "log": log_path.name}
    runs.append(run)

    def save() -> None:
        record.write_text(json.dumps(runs, indent=2))

    def pump() -> None:
        assert process.stdout is not None
        with log_path.open("w") as handle:
            for line in process.stdout:
                stamped = f"{time.time() - started:9.1f}s  {line}"
                handle.write(stamped)
                handle.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = started + timeout
    status, usage, saved = 0, None, 0.0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.time() > deadline:
            process.kill()
            _, status, usage = os.wait4(process.pid, 0)
            log(f"{name}: killed after {timeout:.0f} s")
            break
        if time.time() - saved > 10:
            run.update(elapsed_s=round(time.time() - started, 1), peak_rss_mb=peak_rss_mb(process.pid) or run["peak_rss_mb"])
            save()
            saved = time.time()
        time.sleep(0.5)
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    elapsed = time.time() - started
    log(f"{name}: exit {process.returncode} after {elapsed / 60:.1f} min; log in {log_path}")
    run.update(
        elapsed_s=round(elapsed, 1),
        exit_code=process.returncode,
        peak_rss_mb=max(filter(None, [usage.ru_maxrss / 1024 if usage else None, run["peak_rss_mb"]]), default=None),
    )
    save()
    return run


def read_journal(python: Path, journal: Path) -> dict[str, Any]:
    result = subprocess.run([str(python), "-c", READ_JOURNAL, str(journal)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"cannot read {journal}: {result.stderr[-2000:]}")
    return json.loads(result.stdout)


# --- Metrics -------------------------------------------------------------------------------------


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


# --- The two tools -------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    return json.dumps(value)


def reference_config(settings: dict[str, Any], model: Path, markers: list[str]) -> str:
    datasets = Path(settings["datasets"])

    def spec(name: str, file: str, count: int) -> str:
        return f'[{name}]\ndataset = {toml_value(str(datasets / file))}\nsplit = "[:{count}]"\n'

    lines = [
        f"model = {toml_value(str(model))}",
        'dtypes = ["bfloat16"]',
        'device_map = "auto"',
        "batch_size = 0",
        f"max_batch_size = {settings['max_batch_size']}",
        f"max_response_length = {settings['max_response_length']}",
        f"n_trials = {settings['trials']}",
        f"n_startup_trials = {settings['startup_trials']}",
        f"seed = {settings['seed']}",
        'study_checkpoint_dir = "checkpoints"',
        f"refusal_markers = {json.dumps(markers, ensure_ascii=False)}",
        "",
        spec("good_prompts", "harmless_train.txt", settings["train_prompts"]),
        spec("bad_prompts", "harmful_train.txt", settings["train_prompts"]),
        spec("good_evaluation_prompts", "harmless_test.txt", settings["eval_prompts"]),
        spec("bad_evaluation_prompts", "harmful_test.txt", settings["eval_prompts"]),
    ]
    return "\n".join(lines) + "\n"


def stored_trial_parameters(session: Session, params: dict[str, Any]) -> AblationParameters:
    """A stored trial of our search (its sampled values), turned into an ablation the way the search did:
    in the search space of `session`'s settings (give the searched run's own options)."""
    import optuna

    from heretic.search.space import LayerRanges, suggest_parameters

    arch, settings = session.arch, session.settings
    fixed = optuna.trial.FixedTrial(params)
    return suggest_parameters(fixed, arch.num_layers, arch.components, LayerRanges.of_settings(settings))


def score_with_subspace(session: Session, params: dict[str, Any], subspace: torch.Tensor) -> dict[str, Any]:
    """Refusals, KL and the refused prompts' indices of a stored trial of our search, ablating `subspace`
    (positions, k, hidden) with its kernels; the session's adapters must have rank k (--subspace-rank)."""
    evaluator = session.evaluator
    session.ablator.subspace = subspace
    session.ablator.apply(stored_trial_parameters(session, params), session.directions)
    kl = evaluator.kl()
    count = evaluator.count_refusals()
    session.ablator.reset()
    assert count.verdicts is not None
    return {"refusals": count.refusals, "kl": kl, "refused": [i for i, refused in enumerate(count.verdicts) if refused]}


def our_command(settings: dict[str, Any], model: Path, markers: list[str], extra: list[str]) -> list[str]:
    datasets = Path(settings["datasets"])
    return [
        str(Path(sys.executable).parent / "heretic"),
        str(model),
        "--batch-size",
        "0",
        "--max-batch-size",
        str(settings["max_batch_size"]),
        "--max-response-length",
        str(settings["max_response_length"]),
        "--n-trials",
        str(settings["trials"]),
        "--n-startup-trials",
        str(settings["startup_trials"]),
        "--seed",
        str(settings["seed"]),
        "--checkpoint-dir",
        "checkpoints",
        "--refusal-markers",
        json.dumps(markers, ensure_ascii=False),
        "--harmless-prompts",
        f"{datasets / 'harmless_train.txt'}[:{settings['train_prompts']}]",
        "--harmful-prompts",
        f"{datasets / 'harmful_train.txt'}[:{settings['train_prompts']}]",
        "--harmless-eval-prompts",
        f"{datasets / 'harmless_test.txt'}[:{settings['eval_prompts']}]",
        "--harmful-eval-prompts",
        f"{datasets / 'harmful_test.txt'}[:{settings['eval_prompts']}]",
        "--headless",
        *extra,
    ]


# The reference asks on start-up whether to continue an interrupted study; this answers "continue"
# (its own resume: it reloads the model, recomputes directions and baseline, and runs the remaining
# trials with the batch size and response prefix stored in the study) and leaves every other question
# to it. It counts every trial in the journal as done, including the one the interruption cut off,
# so that one is added back to n_trials: the study still ends with n_trials completed trials.
CONTINUE_REFERENCE = r"""
import glob, sys
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
import heretic.main as main
(journal,) = glob.glob("checkpoints/*.jsonl")
study = optuna.load_study(study_name="heretic", storage=JournalStorage(JournalFileBackend(journal)))
unfinished = sum(t.state != TrialState.COMPLETE for t in study.trials)
settings_from_json = main.Settings.model_validate_json
def stored_settings(data, *args, **kwargs):
    settings = settings_from_json(data, *args, **kwargs)
    settings.n_trials += unfinished
    return settings
main.Settings.model_validate_json = stored_settings
ask = main.prompt_select
main.prompt_select = lambda message, choices: "continue" if message.startswith("How would you like to proceed") else ask(message, choices)
sys.argv = ["heretic"]
sys.exit(main.main())
"""


def run_reference(
    settings: dict[str, Any], model: Path, python: Path, markers: list[str], env: dict[str, str], resume: bool = False
) -> dict[str, Any]:
    """Run the reference in bench/work/reference; with `resume`, continue the study an earlier invocation
    left unfinished (for runs longer than one sitting)."""
    folder = WORK / "reference"
    config = reference_config(settings, model, markers)
    if resume:
        check_resumable(folder, "--resume-reference", lambda: (folder / "config.toml").read_text() == config)
        command = [str(python), "-c", CONTINUE_REFERENCE]
    else:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "config.toml").write_text(config)
        command = [str(REFERENCE_VENV / "bin" / "heretic")]
    run_tool("reference", command, folder, env, settings["timeout_s"], folder / "runs.json")
    runs = json.loads((folder / "runs.json").read_text())
    (journal,) = (folder / "checkpoints").glob("*.jsonl")
    data = metrics(runs, read_journal(python, journal), settings["eval_prompts"], "reference")
    data["config"] = config
    return data


def run_ours(
    settings: dict[str, Any],
    model: Path,
    markers: list[str],
    env: dict[str, str],
    extra: list[str],
    label: str = "ours",
    resume: bool = False,
) -> dict[str, Any]:
    """Run our tool in bench/work/LABEL; with `resume`, continue the study an earlier invocation with
    the same command left there (a run longer than one sitting, e.g. the equal-time run)."""
    folder = WORK / label
    command = our_command(settings, model, markers, extra)
    if resume:

        def same() -> bool:
            return without_budget(json.loads((folder / "command.json").read_text())) == without_budget(command)

        check_resumable(folder, "--resume-ours", same)
        invoked = [*command, "--resume", "continue"]
    else:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "command.json").write_text(json.dumps(command))
        invoked = command
    run_tool(label, invoked, folder, env, settings["timeout_s"], folder / "runs.json")
    runs = json.loads((folder / "runs.json").read_text())
    (journal,) = (folder / "checkpoints").glob("*.jsonl")
    data = metrics(runs, read_journal(Path(sys.executable), journal), settings["eval_prompts"], "ours")
    data["command"] = shlex.join(command)
    data["dtype"] = chosen_dtype(folder / runs[-1]["log"])
    return data


def check_resumable(folder: Path, flag: str, same_settings: Callable[[], bool]) -> None:
    """Exit with one sentence unless `folder` holds a started run (a journal and its invocations) whose
    settings `same_settings()` finds equal to this invocation's."""
    if not list((folder / "checkpoints").glob("*.jsonl")) or not (folder / "runs.json").exists():
        sys.exit(f"Nothing to resume in {folder}: run without {flag} first.")
    if not same_settings():
        sys.exit(f"The run in {folder} used other settings; resume it with the same options.")


def without_budget(command: list[str]) -> list[str]:
    """The command less its --search-minutes (each sitting of a long run has a budget of its own)."""
    kept: list[str] = []
    for arg in command:
        if kept and kept[-1] == "--search-minutes":
            kept.pop()
        elif not arg.startswith("--search-minutes="):
            kept.append(arg)
    return kept


def chosen_dtype(log_path: Path) -> str | None:
    """The compute dtype our tool chose, from its start-up line ("Compute dtype bfloat16 (...")."""
    for line in log_path.read_text(errors="replace").splitlines():
        if "Compute dtype " in line:
            return line.split("Compute dtype ", 1)[1].split()[0]
    return None


# --- Reporting -----------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.release()}"


# Instruction-set flags that decide which dtype is fast on a CPU.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_int8")
# A CPU without bf16 instructions, emulated on one that has them: oneDNN, MKL and PyTorch's own
# kernels are each limited to AVX2 (bf16 then runs on conversion paths, as on such a CPU).
CPU_PROFILES: dict[str, dict[str, str]] = {
    "native": {},
    "no-bf16": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in SPEED_FLAGS if flag in present]
    except OSError:
        pass
    return []


COLUMN_TITLES = {"reference": "reference", "ours": "ours", "ours_same_trials": "ours, first {n} trials"}


def table(results: dict[str, Any]) -> str:
    """Markdown table; the ratio column compares ours (over the same number of trials) with the reference."""
    tools = results["tools"]
    names = [name for name in ("reference", "ours_same_trials", "ours") if name in tools]
    compared = ("reference", "ours_same_trials" if "ours_same_trials" in tools else "ours")
    with_ratio = all(name in tools for name in compared)
    titles = [COLUMN_TITLES[name].format(n=tools[name]["n_trials"]) for name in names]
    rows = [
        ("time to first trial (s)", "time_to_first_trial_s", "{:.0f}"),
        ("median trial (s)", "median_trial_s", "{:.1f}"),
        ("total trial time (s)", "total_trials_s", "{:.0f}"),
        ("trials", "n_trials", "{}"),
        ("trials per hour", "trials_per_hour", "{:.1f}"),
        ("trials cut short (dominated)", "cut_trials", "{}"),
        ("peak RSS (MiB)", "peak_rss_mb", "{:.0f}"),
        ("original's refusals", "baseline_refusals", "{}"),
        (f"hypervolume (ref. point {results['settings']['eval_prompts']} refusals, KL {KL_CAP})", "hypervolume", "{:.3f}"),
    ]
    lines = [
        "| | " + " | ".join(titles) + (" | ours / reference |" if with_ratio else ""),
        "|---|" + "---:|" * (len(names) + with_ratio),
    ]
    for label, key, fmt in rows:
        cells = [fmt.format(tools[name][key]) if tools[name].get(key) is not None else "–" for name in names]
        ratio = ""
        if with_ratio and key not in {"n_trials", "baseline_refusals", "cut_trials"}:
            base, ours = (tools[name].get(key) for name in compared)
            ratio = f"{ours / base:.2f}×" if isinstance(base, (int, float)) and isinstance(ours, (int, float)) and base else ""
        lines.append(f"| {label} | " + " | ".join(cells) + (f" | {ratio} |" if with_ratio else " |"))
    for cap in REFUSAL_CAPS:
        values = [tools[name]["best_kl_at_refusals"].get(str(cap)) for name in names]
        cells = [f"{v:.4f}" if v is not None else "–" for v in values]
        lines.append(f"| best KL at refusals ≤ {cap} | " + " | ".join(cells) + (" | |" if with_ratio else " |"))
    for name, title in zip(names, titles):
        front = ", ".join(f"({r}, {kl:.3f})" for r, kl in tools[name]["pareto"])
        lines.append(f"| Pareto front, {title} (refusals, KL) | {front} |" + " |" * (len(names) - 1 + with_ratio))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    styles = {"reference": ("tab:gray", "s", "heretic-llm 1.4.0 (reference)"), "ours": ("tab:red", "o", "Heretic (ours)")}
    for name, data in results["tools"].items():
        if name == "ours_same_trials":
            front = data["pareto"]
            if front:
                axes.step(
                    [p[0] for p in front],
                    [p[1] for p in front],
                    where="post",
                    color="tab:red",
                    linestyle="--",
                    label=f"Heretic (ours), first {data['n_trials']} trials",
                )
            continue
        color, marker, label = styles.get(name, ("tab:blue", "^", name))
        label = f"{label}, {data['n_trials']} trials"
        trials = [t for t in data["trials"] if not t["cut"]]
        axes.scatter([t["refusals"] for t in trials], [t["kl"] for t in trials], s=12, alpha=0.3, color=color, marker=marker)
        front = data["pareto"]
        if front:
            axes.step([p[0] for p in front], [p[1] for p in front], where="post", color=color, label=label)
            axes.scatter([p[0] for p in front], [p[1] for p in front], color=color, marker=marker, s=30)
    axes.set_xlabel(f"refusals (of {results['settings']['eval_prompts']} harmful prompts)")
    axes.set_ylabel("KL divergence from the original")
    axes.set_yscale("log")
    quick = " — reduced run, not the full benchmark" if results["settings"]["quick"] else ""
    axes.set_title(f"Pareto fronts{quick}", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=130)


def write_markdown(results: dict[str, Any], command: str) -> str:
    settings = results["settings"]
    quick = settings["quick"]
    title = f"Reduced side-by-side run ({settings['deviations']}; NOT the full benchmark)" if quick else "Side-by-side benchmark"
    tools = results["tools"]
    parts = [
        f"## {title}: {settings['date']}",
        "",
        f"- machine: {settings['machine']}",
        f"- CPU flags: {' '.join(settings.get('cpu_flags', [])) or 'not recorded'}; profile "
        f"{settings.get('cpu_profile', 'native')}"
        + (
            f" ({' '.join(f'{k}={v}' for k, v in CPU_PROFILES[settings['cpu_profile']].items())} for both tools)"
            if settings.get("cpu_profile", "native") != "native"
            else ""
        ),
        f"- compute dtype: reference bfloat16 (its default for this model); ours "
        f"{tools.get('ours', {}).get('dtype') or 'bfloat16 (--dtypes bfloat16)'}",
        f"- command: `{command}`",
        "- model: Qwen2.5-Coder-0.5B-Instruct (demo model, Q4_K_M GGUF dequantized to bf16 safetensors)",
        f"- prompts: directions from harmful_train[:{settings['train_prompts']}] and harmless_train[:{settings['train_prompts']}]; "
        f"refusals on harmful_test[:{settings['eval_prompts']}]; KL on harmless_test[:{settings['eval_prompts']}] (`../shared/datasets/`)",
        f"- shared settings: max_response_length {settings['max_response_length']}, automatic batch size (max "
        f"{settings['max_batch_size']}), {settings['trials']} trials, {settings['startup_trials']} random start-up trials, "
        f"seed {settings['seed']}, the reference's default refusal markers ({settings['n_markers']}) for both",
    ]
    if "ours_same_trials" in tools:
        n = tools["ours_same_trials"]["n_trials"]
        parts.append(
            f"- the reference completed only {n} of {settings['trials']} trials in the time available (its run was stopped); "
            f'"ours, first {n} trials" is our search at the same number of trials (trials are sampled in order, so it is the study a run of {n} trials gives)'
        )
    if settings.get("reference_reused"):
        parts.append(
            f"- the reference's numbers come from an earlier run with identical settings ({settings['reference_reused']})"
        )
    image = "fronts-quick.png" if settings["quick"] else "fronts.png"
    parts += ["", table(results), "", f"![Pareto fronts](bench/results/{image})", ""]
    if "reference" in tools and "ours" in tools:
        parts += ["### Targets", "", "| target | reference | ours | verdict |", "|---|---:|---:|---|"]
        parts += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets(results)]
        parts.append("")
    if "noise" in results:
        parts += [
            "### Run-to-run noise of our search",
            "",
            "Our search run again with other seeds (everything else identical).",
            "",
            noise_table(results["noise"]),
            "",
        ]
    if "reference_noise" in results:
        parts += [
            "### Run-to-run noise of the reference's search",
            "",
            "The reference's run above, and its search run again with other seeds by `bench/reference_search.py`: "
            "the reference's own sampler (its Optuna version, multivariate TPE with 128 EI candidates seeded once, "
            "10 start-up trials), its parameter space and names, its objectives (KL, or refusals / base refusals × "
            "0.01 below KL 0.01; refusals / base refusals), every trial scored in full, with our engine doing the "
            "ablation and scoring (which gives the reference's scores for the same parameters; see the replay below). "
            "Seed 42's ten start-up trials are the reference run's own; its later trials differ because scores differ "
            "by bf16 rounding.",
            "",
            noise_table(results["reference_noise"], "reference", with_time=False),
            "",
            f"Reproduce: `{results['reference_noise']['command']}`",
            "",
        ]
    if "noise" in results:
        parts += [
            "The targets above allow, at each cap and for the hypervolume, a shortfall up to the run-to-run noise "
            "of a difference between one run of each tool: the spread (max − min) between our seeds and, where "
            "measured, the spread between the reference's runs, added as independent errors (√(a² + b²)). The last "
            "target row compares typical runs instead: the median over each tool's runs at every cap.",
            "",
            "<details><summary>best KL at every refusal cap, for each run of both tools</summary>",
            "",
            every_cap_table(results),
            "",
            "</details>",
            "",
        ]
    if "reference" in tools:
        parts += [
            "<details><summary>reference configuration (config.toml)</summary>",
            "",
            "```toml",
            tools["reference"]["config"].rstrip(),
            "```",
            "</details>",
            "",
        ]
    if "ours" in tools:
        parts += ["<details><summary>our command</summary>", "", "```", tools["ours"]["command"], "```", "</details>", ""]
    return "\n".join(parts)


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


def targets(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Each performance target as (target, reference, ours, verdict). The front is compared at the same
    number of trials; a KL or hypervolume shortfall smaller than the spread between our seeds is
    'within noise'."""
    tools = results["tools"]
    reference = tools["reference"]
    ours = tools.get("ours_same_trials", tools["ours"])
    spread = tolerances(results)
    rows: list[tuple[str, str, str, str]] = []

    def ratio_row(label: str, key: str, limit: float, fmt: str) -> None:
        base, value = reference.get(key), ours.get(key)
        if base is None or value is None:
            rows.append((label, "–", "–", "not measured"))
            return
        verdict = f"{'met' if value <= limit * base else 'NOT met'} ({value / base:.2f}×)"
        rows.append((label, fmt.format(base), fmt.format(value), verdict))

    ratio_row("median trial ≤ 0.25 × reference (s)", "median_trial_s", 0.25, "{:.1f}")
    ratio_row("time to first trial ≤ 0.5 × reference (s)", "time_to_first_trial_s", 0.5, "{:.0f}")
    ratio_row("peak RSS ≤ reference (MiB)", "peak_rss_mb", 1.0, "{:.0f}")

    def verdict(shortfall: float, tolerance: float | None) -> str:
        if shortfall <= 0:
            return "met"
        if tolerance is not None and shortfall <= tolerance:
            return f"met within noise (short by {shortfall:.4f}, run-to-run noise {tolerance:.4f})"
        return f"NOT met (short by {shortfall:.4f}" + (
            f", run-to-run noise {tolerance:.4f})" if tolerance is not None else ", noise not measured)"
        )

    base, value = reference["hypervolume"], ours["hypervolume"]
    rows.append(("hypervolume ≥ reference", f"{base:.3f}", f"{value:.3f}", verdict(base - value, spread.get("hypervolume"))))
    for cap in REFUSAL_CAPS:
        base, value = reference["best_kl_at_refusals"][str(cap)], ours["best_kl_at_refusals"][str(cap)]
        label = f"best KL at refusals ≤ {cap} ≤ reference"
        if base is None:
            rows.append((label, "–", f"{value:.4f}" if value is not None else "–", "met (the reference has no trial there)"))
        elif value is None:
            rows.append((label, f"{base:.4f}", "–", "NOT met (no trial of ours there)"))
        else:
            rows.append((label, f"{base:.4f}", f"{value:.4f}", verdict(value - base, spread.get(str(cap)))))
    # Between the listed caps too: every k at which the reference's front is lower than ours, with the
    # run-to-run noise at that k (both tools' spreads combined) as the tolerance.
    n_prompts = results["settings"]["eval_prompts"]
    beyond, within, typical = [], [], []
    for row in every_cap(results):
        k, base, value, tolerance = row["k"], row["reference"], row["ours"], row["tolerance"]
        if row["reference_median"] is not None and (row["ours_median"] is None or row["ours_median"] > row["reference_median"]):
            typical.append(k)
        if base is None or (value is not None and value <= base):
            continue
        (within if value is not None and tolerance is not None and value - base <= tolerance else beyond).append(k)
    label = "best KL ≤ reference at every cap k = 0…" + str(n_prompts)
    if not beyond:
        rows.append((label, "", "", "met" + (f" (within noise at k = {compact_ranges(within)})" if within else "")))
    else:
        rows.append(
            (
                label,
                "",
                "",
                f"NOT met at k = {compact_ranges(beyond)}"
                + (f" (within noise at k = {compact_ranges(within)})" if within else ""),
            )
        )
    if "reference_noise" in results and "noise" in results:
        rows.append(
            (
                "median of runs: best KL ≤ reference's median at every cap",
                "",
                "",
                f"NOT met at k = {compact_ranges(typical)}" if typical else "met",
            )
        )
    return rows


def combined_noise(spreads: list[float | None]) -> float | None:
    """The run-to-run noise of a difference between one run of each tool: the measured spreads
    (max - min over each tool's runs) added as independent errors, sqrt(a^2 + b^2)."""
    known = [spread for spread in spreads if spread is not None]
    return math.sqrt(sum(spread**2 for spread in known)) if known else None


def tolerances(results: dict[str, Any]) -> dict[str, float | None]:
    """Run-to-run noise per measure, from our seeds' spread and, where measured, the reference's (its run
    and its search re-run with other seeds)."""
    spreads = [results[key]["spread"] for key in ("noise", "reference_noise") if key in results]
    return {key: combined_noise([spread.get(key) for spread in spreads]) for key in {key for spread in spreads for key in spread}}


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


def every_cap(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per refusal cap k: the reference's and our best KL; each of our seeds' and each reference run's, with
    each tool's spread (max - min) and median over its runs; the tolerance is the two spreads combined."""
    tools = results["tools"]
    reference, ours = tools["reference"], tools.get("ours_same_trials", tools["ours"])
    seeds = results.get("noise", {}).get("seeds", {})
    reference_runs = results.get("reference_noise", {}).get("seeds", {})
    rows = []
    for k in range(results["settings"]["eval_prompts"] + 1):
        per_seed = {seed: best_kl_at(data["pareto"], k) for seed, data in seeds.items()}
        per_run = {run: best_kl_at(data["pareto"], k) for run, data in reference_runs.items()}
        seed_spread, reference_spread = spread_at(list(per_seed.values())), spread_at(list(per_run.values()))
        rows.append(
            {
                "k": k,
                "reference": best_kl_at(reference["pareto"], k),
                "ours": best_kl_at(ours["pareto"], k),
                "seeds": per_seed,
                "seed_spread": seed_spread,
                "reference_runs": per_run,
                "reference_spread": reference_spread,
                "ours_median": median_at(list(per_seed.values())),
                "reference_median": median_at(list(per_run.values())),
                "tolerance": combined_noise([seed_spread, reference_spread]),
            }
        )
    return rows


def every_cap_table(results: dict[str, Any]) -> str:
    """Markdown rows for the caps at which either tool has a trial, up to the last cap where the fronts differ."""
    rows = [r for r in every_cap(results) if r["reference"] is not None or r["ours"] is not None]
    while len(rows) > 1 and rows[-1]["reference"] == rows[-2]["reference"] and rows[-1]["ours"] == rows[-2]["ours"]:
        rows.pop()
    seeds = list(rows[0]["seeds"]) if rows else []
    runs = list(rows[0]["reference_runs"]) if rows else []
    cell = lambda v: f"{v:.4f}" if v is not None else "–"  # noqa: E731
    columns = ["k", "reference", "ours", *(f"ours, seed {s}" for s in seeds), "our spread"]
    if runs:
        columns += [f"reference, {run}" for run in runs] + ["reference spread", "our median", "reference median"]
    columns.append("ours − reference")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    for r in rows:
        gap = r["ours"] - r["reference"] if r["ours"] is not None and r["reference"] is not None else None
        cells = [
            str(r["k"]),
            cell(r["reference"]),
            cell(r["ours"]),
            *(cell(r["seeds"][s]) for s in seeds),
            cell(r["seed_spread"]),
        ]
        if runs:
            cells += [cell(r["reference_runs"][run]) for run in runs]
            cells += [cell(r["reference_spread"]), cell(r["ours_median"]), cell(r["reference_median"])]
        cells.append("–" if gap is None else f"{gap:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compact_ranges(numbers: list[int]) -> str:
    """[24, 25, 26, 33] -> "24–26, 33"."""
    groups: list[list[int]] = []
    for n in numbers:
        if groups and n == groups[-1][-1] + 1:
            groups[-1].append(n)
        else:
            groups.append([n])
    return ", ".join(f"{g[0]}–{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


def noise_table(noise_data: dict[str, Any], first_column: str = "seed", with_time: bool = True) -> str:
    """Each run's front metrics and their spread; with_time adds the median trial time."""
    runs = noise_data["seeds"]
    time_title = " median trial (s) |" if with_time else ""
    lines = [
        f"| {first_column} |{time_title} hypervolume | "
        + " | ".join(f"best KL, ≤ {cap}" for cap in REFUSAL_CAPS)
        + " | Pareto front (refusals, KL) |",
        "|---|" + "---:|" * (1 + with_time + len(REFUSAL_CAPS)) + "---|",
    ]
    for run, data in runs.items():
        cells = [f"{v:.4f}" if v is not None else "–" for v in (data["best_kl_at_refusals"][str(c)] for c in REFUSAL_CAPS)]
        timing = f" {data['median_trial_s']:.1f} |" if with_time else ""
        front = ", ".join(f"({r}, {kl:.3f})" for r, kl in data["pareto"])
        lines.append(f"| {run} |{timing} {data['hypervolume']:.3f} | " + " | ".join(cells) + f" | {front} |")
    spread = noise_data["spread"]
    cells = [f"{spread[str(c)]:.4f}" if spread.get(str(c)) is not None else "–" for c in REFUSAL_CAPS]
    lines.append(f"| spread (max − min) |{' |' if with_time else ''} {spread['hypervolume']:.3f} | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def search_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings two searches must share to be compared (everything but the seed and the machine)."""
    keys = (
        "trials",
        "startup_trials",
        "train_prompts",
        "eval_prompts",
        "max_response_length",
        "max_batch_size",
        "datasets",
        "n_markers",
    )
    return {key: settings.get(key) for key in keys}


def attach_reference_noise(results: dict[str, Any]) -> None:
    """The reference's run-to-run noise, where bench/reference_search.py has measured it with the same
    settings: its real run and its search re-run by our engine with each seed."""
    path = RESULTS / "reference-search.json"
    if "reference" not in results["tools"] or not path.exists():
        return
    searched = json.loads(path.read_text())
    if searched.get("settings") != search_settings(results["settings"]) or not searched["seeds"]:
        log(f"{path.name} was measured with other settings than the latest run; run bench/reference_search.py again")
        return
    runs = {f"run, seed {results['settings']['seed']}": results["tools"]["reference"]}
    runs.update({f"search, seed {seed}": data for seed, data in searched["seeds"].items()})
    results["reference_noise"] = dict(noise(runs), command=searched["command"])


def publish(results: dict[str, Any]) -> None:
    """The plot and the run's section of BENCHMARKS.md ("quick" for a reduced run, else "full")."""
    attach_reference_noise(results)
    plot(results, RESULTS / ("fronts-quick.png" if results["settings"]["quick"] else "fronts.png"))
    settings = results["settings"]
    command = settings.get("command", "python bench/run_bench.py")
    update_benchmarks_md(write_markdown(results, command), "quick" if settings["quick"] else "full")


def update_benchmarks_md(section: str, marker: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    block = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


# --- Main ----------------------------------------------------------------------------------------


def tool_env() -> dict[str, str]:
    """The environment both tools run in: offline, unbuffered, wide logs, no user config file."""
    env = dict(
        os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", COLUMNS="160"
    )
    env.pop("HERETIC_CONFIG", None)
    return env


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
    results["settings"]["command"] += f"; python bench/run_bench.py --add-noise-seeds {added}"
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


def main() -> None:
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
        help="continue our unfinished study in bench/work/LABEL (started with the same options, e.g. a run with "
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
        help="run nothing: rewrite BENCHMARKS.md and the plot from bench/results/latest.json",
    )
    args = parser.parse_args(attach_flag_values(sys.argv[1:]))

    if args.report_only:
        results = json.loads((RESULTS / "latest.json").read_text())
        publish(results)
        print(table(results))
        return
    if args.add_noise_seeds:
        add_noise_seeds([int(seed) for seed in args.add_noise_seeds.split(",") if seed.strip()])
        return

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
        "date": dt.date.today().isoformat(),
        "timeout_s": args.timeout_hours * 3600,
        "cpu_flags": cpu_flags(),
    }
    if args.cpu_profile != "native":  # the reference's cached results are keyed by it; native runs keep their old key
        settings["cpu_profile"] = args.cpu_profile
    if args.model != "demo":  # likewise: runs of the demo model keep their old key
        settings["model"] = args.model
    settings["command"] = ("python bench/run_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])).strip()
    if quick:
        log(f"REDUCED RUN ({settings['deviations']}): results are labelled as such")
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    model = prepare_model(args.model)
    wanted = [name.strip() for name in args.tools.split(",") if name.strip()]
    if "reference" in wanted:
        python = ensure_reference_venv()
        markers = reference_default_markers(python)
    else:  # the same 33 markers, as bench/judges.py keeps them: no reference install needed for our runs alone
        from judges import REFERENCE_MARKERS

        markers = REFERENCE_MARKERS
    settings["n_markers"] = len(markers)
    env = dict(tool_env(), **CPU_PROFILES[args.cpu_profile])

    key_settings = {
        k: v
        for k, v in settings.items()
        if k not in {"machine", "date", "timeout_s", "quick", "deviations", "command", "cpu_flags"}
    }
    reference_cache = (
        RESULTS / f"reference-{hashlib.sha256(json.dumps(key_settings, sort_keys=True).encode()).hexdigest()[:12]}.json"
    )
    tools: dict[str, Any] = {}
    if "reference" in wanted:
        if args.reuse_reference and reference_cache.exists():
            tools["reference"] = json.loads(reference_cache.read_text())
            settings["reference_reused"] = reference_cache.name
            log(f"reusing the reference's results from {reference_cache}")
        else:
            tools["reference"] = run_reference(settings, model, python, markers, env, resume=args.resume_reference)
            reference_cache.write_text(json.dumps(tools["reference"], indent=2))
    if "ours" in wanted:
        extra = shlex.split(args.ours_args)
        tools[args.label] = run_ours(settings, model, markers, env, extra, args.label, resume=args.resume_ours)
        reference_trials = tools.get("reference", {}).get("n_trials")
        if args.label == "ours" and reference_trials and reference_trials < tools["ours"]["n_trials"]:
            log(f"the reference finished only {reference_trials} trials; comparing with our first {reference_trials} as well")
            tools["ours_same_trials"] = first_trials(tools["ours"], reference_trials, args.eval_prompts)

    results: dict[str, Any] = {"settings": {k: v for k, v in settings.items() if k != "timeout_s"}, "tools": tools}
    seeds = [int(seed) for seed in args.noise_seeds.split(",") if seed.strip()]
    if seeds and args.label == "ours" and "ours" in tools:
        # compared at the number of trials the targets use: the reference's, where it stopped early
        compared = tools.get("ours_same_trials", tools["ours"])
        runs = {str(settings["seed"]): compared}
        runs.update(seed_runs(settings, model, markers, env, shlex.split(args.ours_args), seeds, compared["n_trials"]))
        results["noise"] = noise(runs)
    complete = args.label == "ours" and {"reference", "ours"} <= set(tools)
    write_results(results, latest=complete and not quick)  # latest.json stays the full run's
    if complete:
        publish(results)
    print(table(results))


if __name__ == "__main__":
    main()
