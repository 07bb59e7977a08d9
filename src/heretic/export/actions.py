"""The actions offered for a chosen trial, in one registry: name (as --action takes it), menu label, handler.

Each handler takes (session, result, parameters, *, confirm, output_dir)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.table import Table

from ..ablation.parameters import AblationParameters
from ..chat import chat_loop
from ..errors import HereticError
from ..model.memory import stage
from ..plugins import entry_point_names, find_plugin
from ..search.pareto import TrialResult
from ..search.records import RECORD_FILE
from ..session import Session
from ..ui import console
from . import card, record
from .benchmark import run_benchmarks
from .merged import merged_model
from .provenance import base_model, original_card
from .save import ConfirmFn, ExtraFiles, save_adapter, save_merged
from .upload import upload_folder


class Handler(Protocol):
    def __call__(
        self,
        session: Session,
        result: TrialResult,
        parameters: AblationParameters,
        *,
        confirm: ConfirmFn | None,
        output_dir: Path,
    ) -> Any: ...


@dataclass(frozen=True)
class Action:
    name: str  # as --action takes it
    label: str  # in the interactive menu
    handler: Handler


ACTIONS: dict[str, Action] = {}


def find_action(name: str) -> Action:
    """The action `name`: a built-in one, or a plug-in (an entry point of heretic.actions, package.module:Name or
    path/to/file.py:Name) that is either an `Action` or a handler function, labelled by its docstring's first line."""
    plugin = find_plugin("action", name, ACTIONS)
    found = plugin.factory
    if isinstance(found, Action):
        return found
    if not callable(found):
        raise HereticError(f"The action {name} is neither an Action nor a function (session, result, parameters, ...).")
    label = ((getattr(found, "__doc__", None) or "").strip().splitlines() or [plugin.attribute])[0]
    return Action(name, label, found)


def menu_actions() -> list[Action]:
    """The actions the interactive menu offers: the built-in ones, then those of installed packages' entry points."""
    return [*ACTIONS.values(), *(find_action(name) for name in entry_point_names("action") if name not in ACTIONS)]


