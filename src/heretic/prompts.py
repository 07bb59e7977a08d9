"""Prompt sets: load prompts from the bundled sets, the Hub, `datasets` folders and local files."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .config import PromptSet
from .errors import HereticError, first_line

# The prompt sets shipped in heretic/data/prompts (one prompt per line).
BUNDLED_SETS = tuple(
    sorted(
        item.name.removesuffix(".txt")
        for item in resources.files("heretic").joinpath("data", "prompts").iterdir()
        if item.name.endswith(".txt")
    )
)
TABLE_SUFFIXES = {".csv", ".json", ".jsonl", ".parquet"}
# Columns tried, in order, when a table or dataset has several and none was named.
LIKELY_COLUMNS = ("prompt", "text", "instruction", "goal", "question", "query", "input")

_SLICE = re.compile(r"^\[\s*(?P<start>-?\d+%?)?\s*:\s*(?P<stop>-?\d+%?)?\s*\]$")
# Control characters other than tab and newline: a binary file, or a terminal escape pasted by mistake.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPLIT = re.compile(r"^(?P<name>[A-Za-z_][\w.-]*)?(?P<slice>\[.*\])?$")


def prompt_set_title(name: str) -> str:
    """How a prompt set's name ("harmful_eval") is written for people ("harmful eval")."""
    return name.replace("_", " ")


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str


def parse_split(split: str | None) -> tuple[str | None, slice]:
    """'train[:400]' -> ('train', slice(None, 400)); '[10:20]' -> (None, slice(10, 20)); percentages allowed."""
    if not split:
        return None, slice(None)
    match = _SPLIT.match(split.strip())
    if not match:
        raise HereticError(f'Cannot read the split {split!r}; write it like "train", "train[:400]" or "[100:200]".')
    name, slice_text = match.group("name"), match.group("slice")
    if not slice_text:
        return name, slice(None)
    bounds = _SLICE.match(slice_text)
    if not bounds:
        raise HereticError(
            f"Cannot read the slice {slice_text!r} of split {split!r}; use [start:stop] with whole numbers or percentages."
        )
    return name, slice(bounds.group("start"), bounds.group("stop"))


def apply_slice(items: list[str], bounds: slice, label: str) -> list[str]:
    def resolve(value: str | None) -> int | None:
        if value is None:
            return None
        if value.endswith("%"):
            return round(len(items) * int(value[:-1]) / 100)
        return int(value)

    return items[resolve(bounds.start) : resolve(bounds.stop)]


def load_prompt_texts(spec: PromptSet) -> list[str]:
    """The raw prompt strings of a set (sliced, not yet dressed with prefix/suffix)."""
    split_name, bounds = parse_split(spec.split)
    label = spec.label()
    source = spec.source
    if source == "bundled":
        texts = _load_bundled(split_name, label)
    elif source.startswith("bundled:"):
        raise HereticError(f"Cannot read the prompt set {source!r}; write a bundled set like bundled:harmful_train[:400].")
    else:
        path = Path(source).expanduser()
        if path.is_file():
            if split_name:
                raise HereticError(
                    f"The prompt file {source} has no splits; remove {split_name!r} and keep only a slice like [:400]."
                )
            texts = _load_file(path, spec.column)
        elif path.is_dir():
            texts = _load_folder(path, split_name, spec.column, label)
        elif _looks_like_path(source):
            raise HereticError(f"The prompt file or folder {source} does not exist; check the path of prompt set {label}.")
        else:
            texts = _load_hub(source, split_name, spec.column, spec.revision, label)
    texts = apply_slice(texts, bounds, label)
    texts = [text.strip() for text in texts if isinstance(text, str) and text.strip()]
    if not texts:
        raise HereticError(f"The prompt set {label} is empty; check its source, split and slice.")
    for number, text in enumerate(texts, 1):
        if _CONTROL.search(text):
            raise HereticError(
                f"The prompt set {label} holds control characters (prompt {number}: {text[:40]!r}); remove them, "
                "or check that the file is text."
            )
    return texts


def load_prompts(spec: PromptSet, default_system_prompt: str) -> list[Prompt]:
    system = spec.system_prompt if spec.system_prompt is not None else default_system_prompt
    texts = load_prompt_texts(spec)
    return [Prompt(system=system, user=" ".join(part for part in (spec.prefix, text, spec.suffix) if part)) for text in texts]


