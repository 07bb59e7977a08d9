"""Saving results: merged model and adapter folders, written atomically, never overwriting by accident."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..ablation.adapters import Ablator
from ..ablation.parameters import AblationParameters
from ..errors import HereticError, write_failure
from ..model.hardware import dtype_name
from ..model.loading import DTYPES, LoadedModel
from .record import weight_digests

# Asked when the target exists and is not empty: returns True to replace it.
ConfirmFn = Callable[[Path], bool]
# Files written beside the weights: fixed texts, or made from the weight files' digests (name -> sha256, size).
ExtraFiles = dict[str, str] | Callable[[dict[str, dict[str, Any]]], dict[str, str]]


def is_nonempty(path: Path) -> bool:
    if path.is_dir():
        return any(path.iterdir())
    return path.exists()


@contextmanager
def atomic_folder(
    target: Path, overwrite: bool, confirm: ConfirmFn | None = None, what: str = "the folder", option: str = "--output-dir"
) -> Iterator[Path]:
    """Yield a staging folder beside `target`; on success it replaces `target` in one rename.

    An interrupted or failed write leaves `target` untouched (the staging folder is removed); a
    failure of the operating system (full disk, read-only place) becomes one sentence naming `what`
    was written where, and `option`. An existing non-empty target is replaced only with `overwrite`
    or when `confirm` says yes. Saved files get the ordinary permissions of the user's umask.
    """
    target = target.expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise HereticError(f"{target} is a file, not a folder; choose another folder with {option}.")
    if is_nonempty(target) and not overwrite and not (confirm is not None and confirm(target)):
        raise HereticError(f"{target} already exists and is not empty; choose another folder or pass --overwrite.")
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{int(time.time())}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as error:
        raise (write_failure(error, target, what, option) or error) from None
    try:
        yield staging
        ordinary_permissions(staging)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        failure = write_failure(error, target, what, option) if isinstance(error, Exception) else None
        if failure is not None:
            raise failure from None
        raise
    previous = None
    try:
        if target.exists():
            previous = target.parent / f".{target.name}.previous-{os.getpid()}"
            os.replace(target, previous)
        os.replace(staging, target)
    except OSError as error:
        if previous is not None and not target.exists():
            os.replace(previous, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise (write_failure(error, target, what, option) or error) from None
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True) if previous.is_dir() else previous.unlink(missing_ok=True)


def ordinary_permissions(folder: Path) -> None:
    """Files 0666 and folders 0777, less the umask (some writers create files 0600: a serving process
    running as another user could not read the weights)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def save_merged(
    loaded: LoadedModel,
    ablator: Ablator,
    parameters: AblationParameters,
    directions: torch.Tensor,
    target: Path,
    *,
    max_shard_size: str = "5GB",
    dtype: str = "original",
    overwrite: bool = False,
    confirm: ConfirmFn | None = None,
    extra_files: ExtraFiles | None = None,
) -> Path:
    """The ablation merged into the weights: a plain transformers model folder (config, generation
    config, tokenizer, chat template, processor) with no trace of Heretic in its code.

    Written in `dtype`: "original" is the model's own dtype, whatever dtype it was computed in."""
    if loaded.model.config.to_dict().get("quantization_config") and not loaded.source.kind == "gguf":
        raise HereticError("A quantized model cannot be merged and saved; load it without --quantization to save it.")
    storage = storage_dtype(loaded, dtype)
    state = {
        name: tensor.to(storage) if tensor.is_floating_point() else tensor
        for name, tensor in ablator.merged_state_dict(parameters, directions).items()
    }
    with atomic_folder(target, overwrite, confirm, what="the merged model") as staging:
        model = ablator.base_model
        model.save_pretrained(staging, state_dict=state, max_shard_size=max_shard_size)
        _strip_adapter_traces(staging, storage)
        loaded.tokenizer.save_pretrained(staging)
        if loaded.processor is not None:
            loaded.processor.save_pretrained(staging)
        write_extra_files(staging, extra_files)
    return target


def storage_dtype(loaded: LoadedModel, dtype: str) -> torch.dtype:
    """The dtype a merged model is written in: `dtype`, or for "original" the model's own."""
    if dtype == "original":
        return loaded.native_dtype or loaded.dtype
    return DTYPES[dtype]


def _strip_adapter_traces(folder: Path, storage: torch.dtype) -> None:
    """save_pretrained of a model holding LoRA layers may note the adapter in its config; remove it.

    The config also names the compute dtype; it gets the dtype the weights were written in."""
    config_file = folder / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for key in ("adapter_config", "peft_config"):
            config.pop(key, None)
        for owner in (config, config.get("text_config")):
            if isinstance(owner, dict) and ("dtype" in owner or "torch_dtype" in owner or owner is config):
                owner["dtype"] = dtype_name(storage)
                owner.pop("torch_dtype", None)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for leftover in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / leftover).unlink(missing_ok=True)


def save_adapter(
    loaded: LoadedModel,
    ablator: Ablator,
    parameters: AblationParameters,
    directions: torch.Tensor,
    target: Path,
    *,
    base_model_name: str,
    overwrite: bool = False,
    confirm: ConfirmFn | None = None,
    extra_files: ExtraFiles | None = None,
) -> Path:
    """A PEFT LoRA adapter folder: `PeftModel.from_pretrained(original, folder)` gives the ablated model."""
    ablator.apply(parameters, directions)
    with atomic_folder(target, overwrite, confirm, what="the adapter") as staging:
        peft_model = ablator.peft_model
        peft_model.peft_config["default"].base_model_name_or_path = base_model_name
        peft_model.save_pretrained(staging)
        write_extra_files(staging, extra_files)
    return target


def write_extra_files(folder: Path, extra_files: ExtraFiles | None) -> None:
    """Write the card and record beside the weights (a callable gets the digests of the weight files)."""
    files = extra_files(weight_digests(folder)) if callable(extra_files) else (extra_files or {})
    for name, content in files.items():
        (folder / name).write_text(content, encoding="utf-8")
