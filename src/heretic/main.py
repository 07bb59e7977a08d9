"""The pipeline: load -> prompts -> directions -> search -> choose -> act."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .ablation.adapters import Ablator
from .ablation.parameters import AblationParameters
from .config import ResumePolicy, Settings
from .directions import refusal_directions, winsorize
from .errors import HereticError
from .model.architecture import ArchitectureMap, build_architecture_map, find_layers, text_config
from .model.batching import choose_batch_size
from .model.generation import Engine
from .model.hardware import busy_warning, configure_threads, describe_choice
from .model.loading import LoadedModel, eos_token_ids, load_model
from .prompts import Prompt, load_prompts, prompts_digest
from .scoring.evaluator import Evaluator, detect_response_prefix
from .scoring.refusals import MarkerJudge, RefusalJudge, load_judge
from .search import checkpoint
from .search.pareto import TrialResult, pareto_front, select, trial_results
from .search.runner import SearchSetup, completed_trials, eta_seconds, run_trial, trial_line
from .ui import ProgressBars, console, format_duration, front_table, is_interactive, setup_logging

log = logging.getLogger(__name__)


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
    base_responses: list[str]
    interactive: bool
    timings: dict[str, float] = field(default_factory=dict)
    batch_measurements: list = field(default_factory=list)


def run(settings: Settings) -> None:
    setup_logging(settings.log_level)
    if settings.demo:
        from .demo import apply_demo_preset

        settings = apply_demo_preset(settings)
    if settings.reproduce:
        from .export.reproduce import reproduce

        reproduce(settings)
        return
    if not settings.model:
        raise HereticError(
            "No model given; pass a Hugging Face id, a local folder or a .gguf file (heretic MODEL), or try heretic --demo."
        )
    if settings.evaluate_model:
        from .evaluate import evaluate_model

        evaluate_model(settings)
        return
    interactive = is_interactive() and not settings.headless
    session = prepare(settings, interactive)
    study, study_path = open_study(session)
    search(session, study)
    from .actions import choose_and_act

    choose_and_act(session, study, study_path)


# --- Preparation -----------------------------------------------------------------------------


def load(settings: Settings, name: str | None = None) -> LoadedModel:
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
        f"{str(loaded.dtype).removeprefix('torch.')}, on {loaded.input_device}"
    )
    console.print(describe_choice(loaded.dtype, loaded.native_dtype, loaded.dtype_measurements, str(loaded.input_device), f"{threads} threads ({why})"))
    warning = busy_warning(loaded.dtype_measurements, threads)
    if warning:
        console.print(f"[yellow]{warning}[/]")
    return loaded


def make_judge(settings: Settings) -> RefusalJudge:
    if settings.refusal_scorer:
        return load_judge(settings.refusal_scorer, settings)
    return MarkerJudge(settings.refusal_markers)


def load_prompt_sets(settings: Settings) -> dict[str, list[Prompt]]:
    sets = {
        "harmful": load_prompts(settings.harmful_prompts, settings.system_prompt),
        "harmless": load_prompts(settings.harmless_prompts, settings.system_prompt),
        "harmful_eval": load_prompts(settings.harmful_eval_prompts, settings.system_prompt),
        "harmless_eval": load_prompts(settings.harmless_eval_prompts, settings.system_prompt),
    }
    console.print(
        "Prompts: "
        + ", ".join(
            f"{name.replace('_', ' ')} {len(prompts)} ({getattr(settings, name + '_prompts').label()})"
            for name, prompts in sets.items()
        )
    )
    return sets


def prepare(settings: Settings, interactive: bool, loaded: LoadedModel | None = None) -> Session:
    started = time.perf_counter()
    timings: dict[str, float] = {}
    loaded = loaded or load(settings)
    timings["load"] = time.perf_counter() - started

    arch = build_architecture_map(loaded.model)
    console.print(f"Architecture: {arch.num_layers} layers; {arch.summary()}")

    prompt_sets = load_prompt_sets(settings)
    engine = Engine(loaded.model, loaded.tokenizer, eos_token_ids(loaded), share_prefix=settings.share_prompt_prefix)

    engine.response_prefix = detect_response_prefix(engine, prompt_sets["harmful_eval"][:4] + prompt_sets["harmless_eval"][:4], settings.thinking_tags)
    if engine.response_prefix:
        console.print(f"Responses open a thinking block; prefilling {engine.response_prefix!r}")

    mark = time.perf_counter()
    engine.batch_size, measurements = pick_batch_size(settings, engine, loaded, prompt_sets)
    timings["batch_size"] = time.perf_counter() - mark

    mark = time.perf_counter()
    directions = compute_directions(settings, engine, loaded, prompt_sets)
    timings["directions"] = time.perf_counter() - mark

    judge = make_judge(settings)
    with ProgressBars() as bars:
        evaluator = Evaluator(
            engine, judge, prompt_sets["harmful_eval"], prompt_sets["harmless_eval"],
            settings.max_response_length, settings.stop_on_verdict, progress=bars,
        )
        ablator = Ablator(loaded.model, arch, settings.row_normalization.value, settings.full_normalization_rank, settings.seed)
        mark = time.perf_counter()
        evaluator.measure_base()
        base = evaluator.count_refusals()
        timings["baseline"] = time.perf_counter() - mark
    console.print(f"Original model: [bold]{base.refusals}[/]/{len(evaluator.harmful)} refusals")
    timings["total"] = time.perf_counter() - started
    return Session(
        settings, loaded, arch, engine, judge, evaluator, ablator, directions, prompt_sets,
        base.refusals, base.responses, interactive, timings, measurements,
    )


def pick_batch_size(
    settings: Settings, engine: Engine, loaded: LoadedModel, prompt_sets: dict[str, list[Prompt]]
) -> tuple[int, list]:
    """--batch-size if given; else the batch size of the search this run resumes; else the fastest, measured."""
    if settings.batch_size:
        return settings.batch_size, []
    if settings.resume != ResumePolicy.restart:
        _, digest, path = checkpoint_location(settings, loaded, prompt_sets, engine.response_prefix)
        resumed = checkpoint.stored_batch_size(path, digest)
        if resumed is not None:
            console.print(f"Batch size [bold]{resumed}[/] (the one the checkpoint's trials ran with; --batch-size overrides it)")
            return resumed, []
    useful = max(len(prompt_sets["harmful_eval"]), len(prompt_sets["harmless_eval"]))
    with console.status("Choosing the batch size..."):
        batch_size, measurements = choose_batch_size(engine, min(settings.max_batch_size, useful))
    rates = ", ".join(
        f"{m.batch_size}: {m.tokens_per_second:.0f}" if m.tokens_per_second else f"{m.batch_size}: out of memory"
        for m in measurements
    )
    console.print(f"Batch size [bold]{batch_size}[/] (tokens/s by batch size: {rates})")
    return batch_size, measurements


def compute_directions(settings: Settings, engine: Engine, loaded: LoadedModel, prompt_sets: dict[str, list[Prompt]]) -> torch.Tensor:
    config = text_config(loaded.model.config)
    _, layers = find_layers(loaded.model, int(getattr(config, "num_hidden_layers")))
    residuals = {}
    with ProgressBars() as bars:
        for name in ("harmful", "harmless"):
            ids = engine.encode(prompt_sets[name])
            handle = bars(f"Residuals ({name})", len(ids))
            residuals[name] = winsorize(engine.residuals(ids, list(layers), progress=handle.advance), settings.winsorization_quantile)
            handle.close()
    directions = refusal_directions(residuals["harmful"], residuals["harmless"], settings.orthogonalize_direction)
    console.print(f"Refusal directions computed for {directions.shape[0]} residual positions")
    return directions


# --- Search ----------------------------------------------------------------------------------


def study_fingerprint(
    settings: Settings, loaded: LoadedModel, prompt_sets: dict[str, list[Prompt]], response_prefix: str
) -> dict[str, object]:
    """Everything that changes what a trial measures: a search resumes only under identical values."""
    source = loaded.source
    model_identity: dict[str, object] = {"name": source.name, "revision": settings.model_revision}
    if source.gguf_file is not None:
        stat = source.gguf_file.stat()
        model_identity.update(size=stat.st_size)
    return {
        "model": model_identity,
        "dtype": str(loaded.dtype),
        "prompts": {name: prompts_digest(prompts) for name, prompts in prompt_sets.items()},
        "response_prefix": response_prefix,
        "max_response_length": settings.max_response_length,
        "orthogonalize_direction": settings.orthogonalize_direction,
        "winsorization_quantile": settings.winsorization_quantile,
        "row_normalization": settings.row_normalization.value,
        "full_normalization_rank": settings.full_normalization_rank,
        "judge": settings.refusal_scorer or sorted(settings.refusal_markers),
        "seed": settings.seed,
        "n_startup_trials": settings.n_startup_trials,
        "n_ei_candidates": settings.n_ei_candidates,
        "multivariate_tpe": settings.multivariate_tpe,
        "cut_hopeless_trials": settings.cut_hopeless_trials,
        "sampler_kl_floor": settings.sampler_kl_floor,
    }


def checkpoint_location(
    settings: Settings, loaded: LoadedModel, prompt_sets: dict[str, list[Prompt]], response_prefix: str
) -> tuple[dict[str, object], str, Path]:
    """(fingerprinted values, fingerprint, journal path) of the search these settings run."""
    values = study_fingerprint(settings, loaded, prompt_sets, response_prefix)
    digest = checkpoint.fingerprint(values)
    return values, digest, checkpoint.checkpoint_path(settings.checkpoint_dir, loaded.source.display_name, digest)


def open_study(session: Session):
    settings = session.settings
    values, digest, path = checkpoint_location(settings, session.loaded, session.prompt_sets, session.engine.response_prefix)
    study, existed = checkpoint.load_or_create(path, digest, values)
    stale = checkpoint.fail_stale_trials(study)
    if stale:
        log.info("%d interrupted trial(s) of an earlier run marked as failed", stale)
    done = completed_trials(study)
    target = settings.n_trials
    if existed and done > 0:
        policy = settings.resume
        if policy == ResumePolicy.ask:
            policy = ask_resume(done, settings.n_trials) if session.interactive else ResumePolicy.continue_
        if policy == ResumePolicy.restart:
            moved = checkpoint.archive(path)
            console.print(f"Earlier search moved to {moved}")
            study, _ = checkpoint.load_or_create(path, digest, values)
            done = 0
        elif policy == ResumePolicy.add:
            target = done + settings.n_trials
        console.print(f"Checkpoint {path}: {done} finished trials; running up to {max(target, done)}")
    else:
        console.print(f"Checkpoint: {path}")
    study.set_user_attr("target_trials", max(target, done))
    study.set_user_attr("baseline_refusals", session.base_refusals)
    study.set_user_attr("batch_size", session.engine.batch_size)  # reused when the search is resumed
    return study, path


def ask_resume(done: int, n_trials: int) -> ResumePolicy:
    import questionary

    choices = [
        questionary.Choice(f"Continue (up to {n_trials} trials)" if done < n_trials else "Use the finished search", ResumePolicy.continue_),
        questionary.Choice(f"Add {n_trials} more trials", ResumePolicy.add),
        questionary.Choice("Restart (the old checkpoint is kept aside)", ResumePolicy.restart),
    ]
    answer = questionary.select(f"A checkpoint with {done} finished trials exists.", choices=choices).ask()
    if answer is None:
        raise KeyboardInterrupt
    return answer


def search(session: Session, study) -> None:
    settings = session.settings
    setup = SearchSetup(
        ablator=session.ablator,
        evaluator=session.evaluator,
        directions=session.directions,
        num_layers=session.arch.num_layers,
        components=session.arch.components,
        seed=settings.seed,
        n_startup_trials=settings.n_startup_trials,
        n_ei_candidates=settings.n_ei_candidates,
        multivariate_tpe=settings.multivariate_tpe,
        cut_hopeless_trials=settings.cut_hopeless_trials,
        sampler_kl_floor=settings.sampler_kl_floor,
    )
    target = int(study.user_attrs.get("target_trials", settings.n_trials))
    done = completed_trials(study)
    remaining = target - done
    if remaining <= 0:
        return
    n_prompts = len(session.evaluator.harmful)
    console.print(f"Searching: {remaining} trials (Ctrl+C stops the search and keeps every finished trial)")
    started = time.perf_counter()
    try:
        with ProgressBars() as bars:
            for index in range(1, remaining + 1):
                result = run_trial(setup, study, progress=bars)
                eta = eta_seconds(study, remaining - index)
                console.print(trial_line(result, n_prompts, done + index, target, eta))
    except KeyboardInterrupt:
        console.print("[yellow]Search interrupted[/]; rerun the same command to continue it.")
    finally:
        session.ablator.reset()
    console.print(f"Search time: {format_duration(time.perf_counter() - started)}")


def front_of(study) -> list[TrialResult]:
    return pareto_front(trial_results(study))


def restore(session: Session, result: TrialResult) -> AblationParameters:
    parameters = AblationParameters.from_dict(result.parameters)
    session.ablator.apply(parameters, session.directions)
    return parameters


def choose_headless(session: Session, study) -> TrialResult:
    settings = session.settings
    results = trial_results(study)
    if settings.trial is not None:
        for result in results:
            if result.number == settings.trial:
                return result
        raise HereticError(f"There is no finished trial {settings.trial}; choose one from the table above.")
    return select(front_of(study), settings.select.value, settings.max_kl, settings.max_refusals)


def default_output_dir(session: Session) -> Path:
    if session.settings.output_dir:
        return Path(session.settings.output_dir)
    return Path(f"{session.loaded.source.display_name}-heretic")


__all__ = ["run", "prepare", "Session", "front_table"]
