"""Stage `tokenize`: conversations -> token ids with assistant-only labels, optionally packed.

Reads models/base (tokenizer + chat template with the system-prompt policy), data/raw/*.jsonl,
params tokenize.*, data.mode. Writes data/tokenized/ (a datasets DatasetDict with train and val:
input_ids, labels, position_ids) and data/tokenized/stats.json.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from datasets import Dataset, DatasetDict, disable_caching

from tunedag.core.errors import UserError, stage_main
from tunedag.core.io import atomic_dir, read_jsonl, write_json
from tunedag.core.params import load_params
from tunedag.core.runtime import setup
from tunedag.data.chat import IGNORE_INDEX, encode_chat, encode_text
from tunedag.data.packing import pack
from tunedag.model.loading import load_tokenizer

BASE_DIR = "models/base"
RAW_DIR = Path("data/raw")
OUT_DIR = Path("data/tokenized")


def tokenize_split(records: list[dict], tokenizer, max_length: int, packed: bool, fingerprint: str) -> tuple[Dataset, dict]:
    def encode_batch(batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": []}
        for messages, text in zip(batch["messages"], batch["text"]):
            ids, labels = encode_chat(tokenizer, messages) if messages else encode_text(tokenizer, text)
            out["truncated"].append(len(ids) > max_length)
            out["input_ids"].append(ids[:max_length])
            out["labels"].append(labels[:max_length])
        return out

    def pack_all(batch: dict) -> dict:
        groups = pack([len(ids) for ids in batch["input_ids"]], max_length)
        out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        for group in groups:
            out["input_ids"].append([t for i in group for t in batch["input_ids"][i]])
            # A sample's first token is never predicted from the previous sample's last one.
            out["labels"].append([t for i in group for t in [IGNORE_INDEX] + batch["labels"][i][1:]])
            out["position_ids"].append([p for i in group for p in range(len(batch["input_ids"][i]))])
        return out

    rows = [{"messages": r.get("messages"), "text": r.get("text")} for r in records]
    ds = Dataset.from_list(rows) if rows else Dataset.from_dict({"messages": [], "text": []})
    # Explicit fingerprints: datasets would otherwise put a random one in state.json, and the
    # artifact would differ byte-wise between identical runs.
    ds = ds.map(encode_batch, batched=True, remove_columns=ds.column_names, desc="tokenize",
                new_fingerprint=f"{fingerprint}-encode")
    n_in = len(ds)
    truncated = sum(ds["truncated"])
    has_labels = [any(t != IGNORE_INDEX for t in labels) for labels in ds["labels"]]
    ds = ds.remove_columns("truncated").select([i for i, ok in enumerate(has_labels) if ok])
    ds = ds.flatten_indices(new_fingerprint=f"{fingerprint}-keep")
    if packed and len(ds):
        ds = ds.map(pack_all, batched=True, batch_size=None, remove_columns=ds.column_names, desc="pack",
                    new_fingerprint=f"{fingerprint}-pack")
    else:
        ds = ds.map(lambda b: {"position_ids": [list(range(len(x))) for x in b["input_ids"]]}, batched=True,
                    desc="positions", new_fingerprint=f"{fingerprint}-positions")
    tokens = sum(len(x) for x in ds["input_ids"])
    label_tokens = sum(sum(t != IGNORE_INDEX for t in x) for x in ds["labels"])
    stats = {
        "samples": n_in,
        "rows": len(ds),
        "tokens": tokens,
        "label_tokens": label_tokens,
        "truncated": truncated,
        "dropped_no_labels": n_in - sum(has_labels),
        "pad_fraction_at_max_length": round(1 - tokens / (len(ds) * max_length), 4) if len(ds) else 0.0,
    }
    return ds, stats


@stage_main
def main() -> None:
    params = load_params()
    setup(params)
    disable_caching()
    tokenizer = load_tokenizer(BASE_DIR, params.model.trust_remote_code)
    max_length, packed = params.tokenize.max_length, params.tokenize.pack

    splits, stats = {}, {}
    for split in ("train", "val"):
        path = RAW_DIR / f"{split}.jsonl"
        if not path.exists():
            raise UserError(f"{path} not found: run `dvc repro generate` first.")
        records = read_jsonl(path)
        fingerprint = hashlib.sha256(path.read_bytes() + json.dumps([max_length, packed]).encode()).hexdigest()[:16]
        splits[split], stats[split] = tokenize_split(records, tokenizer, max_length, packed, fingerprint)
        s = stats[split]
        print(f"{split}: {s['samples']} samples -> {s['rows']} rows, {s['tokens']} tokens "
              f"({s['label_tokens']} labels), truncated {s['truncated']}, dropped {s['dropped_no_labels']}")
    if stats["train"]["rows"] == 0:
        raise UserError(
            f"no training sample has a label left after truncation to tokenize.max_length={max_length} "
            f"({stats['train']['dropped_no_labels']} dropped). Raise tokenize.max_length in params.yaml."
        )

    with atomic_dir(OUT_DIR) as tmp:
        DatasetDict(splits).save_to_disk(str(tmp))
        write_json(tmp / "stats.json", {"max_length": max_length, "packed": packed, **stats})


if __name__ == "__main__":
    main()
