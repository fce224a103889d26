"""Seeding, threads and device: every stage calls `setup()` first, with values from params.yaml."""

from __future__ import annotations

import importlib.util
import os
import random

import numpy as np
import torch

from tunedag.core.params import Params

# No telemetry or update checks from the Hugging Face libraries. Downloads stay allowed: the base
# stage fetches a hub id (model.source) when one is set; every other stage reads local folders only.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(params: Params) -> torch.device:
    """Seed every RNG from params.seed, set torch threads, and return the device to use."""
    seed_everything(params.seed)
    torch.set_num_threads(params.threads)
    # Deterministic kernels where torch has a choice; warn (not fail) where an op has none.
    torch.use_deterministic_algorithms(True, warn_only=True)
    # ...but do not fill every new tensor with NaN (a debugging aid of deterministic mode that costs
    # ~5% of a CPU training step); results do not depend on it.
    torch.utils.deterministic.fill_uninitialized_memory = False
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_dtype(params: Params, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 is ~20-50x slower on AVX2 cores), bf16 on GPU, unless train.dtype says."""
    if params.train.dtype != "auto":
        return getattr(torch, params.train.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def attention_implementation(params: Params, device: torch.device) -> str:
    """train.attention auto: flash_attention_2 (its varlen kernel takes packed rows as they are) on a
    GPU where flash-attn is installed, else sdpa. flex_attention is offered, not the default: it
    compiles its kernel on first use (~1 min on CPU) and no GPU measurement here shows it faster."""
    if params.train.attention != "auto":
        return params.train.attention
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"
