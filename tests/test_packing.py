"""Packing is attention-correct on every attention kernel that runs on CPU: a sample's loss inside a
packed row equals its loss alone. transformers keeps the samples apart from the restarting
position_ids; nothing here builds a mask."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunedag.data.chat import IGNORE_INDEX, encode_chat
from tunedag.data.packing import collate, forward_inputs, pack, packed_rows_are_isolated

CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Nova."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是Nova。"}],
]


def test_best_fit_packing_respects_max_length():
    lengths = [100, 60, 50, 40, 30, 20, 10, 128]
    bins = pack(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) == 4


@pytest.fixture(scope="module")
def samples(tokenizer):
    return [encode_chat(tokenizer, c) for c in CONVERSATIONS]


def packed_row(samples) -> dict:
    return {
        "input_ids": [t for ids, _ in samples for t in ids],
        "labels": [t for _, labels in samples for t in labels],
        "position_ids": [p for ids, _ in samples for p in range(len(ids))],
    }


def per_sample_losses(logits: torch.Tensor, samples) -> list[float]:
    """Mean next-token loss over each sample's labels, from the logits of the samples laid end to end."""
    losses, offset = [], 0
    for ids, labels in samples:
        own = logits[offset : offset + len(ids)]
        targets = torch.tensor(labels[1:])
        losses.append(float(torch.nn.functional.cross_entropy(own[:-1].float(), targets, ignore_index=IGNORE_INDEX)))
        offset += len(ids)
    return losses


# flex_attention compiles its kernel on first use: ~1 min on 2 CPU cores.
@pytest.mark.parametrize("attention", ["eager", "sdpa", "flex_attention"])
def test_packed_loss_equals_unpacked_rows(tiny_base, tokenizer, samples, attention):
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, attn_implementation=attention).eval()
    with torch.no_grad():
        batch = collate([packed_row(samples)], tokenizer.pad_token_id)
        packed = per_sample_losses(model(**forward_inputs(batch)).logits[0], samples)
        # Unpacked: the three samples as three padded rows of one batch.
        rows = collate([{"input_ids": ids, "labels": labels} for ids, labels in samples], tokenizer.pad_token_id)
        row_logits = model(**forward_inputs(rows)).logits
        unpacked = [per_sample_losses(row_logits[i], [sample])[0] for i, sample in enumerate(samples)]
        # Negative control: the model's default use_cache=True creates a cache, transformers then skips
        # its packed-row detection, and later samples see the earlier ones.
        leaky_inputs = {**forward_inputs(batch), "use_cache": True}
        leaky = per_sample_losses(model(**leaky_inputs).logits[0], samples)
    assert packed == pytest.approx(unpacked, abs=1e-5)
    assert packed[0] == pytest.approx(leaky[0], abs=1e-5)  # the first sample has nothing before it
    assert abs(leaky[1] - packed[1]) > 1e-3 and abs(leaky[2] - packed[2]) > 1e-3  # 100x the tolerance above


def test_the_pre_training_check_tells_isolated_rows_from_leaking_ones(tiny_base, tokenizer, samples):
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    row = packed_row(samples)
    assert packed_rows_are_isolated(model, row, tolerance=1e-4)
    # A model that ignores position_ids when finding samples (as remote code written for older
    # transformers may): here, one that always creates a cache.
    forward = model.forward
    model.forward = lambda **kwargs: forward(**{**kwargs, "use_cache": True})
    assert not packed_rows_are_isolated(model, row, tolerance=1e-4)


def test_padding_is_never_attended(tiny_base, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    short = {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}
    long = {"input_ids": list(range(10, 20)), "labels": list(range(10, 20))}
    with torch.no_grad():
        batch = collate([short, long], tokenizer.pad_token_id)
        logits = model(**forward_inputs(batch)).logits
        alone = model(input_ids=torch.tensor([short["input_ids"]])).logits
    assert batch["labels"][0, 3:].eq(IGNORE_INDEX).all()
    assert torch.allclose(logits[0, :3], alone[0], atol=1e-5)
