"""`tunedag plan`: will this training run fit the GPU? And the same check in the train stage.

The estimate (tunedag/model/memory.py) comes from the model config alone: a preset's shipped
config, a model folder, or models/base. Nothing is downloaded or loaded.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from tunedag.core.errors import UserError, command_main
from tunedag.core.io import read_yaml
from tunedag.core.params import PARAMS_FILE, Params, apply_sets, parse_params
from tunedag.model.lora import lora_config
from tunedag.model.memory import MemoryPlan, estimate_training_memory, load_config

DEFAULT_GPU_GIB = 24  # the common single-GPU size (RTX 3090/4090, A10, L4)


def plan_for(params: Params, config) -> MemoryPlan:
    """The peak GPU memory of the train stage with these params (train.dtype auto: bfloat16 on a GPU)."""
    attention = "flash_attention_2" if params.train.attention == "flash_attention_2" else "sdpa"
    return estimate_training_memory(
        config,
        quant=params.lora.quant,
        dtype="bfloat16" if params.train.dtype == "auto" else params.train.dtype,
        lora_r=params.lora.r,
        target_modules=sorted(lora_config(params).target_modules),
        batch_size=params.train.batch_size,
        max_length=params.tokenize.max_length,
        gradient_checkpointing=params.train.gradient_checkpointing,
        lora_dropout=params.lora.dropout,
        attention=attention,
    )


def changes_that_fit(params: Params, config, gpu_gib: float) -> dict[str, object] | None:
    """The fewest param changes (as `-S` keys) that make the run fit, cheapest first: checkpointing
    (costs compute), then nf4 (costs a little quality), then fewer rows per micro-batch (accumulation
    keeps the step's rows), then shorter rows. None if nothing tried fits."""
    train, lora, tokenize = params.train, params.lora, params.tokenize
    options = [
        {"train.gradient_checkpointing": True} if not train.gradient_checkpointing else {},
        {"lora.quant": "nf4"} if lora.quant == "none" else {},
        {"train.batch_size": 1, "train.accumulative_counts": train.batch_size * train.accumulative_counts}
        if train.batch_size > 1 else {},
        *({"tokenize.max_length": length} for length in (1024, 512) if length < tokenize.max_length),
    ]
    options = [o for o in options if o]
    for size in range(1, len(options) + 1):
        for combination in itertools.combinations(options, size):
            change = {k: v for option in combination for k, v in option.items()}
            if len([o for o in combination if "tokenize.max_length" in o]) > 1:
                continue
            if plan_for(with_changes(params, change), config).fits(gpu_gib):
                return change
    return None


def with_changes(params: Params, change: dict[str, object]) -> Params:
    sections: dict[str, dict] = {}
    for key, value in change.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    return params.model_copy(update={s: getattr(params, s).model_copy(update=v) for s, v in sections.items()})


def what_would_fit(params: Params, config, gpu_gib: float) -> str:
    change = changes_that_fit(params, config, gpu_gib)
    fix = (" ".join(f"-S {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items())
           if change else "nothing tunedag can change fits: use a larger GPU or a smaller model")
    return f"Would fit: {fix}"


def verdict(plan: MemoryPlan, params: Params, config, gpu_gib: float) -> str:
    if plan.fits(gpu_gib):
        return f"FITS: {plan.total:.1f} GiB estimated of {gpu_gib:g} GiB ({gpu_gib - plan.total:.1f} GiB to spare)"
    return (f"DOES NOT FIT: {plan.total:.1f} GiB estimated, the GPU has {gpu_gib:g} GiB. "
            f"{what_would_fit(params, config, gpu_gib)}")


def require_fit(params: Params, base_dir: str | Path, gpu_gib: float) -> None:
    """The train stage's check, before it loads the model: stop with the numbers and the params
    that would fit rather than run out of memory minutes later."""
    config = load_config(base_dir)
    plan = plan_for(params, config)
    if not plan.fits(gpu_gib):
        raise UserError(
            f"{base_dir}: training is estimated to need {plan.total:.1f} GiB of GPU memory (weights "
            f"{plan.weights:.1f}, activations {plan.activations:.1f}, logits {plan.logits:.1f}, optimizer and "
            f"LoRA {plan.optimizer + plan.lora + plan.gradients:.1f}, overhead {plan.overhead:.1f}) and the GPU "
            f"has {gpu_gib:.1f} GiB. {what_would_fit(params, config, gpu_gib)} "
            "(`tunedag plan` shows the estimate; set train.memory_check: false to train anyway)."
        )


@command_main("plan")
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="tunedag plan",
        description="Estimate the peak GPU memory of training with params.yaml (and a preset's recipe) from the "
                    "model config alone, and say whether it fits a GPU. Exit 1 if it does not.")
    parser.add_argument("--preset", help="estimate this preset (its recipe fills params.yaml's null keys)")
    parser.add_argument("--config", metavar="DIR", help="a model folder whose config.json to use "
                        "(default: the preset's shipped config, or model.source when it is a folder)")
    parser.add_argument("--gpu-gib", type=float, help=f"GPU memory in GiB (default: this machine's GPU, or {DEFAULT_GPU_GIB})")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param as `dvc exp run -S` would, e.g. -S lora.r=64")
    args = parser.parse_args(argv)

    raw = read_yaml(PARAMS_FILE) if Path(PARAMS_FILE).exists() else read_yaml(Path(__file__).parents[2] / PARAMS_FILE)
    if args.preset:
        raw["model"]["preset"] = args.preset
    apply_sets(raw, args.set)
    params = parse_params(raw, f"{PARAMS_FILE} with --preset/-S")
    source = params.model.source
    config = load_config(args.config or (source if source and Path(source).expanduser().is_dir() else params.model.preset))

    gpu_gib, where = args.gpu_gib, "given"
    if gpu_gib is None:
        import torch

        if torch.cuda.is_available():
            gpu_gib, where = torch.cuda.get_device_properties(0).total_memory / 2**30, torch.cuda.get_device_name(0)
        else:
            gpu_gib, where = DEFAULT_GPU_GIB, "no GPU here: assumed; set --gpu-gib"
    plan = plan_for(params, config)
    print(f"{params.model.preset}: {config.model_type}, quant {params.lora.quant}, LoRA r {params.lora.r}, "
          f"{params.train.batch_size} x {params.tokenize.max_length} tokens per micro-batch, gradient checkpointing "
          f"{'on' if params.train.gradient_checkpointing else 'off'}; GPU {gpu_gib:g} GiB ({where})")
    print(plan.table())
    print(verdict(plan, params, config, gpu_gib))
    if not plan.fits(gpu_gib):
        raise SystemExit(1)
