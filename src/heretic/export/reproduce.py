"""`heretic --reproduce heretic.json`: rebuild a saved model's weights from its record, without a search."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from rich.table import Table

from .. import __version__
from ..ablation.parameters import AblationParameters
from ..config import MERGED_SETTINGS, RETIRED_ABLATIONS, RETIRED_SETTINGS, Role, Settings, fields_with, plain, variant_settings
from ..demo import DEMO_NAME, demo_model_file, sha256_file
from ..errors import HereticError
from ..model.architecture import build_architecture_map
from ..prompts import prompt_set_title, prompts_digest
from ..search.records import RECORD_FILE, hub_repo, locate_record, read_record
from ..session import (
    FALLBACK_BATCH_SIZE,
    collect_residuals,
    compute_directions,
    load,
    load_prompt_sets,
    make_ablator,
    make_engine,
)
from ..ui import console
from . import card, record
from .provenance import original_card
from .save import save_adapter, save_merged
from .tolerance import Difference, compare_files


def environment_mismatches(recorded: dict[str, Any], current: dict[str, Any], tool: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    if tool.get("version") != __version__:
        rows.append(("heretic", str(tool.get("version")), __version__))
    for key in ("python", "device", "torch_threads"):
        if recorded.get(key) != current.get(key):
            rows.append((key, str(recorded.get(key)), str(current.get(key))))
    for name, version in recorded.get("libraries", {}).items():
        if current["libraries"].get(name) != version:
            rows.append((name, str(version), str(current["libraries"].get(name))))
    return rows


def print_environment(data: dict[str, Any]) -> None:
    """Whether this environment is the recorded one, with a table of the differences."""
    mismatches = environment_mismatches(data["environment"], record.environment(), data["tool"])
    if not mismatches:
        console.print("Environment matches the record.")
        return
    table = Table(title="Environment differs from the record (weights may differ slightly)", title_justify="left")
    for column in ("what", "recorded", "now"):
        table.add_column(column)
    for row in mismatches:
        table.add_row(*row)
    console.print(table)


def rebuilt_settings(settings: Settings, data: dict[str, Any]) -> Settings:
    """The recorded settings, with the `override` settings given on this command line, and no action."""
    explicit = settings.model_fields_set
    recorded = dict(data["settings"])
    for key in fields_with(Role.override):
        if key in explicit:
            recorded[key] = getattr(settings, key)
    recorded.update(reproduce=None, evaluate_model=None, demo=False, action=[])
    for name, merged in MERGED_SETTINGS.items():  # records written before the setting was merged into another
        if recorded.get(name):
            recorded[merged] = recorded[name]
        recorded.pop(name, None)
    for name in RETIRED_ABLATIONS:  # another value made an ablation this version does not have
        if recorded.get(name, RETIRED_SETTINGS[name]) != RETIRED_SETTINGS[name]:
            flag, version = "--" + name.replace("_", "-"), data.get("tool", {}).get("version", "that made it")
            raise HereticError(
                f"The record's model was made with {flag} {json.dumps(recorded[name])}, which heretic {__version__} no "
                f"longer has; rebuild it with heretic {version}."
            )
    for name in RETIRED_SETTINGS:  # the others shaped the search, not the recorded trial's ablation
        recorded.pop(name, None)
    for name, earlier in variant_settings().items():  # records written before a setting existed: what searches then had
        recorded.setdefault(name, plain(earlier))
    if "dtypes" not in explicit and data["model"].get("dtype"):
        recorded["dtypes"] = [data["model"]["dtype"]]  # the dtype the trial was computed in, not a new measurement
    try:
        checked = Settings.model_validate(recorded)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise HereticError(
            f"The reproduction record's setting {where!r} is invalid ({first['msg']}); use the heretic.json saved with the model."
        ) from None
    return checked.model_copy(update={"model": recorded_model(settings, data)})


def recorded_model(settings: Settings, data: dict[str, Any]) -> str:
    """The model to rebuild from: --model when given, else the recorded Hub model, else the demo's file."""
    if "model" in settings.model_fields_set and settings.model:
        return settings.model
    model = data["model"]
    if model.get("kind") == "hub":
        return str(model.get("hub_id") or model["name"])
    if model.get("file") == DEMO_NAME:
        return str(demo_model_file(settings.cache_dir))
    for old in (model.get("gguf_file"), model.get("name")):  # records of earlier versions held the local path
        if old and Path(old).expanduser().exists():
            return str(old)
    where = f"the file {model['file']}" if model.get("file") else "a local folder"
    raise HereticError(f"The record's model {model['name']} was loaded from {where}; give your copy with --model PATH.")


