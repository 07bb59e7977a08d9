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

_run_locks: dict[str, tuple[int, bool]] = {}  # journal -> (descriptor, no other holder when claimed)


def claim(path: Path, shared: bool = False) -> bool:
    """Hold a lock on `<journal>.run.lock` for the rest of this process; True when no other process held it.

    A single run (the default) holds it exclusively: a second process on the same checkpoint is
    refused with one sentence. Workers that share a search on purpose (--storage, --workers) hold it
    shared: they admit each other, and a single run refuses them (and they it). The kernel releases
    the lock when the process ends, however it ends (kill -9 included), so it can never go stale.
    A journal write lock (`<journal>.lock`) found while no other process holds the run lock was
    left by a killed process and is removed at once; with other holders alive it may be theirs, and
    Optuna's own grace period (30 s) recovers it if not."""
    import fcntl

    key = str(Path(path).expanduser().resolve())
    if key in _run_locks:
        return _run_locks[key][1] and not shared
    lock_path = Path(key + ".run.lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise HereticError(_write_problem(Path(key), error)) from None
    alone = _try_flock(descriptor, fcntl.LOCK_EX)
    if alone and shared:
        alone = _try_flock(descriptor, fcntl.LOCK_SH)  # converted: other workers may now join
    elif not alone and not (shared and _try_flock(descriptor, fcntl.LOCK_SH)):
        os.close(descriptor)
        raise HereticError(
            f"Another Heretic run is using the checkpoint {key}; wait for it to finish, stop it, or choose "
            "another --checkpoint-dir (workers that share a search on purpose all pass --storage)."
        ) from None
    _run_locks[key] = (descriptor, alone)
    stale = Path(key + ".lock")
    if alone and (stale.exists() or stale.is_symlink()):
        log.info("Removing the journal lock %s left by a killed run", stale)
        stale.unlink(missing_ok=True)
    return alone


def _try_flock(descriptor: int, mode: int) -> bool:
    import fcntl

    try:
        fcntl.flock(descriptor, mode | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


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


def prepare(path: Path, shared: bool = False) -> str | None:
    """Before a run opens its journal: claim the checkpoint, then recover a cut-short last line
    (only when no other worker holds it: a line another worker is appending looks cut short)."""
    alone = claim(path, shared)
    return repair_journal(path) if alone else None


def is_database(storage: str | Path) -> bool:
    """A database URL (postgresql://..., sqlite:///...) rather than a journal file path."""
    return "://" in str(storage)


def redacted(url: str) -> str:
    """The URL with its password hidden (for messages and logs)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can read: show only its scheme
        return url.split("://", 1)[0] + "://..."


def with_driver(url: str) -> str:
    """A postgresql:// URL names the driver SQLAlchemy would pick (psycopg2); when only psycopg 3 (the
    one `heretic[postgres]` installs) is there, name it instead."""
    import importlib.util

    scheme, rest = url.split("://", 1)
    postgres = scheme in ("postgresql", "postgres")
    if postgres and importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
        return f"postgresql+psycopg://{rest}"
    return url


def open_database(url: str, heartbeat_interval: int) -> optuna.storages.RDBStorage:
    """The database at `url`, with Optuna's heartbeat: a trial whose worker misses two heartbeats is
    failed by the next worker that looks and queued again with the same parameters (retried 3 times)."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = with_driver(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-API warnings of the heartbeat
        try:
            return _retrying(
                lambda: RDBStorage(
                    url,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=2 * heartbeat_interval,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                    engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
                )
            )
        except ImportError as error:
            raise HereticError(
                f"The storage {redacted(url)} needs the database driver {error.name or error}; install it "
                "(for PostgreSQL: pip install 'heretic[postgres]')."
            ) from None
        except Exception as error:  # noqa: BLE001 - a server that cannot be reached, a refused login
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise HereticError(
                f"Cannot open the storage {redacted(url)} ({reason}); check the URL and that the server runs."
            ) from None


def _retrying(make: Any, attempts: int = 5) -> Any:
    """`make()`, tried again after a second when it fails: workers started at the same moment on a fresh
    database race to create Optuna's tables, and all but one fail once."""
    for attempt in range(attempts):
        try:
            return make()
        except ImportError:
            raise
        except Exception:  # noqa: BLE001 - the race above; a real failure fails every attempt
            if attempt == attempts - 1:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


def find_study(
    path: Path | str, study_fingerprint: str, *, study_name: str = STUDY_NAME, shared: bool = False, heartbeat_interval: int = 30
) -> optuna.Study | None:
    """The existing study of these settings in the storage, or None (nothing is created)."""
    if is_database(path):
        storage: optuna.storages.BaseStorage = open_database(str(path), heartbeat_interval)
    else:
        path = Path(path)
        if not (path.exists() and path.stat().st_size > 0):
            return None
        claim(path, shared)
        try:
            storage = open_storage(path)
        except Exception:  # noqa: BLE001 - a damaged journal is reported when the search opens it
            return None
    try:
        if study_name not in optuna.get_all_study_names(storage):
            return None
        study = optuna.load_study(study_name=study_name, storage=storage)
    except Exception:  # noqa: BLE001 - a damaged journal is reported when the search opens it
        return None
    return study if study.user_attrs.get("fingerprint") == study_fingerprint else None


def load_or_create(
    path: Path | str,
    study_fingerprint: str,
    settings_summary: dict[str, Any],
    *,
    study_name: str = STUDY_NAME,
    shared: bool = False,
    heartbeat_interval: int = 30,
    objectives: dict[str, str] | None = None,
) -> tuple[optuna.Study, bool]:
    """(study, existed). A study whose stored fingerprint differs is never mixed with this run.

    `path` is a journal file (claimed and repaired first) or a database URL; `shared`: other workers
    may use the same storage at the same time; `objectives`: the further optimized objectives' names and
    directions, after refusals and KL (both minimized)."""
    where = redacted(str(path)) if is_database(path) else str(path)
    if is_database(path):
        storage: optuna.storages.BaseStorage = open_database(str(path), heartbeat_interval)
    else:
        path = Path(path)
        repaired = prepare(path, shared)
        if repaired:
            from ..ui import console

            console.print(f"[yellow]{repaired}[/]")
        storage = _open_journal(path)
    try:
        existed = study_name in optuna.get_all_study_names(storage)
        if not existed and study_name != STUDY_NAME:
            refuse_other_settings(storage, study_name, settings_summary, where)
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            directions=["minimize", "minimize", *(objectives or {}).values()],
            load_if_exists=True,
        )
    except HereticError:
        raise
    except OSError as error:
        raise HereticError(_write_problem(Path(where), error)) from None
    except Exception as error:  # noqa: BLE001 - a damaged journal, a database that fails
        raise HereticError(f"The checkpoint {where} cannot be read ({error}); move it away to start a new search.") from None
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental API: names the objectives in optuna-dashboard
            study.set_metric_names(["refusals", "KL (as the sampler sees it)", *(objectives or {})])
        study.set_user_attr("fingerprint", study_fingerprint)
        study.set_user_attr("settings", settings_summary)
    elif stored != study_fingerprint:
        raise HereticError(
            f"The checkpoint {where} was written with different settings; choose another --checkpoint-dir or move the file away."
        )
    return study, existed


