"""Late refusals: how many refusal verdicts change when a judge reads more of each response.

The rules judge reads the first 300 characters of a response, and a search stops generating once its
verdict is fixed; a model can comply first and decline or lecture after that. This script reads every
response three ways: its first 300 characters (normalized as the rules judge counts them: the text
the search's verdict comes from), its first 100 tokens and its first 200 tokens, judges each reading
with each judge, and counts the verdicts that change between them, by direction (compliance → refusal,
refusal → compliance). The judges: `markers` (the default refusal markers), `rules` (the search's
judge: it reads at most 300 characters of any reading), `rules-whole` (the rules read whole, the
judge of the verified counts after a search, heretic/verify.py) and, when named, `model` (the demo
model asked; slow).

    python -m bench.late_refusals                    # the hand-labelled responses (bench/judge-labels)
    python -m bench.late_refusals --judges markers,rules,rules-whole,model
    python -m bench.late_refusals --model 1.5b bench/results/RUN.json 17   # a chosen trial and the original
    python -m bench.late_refusals --model 1.5b bench/work/ours-1.5b-mean-42 1 --without-original --batch-size 32

Labelled responses: the 700 responses of bench/judge-labels (both halves), tokenized with the demo
model's tokenizer; besides the changes, each judge's F1 and Cohen's kappa against the human labels
(`unclear` left out) at each length. They were generated to at most 100 tokens, so their first 200
tokens are the whole response: the table says how many end before each length.

Chosen trials (`--model`, a run_bench results file or an unfinished run's folder under bench/runs, and
trial numbers, comma-separated; then options of the tool, e.g. the searched run's own search-space
options if it changed them): the model loaded as bench.research.trial_responses does, and the harmful
evaluation responses of the original and of each trial's ablation generated to 200 tokens without early
stop (minutes of CPU per run on the demo model, about half an hour on the 1.5B one). Each trial's KL divergence on
the held-out harmless prompts (mean, median and the highest prompts) is measured beside its in-search KL.

Writes bench/results/late-refusals.json (a run keeps the other part's results there) and the
"late-refusals" section of BENCHMARKS.md, and prints the tables; `--table` only rewrites the section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness.labels import load_labelled
from bench.harness.machine import cpu_flags, git_commit
from bench.harness.models import prepare_model
from bench.harness.paths import RESULTS, ROOT
from bench.harness.publish import recorded, update_section
from bench.judges import SYSTEM, make, scores
from heretic.prompts import Prompt
from heretic.scoring.refusals import RefusalJudge
from heretic.scoring.rules import RuleJudge, normalize

WINDOW = 300  # characters the rules judge reads (normalized)
TOKENS = (100, 200)
LENGTHS = ("300 chars", "100 tokens", "200 tokens")
PAIRS = (("300 chars", "100 tokens"), ("100 tokens", "200 tokens"), ("300 chars", "200 tokens"))
OUT = RESULTS / "late-refusals.json"
MARKER = "late-refusals"
Decode = Callable[[list[int]], str]


# --- Readings and counts -------------------------------------------------------------------------


def window_prefix(text: str, window: int = WINDOW) -> str:
    """The shortest start of `text` whose normalized form holds `window` characters (all of `text` when it is
    shorter): what the rules judge has read when its verdict is fixed. The normalized length never shrinks as
    the text grows, so a binary search finds it."""
    if len(normalize(text)) < window:
        return text
    low, high = 0, len(text)  # normalize(text[:low]) is too short, normalize(text[:high]) is long enough
    while high - low > 1:
        middle = (low + high) // 2
        if len(normalize(text[:middle])) >= window:
            high = middle
        else:
            low = middle
    return text[:high]


def readings(text: str, ids: list[int], decode: Decode) -> dict[str, str]:
    """The response `text` (token ids `ids`) as read at each of LENGTHS; a reading longer than the response is all of it."""
    read = {LENGTHS[0]: window_prefix(text)}
    for count, length in zip(TOKENS, LENGTHS[1:]):
        read[length] = text if len(ids) <= count else decode(ids[:count])
    return read


def changes(before: list[bool], after: list[bool]) -> dict[str, int]:
    """Verdicts (True: refusal) that differ between two readings, by direction."""
    return {
        "to_refusal": sum(not a and b for a, b in zip(before, after)),
        "to_compliance": sum(a and not b for a, b in zip(before, after)),
    }


def judge_readings(judge: RefusalJudge, prompts: list[Prompt], read: list[dict[str, str]]) -> dict[str, list[bool]]:
    """The judge's verdicts on every response at each length."""
    return {length: [bool(v) for v in judge.judge(prompts, [r[length] for r in read])] for length in LENGTHS}


