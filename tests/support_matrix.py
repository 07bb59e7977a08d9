"""The support matrix: every decoder-only text architecture of transformers' causal-LM mapping, built tiny
and random from its config class by one generic builder, run through the pipeline.

`python tests/support_matrix.py` (make support-matrix) runs every architecture, each in a subprocess with a
time limit, and writes docs/support.md and docs/support.json.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

LAYERS = 4  # layers of a tiny model (more when its layers come in more than four kinds)
HIDDEN = 64
# Architectures of the causal-LM mapping that are not decoder-only text models, and why they are left out.
LEFT_OUT = {
    **dict.fromkeys(
        (
            "bert",
            "bert-generation",
            "big_bird",
            "camembert",
            "data2vec-text",
            "electra",
            "ernie",
            "megatron-bert",
            "rembert",
            "roberta",
            "roberta-prelayernorm",
            "roc_bert",
            "roformer",
            "xlm",
            "xlm-roberta",
            "xlm-roberta-xl",
            "xmod",
            "xlnet",
        ),
        "encoder-only (a bidirectional encoder with a language-model head)",
    ),  # fmt: skip
    **dict.fromkeys(
        (
            "bart",
            "bigbird_pegasus",
            "blenderbot",
            "blenderbot-small",
            "marian",
            "mbart",
            "mvp",
            "pegasus",
            "plbart",
            "prophetnet",
            "trocr",
        ),
        "encoder-decoder (the decoder half of a sequence-to-sequence model)",
    ),  # fmt: skip
    **dict.fromkeys(("whisper", "moshi", "moss_transcribe_diarize"), "audio (speech) model"),
    **dict.fromkeys(("musicgen", "musicgen_melody"), "music model"),
    **dict.fromkeys(
        ("gemma4_assistant", "gemma4_unified_assistant"),
        "speculative-decoding drafter (reads its target model's hidden states and key-value cache; no text model of its own)",
    ),
}
# Multimodal configs with an audio tower: the audio model is left out, its text model (the *_text
# architecture) is in the matrix.
AUDIO_CONFIGS = ("audio_config", "audio_encoder_config", "audio_encoder")

# Families people use most: they must work (tests/test_support_matrix.py).
MUST_WORK = (
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe", "qwen3_next", "gemma2", "gemma3_text",
    "gemma4_text", "phi3", "gpt_oss", "glm4", "glm4_moe", "lfm2", "granitemoehybrid", "deepseek_v3", "olmo2", "smollm3",
)  # fmt: skip

# --- The generic tiny-config builder ----------------------------------------------------------------

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
HIDDEN_KEYS = (
    "hidden_size",
    "hidden_size_global",
    "n_embd",
    "d_model",
    "n_embed",
    "model_dim",
    "embed_dim",
    "word_embed_proj_dim",
)
HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "linear_num_value_heads", "num_attention_heads_local")
KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num", "linear_num_key_heads")
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "n_experts")
TOP_K_KEYS = (
    "num_experts_per_tok", "top_k_experts", "moe_topk", "num_selected_experts", "moe_top_k", "top_k", "moe_k",
    "num_experts_per_token",
)  # fmt: skip
# Exact values of other fields, wherever they appear (small state sizes, chunks and windows).
FIXED = {
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "n_group": 1,
    "num_expert_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "mamba_d_state": 8,
    "state_size": 8,
    "ssm_state_size": 8,
    "mamba_n_heads": 8,
    "mamba_n_groups": 1,
    "n_groups": 1,
    "mamba_chunk_size": 16,
    "chunk_size": 16,
    "sliding_window": 16,
    "attention_chunk_size": 16,
    "hidden_size_per_layer_input": 16,
    "max_position_embeddings": 256,
    "n_positions": 256,
    "n_ctx": 256,
    "block_auto_adjust_ff_dim": False,
    "query_pre_attn_scalar": 16,
    "rotary_dim": 8,
}
QSA_INDEXER = dict(indexer_n_heads=4, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=16, indexer_compress_ratio=4)
# The few fields the generic rules cannot get right, by architecture.
OVERRIDES: dict[str, dict[str, Any]] = {
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "mamba2": dict(num_heads=8, head_dim=16, expand=2),
    "falcon_h1": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_ssm=64, mamba_expand=1, head_dim=16),
    # Defaults of one layer kind only: the hybrids' layers of both kinds.
    "granitemoehybrid": dict(layer_types=["mamba", "attention"] * 2),
    "bamba": dict(attn_layer_indices=[1, 3]),
    "lfm2": dict(layer_types=["conv", "full_attention"] * 2, full_attn_idxs=None),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"] * 2),
    # Query-sparse attention: the indexer's fields are all unset by default (and then its layers cannot be built).
    "qwen4_exp_text": QSA_INDEXER,
    "qwen4_exp": dict(text_config=QSA_INDEXER),
    # Its causal-LM head asks for is_decoder (the default config is an encoder); its axial position embeddings
    # split the hidden size and the longest sequence.
    "reformer": dict(is_decoder=True, axial_pos_embds_dim=[32, 32], axial_pos_shape=[16, 16], feed_forward_size=96),
    "dots3_note_text": dict(head_dim=32),  # its sliding-window layers' heads: qk_nope_head_dim + qk_rope_head_dim
    # The attention reads rope_theta and clip_qkv from its sub-config (as DBRX's checkpoints set them): no defaults.
    "dbrx": dict(attn_config=dict(rope_theta=500000.0, clip_qkv=8.0)),
    # Every layer has its own K/V source: ten layers of the class's default pattern (an indexer in layer 4,
    # layer 9 reading its keys and values), with an index of tiny sizes.
    "kolibri1_1": dict(
        num_hidden_layers=10,
        layer_types=None,
        index_layers=None,
        kv_source_layers=None,
        mlp_only_layers=None,
        index_num_heads=2,
        index_pool_size=64,
        index_compression=4,
        index_topk=16,
        index_num_local_tokens=8,
        index_num_sink_tokens=2,
    ),
    # The class derives these from the hidden size, unless they are given (as in its own to_dict).
    "zamba": dict(
        layers_block_type=["linear_attention", "linear_attention", "hybrid"] * 2,  # its transformer block shared by two layers
        num_hidden_layers=6,
        attention_hidden_size=2 * HIDDEN,
        attention_head_dim=2 * HIDDEN // 4,
        mamba_dt_rank=HIDDEN // 16,
    ),
    "zamba2": dict(
        layers_block_type=["linear_attention", "hybrid"] * 2,  # its transformer block shared by two layers
        hybrid_layer_ids=[1, 3],
        num_hidden_layers=4,
        attention_hidden_size=2 * HIDDEN,
        attention_head_dim=2 * HIDDEN // 4,
        kv_channels=HIDDEN // 4,
        mamba_headdim=16,
    ),
    # Its state sizes are rounded up to multiples of 64: a width of 128 keeps them those of its layers.
    "xlstm": dict(hidden_size=2 * HIDDEN, embedding_dim=2 * HIDDEN, num_blocks=LAYERS),
    # Layers come as (attention, mlp) pairs in the config: 4 layers, 1 input, 2 recurrent, 1 output.
    "dory": dict(
        num_hidden_layers=8,
        layer_types=["sliding_attention", "mlp"] * 3 + ["full_attention", "mlp"],
        n_input_layers=2,
        n_recurrent_layers=4,
        n_output_layers=2,
    ),
    # transformers' GGUF loader takes these from the config class's defaults, not from the file: kept, so that
    # the exported file is read back as the model it was written from.
    "qwen3": dict(head_dim=128),
    "gemma3_text": dict(head_dim=256, query_pre_attn_scalar=256),
    "gemma3": dict(text_config=dict(head_dim=256, query_pre_attn_scalar=256)),
}
SPECIAL_IDS = dict(eos_token_id=2, pad_token_id=0, bos_token_id=0)


def _shrunk_value(key: str, value: Any, heads: int) -> Any:
    """The tiny model's value of one scalar config field (None: keep the original)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return FIXED.get(key) if key in FIXED and value is not None and not isinstance(value, (list, dict)) else None
    if key in FIXED:
        return FIXED[key] if value > 0 else None
    if "vocab_size" in key:
        return 512
    if key in HIDDEN_KEYS:
        return HIDDEN
    if "intermediate_size" in key or key in ("n_inner", "ffn_dim", "ffn_hidden_size", "d_ff", "d_inner"):
        return 96 if key in ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "d_ff", "d_inner") else 32
    if key in HEAD_KEYS:
        return 4
    if key in KV_HEAD_KEYS:
        return 4 if value >= heads else 2
    if "head_dim" in key or key in ("mamba_d_head", "attention_head_size"):
        return 16
    if key in EXPERT_KEYS:
        return 4
    if key in TOP_K_KEYS:
        return min(value, 2)  # a router of one expert (ZAYA accepts no other) keeps it
    if key == "first_k_dense_replace" or ("layers" in key and key not in LAYER_COUNT_KEYS and key.startswith("num_")):
        return min(value, 1)
    return None


