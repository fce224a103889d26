"""Packing and collation. One attention rule for packed and unpacked rows: a token attends only to
earlier tokens of its own sample, where samples start at position_ids == 0.

No mask is built here: transformers derives that rule itself from restarting `position_ids` when the
forward gets no attention mask and no cache (its packed-sequence detection), and hands it to each
attention kernel in its own form (a block mask for flex_attention, varlen for flash_attention_2)."""

from __future__ import annotations

import bisect

import torch

from tunedag.data.chat import IGNORE_INDEX


def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: groups of sample indices whose lengths sum to <= max_length."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot < len(free):
            space, b = free.pop(slot)
        else:
            space, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (space - lengths[i], b))
    return bins


def collate(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row (not to max_length). Padding gets position 0, so each pad token
    is a sample of its own that no real token attends to."""
    width = max(len(r["input_ids"]) for r in rows)

    def padded(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([list(r[key]) + [fill] * (width - len(r[key])) for r in rows])

    for r in rows:
        if "position_ids" not in r:
            r["position_ids"] = list(range(len(r["input_ids"])))
    return {
        "input_ids": padded("input_ids", pad_token_id),
        "labels": padded("labels", IGNORE_INDEX),
        "position_ids": padded("position_ids", 0),
    }


def forward_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The forward arguments of a collated batch. attention_mask stays None and use_cache False: with
    either set (a cache is created by default), transformers skips its packed-row detection and
    samples of one row attend to each other."""
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}


@torch.no_grad()
def packed_rows_are_isolated(model, row: dict, tolerance: float) -> bool:
    """Whether `model` keeps the samples of a packed row apart: the row's last sample gives the same
    logits inside the row as alone, within `tolerance` of the largest logit. Checked once before training, because an architecture whose
    attention ignores position_ids (remote code written for older transformers) would leak silently."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    if len(starts) < 2:
        return True
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        batch = {k: v.to(device) for k, v in collate([row], pad_token_id=0).items()}
        packed = model(**forward_inputs(batch)).logits[0, starts[-1] :]
        alone = model(input_ids=batch["input_ids"][:, starts[-1] :], use_cache=False).logits[0]
    finally:
        model.train(was_training)
    packed, alone = packed.float(), alone.float()
    return bool((packed - alone).abs().max() <= tolerance * alone.abs().max())
