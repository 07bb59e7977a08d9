"""The `heretic` command: flags built from the Settings fields, errors as one line.

Kept light: `heretic --help` and `heretic --version` import neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn, get_args

from pydantic import ValidationError

from . import __version__
from .config import (
    MERGED_SETTINGS,
    RETIRED_SETTINGS,
    PromptSet,
    Settings,
    SettingValueError,
    field_extra,
    field_kind,
    load_settings,
    parse_text_value,
    preset_names,
)
from .errors import HereticError

EXIT_USAGE = 2
EXIT_FAILURE = 1  # the machine failed (disk, memory), not the input
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Remove refusal behaviour from a transformer language model by directional ablation, with the
ablation's parameters found automatically (Optuna) by co-minimizing refusals on harmful prompts
and KL divergence from the original model on harmless prompts.

Every option can also be set in config.toml (see config.default.toml) or as an environment
variable HERETIC_<NAME>; flags win over the environment, which wins over the file.
"""

EPILOG = """\
examples:
  heretic Qwen/Qwen3-4B-Instruct-2507
  heretic --demo
  heretic ./model.gguf --n-trials 50 --headless --action save --output-dir out/
  heretic ./model.gguf --n-trials 0 --headless --action report   (the report of a finished search)
  heretic --model ORIGINAL --evaluate-model ABLATED
  heretic MODEL --preset no-moralizing                   # also minimize lecturing answers
  heretic MODEL --objectives moralizing,response-length  # further objectives (docs/judges.md)
"""


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heretic",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("positional_model", nargs="?", metavar="MODEL", help="Same as --model.")
    parser.add_argument("--version", action="version", version=f"heretic {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="Read settings from this TOML file instead of ./config.toml (also HERETIC_CONFIG).",
    )
    parser.add_argument(
        "--preset",
        metavar="NAME",
        default=None,
        help="Start from a shipped preset, a config file read beneath your own (also HERETIC_PRESET): "
        f"{', '.join(preset_names())}. See docs/judges.md.",
    )
    group = parser
    for name, info in Settings.model_fields.items():
        extra = field_extra(name)
        if extra.get("section"):
            group = parser.add_argument_group(str(extra["section"]).lower())  # type: ignore[assignment]
        kind = field_kind(info)
        help_text = (info.description or "").replace("%", "%%")
        default = info.default
        if kind == "bool":
            group.add_argument(
                flag_name(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{help_text} (default: {'on' if default else 'off'})",
            )
            continue
        shown = _show_default(default)
        metavar = _metavar(name, info)
        if kind == "list":
            group.add_argument(
                flag_name(name),
                dest=name,
                action="append",
                default=None,
                metavar=metavar,
                help=f"{help_text} Repeatable, or a JSON list. (default: {shown})",
            )
        else:
            group.add_argument(flag_name(name), dest=name, default=None, metavar=metavar, help=f"{help_text} (default: {shown})")
    return parser


def _metavar(name: str, info: Any) -> str:
    annotation = str(info.annotation)
    if "PromptSet" in annotation:
        return "SOURCE[:SPLIT][SLICE]"
    if annotation in {"int", "<class 'int'>"} or getattr(info.annotation, "__name__", "") == "int":
        return "N"
    if "Literal" in annotation or "Enum" in annotation or hasattr(info.annotation, "__members__"):
        choices = _choices(info.annotation)
        if choices:
            return "{" + ",".join(choices) + "}"
    if "float" in annotation:  # after the choices: a choice may be named float16
        return "X"
    if (info.description or "").startswith("Folder"):
        return "DIR"
    return name.upper().split("_")[-1]


def _choices(annotation: Any) -> list[str]:
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [member.value for member in annotation]
    args = [arg for arg in get_args(annotation) if arg is not type(None)]
    if args and all(isinstance(arg, str) for arg in args):
        return list(args)
    return []


def _show_default(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, PromptSet):
        return value.label()
    if isinstance(value, list) and len(value) > 6:
        return f"{len(value)} entries, see config.default.toml"
    if value is None:
        return "none"
    return str(value)


def parse_args(argv: Sequence[str] | None = None) -> tuple[dict[str, Any], str | None, str | None]:
    """Command-line arguments -> (values for Settings, config file, preset)."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        raw = getattr(namespace, name, None)
        if raw is None:
            continue
        if isinstance(raw, bool):
            values[name] = raw
        elif isinstance(raw, list):  # repeatable flag: each item may itself be a JSON list or a comma list
            items: list[Any] = []
            for text in raw:
                parsed = parse_text_value(name, text)
                items.extend(parsed if isinstance(parsed, list) else [parsed])
            values[name] = items
        else:
            values[name] = parse_text_value(name, raw)
    if namespace.positional_model is not None:
        if "model" in values and values["model"] != namespace.positional_model:
            parser.error("give the model either as MODEL or as --model, not both")
        values["model"] = namespace.positional_model
    return values, namespace.config, namespace.preset


def describe_validation_error(error: ValidationError, config_file: str | None) -> str:
    """The first problem of a ValidationError as one sentence naming the key."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"] if not isinstance(part, int)) or "settings"
    top = str(first["loc"][0]) if first["loc"] else location
    where = f"{flag_name(top)}, HERETIC_{top.upper()} or {config_file or 'config.toml'}"
    message = str(first["msg"]).rstrip(".")
    message = message.removeprefix("Value error, ")
    if first["type"] == "extra_forbidden" and location in MERGED_SETTINGS:
        merged = MERGED_SETTINGS[location]
        return f"The setting '{location}' is now part of '{merged}': give its value as {flag_name(merged)} (in {config_file or 'config.toml'})."
    if first["type"] == "extra_forbidden" and location in RETIRED_SETTINGS:
        value = RETIRED_SETTINGS[location]
        now = "" if value is None else f", every search now has {json.dumps(value)}"
        return f"The setting '{location}' was removed{now} (delete it from {config_file or 'config.toml'})."
    if first["type"] == "extra_forbidden":
        return f"Unknown setting '{location}' (in {config_file or 'config.toml'}); see `heretic --help` for valid settings."
    more = len(error.errors()) - 1
    suffix = f" ({more} more problem{'s' if more > 1 else ''} after this one)" if more else ""
    return f"Invalid setting '{location}' (from {where}): {message}.{suffix}"


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    from rich.console import Console
    from rich.markup import escape

    # The message is plain text: brackets in it ([objectives.NAME], paths) are not markup.
    Console(stderr=True, highlight=False).print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True)
    raise SystemExit(code)


