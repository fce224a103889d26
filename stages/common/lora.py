"""LoRA adapters and the training checkpoint format (work/iter_N.pth), shared by train and convert."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from stages.common.errors import UserError
from stages.common.params import Params
from stages.common.presets import get_preset

CHECKPOINT_FORMAT = "tunedag-train-v1"
CHECKPOINT_NAME = re.compile(r"^iter_(\d+)\.pth$")


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


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else -1


def list_checkpoints(work_dir: str | Path) -> list[Path]:
    """work/iter_N.pth files, by N ascending (temp files of interrupted writes are ignored)."""
    paths = [p for p in Path(work_dir).glob("iter_*.pth") if checkpoint_step(p) > 0]
    return sorted(paths, key=checkpoint_step)


def load_checkpoint(path: str | Path, params: Params) -> dict:
    """Read and check a checkpoint: weights_only=True (no pickled code), our format, our adapter shape."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found. Check train.resume / convert.iter in params.yaml and work/.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, a pickle with code in it, not a torch file at all
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{path}: not a readable tunedag checkpoint ({reason}). It may be truncated or not from tunedag; "
            "delete it and resume from an earlier iter_N.pth, or retrain (train.resume: null)."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{path}: not a tunedag checkpoint (expected format {CHECKPOINT_FORMAT!r}). Point train.resume / "
            "convert.iter at a work/iter_N.pth written by the train stage."
        )
    expected, found = adapter_signature(params), ckpt["adapter"]
    diffs = [f"{k}: checkpoint {found.get(k)!r} vs params {v!r}" for k, v in expected.items() if found.get(k) != v]
    if diffs:
        raise UserError(
            f"{path} does not match params.yaml ({'; '.join(diffs)}). Set those params back to the "
            "checkpoint's values, or start a fresh run with train.resume: null."
        )
    return ckpt


def lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(model).items()}


def load_lora_state(model, state: dict[str, torch.Tensor], where: str) -> None:
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError as exc:  # shape mismatch
        raise UserError(f"{where}: LoRA weights do not fit the model ({str(exc).splitlines()[0][:200]}).") from None
    missing = [k for k in result.unexpected_keys]
    if missing:
        raise UserError(f"{where}: LoRA weights for modules the model does not have: {missing[:3]}.")
