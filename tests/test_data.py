"""generate + tokenize on the tiny workspace: formats, validation, truncation, determinism."""

import json

import pytest
from datasets import load_from_disk

from stages.common.chat import IGNORE_INDEX
from tests.conftest import tree_files

GOOD_MESSAGES = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_user_formats_are_converted(workspace, monkeypatch):
    root = workspace.root
    write(root / "u/openai.jsonl", json.dumps(GOOD_MESSAGES) + "\n")
    xtuner = [{"conversation": [{"system": "Be kind.", "input": "Q1", "output": "A1"}, {"input": "Q2", "output": "A2"}]}]
    write(root / "u/xtuner.json", json.dumps(xtuner))
    write(root / "u/alpaca.json", json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"}]))
    workspace.set_params({"data": {"user_files": ["u/openai.jsonl", "u/xtuner.json", "u/alpaca.json"],
                                   "user_val_fraction": 0.0, "identity_samples": 4}})
    workspace.run("generate", monkeypatch)
    rows = [json.loads(line) for line in (root / "data/raw/train.jsonl").read_text().splitlines()]
    user = [r["messages"] for r in rows if r["kind"] == "user"]
    assert GOOD_MESSAGES["messages"] in user
    assert [m["role"] for m in next(m for m in user if m[0]["role"] == "system")] == [
        "system", "user", "assistant", "user", "assistant"]
    assert [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}] in user
    identity = [r for r in rows if r["kind"] == "identity"]
    assert len(identity) == 4 and all("Nova" in r["messages"][-1]["content"] for r in identity)


def test_val_identity_questions_are_held_out(workspace, monkeypatch):
    workspace.set_params({"data": {"identity_samples": 200, "val_identity_samples": 50}})
    workspace.run("generate", monkeypatch)
    read = lambda name: [json.loads(l) for l in (workspace.root / "data/raw" / name).read_text().splitlines()]
    train_q = {r["messages"][0]["content"] for r in read("train.jsonl")}
    val_q = {r["messages"][0]["content"] for r in read("val.jsonl")}
    assert len(train_q) > 30 and len(val_q) > 10
    assert not train_q & val_q


BAD_FILES = [
    ("bad.jsonl", '{"messages": [}\n', "bad.jsonl line 1: bad JSON"),
    ("role.jsonl", json.dumps(GOOD_MESSAGES) + "\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
     "role.jsonl line 2: messages[0] has unknown role 'bot'"),
    ("empty.jsonl", json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}),
     "empty.jsonl line 1: messages[1].content is empty"),
    ("open.jsonl", json.dumps({"messages": [{"role": "user", "content": "Hi"}]}),
     "open.jsonl line 1: the conversation does not end with an assistant turn"),
    ("latin1.jsonl", json.dumps(GOOD_MESSAGES).encode() + b"\n" + '{"messages": "caf\xe9"}'.encode("latin-1"),
     "latin1.jsonl line 2: not UTF-8"),
    ("alien.json", json.dumps([{"question": "q", "answer": "a"}]), "alien.json record 0: unknown record format"),
    ("dict.json", json.dumps({"conversation": []}), "dict.json: a .json data file must hold a list"),
    ("xtuner.json", json.dumps([{"conversation": [{"input": "q"}]}]), "xtuner.json record 0: conversation[0] needs"),
    ("types.jsonl", json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}),
     "types.jsonl line 1: messages[0].content must be a string"),
    ("order.jsonl", json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]}),
     "order.jsonl line 1: turn 0 is 'assistant' where 'user' was expected"),
    ("huge.jsonl", json.dumps({"messages": [{"role": "user", "content": "x" * 300_000}, {"role": "assistant", "content": "a"}]}),
     "huge.jsonl line 1: record is 300,001 characters"),
    ("data.csv", "a,b\n", "data.csv: unsupported file type '.csv'"),
]


@pytest.mark.parametrize("name, content, expected", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_user_data_is_refused_and_nothing_written(workspace, monkeypatch, capsys, name, content, expected):
    write(workspace.root / "u" / name, content)
    workspace.set_params({"data": {"user_files": [f"u/{name}"]}})
    err = workspace.run_error("generate", monkeypatch, capsys)
    assert expected in err
    assert not (workspace.root / "data").exists()


def test_missing_user_file(workspace, monkeypatch, capsys):
    workspace.set_params({"data": {"user_files": ["nope.jsonl"]}})
    assert "nope.jsonl: file not found" in workspace.run_error("generate", monkeypatch, capsys)


def test_tokenize_stats_truncation_and_determinism(workspace, monkeypatch):
    long_answer = "word " * 200
    write(workspace.root / "u/long.jsonl", "\n".join(json.dumps(r) for r in [
        GOOD_MESSAGES,
        # prompt alone exceeds max_length: no label survives truncation -> dropped, not a NaN loss
        {"messages": [{"role": "user", "content": long_answer}, {"role": "assistant", "content": "ok"}]},
        # answer cut by truncation: kept, counted
        {"messages": [{"role": "user", "content": "Talk"}, {"role": "assistant", "content": long_answer}]},
    ]))
    workspace.set_params({"data": {"user_files": ["u/long.jsonl"], "user_val_fraction": 0.0, "identity_samples": 6},
                          "tokenize": {"max_length": 96, "pack": True}})
    workspace.run("generate", monkeypatch)
    workspace.run("tokenize", monkeypatch)
    out = workspace.root / "data/tokenized"
    stats = json.loads((out / "stats.json").read_text())["train"]
    assert stats["samples"] == 9 and stats["truncated"] == 2 and stats["dropped_no_labels"] == 1
    train = load_from_disk(str(out))["train"]
    assert all(len(row["input_ids"]) <= 96 for row in train)
    assert sum(len(r["input_ids"]) for r in train) == stats["tokens"]
    assert sum(t != IGNORE_INDEX for r in train for t in r["labels"]) == stats["label_tokens"]
    assert stats["rows"] < 8  # packed several samples per row
    first = tree_files(out)
    workspace.run("tokenize", monkeypatch)
    assert tree_files(out) == first  # byte-identical rerun