def print_prompts_check(prompt_sets: dict[str, list[Any]], data: dict[str, Any]) -> None:
    for name, prompts in prompt_sets.items():
        if prompts_digest(prompts) != data["prompt_sets"][name]["sha256"]:
            console.print(f"[yellow]The {prompt_set_title(name)} prompts differ from the recorded ones (content hash).[/]")


def print_directions_check(directions: torch.Tensor, data: dict[str, Any]) -> None:
    if record.tensor_digest(directions) == data["directions_sha256"]:
        console.print("Refusal directions match the record.")
        return
    console.print(
        "[yellow]Refusal directions differ from the record's hash (in the last bits on another CPU, BLAS or GPU; "
        "the weights are compared below).[/]"
    )


def reproduce(settings: Settings) -> Path:
    """Rebuild the recorded trial's model: same settings, prompts and directions (each checked), no search;
    then check the weight files against the record's SHA-256."""
    spec = str(settings.reproduce)
    record_file = locate_record(spec)  # downloaded once when it is on the Hub
    data = read_record(str(record_file))
    print_environment(data)
    rebuilt = rebuilt_settings(settings, data)

    loaded = load(rebuilt)
    arch = build_architecture_map(loaded.model)
    prompt_sets = load_prompt_sets(rebuilt)
    print_prompts_check(prompt_sets, data)
    engine = make_engine(rebuilt, loaded, int(data.get("batch_size") or FALLBACK_BATCH_SIZE))
    engine.response_prefix = data.get("response_prefix", "")
    residuals = collect_residuals(rebuilt, engine, loaded, prompt_sets)
    directions = compute_directions(rebuilt, engine, loaded, prompt_sets, residuals)
    print_directions_check(directions, data)
    ablator = make_ablator(rebuilt, loaded, arch)
    parameters = AblationParameters.from_dict(data["trial"]["parameters"])
    output = Path(rebuilt.output_dir or f"{loaded.source.display_name}-heretic-reproduced")
    new_record = dict(data, environment=record.environment(), directions_sha256=record.tensor_digest(directions))
    kind = data.get("saved", {}).get("kind", "merged")
    original = original_card(loaded.source)

    def files(weights: dict[str, dict[str, Any]]) -> dict[str, str]:
        saved = dict(new_record, saved={"kind": kind, "weights": weights})
        return {"README.md": card.render_card(saved, original), RECORD_FILE: record.dumps(saved)}

    started = time.perf_counter()
    if kind == "adapter":
        base_name = str(data["model"].get("hub_id") or data["model"]["name"])
        path = save_adapter(
            loaded,
            ablator,
            parameters,
            directions,
            output,
            base_model_name=base_name,
            overwrite=rebuilt.overwrite,
            extra_files=files,
        )
    else:
        path = save_merged(
            loaded,
            ablator,
            parameters,
            directions,
            output,
            max_shard_size=rebuilt.max_shard_size,
            dtype=rebuilt.save_dtype,
            overwrite=rebuilt.overwrite,
            extra_files=files,
        )
    console.print(
        f"Rebuilt trial {data['trial']['number']} into [bold]{path.resolve()}[/] ({time.perf_counter() - started:.1f} s)"
    )
    check_weights(data, path, settings.ignore_mismatches, lambda name, entry: recorded_copy(spec, record_file, name, entry))
    return path