def _layer_signatures(config: dict[str, Any], count: int) -> list[tuple[Any, ...]]:
    """What distinguishes each layer in the config: its entry in every per-layer list and dict, and
    whether it is in every list of layer indices."""
    signatures: list[tuple[Any, ...]] = []
    for index in range(count):
        signature: list[Any] = []
        for key, value in sorted(config.items()):
            if _is_per_layer_list(value, count):
                signature.append(json.dumps(value[index], sort_keys=True, default=str))
            elif _is_index_list(key, value, count):
                signature.append(index in value)
            elif _is_per_layer_dict(key, value):
                signature.append(json.dumps(_per_layer_entry(value, index), sort_keys=True, default=str))
        signature.append(index < int(config.get("first_k_dense_replace") or 0))
        signatures.append(tuple(signature))
    return signatures


def _is_per_layer_list(value: Any, count: int) -> bool:
    return isinstance(value, list) and len(value) == count and count > 1 and value != list(range(count))


def _is_index_list(key: str, value: Any, count: int) -> bool:
    """A list of layer indices (increasing, all below the layer count)."""
    return (
        isinstance(value, list)
        and ("layer" in key or "idx" in key or "indices" in key)
        and all(isinstance(item, int) and not isinstance(item, bool) and 0 <= item < count for item in value)
        and value == sorted(set(value))
        and (len(value) != count or value == list(range(count)))
    )


