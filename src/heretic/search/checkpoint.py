"""Search checkpoints: one Optuna journal file per model and study-relevant settings."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState

from ..errors import HereticError

log = logging.getLogger(__name__)
STUDY_NAME = "heretic"
SEARCH_SPACE_VERSION = 1


def fingerprint(values: dict[str, Any]) -> str:
    """A stable hash of everything that changes what a trial measures."""
    payload = json.dumps(dict(values, search_space=SEARCH_SPACE_VERSION), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def checkpoint_path(directory: str, model_name: str, study_fingerprint: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-") or "model"
    return Path(directory).expanduser() / f"{slug}-{study_fingerprint[:12]}.jsonl"


class _Backend(JournalFileBackend):
    """The journal file backend, with a failed append reported as one sentence naming the journal.

    An append cut short by a full disk leaves a partial last line; the next run recovers from it
    (see `repair_journal`)."""

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        try:
            super().append_logs(logs)
        except OSError as error:
            raise HereticError(_write_problem(Path(self._file_path), error)) from None


def _write_problem(path: Path, error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (
            f"The disk holding the checkpoint {path} is full ({error.strerror}); every finished trial is kept: "
            "free some space and rerun the same command to continue."
        )
    return f"Cannot write the checkpoint {path} ({error.strerror or error}); make it writable or choose another --checkpoint-dir."


def open_storage(path: Path) -> JournalStorage:
    """The journal at `path`, opened by its absolute, resolved path.

    Optuna names its lock `<journal>.lock` and (for the default symlink lock) points it at the path
    it was given: a relative path then resolves against the lock's own folder, never exists, and a
    lock left by a killed process is never recognised as stale (the next writer spins forever).
    The open-file lock with an absolute path has neither problem."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    absolute = str(path.resolve())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-API warnings of the journal backend
        return JournalStorage(_Backend(absolute, lock_obj=JournalFileOpenLock(absolute)))


# --- One run per checkpoint --------------------------------------------------------------------

_run_locks: dict[str, int] = {}


def claim(path: Path) -> None:
    """Hold an exclusive lock on `<journal>.run.lock` for the rest of this process.

    A second process on the same checkpoint is refused with one sentence. The kernel releases the
    lock when the process ends, however it ends (kill -9 included), so it can never go stale. While
    it is held no other Heretic run writes this journal, so a journal write lock (`<journal>.lock`)
    found now was left by a killed process and is removed at once."""
    import fcntl

    key = str(Path(path).expanduser().resolve())
    if key in _run_locks:
        return
    lock_path = Path(key + ".run.lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise HereticError(_write_problem(Path(key), error)) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        raise HereticError(
            f"Another Heretic run is using the checkpoint {key}; wait for it to finish, stop it, or choose "
            "another --checkpoint-dir."
        ) from None
    _run_locks[key] = descriptor
    stale = Path(key + ".lock")
    if stale.exists() or stale.is_symlink():
        log.info("Removing the journal lock %s left by a killed run", stale)
        stale.unlink(missing_ok=True)


# --- Journal recovery --------------------------------------------------------------------------

SET_TRIAL_STATE = 6  # Optuna's journal op code for "set trial state and values"


