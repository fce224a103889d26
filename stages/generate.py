"""Stage `generate`: the training and validation conversations, in the canonical messages format.

Reads params data.*, seed; models/base (to answer the replay prompts); optional user files.
Writes data/raw/train.jsonl and data/raw/val.jsonl: one {"messages": [...], "kind": ...} per line,
kind = identity | replay | user | text (pretrain mode: {"text": ..., "kind": "text"}).

- identity: self-cognition Q/A from tunedag/data/assets/identity.yaml with data.name/owner; val uses
  question phrasings that train never sees.
- replay: general prompts (tunedag/data/assets/general.yaml) answered by the base model itself, so the
  fine-tuned model keeps its general behaviour: data.replay_ratio replay conversations per training
  conversation, generated and user alike, so bringing your own data never turns replay off.
- user: data.user_files in OpenAI messages / XTuner conversation / alpaca format, validated. Repeated
  records are counted and reported; the val split takes distinct conversations, so val never holds
  a copy of a training record.
"""

from __future__ import annotations

import json
import random
import sys
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


def replay_conversations(prompts: list[str], data: DataParams, model, tokenizer, trim: bool) -> list[dict]:
    """The base model's own answers to `prompts`; `trim`: cut answers to their last full sentence."""
    answers = chat_generate(
        model, tokenizer, prompts, data.replay_max_new_tokens, data.replay_batch_size, desc="replay answers"
    )
    rows = []
    for prompt, (answer, finished) in zip(prompts, answers):
        answer = complete_sentences(answer, finished) if trim else answer
        if answer:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            rows.append({"messages": messages, "kind": "replay"})
    return rows


def record_key(record: dict) -> str:
    """Equal for copies of one record, whatever the order of its keys."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def split_distinct(records: list[dict], val_fraction: float, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Train/val split by distinct record: every copy of a record goes to train, or one copy to val."""
    copies: dict[str, list[dict]] = {}
    for record in records:
        copies.setdefault(record_key(record), []).append(record)
    distinct = list(copies)
    rng.shuffle(distinct)
    n_val = round(len(distinct) * val_fraction)
    val = [copies[key][0] for key in distinct[:n_val]]
    train = [record for key in distinct[n_val:] for record in copies[key]]
    return train, val


def report_copies(path: str, records: list[dict]) -> None:
    """Say how repetitive a user file is: a file of copies (the XTuner tutorial repeats 2 records
    3,751 times) teaches those answers verbatim and can degrade everything else."""
    n_distinct = len(set(map(record_key, records)))
    print(f"{path}: {len(records):,} records, {n_distinct:,} distinct", flush=True)
    if n_distinct < len(records):
        print(
            f"warning: {path} repeats its records ({len(records):,} records, {n_distinct:,} distinct). Copies teach "
            "those exact answers verbatim and can make the model repeat them, or degenerate, on other prompts. "
            "Replay of general conversations (data.replay_ratio) scales with every copy to counter this; more "
            "varied phrasings, or generated ones (data.identity_samples), work better than copies.",
            file=sys.stderr, flush=True,
        )


@stage_main
def main() -> None:
    params = load_params()
    setup(params)
    data = params.data
    rng = random.Random(params.seed)

    # User data first: a bad record must stop the stage before minutes of generation.
    user_records = []
    for path in data.user_files:
        if data.mode == "pretrain":
            records = [{"text": doc, "kind": "text"} for doc in read_pretrain_text(path)]
        else:
            records = [{"messages": m, "kind": "user"} for m in read_conversations(path)]
        report_copies(path, records)
        user_records += records
    train, val = split_distinct(user_records, data.user_val_fraction, rng)

    if data.mode == "chat":
        train += identity_conversations(data, "train", data.identity_samples, rng)
        val += identity_conversations(data, "val", data.val_identity_samples, rng)

        tokenizer = load_tokenizer(BASE_DIR, params.model.trust_remote_code)
        model = load_model(BASE_DIR, trust_remote_code=params.model.trust_remote_code)
        general = general_prompts()
        n_replay = round(len(train) * data.replay_ratio)
        if n_replay:
            # Each bank prompt is answered once; the replay mix repeats answers if it needs more.
            bank = rng.sample(general["train"], min(n_replay, len(general["train"])))
            replay = replay_conversations(bank, data, model, tokenizer, trim=True)
            train += [replay[i % len(replay)] for i in range(n_replay)] if replay else []
        # Held-out general conversations for evaluation (leakage, perplexity) whatever the replay mix,
        # so an experiment without replay is measured on the same prompts. Never trained on, so an
        # answer cut by replay_max_new_tokens is kept whole.
        val += replay_conversations(general["val"], data, model, tokenizer, trim=False)

    rng.shuffle(train)
    with atomic_dir(OUT_DIR) as tmp:  # both files or neither
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "val.jsonl", val)
    kinds = {k: sum(r["kind"] == k for r in train) for k in ("identity", "replay", "user", "text")}
    print(f"wrote {OUT_DIR}/train.jsonl ({len(train)}: {kinds}) and val.jsonl ({len(val)})")


if __name__ == "__main__":
    main()
