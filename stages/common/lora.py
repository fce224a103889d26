"""LoRA adapters and the training checkpoint format (work/iter_N.pth), shared by train and convert."""

from __future__ import annotations

import pickle
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


CHECKPOINT_FIX = ("Point train.resume / convert.iter (params.yaml) at another work/iter_N.pth written by the train "
                  "stage, or retrain from scratch (train.resume: null).")


def load_checkpoint(path: str | Path, params: Params) -> dict:
    """Read and check a checkpoint: weights_only=True (no pickled code), our format, our adapter shape."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found. Check train.resume / convert.iter in params.yaml and work/.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused an object: unpickling it could run code
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise UserError(
            f"{path}: refused: the file holds pickled Python objects ({found[1] if found else 'not plain tensors'}), "
            f"and loading those could run code. tunedag only loads plain tensors (weights_only=True). {CHECKPOINT_FIX}"
        ) from None
    except Exception as exc:  # truncated zip, not a torch file at all
        reason = str(exc).strip().split(". ")[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable tunedag checkpoint ({reason}); it may be truncated. {CHECKPOINT_FIX}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{path}: not a tunedag checkpoint (expected format {CHECKPOINT_FORMAT!r}). {CHECKPOINT_FIX}"
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


def lora_shapes(base_dir: str | Path, params: Params) -> dict[str, torch.Size]:
    """The LoRA tensors (name -> shape) that the model in base_dir takes, from its config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = params.model.trust_remote_code
    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust)
    with torch.device("meta"):  # shapes only: no memory used, no weights read
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    return {name: t.shape for name, t in get_peft_model_state_dict(add_lora(model, params)).items()}


def check_lora_fits(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size], where: str) -> None:
    wrong = [f"size mismatch for {k}: {tuple(v.shape)} in the checkpoint, {tuple(shapes[k])} in the model"
             for k, v in state.items() if k in shapes and v.shape != shapes[k]]
    if wrong:
        raise UserError(f"{where}: LoRA weights do not fit the model ({wrong[0]}). Was it trained on another "
                        f"base model? {CHECKPOINT_FIX}")
    unknown = sorted(state.keys() - shapes.keys())
    if unknown:
        raise UserError(f"{where}: LoRA weights for modules the model does not have: {unknown[:3]}. "
                        f"Check lora.target_modules and model.preset. {CHECKPOINT_FIX}")


def load_lora_state(model, state: dict[str, torch.Tensor], where: str) -> None:
    check_lora_fits(state, {name: t.shape for name, t in get_peft_model_state_dict(model).items()}, where)
    set_peft_model_state_dict(model, state)
