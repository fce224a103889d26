"""Chat template, system-prompt policy and label masking on the real SmolLM2 tokenizer."""

import pytest

from tunedag.data.chat import (
    IGNORE_INDEX,
    encode_chat,
    end_of_turn_id,
    render,
    with_default_system_prompt,
)

SINGLE = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Nova, Alice's assistant."}]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "你是谁？"},
    {"role": "assistant", "content": "我是Nova，Alice的AI助手。"},
]


def labeled_spans(ids, labels):
    """Contiguous runs of labeled tokens."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


@pytest.mark.parametrize("messages", [SINGLE, MULTI])
def test_labels_are_exactly_assistant_content_and_end_of_turn(tokenizer, messages):
    ids, labels = encode_chat(tokenizer, messages)
    eot = end_of_turn_id(tokenizer)
    assert tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    spans = labeled_spans(ids, labels)
    assert len(spans) == len(assistant)
    for span, content in zip(spans, assistant):
        assert span[-1] == eot  # the model must learn to stop
        assert tokenizer.decode(span[:-1]) == content
    # Everything else (system, user, role headers, the newline after <|im_end|>) is masked.
    masked = [t for t, l in zip(ids, labels) if l == IGNORE_INDEX]
    assert tokenizer.decode(masked).count("<|im_start|>assistant") == len(assistant)
    assert labels[-1] == IGNORE_INDEX and tokenizer.decode(ids[-1:]) == "\n"


def test_default_system_prompt_is_in_the_template(tokenizer):
    text = render(tokenizer, SINGLE)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n")
    assert "SmolLM" not in text  # the base template's own default is replaced
    assert render(tokenizer, MULTI).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_policy_is_replaced_not_stacked():
    template = "{{ messages[0]['content'] }}"
    once = with_default_system_prompt(template, "A \"quoted\" prompt\nwith 中文")
    twice = with_default_system_prompt(once, "B")
    assert twice == with_default_system_prompt(template, "B")
    assert with_default_system_prompt(once, None) == template