def action(name: str, label: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of the action `name` (menu order: registration order)."""

    def register(handler: Handler) -> Handler:
        ACTIONS[name] = Action(name, label, handler)
        return handler

    return register


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _size(path: Path) -> str:
    return f"{folder_size(path) / 2**20:,.0f} MiB"


def result_files(session: Session, result: TrialResult, parameters: AblationParameters, kind: str) -> ExtraFiles:
    """README.md (model card) and heretic.json (reproduction record) written with every saved result;
    the record holds the SHA-256 and size of each weight file beside it (`kind`: merged or adapter)."""
    data = record.build_record(session, result, parameters)
    original = original_card(session.loaded.source)

    def files(weights: dict[str, dict[str, Any]]) -> dict[str, str]:
        saved = dict(data, saved={"kind": kind, "weights": weights})
        return {"README.md": card.render_card(saved, original), RECORD_FILE: record.dumps(saved)}

    return files


@action("save", "Save the merged model")
def save_model(
    session: Session, result: TrialResult, parameters: AblationParameters, *, confirm: ConfirmFn | None, output_dir: Path
) -> Path:
    started = time.perf_counter()
    with stage("saving the merged model"), console.status(f"Saving the merged model to {output_dir}..."):
        path = save_merged(
            session.loaded,
            session.ablator,
            parameters,
            session.directions,
            output_dir,
            max_shard_size=session.settings.max_shard_size,
            dtype=session.settings.save_dtype,
            overwrite=session.settings.overwrite,
            confirm=confirm,
            extra_files=result_files(session, result, parameters, "merged"),
        )
    console.print(f"Merged model saved to [bold]{path.resolve()}[/] ({_size(path)}, {time.perf_counter() - started:.1f} s)")
    session.last_saved = path
    if session.settings.save_report:
        try:
            write_html_report(session, result, parameters, confirm=confirm, output_dir=output_dir)
        except (HereticError, OSError) as error:  # the saved model stands; only its report is missing
            console.print(
                f"[yellow]The report was not written[/] ({error}); the model is saved. Rerun with --n-trials 0 --action report."
            )
    return path


def adapter_dir(output_dir: Path) -> Path:
    return output_dir.with_name(output_dir.name + "-adapter")


@action("save-adapter", "Save the adapter only (PEFT LoRA)")
def save_adapter_only(
    session: Session, result: TrialResult, parameters: AblationParameters, *, confirm: ConfirmFn | None, output_dir: Path
) -> Path:
    started = time.perf_counter()
    target = adapter_dir(output_dir)
    with stage("saving the adapter"):
        path = save_adapter(
            session.loaded,
            session.ablator,
            parameters,
            session.directions,
            target,
            base_model_name=base_model(session.loaded.source).hub_id or session.loaded.source.name,
            overwrite=session.settings.overwrite,
            confirm=confirm,
            extra_files=result_files(session, result, parameters, "adapter"),
        )
    session.last_adapter = path
    console.print(f"Adapter saved to [bold]{path.resolve()}[/] ({_size(path)}, {time.perf_counter() - started:.1f} s)")
    return path


def gguf_path(output_dir: Path, gguf_type: str) -> Path:
    return output_dir.with_name(f"{output_dir.name}.{gguf_type}.gguf")


@action("gguf", "Export GGUF (llama.cpp / Ollama)")
def export_gguf_file(
    session: Session, result: TrialResult, parameters: AblationParameters, *, confirm: ConfirmFn | None, output_dir: Path
) -> Path:
    from .gguf import export_gguf

    settings = session.settings
    target = gguf_path(output_dir, settings.gguf_type).expanduser().resolve()
    if target.is_dir():
        raise HereticError(f"{target} is a folder, not a file; choose another --output-dir.")
    if target.exists() and not settings.overwrite and not (confirm is not None and confirm(target)):
        raise HereticError(f"{target} already exists; choose another --output-dir or pass --overwrite.")
    started = time.perf_counter()
    with (
        stage("exporting the GGUF file"),
        console.status(f"Writing {target.name}..."),
        merged_model(session, parameters) as (
            model,
            changed,
        ),
    ):
        export_gguf(
            model,
            session.loaded.tokenizer,
            target,
            settings.gguf_type,
            source_gguf=session.loaded.source.gguf_file,
            changed_parameters=changed,
        )
    console.print(
        f"GGUF ({settings.gguf_type}) written to [bold]{target}[/] ({_size(target)}, {time.perf_counter() - started:.1f} s)"
    )
    return target


@action("upload", "Upload the merged model to the Hugging Face Hub")
def upload(
    session: Session, result: TrialResult, parameters: AblationParameters, *, confirm: ConfirmFn | None, output_dir: Path
) -> None:
    folder = session.last_saved
    if folder is None or not folder.is_dir():
        folder = save_model(session, result, parameters, confirm=confirm, output_dir=output_dir)
    upload_saved(session, folder)


@action("upload-adapter", "Upload the adapter only to the Hugging Face Hub")
def upload_adapter(
    session: Session, result: TrialResult, parameters: AblationParameters, *, confirm: ConfirmFn | None, output_dir: Path
) -> None:
    folder = session.last_adapter
    if folder is None or not folder.is_dir():
        folder = save_adapter_only(session, result, parameters, confirm=confirm, output_dir=output_dir)
    upload_saved(session, folder)


def upload_saved(session: Session, folder: Path) -> None:
    """Upload a saved folder (merged model or adapter) as the upload settings say."""
    settings = session.settings
    upload_folder(folder, settings.upload_repo, settings.upload_private, session.interactive, settings.upload_record)


@action("chat", "Chat with the model")
def chat(
    session: Session, result: TrialResult, parameters: AblationParameters, *, confirm: ConfirmFn | None, output_dir: Path
) -> None:
    chat_loop(session.loaded, session.settings.system_prompt, session.engine.response_prefix)


@action("benchmark", "Run benchmarks (lm-evaluation-harness)")
def benchmark(
    session: Session, result: TrialResult, parameters: AblationParameters, *, confirm: ConfirmFn | None, output_dir: Path
) -> None:
    run_benchmarks(session, parameters)


@action("examples", "Show example responses, original vs ablated")
def examples(
    session: Session,
    result: TrialResult,
    parameters: AblationParameters,
    *,
    confirm: ConfirmFn | None,
    output_dir: Path,
    count: int = 3,
) -> None:
    """Harmful prompts answered before and after: the first ones the original refused (the report's examples,
    generated once for both)."""
    from ..report.research import examples as example_responses

    shown = example_responses(session, parameters, max(count, session.settings.report_examples))
    harmful = [example for example in shown if example.kind == "harmful"][:count]
    table = Table(title=f"Harmful prompts, original vs trial {result.number}", show_lines=True, title_justify="left")
    table.add_column("prompt", ratio=2)
    table.add_column("original", ratio=3)
    table.add_column(f"trial {result.number}", ratio=3)
    for example in harmful:
        table.add_row(example.prompt, example.before or "[italic](empty)[/]", example.after or "[italic](empty)[/]")
    console.print(table)


def report_path(session: Session, output_dir: Path) -> Path:
    """--report-file, else "<output dir>.report.html" beside the output folder."""
    if session.settings.report_file:
        return Path(session.settings.report_file).expanduser()
    return output_dir.with_name(f"{output_dir.name}.report.html")


def is_report(path: Path) -> bool:
    """True for a file a report action wrote (replaced without asking: it is rewritten from the study)."""
    from ..report.html import REPORT_MARKER

    with path.open("rb") as handle:
        return REPORT_MARKER.encode() in handle.read(4096)


@action("report", "Write the HTML report (search, directions, residuals, responses)")
def write_html_report(
    session: Session, result: TrialResult, parameters: AblationParameters, *, confirm: ConfirmFn | None, output_dir: Path
) -> Path:
    """One self-contained HTML page; written once per trial and session (save reuses the report action's)."""
    from ..report.html import write_report
    from ..report.research import session_report_data

    target = report_path(session, output_dir).resolve()
    if session.last_report == (result.number, target) and target.is_file():
        console.print(f"Report: [bold]{target}[/]")
        return target
    if target.is_dir():
        raise HereticError(f"{target} is a folder, not a file; choose another --report-file.")
    if target.exists() and not is_report(target) and not session.settings.overwrite and not (confirm and confirm(target)):
        raise HereticError(f"{target} exists and is not a Heretic report; choose another --report-file or pass --overwrite.")
    if session.study is None:
        raise HereticError("The report needs the search's study; run it after a search (or with --n-trials 0).")
    started = time.perf_counter()
    data = session_report_data(session, session.study, result, parameters)
    write_report(data, target)
    session.last_report = (result.number, target)
    console.print(f"Report written to [bold]{target}[/] ({_size(target)}, {time.perf_counter() - started:.1f} s)")
    return target