def _is_per_layer_dict(key: str, value: Any) -> bool:
    return "layer" in key and isinstance(value, dict) and bool(value) and all(re.fullmatch(r"\d+", str(k)) for k in value)


def _per_layer_entry(value: dict[str, Any], index: int) -> Any:
    for key, entry in value.items():
        if int(key) == index:
            return entry
    return None


def pick_layers(config: dict[str, Any], count: int) -> list[int]:
    """Original layer indices the tiny model keeps, LAYERS at least: the first layers up to the first of the
    last kind to appear when that is within 8 (the model's layer pattern is kept: a GGUF reader may assume
    it), else the first layer of each kind and then the first others, in order."""
    signatures = _layer_signatures(config, count)
    picked: list[int] = []
    for index, signature in enumerate(signatures):
        if signature not in {signatures[i] for i in picked}:
            picked.append(index)
    if picked[-1] < 8:
        return list(range(min(count, max(LAYERS, picked[-1] + 1))))
    for index in range(count):
        if len(picked) >= min(LAYERS, count):
            break
        if index not in picked:
            picked.append(index)
    return sorted(picked)


def _shrink_layers(config: dict[str, Any], count: int, picked: list[int]) -> None:
    """Every per-layer field of `config` reduced to the picked layers."""
    for key, value in list(config.items()):
        if _is_per_layer_list(value, count):
            config[key] = [value[index] for index in picked]
        elif _is_index_list(key, value, count):
            config[key] = [new for new, old in enumerate(picked) if old in value]
        elif _is_per_layer_dict(key, value):
            kept = {new: _per_layer_entry(value, old) for new, old in enumerate(picked)}
            width = len(str(next(iter(value))))
            config[key] = {str(new).zfill(width): shrink(entry) for new, entry in kept.items() if entry is not None}


def shrink(config: dict[str, Any], tower: bool = False) -> dict[str, Any]:
    """A tiny version of a config dict (sub-configs too): small widths, few heads, experts and layers;
    a tower (vision or audio sub-config) keeps one layer."""
    config = dict(config)
    heads = next((int(config[key]) for key in HEAD_KEYS if isinstance(config.get(key), int)), 4)
    count_key = next((key for key in LAYER_COUNT_KEYS if isinstance(config.get(key), int)), None)
    if count_key is not None:
        count = int(config[count_key])
        picked = [0] if tower else pick_layers(config, count)
        _shrink_layers(config, count, picked)
        config[count_key] = len(picked)
        if config.get("first_k_dense_replace"):
            config["first_k_dense_replace"] = 1
    for key, value in list(config.items()):
        if key == count_key or key == "first_k_dense_replace":
            continue
        if isinstance(value, dict) and key.endswith("config"):
            config[key] = shrink(value, tower=any(part in key for part in ("vision", "visual", "audio", "vq")))
            continue
        new = _shrunk_value(key, value, heads)
        if new is not None:
            config[key] = new
    _consistent_head_dims(config)
    _unset_sizes(config)
    if any(isinstance(config.get(key), int) for key in EXPERT_KEYS) and config.get("num_experts_per_tok", 0) is None:
        config["num_experts_per_tok"] = 2  # a MoE whose default leaves the router's top-k unset
    return config


