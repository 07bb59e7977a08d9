"""Several workers, one search: a real PostgreSQL server, worker processes on a tiny model, kill -9.

The PostgreSQL server is started by the suite itself (tests/postgres.py) from Debian's `postgresql`
package. Without it the cases are skipped with the reason, except under CI=true, where that fails.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from postgres import postgres_server, server_binaries
from tiny import PROMPT_FLAGS, SCORING_FLAGS

from heretic import parallel
from heretic.config import Settings
from heretic.errors import HereticError
from heretic.parallel import pin_this_process, split_evenly, visible_gpus
from heretic.search import checkpoint
from heretic.search.pareto import pareto_front, trial_results
from heretic.search.runner import make_sampler, surplus

FLAGS = [
    *PROMPT_FLAGS,
    *SCORING_FLAGS,
    "--n-startup-trials",
    "3",
    "--dtypes",
    "float32",
    "--headless",
    "--checkpoint-dir",
    "checkpoints",
]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    binaries = server_binaries()
    if binaries is None:
        reason = "no PostgreSQL server binaries (initdb, pg_ctl; Debian package postgresql) on this machine"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    with postgres_server(binaries) as url:
        yield url


# --- Fast: the pure parts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "parts", "expected"),
    [
        (["0", "1", "2", "3"], 2, [["0", "1"], ["2", "3"]]),
        (["0", "1", "2"], 2, [["0", "1"], ["2"]]),
        (["0"], 2, [["0"], ["0"]]),
        (["0", "1", "2", "3", "4", "5", "6", "7"], 4, [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]),
    ],
)
def test_devices_and_cores_are_split_evenly(items: list[str], parts: int, expected: list[list[str]]) -> None:
    assert split_evenly(items, parts) == expected


def test_workers_sample_apart_and_a_single_run_samples_as_before() -> None:
    """Two workers asking after the same number of finished trials get different seeds; no worker
    name gives the seed a single run always had (resumes stay reproducible)."""
    seed = lambda worker: make_sampler(42, 5, 3, worker)._rng.rng.randint(1 << 30)  # noqa: E731
    assert seed("a-1") != seed("b-2")
    assert seed("") == make_sampler(42, 5, 3)._rng.rng.randint(1 << 30)


def test_a_trial_asked_beyond_the_target_is_surplus(tmp_path: Path) -> None:
    study, _ = checkpoint.load_or_create(tmp_path / "s.jsonl", "fp", {})
    asked = [study.ask() for _ in range(3)]
    study.tell(asked[0], [1.0, 1.0])
    assert not surplus(study, asked[1].number, 3)  # finished 1 + running below it 0 < 3
    assert surplus(study, asked[2].number, 2)  # finished 1 + trial 1 running = 2


def no_cuda_in_this_process(monkeypatch: pytest.MonkeyPatch, gpus: int, started: bool = False) -> None:
    """A machine with `gpus` GPUs (counted by NVML) and no CUDA_VISIBLE_DEVICES; torch.cuda's own counting,
    which would start CUDA in this process and fix the GPUs it sees, fails the test."""

    def starts_cuda(*args: object) -> None:
        raise AssertionError("CUDA was asked in this process before worker 0 was pinned")

    monkeypatch.setattr(torch.cuda, "is_available", starts_cuda)
    monkeypatch.setattr(torch.cuda, "device_count", starts_cuda)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: started)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: gpus)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # recorded, so that pinning this process is undone after the test
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")


def test_worker_0_is_pinned_to_its_gpus_before_cuda_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    no_cuda_in_this_process(monkeypatch, gpus=4)
    shares = pin_this_process(Settings(workers=2))
    assert shares is not None and shares.gpus == [["0", "1"], ["2", "3"]]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_gpus_are_counted_in_a_child_process_where_nvml_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    no_cuda_in_this_process(monkeypatch, gpus=-1)  # NVML missing or failing
    commands: list[list[str]] = []

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="2\n", stderr="")

    monkeypatch.setattr(parallel.subprocess, "run", run)
    assert visible_gpus() == ["0", "1"]
    assert commands[0][:2] == [sys.executable, "-c"]


def test_the_child_process_counts_the_gpus_cuda_sees() -> None:
    """The real child process (no mock): 0 on a torch without CUDA, else what torch counts (NVML first)."""
    expected = torch.cuda.device_count() if torch.backends.cuda.is_built() else 0
    assert parallel.count_gpus_in_child() == expected


def test_worker_0_is_refused_where_cuda_started_before_it_could_be_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA keeps the GPUs it saw when it started: worker 0 would run on the other workers' GPUs too."""
    no_cuda_in_this_process(monkeypatch, gpus=2, started=True)
    with pytest.raises(HereticError, match=r"^CUDA was started in this process before --workers 2 .*CUDA_VISIBLE_DEVICES"):
        pin_this_process(Settings(workers=2))
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    no_cuda_in_this_process(monkeypatch, gpus=1, started=True)  # both workers share the one GPU CUDA sees already
    shares = pin_this_process(Settings(workers=2))
    assert shares is not None and shares.gpus == [["0"], ["0"]]


