"""The session: everything prepared before the search (model, prompts, engine, directions, judge, baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from .ablation.adapters import Ablator
from .config import ResumePolicy, Role, Settings, fields_with
from .directions import refusal_directions, winsorize
from .model.architecture import ArchitectureMap, build_architecture_map, find_layers, text_config
from .model.batching import choose_batch_size
from .model.generation import Engine
from .model.hardware import busy_warning, configure_threads, describe_choice, dtype_name
from .model.loading import LoadedModel, eos_token_ids, load_model
from .prompts import Prompt, load_prompts, prompt_set_title
from .scoring.evaluator import Evaluator, detect_response_prefix
from .scoring.judges import make_judge as build_judge
from .scoring.refusals import RefusalJudge
from .search import checkpoint
from .search.runner import SearchSetup
from .search.study import checkpoint_location, open_study
from .ui import ProgressBars, console

# The engine's batch size before the batch size is chosen, and for reproduction records without one.
FALLBACK_BATCH_SIZE = 8


@dataclass
class Session:
    """Everything prepared before the search."""

    settings: Settings
    loaded: LoadedModel
    arch: ArchitectureMap
    engine: Engine
    judge: RefusalJudge
    evaluator: Evaluator
    ablator: Ablator
    directions: torch.Tensor
    prompt_sets: dict[str, list[Prompt]]
    base_refusals: int
    base_verdicts: list[bool]  # the original model's verdict on each harmful evaluation prompt (True: refusal)
    interactive: bool
    last_saved: Path | None = None  # the folder the last save action wrote (the upload action reuses it)
    last_adapter: Path | None = None  # the folder the last save-adapter action wrote (upload-adapter reuses it)


def load(settings: Settings, name: str | None = None) -> LoadedModel:
    """Load `name` (default: --model) as the settings say, and print one line about it."""
    model_name = name or settings.model
    assert model_name is not None
    threads, why = configure_threads()  # before the dtype probe, which measures with these threads
    with console.status(f"Loading {model_name}..."):
        loaded = load_model(
            model_name,
            dtypes=settings.dtypes,
            device_map=settings.device_map,
            max_memory=settings.max_memory,
            quantization=settings.quantization,
            trust_remote_code=settings.trust_remote_code,
            revision=settings.model_revision,
            cache_dir=settings.cache_dir,
        )
    origin = " (from the GGUF cache)" if loaded.from_cache else ""
    console.print(
        f"Loaded [bold]{model_name}[/] in {loaded.load_seconds:.1f} s{origin}: {type(loaded.model).__name__}, "
        f"{dtype_name(loaded.dtype)}, on {loaded.input_device}"
    )
    device = str(loaded.input_device)
    console.print(
        describe_choice(loaded.dtype, loaded.native_dtype, loaded.dtype_measurements, device, f"{threads} threads ({why})")
    )
    warning = busy_warning(loaded.dtype_measurements, threads)
    if warning:
        console.print(f"[yellow]{warning}[/]")
    return loaded


def make_judge(settings: Settings, engine: Engine | None = None, ablator: Ablator | None = None) -> RefusalJudge:
    """The judge of --judge (or the plug-in of --refusal-scorer). The model judge is the original model:
    the searched model with its adapters switched off, or a model of its own (--judge-model)."""
    original = ablator.peft_model.disable_adapter if ablator is not None else None

    def load_engine(name: str) -> Engine:
        return make_engine(settings, load(settings, name))

    judge = build_judge(settings, engine if ablator is not None else None, original, load_engine)
    if settings.judge != "markers" or settings.refusal_scorer:
        console.print(f"Refusal judge: [bold]{getattr(judge, 'name', settings.judge)}[/]")
    return judge


def load_prompt_sets(settings: Settings) -> dict[str, list[Prompt]]:
    """The four prompt sets by name (harmful, harmless, harmful_eval, harmless_eval), counted on one line."""
    specs = settings.prompt_sets()
    sets = {name: load_prompts(spec, settings.system_prompt) for name, spec in specs.items()}
    console.print(
        "Prompts: " + ", ".join(f"{prompt_set_title(name)} {len(sets[name])} ({spec.label()})" for name, spec in specs.items())
    )
    return sets


def make_engine(settings: Settings, loaded: LoadedModel, batch_size: int = FALLBACK_BATCH_SIZE) -> Engine:
    """The generation engine of a loaded model, with the settings' prefix sharing."""
    return Engine(loaded.model, loaded.tokenizer, eos_token_ids(loaded), batch_size, settings.share_prompt_prefix)


def detect_thinking_prefix(settings: Settings, engine: Engine, prompt_sets: dict[str, list[Prompt]]) -> str:
    """The empty thinking block to prefill, probed on the first four prompts of each evaluation set."""
    probe = prompt_sets["harmful_eval"][:4] + prompt_sets["harmless_eval"][:4]
    return detect_response_prefix(engine, probe, settings.thinking_tags)


