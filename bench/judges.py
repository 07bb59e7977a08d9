"""How often each refusal judge agrees with a person: the judges on the hand-labelled responses of both benchmark models.

Reads bench/judge-labels (the demo model's responses, and in 1.5b/ the second benchmark model's, labelled by
reading; see its README), runs every judge on one half of each set and prints, for each model and judge:
accuracy, precision and recall for `refusal`, F1, Cohen's kappa against the labels, the number of `unclear`
responses it was given (left out of the scores, which compare refusal against compliance), and seconds per
100 responses.

    python -m bench.judges                  # the test halves: the numbers that are reported
    python -m bench.judges --split dev      # the development halves, to design and tune on
    python -m bench.judges --models 1.5b --judges markers,rules --errors   # one set; print each mistake
    python -m bench.judges --rates          # only rewrite src/heretic/data/judge_rates.json from judges.json

What a judge costs in a search, as its median trial over the default judge's (`median_trial_ratio`, demo model
rows), comes from short searches of the same three seeded trials under each judge (run alone, one after another):

    python -m bench.run_bench --tools ours --trials 3 --startup-trials 3 --label judge-cost-NAME "--ours-args=ARGS"

with NAME and ARGS from COST_RUNS; the newest results file of each label is read (also by --table).

Writes bench/results/judges.json (the test halves only; one row per model and judge), and from it
src/heretic/data/judge_rates.json: the shipped judges' error rates, pooled over both sets, with which the
tool corrects its refusal counts. `model` is today's model judge asked by the demo model (the original, as
in a search on it), `model-1.5b` the same judge asked by the 1.5B model; the http judge runs when
--judge-url is given (e.g. a llama.cpp server: python -m llama_cpp.server --model FILE.gguf).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bench.harness.labels import SETS, load_labelled
from bench.harness.machine import run_record
from bench.harness.models import MODELS, model_gguf
from bench.harness.paths import RESULTS, WORK
from bench.harness.publish import update_section
from bench.harness.tools import REFERENCE_MARKERS
from heretic.config import DEFAULT_REFUSAL_MARKERS, Settings
from heretic.prompts import Prompt
from heretic.scoring.judge_rates import RATES_FILE, rates_file
from heretic.scoring.refusals import MarkerJudge, RefusalJudge

SYSTEM = Settings().system_prompt
# The trial-cost search of each judge on the demo model: judge row -> our arguments (the reference's markers are
# passed to every run_bench search, so `--judge markers` there counts with them: the markers-reference row).
COST_RUNS = {  # judge row: (NAME of the run's label judge-cost-NAME, ARGS)
    "rules": ("rules", "--judge rules"),
    "markers-reference": ("markers", "--judge markers"),
    "model": ("model", "--judge model"),
    "model-1.5b": ("model-1.5b", f"--judge model --judge-model {WORK / MODELS['1.5b']}"),  # as bench.harness.models prepares it
}


def scores(labels: list[bool], verdicts: list[bool]) -> dict[str, float]:
    """Accuracy, precision/recall/F1 of `refusal` (the positive class) and Cohen's kappa.

    kappa = (p_o - p_e) / (1 - p_e), with p_o the observed agreement and p_e the agreement expected
    by chance from each side's rate of `refusal`."""
    n = len(labels)
    tp = sum(a and b for a, b in zip(labels, verdicts))
    fp = sum(b and not a for a, b in zip(labels, verdicts))
    fn = sum(a and not b for a, b in zip(labels, verdicts))
    tn = n - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    observed = (tp + tn) / n if n else 0.0
    p_label, p_verdict = (tp + fn) / n if n else 0.0, (tp + fp) / n if n else 0.0
    expected = p_label * p_verdict + (1 - p_label) * (1 - p_verdict)
    kappa = (observed - expected) / (1 - expected) if expected < 1 else 1.0
    return {
        "n": n,
        "accuracy": observed,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "kappa": kappa,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def model_judge(model: str) -> RefusalJudge:
    """A benchmark model (a key of MODELS) asked, as `--judge model` asks the model being searched."""
    from heretic.model.generation import Engine
    from heretic.model.loading import eos_token_ids, load_model
    from heretic.scoring.model_judge import ModelJudge

    loaded = load_model(str(model_gguf(model)), dtypes=["fastest"])
    engine = Engine(loaded.model, loaded.tokenizer, eos_token_ids(loaded), batch_size=32)
    return ModelJudge(engine, threshold=Settings().judge_threshold)


def make(name: str, url: str | None) -> RefusalJudge:
    from heretic.scoring.http_judge import HttpJudge, HttpJudgeConfig
    from heretic.scoring.rules import RuleJudge

    if name == "markers":
        return MarkerJudge(DEFAULT_REFUSAL_MARKERS)
    if name == "markers-reference":
        return MarkerJudge(REFERENCE_MARKERS)
    if name == "rules":
        return RuleJudge()
    if name == "model":
        return model_judge("demo")
    if name == "model-1.5b":
        return model_judge("1.5b")
    if name == "http":
        assert url, "--judge-url is needed for the http judge"
        return HttpJudge(HttpJudgeConfig(url))
    raise SystemExit(f"unknown judge {name}")


def run_judge(judge: RefusalJudge, rows: list[dict[str, Any]]) -> tuple[list[bool], float]:
    """(verdicts, seconds per 100 responses)."""
    prompts = [Prompt(SYSTEM, row["prompt"]) for row in rows]
    started = time.perf_counter()
    verdicts = [bool(v) for v in judge.judge(prompts, [row["response"] for row in rows])]
    return verdicts, (time.perf_counter() - started) / max(1, len(rows)) * 100


def evaluate(
    name: str, judge: RefusalJudge, rows: list[dict[str, Any]], model: str, split: str, show_errors: bool
) -> dict[str, Any]:
    """One row of judges.json: the judge's scores against the labels of `rows` (the `split` half of `model`'s set)."""
    verdicts, seconds = run_judge(judge, rows)
    clear = [(row, verdict) for row, verdict in zip(rows, verdicts) if row["label"] != "unclear"]
    result: dict[str, Any] = dict(scores([row["label"] == "refusal" for row, _ in clear], [verdict for _, verdict in clear]))
    by_kind = {}
    for kind in ("harmful", "harmless"):
        part = [(row, verdict) for row, verdict in clear if row["kind"] == kind]
        by_kind[kind] = {"n": len(part), "wrong": sum((row["label"] == "refusal") != verdict for row, verdict in part)}
    result.update(model=model, split=split, judge=name, unclear=len(rows) - len(clear))
    result.update(seconds_per_100=seconds, by_kind=by_kind)
    if show_errors:
        for row, verdict in clear:
            if (row["label"] == "refusal") != verdict:
                said = "refusal" if verdict else "compliance"
                print(
                    f"--- {name} said {said}, label {row['label']} [{model} {row['id']}] {row['prompt'][:80]!r}\n{row['response'][:400]!r}"
                )
    return result


def trial_costs(default: str) -> dict[str, dict[str, Any]]:
    """Each judge's median trial on the demo model and its ratio to the default judge's, from the newest run_bench
    results of label judge-cost-NAME (COST_RUNS); judges without such a run are left out."""
    newest: dict[str, tuple[str, dict[str, Any]]] = {}
    for path in sorted(RESULTS.glob("2*.json")):  # run_bench's files are named by their start time
        tools = json.loads(path.read_text()).get("tools", {})
        for name, (label, _) in COST_RUNS.items():
            if f"judge-cost-{label}" in tools:
                newest[name] = (path.name, tools[f"judge-cost-{label}"])
    if default not in newest:
        return {}
    base = newest[default][1]["median_trial_s"]
    return {
        name: {"median_trial_s": run["median_trial_s"], "median_trial_ratio": run["median_trial_s"] / base, "cost_run": file}
        for name, (file, run) in newest.items()
    }


def attach_costs(results: list[dict[str, Any]]) -> None:
    """Each demo-model row gets its judge's median trial and ratio (None where not measured); other rows None."""
    costs = trial_costs(Settings().judge)
    for row in results:
        row.update({"median_trial_s": None, "median_trial_ratio": None, "cost_run": None})
        if row["model"] == MODELS["demo"]:  # measured on the demo model only
            row.update(costs.get(row["judge"], {}))


def table(results: list[dict[str, Any]]) -> str:
    """One line per judge, its scores on each model's set side by side ("a / b", models in the order of the rows)."""
    models = list(dict.fromkeys(row["model"] for row in results))
    rows = {(row["model"], row["judge"]): row for row in results}

    def cells(judge: str, key: str, form: str) -> str:
        return " / ".join(format(rows[(model, judge)][key], form) if (model, judge) in rows else "–" for model in models)

    names = " / ".join(model.removeprefix("Qwen2.5-Coder-").removesuffix("-Instruct") for model in models)
    lines = [
        f"| judge | F1 ({names}) | Cohen's κ | precision | recall | unclear given | s / 100 responses | median trial × default |",
        "|---|---|---|---|---|---|---|---:|",
    ]
    for judge in dict.fromkeys(row["judge"] for row in results):
        ratio = rows.get((models[0], judge), {}).get("median_trial_ratio")
        scores_ = " | ".join(cells(judge, key, ".3f") for key in ("f1", "kappa", "precision", "recall"))
        lines.append(
            f"| {judge} | {scores_} | {cells(judge, 'unclear', 'd')} | {cells(judge, 'seconds_per_100', '.2f')} | "
            f"{'' if ratio is None else format(ratio, '.2f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=["dev", "test"], default="test")
    parser.add_argument("--models", default="demo,1.5b", help="the labelled sets to read (keys of bench.harness.models.MODELS)")
    parser.add_argument("--judges", default="markers,markers-reference,rules,model,model-1.5b")
    parser.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint for the http judge")
    parser.add_argument("--errors", action="store_true", help="print every response a judge gets wrong")
    parser.add_argument("--rates", action="store_true", help="only write the shipped rates from bench/results/judges.json")
    parser.add_argument(
        "--table",
        action="store_true",
        help="only rewrite the BENCHMARKS.md section (and the trial costs) of bench/results/judges.json",
    )
    args = parser.parse_args()
    if args.rates:
        write_rates()
        return
    if args.table:  # the costs are read again: a judge's cost run may come after its scores
        record = json.loads((RESULTS / "judges.json").read_text())
        attach_costs(record["results"])
        (RESULTS / "judges.json").write_text(json.dumps(record, indent=2))
        publish(record)
        return
    models = [model.strip() for model in args.models.split(",") if model.strip()]
    if unknown := [model for model in models if model not in SETS]:
        raise SystemExit(f"no labelled set for {unknown}: choose from {sorted(SETS)}")
    if args.split == "test" and set(models) != set(SETS):  # checked before any judge runs: a model judge takes long
        raise SystemExit("judges.json holds every labelled set: run the test halves without --models")
    sets = {MODELS[model]: load_labelled(args.split, SETS[model]) for model in models}
    names = [name.strip() for name in args.judges.split(",") if name.strip()]
    if args.judge_url and "http" not in names:
        names.append("http")
    results = []
    for name in names:  # each judge is made once (a model judge loads its model) and reads every set
        judge = make(name, args.judge_url)
        results += [evaluate(name, judge, rows, model, args.split, args.errors) for model, rows in sets.items()]
    print(", ".join(f"{model}: {len(rows)} responses" for model, rows in sets.items()), f"({args.split} halves)")
    results.sort(key=lambda row: list(sets).index(row["model"]))  # grouped by model, judges in the order given
    print(table(results))
    if args.split == "test":
        attach_costs(results)
        record = {
            "default_judge": Settings().judge,
            "split": "test",
            "responses": {model: len(rows) for model, rows in sets.items()},
            **run_record(),
            "results": results,
        }
        (RESULTS / "judges.json").write_text(json.dumps(record, indent=2))
        write_rates()
        publish(record)


def publish(record: dict[str, Any]) -> None:
    """The "judges" section of BENCHMARKS.md: every judge on the test half of each labelled set."""
    sets = []
    for model, n in record["responses"].items():
        first = next(row for row in record["results"] if row["model"] == model)  # every judge reads the same responses
        refusals, compliances = first["tp"] + first["fn"], first["tn"] + first["fp"]
        sets.append(f"{n} responses of {model} ({refusals} refusals and {compliances} compliances by reading)")
    section = (
        f"The test halves of the hand-labelled sets (bench/judge-labels: {'; '.join(sets)}; the rest unclear and "
        "left out; the demo model's responses run to 100 tokens, the 1.5B model's to 200); refusal is the positive "
        "class. The development halves, on which the rules and the model judge's threshold were tuned, are not "
        "scored here. `model` is the model judge asked by the demo model, `model-1.5b` by the 1.5B model. Each cell "
        "gives the 0.5B / 1.5B sets' values. Median trial × default: a search's median trial under the judge over one "
        "under the default judge, the same three seeded trials on the demo model (the files named by `cost_run` in "
        "judges.json). Targets: F1 ≥ 0.95 and κ ≥ 0.85.\n\n" + table(record["results"])
    )
    update_section(section, "judges", record, "python -m bench.judges")


def write_rates() -> None:
    """src/heretic/data/judge_rates.json from bench/results/judges.json."""
    RATES_FILE.write_text(json.dumps(rates_file(json.loads((RESULTS / "judges.json").read_text())), indent=2) + "\n")
    print(f"wrote {RATES_FILE}")


if __name__ == "__main__":
    main()
