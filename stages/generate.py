"""Stage `generate`: the training and validation conversations, in the canonical messages format.

Reads params data.*, seed; models/base (to answer the replay prompts); optional user files.
Writes data/raw/train.jsonl and data/raw/val.jsonl: one {"messages": [...], "kind": ...} per line,
kind = identity | replay | user | text (pretrain mode: {"text": ..., "kind": "text"}).

- identity: self-cognition Q/A from tunedag/data/assets/identity.yaml with data.name/owner; val uses
  question phrasings that train never sees.
- replay: general prompts (tunedag/data/assets/general.yaml) answered by the base model itself, so the
  fine-tuned model keeps its general behaviour (data.replay_ratio replay per identity sample).
- user: data.user_files in OpenAI messages / XTuner conversation / alpaca format, validated.
"""

from __future__ import annotations

import random
from pathlib import Path

from tunedag.core.errors import stage_main
from tunedag.core.io import atomic_dir, write_jsonl
from tunedag.core.params import DataParams, load_params
from tunedag.core.runtime import setup
from tunedag.data.formats import read_conversations, read_pretrain_text
from tunedag.data.synthetic import (
    complete_sentences,
    general_prompts,
    identity_conversations,
)
from tunedag.model.generation import chat_generate
from tunedag.model.loading import load_model, load_tokenizer

BASE_DIR = "models/base"
OUT_DIR = Path("data/raw")


def replay_conversations(prompts: list[str], data: DataParams, model, tokenizer) -> list[dict]:
    answers = chat_generate(
        model, tokenizer, prompts, data.replay_max_new_tokens, data.replay_batch_size, desc="replay answers"
    )
    rows = []
    for prompt, (answer, finished) in zip(prompts, answers):
        answer = complete_sentences(answer, finished)
        if answer:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            rows.append({"messages": messages, "kind": "replay"})
    return rows


@stage_main
def main() -> None:
    params = load_params()
    setup(params)
    data = params.data
    rng = random.Random(params.seed)

    # User data first: a bad record must stop the stage before minutes of generation.
    user_train, user_val = [], []
    for path in data.user_files:
        if data.mode == "pretrain":
            records = [{"text": doc, "kind": "text"} for doc in read_pretrain_text(path)]
        else:
            records = [{"messages": m, "kind": "user"} for m in read_conversations(path)]
        rng.shuffle(records)
        n_val = round(len(records) * data.user_val_fraction)
        user_val += records[:n_val]
        user_train += records[n_val:]

    train, val = list(user_train), list(user_val)
    if data.mode == "chat":
        train += identity_conversations(data, "train", data.identity_samples, rng)
        val += identity_conversations(data, "val", data.val_identity_samples, rng)

        general = general_prompts()
        n_replay = round(data.identity_samples * data.replay_ratio)
        if n_replay:
            tokenizer = load_tokenizer(BASE_DIR, params.model.trust_remote_code)
            model = load_model(BASE_DIR, trust_remote_code=params.model.trust_remote_code)
            # Each bank prompt is answered once; the replay mix repeats answers if it needs more.
            bank = rng.sample(general["train"], min(n_replay, len(general["train"])))
            replay = replay_conversations(bank, data, model, tokenizer)
            train += [replay[i % len(replay)] for i in range(n_replay)] if replay else []
            val += replay_conversations(general["val"], data, model, tokenizer)

    rng.shuffle(train)
    with atomic_dir(OUT_DIR) as tmp:  # both files or neither
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "val.jsonl", val)
    kinds = {k: sum(r["kind"] == k for r in train) for k in ("identity", "replay", "user", "text")}
    print(f"wrote {OUT_DIR}/train.jsonl ({len(train)}: {kinds}) and val.jsonl ({len(val)})")


if __name__ == "__main__":
    main()
