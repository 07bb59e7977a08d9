"""Load a model and its tokenizer from the Hub, a local folder or a GGUF file.

GGUF files are dequantized (slow) and cached as float32 safetensors, tensor by tensor, so that
the second load of the same file takes seconds.
"""

from __future__ import annotations

import atexit
import functools
import gc
import hashlib
import json
import logging
import os
import shutil
import time
import traceback
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..config import DEVICE_MAP_STRATEGIES, device_map_value
from ..errors import HereticError, first_line, write_failure
from .device import OutOfMemoryError, accelerator, mps_available, xpu_backend
from .hardware import DtypeMeasurement, dtype_name, measure_or_remember, probe_device, rank_dtypes
from .offload import execution_device

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# 3: written tensor by tensor, in shards (2: one float32 cache per GGUF file, written by save_pretrained;
# 1 kept one cache per dtype).
GGUF_CACHE_VERSION = 3
# The GGUF cache's shards hold at most this many bytes of float32 tensors (a larger tensor gets a shard of
# its own); quantized tensors are dequantized a band of rows of about GGUF_BAND_BYTES (float32) at a time.
GGUF_SHARD_BYTES = 256 * 2**20
GGUF_BAND_BYTES = 16 * 2**20
# transformers' GGUF tensor processors that turn each tensor into one tensor on its own (a function of
# the tensor, its name and the config): the cache of their architectures is written tensor by tensor.
# The others (mixtures of experts that stack the experts' tensors, ...) are dequantized whole.
GGUF_STREAMED_PROCESSORS = frozenset({"TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor"})
# GGUF files say how they were quantized, not in which dtype the model was trained; bfloat16 is
# what today's models are released in.
GGUF_NATIVE_DTYPE = torch.bfloat16
# Where the dtype measurements are remembered, in the cache folder.
DTYPE_MEASUREMENTS = "dtype-measurements.json"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved before loading."""

    kind: str  # "hub" | "local" | "gguf"
    name: str  # what the user typed
    path: str  # hub id or local folder that from_pretrained reads
    gguf_file: Path | None = None  # the original GGUF file, for GGUF sources

    @property
    def display_name(self) -> str:
        if self.gguf_file is not None:
            return self.gguf_file.stem
        return Path(self.name.rstrip("/")).name if self.kind == "local" else self.name.split("/")[-1]


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource
    dtype: torch.dtype  # the compute dtype
    native_dtype: torch.dtype | None = None  # the model's own dtype: what a saved model is written in
    dtype_measurements: list[DtypeMeasurement] = field(default_factory=list)  # when the dtype was measured
    processor: Any | None = None  # multimodal models' processor, saved with the model
    multimodal: bool = False
    load_seconds: float = 0.0
    from_cache: bool = False
    notes: list[str] = field(default_factory=list)
    quantization: str = "none"  # "bnb-4bit" | "bnb-8bit": the weights in memory are quantized
    weights_folder: Path | None = None  # the folder of the safetensors files the model was loaded from

    @property
    def input_device(self) -> torch.device:
        """Where the input ids go: the embeddings' execution device (accelerate's, when they are offloaded)."""
        embeddings = self.model.get_input_embeddings()
        return execution_device(embeddings, embeddings.weight.device)


def resolve_source(name: str) -> ModelSource:
    """Decide whether `name` is a GGUF file, a folder holding one, a local model folder or a Hub id."""
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise HereticError(f"The GGUF file {name} does not exist; check the path.")
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise HereticError(f"{name} is not a GGUF file (it does not start with the GGUF signature); check the file.")
        _check_gguf_complete(path, name)
        return ModelSource("gguf", name, str(path.parent.resolve()), path.resolve())
    if path.is_dir():
        if (path / "config.json").is_file():
            _check_safetensors_complete(path, name)
            return ModelSource("local", name, str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", name, str(path.resolve()), ggufs[0].resolve())
        if len(ggufs) > 1:
            listed = ", ".join(file.name for file in ggufs[:5])
            raise HereticError(f"The folder {name} holds several GGUF files ({listed}); name the one to use.")
        raise HereticError(f"The folder {name} holds no model (no config.json and no .gguf file).")
    if path.is_file():
        raise HereticError(
            f"{name} is a file but not a model; give a model folder, a .gguf file or a Hugging Face id (org/name)."
        )
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name and not _hub_id_like(name):
        raise HereticError(f"The model path {name} does not exist; check the path, or give a Hugging Face id like org/name.")
    if not _hub_id_like(name):
        raise HereticError(f"{name!r} is neither an existing path nor a Hugging Face model id (org/name).")
    return ModelSource("hub", name, name)


@functools.lru_cache(maxsize=8)
def _read_gguf_general(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {name: entry.contents() for name, entry in reader.fields.items() if name.startswith("general.")}


def gguf_general_fields(path: Path) -> dict[str, Any]:
    """The general.* metadata of a GGUF file, read once per process and version of the file: the reader
    parses the whole header, tokenizer vocabulary included (about 10 s for a 150k-token vocabulary). Raises
    the reader's error for a damaged file."""
    stat = path.stat()
    return dict(_read_gguf_general(str(path.resolve()), stat.st_size, stat.st_mtime_ns))


