"""Load a model and its tokenizer from the Hub, a local folder or a GGUF file.

GGUF files are dequantized by transformers (slow) and cached as safetensors, so that the
second load of the same file takes seconds.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import HereticError, first_line, write_failure
from .hardware import DtypeMeasurement, dtype_name, measure_or_remember, probe_device, rank_dtypes

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# 2: one float32 cache per GGUF file, cast to the compute dtype on load (1 kept one cache per dtype).
GGUF_CACHE_VERSION = 2
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
        return self.model.get_input_embeddings().weight.device


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
    loading it in any dtype gives the same tensors as dequantizing the GGUF directly in that dtype."""
    assert source.gguf_file is not None
    folder = gguf_cache_folder(source.gguf_file, cache_dir)
    if (folder / "config.json").is_file():
        return folder, True
    log.info("Dequantizing %s (first load; later loads come from %s)", source.gguf_file, folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file.name, dtype=torch.float32)
    except Exception as error:  # noqa: BLE001 - transformers raises many types for unsupported GGUFs
        raise HereticError(
            f"transformers cannot load the GGUF file {source.gguf_file.name} ({first_line(error)}); "
            "its architecture or quantization type may be unsupported."
        ) from None
    # The model is dequantized now: drop the GGUF quantizer so that it saves as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "heretic-source.json").write_text(json.dumps({"gguf_file": str(source.gguf_file)}, indent=2))
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
    del model
    gc.collect()
    return folder, False


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
    started = time.perf_counter()
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
            loaded = _load_once(source, load_path, config, common, dtype, device_map, max_memory, quantization)
        except HereticError:
            raise
        except (torch.OutOfMemoryError, MemoryError):
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
            failures.append(f"{dtype_name(dtype)}: {problem}")
            del loaded
            gc.collect()
            continue
        loaded.native_dtype, loaded.dtype_measurements, loaded.from_cache = native, measurements, from_cache
        loaded.load_seconds = time.perf_counter() - started
        loaded.quantization, loaded.weights_folder = quantization, weights_folder(source, load_path, revision)
        return loaded
    tried = ", ".join(dtype_name(dtype) for dtype in candidates)
    raise HereticError(f"Could not load {name} in any of the dtypes {tried} ({'; '.join(failures)}).")


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
    device_map: str,
    max_memory: dict[str, str] | None,
    quantization: str,
) -> LoadedModel:
    multimodal = is_multimodal_config(config)
    kwargs: dict[str, Any] = dict(common, dtype=dtype)
    kwargs["device_map"] = _parse_device_map(device_map)
    if max_memory:
        kwargs["max_memory"] = {(int(key) if key.isdigit() else key): value for key, value in max_memory.items()}
    if quantization != "none":
        kwargs["quantization_config"] = _bnb_config(quantization, dtype)
    model_class = _model_class(multimodal)
    try:
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


def _model_class(multimodal: bool) -> Any:
    if multimodal:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def _parse_device_map(device_map: str) -> Any:
    text = device_map.strip()
    if text.startswith("{"):
        return json.loads(text)
    if text == "auto" and not torch.cuda.is_available() and not _mps_available():
        return None  # plain CPU load: no accelerate dispatch hooks in the forward pass
    return text


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


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


@torch.inference_mode()
def first_token_check(loaded: LoadedModel) -> str | None:
    """Run one forward pass on a chat prompt; a problem description if the logits are not finite."""
    from .chat import format_chat

    text = format_chat(loaded.tokenizer, "You are a helpful assistant.", "Say hello.", response_prefix="")
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(loaded.input_device)
    logits = loaded.model(**ids, use_cache=False, logits_to_keep=1).logits
    if not torch.isfinite(logits).all():
        return "the test generation produced NaN or infinite logits"
    return None
