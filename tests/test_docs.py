"""The user docs stay true to the code: the generated settings reference, every flag and make target they
name, and every relative link between them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from heretic.cli import build_parser
from heretic.config import render_markdown

ROOT = Path(__file__).resolve().parents[1]
# The pages checked: the README and docs/*.md, except the pages others generate or keep (docs/support.md is
# written by tests/support_matrix.py; docs/research/ holds research notes, not user docs).
NOT_CHECKED = {"support.md"}
PAGES = [ROOT / "README.md"] + sorted(page for page in (ROOT / "docs").glob("*.md") if page.name not in NOT_CHECKED)

# Commands of other programs in the docs: their flags are not Heretic's.
OTHER_PROGRAMS = {
    "curl",
    "git",
    "hf",
    "llama-cli",
    "llama-server",
    "ollama",
    "optuna-dashboard",
    "pip",
    "python",
    "python3",
}
FENCE = re.compile(r"^ *```.*?$(.*?)^ *```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
MAKE = re.compile(r"(?<![\w-])make\s+([a-z][\w-]*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
ENVIRONMENT = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+")


def heretic_options() -> set[str]:
    """Every option string of `heretic --help`, from the parser the command builds."""
    return {option for action in build_parser()._actions for option in action.option_strings}


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(encoding="utf-8"), re.MULTILINE))


def code_texts(markdown: str) -> list[tuple[str, bool]]:
    """The code in a page: each line of a fenced block (True) and each inline code span (False)."""
    texts = [(line, True) for block in FENCE.findall(markdown) for line in block.splitlines()]
    prose = FENCE.sub("", markdown)
    return texts + [(span.strip(), False) for _, span in CODE_SPAN.findall(prose)]


def command_flags(text: str, fenced: bool) -> list[str]:
    """The flags a piece of code gives Heretic: a `heretic ...` command or a bare flag; in a code span, any flag
    outside another program's command (a fenced block also holds TOML, Python, output and other programs)."""
    command = ENVIRONMENT.sub("", text.strip().removeprefix("$ "))
    first = command.split(maxsplit=1)[0] if command.split() else ""
    if first in OTHER_PROGRAMS or first == "make" or first.startswith("#"):
        return []
    if fenced and first != "heretic" and not first.startswith("--"):
        return []
    return FLAG.findall(command)


def unknown_flags(markdown: str, options: set[str]) -> list[str]:
    return [flag for text, fenced in code_texts(markdown) for flag in command_flags(text, fenced) if flag not in options]


def unknown_make_targets(markdown: str, targets: set[str]) -> list[str]:
    found = [target for text, _ in code_texts(markdown) for target in MAKE.findall(text)]
    return [target for target in found if target not in targets]


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors of a page's headings (outside code), a repeated heading numbered as GitHub does."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", markdown), re.MULTILINE):
        anchor = github_anchor(heading)
        seen[anchor] = seen.get(anchor, -1) + 1
        if seen[anchor]:
            seen[f"{anchor}-{seen[anchor]}"] = 0
    return set(seen)


def broken_links(page: Path, markdown: str) -> list[str]:
    """Relative links of a page to a file that does not exist, or to a heading its target page lacks.

    BENCHMARKS.md is rewritten apart from the docs: a link into it is checked for the file only, not its anchor."""
    broken = []
    for target in LINK.findall(FENCE.sub("", markdown)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_text, _, anchor = target.partition("#")
        path = (page.parent / path_text).resolve()
        if path_text and not path.exists():
            broken.append(target)
            continue
        into_a_page = not path_text or (path.suffix == ".md" and path.name != "BENCHMARKS.md")
        if anchor and into_a_page and anchor not in anchors(path.read_text(encoding="utf-8") if path_text else markdown):
            broken.append(target)
    return broken


def test_configuration_reference_is_in_sync() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == render_markdown(), "regenerate it: python -m heretic.config --markdown > docs/configuration.md"


def test_the_reference_names_every_setting_with_its_flag() -> None:
    from heretic.config import Settings

    reference = render_markdown()
    for name in Settings.model_fields:
        assert f"| `{name}` | `--{name.replace('_', '-')}`" in reference, name


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_flag_in_the_docs_is_an_option(page: Path) -> None:
    assert unknown_flags(page.read_text(encoding="utf-8"), heretic_options()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_make_target_in_the_docs_exists(page: Path) -> None:
    assert unknown_make_targets(page.read_text(encoding="utf-8"), makefile_targets()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_in_the_docs_resolves(page: Path) -> None:
    assert broken_links(page, page.read_text(encoding="utf-8")) == []


def test_the_checks_catch_mistakes(tmp_path: Path) -> None:
    options = heretic_options()
    assert {"--n-trials", "--no-count-heldout", "--help"} <= options
    page = """Run `heretic MODEL --n-trails 5` or set `--max-kl 0.3`, then `--judge-modle x`.

```sh
CUDA_VISIBLE_DEVICES=0 heretic MODEL --workers 2 --serach-only
llama-server -m out.gguf --jinja          # another program's flag
--harmful-prompt bundled:harmful_train
make tset
```
`pip install --no-deps x` and `make demo` and `make lnit`.
"""
    assert unknown_flags(page, options) == ["--serach-only", "--harmful-prompt", "--n-trails", "--judge-modle"]
    assert unknown_make_targets(page, makefile_targets()) == ["tset", "lnit"]
    (tmp_path / "other.md").write_text("# Other page\n\n## Its section\n")
    links = "[a](other.md#its-section) [b](other.md#no-section) [c](missing.md) [d](https://example.org) [e](#top)\n# Top\n"
    assert broken_links(tmp_path / "page.md", links) == ["other.md#no-section", "missing.md"]


def test_github_anchors() -> None:
    assert github_anchor("Side-by-side against heretic-llm 1.4.0") == "side-by-side-against-heretic-llm-140"
    assert github_anchor("GGUF in llama.cpp") == "gguf-in-llamacpp"
    assert github_anchor("Objectives: co-optimize more than `refusals`") == "objectives-co-optimize-more-than-refusals"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_shlex_reads_every_heretic_command() -> None:
    """The heretic commands in the docs are complete shell words (no unbalanced quotes)."""
    for page in PAGES:
        for text, fenced in code_texts(page.read_text(encoding="utf-8")):
            command = ENVIRONMENT.sub("", text.strip())
            if fenced and command.startswith("heretic "):
                shlex.split(command, comments=True)


def test_the_architecture_page_lists_the_enforced_layers() -> None:
    """docs/architecture.md's table of layers names, row by row, the layers tests/test_codebase.py enforces."""
    from test_codebase import LAYERS

    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| \d+ \| ([^|]+) \|", page, re.MULTILINE)
    assert [set(re.findall(r"`([\w.]+)`", row)) for row in rows] == [set(layer) for layer in LAYERS]