def _check_gguf_complete(path: Path, name: str) -> None:
    """A GGUF file cut short (an interrupted download or copy) is refused before transformers reads it."""
    try:
        gguf_general_fields(path)
    except Exception as error:  # noqa: BLE001 - the reader fails in many ways on a damaged file
        raise HereticError(
            f"{name} is not a complete GGUF file ({first_line(error)}); it may be truncated: download or copy it again."
        ) from None


def _check_safetensors_complete(folder: Path, name: str) -> None:
    """Weights cut short (an interrupted download or copy) are refused before transformers reads them:
    each .safetensors file must hold its header and every byte its header promises."""
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        try:
            with open(file, "rb") as handle:
                header_length = int.from_bytes(handle.read(8), "little")
                if size < 8 or header_length > size - 8:
                    raise ValueError("its header is cut short")
                header = json.loads(handle.read(header_length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise HereticError(
                f"The weights file {file.name} in {name} is damaged ({error}); download or copy the model again."
            ) from None
        if 8 + header_length + end > size:
            raise HereticError(
                f"The weights file {file.name} in {name} is truncated ({size:,} of {8 + header_length + end:,} bytes); "
                "download or copy the model again."
            )


def _hub_id_like(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(part and not part.startswith(".") for part in parts)


# --- GGUF cache -----------------------------------------------------------------------------


def gguf_cache_folder(gguf_file: Path, cache_dir: Path) -> Path:
    """Cache folder for a GGUF file: keyed by its path, size, modification time and library version."""
    import transformers

    stat = gguf_file.stat()
    key = json.dumps([str(gguf_file), stat.st_size, stat.st_mtime_ns, transformers.__version__, GGUF_CACHE_VERSION])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir.expanduser() / "gguf" / f"{gguf_file.stem}-{digest}"


def dequantize_gguf_to_cache(source: ModelSource, cache_dir: Path) -> tuple[Path, bool]:
    """Return a safetensors folder for the GGUF source, creating it (atomically) if needed.

    The cache holds the dequantized weights in float32, exactly as transformers dequantizes them
    (a block's scale times its quantized values needs more than bfloat16's 8 mantissa bits), so
    loading it in any dtype gives the same tensors as dequantizing the GGUF directly in that dtype:
    the same names and values as transformers' from_pretrained(gguf_file=..., dtype=float32), whose
    tensor name map and per-architecture tensor processors it uses.

    Memory: the tensors are dequantized and written one shard at a time, so the process holds the
    GGUF file's mapped pages, its parsed metadata and at most one shard (GGUF_SHARD_BYTES, or the
    largest tensor in float32, plus a band of gguf's dequantization temporaries): well below the model
    in bfloat16. With the load that follows (_load_gguf_cache), a first load stays within 1.5 x the
    model's size in its compute dtype + 1 GiB (measured: bench/gguf_memory.py). The architectures whose
    tensors transformers converts together (outside GGUF_STREAMED_PROCESSORS) are dequantized whole,
    as transformers does (several times the model)."""
    assert source.gguf_file is not None
    folder = gguf_cache_folder(source.gguf_file, cache_dir)
    if (folder / "config.json").is_file():
        return folder, True
    log.info("Dequantizing %s (first load; later loads come from %s)", source.gguf_file, folder)
    write = _gguf_cache_writer(source)
    staging = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        write(staging)
        (staging / "heretic-source.json").write_text(json.dumps({"gguf_file": str(source.gguf_file)}, indent=2))
    except HereticError:  # a tensor gguf cannot dequantize
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as error:  # noqa: BLE001 - OSError, or safetensors' own error for a full disk
        shutil.rmtree(staging, ignore_errors=True)
        failure = write_failure(error, cache_dir, "the dequantized GGUF cache in", "--cache-dir")
        if failure is None:
            raise
        raise failure from None
    try:
        os.replace(staging, folder)
    except OSError:  # another process won the race; use its copy
        shutil.rmtree(staging, ignore_errors=True)
    del write
    gc.collect()
    return folder, False


def _cannot_load_gguf(gguf_file: Path, error: BaseException) -> HereticError:
    return HereticError(
        f"transformers cannot load the GGUF file {gguf_file.name} ({first_line(error)}); "
        "its architecture or quantization type may be unsupported."
    )


def _gguf_cache_writer(source: ModelSource) -> Callable[[Path], None]:
    """Read what the cache needs from the GGUF file (tokenizer, config, tensor map) before anything is
    written; a function that writes the cache into a folder."""
    assert source.gguf_file is not None
    gguf_file = source.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=gguf_file.name)
        streamed = _gguf_stream(gguf_file)
        whole = None if streamed is not None else _gguf_model_whole(source)
    except Exception as error:  # noqa: BLE001 - transformers raises many types for unsupported GGUFs
        raise _cannot_load_gguf(gguf_file, error) from None

    def write(folder: Path) -> None:
        if streamed is not None:
            _write_gguf_shards(streamed, folder)
            _save_model_configs(streamed.model, folder)
        else:
            assert whole is not None
            whole.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write


def _gguf_model_whole(source: ModelSource) -> PreTrainedModel:
    """The whole model dequantized by transformers in float32 (several times the model's size in memory)."""
    assert source.gguf_file is not None
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file.name, dtype=torch.float32)
    # The model is dequantized now: drop the GGUF quantizer so that it saves as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


@dataclass
class _GgufStream:
    """What writing a GGUF file's cache tensor by tensor needs."""

    gguf_file: Path
    model: PreTrainedModel  # on the meta device: its config, generation config and state-dict names
    processor: Any  # transformers' tensor processor for the architecture (llama's q/k permutation, ...)
    tensors: list[tuple[Any, str]]  # (the reader's GGUF tensor, its transformers name), in the file's order


def _gguf_stream(gguf_file: Path) -> _GgufStream | None:
    """The tensor-by-tensor plan for the GGUF file, from transformers' own GGUF helpers; None (and one
    log line) where the cache must be written from the whole model: transformers converts the
    architecture's tensors together, or the model has weights the file does not hold."""
    from gguf import GGUFReader
    from transformers.integrations.gguf import is_gguf_arch_supported
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    architecture = str(gguf_general_fields(gguf_file).get("general.architecture", ""))
    processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    if is_gguf_arch_supported(architecture) or processor_class.__name__ not in GGUF_STREAMED_PROCESSORS:
        log.info("transformers converts the %s tensors of %s together: dequantizing it whole", architecture, gguf_file.name)
        return None
    config = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # The processor gets the config dict transformers' GGUF loader gives it, not the config object's.
    processor = processor_class(config=load_gguf_checkpoint(str(gguf_file), return_tensors=False)["config"])
    names = get_gguf_hf_weights_map(model, processor)
    saved = _saved_names(model)
    tensors = [(tensor, names[tensor.name]) for tensor in GGUFReader(str(gguf_file)).tensors if names.get(tensor.name) in saved]
    missing = saved - {name for _, name in tensors}
    if missing:
        log.info("%s holds no %s: dequantizing it whole", gguf_file.name, ", ".join(sorted(missing)[:3]))
        return None
    return _GgufStream(gguf_file, model, processor, tensors)


def _saved_names(model: PreTrainedModel) -> set[str]:
    """The state-dict names save_pretrained writes: a tied parameter once, under its first name."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    first = {name for name, _ in model.named_parameters()}
    return set(model.state_dict()) - (every - first)


def _write_gguf_shards(stream: _GgufStream, folder: Path) -> None:
    """Dequantize the tensors into shards of at most GGUF_SHARD_BYTES (named as transformers names them,
    with the index when there are several), one shard in memory at a time."""
    from safetensors.torch import save_file

    shards: list[list[tuple[Any, str]]] = [[]]
    size = 0
    for tensor, name in stream.tensors:
        if shards[-1] and size + 4 * int(tensor.n_elements) > GGUF_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((tensor, name))
        size += 4 * int(tensor.n_elements)
    count = len(shards)
    files = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    for shard, file in zip(shards, files):
        try:
            tensors = {name: _dequantized(tensor, stream.processor) for tensor, name in shard}
        except MemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - gguf raises NotImplementedError, ValueError, ...
            raise _cannot_load_gguf(stream.gguf_file, error) from None
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    if count > 1:
        weight_map = {name: file for shard, file in zip(shards, files) for _, name in shard}
        total = sum(4 * int(tensor.n_elements) for tensor, _ in stream.tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _dequantized(tensor: Any, processor: Any) -> torch.Tensor:
    """One GGUF tensor as transformers' GGUF loader makes it: gguf's dequantization to float32 (a band
    of rows at a time into the result, so that its temporaries stay small), then the architecture's
    tensor processor."""
    import numpy as np
    from gguf import dequantize

    rows = tensor.data.reshape(-1, tensor.data.shape[-1])
    width = dequantize(rows[:1], tensor.tensor_type).shape[-1]
    values = np.empty((rows.shape[0], width), dtype=np.float32)
    step = max(1, GGUF_BAND_BYTES // (4 * width))
    for start in range(0, rows.shape[0], step):
        values[start : start + step] = dequantize(rows[start : start + step], tensor.tensor_type)
    values = values.reshape(*tensor.data.shape[:-1], width)
    parsed: dict[str, dict[str, Any]] = {"tensors": {}}
    result = processor.process(weights=values, name=tensor.name, tensor_key_mapping={}, parsed_parameters=parsed)
    if result.name != tensor.name or parsed["tensors"]:
        raise ValueError(f"transformers' {type(processor).__name__} does not convert {tensor.name} on its own")
    return torch.from_numpy(np.ascontiguousarray(result.weights)).to(torch.float32)


def _save_model_configs(model: PreTrainedModel, folder: Path) -> None:
    """config.json and generation_config.json as save_pretrained writes them for the model in float32."""
    model.config.dtype = "float32"
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)


# --- Loading ---------------------------------------------------------------------------------


def is_multimodal_config(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None


FASTEST = "fastest"


def load_model(
    name: str,
    *,
    dtypes: list[str],
    device_map: str = "auto",
    max_memory: dict[str, str] | None = None,
    quantization: str = "none",
    trust_remote_code: bool = False,
    revision: str | None = None,
    cache_dir: str = "~/.cache/heretic",
) -> LoadedModel:
    """Load `name` in the first dtype that loads and generates a finite first token.

    `dtypes` is tried in order ("auto" is the model's own dtype); ["fastest"] measures the candidate
    dtypes on the device first and tries them fastest first."""
    check_device_map(device_map)
    started, placement = time.perf_counter(), device_placement(device_map, max_memory, cache_dir)
    source = resolve_source(name)
    load_path, from_cache = source.path, False
    if source.kind == "gguf":
        cached, from_cache = dequantize_gguf_to_cache(source, Path(cache_dir))
        load_path = str(cached)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.kind == "hub" and revision:
        common["revision"] = revision
    config = _read_config(source, load_path, common)
    native = native_dtype(source, config)
    measurements: list[DtypeMeasurement] = []
    if dtypes == [FASTEST]:
        measurements = measure_dtypes(config, native, probe_device(device_map), Path(cache_dir))
        candidates = rank_dtypes(measurements) or [native]
    else:
        candidates = list(dict.fromkeys(native if name == "auto" else DTYPES[name] for name in dtypes))
    failures: list[str] = []
    for dtype in candidates:
        try:
            loaded = _load_once(source, load_path, config, common, dtype, placement, quantization)
        except HereticError:
            raise
        except (OutOfMemoryError, MemoryError):
            raise HereticError(
                f"Out of memory while loading {source.name} in {dtype_name(dtype)}; set --max-memory or --device-map, "
                "use --quantization bnb-4bit, or a machine with more memory."
            ) from None
        except Exception as error:  # noqa: BLE001 - try the next dtype, report all at the end
            failures.append(f"{dtype_name(dtype)}: {first_line(error)}")
            log.info("Loading in %s failed: %s", dtype, error)
            continue
        problem = first_token_check(loaded)
        if problem is not None:
            failures.append(skip_dtype(dtype, problem))
            del loaded
            gc.collect()
            continue
        loaded.native_dtype, loaded.dtype_measurements, loaded.from_cache = native, measurements, from_cache
        loaded.load_seconds = time.perf_counter() - started
        loaded.quantization, loaded.weights_folder = quantization, weights_folder(source, load_path, revision)
        return loaded
    tried = ", ".join(dtype_name(dtype) for dtype in candidates)
    raise HereticError(f"Could not load {name} in any of the dtypes {tried} ({'; '.join(failures)}).")


def skip_dtype(dtype: torch.dtype, problem: str) -> str:
    """Say in one log line that `dtype` is passed over, and why; the reason as the final error lists it."""
    log.warning("Not computing in %s: %s; trying the next dtype.", dtype_name(dtype), problem)
    return f"{dtype_name(dtype)}: {problem}"


def weights_folder(source: ModelSource, load_path: str, revision: str | None) -> Path | None:
    """The local folder holding the model's safetensors files: the model folder, the GGUF cache, or the
    Hub cache's snapshot (None when it cannot be found offline)."""
    if source.kind != "hub":
        return Path(load_path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.path, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached in full, or not a Hub model after all
        return None


def native_dtype(source: ModelSource, config: Any) -> torch.dtype:
    """The dtype the model was released in: its config's, bfloat16 for a GGUF file, float32 when unknown."""
    if source.kind == "gguf":
        return GGUF_NATIVE_DTYPE
    for candidate in (config, getattr(config, "text_config", None)):
        value = getattr(candidate, "dtype", None) or getattr(candidate, "torch_dtype", None)
        if isinstance(value, str):
            value = DTYPES.get(value)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    return torch.float32


def measure_dtypes(config: Any, native: torch.dtype, device: torch.device, cache_dir: Path) -> list[DtypeMeasurement]:
    """Speed of each candidate dtype on `device`, at this model's hidden and MLP sizes (remembered
    per machine in the cache folder)."""
    text = getattr(config, "text_config", None) or config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0) or getattr(text, "d_model", 0) or 2048)
    intermediate = int(getattr(text, "intermediate_size", 0) or getattr(text, "moe_intermediate_size", 0) or 4 * hidden)
    return measure_or_remember(cache_dir.expanduser() / DTYPE_MEASUREMENTS, native, device, hidden, intermediate)


def _read_config(source: ModelSource, load_path: str, common: dict[str, Any]) -> Any:
    try:
        return AutoConfig.from_pretrained(load_path, **common)
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise HereticError(
                f"{source.name} needs code from its repository to run; if you trust it, pass --trust-remote-code."
            ) from None
        raise _explain_load_error(source, error) from None
    except OSError as error:
        raise _explain_load_error(source, error) from None


def _load_once(
    source: ModelSource,
    load_path: str,
    config: Any,
    common: dict[str, Any],
    dtype: torch.dtype,
    placement: dict[str, Any],
    quantization: str,
) -> LoadedModel:
    multimodal = is_multimodal_config(config)
    kwargs: dict[str, Any] = dict(common, dtype=dtype, **placement)
    if quantization != "none":
        kwargs["quantization_config"] = _bnb_config(quantization, dtype)
    if isinstance(getattr(config, "autocast_kernel_dtype", None), str):  # xLSTM's kernels fail in any other dtype
        kwargs["autocast_kernel_dtype"] = str(dtype).removeprefix("torch.")
    model_class = _model_class(multimodal, config)
    try:
        if source.kind == "gguf" and kwargs["device_map"] is None and quantization == "none" and not multimodal:
            model = _load_gguf_cache(load_path, config, kwargs)
        else:
            model = model_class.from_pretrained(load_path, **kwargs)
    except OSError as error:
        raise _explain_load_error(source, error) from None
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(load_path, **common)
    processor = None
    if multimodal:
        try:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(load_path, **common)
        except Exception as error:  # noqa: BLE001 - a processor is only needed for saving
            log.warning("No processor could be loaded for %s (%s); saving will write the tokenizer only.", source.name, error)
    prepare_tokenizer(tokenizer)
    return LoadedModel(model, tokenizer, source, dtype, processor=processor, multimodal=multimodal)


def _load_gguf_cache(folder: str, config: Any, kwargs: dict[str, Any]) -> PreTrainedModel:
    """The model from its GGUF cache on the CPU, as from_pretrained(folder) loads it, but with the
    float32 tensors read from the files (pread) rather than memory-mapped: from_pretrained maps every
    file until the end of the load, so each page it casts would stay in the process's memory, and a
    model loaded in bfloat16 would hold its float32 cache (twice its size) besides itself. Read this
    way, and one tensor at a time (transformers' loading threads would each read one ahead: the
    embeddings and the output projection at once), the load holds the model and one float32 tensor."""
    from unittest import mock

    from safetensors import safe_open
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, GenerationConfig

    with ExitStack() as files:
        files.enter_context(mock.patch.dict(os.environ, {"HF_DEACTIVATE_ASYNC_LOAD": "1"}))
        handles = [
            files.enter_context(safe_open(str(file), framework="pt", backend="pread"))
            for file in sorted(Path(folder).glob("*.safetensors"))
        ]
        state_dict = {name: handle.get_slice(name) for handle in handles for name in handle.keys()}  # noqa: SIM118 - not iterable
        generation_config = GenerationConfig.from_pretrained(folder)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        model = model_class.from_pretrained(
            None, config=config, state_dict=state_dict, generation_config=generation_config, **kwargs
        )
    model.name_or_path = model.config.name_or_path = folder
    return model


def _model_class(multimodal: bool, config: Any = None) -> Any:
    """The class that loads the model: the Auto class of its kind; for a text model whose config class the causal-LM
    Auto class does not map (the text half of Emu3 or Mllama, saved alone), the class its config names."""
    if multimodal:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    named = (getattr(config, "architectures", None) or [""])[0]
    model_type = getattr(config, "model_type", None)
    if model_type is not None and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and named.endswith("ForCausalLM"):
        import transformers

        return getattr(transformers, named, AutoModelForCausalLM)
    return AutoModelForCausalLM


def _parse_device_map(device_map: str) -> str | dict[str, str | int] | None:
    """The device map accelerate gets: the object or name --device-map holds, or None (a plain CPU load, without
    accelerate's dispatch hooks in the forward pass) for a strategy where there is no accelerator to spread over,
    as transformers then loads every strategy onto the CPU."""
    value = device_map_value(device_map)
    if value in DEVICE_MAP_STRATEGIES and accelerator() is None:
        return None
    return value


def device_placement(device_map: str, max_memory: dict[str, str] | None, cache_dir: str) -> dict[str, Any]:
    """from_pretrained's placement arguments: the device map, the memory limit per device and, where the map puts
    modules on "disk", an offload folder for the weights transformers must write again to read them from disk
    (all but those of safetensors files it reads as they are: most mixtures of experts convert theirs on
    loading). The folder is this process's, in the cache folder, and is removed when the process ends."""
    placement: dict[str, Any] = {"device_map": _parse_device_map(device_map)}
    if max_memory:
        placement["max_memory"] = {(int(key) if key.isdigit() else key): value for key, value in max_memory.items()}
    mapped = placement["device_map"]
    if isinstance(mapped, dict) and "disk" in mapped.values():
        folder = Path(cache_dir).expanduser() / "offload" / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        atexit.register(shutil.rmtree, folder, True)
        placement["offload_folder"] = str(folder)
    return placement


# What the accelerators of each kind are called when one is missing.
GPU_NAMES = {"cuda": "CUDA GPU", "xpu": "Intel GPU", "mps": "Apple GPU"}


def check_device_map(device_map: str) -> None:
    """Refuse, in one sentence and before anything is loaded, a --device-map naming a device this machine lacks."""
    value = device_map_value(device_map)
    for device in value.values() if isinstance(value, dict) else [value]:
        if isinstance(device, int):
            kind, index, named = accelerator(), device, f"GPU {device}"
        elif device in ("cpu", "disk") or device in DEVICE_MAP_STRATEGIES:
            continue
        else:
            kind, _, number = device.partition(":")
            index, named = int(number or 0), device
        count = gpu_count(kind) if kind else 0
        if index >= count:
            have = f"no {GPU_NAMES.get(kind or '', 'GPU')}" if kind is None or count == 0 else _gpus(kind, count)
            raise HereticError(
                f"--device-map names {named}, which is not available here (this machine has {have}); "
                "use --device-map auto or --device-map cpu."
            )


def gpu_count(kind: str) -> int:
    """How many accelerators of this kind ("cuda", "xpu" or "mps") this machine has."""
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "xpu":
        xpu = xpu_backend()
        return int(xpu.device_count()) if xpu is not None else 0
    return 1 if kind == "mps" and mps_available() else 0


def _gpus(kind: str, count: int) -> str:
    """'1 CUDA GPU, cuda:0' or '2 Intel GPUs, xpu:0 to xpu:1'."""
    if count == 1:
        return f"1 {GPU_NAMES[kind]}, {kind}:0"
    return f"{count} {GPU_NAMES[kind]}s, {kind}:0 to {kind}:{count - 1}"


def _bnb_config(quantization: str, dtype: torch.dtype) -> Any:
    """bitsandbytes' NF4 (4-bit, computing in `dtype`) or LLM.int8 (8-bit) quantization."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise HereticError(
            f"--quantization {quantization} needs bitsandbytes; install it with `pip install -e '.[quant]'` in Heretic's folder."
        ) from None
    import warnings

    from transformers import BitsAndBytesConfig

    if quantization == "bnb-8bit":
        # Int8 matrix products cast float32 inputs to float16 and warn at every call.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")


def _explain_load_error(source: ModelSource, error: BaseException) -> HereticError:
    text = first_line(error)
    if source.kind == "hub":
        return HereticError(
            f"Cannot load {source.name} from the Hugging Face Hub ({text}); check the id, your connection, "
            "and for gated models your login (`hf auth login`)."
        )
    return HereticError(f"Cannot load the model in {source.path} ({text}).")


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Left padding (generation appends on the right) and a pad token for batching."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})  # id beyond the embedding; only ever masked


def eos_token_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    generation_config = getattr(loaded.model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(int(value) for value in configured)
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    return ids


# In float16 (largest finite value 65504), hidden states beyond this share of the range on the short test
# prompt leave longer prompts no headroom: Gemma's reach 1e5 and overflow.
FLOAT16_HEADROOM = 0.25


@torch.inference_mode()
def first_token_check(loaded: LoadedModel) -> str | None:
    """Run one forward pass on a chat prompt; a problem description if the logits are not finite, or, in
    float16, if a hidden state comes within FLOAT16_HEADROOM of float16's largest value (longer prompts
    would overflow it)."""
    from .template import format_chat

    text = format_chat(loaded.tokenizer, "You are a helpful assistant.", "Say hello.", response_prefix="")
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(loaded.input_device)
    half = loaded.dtype == torch.float16
    try:
        output = loaded.model(**ids, use_cache=False, logits_to_keep=1, output_hidden_states=half)
    except (RuntimeError, AssertionError) as error:
        problem = _unpackable_4bit_layer(loaded, error)
        if problem is None:
            raise
        raise HereticError(problem) from None
    if not torch.isfinite(output.logits).all():
        return "the test generation produced NaN or infinite logits"
    if half:
        largest = max(float(hidden.abs().max()) for hidden in output.hidden_states)
        if largest > FLOAT16_HEADROOM * torch.finfo(torch.float16).max:
            return f"its hidden states reach {largest:,.0f} on a short prompt, too close to float16's largest value (65,504)"
    return None


# bitsandbytes' 4-bit CPU kernels take a weight repacked by this function, in blocks of outputs of this size.
BNB_CPU_PACKING = "_convert_weight_packed_for_cpu"
BNB_CPU_BLOCK_OUTPUTS = 32


def _unpackable_4bit_layer(loaded: LoadedModel, error: BaseException) -> str | None:
    """The sentence for a first forward pass that failed where bitsandbytes repacks a 4-bit weight for its CPU
    kernels (used where the CPU has AVX512-BF16), which need widths in whole blocks; None for any other failure."""
    if not any(frame.name == BNB_CPU_PACKING for frame in traceback.extract_tb(error.__traceback__)):
        return None
    blocksize, culprit = 64, "one of its layers does not"
    for module_name, module in loaded.model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or not hasattr(module, "in_features"):
            continue
        blocksize = int(state.blocksize)
        if module.in_features % blocksize or module.out_features % BNB_CPU_BLOCK_OUTPUTS:
            culprit = f"{module_name} maps {module.in_features} inputs to {module.out_features} outputs"
            break
    return (
        f"{loaded.source.name} cannot run quantized with bnb-4bit on the CPU: bitsandbytes' 4-bit CPU kernels need "
        f"every quantized layer's input width to be a multiple of {blocksize} and its output width a multiple of "
        f"{BNB_CPU_BLOCK_OUTPUTS}, and {culprit}; load it with --quantization none or bnb-8bit."
    )