def repair_journal(path: Path) -> str | None:
    """Recover a journal whose last line was cut short (what a crash or a full disk during a write
    leaves). Returns a one-line report when something was repaired, else None.

    The damaged file is moved aside untouched (`<name>.damaged-<time>.jsonl`) and its complete lines
    are written back atomically. Damage before the last line is not a crash's trace; it is refused
    with a sentence and nothing is changed."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data:
        return None
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    for number, line in enumerate(lines, 1):
        if _record(line) is None:
            bad.append(number)
        else:
            records.append(json.loads(line))
    if tail:
        bad.append(len(lines) + 1)
    if not bad:
        return None
    if bad != [len(lines) + (1 if tail else 0)]:
        raise HereticError(
            f"The checkpoint {path} is damaged at line {bad[0]} (not just its last line); move it away to start a "
            "new search, or restore it from a backup."
        )
    good = b"".join(line + b"\n" for line in lines if _record(line) is not None)
    if tail and _record(tail) is not None:  # complete, only its newline is missing
        good += tail + b"\n"
        records.append(json.loads(tail))
        dropped = 0
    else:
        dropped = 1
    aside = _replace_keeping_aside(path, good)
    trials = sum(
        1 for record in records if record.get("op_code") == SET_TRIAL_STATE and record.get("state") == TrialState.COMPLETE.value
    )
    return (
        f"The checkpoint {path.name} ended in a partial line (an interrupted write): recovered {trials} finished "
        f"trial{'s' if trials != 1 else ''}, dropped {dropped} incomplete log record{'s' if dropped != 1 else ''} "
        f"(the damaged file is kept as {aside.name})."
    )


def _replace_keeping_aside(path: Path, good: bytes) -> Path:
    """Write `good` over the journal atomically, keeping the damaged journal byte-identical beside it
    (`<name>.damaged-<time>.jsonl`, returned)."""
    aside = path.with_name(f"{path.stem}.damaged-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
    staging = path.with_name(f".{path.name}.repair-{os.getpid()}")
    try:
        with open(staging, "wb") as handle:
            handle.write(good)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(staging, 0o666 & ~_umask())
        try:
            os.link(path, aside)  # the damaged journal, byte-identical, under a new name
        except OSError:
            shutil.copy2(path, aside)
        os.replace(staging, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            staging.unlink(missing_ok=True)
        raise HereticError(
            f"The checkpoint {path} ends in a partial line, and it cannot be repaired ({error.strerror or error}); "
            "free some space or make its folder writable, then rerun."
        ) from None
    return aside


def _record(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) and "op_code" in value else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def prepare(path: Path) -> str | None:
    """Before a run opens its journal: claim the checkpoint, then recover a cut-short last line."""
    claim(path)
    return repair_journal(path)


def load_or_create(
    path: Path, study_fingerprint: str, settings_summary: dict[str, Any], directions: list[str] | None = None
) -> tuple[optuna.Study, bool]:
    """(study, existed). A file whose stored fingerprint differs is never mixed with this run.

    `directions`: the study's (default: minimize refusals and KL)."""
    repaired = prepare(path)
    if repaired:
        from ..ui import console

        console.print(f"[yellow]{repaired}[/]")
    existed = path.exists() and path.stat().st_size > 0
    try:
        storage = open_storage(path)
        study = optuna.create_study(
            study_name=STUDY_NAME, storage=storage, directions=directions or ["minimize", "minimize"], load_if_exists=True
        )
    except HereticError:
        raise
    except OSError as error:
        raise HereticError(_write_problem(path, error)) from None
    except Exception as error:  # noqa: BLE001 - a damaged journal
        raise HereticError(f"The checkpoint {path} cannot be read ({error}); move it away to start a new search.") from None
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", study_fingerprint)
        study.set_user_attr("settings", settings_summary)
    elif stored != study_fingerprint:
        raise HereticError(
            f"The checkpoint {path} was written with different settings; choose another --checkpoint-dir or move the file away."
        )
    return study, existed


def stored_batch_size(path: Path, study_fingerprint: str) -> int | None:
    """The batch size the trials of an existing search ran with, if there is such a search.

    In bf16 the batch composition changes rounding (and the odd greedy verdict), so a resumed search
    reuses it to score its remaining trials exactly as an uninterrupted run would have."""
    if not (path.exists() and path.stat().st_size > 0):
        return None
    claim(path)
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(path))
    except Exception:  # noqa: BLE001 - a damaged journal is reported when the search opens it
        return None
    if study.user_attrs.get("fingerprint") != study_fingerprint:
        return None
    value = study.user_attrs.get("batch_size")
    return value if isinstance(value, int) and value > 0 else None


def fail_stale_trials(study: optuna.Study) -> int:
    """Trials left RUNNING by a killed process are marked FAIL (they are re-sampled identically)."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # noqa: SLF001 - public storage API
    return len(stale)


def archive(path: Path) -> Path:
    """Move a checkpoint aside (restart): nothing is deleted."""
    target = path.with_name(f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}.old{path.suffix}")
    path.rename(target)
    return target