def _consistent_head_dims(config: dict[str, Any]) -> None:
    """Fields derived from others (multi-head latent attention's query head = nope + rope parts)."""
    if isinstance(config.get("qk_nope_head_dim"), int) and isinstance(config.get("qk_rope_head_dim"), int):
        config["qk_head_dim"] = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    if "hidden_size" in config and "dim" in config and isinstance(config["dim"], int):
        config["dim"] = config["hidden_size"]


def _unset_sizes(config: dict[str, Any]) -> None:
    """Sizes a config class leaves unset (None) for its model to fail on, set by the usual relations: a head of
    hidden / heads, as many key-value heads as query heads, the default rotary embedding for each layer type."""
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if "head_dim" in config and config["head_dim"] is None and isinstance(heads, int) and isinstance(hidden, int):
        config["head_dim"] = hidden // heads
    if "num_key_value_heads" in config and config["num_key_value_heads"] is None and isinstance(heads, int):
        config["num_key_value_heads"] = heads
    if "moe_intermediate_size" in config:  # a MoE family whose expert counts are unset by default (dots.llm1)
        for keys, value in ((EXPERT_KEYS, 4), (TOP_K_KEYS, 2), (("n_shared_experts",), 1)):
            for key in keys:
                if key in config and config[key] is None:
                    config[key] = value
    if config.get("rope_parameters") == {} and isinstance(config.get("layer_types"), list):
        config["rope_parameters"] = {kind: dict(rope_type="default", rope_theta=10000.0) for kind in config["layer_types"]}


def _special_ids(config: dict[str, Any]) -> None:
    """The tokenizer's special ids (tests/tiny.py): eos 2, pad and bos 0; other token ids (images, ...)
    become 3, 4, 5, ... (in the vocabulary)."""
    next_id = 3
    for key, value in sorted(config.items()):
        if key in SPECIAL_IDS:
            config[key] = SPECIAL_IDS[key]
        elif (key.endswith("token_id") or key.endswith("token_index")) and isinstance(value, int):
            config[key], next_id = next_id, next_id + 1
        elif isinstance(value, dict) and key.endswith("config"):
            _special_ids(value)


