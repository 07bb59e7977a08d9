"""GGUF export for llama.cpp and Ollama.

Two ways to a file:

* a full conversion of an in-memory llama, mistral, qwen2, qwen3, phi3 or gemma3 model: hyper-parameters, tokenizer and
  every tensor, laid out the way llama.cpp reads them;
* a copy of the GGUF the model was loaded from, byte for byte, with only the edited tensors replaced,
  so the untouched tensors keep their original (often smaller, k-quant) encoding.

Tensors are produced and written one at a time, and the file appears at its final path only once it
is complete (written beside it, then renamed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType, Keys, LlamaFileType, TokenType
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import HereticError, write_failure

log = logging.getLogger(__name__)

GGUF_TYPES = ("f16", "bf16", "q8_0")

_OUT_QTYPES = {"f16": QType.F16, "bf16": QType.BF16, "q8_0": QType.Q8_0}
_FILE_TYPES = {"f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}
# Rows are quantized this many values at a time, so a large embedding never needs several float copies.
_QUANT_CHUNK_VALUES = 1 << 22


@dataclass(frozen=True)
class _Family:
    """How one transformers model family is written for llama.cpp."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # llama.cpp's llama graph rotates adjacent pairs; transformers rotates halves
    norm_offset: bool = False  # transformers' Gemma RMSNorm scales by (1 + w); llama.cpp stores 1 + w itself


# Full conversion: transformers model_type -> family.
_FAMILIES: dict[str, _Family] = {
    "llama": _Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": _Family(gguf.MODEL_ARCH.QWEN2),
    "qwen3": _Family(gguf.MODEL_ARCH.QWEN3),
    "mistral": _Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),  # llama.cpp runs Mistral as a llama
    "phi3": _Family(gguf.MODEL_ARCH.PHI3),
    "gemma3_text": _Family(gguf.MODEL_ARCH.GEMMA3, norm_offset=True),
    "gemma3": _Family(gguf.MODEL_ARCH.GEMMA3, norm_offset=True),  # the language model of Gemma3ForConditionalGeneration
}
_SUPPORTED_NAMES = "llama, mistral, qwen2, qwen3, phi3 and gemma3"

# Copy from a source GGUF: the GGUF architectures whose tensors transformers loads with, at most, the
# two transforms above (so that reversing those gives back llama.cpp's layout). Others are refused.
_SOURCE_FAMILIES: dict[str, _Family] = {
    "llama": _Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": _Family(gguf.MODEL_ARCH.QWEN2),
    "qwen3": _Family(gguf.MODEL_ARCH.QWEN3),
    "phi3": _Family(gguf.MODEL_ARCH.PHI3),
    "gemma2": _Family(gguf.MODEL_ARCH.GEMMA2, norm_offset=True),
    "gemma3": _Family(gguf.MODEL_ARCH.GEMMA3, norm_offset=True),
    "nemotron": _Family(gguf.MODEL_ARCH.NEMOTRON, norm_offset=True),
}

# State-dict prefixes of wrapped or multimodal models, reduced to a plain causal LM's names.
_NAME_PREFIXES = (
    ("base_model.model.", ""),
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
# Parts of a multimodal model that a text-only GGUF leaves out (llama.cpp keeps them in an mmproj file).
_SKIPPED_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")

# Split regexes of well-known byte-level BPE tokenizers, and the name llama.cpp knows each by.
_SPLIT_HEAD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_SPLIT_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_BPE_SPLITS = {
    _SPLIT_HEAD + r"\p{N}" + _SPLIT_TAIL: "qwen2",  # digits one at a time
    _SPLIT_HEAD + r"\p{N}{1,3}" + _SPLIT_TAIL: "llama-bpe",  # digits in threes (Llama 3)
}
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class _Tensor:
    """One tensor of the output file: known up front, produced only when it is written."""

    name: str
    shape: tuple[int, ...]  # numpy order (rows last-but-one, the contiguous axis last)
    qtype: QType
    nbytes: int
    produce: Callable[[], np.ndarray]


# --------------------------------------------------------------------------------------------------
# Public entry point


def export_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_file: Path,
    out_type: str = "q8_0",
    source_gguf: Path | None = None,
    changed_parameters: set[str] | None = None,
) -> Path:
    """Write `model` as a GGUF file at `out_file` and return its path.

    With `source_gguf`, everything is copied from that file except the tensors of `changed_parameters`
    (transformers state-dict names), which come from `model` in `out_type`. Without it, the whole model
    and `tokenizer` are converted, 2-D weights in `out_type` and 1-D tensors in F32.
    """
    if out_type not in GGUF_TYPES:
        raise HereticError(f"Unknown GGUF type {out_type!r}; choose one of {', '.join(GGUF_TYPES)}.")
    out_file = Path(out_file).expanduser().resolve()
    if source_gguf is not None:
        return _export_from_source(model, Path(source_gguf), out_file, out_type, set(changed_parameters or ()))
    return _export_full(model, tokenizer, out_file, out_type)


