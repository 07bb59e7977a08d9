"""Merged save tensor by tensor, from the model's own safetensors files.

Every tensor of the original checkpoint is read from its file (plain reads, no memory map, so the
page cache never counts as the process's memory), ablated if it is a target, cast to the storage
dtype, and written at once into its output shard, whose header was computed beforehand from the
shapes and dtypes alone. Beside the model being searched, the save holds one ablated matrix at a
time (with its float32 copies for the math); every other tensor is only cast, a band of rows at a
time, so a large embedding never sits in memory whole.

A quantized model's targets are ablated on the weights read from the files (full precision), with
the same factors function as the adapters; an unquantized model's with the factors of its own
weights, so that the output equals the one save_pretrained writes from the merged state dict.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..ablation.adapters import Ablator
from ..ablation.parameters import AblationParameters
from ..model.architecture import Target, as_matrices
from ..model.loading import LoadedModel

# safetensors dtype codes.
DTYPE_CODES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES = {dtype: code for code, dtype in DTYPE_CODES.items()}
INDEX_FILE = "model.safetensors.index.json"
# Tensors that are only cast are read and written in bands of rows of about this size.
BAND_BYTES = 8 * 2**20


class LayoutMismatch(Exception):
    """The checkpoint's tensors are not the model's (renamed, fused or transformed on load)."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: its bytes are file[start:end]."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_entries(file: Path) -> list[Entry]:
    """The tensors of a safetensors file, in the order of their data."""
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPE_CODES:
            raise LayoutMismatch(f"{file.name} holds {name} in {info['dtype']}, a dtype this writer does not know")
        begin, end = info["data_offsets"]
        entries.append(Entry(file, name, DTYPE_CODES[info["dtype"]], tuple(info["shape"]), 8 + length + begin, 8 + length + end))
    return sorted(entries, key=lambda entry: entry.start)


def read_tensor(handle: BinaryIO, entry: Entry) -> torch.Tensor:
    handle.seek(entry.start)
    data = bytearray(handle.read(entry.end - entry.start))
    if not data:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return torch.frombuffer(data, dtype=entry.dtype).reshape(entry.shape)


