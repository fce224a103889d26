"""Stage `train`: (Q)LoRA fine-tuning on data/tokenized with exact, resumable checkpoints.

Reads models/base, data/tokenized, params seed, threads, model.*, lora.*, train.*.
Writes work/iter_N.pth every train.save_steps and at the end (LoRA weights + optimizer, scheduler,
RNG state and step: everything exact resume needs), dvclive metrics in metrics/train/ (byte-identical
across reruns) and the wall-clock throughput in metrics/train_speed.json (the one output that is not).

The loss of an optimizer step is the mean over *all* label tokens of its accumulated micro-batches,
so batch_size x accumulative_counts trains exactly like one big batch. With train.nproc_per_node x
train.nnodes > 1 the stage relaunches itself under torchrun (tunedag/model/distributed.py): rank r
takes micro-batches r, r + world, ... of each global step, so N processes train like one process
accumulating N times as many; each machine's first process writes the outputs.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from functools import partial
from pathlib import Path

import torch
from datasets import load_from_disk
from dvclive import Live
from tqdm.auto import tqdm
from transformers import get_scheduler

from tunedag.core.errors import UserError, stage_main
from tunedag.core.io import atomic_file, write_json
from tunedag.core.params import Params, load_params
from tunedag.core.runtime import attention_implementation, setup, train_dtype
from tunedag.data.chat import IGNORE_INDEX
from tunedag.data.packing import collate, forward_inputs, packed_rows_are_isolated
from tunedag.model.checkpoints import (
    check_resumable,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    load_lora_state,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from tunedag.model.distributed import (
    Trainer,
    World,
    all_gather,
    all_sum,
    barrier,
    join,
    launch,
    leave,
    require_deepspeed,
    under_launcher,
    world_size,
)
from tunedag.model.generation import chat_generate
from tunedag.model.loading import load_model, load_tokenizer
from tunedag.model.lora import add_lora
from tunedag.model.plan import require_fit
from tunedag.model.presets import get_preset

BASE_DIR = "models/base"
DATA_DIR = "data/tokenized"
WORK_DIR = Path("work")
METRICS_DIR = Path("metrics/train")
SPEED_METRICS = Path("metrics/train_speed.json")


def check_git_has_a_commit() -> None:
    """dvclive stops with "Empty git repo" in a git repository without a commit (it reads HEAD before
    it checks): say so before any work."""
    from scmrepo.exceptions import SCMError
    from scmrepo.git import Git

    try:
        scm = Git()
    except SCMError:  # not in a git repository: dvclive runs without one
        return
    if scm.no_commits:
        raise UserError(
            f"the git repository at {scm.root_dir} has no commit yet, and dvclive (the training metrics) needs "
            "one. Commit the project first: git add -A && git commit -m 'tunedag project'."
        )


def sample_order(n_rows: int, seed: int, epochs: int) -> list[int]:
    """The row order of the whole run: one seeded permutation per epoch. Step s reads a fixed slice
    of it, so the data position after a resume is just a function of the step."""
    order: list[int] = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(seed + epoch)
        order += torch.randperm(n_rows, generator=generator).tolist()
    return order


def token_loss_sum(model, batch: dict[str, torch.Tensor], label_positions_only: bool = True) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over label tokens.

    With label_positions_only the output layer runs only where there is a label: a small model's
    vocabulary-wide logits are its largest activation and ~a fifth of its FLOPs, and most positions
    (system prompt, user turns, padding) are masked anyway. Same loss, less time and memory."""
    targets = batch["labels"][:, 1:]
    inputs = forward_inputs(batch)
    if not label_positions_only:
        logits = model(**inputs).logits[:, :-1]
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # under the PEFT wrapper
    hidden = causal_lm.get_decoder()(**inputs).last_hidden_state[:, :-1]
    keep = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")


