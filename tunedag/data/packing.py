"""Packing and collation. One attention rule for packed and unpacked rows: a token attends only to
earlier tokens of its own sample, where samples start at position_ids == 0."""

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


def attention_mask_4d(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (batch, 1, T, T) mask: block-diagonal per sample and causal. Works for the eager and
    sdpa attention of transformers; padding at the end forms its own samples and is never attended."""
    segment = (position_ids == 0).cumsum(-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def collate(rows: list[dict], pad_token_id: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row (not to max_length) and build the attention mask."""
    width = max(len(r["input_ids"]) for r in rows)

    def padded(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([list(r[key]) + [fill] * (width - len(r[key])) for r in rows])

    for r in rows:
        if "position_ids" not in r:
            r["position_ids"] = list(range(len(r["input_ids"])))
    position_ids = padded("position_ids", 0)
    return {
        "input_ids": padded("input_ids", pad_token_id),
        "labels": padded("labels", IGNORE_INDEX),
        "position_ids": position_ids,
        "attention_mask": attention_mask_4d(position_ids, dtype),
    }
