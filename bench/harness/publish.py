"""Writing results into BENCHMARKS.md (or a note of docs/research/): each table replaces the section
between `<!-- NAME:begin -->` and `<!-- NAME:end -->`, under a stamp line that says when it was
measured, on which CPU (its bf16 instruction sets), at which commit, and the command that reproduces it.

What a results file does not record is said so in the stamp ("commit not recorded"), never guessed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .paths import BENCH, BENCHMARKS

STAMP_FLAGS = ("amx_bf16", "avx512_bf16", "avx2")  # the instruction sets that decide which dtype is fast
STAMP = re.compile(
    r"^_Measured (\d{4}-\d{2}-\d{2}|date not recorded) · (CPU [\w, ]+|CPU flags not recorded) · "
    r"(commit [0-9a-f]{4,40}|commits [0-9a-f]{4,40}(?:, [0-9a-f]{4,40})+|commit not recorded) · reproduce: `[^`]+`_$"
)
SCRIPT = re.compile(r"python (?:\./)?bench/(?:research/)?(\w+)\.py")


def module_command(command: str) -> str:
    """A recorded `python bench/X.py ...` as the module command that runs the same script today
    (`python -m bench.X ...`, or `bench.research.X` for a script kept for research)."""

    def module(match: re.Match[str]) -> str:
        name = match[1]
        package = "bench" if (BENCH / f"{name}.py").is_file() else "bench.research"
        return f"python -m {package}.{name}"

    return SCRIPT.sub(module, command)


def stamp(meta: dict[str, Any], command: str) -> str:
    """The stamp line of a table: date, CPU flags, commit (as recorded in `meta`) and the reproduce command."""
    date = str(meta.get("date") or "")[:10] or "date not recorded"
    flags = meta.get("cpu_flags")
    if flags is None:
        cpu = "CPU flags not recorded"
    elif flags == "per row":
        cpu = "CPU per row"
    else:
        present = [flag for flag in STAMP_FLAGS if flag in flags]
        cpu = "CPU " + (", ".join(present) if present else "without " + ", ".join(STAMP_FLAGS))
    commits = meta.get("commit")
    if not commits:
        commit = "commit not recorded"
    elif isinstance(commits, list):  # results of several commits (recorded() of runs made at different ones)
        commit = "commits " + ", ".join(commits)
    else:
        commit = f"commit {commits}"
    return f"_Measured {date} · {cpu} · {commit} · reproduce: `{module_command(command)}`_"


def recorded(*records: dict[str, Any]) -> dict[str, Any]:
    """The date, CPU flags and commit of several results files: the latest date; the CPU flags they share, or
    "per row" where they differ; the commit they share, or the list of their commits (oldest first, as given)
    where they differ. A field that any of them lacks counts as not recorded."""
    dates = [str(r["date"])[:10] for r in records if r.get("date")]
    flags = [tuple(r["cpu_flags"]) for r in records if r.get("cpu_flags") is not None]
    commits = [r["commit"] for r in records if r.get("commit")]
    return {
        "date": max(dates) if dates else None,
        "cpu_flags": (list(flags[0]) if len(set(flags)) == 1 else "per row") if flags and len(flags) == len(records) else None,
        "commit": (commits[0] if len(set(commits)) == 1 else list(dict.fromkeys(commits)))
        if commits and len(commits) == len(records)
        else None,
    }


def update_section(section: str, marker: str, meta: dict[str, Any], command: str, path: Path = BENCHMARKS) -> None:
    """Replace the NAME section of `path` by `section` under its stamp line. A section not there yet goes after
    the last section of the same family (direction-screen-demo for direction-screen-1.5b), else before the
    research notes, else at the end."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    block = f"{begin}\n{stamp(meta, command)}\n\n{section.strip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        family = [m.end() for m in re.finditer(rf"<!-- {re.escape(marker.rsplit('-', 1)[0])}-[\w.-]+:end -->", text)]
        if family:
            text = text[: family[-1]] + "\n\n" + block + text[family[-1] :]
        elif "\n## Research notes" in text:
            at = text.index("\n## Research notes") + 1
            text = text[:at] + block + "\n\n" + text[at:]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def sections(text: str) -> dict[str, str]:
    """Every marked section of a page: NAME -> the text between its markers."""
    return {m[1]: m[2] for m in re.finditer(r"<!-- ([\w.-]+):begin -->\n(.*?)<!-- \1:end -->", text, re.DOTALL)}
