"""Concept-cleaned refusal directions: the difference of means with capability and style directions regressed out.

The difference of means r mixes refusal with whatever else tells the harmful prompts from the harmless
ones (on a coding model: "this asks for code"). Each concept c (code, maths, other languages, formatting,
role play, sensitive-but-harmless topics) gives an atom a_c = normalize(mean_c - mean_harmless), read at the
same layer from a bundled prompt set; r is then ridge-regressed on the atoms and keeps the residual, so that
ablating it spares those concepts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..config import PromptSet
from ..errors import HereticError
from ..prompts import BUNDLED_SETS, Prompt, load_prompts

CONCEPT_SET_PREFIX = "concept_"


def concept_atoms(concept_means: Tensor, harmless_mean: Tensor) -> Tensor:
    """Unit concept directions a_{j,c} = normalize(mean_{c,j} - mean_{harmless,j}) at each residual position j.

    concept_means: (concepts, positions, hidden), harmless_mean: (positions, hidden).
    Returns (positions, concepts, hidden) float64.
    """
    atoms = (concept_means.double() - harmless_mean.double()).transpose(0, 1)  # (positions, concepts, hidden)
    unit: Tensor = atoms / atoms.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit


def ridge_residual(directions: Tensor, atoms: Tensor, ridge: float) -> Tensor:
    """The part of each direction the atoms' ridge regression leaves: r - C (C^T C + lambda I)^-1 C^T r.

    directions: (positions, hidden) rows r_j; atoms: (positions, concepts, hidden) rows a_{j,c}, the columns
    of C_j. Before normalization C^T r_clean = lambda (C^T C + lambda I)^-1 C^T r: as lambda -> 0 the result
    is orthogonal to every atom (the projection onto the atoms' orthogonal complement), as lambda grows it
    approaches r. With unit atoms, lambda is relative to their squared norm. Returns (positions, hidden)
    float64, not normalized.
    """
    r = directions.double().unsqueeze(-1)  # (positions, hidden, 1)
    c = atoms.double().transpose(1, 2)  # (positions, hidden, concepts)
    gram = c.transpose(1, 2) @ c  # C^T C: (positions, concepts, concepts)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
    weights = torch.linalg.solve(gram + ridge * eye, c.transpose(1, 2) @ r)  # (C^T C + lambda I)^-1 C^T r
    residual: Tensor = (r - c @ weights).squeeze(-1)
    return residual


def clean_directions(directions: Tensor, atoms: Tensor, ridge: float) -> Tensor:
    """Unit concept-cleaned directions normalize(ridge_residual(r, C, lambda)); (positions, hidden) float32."""
    residual = ridge_residual(directions, atoms, ridge)
    unit: Tensor = residual / residual.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit.float()


def concept_prompts(names: list[str], system_prompt: str) -> dict[str, list[Prompt]]:
    """The bundled prompt set concept_<name> of each concept, by name."""
    known = [name.removeprefix(CONCEPT_SET_PREFIX) for name in BUNDLED_SETS if name.startswith(CONCEPT_SET_PREFIX)]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise HereticError(f"There is no concept {unknown[0]!r} in --concept-atoms; use some of {', '.join(known)}.")
    return {name: load_prompts(PromptSet(source="bundled", split=CONCEPT_SET_PREFIX + name), system_prompt) for name in names}


def cleaned_from_prompts(
    directions: Tensor,
    harmless: Tensor,
    concepts: dict[str, list[Prompt]],
    read: Callable[[str, list[Prompt]], Tensor],
    ridge: float,
) -> tuple[Tensor, Tensor]:
    """(cleaned directions (positions, hidden), cosine of each with its original (positions,)).

    harmless: the harmless residuals (n, positions, hidden) the directions came from; `read(name, prompts)`
    returns the residuals (n_c, positions, hidden) of a concept's prompts, read like those.
    """
    means = torch.stack([read(name, prompts).double().mean(dim=0) for name, prompts in concepts.items()])
    atoms = concept_atoms(means, harmless.double().mean(dim=0))
    cleaned = clean_directions(directions, atoms, ridge)
    return cleaned, (cleaned.double() * directions.double()).sum(dim=-1)