def header_bytes(layout: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    """A safetensors header for tensors written in this order, padded to 8 bytes, with its length first."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in layout:
        size = _numel(shape) * dtype.itemsize
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def checkpoint_entries(folder: Path | None) -> list[Entry] | None:
    """Every tensor of the safetensors checkpoint in `folder` (None when it has none)."""
    if folder is None or not folder.is_dir():
        return None
    index = folder / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / name for name in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files or not all(file.is_file() for file in files):
        return None
    return [entry for file in files for entry in read_entries(file)]


# Turns (entry, tensor read from the file) into the tensor to write (in its storage dtype).
Transform = Callable[[Entry, torch.Tensor], torch.Tensor]


def write_shards(
    entries: list[Entry],
    out_dtypes: dict[str, torch.dtype],
    transform: Transform,
    whole: set[str],
    folder: Path,
    max_shard_bytes: int,
) -> None:
    """Write the transformed tensors as shards of at most `max_shard_bytes` (a larger tensor gets a
    shard of its own), named like transformers names them, with the index when there are several.

    `transform` must be elementwise for every tensor not named in `whole` (those are read in bands)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = _numel(entry.shape) * out_dtypes[entry.name].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    count = len(shards)
    names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    total = 0
    handles: dict[Path, BinaryIO] = {}
    try:
        for shard, name in zip(shards, names):
            total += _write_shard(shard, out_dtypes, transform, whole, folder / name, handles)
    finally:
        for handle in handles.values():
            handle.close()
    if count > 1:
        weight_map = {entry.name: name for shard, name in zip(shards, names) for entry in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_shard(
    shard: list[Entry],
    out_dtypes: dict[str, torch.dtype],
    transform: Transform,
    whole: set[str],
    path: Path,
    handles: dict[Path, BinaryIO],
) -> int:
    """Write one shard tensor by tensor; the number of data bytes written. Tensors named in `whole`
    are transformed in one piece; the others (an elementwise cast) a band of rows at a time."""
    layout = [(entry.name, out_dtypes[entry.name], entry.shape) for entry in shard]
    written = 0
    with open(path, "wb") as out:
        out.write(header_bytes(layout))
        for entry in shard:
            if entry.file not in handles:
                handles[entry.file] = open(entry.file, "rb")  # noqa: SIM115 - closed by write_shards
            pieces = [read_tensor(handles[entry.file], entry)] if entry.name in whole else _bands(handles[entry.file], entry)
            for piece in pieces:
                tensor = transform(entry, piece)
                if tensor.dtype != out_dtypes[entry.name] or tensor.shape[1:] != piece.shape[1:]:
                    raise LayoutMismatch(f"{entry.name} came out as {tensor.dtype} {tuple(tensor.shape)}")
                data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                out.write(memoryview(data))
                written += data.nbytes
    return written


def _bands(handle: BinaryIO, entry: Entry) -> Iterator[torch.Tensor]:
    """The tensor a band of rows (first axis) at a time, each about BAND_BYTES."""
    if len(entry.shape) < 2:
        yield read_tensor(handle, entry)
        return
    row_bytes = _numel(entry.shape[1:]) * entry.dtype.itemsize
    step = max(1, BAND_BYTES // max(row_bytes, 1))
    for first in range(0, entry.shape[0], step):
        rows = min(step, entry.shape[0] - first)
        start = entry.start + first * row_bytes
        band = Entry(entry.file, entry.name, entry.dtype, (rows, *entry.shape[1:]), start, start + rows * row_bytes)
        yield read_tensor(handle, band)


# --- The merge ---------------------------------------------------------------------------------


def merge_plan(
    loaded: LoadedModel, ablator: Ablator, parameters: AblationParameters, entries: list[Entry]
) -> dict[str, tuple[int, str, Target]]:
    """(layer, component, target) of every checkpoint tensor this ablation changes; LayoutMismatch
    when a changed weight is missing from the checkpoint or has another shape there."""
    by_name = {entry.name: entry for entry in entries}
    plan = {}
    hidden = ablator.arch.hidden_size
    for layer, component, target in ablator.arch.targets():
        if parameters.weight(component, layer) == 0.0:
            continue
        entry = by_name.get(target.name) or _renamed(target.name, ablator.arch.layers_path, entries)
        dims = 3 if target.fused else 2
        axis = target.out_axis
        if len(entry.shape) != dims or entry.shape[axis] != hidden:
            raise LayoutMismatch(f"{target.name} has the shape {entry.shape} in the checkpoint")
        if loaded.quantization == "none":
            weight = ablator.original_weight(target)  # PEFT wraps fused experts: not an attribute of their module
            if tuple(weight.shape) != entry.shape:
                raise LayoutMismatch(f"{target.name} has the shape {entry.shape} in the checkpoint, {tuple(weight.shape)} loaded")
        plan[entry.name] = (layer, component, target)
    return plan


def _renamed(name: str, layers_path: str, entries: list[Entry]) -> Entry:
    """The checkpoint tensor of the weight `name` when transformers renames the model's prefix on
    saving (multimodal models: model.language_model.layers.* is stored as language_model.model.layers.*):
    the one tensor whose name ends with the part from the layer list on. Unquantized weights are
    compared with the loaded ones while writing, so a wrong match cannot go unnoticed."""
    suffix = "layers." + name.removeprefix(layers_path + ".")
    matches = [entry for entry in entries if entry.name == suffix or entry.name.endswith("." + suffix)]
    if len(matches) != 1:
        raise LayoutMismatch(f"{name} is not in the checkpoint under that name")
    return matches[0]


def merge_transform(
    loaded: LoadedModel,
    ablator: Ablator,
    parameters: AblationParameters,
    directions: torch.Tensor,
    plan: dict[str, tuple[int, str, Target]],
    storage: torch.dtype,
) -> Transform:
    """The tensor to write for each checkpoint tensor.

    Unquantized model: the file's tensor cast to the compute dtype is the loaded weight (checked);
    merged = diag(s) (M + B A) in the compute dtype, exactly as the in-memory merge, then cast to `storage`.
    Quantized model: M is the file's tensor itself (full precision) and B A is computed from it."""
    exact = loaded.quantization == "none"

    def transform(entry: Entry, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        if exact:
            tensor = tensor.to(loaded.dtype)
        planned = plan.get(entry.name)
        if planned is None:
            return tensor.to(storage)
        layer, component, target = planned
        weight = ablator.original_weight(target)
        if exact and weight.device.type != "meta":  # offloaded weights (meta) are ablated from the file
            tensor = tensor.to(weight.device)
            if not torch.equal(tensor, weight.detach()):
                raise LayoutMismatch(f"{entry.name} in the checkpoint is not the loaded weight")
        matrices = as_matrices(tensor, target)  # (experts, hidden, in), float32
        factors = ablator.factors_for(matrices, layer, component, target, parameters, directions)
        merged = factors.merged(matrices).to(tensor.dtype if exact else storage)
        if not target.fused:
            merged = merged[0] if target.out_axis == 0 else merged[0].T
        elif target.out_axis == 2:
            merged = merged.transpose(1, 2)
        return merged.contiguous().to(storage).cpu()

    return transform


def output_dtypes(entries: list[Entry], storage: torch.dtype) -> dict[str, torch.dtype]:
    return {entry.name: storage if entry.dtype.is_floating_point else entry.dtype for entry in entries}
