"""Stage `merge` (XTuner's `convert merge`): base + adapter -> one standalone model.

Reads models/base (full precision: never merge into 4-bit weights, even after QLoRA),
models/adapter, params merge.*, model.trust_remote_code. Writes models/merged/ (safetensors shards
of merge.max_shard_size, in merge.dtype) with the tokenizer and chat template of models/base, so
the system-prompt policy used in training is the one the server renders.
"""

from __future__ import annotations

import torch
from peft import PeftModel

from tunedag.core.errors import stage_main
from tunedag.core.io import atomic_dir
from tunedag.core.params import load_params
from tunedag.core.runtime import setup
from tunedag.model.loading import load_model, load_tokenizer

BASE_DIR = "models/base"
ADAPTER_DIR = "models/adapter"
OUT_DIR = "models/merged"


@stage_main
def main() -> None:
    params = load_params()
    setup(params)
    trust = params.model.trust_remote_code
    tokenizer = load_tokenizer(BASE_DIR, trust)
    base = load_model(BASE_DIR, torch.float32, "none", trust)  # merge in fp32, then cast once
    merged = PeftModel.from_pretrained(base, ADAPTER_DIR).merge_and_unload()
    merged = merged.to(getattr(torch, params.merge.dtype))

    with atomic_dir(OUT_DIR) as tmp:
        merged.save_pretrained(tmp, max_shard_size=params.merge.max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    print(f"wrote {OUT_DIR} ({params.merge.dtype}, shards <= {params.merge.max_shard_size})")


if __name__ == "__main__":
    main()