def tiny_config(model_type: str) -> Any:
    """The config of a tiny random model of `model_type`, from its config class's defaults."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type).to_dict()
    values = shrink(defaults)
    for key, value in OVERRIDES.get(model_type, {}).items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    _special_ids(values)
    for key in SPECIAL_IDS:
        values.setdefault(key, SPECIAL_IDS[key])
    values.pop("transformers_version", None)
    return AutoConfig.for_model(model_type, **{k: v for k, v in values.items() if k != "model_type"})


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of `model_type` (float32), its norm weights varied (as trained ones are)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 1:
                weight.add_(0.3 * torch.randn(weight.shape, generator=generator))
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model.eval()


# --- The pipeline on one architecture ---------------------------------------------------------------


@dataclass
class Result:
    """One architecture's row of the matrix. status: "works", "refused" (sentence: the one the user is
    given) or "broken" (sentence: what failed)."""

    architecture: str
    status: str = "works"
    sentence: str = ""
    components: list[str] = field(default_factory=list)  # what is ablated, by kind of layer
    gguf: str = ""  # "loaded back", or why there is no GGUF
    dtypes: dict[str, str] = field(default_factory=dict)  # dtype -> "finite" or what was not
    seconds: float = 0.0


def save_tiny_model(model_type: str, folder: Path) -> Path:
    from tiny import make_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tiny_model(model_type).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def pipeline_settings(folder: Path, work: Path, dtype: str) -> Any:
    from heretic.config import Settings

    return Settings.model_validate(
        dict(
            model=str(folder),
            harmful_prompts="bundled:harmful_train[:6]",
            harmless_prompts="bundled:harmless_train[:6]",
            harmful_eval_prompts="bundled:harmful_test[:4]",
            harmless_eval_prompts="bundled:harmless_test[:4]",
            refusal_markers=["ak", "ook", "ot"],
            max_response_length=4,
            batch_size=8,
            n_trials=1,
            dtypes=[dtype],
            checkpoint_dir=str(work / "checkpoints"),
            cache_dir=str(work / "cache"),
            headless=True,
            output_dir=str(work / "out"),
        )
    )


def default_parameters(num_layers: int, components: list[str], weight: float = 1.0, flat: bool = False) -> Any:
    """A trial's ablation: the direction of the middle layer, weight `weight` peaking in the middle layer
    and falling to half of it at the ends (`flat`: the same weight in every layer)."""
    from heretic.ablation.parameters import AblationParameters, ComponentKernel

    middle = (num_layers - 1) / 2
    kernel = ComponentKernel(weight, middle, weight if flat else weight / 2, max(num_layers, 1))
    return AblationParameters("global", middle, dict.fromkeys(components, kernel))


def check_architecture(model_type: str, work: Path, other_dtypes: tuple[str, ...] = ("bfloat16",)) -> Result:
    """The whole pipeline on a tiny `model_type` in float32, and load, directions and a trial in each of
    `other_dtypes`: a refusal with one sentence is `refused`, anything else that fails is `broken`."""
    import time

    from heretic.errors import HereticError

    started = time.perf_counter()
    result = Result(model_type)
    try:
        folder = save_tiny_model(model_type, work / "model")
        unrunnable = transformers_failure(folder, "float32")
        if unrunnable:
            raise NotRunnable(unrunnable)
        _float32_pipeline(result, folder, work / "float32")
        for dtype in other_dtypes:
            unrunnable = transformers_failure(folder, dtype)  # noted in its cell: the family works in float32
            result.dtypes[dtype] = unrunnable or _numerical_health(folder, work / dtype, dtype)
            if not unrunnable and result.dtypes[dtype] != "finite":
                result.status, result.sentence = "broken", result.dtypes[dtype]
        missed = unablated_writes(model_type)
        if missed:
            result.status, result.sentence = "broken", missed
    except (HereticError, NotRunnable) as error:
        result.status, result.sentence = "refused", str(error)
    except Exception as error:  # noqa: BLE001 - the matrix records every failure
        result.status, result.sentence = "broken", f"{type(error).__name__}: {error}".splitlines()[0][:400]
    result.seconds = round(time.perf_counter() - started, 1)
    return result


class NotRunnable(Exception):
    """transformers itself cannot run the tiny model: the row is refused with that sentence."""


def saved_class(folder: Path) -> Any:
    """The class a model folder was saved from (AutoModelForCausalLM does not map the text halves of Emu3 and Mllama)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    named = (AutoConfig.from_pretrained(folder).architectures or [""])[0]
    return getattr(transformers, named, AutoModelForCausalLM)


def transformers_failure(folder: Path, dtype: str) -> str:
    """ "" when transformers alone (no Heretic) runs the saved tiny model in `dtype`: loaded, one forward pass with
    a cache; else one sentence saying it cannot."""
    import transformers

    try:
        model = saved_class(folder).from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
        prompt = torch.arange(5, 45)[None]  # as long as a chat prompt (chunked kernels take over beyond a chunk)
        with torch.no_grad():
            model(input_ids=prompt, use_cache=True)
            model(input_ids=prompt, use_cache=False)  # the first pass of a load, and the directions' passes
    except Exception as error:  # noqa: BLE001 - any failure of transformers' own forward pass
        what = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        return f"Not runnable: transformers {transformers.__version__} itself cannot run this model in {dtype} ({what})."
    return ""


def _float32_pipeline(result: Result, folder: Path, work: Path) -> None:
    """load, map, directions, one trial, merged save and reload, adapter save, GGUF export."""
    from heretic.session import prepare

    session = prepare(pipeline_settings(folder, work, "float32"), interactive=False)
    result.components = session.arch.layer_kinds()
    warning = session.arch.unrecognized_warning()
    if warning:
        raise AssertionError(warning)
    parameters = _one_trial(session, "float32")
    result.dtypes["float32"] = "finite"
    merged = _check_merged_save(session, parameters, work)
    from heretic.export.save import save_adapter

    save_adapter(session.loaded, session.ablator, parameters, session.directions, work / "adapter", base_model_name=str(folder))
    result.gguf = _check_gguf(session, parameters, merged, work)


