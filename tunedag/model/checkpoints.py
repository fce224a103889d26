"""The training checkpoint format (work/iter_N.pth): written by train, read by train (resume) and
convert. Plain tensors and containers only, so it loads with weights_only=True."""

from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from tunedag.core.errors import UserError
from tunedag.core.io import atomic_file
from tunedag.core.params import Params
from tunedag.model.lora import adapter_signature, lora_state

CHECKPOINT_FORMAT = "tunedag-train-v1"
CHECKPOINT_NAME = re.compile(r"^iter_(\d+)\.pth$")


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


def canonical(obj):
    """Rebuild containers and intern strings, so equal checkpoints pickle to equal bytes. Pickle
    memoizes by object identity: a resumed run's optimizer keys come from unpickling, not from the
    same string objects a fresh run uses, which changed the bytes (not the values) of its iter_N.pth."""
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        return {canonical(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(canonical(v) for v in obj)
    return obj


def data_order(params: Params) -> dict:
    """What fixes which rows each step and each process reads: a resume must not change it."""
    cfg = params.train
    return {"seed": params.seed, "batch_size": cfg.batch_size, "accumulative_counts": cfg.accumulative_counts,
            "world_size": cfg.nproc_per_node * cfg.nnodes}


def check_resumable(ckpt: dict, path: Path, params: Params) -> None:
    """Refuse to resume where the data order or the optimizer's kind would change."""
    saved, expected = {"world_size": 1, **ckpt["order"]}, data_order(params)  # no world_size: one process
    if saved["world_size"] != expected["world_size"]:
        raise UserError(
            f"{path}: written by {saved['world_size']} training process(es), but train.nproc_per_node x train.nnodes "
            f"is now {params.train.nproc_per_node} x {params.train.nnodes} = {expected['world_size']}: each process's "
            "data and random state would differ. Set train.nproc_per_node / train.nnodes back to "
            f"{saved['world_size']} process(es) in params.yaml to resume, or start fresh with train.resume: null "
            "(to keep the global batch with another world size, scale train.accumulative_counts inversely)."
        )
    if saved != expected:
        raise UserError(
            f"{path}: written with seed/batch_size/accumulative_counts {ckpt['order']}, which params.yaml "
            "changed; the data order would differ. Set them back or start fresh with train.resume: null."
        )
    written_with = "zero2" if "zero_shards" in ckpt["optimizer"] else None
    if not ckpt["optimizer"] or written_with != params.train.deepspeed:
        what = ("no optimizer state (a DeepSpeed run of an older tunedag)" if not ckpt["optimizer"]
                else f"the optimizer state of train.deepspeed: {written_with or 'null'}")
        raise UserError(
            f"{path}: holds {what}, and this run has train.deepspeed: {params.train.deepspeed or 'null'}. "
            + ("Set train.deepspeed back to what the checkpoint was written with, or start" if ckpt["optimizer"]
               else "Start") + " fresh with train.resume: null."
        )


def rng_state(world_size: int, device: torch.device) -> dict:
    """This process's random state: CPU, and CUDA (one process: every GPU; one of several: its own)."""
    if not torch.cuda.is_available():
        cuda = []
    elif world_size == 1:
        cuda = torch.cuda.get_rng_state_all()
    else:
        cuda = [torch.cuda.get_rng_state(device)]
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def restore_rng_state(ckpt: dict, rank: int, world_size: int, device: torch.device) -> None:
    state = ckpt["rng"]["ranks"][rank] if world_size > 1 else ckpt["rng"]
    torch.set_rng_state(state["torch"])
    if state["cuda"] and world_size == 1:
        torch.cuda.set_rng_state_all(state["cuda"])
    elif state["cuda"]:
        torch.cuda.set_rng_state(state["cuda"][0], device)


def save_checkpoint(path: Path, step: int, model, optimizer_state: dict, scheduler, params: Params,
                    rng: list[dict]) -> None:
    """`rng`: every process's rng_state(), by rank. The optimizer state under DeepSpeed is
    {"zero_shards": [each rank's ZeRO shard]}, plain data like the rest."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "adapter": adapter_signature(params),
        "lora": lora_state(model),
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": rng[0] if len(rng) == 1 else {"ranks": rng},
        "order": data_order(params),
    }
    with atomic_file(path, "wb") as fh:  # a kill mid-write never leaves a truncated iter_N.pth
        torch.save(canonical(state), fh)


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
