"""GPU training benchmark: LoRA (bf16) and QLoRA (nf4) steps on a random-weight model of real size,
with the measured peak memory next to tunedag.model.memory's estimate for the same settings.

    python bench/gpu_train.py                                  # qwen2.5-0.5b-instruct, 4 x 2048, both quants
    python bench/gpu_train.py --config qwen2-7b-instruct --batch-size 1 --seq-len 1024 --gradient-checkpointing
    python bench/gpu_train.py --device cpu --tiny              # seconds: checks this script's code path

The model is built from a shipped preset config (tunedag/model/configs/, or a folder with a
config.json) with random weights, saved, and loaded back through tunedag.model.loading.load_model,
so QLoRA quantizes it exactly as the train stage does (bitsandbytes nf4, double quant). Then, like
stages/train.py: peft's prepare_model_for_kbit_training for nf4, non-reentrant gradient
checkpointing if asked, LoRA on the preset's linear layers, AdamW, and the loss on label positions
only. Rows are packed random tokens: samples of --sample-len tokens whose position_ids restart, as
tunedag's packed rows do (transformers builds the block-diagonal mask from them).

Figures (one JSON object, printed and saved to bench/results/gpu-train.json unless --tiny):
  - tokens_per_s: all tokens of the timed steps (after --warmup) over their wall time.
  - mfu: tokens_per_s x flops_per_token / peak. flops_per_token counts model FLOPs, recomputation not
    included: 4 x frozen linear weights (forward, and the input gradient in backward: their weight
    gradient is never computed) + 6 x LoRA params (forward, input and weight gradients) + 4 x
    hidden x vocab x label fraction (the frozen output layer on label positions) + 6 x layers x
    q_dim x sample_len (causal attention scores and values: forward 2 x q_dim x sample_len per token
    and layer, backward twice that). mfu_6n is the conventional 6 x all params, as if every weight
    were trained: an upper bound for comparison with reports that use it.
  - peak_allocated_gib / peak_reserved_gib: torch.cuda.max_memory_allocated / _reserved over the
    training steps (after model load); device_used_gib: the GPU's used memory after them (CUDA
    context included). estimate.*: estimate_training_memory's plan; estimate_torch_gib is its total
    less the CUDA context, the figure to compare with peak_reserved_gib.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, command_line, machine, write_results  # noqa: E402

IGNORE_INDEX = -100
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# --tiny: the preset's architecture scaled down so a CPU runs a step in milliseconds.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "max_window_layers": 2,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def build_config(args):
    from tunedag.model.memory import load_config

    config = load_config(args.config)
    if args.tiny:
        values = config.to_dict()
        values.pop("layer_types", None)  # derived from num_hidden_layers again
        values.update({k: v for k, v in TINY.items() if k in values or k != "head_dim"})
        config = type(config).from_dict(values)
    return config


def save_random_model(config, dtype, device: str, folder: Path) -> None:
    """A model of the config's architecture with random weights, saved as a model folder."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initializing 7B weights on the GPU takes seconds, on a CPU minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    del model
    gc.collect()


def random_batch(args, vocab: int, device, generator) -> dict:
    """Packed rows of random tokens: samples of sample_len tokens, the first (1 - label_fraction) of
    each masked like a prompt."""
    import torch

    shape = (args.batch_size, args.seq_len)
    input_ids = torch.randint(0, vocab, shape, generator=generator)
    position_ids = (torch.arange(args.seq_len) % args.sample_len).expand(shape).clone()
    labels = input_ids.clone()
    labels[position_ids < round((1 - args.label_fraction) * args.sample_len)] = IGNORE_INDEX
    return {k: v.to(device) for k, v in dict(input_ids=input_ids, position_ids=position_ids, labels=labels).items()}


def label_loss(model, batch: dict):
    """Mean next-token loss with the output layer on label positions only (stages/train.py's
    token_loss_sum, divided by the label count)."""
    import torch

    targets = batch["labels"][:, 1:]
    causal_lm = model.get_base_model()
    hidden = causal_lm.get_decoder()(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
    ).last_hidden_state[:, :-1]
    keep = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum") / keep.sum()


def flops_per_token(config, args) -> tuple[float, float]:
    """(LoRA-aware model FLOPs per token, 6 x all params): the formulas in the module docstring."""
    from tunedag.model.memory import count_parameters

    counts = count_parameters(config, lora_r=args.lora_r, target_modules=args.targets)
    heads = config.num_attention_heads
    q_dim = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    output = 4 * config.hidden_size * config.vocab_size * args.label_fraction
    attention = 6 * config.num_hidden_layers * q_dim * args.sample_len
    return 4 * counts.quantizable + 6 * counts.lora + output + attention, 6 * (counts.total + counts.lora)


