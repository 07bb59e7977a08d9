"""Several workers on one study: telling them apart, finding the trials of dead ones, and what they share.

Optuna schedules: each worker asks the study for a trial, runs it and tells the result. What is
added here is what Optuna leaves to its user:
- a dead worker's trial (kill -9, a lost machine) is failed and queued again with the same
  parameters by `RetryHeartbeatStaleTrialCallback`: in a database, when its heartbeat stops (Optuna's
  heartbeat); in a journal file, when the lock file its worker held for its whole life is free;
- the setup every worker needs and one computes (batch size, refusal directions, the original's
  refusals) is kept in the study, so that joining workers read it instead of computing it.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import logging
import os
import re
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from . import checkpoint

log = logging.getLogger(__name__)

WORKER_ATTR = "worker"  # user attribute of a trial: the worker that ran it
DIRECTIONS_KEY = "heretic:directions"  # study system attribute: the directions, safetensors bytes in base64
UNCLAIMED_GRACE = dt.timedelta(seconds=60)  # a RUNNING trial with no worker yet is someone's fresh ask


def worker_token(index: int | None = None) -> str:
    """This worker's name: host and process id (and its index among the workers of one command)."""
    name = f"{socket.gethostname()}-{os.getpid()}" + (f"-w{index}" if index is not None else "")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def counts(study: optuna.Study) -> tuple[int, int, int]:
    """(finished, running, waiting) trials of the study."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))
    states = [trial.state for trial in trials]
    return states.count(TrialState.COMPLETE), states.count(TrialState.RUNNING), states.count(TrialState.WAITING)


class Liveness:
    """How this worker shows it is alive, and how it finds the trials of workers that are not.

    `journal`: the journal file of the study (None: a database); `exclusive`: this process is the
    only one on the study (a single run), so any RUNNING trial it finds was left by a killed run."""

    def __init__(self, study: optuna.Study, journal: Path | None, exclusive: bool, token: str) -> None:
        self.study, self.journal, self.exclusive, self.token = study, journal, exclusive, token
        self._descriptor: int | None = None
        if journal is not None and not exclusive:
            self._descriptor = _hold(self._lock_path(token))

    def _lock_path(self, token: str) -> Path:
        assert self.journal is not None
        return Path(f"{Path(self.journal).expanduser().resolve()}.worker-{token}.lock")

    def reap(self) -> int:
        """Fail the trials of dead workers and queue them again; the number found."""
        if self.exclusive:
            return checkpoint.fail_stale_trials(self.study)
        if self.journal is None:
            before = counts(self.study)[2]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental-API warnings
                optuna.storages.fail_stale_trials(self.study)  # the heartbeat's verdict, then the retry callback
            # A worker that died between asking for a trial and its first heartbeat left no heartbeat.
            unnamed = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if _unclaimed(t)]
            return max(0, counts(self.study)[2] - before) + sum(retry(self.study, t) for t in unnamed)
        found = 0
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if self._dead(trial):
                found += retry(self.study, trial)
        return found

    def _dead(self, trial: FrozenTrial) -> bool:
        owner = trial.user_attrs.get(WORKER_ATTR)
        if owner is None:
            return _unclaimed(trial)
        if owner == self.token:
            return False
        path = self._lock_path(str(owner))
        try:
            descriptor = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return True
        try:
            import fcntl

            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # its worker holds it: alive
        finally:
            os.close(descriptor)
        path.unlink(missing_ok=True)
        return True

    @contextlib.contextmanager
    def running(self, trial: optuna.Trial) -> Iterator[None]:
        """While a trial runs: its worker is recorded and, in a database, its heartbeat kept."""
        if self.journal is not None:
            trial.set_user_attr(WORKER_ATTR, self.token)
            yield
            return
        from optuna.storages._heartbeat import BaseHeartbeat, get_heartbeat_thread

        storage = self.study._storage  # noqa: SLF001 - the storage's heartbeat API, as Study.optimize uses it
        if isinstance(storage, BaseHeartbeat):
            storage.record_heartbeat(trial._trial_id)  # before the worker is named: a named trial has a heartbeat
        trial.set_user_attr(WORKER_ATTR, self.token)
        with get_heartbeat_thread(trial._trial_id, storage):
            yield


def _unclaimed(trial: FrozenTrial) -> bool:
    """A RUNNING trial that no worker named itself on for a minute: its worker died right after asking."""
    started = trial.datetime_start or dt.datetime.now()
    return WORKER_ATTR not in trial.user_attrs and dt.datetime.now() - started > UNCLAIMED_GRACE


def _hold(path: Path) -> int:
    """Create `path` and hold an exclusive lock on it for the rest of this process."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    return descriptor


def retry(study: optuna.Study, trial: FrozenTrial) -> int:
    """Fail a trial whose worker died and queue it again with the same parameters; 1 if this worker did it."""
    try:
        if not study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):  # noqa: SLF001
            return 0
    except optuna.exceptions.UpdateFinishedTrialError:
        return 0  # another worker got there first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        RetryHeartbeatStaleTrialCallback(max_retry=3)(study, study._storage.get_trial(trial._trial_id))  # noqa: SLF001
    log.info("Trial %d was left by a worker that stopped; it is queued again", trial.number)
    return 1


# --- Setup shared through the study ----------------------------------------------------------------


def encode_tensor(tensor: torch.Tensor) -> tuple[str, str]:
    """(base64 text, sha256 of the bytes) of a tensor, as safetensors bytes."""
    from safetensors.torch import save

    data = save({"tensor": tensor.detach().to("cpu").contiguous()})
    return base64.b64encode(data).decode("ascii"), hashlib.sha256(data).hexdigest()


def decode_tensor(text: str, digest: str) -> torch.Tensor | None:
    """The tensor of `encode_tensor`, or None when its bytes do not match `digest`."""
    from safetensors.torch import load

    data = base64.b64decode(text)
    if hashlib.sha256(data).hexdigest() != digest:
        return None
    return load(data)["tensor"]


def stored_directions(study: optuna.Study) -> torch.Tensor | None:
    """The refusal directions another worker stored in the study (checked against their hash), if any."""
    digest = study.user_attrs.get("directions_sha256")
    text = study._storage.get_study_system_attrs(study._study_id).get(DIRECTIONS_KEY)  # noqa: SLF001
    if not isinstance(digest, str) or not isinstance(text, str):
        return None
    directions = decode_tensor(text, digest)
    if directions is None:
        log.warning("The directions stored in the study do not match their hash; computing them again")
    return directions


def store_directions(study: optuna.Study, directions: torch.Tensor) -> None:
    text, digest = encode_tensor(directions)
    study._storage.set_study_system_attr(study._study_id, DIRECTIONS_KEY, text)  # noqa: SLF001
    study.set_user_attr("directions_sha256", digest)
