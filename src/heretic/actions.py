"""After the search: show the front, choose a trial, and act on it (repeatedly when interactive)."""

from __future__ import annotations

import logging
from pathlib import Path

from .ablation.parameters import AblationParameters
from .errors import HereticError
from .main import Session, choose_headless, default_output_dir, front_of, restore
from .search.pareto import TrialResult
from .search.space import describe
from .ui import console, front_table

log = logging.getLogger(__name__)

ACTION_LABELS = {
    "save": "Save the merged model",
    "save-adapter": "Save the adapter only (PEFT LoRA)",
    "gguf": "Export GGUF (llama.cpp / Ollama)",
    "upload": "Upload to the Hugging Face Hub",
    "chat": "Chat with the model",
    "benchmark": "Run benchmarks (lm-evaluation-harness)",
    "report": "Show example responses, original vs ablated",
}


def choose_and_act(session: Session, study, study_path: Path) -> None:
    front = front_of(study)
    n_prompts = len(session.evaluator.harmful)
    if not front:
        console.print("No finished trial yet; rerun the command to continue the search.")
        return
    console.print(front_table(front, n_prompts, title=f"Pareto front (original: {session.base_refusals}/{n_prompts} refusals, KL 0)"))
    if not session.interactive:
        result = choose_headless(session, study)
        parameters = restore(session, result)
        console.print(f"Chosen trial [bold]{result.number}[/]: {result.refusals_text}/{n_prompts} refusals, KL {result.kl:.4f} ({describe(parameters)})")
        for action in session.settings.action:
            perform(session, action, result, parameters)
        return
    interactive_loop(session, study, front)


def interactive_loop(session: Session, study, front: list[TrialResult]) -> None:
    import questionary

    n_prompts = len(session.evaluator.harmful)
    while True:
        choices = [
            questionary.Choice(f"Trial {r.number:>3}: refusals {r.refusals_text:>3}/{n_prompts}, KL {r.kl:.4f}", r) for r in front
        ] + [questionary.Choice("Quit", None)]
        result = questionary.select("Which trial?", choices=choices).ask()
        if result is None:
            return
        parameters = restore(session, result)
        console.print(f"Trial {result.number} restored ({describe(parameters)})")
        while True:
            action = questionary.select(
                "What now?",
                choices=[questionary.Choice(label, key) for key, label in ACTION_LABELS.items()]
                + [questionary.Choice("Choose another trial", "back"), questionary.Choice("Quit", "quit")],
            ).ask()
            if action in (None, "quit"):
                return
            if action == "back":
                break
            try:
                perform(session, action, result, parameters)
            except HereticError as error:
                console.print(f"[bold red]Error:[/] {error}")
            except KeyboardInterrupt:
                console.print("[yellow]Interrupted[/]")


def _confirm_overwrite(session: Session):
    if not session.interactive:
        return None
    import questionary

    def confirm(path: Path) -> bool:
        return bool(questionary.confirm(f"{path} exists and is not empty. Replace it?", default=False).ask())

    return confirm


def perform(session: Session, action: str, result: TrialResult, parameters: AblationParameters) -> None:
    from .export import actions as export_actions

    handlers = {
        "save": export_actions.save_model,
        "save-adapter": export_actions.save_adapter_only,
        "gguf": export_actions.export_gguf_file,
        "upload": export_actions.upload,
        "chat": export_actions.chat,
        "benchmark": export_actions.benchmark,
        "report": export_actions.report,
    }
    handler = handlers.get(action)
    if handler is None:
        raise HereticError(f"Unknown action {action!r}; use one of {', '.join(handlers)}.")
    handler(session, result, parameters, confirm=_confirm_overwrite(session), output_dir=default_output_dir(session))