def run(args, config, folder: Path, quant: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from tunedag.model.loading import load_model
    from tunedag.model.memory import CUDA_CONTEXT_GIB, estimate_training_memory

    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype)
    model = load_model(folder, dtype=dtype, quant=quant, device=args.device)
    model.set_attn_implementation(args.attention)
    checkpointing = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if quant == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                                **checkpointing)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(**checkpointing)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=args.lora_dropout,
                                             target_modules=args.targets, bias="none", task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    flops, flops_6n = flops_per_token(config, args)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step_s, losses = [], []
    for step in range(args.warmup + args.steps):
        batch = random_batch(args, config.vocab_size, args.device, generator)
        began = time.perf_counter()
        loss = label_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() waits for the step's kernels
        if step >= args.warmup:
            step_s.append(time.perf_counter() - began)

    free, total = torch.cuda.mem_get_info() if cuda else (0, 0)  # the GPU's own count: CUDA context included
    tokens_per_s = args.batch_size * args.seq_len * len(step_s) / sum(step_s)
    peak_tflops = args.peak_tflops if args.peak_tflops is not None else (989.0 if cuda else None)
    plan = estimate_training_memory(
        config, quant=quant, dtype=args.dtype, lora_r=args.lora_r, target_modules=args.targets,
        batch_size=args.batch_size, max_length=args.seq_len, gradient_checkpointing=args.gradient_checkpointing,
        label_fraction=args.label_fraction, lora_dropout=args.lora_dropout, attention=args.attention,
    )
    result = {
        "quant": quant,
        "trainable_params": sum(p.numel() for p in trainable),
        "steps_timed": len(step_s),
        "median_step_s": statistics.median(step_s),
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "mfu": tokens_per_s * flops / (peak_tflops * 1e12) if peak_tflops else None,
        "mfu_6n": tokens_per_s * flops_6n / (peak_tflops * 1e12) if peak_tflops else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "device_used_gib": (total - free) / 2**30 if cuda else None,
        "estimate": {**{k: v for k, v in asdict(plan).items() if k not in ("notes", "params")},
                     "total_gib": plan.total, "estimate_torch_gib": plan.total - CUDA_CONTEXT_GIB},
        "estimate_table": plan.table(),
    }
    if cuda:
        result["measured_over_estimate"] = result["peak_reserved_gib"] / result["estimate"]["estimate_torch_gib"]
    del model, optimizer, trainable
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="qwen2.5-0.5b-instruct",
                        help="a preset with a shipped config (tunedag/model/configs/) or a folder with a config.json")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the config scaled down (2 layers, hidden 64): a smoke run")
    parser.add_argument("--quant", nargs="+", choices=("none", "nf4"), default=["none", "nf4"])
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                        help="auto: bfloat16 on cuda, float32 on cpu (bf16 matmuls are slow on most CPUs), as the train stage")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--sample-len", type=int, default=512, help="tokens per sample in a packed row")
    parser.add_argument("--label-fraction", type=float, default=1.0, help="share of each sample that has labels")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (they still count for peak memory)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--targets", nargs="+", default=LLAMA_TARGETS, help="LoRA target modules")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--attention", choices=("sdpa", "flash_attention_2", "eager"), default="sdpa")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's dense peak TFLOPS in --dtype, for MFU (default on cuda: 989, H100 SXM bf16)")
    parser.add_argument("--out", help="results file (default bench/results/gpu-train.json; --tiny: none)")
    args = parser.parse_args()
    if args.tiny:
        args.batch_size, args.seq_len, args.sample_len = min(args.batch_size, 2), min(args.seq_len, 64), min(args.sample_len, 32)
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.seq_len % args.sample_len:
        raise SystemExit(f"--seq-len {args.seq_len} must be a multiple of --sample-len {args.sample_len}")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch (use --device cpu --tiny for a smoke run)")
    config = build_config(args)
    with tempfile.TemporaryDirectory(prefix="tunedag-gpu-train-") as tmp:
        save_random_model(config, getattr(torch, args.dtype), args.device, Path(tmp))
        runs = {quant: run(args, config, Path(tmp), quant) for quant in args.quant}
    summary = {
        "bench": "gpu_train", "command": command_line(), "machine": machine(args.device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"}, "runs": runs,
    }
    print(json.dumps(summary, indent=2))
    if args.out or not args.tiny:
        write_results(Path(args.out) if args.out else RESULTS_DIR / "gpu-train.json", summary)


if __name__ == "__main__":
    main()
