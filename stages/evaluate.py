"""Stage `evaluate`: does the model know who it is, without forgetting everything else?

Reads models/base, models/merged, data/raw/val.jsonl, params data.name/owner, eval.*.
Writes metrics/eval.json (DVC metrics: merged numbers, base numbers, the gate) and
metrics/eval.md (the before -> after table and every prompt's answers, for people to read).

- identity_acc: share of held-out identity questions (phrasings never seen in training, EN + ZH)
  whose greedy answer names data.name (data.owner for an owner-only identity).
- leakage: share of unrelated held-out prompts (facts, arithmetic, writing, translation; EN + ZH,
  never the user's own records) whose answer mentions data.name or data.owner.
- ppl_drift: merged perplexity / base perplexity - 1 on those held-out general conversations.

The last line printed is the gate's verdict: GATE PASSED, or GATE FAILED with the metrics below it.
"""

from __future__ import annotations

import torch

from tunedag.core.errors import UserError, stage_main
from tunedag.core.io import atomic_file, read_jsonl, write_json
from tunedag.core.params import load_params
from tunedag.core.runtime import setup
from tunedag.evaluation.gate import EVAL_METRICS, gate_failures, gate_verdict
from tunedag.evaluation.scoring import (
    general_conversations,
    held_out_prompts,
    perplexity,
    score,
)
from tunedag.model.generation import chat_generate
from tunedag.model.loading import load_model, load_tokenizer

BASE_DIR = "models/base"
MERGED_DIR = "models/merged"
VAL_FILE = "data/raw/val.jsonl"
REPORT = "metrics/eval.md"


def report(metrics: dict, base_answers: dict, merged_answers: dict, name: str) -> str:
    rows = [
        "| metric | base | merged | gate |",
        "|---|---|---|---|",
        f"| identity_acc | {metrics['base']['identity_acc']:.3f} | {metrics['identity_acc']:.3f} | >= {metrics['gate']['min_identity_acc']} |",
        f"| leakage | {metrics['base']['leakage']:.3f} | {metrics['leakage']:.3f} | <= {metrics['gate']['max_leakage']} |",
        f"| perplexity | {metrics['base']['ppl']:.3f} | {metrics['ppl']:.3f} | |",
        f"| ppl_drift | 0 | {metrics['ppl_drift']:.4f} | <= {metrics['gate']['max_ppl_drift']} |",
    ]
    verdict = "PASSED" if metrics["gate"]["passed"] else "FAILED: " + "; ".join(metrics["gate"]["failures"])
    lines = [f"# Evaluation: {name}", "", *rows, "", f"Gate: {verdict}", "", "## Answers", ""]
    for prompt in base_answers:
        lines += [f"### {prompt}", "", f"- base: {base_answers[prompt]!r}", f"- merged: {merged_answers[prompt]!r}", ""]
    return "\n".join(lines)


@stage_main
def main() -> None:
    params = load_params()
    setup(params)
    cfg, data = params.eval, params.data
    identity = " / ".join(data.identity_words)
    val = read_jsonl(VAL_FILE)
    identity_questions, general_prompts = held_out_prompts(val)
    general = general_conversations(val)
    if not identity_questions or not general:
        raise UserError(
            f"{VAL_FILE} has no held-out identity questions or general (replay) conversations to evaluate. "
            "Set data.val_identity_samples > 0 and data.replay_ratio > 0 in params.yaml (data.mode: chat)."
        )

    tokenizer = load_tokenizer(BASE_DIR, params.model.trust_remote_code)
    results, answers = {}, {}
    for label, path in (("base", BASE_DIR), ("merged", MERGED_DIR)):
        model = load_model(path, torch.float32, "none", params.model.trust_remote_code).eval()

        def generate(prompts: list[str]) -> list[str]:
            out = chat_generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, desc=f"{label} answers")
            return [answer for answer, _ in out]

        results[label], answers[label] = score(
            generate, identity_questions, general_prompts, data.expected_mention, data.identity_words
        )
        results[label]["ppl"] = round(perplexity(model, tokenizer, general, cfg.batch_size), 4)
        del model

    merged = results["merged"]
    merged["ppl_drift"] = round(merged["ppl"] / results["base"]["ppl"] - 1, 4)
    failures = gate_failures(merged, cfg)
    metrics = {
        **merged,
        "base": results["base"],
        "gate": {
            "passed": not failures,
            "failures": failures,
            "min_identity_acc": cfg.min_identity_acc,
            "max_leakage": cfg.max_leakage,
            "max_ppl_drift": cfg.max_ppl_drift,
        },
        "counts": {"identity_questions": len(identity_questions), "general_prompts": len(general_prompts)},
    }
    write_json(EVAL_METRICS, metrics)
    with atomic_file(REPORT) as fh:
        fh.write(report(metrics, answers["base"], answers["merged"], identity))
    print(report(metrics, {}, {}, identity))
    print(gate_verdict(metrics["gate"]), flush=True)


if __name__ == "__main__":
    main()