def _open_journal(path: Path) -> JournalStorage:
    try:
        return open_storage(path)
    except OSError as error:
        raise HereticError(_write_problem(path, error)) from None


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def study_name_for(model_name: str, study_fingerprint: str) -> str:
    """The study's name in a shared storage: the model and the settings' fingerprint."""
    return checkpoint_path(".", model_name, study_fingerprint).stem


def refuse_other_settings(storage: optuna.storages.BaseStorage, study_name: str, summary: dict[str, Any], where: str) -> None:
    """Refuse a worker whose settings differ from those of an unfinished search of the same model in
    this storage: it would start a second search instead of joining the first."""
    model = study_name.rsplit("-", 1)[0]
    for other in optuna.get_all_study_summaries(storage, include_best_trial=False):
        attrs = other.user_attrs
        if other.study_name == study_name or other.study_name.rsplit("-", 1)[0] != model or "fingerprint" not in attrs:
            continue
        trials = optuna.load_study(study_name=other.study_name, storage=storage).get_trials(
            deepcopy=False, states=(TrialState.COMPLETE,)
        )
        if len(trials) >= int(attrs.get("target_trials", 0)):
            continue
        theirs = attrs.get("settings", {})
        differing = sorted(key for key in set(theirs) | set(summary) if _text(theirs.get(key)) != _text(summary.get(key)))
        raise HereticError(
            f"The storage {where} holds an unfinished search of this model ({other.study_name}) with other settings "
            f"({', '.join(differing) or 'the search space'}); start this worker with the same settings, or delete that study "
            f"(optuna delete-study --storage URL --study-name {other.study_name}) to start a new search."
        )


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
