"""Tiny random models with a small trained tokenizer and a chat template, built offline."""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from heretic.prompts import Prompt

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A template that, like Gemma 2's, refuses system messages.
NO_SYSTEM = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<start_of_image>", "<end_of_image>"]
VOCAB_SIZE = 512
KINDS = ("llama", "qwen2", "gemma3", "qwen3_moe", "qwen2_moe", "gemma3_mm")


# Small bundled prompt sets, as command-line flags, for end-to-end runs on the tiny models.
# A few chat prompts for the forward-pass tests.
PROMPTS = [
    Prompt("You are a helpful assistant.", text)
    for text in (
        "Write a haiku about rain.",
        "Explain how a lighthouse works in two sentences.",
        "List three prime numbers.",
        "Why is the sky blue?",
        "Translate good morning into French.",
    )
]

PROMPT_FLAGS = [
    "--harmful-prompts",
    "bundled:harmful_train[:12]",
    "--harmless-prompts",
    "bundled:harmless_train[:12]",
    "--harmful-eval-prompts",
    "bundled:harmful_test[:8]",
    "--harmless-eval-prompts",
    "bundled:harmless_test[:8]",
    "--harmful-heldout-prompts",
    "bundled:harmful_heldout[:8]",
    "--harmless-heldout-prompts",
    "bundled:harmless_heldout[:8]",
]
# How end-to-end runs score on the tiny models: markers their random tokens contain, 8-token responses, batch 8.
SCORING_FLAGS = ["--refusal-markers", '["ak", "ook", "ot"]', "--max-response-length", "8", "--batch-size", "8"]


@functools.cache
def _trained_tokenizer_json() -> str:
    corpus = []
    for name in ("harmful_train", "harmless_train"):
        corpus += resources.files("heretic").joinpath("data", "prompts", f"{name}.txt").read_text().splitlines()
    corpus += ["You are a helpful assistant.", "I'm sorry, but I can't help with that.", "Sure, here is how."]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer.to_str()


# Gemma 3's named image tokens (ids 3-5, as in the gemma3_mm config below).
IMAGE_TOKENS = {"image_token": "<image>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}


def make_tokenizer(chat_template: str | None = CHATML, image_tokens: bool = False) -> PreTrainedTokenizerFast:
    named = {"extra_special_tokens": IMAGE_TOKENS} if image_tokens else {"additional_special_tokens": ["<|im_start|>"]}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()), eos_token="<|im_end|>", pad_token="<|endoftext|>", **named
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def make_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of the given family (float32)."""
    import transformers as tf

    torch.manual_seed(seed)
    vocab = VOCAB_SIZE
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=0,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif kind == "gemma3":
        config = tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
        model = tf.Gemma3ForCausalLM(config)
    elif kind == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16)
        model = tf.Qwen3MoeForCausalLM(config)
    elif kind == "qwen2_moe":
        config = tf.Qwen2MoeConfig(
            **common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80
        )
        model = tf.Qwen2MoeForCausalLM(config)
    elif kind == "gemma3_mm":
        text = tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
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
        model = tf.Gemma3ForConditionalGeneration(config)
    else:
        raise ValueError(kind)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model.eval()


def save_tiny(kind: str, folder: Path, chat_template: str | None = CHATML, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    make_model(kind, seed).save_pretrained(folder)
    make_tokenizer(chat_template).save_pretrained(folder)
    return folder


def save_tiny_with_processor(folder: Path) -> Path:
    """The tiny multimodal model with a Gemma 3 processor (PIL image backend, 28x28 images, 4 image tokens)."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    make_model("gemma3_mm").save_pretrained(folder)
    tokenizer = make_tokenizer(image_tokens=True)
    tokenizer.save_pretrained(folder)
    image_processor = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4, chat_template=CHATML
    ).save_pretrained(folder)
    return folder


# Hybrid and unusual layers: state-space (Mamba) and convolution token mixers, layers of different
# kinds, fused experts stored transposed (gpt-oss), and a shared-transformer hybrid (Zamba 2).
HYBRID_KINDS = ("jamba", "bamba", "falcon_h1", "granitemoehybrid", "lfm2", "gpt_oss", "qwen3_next", "zamba2")


def make_hybrid(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random hybrid causal LM (float32), 4 layers of hidden size 64."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2, pad_token_id=0, bos_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    mamba2 = dict(mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=16)
    if kind == "jamba":  # Mamba and attention layers; dense and MoE MLPs alternate
        config = tf.JambaConfig(
            **common, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
            num_experts=4, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
        )  # fmt: skip
        model = tf.JambaForCausalLM(config)
    elif kind == "bamba":  # Mamba 2 layers with attention at layers 1 and 3
        model = tf.BambaForCausalLM(tf.BambaConfig(**common, attn_layer_indices=[1, 3], **mamba2))
    elif kind == "falcon_h1":  # Mamba 2 and attention side by side in every layer
        mamba = dict(mamba2, mamba_d_head=16, mamba_d_ssm=64, mamba_expand=1)
        model = tf.FalconH1ForCausalLM(tf.FalconH1Config(**common, head_dim=16, **mamba))
    elif kind == "granitemoehybrid":  # Mamba 2 / attention layers, MoE experts with a shared MLP
        config = tf.GraniteMoeHybridConfig(
            **common, layer_types=["mamba", "attention"] * 2, num_local_experts=4, num_experts_per_tok=2,
            shared_intermediate_size=64, **mamba2,
        )  # fmt: skip
        model = tf.GraniteMoeHybridForCausalLM(config)
    elif kind == "lfm2":  # short-convolution and attention layers
        config = tf.Lfm2Config(**common, layer_types=["conv", "full_attention"] * 2, block_auto_adjust_ff_dim=False)
        model = tf.Lfm2ForCausalLM(config)
    elif kind == "gpt_oss":  # fused experts stored (experts, in, hidden), sliding and full attention
        config = tf.GptOssConfig(
            **common, num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * 2,
        )  # fmt: skip
        model = tf.GptOssForCausalLM(config)
    elif kind == "qwen3_next":  # gated delta-net linear attention and full attention, MoE
        config = tf.Qwen3NextConfig(
            **common, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, linear_num_value_heads=4, linear_num_key_heads=2,
            linear_key_head_dim=16, linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"] * 2,
        )  # fmt: skip
        model = tf.Qwen3NextForCausalLM(config)
    elif kind == "llama4_text":  # fused experts stored (experts, in, hidden) by a module that does not say so
        config = tf.Llama4TextConfig(
            **common, head_dim=16, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=96,
            interleave_moe_layer_step=1,
        )  # fmt: skip
        model = tf.Llama4ForCausalLM(config)
    elif kind == "zamba2":  # Mamba 2 layers; hybrid layers add a transformer block through a plain `linear`
        config = tf.Zamba2Config(
            **common, mamba_d_state=8, mamba_headdim=16, n_mamba_heads=8, num_mem_blocks=1, mamba_expand=2,
            layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
        )  # fmt: skip
        model = tf.Zamba2ForCausalLM(config)
    else:
        raise ValueError(kind)
    return model.eval()
