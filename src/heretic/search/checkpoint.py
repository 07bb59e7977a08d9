"""Search checkpoints: one Optuna journal file per model and study-relevant settings."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
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


def open_storage(path: Path) -> JournalStorage:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-API warnings of the journal backend
        return JournalStorage(JournalFileBackend(str(path)))


def load_or_create(path: Path, study_fingerprint: str, settings_summary: dict[str, Any]) -> tuple[optuna.Study, bool]:
    """(study, existed). A file whose stored fingerprint differs is never mixed with this run."""
    existed = path.exists() and path.stat().st_size > 0
    try:
        storage = open_storage(path)
    except Exception as error:  # noqa: BLE001 - a damaged journal
        raise HereticError(
            f"The checkpoint {path} cannot be read ({error}); move it away to start a new search."
        ) from None
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=storage, directions=["minimize", "minimize"], load_if_exists=True
    )
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", study_fingerprint)
        study.set_user_attr("settings", settings_summary)
    elif stored != study_fingerprint:
        raise HereticError(
            f"The checkpoint {path} was written with different settings; choose another --checkpoint-dir "
            "or move the file away."
        )
    return study, existed


def stored_batch_size(path: Path, study_fingerprint: str) -> int | None:
    """The batch size the trials of an existing search ran with, if there is such a search.

    In bf16 the batch composition changes rounding (and the odd greedy verdict), so a resumed search
    reuses it to score its remaining trials exactly as an uninterrupted run would have."""
    if not (path.exists() and path.stat().st_size > 0):
        return None
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