def _one_trial(session: Any, dtype: str) -> Any:
    """Apply the default ablation, read its KL and generate: the parameters of the trial."""
    if not torch.isfinite(session.directions).all():
        raise AssertionError(f"{dtype}: the refusal directions are not finite")
    parameters = default_parameters(session.arch.num_layers, session.arch.components)
    session.ablator.apply(parameters, session.directions)
    kl = session.evaluator.kl()
    if not math.isfinite(kl):
        raise AssertionError(f"{dtype}: the trial's KL divergence is {kl}")
    responses = session.evaluator.responses(session.prompt_sets["harmless_eval"][:2], 4)
    if len(responses) != 2:
        raise AssertionError(f"{dtype}: generation gave {len(responses)} responses for 2 prompts")
    return parameters


IDS = torch.tensor([[5, 17, 42, 99, 7, 200, 13, 61]])


def _check_merged_save(session: Any, parameters: Any, work: Path) -> torch.Tensor:
    """Save the merged model, load it back: its logits are the adapters' (float32 rounding). The merged logits."""

    from heretic.export.save import save_merged

    with torch.no_grad():
        adapted = session.ablator.peft_model(input_ids=IDS).logits.float()
    path = save_merged(session.loaded, session.ablator, parameters, session.directions, work / "merged")
    reloaded = saved_class(path).from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=IDS).logits.float()
    difference = ((logits - adapted).abs().max() / adapted.abs().max().clamp_min(1e-6)).item()
    if not difference < 1e-3:
        raise AssertionError(f"the reloaded merged model's logits differ from the trial's by {difference:.2e} (relative)")
    return logits


