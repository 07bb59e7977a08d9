"""Saving results: merged model and adapter folders, written atomically, never overwriting by accident."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers.utils.hub import convert_file_size_to_int

from ..ablation.adapters import Ablator
from ..ablation.parameters import AblationParameters
from ..errors import HereticError, write_failure
from ..model.hardware import dtype_name
from ..model.loading import DTYPES, LoadedModel
from .record import weight_digests
from .shards import Entry, LayoutMismatch, checkpoint_entries, merge_plan, merge_transform, output_dtypes, write_shards

log = logging.getLogger(__name__)

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
    method: str = "auto",
) -> Path:
    """The ablation merged into the weights: a plain transformers model folder (config, generation
    config, tokenizer, chat template, processor) with no trace of Heretic in its code.

    Written in `dtype`: "original" is the model's own dtype, whatever dtype it was computed in.
    `method`: "streamed" reads the model's safetensors files again one tensor at a time (the most a
    save holds beside the model is one tensor); "in-memory" builds the merged state dict of the loaded
    model; "reload" loads the original in full precision on the CPU first (for a quantized model);
    "auto" streams when the checkpoint's tensors are the model's, else falls back."""
    storage = storage_dtype(loaded, dtype)
    write = functools.partial(_write_folder, loaded, target, overwrite, confirm, extra_files, storage)
    if method in ("auto", "streamed"):
        entries = streamable_checkpoint(loaded)
        try:
            if entries is None:
                raise LayoutMismatch("the model was not loaded from safetensors files")
            plan = merge_plan(loaded, ablator, parameters, entries)
            transform = merge_transform(loaded, ablator, parameters, directions, plan, storage)
            shard_bytes = convert_file_size_to_int(max_shard_size)
            dtypes = output_dtypes(entries, storage)
            return write(lambda folder: write_shards(entries, dtypes, transform, set(plan), folder, shard_bytes))
        except LayoutMismatch as why:
            if method == "streamed":
                raise HereticError(f"The merged model cannot be written tensor by tensor: {why}.") from None
            log.info("Saving the merged model in memory: %s", why)
    if loaded.quantization != "none" or method == "reload":
        full, full_ablator = reload_full_precision(loaded, ablator)
        return save_merged(
            full, full_ablator, parameters, directions, target, max_shard_size=max_shard_size, dtype=dtype,
            overwrite=overwrite, confirm=confirm, extra_files=extra_files, method="in-memory",
        )  # fmt: skip
    state = cast_state(ablator.merged_state_dict(parameters, directions), storage)
    return write(lambda folder: ablator.base_model.save_pretrained(folder, state_dict=state, max_shard_size=max_shard_size))


def cast_state(state: dict[str, torch.Tensor], storage: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors cast to `storage`; tensors that share memory (tied embeddings) still share it
    after the cast, so that save_pretrained writes them once."""
    cast: dict[tuple[int, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    result = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            result[name] = tensor
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if key not in cast:
            cast[key] = tensor.to(storage)
        result[name] = cast[key]
    return result


def _write_folder(
    loaded: LoadedModel,
    target: Path,
    overwrite: bool,
    confirm: ConfirmFn | None,
    extra_files: ExtraFiles | None,
    storage: torch.dtype,
    write_weights: Callable[[Path], object],
) -> Path:
    """The merged model's folder: the weights `write_weights` writes, the config, generation config,
    tokenizer, processor and `extra_files`, atomically."""
    with atomic_folder(target, overwrite, confirm, what="the merged model") as staging:
        write_weights(staging)
        model = loaded.model
        if not (staging / "config.json").is_file():
            model.config.save_pretrained(staging)
            if getattr(model, "generation_config", None) is not None and model.can_generate():
                model.generation_config.save_pretrained(staging)
        _strip_adapter_traces(staging, storage)
        loaded.tokenizer.save_pretrained(staging)
        if loaded.processor is not None:
            loaded.processor.save_pretrained(staging)
        write_extra_files(staging, extra_files)
    return target


def streamable_checkpoint(loaded: LoadedModel) -> list[Entry] | None:
    """The tensors of the safetensors checkpoint the model was loaded from, if it is a plain one (not
    itself quantized: an FP8 or GPTQ checkpoint is merged in memory)."""
    folder = loaded.weights_folder
    if folder is None or not (folder / "config.json").is_file():
        return None
    config = json.loads((folder / "config.json").read_text())
    if config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config"):
        return None
    return checkpoint_entries(folder)


def reload_full_precision(loaded: LoadedModel, ablator: Ablator) -> tuple[LoadedModel, Ablator]:
    """The original model in its own dtype on the CPU, with an ablator like `ablator` (for the merged
    save of a quantized model whose checkpoint cannot be streamed); refused in one sentence, before
    loading, when it does not fit in the memory available."""
    from transformers import AutoConfig

    from ..model.architecture import build_architecture_map
    from ..model.loading import _model_class

    path = str(loaded.weights_folder or loaded.source.path)
    native = loaded.native_dtype or loaded.dtype
    config = AutoConfig.from_pretrained(path)
    needed = parameter_count(config, loaded.multimodal) * native.itemsize
    available = available_memory()
    if needed > available:
        raise HereticError(
            f"Merging the quantized model needs the original in {dtype_name(native)} on the CPU, about "
            f"{needed / 2**30:.1f} GiB, but only {available / 2**30:.1f} GiB of memory is free; save the adapter "
            "(save-adapter) and merge it on a machine with more memory."
        )
    model = _model_class(loaded.multimodal).from_pretrained(path, dtype=native).eval()
    full = dataclasses.replace(loaded, model=model, dtype=native, quantization="none")
    arch = build_architecture_map(model)
    full_ablator = Ablator(model, arch, ablator.mode, ablator.full_rank, ablator.seed, ablator.subspace_rank, ablator.exact)
    full_ablator.subspace = ablator.subspace
    return full, full_ablator


def parameter_count(config: object, multimodal: bool) -> int:
    """Parameters of the model `config` describes (built on the meta device: no memory)."""
    from ..model.loading import _model_class

    with torch.device("meta"):
        model = _model_class(multimodal).from_config(config)
    return sum(parameter.numel() for parameter in model.parameters())


def available_memory() -> int:
    """Bytes of memory the system can still give (psutil's available)."""
    import psutil

    return int(psutil.virtual_memory().available)


def storage_dtype(loaded: LoadedModel, dtype: str) -> torch.dtype:
    """The dtype a merged model is written in: `dtype`, or for "original" the model's own."""
    if dtype == "original":
        return loaded.native_dtype or loaded.dtype
    return DTYPES[dtype]


def _strip_adapter_traces(folder: Path, storage: torch.dtype) -> None:
    """save_pretrained of a model holding LoRA layers may note the adapter in its config; remove it.

    The config also names the compute dtype; it gets the dtype the weights were written in. A model
    loaded quantized is saved in full precision: its quantization config is dropped."""
    config_file = folder / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for key in ("adapter_config", "peft_config", "quantization_config"):
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
    """A PEFT adapter folder: `PeftModel.from_pretrained(original, folder)` gives the ablated model. An exact
    full ablation is saved as a DoRA adapter (LoRA factors and magnitudes), the others as LoRA adapters."""
    ablator.apply(parameters, directions)
    with atomic_folder(target, overwrite, confirm, what="the adapter") as staging:
        peft_model = ablator.peft_model
        peft_model.peft_config["default"].base_model_name_or_path = base_model_name
        peft_model.save_pretrained(staging)
        if ablator.exact:
            _as_dora_adapter(staging, ablator.dora_magnitudes())
        write_extra_files(staging, extra_files)
    return target


def _as_dora_adapter(folder: Path, magnitudes: dict[str, torch.Tensor]) -> None:
    """Turn a saved LoRA adapter into the DoRA adapter with these magnitudes (one per adapted module)."""
    from safetensors.torch import load_file, save_file

    weights_file = folder / "adapter_model.safetensors"
    tensors = load_file(weights_file)
    for module, magnitude in magnitudes.items():
        prefix = f"base_model.model.{module}"
        if f"{prefix}.lora_A.weight" not in tensors:
            raise RuntimeError(f"the saved adapter has no factors for {module}")
        tensors[f"{prefix}.lora_magnitude_vector"] = magnitude.float().contiguous().cpu()
    save_file(tensors, weights_file, metadata={"format": "pt"})
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["use_dora"] = True
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_extra_files(folder: Path, extra_files: ExtraFiles | None) -> None:
    """Write the card and record beside the weights (a callable gets the digests of the weight files)."""
    files = extra_files(weight_digests(folder)) if callable(extra_files) else (extra_files or {})
    for name, content in files.items():
        (folder / name).write_text(content, encoding="utf-8")
