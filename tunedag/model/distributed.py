"""Optional DeepSpeed ZeRO-2/3 for the train stage (train.deepspeed). On a GPU it shards optimizer
state (and with zero3, parameters); on CPU it runs single-process over gloo so configs can be tried."""

from __future__ import annotations

import os

import torch

from tunedag.core.params import Params


def deepspeed_config(params: Params, dtype: torch.dtype) -> dict:
    cfg = params.train
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.accumulative_counts,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": 2 if cfg.deepspeed == "zero2" else 3},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
        "seed": params.seed,
    }


def deepspeed_engine(model, optimizer, params: Params, dtype: torch.dtype):
    """(engine, optimizer): the engine does backward/step; our scheduler stays in charge of the lr."""
    import deepspeed

    # Single process unless a launcher (torchrun / deepspeed) already set the rendezvous up.
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}.items():
        os.environ.setdefault(key, value)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(params, dtype))
    return engine, ds_optimizer
