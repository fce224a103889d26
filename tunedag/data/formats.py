"""User data formats: read and validate the files in user_data/ into canonical conversations.

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

from tunedag.core.errors import UserError

ROLES = ("system", "user", "assistant")
MAX_RECORD_CHARS = 200_000  # far beyond any max_length; a bigger record is almost surely a broken file

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
