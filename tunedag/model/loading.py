"""Loading the saved model folders (models/base, models/merged, ...) and their tokenizers."""

from __future__ import annotations

from pathlib import Path

import torch

from tunedag.core.errors import UserError


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
    attn_implementation: str | None = None,
):
    """A causal LM from a saved folder; quant='nf4' loads it 4-bit via bitsandbytes (QLoRA);
    attn_implementation None is transformers' default (sdpa where the model supports it)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _require_model_dir(path)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code, "attn_implementation": attn_implementation}
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
