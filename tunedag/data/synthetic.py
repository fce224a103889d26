"""Generated training data: self-cognition conversations from the templates in assets/identity.yaml
and the general prompt bank in assets/general.yaml whose answers replay the base model."""

from __future__ import annotations

import random
import re
from pathlib import Path

from tunedag.core.io import read_yaml
from tunedag.core.params import DataParams

ASSETS_DIR = Path(__file__).parent / "assets"
SENTENCE_END = re.compile(r"(?s).*[.!?。！？\n]")


def general_prompts() -> dict[str, list[str]]:
    """The general prompt bank: {"train": [...], "val": [...]}, disjoint."""
    return read_yaml(ASSETS_DIR / "general.yaml")


def identity_conversations(data: DataParams, split: str, count: int, rng: random.Random) -> list[dict]:
    """`count` identity conversations, alternating EN/ZH, question phrasings from `split`, answers
    from the set for what the identity declares."""
    templates = read_yaml(ASSETS_DIR / "identity.yaml")
    declared = "name_owner" if data.name and data.owner else "name" if data.name else "owner"
    answers = templates["answers"][declared]
    rows = []
    for i in range(count):
        lang = ("en", "zh")[i % 2]
        question = rng.choice(templates["questions"][lang][split])
        answer = rng.choice(answers[lang]).format(name=data.name, owner=data.owner)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages, "kind": "identity"})
    return rows


def complete_sentences(answer: str, finished: bool) -> str | None:
    """A replay answer cut by max_new_tokens is trimmed to its last full sentence (None if none):
    training on a cut answer would teach the model to stop mid-sentence."""
    if finished:
        return answer or None
    match = SENTENCE_END.match(answer)
    return match.group(0).strip() if match else None