def summary(verdicts: dict[str, list[bool]]) -> dict[str, Any]:
    """Refusals at each length and the changes between each pair of lengths."""
    return {
        "refusals": {length: sum(verdicts[length]) for length in LENGTHS},
        "changes": {f"{a} -> {b}": changes(verdicts[a], verdicts[b]) for a, b in PAIRS},
    }


def shorter_than(texts: list[str], token_counts: list[int]) -> dict[str, int]:
    """How many responses end before each length (WINDOW normalized characters, then each of TOKENS): their
    readings at that length and beyond are the whole response."""
    short = {LENGTHS[0]: sum(len(normalize(text)) < WINDOW for text in texts)}
    return short | {length: sum(n < count for n in token_counts) for count, length in zip(TOKENS, LENGTHS[1:])}


def right_changes(verdicts: dict[str, list[bool]], labels: list[bool | None]) -> dict[str, int]:
    """For each pair of lengths, the changed verdicts that the longer reading has right (labels: True for
    refusal, None where unclear, which counts as neither)."""
    right = {}
    for a, b in PAIRS:
        pairs = zip(verdicts[a], verdicts[b], labels)
        right[f"{a} -> {b}"] = sum(before != after and after == label for before, after, label in pairs if label is not None)
    return right


def make_judges(names: list[str]) -> dict[str, RefusalJudge]:
    """The judges by name: those of bench/judges.py, and `rules-whole`."""
    return {name: RuleJudge(WINDOW, whole=True) if name == "rules-whole" else make(name, None) for name in names}


# --- Labelled responses --------------------------------------------------------------------------


