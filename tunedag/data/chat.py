"""Chat templates: the system-prompt policy stored in the template, rendering, and tokenization
with assistant-only labels."""

from __future__ import annotations

import json

from tunedag.core.errors import UserError

IGNORE_INDEX = -100

# ---------------------------------------------------------------------------------------------
# The system-prompt policy, stored in the chat template itself

_POLICY_MARK = "{#- tunedag: default system prompt -#}"


def with_default_system_prompt(template: str, system_prompt: str | None) -> str:
    """Prefix `template` so a conversation without a system message gets `system_prompt`.

    Stored in models/base's tokenizer, this one template is what tokenize, train, evaluate, merge and
    the server all render: the policy cannot drift between training and serving.
    """
    if _POLICY_MARK in template:  # re-materializing a tunedag output: drop the old policy first
        template = template.split(_POLICY_MARK, 2)[2]
    if system_prompt is None:
        return template
    literal = json.dumps(system_prompt)  # a valid Jinja string literal (\n and \uXXXX escapes)
    policy = (
        "{%- if messages and messages[0]['role'] != 'system' -%}"
        f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages -%}}"
        "{%- endif -%}"
    )
    return f"{_POLICY_MARK}{policy}{_POLICY_MARK}{template}"


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn: ChatML's <|im_end|> where the vocab has it, else eos."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        return im_end
    return tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------
# Tokenization with labels


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Token ids of text the chat template rendered (it holds the special tokens already)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt a chat server builds for `messages`: the template with the generation prompt."""
    return encode_rendered(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that are IGNORE_INDEX except on each
    assistant turn's content and its end-of-turn token (kept, so the model learns to stop)."""
    eot = end_of_turn_id(tokenizer)
    ids = encode_rendered(tokenizer, render(tokenizer, messages))
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The template has no {% generation %} markers: find the turn by rendering prefixes.
        prompt = prompt_ids(tokenizer, messages[:i])
        through = ids if i == len(messages) - 1 else encode_rendered(tokenizer, render(tokenizer, messages[: i + 1]))
        if ids[: len(prompt)] != prompt or ids[: len(through)] != through:
            raise UserError(
                "the chat template of models/base does not render conversations prefix-stably (a prefix of "
                "a conversation tokenizes differently inside the whole), so assistant labels cannot be "
                "placed. Use a model whose template renders each turn independently."
            )
        turn = ids[len(prompt) : len(through)]
        # Label up to and including the turn's last end-of-turn token, not template glue after it.
        stop = len(turn) - turn[::-1].index(eot) if eot in turn else len(turn)
        start = len(prompt)
        labels[start : start + stop] = turn[:stop]
    return ids, labels


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Pretraining: every token is a label; eos closes the document."""
    ids = encode_rendered(tokenizer, text) + [tokenizer.eos_token_id]
    return ids, list(ids)
