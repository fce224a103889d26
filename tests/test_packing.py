"""Packing is attention-correct: a sample's logits inside a packed row equal its logits alone."""

import torch
from transformers import AutoModelForCausalLM

from tunedag.data.chat import IGNORE_INDEX, encode_chat
from tunedag.data.packing import collate, pack


def test_best_fit_packing_respects_max_length():
    lengths = [100, 60, 50, 40, 30, 20, 10, 128]
    bins = pack(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) == 4


def test_packed_logits_equal_alone(tiny_base, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    conversations = [
        [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Nova."}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是Nova。"}],
    ]
    samples = [encode_chat(tokenizer, c) for c in conversations]
    packed_row = {
        "input_ids": [t for ids, _ in samples for t in ids],
        "labels": [t for _, labels in samples for t in labels],
        "position_ids": [p for ids, _ in samples for p in range(len(ids))],
    }
    with torch.no_grad():
        batch = collate([packed_row], tokenizer.pad_token_id)
        packed = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits[0]
        offset = 0
        for ids, _ in samples:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            assert torch.allclose(packed[offset : offset + len(ids)], alone, atol=1e-5)
            offset += len(ids)
        # Negative control: without the block mask the later samples see the earlier ones.
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        assert not torch.allclose(leaky[len(samples[0][0]) :], packed[len(samples[0][0]) :], atol=1e-3)


def test_padding_is_never_attended(tiny_base, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    short = {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}
    long = {"input_ids": list(range(10, 20)), "labels": list(range(10, 20))}
    with torch.no_grad():
        batch = collate([short, long], tokenizer.pad_token_id)
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
        alone = model(input_ids=torch.tensor([short["input_ids"]])).logits
    assert batch["labels"][0, 3:].eq(IGNORE_INDEX).all()
    assert torch.allclose(logits[0, :3], alone[0], atol=1e-5)