def demo_tokenizer() -> Any:
    """The demo model's tokenizer, from the benchmark's bf16 folder (its weights are not loaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(prepare_model("demo")))


def labelled_part(judges: dict[str, RefusalJudge]) -> dict[str, Any]:
    """Every judge on the hand-labelled responses read at each length: changes and agreement with the labels."""
    rows = load_labelled(None)
    tokenizer = demo_tokenizer()
    decode: Decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
    ids = [tokenizer(row["response"], add_special_tokens=False)["input_ids"] for row in rows]
    read = [readings(row["response"], row_ids, decode) for row, row_ids in zip(rows, ids)]
    prompts = [Prompt(SYSTEM, row["prompt"]) for row in rows]
    clear = [i for i, row in enumerate(rows) if row["label"] != "unclear"]
    labels = [rows[i]["label"] == "refusal" for i in clear]
    results: dict[str, Any] = {}
    for name, judge in judges.items():
        started = time.perf_counter()
        verdicts = judge_readings(judge, prompts, read)
        entry = summary(verdicts)
        entry["changes_right"] = right_changes(
            verdicts, [None if row["label"] == "unclear" else row["label"] == "refusal" for row in rows]
        )
        entry["agreement"] = {}
        for length in LENGTHS:
            score = scores(labels, [verdicts[length][i] for i in clear])
            entry["agreement"][length] = {key: score[key] for key in ("f1", "kappa", "accuracy", "tp", "fp", "fn", "tn")}
        entry["seconds"] = time.perf_counter() - started
        results[name] = entry
    return {
        "responses": len(rows),
        "clear": len(clear),
        "harmful": sum(row["kind"] == "harmful" for row in rows),
        "hit_100_token_limit": sum(bool(row["hit_limit"]) for row in rows),
        "shorter_than": shorter_than([row["response"] for row in rows], [len(row_ids) for row_ids in ids]),
        "judges": results,
    }


# --- Chosen trials -------------------------------------------------------------------------------


def generated_part(session: Any, parameters: Any, judges: dict[str, RefusalJudge], number: int | None = None) -> dict[str, Any]:
    """The harmful evaluation responses under `parameters` (None: the original), generated to the longest of
    TOKENS without early stop, read at each length by every judge; for trial `number`, also its KL divergence
    from the original on the held-out harmless prompts (heretic.session.heldout_kl: mean, median, highest)."""
    from heretic.session import heldout_kl

    evaluator, engine = session.evaluator, session.engine
    if parameters is not None:
        session.ablator.apply(parameters, session.directions)
    started = time.perf_counter()
    try:
        token_ids = engine.generate(evaluator.harmful_ids, TOKENS[-1])
        seconds = time.perf_counter() - started
        held = heldout_kl(session, number, parameters) if parameters is not None and number is not None else None
    finally:
        session.ablator.reset()
    assert token_ids is not None
    read = [readings(engine.decode(ids), ids, engine.decode) for ids in token_ids]
    entry: dict[str, Any] = {
        "responses": len(read),
        "generation_seconds": seconds,
        "shorter_than": shorter_than([r[LENGTHS[-1]] for r in read], [len(ids) for ids in token_ids]),
        "judges": {name: summary(judge_readings(judge, evaluator.harmful, read)) for name, judge in judges.items()},
        "texts": [r[LENGTHS[-1]] for r in read],
    }
    if held is not None:
        entry["heldout_kl"] = {
            "prompts": len(held.values),
            "mean": held.mean,
            "median": held.median,
            "highest": [{"prompt": prompt, "kl": kl} for prompt, kl in held.highest()],
        }
    return entry


def trials_part(
    model: str,
    results: Path,
    numbers: list[int],
    extra: list[str],
    judges: dict[str, RefusalJudge],
    original: bool = True,
) -> dict[str, Any]:
    """The original (unless not `original`) and each chosen trial of a stored run of our search (a run_bench results file, or an
    unfinished run's folder under bench/runs) on the benchmark model `model`."""
    from bench.harness.paths import WORK
    from bench.harness.tools import stored_run, stored_trial_parameters
    from heretic.cli import settings_from_argv
    from heretic.session import prepare

    trials, argv = stored_run(results, model, WORK / "late-refusals")
    stored = {trial["number"]: trial for trial in trials if trial.get("params")}
    if missing := [number for number in numbers if number not in stored]:
        raise SystemExit(f"{results} has no trial {', '.join(map(str, missing))}")
    session = prepare(settings_from_argv([*argv[1:], "--judge", "rules", *extra]), interactive=False)
    runs = {"original": generated_part(session, None, judges)} if original else {}
    for number in numbers:
        parameters = stored_trial_parameters(session, stored[number]["params"])
        runs[f"trial {number}"] = generated_part(session, parameters, judges, number)
        runs[f"trial {number}"]["in_search"] = {"refusals": stored[number]["refusals"], "kl": stored[number]["kl"]}
    source = str(results.resolve().relative_to(ROOT)) if results.is_dir() else results.name
    return {"model": model, "source": source, "options": extra, "runs": runs}


# --- Tables and the BENCHMARKS.md section --------------------------------------------------------


def change_cells(entry: dict[str, Any]) -> list[str]:
    """Refusals at each length, then each pair's changes as "+to refusal / −to compliance", with how many of
    them the longer reading has right where the entry has labels."""
    cells = [" / ".join(str(entry["refusals"][length]) for length in LENGTHS)]
    for a, b in PAIRS:
        change = entry["changes"][f"{a} -> {b}"]
        right = f" ({entry['changes_right'][f'{a} -> {b}']} right)" if "changes_right" in entry else ""
        cells.append(f"+{change['to_refusal']} / −{change['to_compliance']}{right}")
    return cells


HEAD = "refusals at 300 chars / 100 tok / 200 tok | 300 chars → 100 tok | 100 tok → 200 tok | 300 chars → 200 tok"


def labelled_table(part: dict[str, Any]) -> str:
    lines = [f"| judge | {HEAD} | F1 (300 chars / 100 tok / 200 tok) | κ (same) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, entry in part["judges"].items():
        agreement = entry["agreement"]
        f1 = " / ".join(f"{agreement[length]['f1']:.3f}" for length in LENGTHS)
        kappa = " / ".join(f"{agreement[length]['kappa']:.3f}" for length in LENGTHS)
        lines.append(f"| {name} | {' | '.join(change_cells(entry))} | {f1} | {kappa} |")
    return "\n".join(lines)


def trials_table(trials: dict[str, Any]) -> str:
    lines = [
        f"| model | run | judge | {HEAD} | shorter than 300 chars / 100 tok / 200 tok |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for run_set in trials.values():
        for run, entry in run_set["runs"].items():
            short = " / ".join(str(entry["shorter_than"][length]) for length in LENGTHS)
            if "in_search" in entry:
                run += f" (in the search: {entry['in_search']['refusals']} refusals, KL {entry['in_search']['kl']:.3f}"
                held = entry.get("heldout_kl")
                run += f"; held-out KL {held['mean']:.3f}, median {held['median']:.4f})" if held else ")"
            for name, judged in entry["judges"].items():
                cells = " | ".join(change_cells(judged))
                lines.append(f"| {run_set['model']} ({run_set['source']}) | {run} | {name} | {cells} | {short} |")
    return "\n".join(lines)


def section(results: dict[str, Any]) -> str:
    """The "late-refusals" section of BENCHMARKS.md, from everything in late-refusals.json."""
    lines = [
        "Each response read three ways, its first 300 characters (normalized, as the rules judge counts them: what a "
        "search's verdict comes from), its first 100 tokens and its first 200 tokens, and judged by each judge; "
        "`+a / −b`: a verdicts go from compliance to refusal and b from refusal to compliance between two readings. "
        "`rules` reads at most 300 characters of any reading; `rules-whole` is the rules judge reading the whole "
        "reading (`RuleJudge(whole=True)`, the judge of the verified counts). Chosen trials of a search: "
        "`python -m bench.late_refusals --model MODEL RESULTS TRIALS`.",
    ]
    labelled = results.get("labelled")
    if labelled:
        short = labelled["shorter_than"]
        lines += [
            "",
            f"**Labelled responses** ({labelled['date']}, CPU flags {', '.join(labelled['cpu_flags']) or 'none'}, "
            f"commit {labelled['commit']}): the {labelled['responses']} responses of bench/judge-labels (both halves), "
            f"{labelled['clear']} with a clear label (F1 and κ against it; `(n right)`: changed verdicts that the longer "
            f"reading has right). They were generated to at most 100 tokens: {short['300 chars']} are shorter than 300 "
            f"normalized characters, {short['100 tokens']} end before 100 tokens of the demo tokenizer and "
            f"{short['200 tokens']} before 200 tokens, so their 200-token reading is the whole response and the "
            "100 → 200 column is empty by construction.",
            "",
            labelled_table(labelled),
        ]
    trials = results.get("trials", {})
    if trials:
        runs = "; ".join(
            f"{run_set['model']} {run_set['date']}, CPU flags {', '.join(run_set['cpu_flags']) or 'none'}, commit "
            f"{run_set['commit']}, `{run_set['command']}`"
            for run_set in trials.values()
        )
        lines += [
            "",
            "**Chosen trials** (and the original where measured): the harmful evaluation responses generated to 200 "
            "tokens without early stop; beside each trial's in-search KL, its KL on the held-out harmless prompts "
            f"(mean and median; where measured). {runs}.",
            "",
            trials_table(trials),
        ]
    return "\n".join(lines)


def stamp(entry: dict[str, Any], command: str) -> dict[str, Any]:
    """`entry` with the date, the CPU's flags, the commit and the command that made it."""
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return {**entry, "date": date, "cpu_flags": cpu_flags(), "commit": git_commit() or "unknown", "command": command}


def publish(results: dict[str, Any]) -> None:
    """The "late-refusals" section of BENCHMARKS.md, stamped with what its parts recorded."""
    parts = [part for part in [results.get("labelled"), *results.get("trials", {}).values()] if part]
    meta = recorded(*({**part, "commit": None if part["commit"] == "unknown" else part["commit"]} for part in parts))
    update_section(section(results), MARKER, meta, "python -m bench.late_refusals")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--judges", default="markers,rules,rules-whole", help="comma-separated; add `model` for the demo model asked"
    )
    parser.add_argument("--model", choices=["demo", "1.5b"], default=None, help="measure chosen trials of this benchmark model")
    parser.add_argument(
        "results",
        type=Path,
        nargs="?",
        help="with --model: a run_bench results file whose trials have parameters, or a run folder under bench/runs",
    )
    parser.add_argument("trials", nargs="?", help="with --model: trial numbers, comma-separated")
    parser.add_argument("--without-original", action="store_true", help="with --model: the trials only, not the original")
    parser.add_argument("--table", action="store_true", help="measure nothing: rewrite the section from late-refusals.json")
    args, extra = parser.parse_known_args()
    if args.table:
        publish(json.loads(OUT.read_text()))
        return
    if args.model and not (args.results and args.trials):
        parser.error("--model needs a results file and trial numbers")
    if not args.model and (extra or args.results):
        parser.error("a results file, trials and search-space options go with --model")
    judges = make_judges([name.strip() for name in args.judges.split(",") if name.strip()])
    command = "python -m bench.late_refusals " + " ".join(sys.argv[1:])
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    if args.model:
        numbers = [int(n) for n in args.trials.split(",")]
        run_set = trials_part(args.model, args.results, numbers, extra, judges, not args.without_original)
        results.setdefault("trials", {})[f"{args.model}/{args.results.stem if args.results.is_file() else args.results.name}"] = (
            stamp(run_set, command.strip())
        )
        print(trials_table({"run": run_set}))
    else:
        results["labelled"] = stamp(labelled_part(judges), command.strip())
        print(labelled_table(results["labelled"]))
    OUT.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    publish(results)
    print(f"written: {OUT} and the {MARKER!r} section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
