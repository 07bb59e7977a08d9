"""After the search: show the front, choose a trial, and act on it (repeatedly when interactive)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from .ablation.parameters import AblationParameters
from .errors import HereticError
from .export.actions import find_action, menu_actions
from .model import device as backends
from .scoring.judge_rates import corrected_entry, measured_rates, short_text, terminal_line
from .search.pareto import (
    TrialResult,
    VerifiedCount,
    objective_text,
    pareto_front,
    select,
    study_directions,
    trial_results,
    with_verified,
)
from .search.space import describe
from .search.tables import front_table
from .session import HeldOutCount, Session, count_heldout, count_over_refusal, heldout_kl
from .ui import console
from .verify import verify_front


def front_of(study: optuna.Study, verified: dict[int, VerifiedCount] | None = None) -> list[TrialResult]:
    """The Pareto front (refusals, KL and the optimized further objectives) of the study's finished trials, with
    the refusals counted on whole responses where a trial has them (`verified`, heretic/verify.py)."""
    return pareto_front(with_verified(trial_results(study), verified or {}), study_directions(study))


def objectives_text(result: TrialResult) -> str:
    """ ", name value" for each further objective of a trial (empty without objectives)."""
    return "".join(f", {name} {objective_text(value)}" for name, value in result.objectives.items())


def restore(session: Session, result: TrialResult) -> AblationParameters:
    """Apply a trial's ablation to the session's model; return its parameters."""
    parameters = AblationParameters.from_dict(result.parameters)
    session.ablator.apply(parameters, session.directions)
    return parameters


def choose_headless(session: Session, study: optuna.Study) -> TrialResult:
    """--trial if given, else the --select rule applied to the front."""
    settings = session.settings
    results = with_verified(trial_results(study), session.verified)
    if settings.trial is not None:
        for result in results:
            if result.number == settings.trial:
                return result
        raise HereticError(f"There is no finished trial {settings.trial}; choose one from the table above.")
    front = front_of(study, session.verified)
    return select(front, settings.select.value, settings.max_kl, settings.max_refusals, study_directions(study))


def default_output_dir(session: Session) -> Path:
    """--output-dir, else "<model name>-heretic" in the working directory."""
    if session.settings.output_dir:
        return Path(session.settings.output_dir)
    return Path(f"{session.loaded.source.display_name}-heretic")


MoreTrials = Callable[[int], None]  # runs that many more trials in the study


def true_refusals(session: Session, refusals: int, lower_bound: bool = False) -> dict[str, Any]:
    """A count corrected for the judge's measured error rates (scoring/judge_rates.py), or why it is not."""
    rates = measured_rates(session.settings.model_dump())
    return corrected_entry(refusals, len(session.evaluator.harmful), rates, lower_bound)


def show_true_refusals(session: Session, result: TrialResult) -> None:
    """The line under the chosen trial's count: its and the original's true refusals, with their 95 % intervals."""
    original = true_refusals(session, session.base_refusals)
    console.print(terminal_line(true_refusals(session, result.refusals, result.cut), original), highlight=False)


def show_front(session: Session, study: optuna.Study) -> list[TrialResult]:
    """Count the search front's trials again on whole responses (within --verify-budget), then print the
    Pareto front of the study's finished trials, with those counts where a trial has one; return it."""
    front = front_of(study, verify_front(session, study))
    n_prompts = len(session.evaluator.harmful)
    if front:
        original = "".join(f", {name} {objective_text(value)}" for name, value in session.base_objectives.items())
        entry = true_refusals(session, session.base_refusals)
        corrected = f", true {short_text(entry)}" if entry["corrected"] else ""
        title = f"Pareto front (original: {session.base_refusals}/{n_prompts} refusals{corrected}, KL 0{original})"
        cells = {r.number: short_text(true_refusals(session, r.refusals, r.cut)) for r in front}
        console.print(front_table(front, n_prompts, title=title, directions=study_directions(study), true_refusals=cells))
        if any(r.verified for r in front):
            console.print(
                f"  ✓: refusals counted again on whole responses (up to {session.settings.verify_response_length} "
                "tokens; the search's count beside them); the other trials keep the search's count."
            )
    return front


def choose_and_act(session: Session, study: optuna.Study, more_trials: MoreTrials | None = None) -> None:
    """Print the front; then act on the headless choice, or let the user choose and act (and run more
    trials, when `more_trials` is given)."""
    front = show_front(session, study)
    n_prompts = len(session.evaluator.harmful)
    if not front:
        if session.settings.n_trials == 0:
            raise HereticError(
                "--n-trials 0 acts on a finished search, but the checkpoint of these settings has no finished trial; "
                "run the search first (the same command with --n-trials N)."
            )
        console.print("No finished trial yet; rerun the command to continue the search.")
        return
    if not session.interactive:
        result = choose_headless(session, study)
        parameters = restore(session, result)
        console.print(
            f"Chosen trial [bold]{result.number}[/]: {result.refusals_text}/{n_prompts} refusals{verified_text(session, result)}, "
            f"KL {result.kl:.4f}{objectives_text(result)} ({describe(parameters)})"
        )
        show_true_refusals(session, result)
        show_held_out_measures(session, result, parameters)
        for action in session.settings.action:
            perform(session, action, result, parameters)
        return
    interactive_loop(session, front, study, more_trials)


def verified_text(session: Session, result: TrialResult) -> str:
    """Where a trial's refusals were counted again on whole responses: so, with the search's count and the
    degenerate responses among them (scoring/coherence.py)."""
    if not result.verified:
        return ""
    return (
        f" (verified on whole responses of up to {session.settings.verify_response_length} tokens; the search counted "
        f"{result.search_refusals}; {result.degenerate} degenerate)"
    )