def weight_mismatches(recorded: dict[str, Any], rebuilt: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(file, recorded, rebuilt) for each weight file whose SHA-256 or size differs, or that one side lacks."""
    rows = []
    for name in sorted(recorded.keys() | rebuilt.keys()):
        old, new = recorded.get(name), rebuilt.get(name)
        if old is None or new is None or old.get("sha256") != new["sha256"] or old.get("size") != new["size"]:
            rows.append((name, _describe_file(old), _describe_file(new)))
    return rows


def _describe_file(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "missing"
    return f"{int(entry.get('size', 0)):,} bytes, sha256 {str(entry.get('sha256', ''))[:16]}..."


def recorded_copy(spec: str, record_file: Path, name: str, entry: dict[str, Any]) -> Path | None:
    """The recorded weight file `name`, as the record lists it (its SHA-256 checked): beside the record, or
    downloaded from the Hub repository `spec` names; None when neither has it."""
    beside = record_file.parent / name
    if beside.is_file() and sha256_file(beside) == entry.get("sha256"):
        return beside
    repo = hub_repo(spec) if not Path(spec).expanduser().exists() else None
    if repo is None:
        return None
    from huggingface_hub import hf_hub_download

    console.print(f"Downloading the recorded {name} from {repo[0]} to compare it value by value...")
    try:
        downloaded = Path(hf_hub_download(repo[0], name, revision=repo[1]))
    except Exception:  # noqa: BLE001 - offline or missing: compared by hash only, said below
        return None
    return downloaded if sha256_file(downloaded) == entry.get("sha256") else None


def compare_mismatches(
    mismatches: list[tuple[str, str, str]],
    recorded: dict[str, Any],
    folder: Path,
    locate: Callable[[str, dict[str, Any]], Path | None],
) -> tuple[list[Difference], list[str]]:
    """(the files compared value by value, or that one side lacks; the files whose recorded copy is not at hand)."""
    differences: list[Difference] = []
    uncompared: list[str] = []
    for name, old, new in mismatches:
        if name not in recorded or not (folder / name).is_file():  # a file one side lacks: no tolerance covers it
            missing = "missing in the rebuild" if name in recorded else "not in the record"
            differences.append(Difference(name, float("inf"), float("inf"), 0, 0, missing))
        elif (copy := locate(name, recorded[name])) is None:
            uncompared.append(f"{name}: recorded {old}, rebuilt {new}")
        else:
            differences.append(compare_files(copy, folder / name))
    return differences, uncompared


def print_mismatches(mismatches: list[tuple[str, str, str]], differences: list[Difference]) -> None:
    table = Table(title="Weight files that differ from the record", title_justify="left")
    for column in ("file", "recorded", "rebuilt", "values"):
        table.add_column(column)
    described = {difference.name.split(" ")[0]: difference for difference in differences}
    for name, old, new in mismatches:
        difference = described.get(name)
        values = "not compared" if difference is None else ("within tolerance" if difference.within else difference.describe())
        table.add_row(name, old, new, values)
    console.print(table)


def check_weights(
    data: dict[str, Any],
    folder: Path,
    ignore_mismatches: bool,
    locate: Callable[[str, dict[str, Any]], Path | None] = lambda name, entry: None,
) -> None:
    """Compare the rebuilt weight files with the record's: equal SHA-256, or else equal value by value within
    the rounding of another CPU, BLAS or GPU (`tolerance.compare_files`, against the recorded copy that
    `locate` finds); any other difference is an error unless ignored."""
    recorded = data.get("saved", {}).get("weights")
    if not isinstance(recorded, dict) or not recorded:
        console.print("[yellow]The record holds no weight hashes (an older record); the rebuilt weights are not checked.[/]")
        return
    mismatches = weight_mismatches(recorded, record.weight_digests(folder))
    if not mismatches:
        console.print(f"All {len(recorded)} weight files match the record (SHA-256).")
        return
    differences, uncompared = compare_mismatches(mismatches, recorded, folder, locate)
    apart = [difference for difference in differences if not difference.within]
    if not apart and not uncompared:
        worst = max(differences, key=lambda difference: difference.worst_ratio)
        console.print(
            f"All {len(recorded)} weight files match the record: {len(mismatches)} by value within tolerance, not by "
            f"SHA-256 (rounding of another CPU, BLAS or GPU); worst {worst.describe()}."
        )
        return
    print_mismatches(mismatches, differences)
    if apart:
        first = apart[0]
        message = f"{len(apart)} of the rebuilt weight files differ from the record beyond rounding ({first.describe()})"
    else:
        message = (
            f"{len(uncompared)} of the rebuilt weight files differ from the record's SHA-256 ({uncompared[0]}) and the recorded "
            "files are not beside the record to compare them value by value (another CPU, BLAS or GPU changes the last bits)"
        )
    message += f"; the rebuild stays in {folder}"
    if not ignore_mismatches:
        hint = "put heretic.json beside its weight files to compare them, or " if not apart else ""
        raise HereticError(f"{message}; {hint}pass --ignore-mismatches to accept it.")
    console.print(f"[yellow]{message} (accepted: --ignore-mismatches).[/]")