def prepare(settings: Settings, interactive: bool, loaded: LoadedModel | None = None) -> Session:
    """Load, read the prompts, choose the batch size, compute the directions and score the original model."""
    loaded = loaded or load(settings)
    arch = build_architecture_map(loaded.model)
    console.print(f"Architecture: {arch.num_layers} layers; {arch.summary()}")
    prompt_sets = load_prompt_sets(settings)
    engine = make_engine(settings, loaded)
    engine.response_prefix = detect_thinking_prefix(settings, engine, prompt_sets)
    if engine.response_prefix:
        console.print(f"Responses open a thinking block; prefilling {engine.response_prefix!r}")

    engine.batch_size = pick_batch_size(settings, engine, loaded, prompt_sets)
    directions = compute_directions(settings, engine, loaded, prompt_sets)

    ablator = Ablator(loaded.model, arch, settings.row_normalization.value, settings.full_normalization_rank, settings.seed)
    judge = make_judge(settings, engine, ablator)
    evaluator = Evaluator(
        engine,
        judge,
        prompt_sets["harmful_eval"],
        prompt_sets["harmless_eval"],
        settings.max_response_length,
        settings.stop_on_verdict,
    )
    base_refusals, base_verdicts = score_original(evaluator)
    return Session(
        settings,
        loaded,
        arch,
        engine,
        judge,
        evaluator,
        ablator,
        directions,
        prompt_sets,
        base_refusals,
        base_verdicts,
        interactive,
    )


def score_original(evaluator: Evaluator) -> tuple[int, list[bool]]:
    """(refusals, verdict per harmful prompt) of the original model; also stores its KL reference distributions."""
    with ProgressBars() as bars:
        evaluator.progress = bars
        evaluator.measure_base()
        base = evaluator.count_refusals()
    console.print(f"Original model: [bold]{base.refusals}[/]/{len(evaluator.harmful)} refusals")
    return base.refusals, base.verdicts


def pick_batch_size(settings: Settings, engine: Engine, loaded: LoadedModel, prompt_sets: dict[str, list[Prompt]]) -> int:
    """--batch-size if given; else the batch size of the search this run resumes; else the fastest, measured."""
    if settings.batch_size:
        return settings.batch_size
    if settings.resume != ResumePolicy.restart:
        _, digest, path = checkpoint_location(settings, loaded, prompt_sets, engine.response_prefix)
        resumed = checkpoint.stored_batch_size(path, digest)
        if resumed is not None:
            console.print(f"Batch size [bold]{resumed}[/] (the one the checkpoint's trials ran with; --batch-size overrides it)")
            return resumed
    useful = max(len(prompt_sets["harmful_eval"]), len(prompt_sets["harmless_eval"]))
    with console.status("Choosing the batch size..."):
        batch_size, measurements = choose_batch_size(engine, min(settings.max_batch_size, useful))
    rates = ", ".join(
        f"{m.batch_size}: {m.tokens_per_second:.0f}" if m.tokens_per_second else f"{m.batch_size}: out of memory"
        for m in measurements
    )
    console.print(f"Batch size [bold]{batch_size}[/] (tokens/s by batch size: {rates})")
    return batch_size


def compute_directions(
    settings: Settings, engine: Engine, loaded: LoadedModel, prompt_sets: dict[str, list[Prompt]]
) -> torch.Tensor:
    """Refusal directions from the residuals of the harmful and harmless prompts (one per residual position)."""
    config = text_config(loaded.model.config)
    _, layers = find_layers(loaded.model, int(config.num_hidden_layers))
    residuals = {}
    with ProgressBars() as bars:
        for name in ("harmful", "harmless"):
            ids = engine.encode(prompt_sets[name])
            handle = bars(f"Residuals ({name})", len(ids))
            residuals[name] = winsorize(
                engine.residuals(ids, list(layers), progress=handle.advance), settings.winsorization_quantile
            )
            handle.close()
    directions = refusal_directions(residuals["harmful"], residuals["harmless"], settings.orthogonalize_direction)
    console.print(f"Refusal directions computed for {directions.shape[0]} residual positions")
    return directions


def open_session_study(session: Session) -> tuple[optuna.Study, Path]:
    """(study, journal path) of the search of this session, with its baseline and batch size stored."""
    settings = session.settings
    location = checkpoint_location(settings, session.loaded, session.prompt_sets, session.engine.response_prefix)
    study = open_study(settings, location, session.interactive)
    study.set_user_attr("baseline_refusals", session.base_refusals)
    study.set_user_attr("batch_size", session.engine.batch_size)  # reused when the search is resumed
    return study, location[2]


def search_setup(session: Session) -> SearchSetup:
    """What one trial needs: the session's ablator, evaluator and directions, and the settings tagged `search`."""
    settings = session.settings
    return SearchSetup(
        ablator=session.ablator,
        evaluator=session.evaluator,
        directions=session.directions,
        num_layers=session.arch.num_layers,
        components=session.arch.components,
        **{name: getattr(settings, name) for name in fields_with(Role.search)},
    )