MORE = "more"  # the menu's "Run more trials" choice


def interactive_loop(
    session: Session, front: list[TrialResult], study: optuna.Study | None = None, more_trials: MoreTrials | None = None
) -> None:
    """Ask for a trial of the front (or for more trials), then for actions on it, until the user quits."""
    import questionary

    n_prompts = len(session.evaluator.harmful)
    while True:
        choices = [
            questionary.Choice(
                f"Trial {r.number:>3}: refusals {r.refusals_text:>3}/{n_prompts}{' ✓' if r.verified else ''}, "
                f"KL {r.kl:.4f}{objectives_text(r)}",
                r,
            )
            for r in front
        ]
        if more_trials is not None and study is not None:
            choices.append(questionary.Choice("Run more trials", MORE))
        result = questionary.select("Which trial?", choices=[*choices, questionary.Choice("Quit", None)]).ask()
        if result is None:
            return
        if result == MORE and study is not None and more_trials is not None:
            front = run_more(session, study, more_trials) or front
            continue
        parameters = restore(session, result)
        console.print(f"Trial {result.number} restored ({describe(parameters)}){verified_text(session, result)}")
        show_true_refusals(session, result)
        show_held_out_measures(session, result, parameters)
        if not act_interactively(session, result, parameters):
            return


def show_held_out_measures(session: Session, result: TrialResult, parameters: AblationParameters) -> None:
    """Print what the restored trial does on prompts the search never saw: its refusals on the held-out harmful
    prompts, its KL divergence on the held-out harmless ones, and its refusals on the over-refusal prompts."""
    show_heldout(session, result, parameters)
    kl = heldout_kl(session, result.number, parameters)
    if kl is not None:
        console.print(
            f"Held-out harmless prompts (never seen by the search): KL divergence mean [bold]{kl.mean:.4f}[/], median "
            f"{kl.median:.4f} ({len(kl.values)} prompts; highest {kl.highest(1)[0][1]:.4f}); in the search: {result.kl:.4f}"
        )
    over = count_over_refusal(session, result.number, parameters)
    if over is not None:
        console.print(
            f"Over-refusal prompts (harmless prompts that look harmful): [bold]{over.refusals}[/]/{over.n_prompts} refusals "
            f"({over.refusals / over.n_prompts:.0%}; original {over.original}/{over.n_prompts})"
        )


def show_heldout(session: Session, result: TrialResult, parameters: AblationParameters) -> None:
    """Print the restored trial's refusals on the held-out harmful prompts next to its in-search count."""
    count = count_heldout(session, result.number, parameters)
    if count is None:
        return
    n_prompts = len(session.evaluator.harmful)
    # Counted as the search counts (early stop): beside the search's count, not a verified one.
    searched = result.search_refusals if result.search_refusals is not None else result.refusals
    in_search = searched / n_prompts if n_prompts else 0.0
    shown = str(searched) if result.verified else result.refusals_text
    console.print(
        f"Held-out harmful prompts (never seen by the search): [bold]{count.refusals}[/]/{count.n_prompts} refusals "
        f"({count.refusals / count.n_prompts:.0%}; original {count.original}/{count.n_prompts}); "
        f"in the search: {shown}/{n_prompts} ({in_search:.0%}){degenerate_text(count)}"
    )


def degenerate_text(count: HeldOutCount) -> str:
    """The held-out responses that loop or repeat themselves (scoring/coherence.py), where they were counted."""
    if count.degenerate is None or count.original_degenerate is None:
        return ""
    return (
        f"; degenerate answers {count.degenerate}/{count.n_prompts} ({count.degenerate / count.n_prompts:.0%}; "
        f"original {count.original_degenerate}/{count.n_prompts})"
    )


def ask_count(question: str, default: int) -> int | None:
    """A positive whole number from the user (None: cancelled)."""
    import questionary

    answer = questionary.text(
        question, default=str(default), validate=lambda text: text.strip().isdigit() and int(text) > 0 or "A whole number > 0"
    ).ask()
    return None if answer is None else int(answer.strip())


def run_more(session: Session, study: optuna.Study, more_trials: MoreTrials) -> list[TrialResult]:
    """Ask how many more trials, run them in the same study, and show the new front."""
    count = ask_count("How many more trials?", max(1, min(session.settings.n_trials, 50)))
    if count is None:
        return []
    more_trials(count)
    return show_front(session, study)


def act_interactively(session: Session, result: TrialResult, parameters: AblationParameters) -> bool:
    """Ask for actions on the restored trial; False when the user quits, True to choose another trial."""
    import questionary

    choices = [questionary.Choice(action.label, action.name) for action in menu_actions()]
    choices += [questionary.Choice("Choose another trial", "back"), questionary.Choice("Quit", "quit")]
    while True:
        answer = questionary.select("What now?", choices=choices).ask()
        if answer in (None, "quit"):
            return False
        if answer == "back":
            return True
        try:
            perform(session, answer, result, parameters)
        except HereticError as error:
            console.print(f"[bold red]Error:[/] {error}")
        except KeyboardInterrupt:
            console.print("[yellow]Interrupted[/]")


def _confirm_overwrite(session: Session) -> Callable[[Path], bool] | None:
    if not session.interactive:
        return None
    import questionary

    def confirm(path: Path) -> bool:
        return bool(questionary.confirm(f"{path} exists and is not empty. Replace it?", default=False).ask())

    return confirm


def perform(session: Session, name: str, result: TrialResult, parameters: AblationParameters) -> None:
    """Run the action called `name` on the restored trial."""
    action = find_action(name)
    try:
        action.handler(session, result, parameters, confirm=_confirm_overwrite(session), output_dir=default_output_dir(session))
    finally:
        backends.free_memory()  # a save's or an export's temporaries go back to the device before the next action