def settings_from_argv(argv: Sequence[str] | None = None) -> Settings:
    config_file = None
    try:
        values, config_file, preset = parse_args(argv)
        return load_settings(values, config_file, preset)
    except SettingValueError as error:
        fail(f"Invalid setting '{error.name}': {error.problem}.")
    except ValidationError as error:
        fail(describe_validation_error(error, config_file))
    except tomllib.TOMLDecodeError as error:
        fail(f"The config file {config_file or 'config.toml'} is not valid TOML ({error}); fix it or pass another with --config.")
    except FileNotFoundError as error:
        if Path(str(error)).is_dir():
            fail(f"The config file {error} is a folder; give a TOML file to --config or HERETIC_CONFIG.")
        fail(f"The config file {error} does not exist; check the path given to --config or HERETIC_CONFIG.")
    except UnicodeDecodeError:
        fail(f"The config file {config_file or 'config.toml'} is not UTF-8 text; save it as UTF-8.")


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM is handled like Ctrl+C: the search stops after keeping every finished trial."""
    raise KeyboardInterrupt


def describe_unexpected(error: BaseException) -> str | None:
    """One sentence for failures of the machine rather than of Heretic: the operating system refusing
    a read or write, or memory running out. None for anything else (a bug shows its traceback)."""
    import errno

    if (
        isinstance(error, MemoryError)
        or type(error).__name__ == "OutOfMemoryError"
        or (isinstance(error, RuntimeError) and "can't allocate memory" in str(error))
    ):
        from .model.memory import out_of_memory_message, stage_of

        return out_of_memory_message(stage_of(error))
    if not isinstance(error, OSError):
        return None
    where = f" {error.filename}" if error.filename else ""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"There is not enough disk space to write{where} ({reason}); free some space and rerun the same command."
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"Cannot write{where} ({reason}); choose folders you can write to (--output-dir, --checkpoint-dir, --cache-dir)."
    if error.errno == errno.ENOTDIR or error.errno == errno.EEXIST or error.errno == errno.EISDIR:
        return (
            f"A file stands where a folder is needed, or the other way round:{where} ({reason}); move it or choose another path."
        )
    return f"The operating system refused an operation on{where or ' a file'} ({reason}); check the path and rerun."


def run(settings: Settings, argv: Sequence[str] | None = None) -> None:
    """The pipeline: load -> prompts -> directions -> search -> choose -> act (or --demo, --reproduce, --evaluate-model).

    Its modules are imported here, not at the top, so that `heretic --help` stays fast."""
    from .ui import is_interactive, setup_logging

    setup_logging(settings.log_level)
    if settings.print_memory:
        from .model.memory import set_reporter
        from .ui import console

        set_reporter(console.print)
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
    from .choose import choose_and_act
    from .parallel import Workers, pin_this_process
    from .session import open_session_study, prepare

    shares = pin_this_process(settings)  # --workers N: this process is worker 0, on its share of the devices
    session = prepare(settings, is_interactive() and not settings.headless)
    if settings.print_residual_geometry or settings.plot_residuals:
        from .report.terminal import research_views

        research_views(session)
    study, location = open_session_study(session)
    name = location.journal.stem if location.journal is not None and settings.storage is None else location.study_name
    log_dir = Path(settings.checkpoint_dir).expanduser() / f"{name}-workers"
    search = Workers(session, study, list(sys.argv[1:] if argv is None else argv), shares, log_dir)
    search.run()
    if settings.search_only:
        from .ui import console

        console.print("This worker's part of the search is done; the command that chooses shows the front.")
        return
    choose_and_act(session, study, more_trials=search.more)


def main(argv: Sequence[str] | None = None) -> None:
    import signal
    import threading

    settings = settings_from_argv(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        run(settings, argv)
    except HereticError as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail("Interrupted; the search checkpoint keeps every finished trial.", EXIT_INTERRUPTED)
    except Exception as error:
        message = describe_unexpected(error)
        if message is None:
            raise
        fail(message, EXIT_FAILURE)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