def _check_gguf(session: Any, parameters: Any, merged: torch.Tensor, work: Path) -> str:
    """GGUF export where the writer supports the family, loaded back by transformers: its logits are the
    merged model's (f16 rounding). What happened, in words."""
    from transformers import AutoModelForCausalLM

    from heretic.errors import HereticError
    from heretic.export.gguf import export_gguf
    from heretic.export.merged import merged_model

    target = work / "model.f16.gguf"
    try:
        with merged_model(session, parameters) as (model, changed):
            export_gguf(model, session.loaded.tokenizer, target, "f16", changed_parameters=changed)
    except HereticError as error:
        return f"refused: {error}"
    exported = AutoModelForCausalLM.from_pretrained(target.parent, gguf_file=target.name, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = exported(input_ids=IDS).logits.float()
    difference = ((logits - merged).abs().max() / merged.abs().max()).item()
    if not difference < 0.01:
        raise AssertionError(f"the GGUF file's logits differ from the merged model's by {difference:.2e} (relative)")
    return "loaded back"


def _numerical_health(folder: Path, work: Path, dtype: str) -> str:
    """Load in `dtype`, compute the directions and run one trial: "finite", or what was not."""
    from heretic.session import prepare

    try:
        _one_trial(prepare(pipeline_settings(folder, work, dtype), interactive=False), dtype)
    except AssertionError as error:
        return str(error)
    return "finite"


# --- The residual-write check, independent of the architecture map ------------------------------------


def unablated_writes(model_type: str, tolerance: float = 1e-3) -> str:
    """With full ablation (weight 1 in every layer, no row normalization, direction r fixed), each layer's
    write into the residual stream h_out - h_in has no component along r: |(h_out - h_in) . r| <= tolerance
    |h_out - h_in| at every position. "" when that holds, else one sentence naming the layer and the
    modules whose outputs carry a component along r."""
    from heretic.ablation.adapters import Ablator
    from heretic.model.architecture import build_architecture_map, find_layers, text_config

    model = tiny_model(model_type)
    arch = build_architecture_map(model)
    hidden = arch.hidden_size
    direction = torch.nn.functional.normalize(torch.randn(hidden, generator=torch.Generator().manual_seed(7)), dim=0)
    directions = direction.expand(arch.num_layers + 1, hidden).clone()  # (layers + 1, hidden)
    ablator = Ablator(model, arch, "none", 1, 0)
    ablator.apply(default_parameters(arch.num_layers, arch.components, flat=True), directions)
    _, layers = find_layers(model, int(text_config(model.config).num_hidden_layers))
    ratios, outputs = _layer_write_ratios(ablator.peft_model, list(layers), direction)
    for index, ratio in enumerate(ratios):
        if ratio > tolerance:
            named = ", ".join(f"{name} ({value:.1e})" for name, value in outputs[index] if value > tolerance and _writes(name))
            return (
                f"layer {index} writes {ratio:.1e} of its output along the ablated direction; "
                f"modules whose outputs carry it: {named or 'none of its modules alone'}"
            )
    return ""


def _writes(name: str) -> bool:
    """Whether a module (layer-relative name) may write into the residual stream: not one that reads it
    (an input projection, a norm in front of a block, a query or key norm)."""
    from heretic.model.architecture import INPUT_PROJECTIONS

    last = name.rsplit(".", 1)[-1]
    reads = last in INPUT_PROJECTIONS or last in ("input_layernorm", "q_norm", "k_norm") or last.startswith("pre_")
    return not reads


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return getattr(value, "last_hidden_state", None)


def _along(tensor: torch.Tensor, direction: torch.Tensor) -> float:
    """max over positions of |t . r| / |t| (t: (..., hidden))."""
    values = tensor.detach().float().reshape(-1, tensor.shape[-1])
    norms = values.norm(dim=-1).clamp_min(1e-12)
    return float(((values @ direction).abs() / norms).max())


def _layer_write_ratios(
    model: torch.nn.Module, layers: list[torch.nn.Module], direction: torch.Tensor
) -> tuple[list[float], list[list[tuple[str, float]]]]:
    """(per layer: the largest |(h_out - h_in) . r| / |h_out - h_in|, the layer's input taken without its
    component along r; per layer: (module, the same ratio of its output) for the layer's modules whose
    outputs have the hidden size)."""
    inputs: dict[int, torch.Tensor] = {}
    ratios = [0.0] * len(layers)
    outputs: list[list[tuple[str, float]]] = [[] for _ in layers]
    handles = []
    for index, layer in enumerate(layers):

        def keep_input(_module: Any, args: tuple, kwargs: dict, index: int = index) -> tuple[tuple, dict]:
            """The layer's input without its component along r (h_in - (h_in . r) r): a layer that scales the
            residual stream (Beam) then adds nothing along r unless one of its blocks writes it."""
            positional = bool(args) and isinstance(args[0], torch.Tensor)
            found = args[0] if positional else kwargs["hidden_states"]
            cleaned = found - (found @ direction.to(found))[..., None] * direction.to(found)
            inputs[index] = cleaned.detach().clone()
            if positional:
                return (cleaned, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cleaned}

        def compare(_module: Any, _args: Any, output: Any, index: int = index) -> None:
            out = _first_tensor(output)
            if out is not None and out.shape == inputs[index].shape:
                ratios[index] = max(ratios[index], _along(out - inputs[index], direction))

        handles.append(layer.register_forward_pre_hook(keep_input, with_kwargs=True))
        handles.append(layer.register_forward_hook(compare))
        for name, module in layer.named_modules():
            if name and "lora_" not in name and "base_layer" not in name:

                def record(_module: Any, _args: Any, output: Any, index: int = index, name: str = name) -> None:
                    out = _first_tensor(output)
                    if out is not None and out.shape[-1:] == direction.shape:
                        outputs[index].append((name, _along(out, direction)))

                handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(input_ids=IDS)
    finally:
        for handle in handles:
            handle.remove()
    return ratios, outputs


# --- The whole matrix ---------------------------------------------------------------------------------

TIME_LIMIT = 180  # seconds per architecture (its subprocess is ended after that)
DOCS = Path(__file__).resolve().parents[1] / "docs"


def architectures() -> tuple[list[str], dict[str, str]]:
    """(the decoder-only text architectures of the causal-LM mapping, {left-out architecture: why})."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kept, left_out = [], {}
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if model_type in LEFT_OUT:
            left_out[model_type] = LEFT_OUT[model_type]
            continue
        try:
            config = AutoConfig.for_model(model_type)
        except Exception:  # noqa: BLE001 - a config class whose defaults do not validate is still in the matrix
            kept.append(model_type)
            continue
        if getattr(config, "is_encoder_decoder", False):
            left_out[model_type] = "encoder-decoder"
        elif any(getattr(config, name, None) is not None for name in AUDIO_CONFIGS):
            left_out[model_type] = "multimodal with an audio tower (its text model has its own row, where it has one)"
        else:
            kept.append(model_type)
    return kept, left_out


def run_one(model_type: str, timeout: int = TIME_LIMIT) -> Result:
    """check_architecture in a subprocess of its own, ended after `timeout` seconds (a hang or a crash is `broken`)."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        command = [sys.executable, __file__, "--one", model_type, str(out)]
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=folder)
        except subprocess.TimeoutExpired:
            return Result(model_type, "broken", f"timed out after {timeout} s", seconds=float(timeout))
        if out.exists():
            return Result(**json.loads(out.read_text()))
        lines = [line for line in (done.stderr or "").splitlines() if line.strip()]
        return Result(model_type, "broken", f"the process ended with code {done.returncode}: {lines[-1] if lines else ''}"[:400])


