"""The reproduction record (heretic.json) saved with every result."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..ablation.parameters import AblationParameters
from ..demo import sha256_file
from ..model.hardware import dtype_name
from ..prompts import prompts_digest
from ..scoring.judge_rates import corrected_entry, measured_rates
from ..search.pareto import TrialResult
from ..search.records import RECORD_VERSION
from ..session import Session, kept_heldout_kl, over_refusal_spec
from .provenance import base_model

LIBRARIES = ("torch", "transformers", "peft", "optuna", "accelerate", "safetensors", "numpy")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
# Settings that name places on this machine: not recorded (a reproduction uses its own).
LOCAL_SETTINGS = ("output_dir", "checkpoint_dir", "cache_dir", "reproduce", "evaluate_model", "warm_start")


def environment() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "libraries": versions,
    }


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().cpu().float().numpy().tobytes()).hexdigest()


def build_record(session: Session, result: TrialResult, parameters: AblationParameters) -> dict[str, Any]:
    """Everything needed to rebuild the chosen trial's weights and to check that they came out the same."""
    settings = session.settings
    source = session.loaded.source
    specs = settings.prompt_sets()
    base = base_model(source)
    n_prompts = len(session.evaluator.harmful)
    rates = measured_rates(settings.model_dump())  # None: the judge's counts are reported uncorrected
    record: dict[str, Any] = {
        "record_version": RECORD_VERSION,
        "tool": {"name": "heretic", "version": __version__},
        "environment": environment(),
        "model": base.to_dict()
        | {"kind": source.kind, "revision": settings.model_revision, "dtype": dtype_name(session.loaded.dtype)}
        | {"architecture": type(session.loaded.model).__name__, "num_layers": session.arch.num_layers},  # for --warm-start
        "settings": public_settings(json.loads(settings.model_dump_json()), base.hub_id or base.name),
        "prompt_sets": {
            name: {
                "spec": spec.model_dump(mode="json"),
                "count": len(session.prompt_sets[name]),
                "sha256": prompts_digest(session.prompt_sets[name]),
            }
            for name, spec in specs.items()
        },
        "response_prefix": session.engine.response_prefix,
        "batch_size": session.engine.batch_size,
        "directions_sha256": tensor_digest(session.directions),
        "trial": {
            "number": result.number,
            "parameters": parameters.to_dict(),
            "refusals": result.refusals,
            "refusals_is_lower_bound": result.cut,
            "kl": result.kl,
            "ablation": session.ablator.describe(),
            "true_refusals": corrected_entry(result.refusals, n_prompts, rates, lower_bound=result.cut),
        },
        "baseline": {
            "refusals": session.base_refusals,
            "n_prompts": n_prompts,
            "true_refusals": corrected_entry(session.base_refusals, n_prompts, rates),
        },
        "heldout": heldout_entry(session, result.number),
        "heldout_kl": heldout_kl_entry(session, result),
        "over_refusal": over_refusal_entry(session, result.number),
    }
    if result.objectives:  # the further objectives' values (none without --objectives: the record is unchanged)
        record["trial"]["objectives"] = dict(result.objectives)
        record["baseline"]["objectives"] = dict(session.base_objectives)
        record["objective_directions"] = {objective.name: objective.direction for objective in session.evaluator.objectives}
    if result.verified:  # trial.refusals is then the count on whole responses (heretic/verify.py)
        record["trial"]["verified"] = verified_entry(session, result)
    return record


def verified_entry(session: Session, result: TrialResult) -> dict[str, Any]:
    """How the trial's refusals were counted again on whole responses, the search's count, and the degenerate
    responses among the whole ones (scoring/coherence.py)."""
    settings = session.settings
    return {
        "response_length": settings.verify_response_length,
        "judge": settings.verify_judge or settings.judge,
        "search_refusals": result.search_refusals,
        "degenerate": result.degenerate,
    }


def heldout_entry(session: Session, number: int) -> dict[str, Any] | None:
    """The trial's and the original's refusals on the held-out harmful prompts, where they were counted, and
    their degenerate responses there (scoring/coherence.py), where those were counted too."""
    evaluator = session.heldout_evaluator
    if evaluator is None or number not in session.heldout or None not in session.heldout:
        return None
    entry: dict[str, Any] = {
        "spec": session.settings.harmful_heldout_prompts.model_dump(mode="json"),
        "n_prompts": len(evaluator.harmful),
        "sha256": prompts_digest(evaluator.harmful),
        "refusals": session.heldout[number],
        "original_refusals": session.heldout[None],
    }
    degenerate = session.heldout_degenerate
    if number in degenerate and None in degenerate:
        entry |= {"degenerate": degenerate[number], "original_degenerate": degenerate[None]}
    return entry


def heldout_kl_entry(session: Session, result: TrialResult) -> dict[str, Any] | None:
    """The trial's KL divergence from the original on the held-out harmless prompts, where it was measured: mean,
    median, the search's KL beside them, and the prompts where it is highest."""
    kl = kept_heldout_kl(session, result.number)
    evaluator = session.heldout_kl_evaluator
    if kl is None or evaluator is None:
        return None
    return {
        "spec": session.settings.harmless_heldout_prompts.model_dump(mode="json"),
        "n_prompts": len(kl.values),
        "sha256": prompts_digest(evaluator.harmless),
        "mean": kl.mean,
        "median": kl.median,
        "in_search": result.kl,
        "highest": [{"prompt": prompt, "kl": value} for prompt, value in kl.highest()],
    }


def over_refusal_entry(session: Session, number: int) -> dict[str, Any] | None:
    """The trial's and the original's refusals on the over-refusal prompts (harmless ones that look harmful),
    where they were counted."""
    evaluator, counts = session.over_refusal_evaluator, session.over_refusals
    if evaluator is None or number not in counts or None not in counts:
        return None
    return {
        "spec": over_refusal_spec(session).model_dump(mode="json"),
        "n_prompts": len(evaluator.harmful),
        "sha256": prompts_digest(evaluator.harmful),
        "refusals": counts[number],
        "original_refusals": counts[None],
    }


def public_settings(settings: dict[str, Any], model: str) -> dict[str, Any]:
    """The settings as recorded: the model by its public name, and no path of this machine."""
    public = {key: value for key, value in settings.items() if key not in LOCAL_SETTINGS}
    public["model"] = model
    judge_model = public.get("judge_model")
    if isinstance(judge_model, str) and Path(judge_model).expanduser().exists():
        public["judge_model"] = Path(judge_model).name
    return public


def weight_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """SHA-256 and size of every weight file in `folder` (safetensors shards, adapter weights)."""
    return {
        path.name: {"sha256": sha256_file(path), "size": path.stat().st_size}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES
    }


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=2, ensure_ascii=False) + "\n"