# --- Slow: worker processes --------------------------------------------------------------------------


def worker(model: Path, cwd: Path, *extra: str, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "heretic", str(model), *FLAGS, *extra],
            cwd=cwd,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


_storages: dict[str, optuna.storages.BaseStorage] = {}


def the_study(storage: str | Path, prefix: str = "") -> optuna.Study | None:
    """The study in `storage` whose name starts with `prefix` (None before it is created); one
    connection pool per database."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if checkpoint.is_database(storage):
            if str(storage) not in _storages:
                _storages[str(storage)] = optuna.storages.RDBStorage(checkpoint.with_driver(str(storage)))
            backend = _storages[str(storage)]
        else:
            backend = checkpoint.open_storage(Path(storage))
        names = [name for name in optuna.get_all_study_names(backend) if name.startswith(prefix)]
        assert len(names) <= 1, names
        return optuna.load_study(study_name=names[0], storage=backend) if names else None


def check_study(study: optuna.Study, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """The study has exactly `n_trials` finished trials, no two with the same parameters."""
    finished = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(finished) == n_trials, [(t.number, t.state) for t in study.get_trials()]
    parameters = [repr(sorted(t.user_attrs["parameters"].items())) for t in finished]
    assert len(set(parameters)) == n_trials, "two workers sampled the same parameters"
    return finished


def front_numbers(text: str) -> set[int]:
    """Trial numbers of the printed Pareto front table."""
    table = text[text.index("Pareto front") :]
    return {int(n) for n in re.findall(r"^\s*[│|]\s*(\d+)\s*[│|]", table, flags=re.MULTILINE)}


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_share_one_study_on_postgres(postgres_url: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Two worker processes started with the same command: the study's total is what was asked, each
    trial runs once (no duplicate parameters), both took part, and the command that chooses
    afterwards (--n-trials 0) shows the front built from all trials."""
    model = tiny_models["llama"]
    # Trials long enough (whole responses, every prompt counted) that the second worker has joined before
    # the first could run all six alone.
    slow = ["--max-response-length", "160", "--no-stop-on-verdict", "--no-cut-hopeless-trials"]
    common = ["--storage", postgres_url, "--n-trials", "6", "--search-only", *slow]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    processes = [worker(model, tmp_path, *common, log=log) for log in logs]
    for process, log in zip(processes, logs):
        assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    study = the_study(postgres_url, "llama-")
    assert study is not None
    finished = check_study(study, 6)
    assert {t.user_attrs["worker"].split("-")[-1] for t in finished} == {str(p.pid) for p in processes}
    chooser = subprocess.run(
        [sys.executable, "-m", "heretic", str(model), *FLAGS, "--storage", postgres_url, "--n-trials", "0", *slow],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert chooser.returncode == 0, chooser.stdout + chooser.stderr
    assert "Searching" not in chooser.stdout and "Chosen trial" in chooser.stdout
    assert front_numbers(chooser.stdout) == {r.number for r in pareto_front(trial_results(study))}


@pytest.mark.slow
@pytest.mark.postgres
def test_killed_worker_trial_runs_again_and_other_settings_are_refused(
    postgres_url: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """kill -9 a worker while it runs a trial: its heartbeat stops; a worker with other settings is
    refused with one sentence (the study is unfinished); the other worker fails the killed trial,
    runs it again with the same parameters, and completes the study."""
    model = tiny_models["qwen2"]
    # Trials long enough to be caught running: whole responses, every prompt counted.
    slow = ["--max-response-length", "160", "--no-stop-on-verdict", "--no-cut-hopeless-trials"]
    common = ["--storage", postgres_url, "--n-trials", "8", "--search-only", "--heartbeat-interval", "1", *slow]
    victim = worker(model, tmp_path, *common, log=tmp_path / "victim.log")
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and victim.poll() is None:
        shared = the_study(postgres_url, "qwen2-")
        if shared is not None:
            running = shared.get_trials(states=(TrialState.RUNNING,))
            mine = [t for t in running if str(t.user_attrs.get("worker", "")).endswith(f"-{victim.pid}")]
            if mine:
                victim.send_signal(signal.SIGKILL)
                killed = mine[0]
    assert killed is not None, (tmp_path / "victim.log").read_text()[-3000:]
    victim.wait()
    refused = subprocess.run(
        [sys.executable, "-m", "heretic", str(model), *FLAGS, *common, "--seed", "7"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    message = " ".join(refused.stderr.split())
    assert refused.returncode == 2 and "Traceback" not in message, refused.stdout + refused.stderr
    assert re.search(r"holds an unfinished search of this model .* with other settings \(seed\); start this worker", message)
    # The other worker joins the unfinished study, runs the killed trial again and completes the study.
    survivor = worker(model, tmp_path, *common, log=tmp_path / "survivor.log")
    assert survivor.wait(timeout=600) == 0, (tmp_path / "survivor.log").read_text()[-3000:]
    study = the_study(postgres_url, "qwen2-")
    assert study is not None
    check_study(study, 8)
    retried = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.system_attrs.get("failed_trial") == killed.number]
    failed = study.get_trials()[killed.number]
    assert failed.state == TrialState.FAIL and len(retried) == 1
    assert failed.params.items() <= retried[0].params.items()  # the parameters it had drawn when killed are kept
    assert retried[0].user_attrs["worker"].endswith(f"-{survivor.pid}")


@pytest.mark.slow
def test_workers_flag_runs_two_processes_on_one_journal(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """--workers 2 on the default journal file: one command, one display, the study's total, one choice."""
    model = tiny_models["llama"]
    result = subprocess.run(
        [sys.executable, "-m", "heretic", str(model), *FLAGS, "--workers", "2", "--n-trials", "6"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Workers: 2 (" in result.stdout and "Chosen trial" in result.stdout
    (journal,) = (tmp_path / "checkpoints").glob("*.jsonl")
    study = the_study(journal)
    assert study is not None
    check_study(study, 6)
    (log,) = (tmp_path / "checkpoints").glob("*-workers/worker-1.log")
    assert "This worker's part of the search is done" in log.read_text()
    assert front_numbers(result.stdout) == {r.number for r in pareto_front(trial_results(study))}


@pytest.mark.slow
def test_more_trials_from_the_menu_run_in_the_same_study(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """After the search, the menu's "Run more trials" asks how many, runs them in the same study
    (no restart of the command) and shows the front again."""
    import questionary

    from heretic import ui
    from heretic.choose import MORE
    from heretic.cli import main

    answers = iter([MORE, None])  # "Run more trials", then "Quit"
    asked: list[str] = []

    class Answer:
        def __init__(self, value: object) -> None:
            self.value = value

        def ask(self) -> object:
            return self.value

    def select(question: str, choices: list[questionary.Choice]) -> Answer:
        asked.append(question)
        assert any(choice.value == MORE for choice in choices)
        return Answer(next(answers))

    monkeypatch.setattr(questionary, "select", select)
    monkeypatch.setattr(questionary, "text", lambda question, **_: Answer("2"))
    monkeypatch.setattr(ui, "is_interactive", lambda: True)
    flags = [flag for flag in FLAGS if flag != "--headless"]
    main([str(tiny_models["llama"]), *flags, "--n-trials", "2"])
    text = capsys.readouterr().out
    (journal,) = Path("checkpoints").glob("*.jsonl")
    study = the_study(journal)
    assert study is not None
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    assert text.count("Pareto front") == 2 and "(4/4)" in text and asked == ["Which trial?", "Which trial?"]