def prompts_digest(prompts: list[Prompt]) -> str:
    """A content hash of a prompt set, recorded for reproducibility."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps([prompt.system, prompt.user], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix.lower() in TABLE_SUFFIXES | {".txt"} or source.count("/") > 1


def _load_bundled(name: str | None, label: str) -> list[str]:
    if name not in BUNDLED_SETS:
        raise HereticError(f"There is no bundled prompt set {name!r} (in {label}); use one of {', '.join(BUNDLED_SETS)}.")
    text = resources.files("heretic").joinpath("data", "prompts", f"{name}.txt").read_text(encoding="utf-8")
    return text.splitlines()


def _load_file(path: Path, column: str | None) -> list[str]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt" or suffix not in TABLE_SUFFIXES:
            return path.read_text(encoding="utf-8").splitlines()
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                rows: list[dict[str, Any]] = list(csv.DictReader(handle))
            return _column(rows, list(rows[0].keys()) if rows else [], column, str(path))
        if suffix == ".jsonl":
            return _rows_or_strings(_read_jsonl(path), column, str(path))
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and all(isinstance(value, list) for value in data.values()):
                return _column_of_mapping(data, column, str(path))
            if isinstance(data, list):
                return _rows_or_strings(data, column, str(path))
            raise HereticError(f"{path} must hold a list of prompts, a list of objects, or an object of columns.")
        import pyarrow
        import pyarrow.parquet as parquet

        try:
            table = parquet.read_table(path)
        except (pyarrow.ArrowException, OSError) as error:
            raise HereticError(
                f"{path} is not a Parquet file this can read ({first_line(error)}); check the file or convert it to .jsonl."
            ) from None
        return _column_of_mapping(table.to_pydict(), column, str(path))
    except UnicodeDecodeError:
        raise HereticError(f"{path} is not UTF-8 text; save it as UTF-8.") from None
    except json.JSONDecodeError as error:
        raise HereticError(f"{path} is not valid JSON (line {error.lineno}: {error.msg}).") from None
    except csv.Error as error:
        raise HereticError(f"{path} is not valid CSV ({error}).") from None


def _read_jsonl(path: Path) -> list[Any]:
    """The values of a JSON Lines file, one per non-blank line; a bad line is named by its line in the file.

    Lines end at newlines only: JSON strings may hold other line separators (U+2028) unescaped."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise HereticError(
                f"{path} is not valid JSON Lines (line {number}: {error.msg}); write one JSON value per line."
            ) from None
    return rows


def _rows_or_strings(rows: list[Any], column: str | None, where: str) -> list[str]:
    if all(isinstance(row, str) for row in rows):
        return rows
    if not all(isinstance(row, dict) for row in rows):
        raise HereticError(f"{where} mixes prompts and objects; use one prompt string or one object per entry.")
    return _column(rows, list(rows[0].keys()) if rows else [], column, where)


def _column(rows: list[dict[str, Any]], columns: list[str], column: str | None, where: str) -> list[str]:
    name = _pick_column(columns, column, where)
    return [str(row.get(name) or "") for row in rows]


def _column_of_mapping(data: dict[str, list[Any]], column: str | None, where: str) -> list[str]:
    name = _pick_column(list(data.keys()), column, where)
    return [str(value) if value is not None else "" for value in data[name]]


def _pick_column(columns: list[str], column: str | None, where: str) -> str:
    if column is not None:
        if column not in columns:
            raise HereticError(f"{where} has no column {column!r}; its columns are: {', '.join(columns) or 'none'}.")
        return column
    if len(columns) == 1:
        return columns[0]
    for name in LIKELY_COLUMNS:
        if name in columns:
            return name
    raise HereticError(f"{where} has several columns ({', '.join(columns)}); name the prompt column with `column`.")


def _load_folder(path: Path, split: str | None, column: str | None, label: str) -> list[str]:
    import datasets

    try:
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(str(path), split=split or "train")
    except (FileNotFoundError, ValueError) as error:
        raise HereticError(f"Cannot read the dataset folder {path} ({first_line(error, 200)}).") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded.keys())
        if split is None:
            if len(names) != 1:
                raise HereticError(f"The dataset folder {path} has splits {', '.join(names)}; name one, e.g. {path}:{names[0]}.")
            split = names[0]
        if split not in loaded:
            raise HereticError(f"The dataset folder {path} has no split {split!r}; it has {', '.join(names)}.")
        loaded = loaded[split]
    return _column_of_mapping({name: loaded[name] for name in loaded.column_names}, column, f"Dataset {label}")


def _load_hub(dataset_id: str, split: str | None, column: str | None, revision: str | None, label: str) -> list[str]:
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id, split=split or "train", revision=revision)
    except Exception as error:  # noqa: BLE001 - datasets raises many types; all mean "cannot get it"
        raise HereticError(
            f"Cannot load the dataset {dataset_id!r} from the Hugging Face Hub ({first_line(error, 200)}); "
            "check the id and your connection, or use a local file."
        ) from None
    return _column_of_mapping({name: loaded[name] for name in loaded.column_names}, column, f"Dataset {label}")
