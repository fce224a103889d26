"""Greedy batched chat generation, shared by replay data, training's evaluation_inputs and evaluate."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from tunedag.data.chat import end_of_turn_id, prompt_ids


@torch.no_grad()
def chat_generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    desc: str | None = None,
) -> list[tuple[str, bool]]:
    """Greedy answers to single-turn user prompts, rendered with the model's chat template.

    Returns (answer, finished) per prompt; finished is False when max_new_tokens cut the answer.
    """
    eot = end_of_turn_id(tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results: list[tuple[str, bool]] = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc=desc, disable=desc is None, unit="batch"):
        encoded = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts[start : start + batch_size]]
        width = max(map(len, encoded))
        # Left padding so every row's answer starts at the same position.
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded], device=device)
        attention_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eot,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in out[:, width:].tolist():
            finished = eot in row
            row = row[: row.index(eot)] if finished else row
            results.append((tokenizer.decode(row, skip_special_tokens=True).strip(), finished))
    if was_training:
        model.train()
    return results