@torch.no_grad()
def label_positions_loss_matches(model, batch: dict[str, torch.Tensor]) -> bool:
    """Whether the decoder + output layer shortcut gives the model's own loss. Some architectures do
    more after the output layer (Gemma's logit soft-capping, Cohere's logit scale): those keep the
    full forward. Checked once on the first batch, in eval mode so dropout draws no random numbers."""
    was_training = model.training
    model.eval()
    try:
        full = token_loss_sum(model, batch, label_positions_only=False)
        fast = token_loss_sum(model, batch, label_positions_only=True)
    except (AttributeError, NotImplementedError, TypeError):  # no get_decoder / get_output_embeddings
        return False
    finally:
        model.train(was_training)
    return bool(torch.allclose(full, fast, rtol=1e-4, atol=1e-4))


def count_labels(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def row_labels(row: dict) -> int:
    """count_labels of a row, uncollated: every rank counts the labels of the whole global step."""
    return sum(1 for label in row["labels"][1:] if label != IGNORE_INDEX)


def rank_micro_batches(indices: list[int], batch_size: int, world: World, fill_to: int | None) -> list[tuple[list[int], float]]:
    """This rank's micro-batches of a global step, as (row indices, weight): the step's rows cut into
    batch_size micro-batches, micro-batch k to rank k mod world size, so one process accumulating
    N x as many sees the same micro-batches as N processes. `fill_to`: a short last step is filled
    up with weight-0 stand-ins so every rank does as many backward passes (DDP and DeepSpeed count them)."""
    chunks = [indices[k : k + batch_size] for k in range(0, len(indices), batch_size)]
    mine = [(chunk, 1.0) for chunk in chunks[world.rank :: world.size]]
    return mine + [(chunks[0], 0.0)] * ((fill_to or 0) - len(mine))


@torch.no_grad()
def validation_loss(model, rows, pad_id: int, device, batch_size: int, label_positions_only: bool,
                    world: World | None = None) -> float:
    """Mean loss over the label tokens of `rows`; several processes split the batches and sum."""
    world = world or World()
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size)[world.rank :: world.size]:
        batch = to_device(collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))], pad_id), device)
        total += float(token_loss_sum(model, batch, label_positions_only))
        count += count_labels(batch)
    model.train()
    return all_sum(total, world, device) / max(all_sum(count, world, device), 1)


def check_packed_rows(model, rows, dtype: torch.dtype) -> None:
    """Stop before training if the model lets the samples of a packed row see each other."""
    packed = next((row for row in rows.select(range(min(len(rows), 16))) if row.get("position_ids", [1]).count(0) > 1), None)
    # Relative to the largest logit: bf16 kernels differ by a few ulps between the two forwards.
    if packed is not None and not packed_rows_are_isolated(model, packed, 1e-4 if dtype == torch.float32 else 2e-2):
        raise UserError(
            f"{DATA_DIR}: packed rows leak between samples with this model ({type(model.get_base_model()).__name__}): "
            "its attention does not read the restarting position_ids. Set tokenize.pack: false in params.yaml "
            "(or try train.attention: eager) and rerun."
        )


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def resume_path(params: Params) -> Path | None:
    if params.train.resume is None:
        return None
    if params.train.resume == "auto":
        checkpoints = list_checkpoints(WORK_DIR)
        return checkpoints[-1] if checkpoints else None
    return Path(params.train.resume)


def trim_metric_history(metrics_dir: Path, last_step: int) -> None:
    """Before resuming, drop the dvclive rows a killed run logged after its last checkpoint, so the
    resumed history equals an uninterrupted one (dvclive would append them a second time). The
    summary goes too: the kill may have cut it mid-write, and every step rewrites it anyway."""
    (metrics_dir / "metrics.json").unlink(missing_ok=True)
    for tsv in (metrics_dir / "plots").rglob("*.tsv"):
        header, *rows = tsv.read_text(encoding="utf-8").splitlines()
        # Rows up to the checkpoint's step were complete before it was saved; a row cut by the kill is later.
        kept = [row for row in rows if int(row.split("\t", 1)[0]) <= last_step]
        with atomic_file(tsv) as fh:
            fh.write("\n".join([header, *kept]) + "\n")


