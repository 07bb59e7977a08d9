"""One search, several worker processes on this machine (--workers N), or this process joining others.

This command is worker 0: it prepares the study (batch size, directions, the original's refusals,
all stored in the study), then starts workers 1..N-1 as `heretic ... --search-only` subprocesses
that read that setup from the study, and runs trials itself. Each worker has its own share of the
GPUs listed in CUDA_VISIBLE_DEVICES (all visible ones when unset), split evenly, or on a machine
without GPUs its own share of the CPU cores. The subprocesses write their output to log files
beside the checkpoints; this command prints every worker's finished trials, then chooses once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from .config import Settings
from .errors import HereticError
from .model import device as backends
from .search.study import run_search
from .search.workers import Liveness, worker_token
from .session import Session, search_setup
from .ui import console


def split_evenly(items: Sequence[str], parts: int) -> list[list[str]]:
    """`items` in `parts` contiguous groups whose sizes differ by at most one (none empty while
    there are enough items; with fewer items than parts, the items are shared round-robin)."""
    if len(items) >= parts:
        size, extra = divmod(len(items), parts)
        groups, start = [], 0
        for index in range(parts):
            end = start + size + (1 if index < extra else 0)
            groups.append(list(items[start:end]))
            start = end
        return groups
    return [[items[index % len(items)]] for index in range(parts)] if items else [[] for _ in range(parts)]


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES, else every one the machine has (none: []).

    Counted without starting CUDA in this process: once started, CUDA keeps the GPUs it saw then, and
    worker 0's CUDA_VISIBLE_DEVICES would no longer narrow them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [item.strip() for item in listed.split(",") if item.strip() and item.strip() != "-1"]
    return [str(index) for index in range(count_gpus())]


def count_gpus() -> int:
    """The machine's GPUs, counted as torch counts them without starting CUDA (NVML, or AMD SMI on ROCm), else
    in a short child process; 0 where this torch has no CUDA."""
    import torch

    if not torch.backends.cuda.is_built():  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        return 0
    helper = getattr(torch.cuda, "_device_count_amdsmi" if torch.version.hip else "_device_count_nvml", None)
    count = int(helper()) if helper is not None else -1  # -1: the library is missing or failed
    return count if count >= 0 else count_gpus_in_child()


def count_gpus_in_child() -> int:
    """The GPUs CUDA sees, counted in a child process (which starts CUDA there, not here); 0 where that fails."""
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return int(done.stdout.split()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


@dataclass
class Plan:
    """What each worker of this command runs on: GPU ids (CUDA_VISIBLE_DEVICES) or CPU cores."""

    gpus: list[list[str]] = field(default_factory=list)
    cores: list[list[str]] = field(default_factory=list)

    def describe(self, index: int) -> str:
        if self.gpus:
            return f"GPU {','.join(self.gpus[index])}"
        return f"{len(self.cores[index])} core{'s' if len(self.cores[index]) != 1 else ''}"

    def environment(self, index: int) -> dict[str, str]:
        if self.gpus:
            return {"CUDA_VISIBLE_DEVICES": ",".join(self.gpus[index])}
        return {"OMP_NUM_THREADS": str(len(self.cores[index]))}

    def pin_gpus(self, index: int) -> None:
        """Give this process worker `index`'s GPUs (before anything uses CUDA)."""
        if self.gpus:
            os.environ.update(self.environment(index))

    def pin_cores(self, index: int) -> None:
        """Give this process worker `index`'s CPU cores (when the search starts: the serial setup before
        it, directions and the original's refusals, runs on every core)."""
        if self.cores and hasattr(os, "sched_setaffinity"):
            import torch

            os.sched_setaffinity(0, {int(core) for core in self.cores[index]})
            torch.set_num_threads(len(self.cores[index]))

    def unpin(self) -> None:
        """After the search: this process's CPU threads on every core again (for the actions)."""
        if self.cores and hasattr(os, "sched_setaffinity"):
            import torch

            every = {int(core) for share in self.cores for core in share}
            os.sched_setaffinity(0, every)
            torch.set_num_threads(len(every))


def plan(workers: int) -> Plan:
    """The share of each of `workers` workers: the GPUs split evenly, else the CPU cores."""
    gpus = visible_gpus()
    if gpus:
        return Plan(gpus=split_evenly(gpus, workers))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return Plan(cores=split_evenly([str(core) for core in cores], workers))


