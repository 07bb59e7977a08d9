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
