"""Conversations: the canonical `messages` format, the user formats we accept, the system-prompt
policy in the chat template, and tokenization with assistant-only labels.

Canonical format: one `{"messages": [{"role": ..., "content": ...}, ...]}` object per line.
Accepted user formats, detected per record:
  - OpenAI:  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  - XTuner:  {"conversation": [{"system": "...", "input": "...", "output": "..."}, ...]}
  - alpaca:  {"instruction": "...", "input": "...", "output": "...", "system": "..."}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from stages.common.errors import UserError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
MAX_RECORD_CHARS = 200_000  # far beyond any max_length; a bigger record is almost surely a broken file

# ---------------------------------------------------------------------------------------------
# Reading and validating user data


def _records(path: Path) -> Iterator[tuple[str, object]]:
    """Yield (where, record) from a .json (a list of records) or .jsonl (one per line) file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found. Fix the path in data.user_files (params.yaml).") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{path} line {line}: not UTF-8 text ({exc.reason} at byte {exc.start}). "
            "Re-save the file as UTF-8 and rerun."
        ) from None
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{path} line {lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path} line {lineno}: bad JSON ({exc.msg} at column {exc.colno}). "
                    "Each line must be one JSON object; fix or remove this line."
                ) from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path} line {exc.lineno}: bad JSON ({exc.msg} at column {exc.colno}). Fix the syntax and rerun."
            ) from None
        if not isinstance(data, list):
            raise UserError(f"{path}: a .json data file must hold a list of records, got a {type(data).__name__}.")
        for i, record in enumerate(data):
            yield f"{path} record {i}", record
    else:
        raise UserError(
            f"{path}: unsupported file type {path.suffix!r}. Use .jsonl (OpenAI messages, one per line) "
            "or .json (a list of XTuner `conversation` or alpaca records); .txt only with data.mode: pretrain."
        )


def _text(value: object, where: str, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: {field} must be a string, got {type(value).__name__}. Fix this record.")
    if not allow_empty and not value.strip():
        raise UserError(f"{where}: {field} is empty. Give it text or remove this record.")
    return value


def to_messages(record: object, where: str) -> list[dict]:
    """Convert one record in any accepted format to validated canonical messages."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: a record must be a JSON object, got {type(record).__name__}.")
    if "messages" in record:
        turns = record["messages"]
        if not isinstance(turns, list):
            raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects.")
        messages = []
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise UserError(f"{where}: messages[{j}] must be an object with 'role' and 'content'.")
            role = turn.get("role")
            if role not in ROLES:
                raise UserError(
                    f"{where}: messages[{j}] has unknown role {role!r} (allowed: {', '.join(ROLES)}). Fix this record."
                )
            content = _text(turn.get("content"), where, f"messages[{j}].content", allow_empty=role == "system")
            messages.append({"role": role, "content": content})
    elif "conversation" in record:
        turns = record["conversation"]
        if not isinstance(turns, list) or not turns:
            raise UserError(f"{where}: 'conversation' must be a non-empty list of {{input, output}} objects.")
        messages = []
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict) or "input" not in turn or "output" not in turn:
                raise UserError(f"{where}: conversation[{j}] needs 'input' and 'output' (XTuner format).")
            if turn.get("system") and j == 0:
                messages.append({"role": "system", "content": _text(turn["system"], where, "conversation[0].system")})
            messages.append({"role": "user", "content": _text(turn["input"], where, f"conversation[{j}].input")})
            messages.append(
                {"role": "assistant", "content": _text(turn["output"], where, f"conversation[{j}].output")}
            )
    elif "instruction" in record and "output" in record:
        prompt = _text(record["instruction"], where, "instruction")
        extra = _text(record.get("input", ""), where, "input", allow_empty=True)
        messages = []
        if record.get("system"):
            messages.append({"role": "system", "content": _text(record["system"], where, "system")})
        messages.append({"role": "user", "content": f"{prompt}\n\n{extra}" if extra.strip() else prompt})
        messages.append({"role": "assistant", "content": _text(record["output"], where, "output")})
    else:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise UserError(
            f"{where}: unknown record format (keys: {keys}). Use OpenAI 'messages', XTuner 'conversation' "
            "or alpaca 'instruction'/'input'/'output'."
        )
    validate_messages(messages, where)
    return messages


def validate_messages(messages: list[dict], where: str) -> None:
    if not messages:
        raise UserError(f"{where}: the conversation is empty.")
    size = sum(len(m["content"]) for m in messages)
    if size > MAX_RECORD_CHARS:
        raise UserError(
            f"{where}: record is {size:,} characters, over the {MAX_RECORD_CHARS:,} limit. Split it into "
            "several conversations (or use data.mode: pretrain for long plain text)."
        )
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for j, message in enumerate(body):
        expected = "user" if j % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise UserError(
                f"{where}: turn {j} is {message['role']!r} where {expected!r} was expected: after an optional "
                "first system message, turns must alternate user/assistant. Fix this record."
            )
    if not body or body[-1]["role"] != "assistant":
        raise UserError(
            f"{where}: the conversation does not end with an assistant turn, so there is nothing to learn. "
            "Add the assistant's answer or remove this record."
        )


def read_conversations(path: str | Path) -> list[list[dict]]:
    """All conversations of a user data file, validated; the first bad record raises a UserError."""
    return [to_messages(record, where) for where, record in _records(Path(path))]


def read_pretrain_text(path: str | Path) -> list[str]:
    """Plain-text documents for incremental pretraining: blank-line separated paragraphs."""
    path = Path(path)
    if path.suffix not in (".txt", ".md"):
        raise UserError(f"{path}: data.mode 'pretrain' reads plain text files (.txt or .md), got {path.suffix!r}.")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found. Fix the path in data.user_files (params.yaml).") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}). Re-save it as UTF-8.") from None
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise UserError(f"{path}: no text found. Give it paragraphs separated by blank lines.")
    return docs


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


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that are IGNORE_INDEX except on each
    assistant turn's content and its end-of-turn token (kept, so the model learns to stop)."""
    eot = end_of_turn_id(tokenizer)
    ids = _encode(tokenizer, render(tokenizer, messages))
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The template has no {% generation %} markers: find the turn by rendering prefixes.
        prompt = _encode(tokenizer, render(tokenizer, messages[:i], add_generation_prompt=True))
        through = ids if i == len(messages) - 1 else _encode(tokenizer, render(tokenizer, messages[: i + 1]))
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
    ids = _encode(tokenizer, text) + [tokenizer.eos_token_id]
    return ids, list(ids)
