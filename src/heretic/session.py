"""The session: everything prepared before the search (model, prompts, engine, directions, judge, baseline)."""

from __future__ import annotations

import statistics
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch

from .ablation.adapters import Ablator
from .ablation.parameters import AblationParameters
from .config import PromptSet, Role, Settings, fields_with
from .directions import refusal_directions, winsorize
from .errors import HereticError
from .model import device as backends
from .model.architecture import ArchitectureMap, build_architecture_map, find_layers, text_config
from .model.batching import choose_batch_size, halving_on_oom, workload_for
from .model.generation import Engine
from .model.hardware import busy_warning, configure_threads, describe_choice, dtype_name
from .model.loading import LoadedModel, eos_token_ids, load_model
from .model.memory import stage
from .model.reuse import LayerReuse
from .prompts import Prompt, load_prompts, prompt_set_title, prompts_digest
from .scoring.builtin_objectives import OVER_REFUSAL_PROMPTS, OverRefusal
from .scoring.coherence import DEGENERATE_AT, is_degenerate
from .scoring.evaluator import Evaluator, RefusalCount, detect_response_prefix
from .scoring.judges import make_judge as build_judge
from .scoring.objectives import LoadedObjective, load_objectives, score_objectives, setup_objectives
from .scoring.refusals import RefusalJudge
from .search import workers
from .search.pareto import VerifiedCount, objective_text
from .search.runner import SearchSetup
from .search.study import Location, checkpoint_location, find_study, open_study
from .search.warm_start import RecordedTrial, enqueue_warm_start, read_recorded_trials
from .ui import ProgressBars, console, print_responses

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
    residuals: dict[str, torch.Tensor] | None = None  # the original's residuals the directions came from (reports)
    last_saved: Path | None = None  # the folder the last save action wrote (the upload action reuses it)
    base_objectives: dict[str, float] = field(default_factory=dict)  # the original model's further objectives
    heldout: dict[int | None, int] = field(default_factory=dict)  # refusals on the held-out prompts by trial (None: original)
    heldout_degenerate: dict[int | None, int] = field(default_factory=dict)  # degenerate responses there, the same way
    heldout_evaluator: Evaluator | None = None  # built on first use
    heldout_kl: dict[int | None, list[float]] = field(default_factory=dict)  # KL per held-out harmless prompt by trial
    heldout_kl_evaluator: Evaluator | None = None  # built on first use
    over_refusals: dict[int | None, int] = field(default_factory=dict)  # refusals on the over-refusal prompts, by trial
    over_refusal_evaluator: Evaluator | None = None  # built on first use
    verified: dict[int, VerifiedCount] = field(default_factory=dict)  # refusals on whole responses by trial (verify.py)

    study: optuna.Study | None = None  # the search's study (opened by `prepare`, which may take its setup from it)
    location: Location | None = None  # where the study is kept
    last_report: tuple[int, Path] | None = None  # (trial, file) of the last report written
    last_adapter: Path | None = None  # the folder the last save-adapter action wrote (upload-adapter reuses it)
    # Example responses, original and ablated, by trial parameters: the examples action shows the report's,
    # generated once (report.research.examples).
    examples: dict[str, list[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class HeldOutCount:
    """Refusals on the held-out harmful prompts: never used for the directions or the search."""

    refusals: int  # of the trial
    original: int  # of the original model
    n_prompts: int
    degenerate: int | None = None  # the trial's degenerate responses (scoring/coherence.py); None: not known
    original_degenerate: int | None = None  # (a study whose counts were kept before they were counted)


@dataclass(frozen=True)
class HeldOutKL:
    """A trial's KL divergence from the original on each held-out harmless prompt: never used for the directions or
    the search, many of them requests an assistant opens with a disclaimer (prices, news, opinions, real-time data)."""

    prompts: list[str]  # the prompts' user texts
    values: list[float]  # the KL divergence on each, in the order of `prompts`

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    def highest(self, count: int = 5) -> list[tuple[str, float]]:
        """The `count` prompts with the highest KL divergence, (prompt, KL), highest first."""
        return sorted(zip(self.prompts, self.values), key=lambda pair: pair[1], reverse=True)[:count]


def load(settings: Settings, name: str | None = None) -> LoadedModel:
    """Load `name` (default: --model) as the settings say, and print one line about it."""
    model_name = name or settings.model
    assert model_name is not None
    threads, why = configure_threads()  # before the dtype probe, which measures with these threads
    with stage("loading the model"), console.status(f"Loading {model_name}..."):
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
    """The judge of --judge (a built-in judge or a plug-in). The model judge is the original model:
    the searched model with its adapters switched off, or a model of its own (--judge-model)."""
    original = ablator.peft_model.disable_adapter if ablator is not None else None

    def load_engine(name: str) -> Engine:
        return make_engine(settings, load(settings, name))

    judge = build_judge(settings, engine if ablator is not None else None, original, load_engine)
    if settings.judge != "markers":
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


def choose_response_prefix(settings: Settings, engine: Engine, prompt_sets: dict[str, list[Prompt]]) -> str:
    """The text prefilled at the start of every response: --response-prefix; else an empty thinking
    block when the original's responses open one; else, with --detect-response-prefix, the text they
    all open with. Probed on the first four prompts of each evaluation set."""
    if settings.response_prefix is not None:
        return settings.response_prefix
    probe = prompt_sets["harmful_eval"][:4] + prompt_sets["harmless_eval"][:4]
    return detect_response_prefix(engine, probe, settings.thinking_tags, common_opening=settings.detect_response_prefix)


def describe_prefix(settings: Settings, prefix: str) -> str | None:
    """The line that says what is prefilled, and why."""
    if not prefix:
        return None
    if settings.response_prefix is not None:
        return f"Prefilling every response with {prefix!r} (--response-prefix)"
    if any(prefix.lstrip().startswith(opening) for opening, _ in settings.thinking_tags):
        return f"Responses open a thinking block; prefilling {prefix!r}"
    return (
        f"Every response of the original opens with {prefix!r}; prefilling it so responses are judged where they "
        "differ (--no-detect-response-prefix turns this off)"
    )


def read_architecture(settings: Settings, loaded: LoadedModel) -> tuple[ArchitectureMap, list[RecordedTrial]]:
    """The model's architecture map, shown, and the --warm-start records' trials (a record of another
    architecture is refused here, before the directions and the original's scores are computed)."""
    arch = build_architecture_map(loaded.model)
    print_architecture(arch)
    return arch, read_recorded_trials(settings.warm_start, type(loaded.model).__name__)


def print_architecture(arch: ArchitectureMap) -> None:
    """What is ablated, by kind of layer, and a warning naming the weights whose role is not recognized."""
    console.print(f"Architecture: {arch.num_layers} layers; {arch.summary()}")
    for line in arch.layer_kinds():
        console.print(f"  ablated in {line}")
    unrecognized = arch.unrecognized_warning()
    if unrecognized:
        console.print(f"[yellow]{unrecognized}[/]")


def prepare(settings: Settings, interactive: bool, loaded: LoadedModel | None = None, subspace_rank: int = 1) -> Session:
    """Load, read the prompts, then take the batch size, the directions and the original's refusals from the study when
    a worker of it (or an earlier run) has computed them, else compute them and store them there; open the study.
    `subspace_rank` k > 1 sizes the adapters for k-dimensional subspaces whose bases the caller sets (research)."""
    objectives = load_objectives(settings)  # before the model: a mistake in a table is reported at once
    loaded = loaded or load(settings)
    arch, warm_start = read_architecture(settings, loaded)
    prompt_sets = load_prompt_sets(settings)
    engine = make_engine(settings, loaded)
    engine.response_prefix = choose_response_prefix(settings, engine, prompt_sets)
    line = describe_prefix(settings, engine.response_prefix)
    if line:
        console.print(line)

    location, existing = search_to_continue(settings, loaded, prompt_sets, engine, objectives, fused_experts=arch.fused_experts)

    with stage("choosing the batch size"):
        engine.batch_size = pick_batch_size(settings, engine, prompt_sets, existing, location.shared)
    with stage("computing the refusal directions"):
        directions, residuals = shared_directions(settings, engine, loaded, prompt_sets, existing)

    ablator = make_ablator(settings, loaded, arch, engine, subspace_rank)
    judge = make_judge(settings, engine, ablator)
    evaluator = Evaluator(
        engine,
        judge,
        prompt_sets["harmful_eval"],
        prompt_sets["harmless_eval"],
        settings.max_response_length,
        settings.stop_on_verdict,
    )
    evaluator.kl_tokens = settings.kl_tokens
    if settings.print_responses:
        evaluator.on_responses = print_responses
    attach_objectives(settings, evaluator, objectives)
    with stage("scoring the original model"):
        base_refusals, base_verdicts, base_objectives = score_original(evaluator, existing)
    # The study is created (or resumed) only now: a run that fails before writes no checkpoint.
    directions_by_name = {objective.name: objective.direction for objective in objectives}
    study = open_study(settings, location, interactive, directions_by_name)
    store_setup(study, engine.batch_size, directions, base_refusals, base_verdicts)
    enqueue_warm_start(study, warm_start, arch.num_layers, arch.components, settings)
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
        residuals,
        base_objectives=base_objectives,
        study=study,
        location=location,
    )


def search_to_continue(
    settings: Settings,
    loaded: LoadedModel,
    prompt_sets: dict[str, list[Prompt]],
    engine: Engine,
    objectives: list[LoadedObjective],
    *,
    fused_experts: bool,
) -> tuple[Location, optuna.Study | None]:
    """Where these settings' search is kept, and the study there to resume or join, if there is one (its
    setup is reused; in the compute dtype it was started in, when that differs from the one measured
    fastest now). `fused_experts`: the model's MoE experts are fused tensors (the full ablation is approximated)."""
    location = checkpoint_location(settings, loaded, prompt_sets, engine.response_prefix, objectives, fused_experts=fused_experts)
    existing = find_study(settings, location)
    if existing is None:
        return study_in_another_measured_dtype(
            settings, loaded, prompt_sets, engine, objectives, location, fused_experts=fused_experts
        )
    return location, existing


def study_in_another_measured_dtype(
    settings: Settings,
    loaded: LoadedModel,
    prompt_sets: dict[str, list[Prompt]],
    engine: Engine,
    objectives: list[LoadedObjective],
    location: Location,
    *,
    fused_experts: bool,
) -> tuple[Location, optuna.Study | None]:
    """A search of these settings computed in another of the measured dtypes, and its location; the model
    is then cast to that dtype, so the search resumes (or is joined) in the dtype it was started in.

    The dtype is measured, and a measurement that another process disturbed is not remembered, so a
    resumed search can measure another dtype fastest; its fingerprint would then differ and a new search
    would start beside the old one. Casting a loaded model is exact both ways between float32 and a
    16-bit dtype it was cast from, so the scores are those of a model loaded in that dtype."""
    others = [m.dtype for m in loaded.dtype_measurements if m.gflops and m.dtype != loaded.dtype]
    devices = set((getattr(loaded.model, "hf_device_map", None) or {}).values())
    if not others or loaded.quantization != "none" or len(devices) > 1:
        return location, None
    chosen = loaded.dtype
    for dtype in others:
        loaded.dtype = dtype
        candidate = checkpoint_location(
            settings, loaded, prompt_sets, engine.response_prefix, objectives, fused_experts=fused_experts
        )
        study = find_study(settings, candidate)
        if study is not None:
            loaded.model.to(dtype=dtype)  # type: ignore[call-arg]  # transformers wraps `to`; casting is what we want
            console.print(
                f"The search in {candidate.shown()} computes in {dtype_name(dtype)}; computing in it again (measured "
                f"fastest now: {dtype_name(chosen)}; --dtypes {dtype_name(chosen)} would start a new search instead)"
            )
            return candidate, study
    loaded.dtype = chosen
    return location, None


def store_setup(study: optuna.Study, batch_size: int, directions: torch.Tensor, refusals: int, verdicts: list[bool]) -> None:
    """Keep what joining workers and resumed searches reuse in the study (what is there already stays)."""
    attrs = study.user_attrs
    if attrs.get("batch_size") != batch_size:
        study.set_user_attr("batch_size", batch_size)
    if workers.stored_directions(study) is None:
        workers.store_directions(study, directions)
    if attrs.get("baseline_verdicts") != verdicts or attrs.get("baseline_refusals") != refusals:
        study.set_user_attr("baseline_verdicts", verdicts)
        study.set_user_attr("baseline_refusals", refusals)


def refusal_evaluator(session: Session, spec: PromptSet) -> Evaluator:
    """An evaluator that counts the search judge's refusals (at the search's length) on the prompts of `spec`."""
    settings = session.settings
    prompts = load_prompts(spec, settings.system_prompt)
    evaluator = Evaluator(session.engine, session.judge, prompts, [], settings.max_response_length, settings.stop_on_verdict)
    evaluator.on_responses = session.evaluator.on_responses
    return evaluator


def restore_counts(session: Session, key: str, attr: str, counts: dict[int | None, int]) -> None:
    """Fill `counts` ({trial number, or None for the original: count}) with those the study kept under `attr`."""
    for name, count in stored_heldout(session.study, key, attr).items():
        counts.setdefault(None if name == "original" else int(name), count)


def count_heldout(session: Session, number: int, parameters: AblationParameters) -> HeldOutCount | None:
    """The refusals of trial `number` (whose ablation `parameters` is applied) and of the original model on the
    held-out harmful prompts, counted once per trial; None with --no-count-heldout or an empty set."""
    settings = session.settings
    if not settings.count_heldout:
        return None
    evaluator = session.heldout_evaluator
    if evaluator is None:
        evaluator = session.heldout_evaluator = refusal_evaluator(session, settings.harmful_heldout_prompts)
    if not evaluator.harmful:
        return None
    key = prompts_digest(evaluator.harmful)
    degenerate_key = f"{key} at {DEGENERATE_AT:g}"  # counts kept under another threshold are counted again
    restore_counts(session, key, HELDOUT_ATTR, session.heldout)
    restore_counts(session, degenerate_key, HELDOUT_DEGENERATE_ATTR, session.heldout_degenerate)
    missing = [state for state in (None, number) if state not in session.heldout]
    if missing:
        for state, count in count_states(session, evaluator, missing, parameters).items():
            keep_heldout(session, state, count)
        store_heldout(session.study, key, session.heldout)
        store_heldout(session.study, degenerate_key, session.heldout_degenerate, HELDOUT_DEGENERATE_ATTR)
    degenerate = session.heldout_degenerate
    n_prompts = len(evaluator.harmful)
    return HeldOutCount(session.heldout[number], session.heldout[None], n_prompts, degenerate.get(number), degenerate.get(None))


def count_states(
    session: Session, evaluator: Evaluator, states: list[int | None], parameters: AblationParameters
) -> dict[int | None, RefusalCount]:
    """The evaluator's refusal counts of the original model (None in `states`) and of the trial whose ablation
    `parameters` is applied (its number); the trial stays applied."""
    counts: dict[int | None, RefusalCount] = {}
    with ProgressBars() as bars:
        evaluator.progress = bars
        if None in states:
            session.ablator.reset()
            try:
                counts[None] = halving_on_oom(evaluator.engine, evaluator.count_refusals)
            finally:
                session.ablator.apply(parameters, session.directions)
        for state in states:
            if state is not None:
                counts[state] = halving_on_oom(evaluator.engine, evaluator.count_refusals)
    return counts


def keep_heldout(session: Session, number: int | None, count: RefusalCount) -> None:
    """Keep a held-out count's refusals and its degenerate responses (those the count generated, as generated:
    a response may have stopped at the judge's early verdict)."""
    session.heldout[number] = count.refusals
    session.heldout_degenerate[number] = sum(is_degenerate(response) for response in count.responses)


# Study attribute with the held-out counts of a search, so a continued run does not count them again:
# {digest of the held-out prompts: {"original" or a trial number: refusals}}. Everything else that changes
# a count (model, dtype, judge, response length and prefix) is in the study's fingerprint.
HELDOUT_ATTR = "heldout_refusals"
HELDOUT_DEGENERATE_ATTR = "heldout_degenerate"  # the same for the degenerate responses (scoring/coherence.py)
HELDOUT_KL_ATTR = "heldout_kl"  # {digest of the held-out harmless prompts: {trial number: KL per prompt}}
OVER_REFUSAL_ATTR = "over_refusals"  # the same as HELDOUT_ATTR for the over-refusal prompts


def stored_heldout(study: optuna.Study | None, key: str, attr: str = HELDOUT_ATTR) -> dict[str, Any]:
    """The held-out counts kept in the study's attribute `attr` for these held-out prompts ({} without a study)."""
    if study is None:
        return {}
    return dict(study.user_attrs.get(attr, {}).get(key, {}))


def store_heldout(study: optuna.Study | None, key: str, counts: dict[int | None, Any], attr: str = HELDOUT_ATTR) -> None:
    """Keep the held-out counts in the study's attribute `attr` (another prompt set's counts stay)."""
    if study is None:
        return
    kept = dict(study.user_attrs.get(attr, {}))
    kept[key] = {"original" if number is None else str(number): count for number, count in counts.items()}
    study.set_user_attr(attr, kept)


def heldout_kl(session: Session, number: int, parameters: AblationParameters) -> HeldOutKL | None:
    """Trial `number`'s KL divergence from the original (its ablation `parameters` applied) on each held-out
    harmless prompt, measured as the search measures KL (--kl-tokens), once per trial and kept in the study;
    None with --no-count-heldout or an empty set."""
    settings = session.settings
    if not settings.count_heldout:
        return None
    evaluator = session.heldout_kl_evaluator
    if evaluator is None:
        prompts = load_prompts(settings.harmless_heldout_prompts, settings.system_prompt)
        evaluator = Evaluator(session.engine, session.judge, [], prompts, settings.max_response_length)
        evaluator.kl_tokens = settings.kl_tokens
        session.heldout_kl_evaluator = evaluator
    if not evaluator.harmless:
        return None
    key = prompts_digest(evaluator.harmless)
    for name, values in stored_heldout(session.study, key, HELDOUT_KL_ATTR).items():
        session.heldout_kl.setdefault(int(name), [float(value) for value in values])
    if number not in session.heldout_kl:
        with ProgressBars() as bars:
            evaluator.progress = bars
            if evaluator.base_logprobs is None:  # the original's distributions, once per session
                session.ablator.reset()
                try:
                    halving_on_oom(evaluator.engine, evaluator.measure_base)
                finally:
                    session.ablator.apply(parameters, session.directions)
            session.heldout_kl[number] = halving_on_oom(evaluator.engine, evaluator.kl_per_prompt).tolist()
        store_heldout(session.study, key, session.heldout_kl, HELDOUT_KL_ATTR)
    return kept_heldout_kl(session, number)


def kept_heldout_kl(session: Session, number: int) -> HeldOutKL | None:
    """Trial `number`'s held-out KL divergences where they were measured (nothing is measured)."""
    evaluator = session.heldout_kl_evaluator
    if evaluator is None or number not in session.heldout_kl:
        return None
    return HeldOutKL([prompt.user for prompt in evaluator.harmless], session.heldout_kl[number])


def over_refusal_spec(session: Session) -> PromptSet:
    """The over-refusal prompts: those of an over-refusal objective of the search, else the bundled set."""
    for objective in session.evaluator.objectives:
        if isinstance(objective.objective, OverRefusal) and objective.table.prompts is not None:
            return objective.table.prompts
    return OVER_REFUSAL_PROMPTS


def count_over_refusal(session: Session, number: int, parameters: AblationParameters) -> HeldOutCount | None:
    """The refusals of trial `number` (whose ablation `parameters` is applied) and of the original model on the
    over-refusal prompts (harmless prompts that look harmful), counted by the search's judge once per trial and
    kept in the study, whatever the search's objectives; None with --no-count-heldout or an empty set."""
    settings = session.settings
    if not settings.count_heldout:
        return None
    evaluator = session.over_refusal_evaluator
    if evaluator is None:
        evaluator = session.over_refusal_evaluator = refusal_evaluator(session, over_refusal_spec(session))
    if not evaluator.harmful:
        return None
    key, counts = prompts_digest(evaluator.harmful), session.over_refusals
    restore_counts(session, key, OVER_REFUSAL_ATTR, counts)
    missing = [state for state in (None, number) if state not in counts]
    if missing:
        for state, count in count_states(session, evaluator, missing, parameters).items():
            counts[state] = count.refusals
        store_heldout(session.study, key, counts, OVER_REFUSAL_ATTR)
    return HeldOutCount(counts[number], counts[None], len(evaluator.harmful))


def attach_objectives(settings: Settings, evaluator: Evaluator, objectives: list[LoadedObjective]) -> None:
    """Give the evaluator the further objectives, set up; early stopping goes off when one needs whole responses."""
    if not objectives:
        return
    evaluator.objectives = objectives
    setup_objectives(objectives, settings, evaluator)
    described = ", ".join(
        f"{objective.name} ({objective.direction}"
        + (f", {len(objective.prompts)} prompts of its own)" if objective.prompts is not None else ")")
        for objective in objectives
    )
    console.print(f"Objectives besides refusals and KL: [bold]{described}[/]")
    whole = [objective.name for objective in objectives if objective.full_responses]
    if whole and evaluator.stop_on_verdict:
        keep_whole(evaluator, objectives)
        which = "refusals stop early, the others" if evaluator.stop_on_verdict else "every one"
        console.print(f"{', '.join(whole)} score(s) whole responses to the harmful prompts: {which} generated in full")


def keep_whole(evaluator: Evaluator, objectives: list[LoadedObjective]) -> None:
    """Generate the harmful responses whole where an objective needs them: early stopping goes off, or, when
    every such objective only scores responses that are not refusals, stops only certain refusals."""
    needs = {objective.full_responses for objective in objectives} - {None}
    if needs == {"compliant"}:
        evaluator.stop_on_refusal_only = True
    elif needs:
        evaluator.stop_on_verdict = False


def score_original(evaluator: Evaluator, study: optuna.Study | None = None) -> tuple[int, list[bool], dict[str, float]]:
    """(refusals, verdict per harmful prompt, further objectives) of the original model; the refusals are read
    from the study when stored there and no further objective needs the responses. Its KL reference
    distributions are always measured (one forward pass: too large to store)."""
    stored = study.user_attrs if study is not None else {}
    found = stored.get("baseline_verdicts")
    stored_verdicts: list[object] = found if isinstance(found, list) else []
    reuse = len(stored_verdicts) == len(evaluator.harmful) > 0 and not evaluator.objectives
    values: dict[str, float] = {}
    recording = evaluator.engine.reuse.recording_original() if evaluator.engine.reuse is not None else nullcontext()
    with ProgressBars() as bars, recording:
        evaluator.progress = bars
        evaluator.measure_base()
        if reuse:
            if evaluator.engine.reuse is not None:  # the prefill of the harmful prompts, recorded for the trials
                evaluator.engine.generate(evaluator.harmful_ids, 1)
            refusals, verdicts, origin = (
                int(stored["baseline_refusals"]),
                [bool(v) for v in stored_verdicts],
                " (stored in the study)",
            )
        else:
            base = halving_on_oom(evaluator.engine, evaluator.count_refusals)
            refusals, verdicts, origin = base.refusals, base.verdicts, ""
            values = score_objectives(evaluator.objectives, evaluator, base, 0.0)
    shown = "".join(f", {name} [bold]{objective_text(value)}[/]" for name, value in values.items())
    console.print(f"Original model: [bold]{refusals}[/]/{len(evaluator.harmful)} refusals{shown}{origin}")
    backends.free_memory()  # what its generations cached, before the search
    return refusals, verdicts, values


def pick_batch_size(
    settings: Settings, engine: Engine, prompt_sets: dict[str, list[Prompt]], study: optuna.Study | None, shared: bool = False
) -> int:
    """--batch-size if given; else the batch size stored in the study (its trials ran with it); else the
    fastest, measured. A worker joining a shared study with another --batch-size is refused."""
    stored = study.user_attrs.get("batch_size") if study is not None else None
    stored = stored if isinstance(stored, int) and stored > 0 else None
    if settings.batch_size:
        if shared and stored is not None and stored != settings.batch_size:
            raise HereticError(
                f"This worker's --batch-size {settings.batch_size} differs from the batch size {stored} the study's trials "
                f"run with (it changes their scores); pass --batch-size {stored} or leave it out."
            )
        return settings.batch_size
    if stored is not None:
        console.print(f"Batch size [bold]{stored}[/] (the one the checkpoint's trials ran with; --batch-size overrides it)")
        return stored
    useful = max(len(prompt_sets["harmful_eval"]), len(prompt_sets["harmless_eval"]))
    evaluation = [] if engine.device.type == "cpu" else engine.encode(prompt_sets["harmful_eval"] + prompt_sets["harmless_eval"])
    workload = workload_for(engine.device, evaluation, settings.max_response_length)
    with console.status("Choosing the batch size..."):
        batch_size, measurements = choose_batch_size(engine, min(settings.max_batch_size, useful), workload)
    rates = ", ".join(
        f"{m.batch_size}: {m.tokens_per_second:.0f}" if m.tokens_per_second else f"{m.batch_size}: out of memory"
        for m in measurements
    )
    console.print(f"Batch size [bold]{batch_size}[/] (tokens/s by batch size: {rates})")
    return batch_size


def shared_directions(
    settings: Settings, engine: Engine, loaded: LoadedModel, prompt_sets: dict[str, list[Prompt]], study: optuna.Study | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """(directions, residuals): the refusal directions stored in the study (checked against their hash;
    no residuals: a report computes them again), else computed from the residuals."""
    directions = workers.stored_directions(study) if study is not None else None
    if directions is not None:
        console.print(f"Refusal directions for {directions.shape[0]} residual positions (stored in the study)")
        return directions, None
    residuals = collect_residuals(settings, engine, loaded, prompt_sets)
    return compute_directions(settings, engine, loaded, prompt_sets, residuals), residuals


def collect_residuals(
    settings: Settings, engine: Engine, loaded: LoadedModel, prompt_sets: dict[str, list[Prompt]]
) -> dict[str, torch.Tensor]:
    """Residuals of the harmful and harmless prompts at the prompt positions of --direction-positions
    (each winsorized as the settings say, then averaged over the positions):
    {"harmful": (n1, layers + 1, hidden), "harmless": (n2, layers + 1, hidden)}, float32.
    The model is run as it is (with whatever ablation is applied to it)."""
    config = text_config(loaded.model.config)
    _, layers = find_layers(loaded.model, int(config.num_hidden_layers))
    with ProgressBars() as bars:
        residuals = {
            name: read_residuals(settings, engine, list(layers), prompt_sets[name], bars, name)
            for name in ("harmful", "harmless")
        }
    backends.free_memory()  # what the residual passes cached, before the next stage
    return residuals


def read_residuals(
    settings: Settings, engine: Engine, layers: list[torch.nn.Module], prompts: list[Prompt], bars: ProgressBars, name: str
) -> torch.Tensor:
    """Residuals (n, layers + 1, hidden) of `prompts` at the positions of --direction-positions, each winsorized
    as the settings say, then averaged over the positions; float32."""
    ids = engine.encode(prompts)
    handle = bars(f"Residuals ({name})", len(ids))
    positions, quantile = settings.direction_positions, settings.winsorization_quantile
    if len(positions) == 1 or quantile >= 1.0:  # averaging first changes nothing: batch by batch, less memory
        residuals = winsorize(engine.position_residuals(ids, layers, positions, handle.advance, mean=True), quantile)
    else:
        read = engine.position_residuals(ids, layers, positions, handle.advance)
        residuals = winsorize(read, quantile).mean(dim=1)  # clamped at each position, then averaged
    handle.close()
    return residuals


def compute_directions(
    settings: Settings,
    engine: Engine,
    loaded: LoadedModel,
    prompt_sets: dict[str, list[Prompt]],
    residuals: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Refusal directions from the residuals of the harmful and harmless prompts (one per residual position)."""
    residuals = residuals or collect_residuals(settings, engine, loaded, prompt_sets)
    directions = refusal_directions(residuals["harmful"], residuals["harmless"], settings.orthogonalize_direction)
    console.print(f"Refusal directions computed for {directions.shape[0]} residual positions")
    return directions


def make_ablator(
    settings: Settings, loaded: LoadedModel, arch: ArchitectureMap, engine: Engine | None = None, subspace_rank: int = 1
) -> Ablator:
    """The model's adapters (sized for subspaces of `subspace_rank` directions, see `prepare`). With `engine`
    (and --reuse-unchanged-layers), its prompt passes skip the layers the adapters leave unchanged."""
    ablator = Ablator(
        loaded.model,
        arch,
        settings.row_normalization.value,
        settings.full_normalization_rank,
        settings.seed,
        subspace_rank,
        exact=settings.full_normalization_exact,
    )
    if engine is not None and settings.reuse_unchanged_layers:
        _, layers = find_layers(loaded.model, arch.num_layers)
        engine.reuse = LayerReuse(list(layers), lambda: ablator.unchanged_layers)
    return ablator


def open_session_study(session: Session) -> tuple[optuna.Study, Location]:
    """(study, where it is kept) of the search of this session (opened by `prepare`)."""
    assert session.study is not None and session.location is not None
    return session.study, session.location


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
