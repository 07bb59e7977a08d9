"""The benchmark lab as a package: no sys.path edits, every module imports, the commands the docs give name
real modules, and BENCHMARKS.md is one page of stamped, script-written sections under its fixed headings."""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

from bench.harness.publish import STAMP, module_command, sections, stamp

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
NOT_CODE = ("work", "results", ".venv-reference")  # run folders and results, not the package
HEADINGS = [
    "Side-by-side against heretic-llm 1.4.0",
    "Our search over three seeds",
    "Directions on two models",
    "Machine profiles",
    "Refusal judges against human labels",
    "Late refusals",
    "Many workers, one search",
    "GGUF in llama.cpp",
    "Memory",
    "Research notes",
]


def bench_files() -> list[Path]:
    return sorted(p for p in BENCH.rglob("*.py") if p.relative_to(BENCH).parts[0] not in NOT_CODE)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_sys_path_edits_under_bench() -> None:
    edits = [str(p.relative_to(ROOT)) for p in bench_files() if "sys.path" in p.read_text()]
    assert edits == []


@pytest.mark.parametrize("name", [module_name(p) for p in bench_files()])
def test_every_bench_module_imports(name: str) -> None:
    importlib.import_module(name)


# A research note's command for a script since removed names the commit that has it: `git checkout SHA && python -m ...`.
AT_COMMIT = re.compile(r"git checkout ([0-9a-f]{7,40}) && python3? -m (bench(?:\.\w+)+)")


def command_pages() -> list[Path]:
    return [ROOT / "BENCHMARKS.md", ROOT / "Makefile", *sorted((ROOT / "docs").rglob("*.md"))]


def documented_modules() -> list[str]:
    texts = [AT_COMMIT.sub("", page.read_text()) for page in command_pages()]
    found = {m for text in texts for m in re.findall(r"python3? -m (bench(?:\.\w+)+)", text)}
    return sorted(found)


def test_the_documented_bench_commands_name_existing_modules() -> None:
    modules = documented_modules()
    assert "bench.run_bench" in modules  # the pages are read at all
    assert [name for name in modules if importlib.util.find_spec(name) is None] == []


def test_commands_of_removed_scripts_name_a_commit_that_has_them() -> None:
    pinned = [m for page in command_pages() for m in AT_COMMIT.findall(page.read_text())]
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True)
    if shallow.stdout.strip() != "false":
        return  # a shallow clone (or no git) lacks the older commits: the pattern above is all that can be checked
    for commit, module in pinned:
        path = module.replace(".", "/") + ".py"
        found = subprocess.run(["git", "cat-file", "-e", f"{commit}:{path}"], cwd=ROOT, capture_output=True)
        assert found.returncode == 0, f"commit {commit} has no {path}"


def test_benchmarks_md_is_one_page_under_its_headings() -> None:
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert len(text.splitlines()) <= 300
    assert re.findall(r"^## (.+)$", text, re.MULTILINE) == HEADINGS
    for line in text.split("## Research notes", 1)[1].strip().splitlines():
        link = re.fullmatch(r"- \[\d{4}-\d{2}-\d{2}: .+\]\((docs/research/\d{4}-\d{2}-\d{2}-[\w-]+\.md)\)", line)
        assert link is not None and (ROOT / link[1]).is_file(), line


def test_every_marked_section_of_benchmarks_md_is_stamped() -> None:
    marked = sections((ROOT / "BENCHMARKS.md").read_text())
    assert "full" in marked and "seeds" in marked
    unstamped = [name for name, body in marked.items() if not STAMP.match(body.split("\n", 1)[0])]
    assert unstamped == []


def test_a_stamp_says_what_was_not_recorded_and_names_the_module() -> None:
    line = stamp({"date": "2026-11-30"}, "python bench/run_bench.py --report-only")
    assert STAMP.match(line)
    assert "CPU flags not recorded" in line and "commit not recorded" in line
    assert "`python -m bench.run_bench --report-only`" in line
    recorded = stamp({"date": "2026-12-07 05:12 UTC", "cpu_flags": ["avx2", "fma", "avx512_bf16"], "commit": "a1cf45f"}, "x")
    assert recorded.startswith("_Measured 2026-12-07 · CPU avx512_bf16, avx2 · commit a1cf45f ·")
    assert module_command("python bench/levers.py") == "python -m bench.research.levers"


def test_results_of_several_commits_are_stamped_with_each_commit() -> None:
    from bench.harness.publish import recorded

    runs = [{"date": d, "cpu_flags": ["avx2"], "commit": c} for d, c in [("2026-12-03", "aaa1111"), ("2026-12-07", "bbb2222")]]
    line = stamp(recorded(*runs, runs[0]), "x")
    assert STAMP.match(line) and "· commits aaa1111, bbb2222 ·" in line and line.startswith("_Measured 2026-12-07 ")
    assert "· commit aaa1111 ·" in stamp(recorded(runs[0], runs[0]), "x")
    assert "commit not recorded" in stamp(recorded(runs[0], {"date": "2026-12-01"}), "x")


def test_the_demo_timing_reads_the_runs_own_output() -> None:
    from bench.demo_time import table, verification_share

    printed = "Refusals on whole responses (up to 96 tokens, rules judge): trial 3: 5 → 4/64 (0 degenerate); took\n 1m 02s, 15% of the search's 6m 51s"
    assert verification_share(printed) == 0.15 and verification_share("no count") is None
    row = {"date": "2026-12-07", "cpu_flags": ["avx2"], "cache": "warm", "wall_s": 480.0, "trials": 24, "verification": 0.15}
    row["chosen"] = {"refusals": 4, "kl": 0.2, "verified": {"response_length": 96}, "heldout_kl": {"mean": 0.3, "median": 0.02}}
    assert "| 2026-12-07 | avx2 | warm | 8.0 min | 24 | 15% | 4/64, 0.200 ✓ | 0.300, 0.0200 |" in table([row])


def test_the_benchmark_says_which_judge_our_command_runs() -> None:
    """The reference's markers are always passed, so without --judge our command runs the markers judge."""
    from bench.harness.tools import our_judge

    markers = ["sorry", "illegal"]
    assert our_judge(["--judge", "rules"], markers) == "rules"
    assert our_judge(["--search-minutes", "5", "--judge=model"], markers) == "model"
    assert our_judge([], markers).startswith("markers (the reference's 2;")
