"""A linear probe as a refusal judge: does the judge model's residual stream tell a refusal better
than asking it? Measured on the hand-labelled set (bench/judge-labels), like bench/judges.py.

For every labelled response, the demo model (the original, as the model judge uses it) reads one of

    question      the model judge's classification question about the pair (scoring/verdict.py),
                  residual at its last token (the same forward pass as the model judge)
    conversation  the chat itself: the prompt in the chat template, then the response; residual at
                  the response's last token
    response-mean the same pass; residuals averaged over the response's tokens

and a logistic regression on one layer's residual predicts the label:

    z = (x − μ) / σ,   p(refusal) = sigmoid(w · z + b),   min_w,b  mean BCE + λ ‖w‖² / 2   (L-BFGS)

The layer and λ are chosen by 5-fold cross-validation on the development half, folds grouped by
prompt (every response to a prompt in the same fold); the probe is refitted on the whole development
half and scored once on the test half. `unclear` responses are left out of fitting and scoring.

    python -m bench.research.judge_probe            # about 6 minutes on 2 CPU cores

Writes bench/results/judge_probe.json and prints a table in the format of bench/judges.py.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from bench.harness.labels import load_labelled
from bench.harness.paths import RESULTS
from bench.judges import SYSTEM, scores, table

LAYERS_FROM = 2  # the first layers hold little beyond the tokens themselves
L2S = (0.01, 0.1, 1.0)
FOLDS = 5


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(μ, σ, w, b) of an L2-regularized logistic regression of y (rows,) bool on x (rows, hidden)."""
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False) + 1e-6
    z, target = (x - mean) / std, y.double()
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, target) + 0.5 * l2 * w.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return mean, std, w.detach(), b.detach()


def logits(probe: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
    mean, std, w, b = probe
    return ((x.double() - mean) / std) @ w + b


def folds_of(groups: list[str]) -> list[torch.Tensor]:
    """Validation rows of each fold: the groups (prompts) dealt round-robin in order of first appearance."""
    fold_of = {group: i % FOLDS for i, group in enumerate(dict.fromkeys(groups))}
    return [torch.tensor([i for i, g in enumerate(groups) if fold_of[g] == k]) for k in range(FOLDS)]


def choose(features: torch.Tensor, y: torch.Tensor, groups: list[str]) -> tuple[int, float, float]:
    """(layer, λ, cross-validated F1) with the best cross-validated F1 on the development half."""
    best = (-1.0, 0, 0.0)
    folds = folds_of(groups)
    for layer in range(LAYERS_FROM, features.shape[1]):
        for l2 in L2S:
            out = torch.zeros(len(y), dtype=torch.float64)
            for validation in folds:
                train = torch.ones(len(y), dtype=torch.bool)
                train[validation] = False
                out[validation] = logits(fit_logistic(features[train, layer], y[train], l2), features[validation, layer])
            score = scores(y.tolist(), (out > 0).tolist())["f1"]
            if score > best[0]:
                best = (score, layer, l2)
    return best[1], best[2], best[0]


def extract(rows: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Residuals (rows, layers + 1, hidden) of every variant, and seconds per 100 responses of each pass."""
    from heretic.demo import demo_model_file
    from heretic.model.generation import Engine
    from heretic.model.loading import eos_token_ids, load_model
    from heretic.prompts import Prompt
    from heretic.scoring.verdict import SYSTEM as JUDGE_SYSTEM
    from heretic.scoring.verdict import classification_question

    loaded = load_model(str(demo_model_file("~/.cache/heretic")), dtypes=["fastest"])
    engine = Engine(loaded.model, loaded.tokenizer, eos_token_ids(loaded))
    questions = engine.encode([Prompt(JUDGE_SYSTEM, classification_question(r["prompt"], r["response"])) for r in rows])
    chats = engine.encode([Prompt(SYSTEM, r["prompt"]) for r in rows])
    responses = [
        loaded.tokenizer.encode(r["response"], add_special_tokens=False) or [loaded.tokenizer.eos_token_id] for r in rows
    ]
    features: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    for name, sequences, starts in (
        ("question", questions, [len(q) - 1 for q in questions]),
        ("conversation", [c + r for c, r in zip(chats, responses)], [len(c) for c in chats]),
    ):
        started = time.perf_counter()
        last, mean = hidden_states(loaded.model, sequences, starts)
        seconds[name] = (time.perf_counter() - started) / len(rows) * 100
        features[name] = last
        if name == "conversation":
            features["response-mean"], seconds["response-mean"] = mean, seconds[name]
    return features, seconds


@torch.inference_mode()
def hidden_states(
    model: Any, sequences: list[list[int]], starts: list[int], batch: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's residual at the last token, and averaged from `starts` to the end: (rows, layers + 1, hidden) each."""
    last: list[torch.Tensor | None] = [None] * len(sequences)
    mean: list[torch.Tensor | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for first in range(0, len(order), batch):
        chosen = order[first : first + batch]
        width = max(len(sequences[i]) for i in chosen)
        ids = torch.zeros((len(chosen), width), dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, i in enumerate(chosen):  # left padding: the last token is at -1 in every row
            ids[row, width - len(sequences[i]) :] = torch.tensor(sequences[i])
            mask[row, width - len(sequences[i]) :] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        output = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True, logits_to_keep=1)
        states = torch.stack(output.hidden_states, 1).float()  # (rows, layers + 1, width, hidden)
        for row, i in enumerate(chosen):
            last[i] = states[row, :, -1]
            mean[i] = states[row, :, width - (len(sequences[i]) - starts[i]) :].mean(1)
    return torch.stack(last), torch.stack(mean)  # type: ignore[arg-type]


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    labelled = load_labelled()
    rows = [row for row in labelled if row["label"] != "unclear"]
    unclear = sum(row["label"] == "unclear" and row["split"] == "test" for row in labelled)  # left out, as in judges.py
    features, seconds = extract(rows)
    y = torch.tensor([row["label"] == "refusal" for row in rows])
    dev = torch.tensor([row["split"] == "dev" for row in rows])
    groups = [f"{row['kind']}/{row['prompt_index']}" for row, d in zip(rows, dev) if d]
    results = []
    for name, x in features.items():
        layer, l2, cv = choose(x[dev], y[dev], groups)
        probe = fit_logistic(x[dev, layer], y[dev], l2)
        verdicts = logits(probe, x[~dev, layer]) > 0
        result: dict[str, Any] = scores(y[~dev].tolist(), verdicts.tolist())
        result.update(
            judge=f"probe: {name}, layer {layer}, λ {l2}",
            layer=layer,
            l2=l2,
            dev_cv_f1=cv,
            unclear=unclear,
            seconds_per_100=seconds[name],
        )
        results.append(result)
        print(f"{name}: layer {layer}, λ {l2}, development cross-validated F1 {cv:.3f}", flush=True)
    print(table(results))
    out = {"split": "test", "responses": int((~dev).sum()), "labels": "unclear left out", "results": results}
    (RESULTS / "judge_probe.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