# --------------------------------------------------------------------------------------------------
# Writing


def _write_file(out_file: Path, writer: gguf.GGUFWriter, tensors: list[_Tensor]) -> Path:
    """Stream `tensors` into a temporary file beside `out_file`, then rename it into place."""
    for tensor in tensors:
        # A non-uint8 dtype tells the writer that `shape` is the logical shape, not a byte shape.
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.qtype)
    partial = out_file.with_name(f".{out_file.name}.partial-{os.getpid()}")
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        writer.open_output_file(partial)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for index, tensor in enumerate(tensors, 1):
            data = tensor.produce()
            if data.nbytes != tensor.nbytes:
                raise RuntimeError(f"GGUF tensor {tensor.name} came out as {data.nbytes} bytes, expected {tensor.nbytes}.")
            writer.write_tensor_data(data)
            del data
            if index % 50 == 0 or index == len(tensors):
                log.info("GGUF: wrote %d/%d tensors", index, len(tensors))
        writer.flush()
        for handle in writer.fout or ():
            os.fsync(handle.fileno())
        writer.close()
        os.replace(partial, out_file)
    except BaseException as error:
        with contextlib.suppress(OSError):  # the buffered rest cannot be written either
            writer.close()
        with contextlib.suppress(OSError):  # on a read-only disk even a missing file cannot be unlinked
            partial.unlink(missing_ok=True)
        failure = write_failure(error, out_file, "the GGUF file", "--output-dir") if isinstance(error, Exception) else None
        if failure is not None:
            raise failure from None
        raise
    log.info("GGUF written to %s (%.1f MB)", out_file, out_file.stat().st_size / 1e6)
    return out_file


def _qtype_for(shape: tuple[int, ...], out_type: str) -> QType:
    """1-D tensors (norms, biases) stay F32; matrices take `out_type` where its blocks fit the rows."""
    if len(shape) < 2:
        return QType.F32
    qtype = _OUT_QTYPES[out_type]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block != 0:
        log.info("GGUF: rows of %d values do not fit %s blocks; writing that tensor as F16", shape[-1], out_type)
        return QType.F16
    return qtype


def _nbytes(shape: tuple[int, ...], qtype: QType) -> int:
    return (
        math.prod(gguf.quant_shape_to_byte_shape(shape, qtype))
        if qtype not in (QType.F32, QType.F16)
        else (math.prod(shape) * (4 if qtype == QType.F32 else 2))
    )


def _encode(values: torch.Tensor, qtype: QType) -> np.ndarray:
    """The bytes of a float tensor (on any device) in `qtype`."""
    if qtype == QType.F32:
        return values.detach().to("cpu", torch.float32).contiguous().numpy()
    if qtype == QType.F16:
        return values.detach().to("cpu", torch.float16).contiguous().numpy()
    if qtype == QType.BF16:
        return values.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    return _quantize_rows(values, qtype)


