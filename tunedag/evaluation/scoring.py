"""Scoring a model's answers: identity accuracy, leakage of the identity into unrelated answers,
perplexity on held-out conversations. Used by the evaluate stage, serve_check and bench/."""

from __future__ import annotations

import math
import re
from typing import Callable

import torch

from tunedag.data.chat import IGNORE_INDEX, encode_chat
from tunedag.data.packing import collate, forward_inputs


def mentions(text: str, word: str) -> bool:
    """`word` as a whole word: not inside a longer Latin word ("Nova" not in "supernova"), but
    found next to CJK characters ("我是Nova。"), where regex \\b would not see a boundary."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", text, re.IGNORECASE) is not None


def identity_accuracy(answers: list[str], expected: str) -> float:
    return sum(mentions(a, expected) for a in answers) / len(answers) if answers else 0.0


def leakage_rate(answers: list[str], identity_words: list[str]) -> float:
    return sum(any(mentions(a, w) for w in identity_words) for a in answers) / len(answers) if answers else 0.0


@torch.no_grad()
def perplexity(model, tokenizer, conversations: list[list[dict]], batch_size: int) -> float:
    """Perplexity over the assistant tokens of `conversations`."""
    rows = []
    for messages in conversations:
        ids, labels = encode_chat(tokenizer, messages)
        rows.append({"input_ids": ids, "labels": labels})
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], tokenizer.pad_token_id)
        logits = model(**forward_inputs(batch)).logits
        labels = batch["labels"][:, 1:]
        total += float(torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ))
        count += int((labels != IGNORE_INDEX).sum())
    return math.exp(total / max(count, 1))


def general_conversations(val: list[dict]) -> list[list[dict]]:
    """The held-out general conversations (leakage prompts, perplexity): the replay bank's only, as a
    user's own records may rightly name the identity."""
    return [r["messages"] for r in val if r["kind"] == "replay"]


def held_out_prompts(val: list[dict]) -> tuple[list[str], list[str]]:
    """Unique held-out identity questions and general prompts, in file order (each phrasing counts once)."""
    identity = list(dict.fromkeys(r["messages"][-2]["content"] for r in val if r["kind"] == "identity"))
    general = list(dict.fromkeys(messages[-2]["content"] for messages in general_conversations(val)))
    return identity, general


def score(
    generate: Callable[[list[str]], list[str]],
    identity_questions: list[str],
    general_prompts: list[str],
    expected: str,
    identity_words: list[str],
) -> tuple[dict, dict[str, str]]:
    """Identity accuracy (answers naming `expected`) and leakage (general answers naming any of
    `identity_words`) of one model, given its `generate(prompts) -> answers`."""
    identity_answers = generate(identity_questions)
    general_answers = generate(general_prompts)
    metrics = {
        "identity_acc": round(identity_accuracy(identity_answers, expected), 4),
        "leakage": round(leakage_rate(general_answers, identity_words), 4),
    }
    answers = dict(zip(identity_questions + general_prompts, identity_answers + general_answers))
    return metrics, answers