def pin_this_process(settings: Settings) -> Plan | None:
    """With --workers N (and not a worker itself): give this process worker 0's GPUs, and return the plan
    (its CPU cores are narrowed to worker 0's share when the search starts)."""
    if settings.workers <= 1 or settings.search_only:
        return None
    shares = plan(settings.workers)
    refuse_if_cuda_started(shares, settings.workers)
    shares.pin_gpus(0)
    return shares


def refuse_if_cuda_started(shares: Plan, workers: int) -> None:
    """Stop when CUDA already runs in this process and worker 0 should see fewer GPUs than it does: CUDA keeps
    the GPUs it saw when it started, so worker 0 would run on the other workers' GPUs too."""
    every = {gpu for share in shares.gpus for gpu in share}
    if not shares.gpus or set(shares.gpus[0]) == every:
        return
    if backends.cuda_started():
        raise HereticError(
            f"CUDA was started in this process before --workers {workers} could give worker 0 its share of the GPUs; "
            "run heretic as a command of its own (not from a program that has used CUDA), or start one "
            "`heretic ... --search-only` per GPU yourself, each with its own CUDA_VISIBLE_DEVICES."
        )


def worker_argv(argv: Sequence[str], target: int) -> list[str]:
    """The command of a worker subprocess: this command's own flags, as a search-only worker of the study."""
    return [
        sys.executable,
        "-m",
        "heretic",
        *argv,
        "--search-only",
        "--workers",
        "1",
        "--resume",
        "continue",
        "--headless",
        "--n-trials",
        str(target),
    ]


@dataclass
class Workers:
    """Runs the search of a session: alone, or as worker 0 of this command's workers."""

    session: Session
    study: optuna.Study
    argv: Sequence[str]
    shares: Plan | None
    log_dir: Path
    liveness: Liveness = field(init=False)

    def __post_init__(self) -> None:
        location = self.session.location
        assert location is not None
        token = worker_token(0 if self.shares else None)
        self.liveness = Liveness(self.study, location.journal, not location.shared, token)

    def run(self, budget: bool = True) -> None:
        """Run the search up to the study's target: with the other workers when there are any; within
        --search-minutes unless `budget` is False."""
        target = int(self.study.user_attrs.get("target_trials", self.session.settings.n_trials))
        if self.shares is not None:
            self.shares.pin_cores(0)
        children = self.start_workers(target)
        finished = False
        try:
            settings = self.session.settings
            minutes = settings.search_minutes if budget else None
            finished = run_search(search_setup(self.session), self.study, settings.n_trials, self.liveness, minutes)
        finally:
            self.stop_workers(children, interrupt=not finished)
        backends.free_memory()  # the trials' last generations, before the actions (saving, exporting)
        if self.shares is not None:
            self.shares.unpin()

    def more(self, n_trials: int) -> None:
        """Run `n_trials` more trials in the same study (the menu's "Run more trials")."""
        done = len(self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
        self.study.set_user_attr("target_trials", done + n_trials)
        self.run(budget=False)  # the user asked for these trials

    def start_workers(self, target: int) -> list[tuple[subprocess.Popen[bytes], Path]]:
        if self.shares is None:
            return []
        children = []
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for index in range(1, self.session.settings.workers):
            log = self.log_dir / f"worker-{index}.log"
            env = dict(os.environ, **self.shares.environment(index))
            with log.open("wb") as output:
                process = subprocess.Popen(
                    worker_argv(self.argv, target),
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_pinner(self.shares.cores[index] if self.shares.cores else None),
                    start_new_session=True,  # Ctrl+C reaches this command, which stops the workers
                )
            children.append((process, log))
        shares = ", ".join(self.shares.describe(index) for index in range(self.session.settings.workers))
        console.print(f"Workers: {self.session.settings.workers} ({shares}); their logs are in {self.log_dir}")
        return children

    def stop_workers(self, children: list[tuple[subprocess.Popen[bytes], Path]], interrupt: bool) -> None:
        """Wait for the workers (they stop once the study has its trials); after Ctrl+C, stop them first
        (SIGTERM: each marks its running trial as failed, to be sampled again)."""
        if interrupt:
            for process, _ in children:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        for process, log in children:
            code = process.wait()
            if code != 0 and not interrupt:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                console.print(f"[yellow]Worker {log.stem} stopped with exit code {code}:[/] {tail[0]}")


def _pinner(cores: list[str] | None) -> Callable[[], None] | None:
    if not cores or not hasattr(os, "sched_setaffinity"):
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {int(core) for core in cores})

    return pin
