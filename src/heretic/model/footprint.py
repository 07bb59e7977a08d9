"""The GPU memory a search needs, computed from a model's configuration and what the code allocates.

A search holds the model's weights, its adapters, and at a trial's peak the cache of its longest batch;
applying a trial's ablation makes float32 temporaries of one target matrix at a time. Each term below
names the allocation it counts. It is an estimate of the tensors the search itself allocates: the CUDA
context (about 0.5 GiB) and the allocator's fragmentation come on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FLOAT32 = 4
# The float32 elements a kernel's wide temporaries hold at once (ablation/kernels.py CHUNK_ELEMENTS).
KERNEL_CHUNK = 1 << 23


@dataclass(frozen=True)
class Shape:
    """What the estimate reads from a decoder's configuration."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config: Any) -> Shape:
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def parameters(self) -> int:
        """Embeddings (V H, and the head's V H unless tied) + per layer: attention H (q + 2 kv + o) head_dim
        + gated MLP 3 H I + two norms 2 H; + the final norm H."""
        h, d = self.hidden, self.head_dim
        attention = h * d * (self.heads + 2 * self.kv_heads) + self.heads * d * h
        layer = attention + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h


def search_memory(shape: Shape, weight_bytes: float, batch: int, prompt_tokens: int, response_tokens: int) -> dict[str, int]:
    """Bytes by allocation, for a search computing in a dtype of `weight_bytes` per weight (2: bfloat16;
    about 0.56 for bnb 4-bit, 1.06 for 8-bit, with their scales):

    - weights: parameters x weight_bytes;
    - adapters: per layer, rank-1 float32 adapters and row scales on o_proj (H x heads*head_dim) and
      down_proj (H x I): 4 ((in + out) + out) each;
    - cache: the trial's largest batch at its last step, batch x (prompt + response) tokens x layers x 2
      (keys, values) x kv_heads x head_dim x 2 bytes (the cache is in the compute dtype; 2 for half);
    - activations: the prefill's widest intermediate, the MLP's gate and up, batch x prompt x I x 2 x 2;
    - logits: float32 log-probabilities of one position, batch x V x 4, twice (the logits and their softmax);
    - kernels: applying a trial, one target matrix at a time (the largest, down_proj): its float32 copy and
      the row-normalized copy, 2 x H x I x 4, and three wide temporaries of KERNEL_CHUNK float32 elements.
    """
    h, i = shape.hidden, shape.intermediate
    cache_bytes = 2
    adapters = shape.layers * FLOAT32 * ((shape.heads * shape.head_dim + h + h) + (i + h + h))
    return {
        "weights": int(shape.parameters * weight_bytes),
        "adapters": adapters,
        "cache": batch * (prompt_tokens + response_tokens) * shape.layers * 2 * shape.kv_heads * shape.head_dim * cache_bytes,
        "activations": batch * prompt_tokens * i * 2 * 2,
        "logits": 2 * batch * shape.vocab * FLOAT32,
        "kernels": 2 * h * i * FLOAT32 + 3 * KERNEL_CHUNK * FLOAT32,
    }
