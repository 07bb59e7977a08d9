"""Reproduction records (heretic.json, saved beside every model): finding one (a path, a folder, a Hugging Face
repository or URL), reading it and checking that it holds what a rebuild or a warm start reads."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..ablation.parameters import AblationParameters
from ..errors import HereticError, first_line

RECORD_FILE = "heretic.json"
RECORD_VERSION = 1

# huggingface.co/<owner>/<name>[/blob|resolve|tree/<revision>[/...]]
HUB_URL = re.compile(
    r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/(?!datasets/|spaces/)([\w.-]+/[\w.-]+)(?:/(?:blob|resolve|tree)/([^/]+))?"
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_repo(text: str) -> tuple[str, str | None] | None:
    """(repository id, revision or None) of a Hub URL or a bare `owner/name` id; None for anything else."""
    match = HUB_URL.match(text.strip())
    if match:
        return match.group(1), match.group(2)
    if HUB_ID.match(text.strip()) and not Path(text).expanduser().exists():
        return text.strip(), None
    return None


def read_record(path: str) -> dict[str, Any]:
    """The record at `path` (see locate_record), checked: one sentence for a missing, invalid or damaged one."""
    file = locate_record(path)
    if not file.is_file():
        raise HereticError(f"The reproduction record {file} does not exist; it is the heretic.json saved beside a model.")
    try:
        data: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise HereticError(f"{file} is not valid JSON (line {error.lineno}: {error.msg}).") from None
    if not isinstance(data, dict) or data.get("record_version") != RECORD_VERSION or "trial" not in data:
        raise HereticError(f"{file} is not a Heretic reproduction record this version can read.")
    problem = record_problem(data)
    if problem:
        raise HereticError(f"The reproduction record {file} is damaged: {problem}; use the heretic.json saved with the model.")
    return data


def locate_record(spec: str) -> Path:
    """The record's local path: `spec` itself, the heretic.json in a folder, or one downloaded from a Hub repository."""
    file = Path(spec).expanduser()
    if file.exists():
        return file / RECORD_FILE if file.is_dir() else file
    repo = hub_repo(spec)
    if repo is None or (file.suffix == ".json" and not spec.startswith(("http://", "https://"))):
        return file  # a path that does not exist (a repository id never ends in .json)
    repo_id, revision = repo
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, RECORD_FILE, revision=revision))
    except Exception as error:  # noqa: BLE001 - offline, missing repository or file: all end the same way
        raise HereticError(
            f"Could not download heretic.json from the Hugging Face repository {repo_id} ({first_line(error, 160)}); "
            "check the name, or download the file and give its path."
        ) from None


# (path of a field, the types it may have); the fields reproduce() reads.
RECORD_FIELDS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("tool", (dict,)),
    ("tool.version", (str,)),
    ("environment", (dict,)),
    ("environment.libraries", (dict,)),
    ("model", (dict,)),
    ("settings", (dict,)),
    ("prompt_sets", (dict,)),
    *((f"prompt_sets.{name}.sha256", (str,)) for name in ("harmful", "harmless", "harmful_eval", "harmless_eval")),
    ("directions_sha256", (str,)),
    ("trial", (dict,)),
    ("trial.number", (int,)),
    ("trial.parameters", (dict,)),
    ("trial.parameters.direction_scope", (str,)),
    ("trial.parameters.direction_index", (int, float)),
    ("trial.parameters.kernels", (dict,)),
)


def record_problem(data: dict[str, Any]) -> str | None:
    """What is missing or of the wrong type in a record, in words; None when it is complete."""
    for field, types in RECORD_FIELDS:
        value: Any = data
        for part in field.split("."):
            if not isinstance(value, dict) or part not in value:
                return f"the field {field!r} is missing"
            value = value[part]
        if not isinstance(value, types) or isinstance(value, bool):
            expected = " or ".join(kind.__name__ for kind in types).replace("dict", "object").replace("str", "text")
            return f"the field {field!r} should be {expected}, not {type(value).__name__} {json.dumps(value)[:40]}"
    for name, kernel in data["trial"]["parameters"]["kernels"].items():
        for key in ("max_weight", "max_weight_position", "min_weight", "min_weight_distance"):
            value = kernel.get(key) if isinstance(kernel, dict) else None
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return f"the field 'trial.parameters.kernels.{name}.{key}' should be a number"
    try:
        AblationParameters.from_dict(data["trial"]["parameters"])
    except (TypeError, ValueError, KeyError) as error:
        return f"the trial's parameters cannot be read ({error})"
    return None
