"""LoRA adapters: the config from params, adding them to a model, their weights and shapes."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from tunedag.core.errors import UserError
from tunedag.core.params import Params
from tunedag.model.presets import get_preset


def lora_config(params: Params) -> LoraConfig:
    targets = params.lora.target_modules or list(get_preset(params.model.preset).target_modules)
    return LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(model, params: Params):
    try:
        return get_peft_model(model, lora_config(params))
    except ValueError as exc:  # peft: target modules not found in the model
        raise UserError(
            f"lora.target_modules: {exc}. Set lora.target_modules in params.yaml to the model's linear layer "
            "names (e.g. q_proj, v_proj), or null for the preset's."
        ) from None


def adapter_signature(params: Params) -> dict:
    """What must match between a checkpoint and the params that resume or convert it."""
    config = lora_config(params)
    return {
        "preset": params.model.preset,
        "r": config.r,
        "alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules),
        "quant": params.lora.quant,
    }


def lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(model).items()}


def lora_shapes(base_dir: str | Path, params: Params) -> dict[str, torch.Size]:
    """The LoRA tensors (name -> shape) that the model in base_dir takes, from its config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = params.model.trust_remote_code
    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust)
    with torch.device("meta"):  # shapes only: no memory used, no weights read
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    return {name: t.shape for name, t in get_peft_model_state_dict(add_lora(model, params)).items()}