@stage_main
def main() -> None:
    params = load_params()
    check_git_has_a_commit()
    cfg = params.train
    require_deepspeed(cfg)
    resume = resume_path(params)
    ckpt = load_checkpoint(resume, params) if resume else None  # check it before any work
    if ckpt:
        check_resumable(ckpt, resume, params)
    if world_size(cfg) > 1 and not under_launcher():
        # Several processes: torchrun runs this stage once in each (they start below, at setup).
        if (code := launch(params, "stages.train")) != 0:
            raise SystemExit(code)
        return

    device = setup(params)
    world, device = join(params, device)  # rank, world size and device of this process
    dtype = train_dtype(params, device)
    tokenizer = load_tokenizer(BASE_DIR, params.model.trust_remote_code)
    data = load_from_disk(DATA_DIR)
    train_rows, val_rows = data["train"], data["val"]
    rows_per_step = cfg.batch_size * cfg.accumulative_counts * world.size  # the global batch
    total_steps = min(cfg.max_steps, math.ceil(cfg.epochs * len(train_rows) / rows_per_step))
    order = sample_order(len(train_rows), params.seed, cfg.epochs)

    if device.type == "cuda" and cfg.memory_check:
        require_fit(params, BASE_DIR, torch.cuda.get_device_properties(device).total_memory / 2**30)
    attention = attention_implementation(params, device)
    model = load_model(BASE_DIR, dtype, params.lora.quant, params.model.trust_remote_code, device, attention)
    # Non-reentrant checkpointing: no need for inputs that require grad, and dropout's RNG is replayed.
    checkpointing = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if params.lora.quant == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing, **checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(**checkpointing)
    model = add_lora(model, params)  # the same initial LoRA weights in every process (same seed)
    model.train()
    check_packed_rows(model, train_rows, dtype)
    if world.size > 1:  # from here on each process draws its own dropout masks
        torch.manual_seed(params.seed + world.rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=round(cfg.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    first_batch = to_device(collate([train_rows[i] for i in order[: cfg.batch_size]], tokenizer.pad_token_id), device)
    label_positions_only = label_positions_loss_matches(model, first_batch)
    if ckpt:
        load_lora_state(model, ckpt["lora"], str(resume))
    # One process, torch DDP or DeepSpeed ZeRO-2, each around the same loss (label positions only).
    trainer = Trainer(model, optimizer, trainable, partial(token_loss_sum, label_positions_only=label_positions_only),
                      params, dtype, world, device)

    start = 0
    if ckpt:
        trainer.load_optimizer_state(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        restore_rng_state(ckpt, world.rank, world.size, device)
        start = ckpt["step"]
    if world.writer and ckpt:
        for stale in list_checkpoints(WORK_DIR):  # later checkpoints belong to the run being replaced
            if checkpoint_step(stale) > start:
                stale.unlink()
        trim_metric_history(METRICS_DIR, start)
        print(f"resumed from {resume} at step {start}")
    elif world.writer:
        shutil.rmtree(WORK_DIR, ignore_errors=True)  # a fresh run: no stale iter_N.pth from older runs
    if world.writer:
        WORK_DIR.mkdir(exist_ok=True)
    barrier(world)

    n_trainable = sum(p.numel() for p in trainable)
    if world.writer:
        print(f"training {n_trainable / 1e6:.2f}M LoRA params ({params.lora.quant}, {dtype}, {device}, {attention} attention"
              f"{', gradient checkpointing' if cfg.gradient_checkpointing else ''}"
              f"{f', {world.size} processes' if world.size > 1 else ''}{f', DeepSpeed {cfg.deepspeed}' if cfg.deepspeed else ''}) "
              f"for {total_steps} steps of {rows_per_step} rows ({len(train_rows)} rows/epoch); "
              f"output layer on {'label positions only' if label_positions_only else 'all positions'}")
    tokens_done, labels_done, train_seconds = 0, 0, 0.0
    # Only the writer keeps metrics: one dvclive history, no duplicate rows.
    metrics = Live(str(METRICS_DIR), resume=ckpt is not None, save_dvc_exp=False, dvcyaml=None, report=None) if world.writer else None
    with metrics or contextlib.nullcontext() as live:
        if live:  # the values this run trained with, the recipe's included (params.yaml may leave them null)
            live.log_params({"trainable_params": n_trainable, "total_steps": total_steps, "attention": attention,
                             **{f"{section}.{key}": value for section, values in get_preset(params.model.preset).recipe.params().items()
                                for key, value in getattr(params, section).model_dump(include=set(values)).items()}})
        progress = tqdm(range(start, total_steps), initial=start, total=total_steps, desc="train", unit="step",
                        disable=not world.writer)
        for step in progress:
            began = time.perf_counter()
            indices = order[step * rows_per_step : (step + 1) * rows_per_step]
            n_labels = sum(row_labels(train_rows[i]) for i in indices)  # of the whole global step
            micro_batches = rank_micro_batches(indices, cfg.batch_size, world,
                                               cfg.accumulative_counts if world.size > 1 or cfg.deepspeed else None)
            loss_value = 0.0
            for k, (rows, weight) in enumerate(micro_batches):
                batch = to_device(collate([train_rows[i] for i in rows], tokenizer.pad_token_id), device)
                loss_value += trainer.backward(batch, n_labels, last=k == len(micro_batches) - 1, weight=weight)
            trainer.step()
            scheduler.step()
            loss_value = all_sum(loss_value, world, device)

            done = step + 1
            seconds = time.perf_counter() - began
            tokens = sum(len(train_rows[i]["input_ids"]) for i in indices)  # real tokens, padding not counted
            tokens_done, labels_done, train_seconds = tokens_done + tokens, labels_done + n_labels, train_seconds + seconds
            progress.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens / seconds:.0f}")
            if live:
                live.step = done
                live.log_metric("train/loss", loss_value)
                live.log_metric("train/lr", scheduler.get_last_lr()[0])
            if done % cfg.evaluation_freq == 0 or done == total_steps:
                val_loss = validation_loss(
                    model, val_rows, tokenizer.pad_token_id, device, cfg.batch_size, label_positions_only, world
                )
                if live:
                    live.log_metric("val/loss", val_loss)
                    answers = chat_generate(model, tokenizer, cfg.evaluation_inputs, cfg.evaluation_max_new_tokens)
                    for prompt, (answer, _) in zip(cfg.evaluation_inputs, answers):
                        tqdm.write(f"[step {done}] {prompt} -> {answer}")
                barrier(world)
            if done % cfg.save_steps == 0 or done == total_steps:
                # Every process's random state and (DeepSpeed) optimizer shard, gathered to the writer.
                optimizer_state = trainer.optimizer_state()
                rng = all_gather(rng_state(world.size, device), world)
                if world.writer:
                    save_checkpoint(WORK_DIR / f"iter_{done}.pth", done, model, optimizer_state, scheduler, params, rng)
                barrier(world)
            if live:
                live.make_summary()
    if world.writer:
        # Wall-clock numbers differ on every run: kept out of the dvclive files so those stay reproducible.
        write_json(SPEED_METRICS, {
            "steps": total_steps - start,
            "seconds": round(train_seconds, 2),
            "tokens_per_s": round(tokens_done / max(train_seconds, 1e-9), 1),
            "label_tokens_per_s": round(labels_done / max(train_seconds, 1e-9), 1),
        })
        print(f"wrote {WORK_DIR}/iter_{total_steps}.pth")
    barrier(world)
    leave()


if __name__ == "__main__":
    main()
