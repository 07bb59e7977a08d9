"""KL divergence of first-response-position distributions (pure math)."""

from __future__ import annotations

import torch
from torch import Tensor


def kl_per_prompt(reference_logprobs: Tensor, logprobs: Tensor) -> Tensor:
    """KL(P_reference || P) per prompt, from log-probabilities of shape (prompts, vocab); 0 log 0 = 0."""
    reference = reference_logprobs.float()
    probabilities = reference.exp()
    terms = torch.where(probabilities > 0, probabilities * (reference - logprobs.float()), torch.zeros_like(reference))
    return terms.sum(dim=-1)


def kl_divergence(reference_logprobs: Tensor, logprobs: Tensor) -> float:
    """Mean over prompts of KL(P_reference || P)."""
    return float(kl_per_prompt(reference_logprobs, logprobs).mean())


def kl_over_tokens_per_prompt(reference_logprobs: Tensor, logprobs: Tensor, counts: Tensor) -> Tensor:
    """Per prompt i, the mean over its c_i response positions of KL(P_reference,t || P_t):
    (1/c_i) sum_{t >= N - c_i} KL_{i,t}, shape (prompts,).

    Both log-probabilities (prompts, N, vocab) are of the last N positions of a prompt plus the original
    model's greedy continuation; prompt i's continuation ended early when c_i < N, so only its last c_i
    positions are response positions. counts: (prompts,) integers in [1, N].
    """
    per_position = kl_per_prompt(reference_logprobs, logprobs)  # (prompts, N)
    positions = torch.arange(per_position.shape[1])
    valid = positions.unsqueeze(0) >= per_position.shape[1] - counts.unsqueeze(1)  # (prompts, N)
    return (per_position * valid).sum(dim=1) / counts.clamp_min(1)


def kl_over_tokens(reference_logprobs: Tensor, logprobs: Tensor, counts: Tensor) -> float:
    """Mean over prompts i of the mean over their c_i response positions of KL(P_reference,t || P_t):
    (1/n) sum_i (1/c_i) sum_{t >= N - c_i} KL_{i,t} (see `kl_over_tokens_per_prompt`)."""
    return float(kl_over_tokens_per_prompt(reference_logprobs, logprobs, counts).mean())