def _quantize_rows(values: torch.Tensor, qtype: QType) -> np.ndarray:
    """`gguf.quants.quantize`, a band of rows at a time, so only that band is ever held as float32."""
    rows = values.reshape(-1, values.shape[-1])
    out = np.empty(gguf.quant_shape_to_byte_shape(tuple(rows.shape), qtype), dtype=np.uint8)
    step = max(1, _QUANT_CHUNK_VALUES // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        band = rows[start : start + step].detach().to("cpu", torch.float32).numpy()
        out[start : start + step] = gguf.quants.quantize(band, qtype)
    return out.reshape(gguf.quant_shape_to_byte_shape(tuple(values.shape), qtype))


# --------------------------------------------------------------------------------------------------
# Tensor layout conventions


def _hf_name(name: str) -> str:
    for prefix, replacement in _NAME_PREFIXES:
        if name.startswith(prefix):
            name = replacement + name[len(prefix) :]
    return name


def _gguf_name(name_map: gguf.TensorNameMap, hf_name: str) -> str | None:
    return name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def _to_llama_cpp(family: _Family, gguf_name: str, values: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """Undo, for one tensor, what transformers' GGUF loader does to it on the way in."""
    base = gguf_name.rsplit(".", 1)[0]
    if family.permute_qk and base.endswith((".attn_q", ".attn_k")):
        values = _interleave_rotary_rows(values, heads if base.endswith(".attn_q") else kv_heads)
    if family.norm_offset and base.endswith("norm"):
        values = values.to(torch.float32) + 1.0  # Gemma RMSNorm scales by (1 + w); llama.cpp multiplies by w
    return values


def _interleave_rotary_rows(values: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp expects Q/K rows interleaved for its rotary kernel (pairs (0, d/2), (1, d/2+1)... made adjacent)."""
    shape = values.shape
    head_dim = shape[0] // heads
    return values.reshape(heads, 2, head_dim // 2, *shape[1:]).transpose(1, 2).reshape(shape)


# --------------------------------------------------------------------------------------------------
# Full conversion


def _export_full(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_file: Path, out_type: str) -> Path:
    family = _family_of(model)
    config = model.config.get_text_config()
    arch_name = gguf.MODEL_ARCH_NAMES[family.arch]
    tensors = _model_tensors(model, family, config, out_type)
    n_vocab = model.get_input_embeddings().weight.shape[0]

    writer = gguf.GGUFWriter(path=None, arch=arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(_model_name(model))
    _add_hyperparameters(writer, family, config, n_vocab)
    writer.add_file_type(_FILE_TYPES[out_type])
    if any(t.qtype not in (QType.F32, QType.F16, QType.BF16) for t in tensors):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config, n_vocab)
    tensors += _rope_freq_tensors(family, config)
    log.info("GGUF: converting %s (%s, %d tensors) to %s", arch_name, out_type, len(tensors), out_file.name)
    return _write_file(out_file, writer, tensors)


def _family_of(model: PreTrainedModel) -> _Family:
    model_type = getattr(model.config, "model_type", None) or type(model).__name__
    if model_type not in _FAMILIES:
        raise HereticError(
            f"GGUF export does not support the {model_type} architecture ({type(model).__name__}); "
            f"supported architectures are {_SUPPORTED_NAMES}."
        )
    return _FAMILIES[model_type]


def _model_name(model: PreTrainedModel) -> str:
    path = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "")
    return Path(path.rstrip("/")).name or "model"


def _tied(model: PreTrainedModel) -> bool:
    """Whether the output projection is the embedding matrix (llama.cpp then reuses token_embd)."""
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None:
        return True
    return output.weight is embedding.weight or output.weight.data_ptr() == embedding.weight.data_ptr()


def _model_tensors(model: PreTrainedModel, family: _Family, config: Any, out_type: str) -> list[_Tensor]:
    name_map = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    heads, kv_heads = _head_counts(config)
    tied = _tied(model)
    tensors = []
    for raw_name, parameter in model.state_dict().items():
        hf_name = _hf_name(raw_name)
        if hf_name.startswith(_SKIPPED_PREFIXES) or (tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = _gguf_name(name_map, hf_name)
        if gguf_name is None:
            raise HereticError(f"GGUF export has no llama.cpp name for the tensor {raw_name} of this {config.model_type} model.")
        tensors.append(_model_tensor(family, gguf_name, parameter, out_type, heads, kv_heads))
    return tensors


def _model_tensor(family: _Family, gguf_name: str, parameter: torch.Tensor, out_type: str, heads: int, kv_heads: int) -> _Tensor:
    shape = tuple(parameter.shape)
    qtype = _qtype_for(shape, out_type)

    def produce() -> np.ndarray:
        values = parameter.detach().to("cpu")
        return _encode(_to_llama_cpp(family, gguf_name, values, heads, kv_heads), qtype)

    return _Tensor(gguf_name, shape, qtype, _nbytes(shape, qtype), produce)


def _head_counts(config: Any) -> tuple[int, int]:
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hyperparameters(writer: gguf.GGUFWriter, family: _Family, config: Any, n_vocab: int) -> None:
    heads, kv_heads = _head_counts(config)
    head_dim = _head_dim(config)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    # Always written: llama.cpp assumes hidden_size / heads when it is missing, transformers' GGUF loader the
    # config class's default head_dim (128 for Qwen 3), and either may differ from the model's.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if family.arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_rope_dimension_count(head_dim)
    full, sliding = _rope_parameters(config)
    writer.add_rope_freq_base(float(full["rope_theta"]))
    _add_rope_scaling(writer, family, full)
    if family.arch == gguf.MODEL_ARCH.GEMMA3:
        _add_gemma3(writer, config, sliding)
    elif getattr(config, "use_sliding_window", getattr(config, "sliding_window", None)):
        log.warning("GGUF: llama.cpp runs %s with full attention; the model's sliding window is not kept.", config.model_type)


def _rope_parameters(config: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Rotary parameters of the full-attention layers and, where they differ, of the sliding ones."""
    parameters = getattr(config, "rope_parameters", None)
    if not parameters:
        parameters = {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
    if "full_attention" in parameters or "sliding_attention" in parameters:
        full = parameters.get("full_attention") or parameters["sliding_attention"]
        return dict(full), parameters.get("sliding_attention")
    return dict(parameters), None


def _add_rope_scaling(writer: gguf.GGUFWriter, family: _Family, rope: dict[str, Any]) -> None:
    kind = rope.get("rope_type") or "default"
    if kind == "default" or (kind == "llama3" and family.arch == gguf.MODEL_ARCH.LLAMA):
        return  # llama3 scaling is carried by the rope_freqs tensor instead
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if rope.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    else:
        raise HereticError(f"GGUF export cannot express the rotary scaling type {kind!r} of this model for llama.cpp.")


def _rope_freq_tensors(family: _Family, config: Any) -> list[_Tensor]:
    """Llama 3.1-style rotary scaling, which llama.cpp reads as per-frequency divisors in rope_freqs."""
    full, _ = _rope_parameters(config)
    if family.arch != gguf.MODEL_ARCH.LLAMA or full.get("rope_type") != "llama3":
        return []
    factors = _llama3_rope_factors(full, _head_dim(config))
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return [_Tensor(name, factors.shape, QType.F32, factors.nbytes, lambda: factors)]


def _llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Each frequency's divisor: 1 for short wavelengths, `factor` for long ones, blended in between."""
    base, factor = float(rope["rope_theta"]), float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    context = float(rope.get("original_max_position_embeddings", 8192))
    frequencies = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelengths = 2 * math.pi / frequencies
    smooth = np.clip((context / wavelengths - low) / (high - low), 0.0, 1.0)
    return (1.0 / ((1 - smooth) / factor + smooth)).astype(np.float32)


def _add_gemma3(writer: gguf.GGUFWriter, config: Any, sliding: dict[str, Any] | None) -> None:
    if config.sliding_window:
        writer.add_sliding_window(int(config.sliding_window))
    if sliding is not None:
        writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
        if (sliding.get("rope_type") or "default") != "default":
            raise HereticError("GGUF export cannot express rotary scaling on Gemma 3's sliding-window layers for llama.cpp.")
    _check_gemma3_query_scale(config)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    layer_types = getattr(config, "layer_types", None) or []
    if layer_types and any((kind == "full_attention") != ((i + 1) % 6 == 0) for i, kind in enumerate(layer_types)):
        log.warning("GGUF: llama.cpp assumes every sixth Gemma 3 layer is global; this model's layer pattern differs.")


def _check_gemma3_query_scale(config: Any) -> None:
    """llama.cpp scales Gemma 3 queries by 1/sqrt(head_dim), or by 1/sqrt(hidden_size / heads) for its
    62-layer (27B) model, and ignores attention.scale; a model with another query_pre_attn_scalar would
    run with the wrong attention there."""
    scalar = getattr(config, "query_pre_attn_scalar", None)
    expected = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 62 else _head_dim(config)
    if scalar and scalar != expected:
        raise HereticError(
            f"GGUF export cannot write this Gemma 3 model for llama.cpp: its query_pre_attn_scalar is {scalar}, but "
            f"llama.cpp scales queries by 1/sqrt({expected}) for this shape; save it as a transformers model instead."
        )


# --------------------------------------------------------------------------------------------------
# Tokenizer


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, config: Any, n_vocab: int) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise HereticError(
            f"The tokenizer {type(tokenizer).__name__} has no fast (tokenizers) backend, so GGUF export cannot write it."
        )
    spec = json.loads(backend.to_str())
    model_type = spec["model"]["type"]
    kind = _tokenizer_kind(spec)
    tokens, types = _vocabulary(backend, kind, n_vocab, tokenizer)
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(_bpe_pre_name(spec))
    else:
        writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "llama":
        writer.add_token_scores(_scores(spec, tokens))
    if model_type == "BPE":
        writer.add_token_merges(_merges(spec))
    _add_special_tokens(writer, tokenizer, config, kind)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        named = template if isinstance(template, str) else [{"name": k, "template": v} for k, v in template.items()]
        writer.add_chat_template(named)


def _tokenizer_kind(spec: dict[str, Any]) -> str:
    """llama.cpp's tokenizer model: "gpt2" (byte-level BPE) or "llama" (sentencepiece-style)."""
    model = spec["model"]
    if model["type"] == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        return "gpt2"
    if model["type"] == "BPE" and model.get("byte_fallback"):
        return "llama"
    if model["type"] == "Unigram":
        return "llama"
    raise HereticError(
        f"GGUF export cannot write a {model['type']} tokenizer; "
        "only byte-level BPE and sentencepiece-style (BPE with byte fallback, or unigram) tokenizers are supported."
    )


def _bpe_pre_name(spec: dict[str, Any]) -> str:
    """The name llama.cpp knows this byte-level tokenizer's text splitting by."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    regexes = [step["pattern"].get("Regex") for step in steps if step.get("type") == "Split"]
    kinds = [step.get("type") for step in steps]
    if len(regexes) == 1 and regexes[0] in _BPE_SPLITS:
        return _BPE_SPLITS[regexes[0]]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # single digits, then GPT-2's split
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    log.warning("GGUF: this tokenizer's text splitting is not one llama.cpp knows by name; it will use its default.")
    return "default"


def _vocabulary(backend: Any, kind: str, n_vocab: int, tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], list[int]]:
    """Tokens in id order, padded to the embedding's row count, and llama.cpp's type for each."""
    by_id = {index: token for token, index in backend.get_vocab(with_added_tokens=True).items()}
    if by_id and max(by_id) >= n_vocab:
        raise HereticError(f"The tokenizer has ids up to {max(by_id)} but the model embeds only {n_vocab} tokens.")
    added = backend.get_added_tokens_decoder()
    special = set(tokenizer.all_special_ids)
    unk = tokenizer.unk_token_id
    tokens, types = [], []
    for index in range(n_vocab):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")  # llama.cpp wants one token per embedding row
            types.append(TokenType.UNUSED)
            continue
        tokens.append(token)
        if token == f"[PAD{index}]":  # a padding entry of a vocabulary that was itself read from a GGUF
            types.append(TokenType.UNUSED)
        elif index in added:
            types.append(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
        elif index == unk:
            types.append(TokenType.UNKNOWN)
        elif index in special:
            types.append(TokenType.CONTROL)
        elif kind == "llama" and _BYTE_TOKEN.match(token):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _merges(spec: dict[str, Any]) -> list[str]:
    return [" ".join(merge) if isinstance(merge, list) else merge for merge in spec["model"]["merges"]]


def _scores(spec: dict[str, Any], tokens: list[str]) -> list[float]:
    """Sentencepiece scores: a unigram's own, or for BPE minus the rank of the merge that makes the token."""
    model = spec["model"]
    if model["type"] == "Unigram":
        table = {piece: float(score) for piece, score in model["vocab"]}
        return [table.get(token, 0.0) for token in tokens]
    rank: dict[str, float] = {}
    for position, merge in enumerate(_merges(spec)):
        rank.setdefault(merge.replace(" ", ""), -float(position))
    return [rank.get(token, 0.0) for token in tokens]


def _add_special_tokens(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, config: Any, kind: str) -> None:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _first(getattr(config, "bos_token_id", None))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else _first(getattr(config, "eos_token_id", None))
    for token_id, add in (
        (bos, writer.add_bos_token_id),
        (eos, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(int(token_id))
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(bool(bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]))
    writer.add_add_eos_token(bool(eos is not None and with_special[-1:] == [eos] and plain[-1:] != [eos]))
    if kind == "llama":
        pieces = tokenizer.backend_tokenizer.encode("a", add_special_tokens=False).tokens
        writer.add_add_space_prefix(bool(pieces) and pieces[0].startswith("\u2581"))


def _first(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


# --------------------------------------------------------------------------------------------------
# Copy from the source GGUF


def _export_from_source(model: PreTrainedModel, source: Path, out_file: Path, out_type: str, changed: set[str]) -> Path:
    state = model.state_dict()
    unknown = sorted(changed - state.keys())
    if unknown:
        raise HereticError(f"The edited parameter {unknown[0]} is not a parameter of this model.")
    reader = _open_source(source)
    if reader.byte_order != "I":  # "I" is the reader's mark for a file in the host's byte order
        raise HereticError(f"GGUF export cannot copy {source.name}: its byte order differs from this machine's.")
    arch_name = reader.fields[Keys.General.ARCHITECTURE].contents()
    family = _SOURCE_FAMILIES.get(arch_name)
    if family is None:
        raise HereticError(
            f"GGUF export cannot replace tensors in a {arch_name} GGUF file; supported source architectures are "
            f"{', '.join(sorted(_SOURCE_FAMILIES))}."
        )
    replaced = _replacements(model, state, family, reader, changed, out_type)
    writer = gguf.GGUFWriter(path=None, arch=arch_name, endianess=reader.endianess)
    _copy_metadata(reader, writer, needs_quant_version=any(t.qtype == QType.Q8_0 for t in replaced.values()))
    tensors = [replaced.get(tensor.name) or _source_tensor(tensor) for tensor in reader.tensors]
    log.info("GGUF: copying %s with %d of %d tensors replaced (%s)", source.name, len(replaced), len(tensors), out_type)
    return _write_file(out_file, writer, tensors)


def _open_source(source: Path) -> gguf.GGUFReader:
    if not source.is_file():
        raise HereticError(f"The source GGUF file {source} does not exist; export without it or restore the file.")
    try:
        return gguf.GGUFReader(source)
    except ValueError as error:
        raise HereticError(f"{source.name} is not a GGUF file this export can read ({error}).") from error


def _replacements(
    model: PreTrainedModel,
    state: dict[str, torch.Tensor],
    family: _Family,
    reader: gguf.GGUFReader,
    changed: set[str],
    out_type: str,
) -> dict[str, _Tensor]:
    """The edited parameters, as tensors named and shaped like the source file's."""
    config = model.config.get_text_config()
    name_map = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    heads, kv_heads = _head_counts(config)
    source_shapes = {tensor.name: tuple(int(n) for n in reversed(tensor.shape.tolist())) for tensor in reader.tensors}
    replaced = {}
    for raw_name in sorted(changed):
        gguf_name = _gguf_name(name_map, _hf_name(raw_name))
        if gguf_name is None or gguf_name not in source_shapes:
            raise HereticError(f"The edited parameter {raw_name} has no matching tensor in the source GGUF file.")
        tensor = _model_tensor(family, gguf_name, state[raw_name], out_type, heads, kv_heads)
        if _squeeze(tensor.shape) != _squeeze(source_shapes[gguf_name]):
            raise HereticError(
                f"The edited parameter {raw_name} has shape {tensor.shape} "
                f"but the source GGUF's {gguf_name} has {source_shapes[gguf_name]}."
            )
        tensor.shape = source_shapes[gguf_name]
        replaced[gguf_name] = tensor
    return replaced


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n for n in shape if n != 1)


def _source_tensor(tensor: Any) -> _Tensor:
    """A tensor of the source file, written back unchanged from its memory map."""
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return _Tensor(tensor.name, shape, QType(tensor.tensor_type), int(tensor.n_bytes), lambda: tensor.data)


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, needs_quant_version: bool) -> None:
    """Every key/value of the source, with its original type.

    general.file_type is kept: it names the encoding of the bulk of the tensors, which are copied as
    they are, and llama.cpp only reports it. general.quantization_version is added if the file gains
    quantized tensors and lacked it.
    """
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == Keys.General.ARCHITECTURE:
            continue  # the header counts are rewritten; the writer adds the architecture itself
        if name == Keys.General.ALIGNMENT:
            writer.data_alignment = int(field.contents())
        value, value_type, sub_type = _field_value(field)
        if value_type == GGUFValueType.ARRAY and len(value) == 0:
            log.warning("GGUF: the empty array %s of the source file is left out.", name)
            continue
        writer.add_key_value(name, value, value_type, sub_type)
    if needs_quant_version and Keys.General.QUANTIZATION_VERSION not in reader.fields:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _field_value(field: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """A reader field as the writer takes it; strings stay raw bytes so they copy exactly."""
    main = GGUFValueType(field.types[0])
    if main == GGUFValueType.STRING:
        return bytes(field.parts[-1]), main, None
    if main != GGUFValueType.ARRAY:
        return field.contents(), main, None
    sub = GGUFValueType(field.types[-1])
    if len(field.types) != 2:
        raise HereticError(f"GGUF export cannot copy the nested array {field.name} of the source file.")
    if sub == GGUFValueType.STRING:
        return [bytes(field.parts[index]) for index in field.data], main, sub
    return field.contents(), main, sub