def write_docs(results: list[Result], left_out: dict[str, str], folder: Path = DOCS, total: int | None = None) -> None:
    """docs/support.json and docs/support.md (`total`: the architectures of the matrix, run or not yet)."""
    import transformers

    counts = {status: sum(1 for r in results if r.status == status) for status in ("works", "refused", "broken")}
    data = {
        "transformers": transformers.__version__,
        "counts": counts,
        "architectures_in_matrix": total or len(results),
        "architectures": [asdict(result) for result in results],
        "left_out": left_out,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "support.json").write_text(json.dumps(data, indent=2) + "\n")
    (folder / "support.md").write_text(support_markdown(results, left_out, transformers.__version__, counts, total))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def support_markdown(
    results: list[Result], left_out: dict[str, str], version: str, counts: dict[str, int], total: int | None = None
) -> str:
    lines = [
        "# Supported architectures",
        "",
        f"Every decoder-only text architecture of transformers {version}'s causal-LM mapping, built as a tiny random",
        "model from its config class and run through the pipeline: load, architecture map, refusal directions, one",
        "trial (KL finite, generation works) in float32 and bfloat16, merged save and reload (same logits), adapter",
        "save, GGUF export where the writer supports the family (loaded back). With full ablation, each layer's write",
        "into the residual stream is checked to have no component along the ablated direction. A model that",
        "transformers alone cannot run (loaded by itself, a forward pass) is refused with that sentence; in a dtype",
        "other than float32, its cell says so. Generated by `make support-matrix` (tests/support_matrix.py).",
        "",
        f"Of {len(results)} architectures run ({total or len(results)} in the matrix): {counts['works']} work, "
        f"{counts['refused']} are refused with a sentence, {counts['broken']} are broken.",
        "",
        "| architecture | status | components ablated | sentence | GGUF |",
        "|---|---|---|---|---|",
    ]
    must = set(MUST_WORK)
    for result in results:
        name = f"**{result.architecture}**" if result.architecture in must else result.architecture
        parts = "<br>".join(_cell(line) for line in result.components)
        lines.append(f"| {name} | {result.status} | {parts} | {_cell(result.sentence)} | {_cell(result.gguf)} |")
    lines += ["", "Bold: the families that must work (tests/test_support_matrix.py runs them in the default suite).", ""]
    lines += ["## Left out", "", "| architecture | why |", "|---|---|"]
    lines += [f"| {name} | {why} |" for name, why in sorted(left_out.items())]
    return "\n".join(lines) + "\n"


def _earlier_rows() -> dict[str, Result]:
    earlier = DOCS / "support.json"
    if not earlier.exists():
        return {}
    return {row["architecture"]: Result(**row) for row in json.loads(earlier.read_text())["architectures"]}


def main(argv: list[str] | None = None) -> int:
    """Every architecture (or those named in argv, keeping the docs' other rows) into docs/support.*, the
    families that must work first; the docs are rewritten after each architecture."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:  # the subprocess of one architecture
        import tempfile
        import warnings

        warnings.filterwarnings("ignore")
        sys.path.insert(0, str(Path(__file__).parent))
        with tempfile.TemporaryDirectory() as work:
            result = check_architecture(argv[1], Path(work))
        Path(argv[2]).write_text(json.dumps(asdict(result)))
        return 0
    kept, left_out = architectures()
    chosen = [name for name in kept if not argv or name in argv]
    chosen.sort(key=lambda name: name not in MUST_WORK)
    rows = _earlier_rows() if argv else {}
    with ThreadPoolExecutor(max_workers=2) as pool:  # two architectures at a time, one thread each
        for result in pool.map(run_one, chosen):
            print(f"{result.architecture}: {result.status} {result.sentence[:300]} ({result.seconds} s)", flush=True)
            rows[result.architecture] = result
            write_docs([rows[name] for name in kept if name in rows], left_out, total=len(kept))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
