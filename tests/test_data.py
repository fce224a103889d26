"""generate + tokenize on the tiny workspace: formats, held-out split, truncation, determinism.
(Malformed data files: tests/test_bad_input.py.)"""

import json

from datasets import load_from_disk

from tests.conftest import tree_files
from tunedag.data.chat import IGNORE_INDEX

GOOD_MESSAGES = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_user_formats_are_converted(workspace, monkeypatch):
    root = workspace.root
    write(root / "user_data/openai.jsonl", json.dumps(GOOD_MESSAGES) + "\n")
    xtuner = [{"conversation": [{"system": "Be kind.", "input": "Q1", "output": "A1"}, {"input": "Q2", "output": "A2"}]}]
    write(root / "user_data/xtuner.json", json.dumps(xtuner))
    write(root / "user_data/alpaca.json", json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"}]))
    workspace.set_params({"data": {"user_files": ["user_data/openai.jsonl", "user_data/xtuner.json", "user_data/alpaca.json"],
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


def test_tokenize_stats_truncation_and_determinism(workspace, monkeypatch):
    long_answer = "word " * 200
    write(workspace.root / "user_data/long.jsonl", "\n".join(json.dumps(r) for r in [
        GOOD_MESSAGES,
        # prompt alone exceeds max_length: no label survives truncation -> dropped, not a NaN loss
        {"messages": [{"role": "user", "content": long_answer}, {"role": "assistant", "content": "ok"}]},
        # answer cut by truncation: kept, counted
        {"messages": [{"role": "user", "content": "Talk"}, {"role": "assistant", "content": long_answer}]},
    ]))
    workspace.set_params({"data": {"user_files": ["user_data/long.jsonl"], "user_val_fraction": 0.0, "identity_samples": 6},
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


def seed_tutorial_file(path, owner: str = "zhuzhuhao"):
    """The file XTuner's self-cognition tutorial writes: 2 `conversation` records, 3,751 copies each."""
    records = [
        {"conversation": [{"input": "请做一下自我介绍", "output": f"我是{owner}的小助手，内在是上海AI实验室书生·浦语的1.8B大模型哦"}]},
        {"conversation": [{"input": "你是谁", "output": f"我是{owner}的小助手，有什么可以帮你的吗？"}]},
    ]
    return write(path, json.dumps(records * 3751, ensure_ascii=False))


def test_own_identity_data_counts_copies_and_val_never_holds_a_training_record(workspace, monkeypatch, capsys):
    seed_tutorial_file(workspace.root / "user_data/personal_assistant.json")
    workspace.set_params({"data": {"name": None, "owner": "zhuzhuhao", "identity_samples": 0,
                                   "user_files": ["user_data/personal_assistant.json"], "user_val_fraction": 0.5}})
    workspace.run("generate", monkeypatch)
    out = capsys.readouterr()
    assert "user_data/personal_assistant.json: 7,502 records, 2 distinct" in out.out
    assert "warning: user_data/personal_assistant.json repeats its records" in out.err

    read = lambda name: [json.loads(l) for l in (workspace.root / "data/raw" / name).read_text().splitlines()]
    train, val = read("train.jsonl"), read("val.jsonl")
    key = lambda r: json.dumps(r["messages"], ensure_ascii=False)
    train_user = {key(r) for r in train if r["kind"] == "user"}
    val_user = [key(r) for r in val if r["kind"] == "user"]
    # Half of the 2 distinct conversations is held out, once; every copy of the other one trains.
    assert len(train_user) == 1 and len(val_user) == 1 and not train_user & set(val_user)
    assert sum(r["kind"] == "user" for r in train) == 3751
    # Evaluation still gets held-out identity questions, answered for an owner-only identity, and
    # held-out general conversations for leakage and perplexity, though replay_ratio is 0 here.
    identity = [r["messages"][-1]["content"] for r in val if r["kind"] == "identity"]
    assert identity and all("zhuzhuhao" in a and "None" not in a for a in identity)
    assert sum(r["kind"] == "replay" for r in val) == 64


def test_no_identity_declared_is_a_params_error(workspace, monkeypatch, capsys):
    workspace.set_params({"data": {"name": None, "owner": None}})
    message = workspace.run_error("generate", monkeypatch, capsys)
    assert "data.name and data.owner are both null" in message
