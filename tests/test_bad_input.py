"""The bad-input suite: every malformed data file, params value, model source and checkpoint ends
with one paragraph naming the input and the fix, exit status 1, no traceback, and no output
written or overwritten.

Each case starts from a copy of one prepared workspace (tiny model; generate, tokenize, train and
convert already done, so every stage has its inputs), breaks one thing, runs one stage in-process,
and compares every file of the workspace before and after.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from tests.conftest import merge_dicts, tree_files

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def msgs(*turns) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


@dataclass
class Case:
    id: str
    stage: str
    expected: list[str]  # fragments of the message: the input it names and the fix it gives
    params: dict = field(default_factory=dict)
    files: dict[str, str | bytes] = field(default_factory=dict)  # written into the workspace
    setup: Callable[[Path], None] | None = None  # anything else, e.g. a forged checkpoint


def data_case(id, content, expected, name=None, mode="chat") -> Case:
    name = name or f"{id}.jsonl"
    params = {"data": {"user_files": [f"user_data/{name}"], "mode": mode}}
    return Case(id, "generate", expected, params, {f"user_data/{name}": content})


DATA = [
    data_case("bad-json", line(GOOD) + '{"messages": [}\n', ["bad-json.jsonl line 2: bad JSON", "fix or remove this line"]),
    data_case("unknown-role", line(msgs(("bot", "x"), ("assistant", "y"))), ["line 1: messages[0] has unknown role 'bot'", "Fix this record"]),
    data_case("empty-answer", line(msgs(("user", "Hi"), ("assistant", " "))), ["line 1: messages[1].content is empty", "remove this record"]),
    data_case("empty-question", line(msgs(("user", ""), ("assistant", "a"))), ["line 1: messages[0].content is empty"]),
    data_case("no-answer", line(msgs(("user", "Hi"))), ["line 1: the conversation does not end with an assistant turn", "Add the assistant"]),
    data_case("latin1", line(GOOD).encode() + '{"messages": "café"}\n'.encode("latin-1"), ["latin1.jsonl line 2: not UTF-8", "Re-save the file as UTF-8"]),
    data_case("utf16", line(GOOD).encode("utf-16"), ["utf16.jsonl line 1: not UTF-8", "Re-save"]),
    data_case("binary", bytes(range(256)) * 4, ["binary.jsonl line 2: not UTF-8"]),
    data_case("alien-format", json.dumps([{"question": "q", "answer": "a"}]), ["alien-format.json record 0: unknown record format", "alpaca"], "alien-format.json"),
    data_case("json-dict", json.dumps({"conversation": []}), ["json-dict.json: a .json data file must hold a list", "["], "json-dict.json"),
    data_case("json-truncated", json.dumps([GOOD, GOOD])[:-7], ["json-truncated.json line 1: bad JSON", "Fix the syntax"], "json-truncated.json"),
    data_case("xtuner-no-output", json.dumps([{"conversation": [{"input": "q"}]}]), ["record 0: conversation[0] needs 'input' and 'output'"], "xtuner-no-output.json"),
    data_case("xtuner-empty", json.dumps([{"conversation": []}]), ["record 0: 'conversation' must be a non-empty list"], "xtuner-empty.json"),
    data_case("alpaca-number", json.dumps([{"instruction": "Add", "input": "2+3", "output": 5}]), ["record 0: output must be a string, got int"], "alpaca-number.json"),
    data_case("content-int", line(msgs(("user", 5), ("assistant", "a"))), ["line 1: messages[0].content must be a string, got int"]),
    data_case("content-null", line(msgs(("user", None), ("assistant", "a"))), ["line 1: messages[0].content must be a string, got NoneType"]),
    data_case("turn-order", line(msgs(("assistant", "a"), ("assistant", "b"))), ["line 1: turn 0 is 'assistant' where 'user' was expected", "alternate"]),
    data_case("system-in-middle", line(msgs(("user", "q"), ("system", "s"), ("assistant", "a"))), ["line 1: turn 1 is 'system' where 'assistant' was expected"]),
    data_case("messages-empty", line({"messages": []}), ["line 1: the conversation is empty"]),
    data_case("messages-string", line({"messages": "hello"}), ["line 1: 'messages' must be a list"]),
    data_case("message-not-object", line({"messages": ["hello", "hi"]}), ["line 1: messages[0] must be an object with 'role' and 'content'"]),
    data_case("record-not-object", line([1, 2]), ["line 1: a record must be a JSON object, got list"]),
    data_case("huge-record", line(msgs(("user", "x" * 300_000), ("assistant", "a"))), ["line 1: record is 300,001 characters", "Split it"]),
    data_case("csv", "a,b\n1,2\n", ["csv.csv: unsupported file type '.csv'", "Use .jsonl"], "csv.csv"),
    Case("missing-file", "generate", ["nope.jsonl: file not found", "Fix the path in data.user_files"],
         {"data": {"user_files": ["user_data/nope.jsonl"]}}),
    data_case("pretrain-jsonl", line(GOOD), ["pretrain-jsonl.jsonl: data.mode 'pretrain' reads plain text files"], mode="pretrain"),
    data_case("pretrain-empty", "\n\n   \n", ["pretrain-empty.txt: no text found", "paragraphs"], "pretrain-empty.txt", mode="pretrain"),
]


def params_case(id, extra, expected, stage="tokenize") -> Case:
    return Case(id, stage, ["params.yaml", *expected], params=extra)


def raw_params(id, text: str, expected) -> Case:
    return Case(id, "tokenize", expected, files={"params.yaml": text})


def drop_key(section: str, key: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        params = yaml.safe_load((root / "params.yaml").read_text())
        del params[section][key]
        (root / "params.yaml").write_text(yaml.safe_dump(params))
    return setup


PARAMS = [
    params_case("lora-r-negative", {"lora": {"r": -1}}, ["lora.r: Input should be greater than or equal to 1", "Fix these keys"], "train"),
    params_case("name-empty", {"data": {"name": ""}}, ["data.name: String should have at least 1 character"], "generate"),
    params_case("name-blank", {"data": {"name": "   "}}, ["data.name: must be a non-empty name"], "generate"),
    params_case("quant-unknown", {"lora": {"quant": "int3"}}, ["lora.quant: Input should be 'none' or 'nf4'"], "train"),
    params_case("lr-string", {"train": {"lr": "fast"}}, ["train.lr: Input should be a valid number", "'fast'"], "train"),
    params_case("lr-too-big", {"train": {"lr": 5}}, ["train.lr: Input should be less than 1"], "train"),
    params_case("typo-key", {"train": {"max_step": 10}}, ["train.max_step: unknown key"], "train"),
    params_case("unknown-section", {"bogus": 1}, ["bogus: unknown key"]),
    params_case("convert-iter-word", {"convert": {"iter": "first"}}, ["convert.iter", "'last' or a positive step number"], "convert"),
    params_case("shard-size", {"merge": {"max_shard_size": "lots"}}, ["merge.max_shard_size", "pattern"], "merge"),
    params_case("pretrain-no-files", {"data": {"mode": "pretrain"}}, ["data.mode 'pretrain' needs plain-text files"], "generate"),
    params_case("max-length-zero", {"tokenize": {"max_length": 0}}, ["tokenize.max_length: Input should be greater than or equal to 16"]),
    params_case("scheduler-unknown", {"train": {"scheduler": "exponential"}}, ["train.scheduler", "'cosine', 'linear' or 'constant'"], "train"),
    params_case("port-range", {"serve": {"port": 70000}}, ["serve.port: Input should be less than or equal to 65535"], "serve_check"),
    params_case("seed-string", {"seed": "abc"}, ["seed: Input should be a valid integer"]),
    params_case("replay-negative", {"data": {"replay_ratio": -1}}, ["data.replay_ratio: Input should be greater than or equal to 0"], "generate"),
    params_case("leakage-over-one", {"eval": {"max_leakage": 2}}, ["eval.max_leakage: Input should be less than or equal to 1"], "evaluate"),
    params_case("threads-zero", {"threads": 0}, ["threads: Input should be greater than or equal to 1"], "train"),
    params_case("section-not-mapping", {"lora": [1, 2]}, ["lora: Input should be a valid dictionary"], "train"),
    params_case("user-files-string", {"data": {"user_files": "data.jsonl"}}, ["data.user_files: Input should be a valid list"], "generate"),
    params_case("user-file-outside-user-data", {"data": {"user_files": ["elsewhere/chats.jsonl"]}},
                ["data.user_files: 'elsewhere/chats.jsonl' must be inside user_data/", "move it there"], "generate"),
    params_case("user-file-escapes", {"data": {"user_files": ["user_data/../secrets.jsonl"]}},
                ["must be inside user_data/"], "generate"),
    params_case("trust-remote-code-string", {"model": {"trust_remote_code": "maybe"}}, ["model.trust_remote_code: Input should be a valid boolean"], "base"),
    Case("missing-key", "train", ["params.yaml", "lora.r: missing", "every key must be set"], setup=drop_key("lora", "r")),
    raw_params("params-a-list", yaml.safe_dump([1, 2]), ["params.yaml must be a mapping of sections"]),
    raw_params("params-bad-yaml", "lora: {r: [\n", ["params.yaml is not valid YAML", "line 2", "Fix the syntax"]),
    Case("params-missing", "tokenize", ["params.yaml not found", "run the stage from the project root"],
         setup=lambda root: (root / "params.yaml").unlink()),
]


def non_model_folder(root: Path) -> None:
    (root / "some_folder").mkdir()
    (root / "some_folder/readme.txt").write_text("not a model")


def broken_config(root: Path) -> None:
    (root / "broken").mkdir()
    (root / "broken/config.json").write_text("{not json")


def config_without_weights(root: Path) -> None:
    shutil.copytree(root / "models/base", root / "no_weights")
    for weights in (root / "no_weights").glob("*.safetensors"):
        weights.unlink()


MODELS = [
    Case("hub-offline", "base", ["model.source 'Qwen/Qwen2.5-0.5B-Instruct'", "could not be downloaded from the Hugging Face Hub"],
         {"model": {"source": "Qwen/Qwen2.5-0.5B-Instruct"}}),
    Case("missing-folder", "base", ["model.source './no/such/folder'", "not a model folder (no config.json"],
         {"model": {"source": "./no/such/folder"}}),
    Case("non-model-folder", "base", ["model.source './some_folder'", "not a model folder"],
         {"model": {"source": "./some_folder"}}, setup=non_model_folder),
    Case("broken-config", "base", ["model.source './broken'", "could not be loaded"],
         {"model": {"source": "./broken"}}, setup=broken_config),
    Case("no-weights", "base", ["model.source './no_weights'", "could not be loaded"],
         {"model": {"source": "./no_weights"}}, setup=config_without_weights),
    Case("unknown-preset", "base", ["unknown preset 'llama-9000'", "tunedag presets"], {"model": {"preset": "llama-9000"}}),
]


def forge(kind: str) -> Callable[[Path], None]:
    """Write a bad work/iter_9.pth of the given kind."""

    def setup(root: Path) -> None:
        good = root / "work/iter_6.pth"
        bad = root / "work/iter_9.pth"
        if kind == "truncated":
            bad.write_bytes(good.read_bytes()[:1000])
        elif kind == "text":
            bad.write_text("this is not a checkpoint\n")
        elif kind == "foreign":
            torch.save({"state_dict": {"w": torch.zeros(2)}}, bad)
        elif kind == "pickle-with-code":
            class Evil:
                def __reduce__(self):
                    return (os.system, ("echo pwned > pwned.txt",))
            torch.save({"format": "x", "evil": Evil()}, bad)
        elif kind == "other-rank":
            torch.save(torch.load(good, weights_only=True), bad)  # params below ask for r=8
        elif kind == "wrong-shapes":
            ckpt = torch.load(good, weights_only=True)
            ckpt["lora"] = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in ckpt["lora"].items()}
            torch.save(ckpt, bad)

    return setup


def checkpoint_cases(stage: str) -> list[Case]:
    point = {"convert": {"convert": {"iter": "9"}}, "train": {"train": {"resume": "work/iter_9.pth"}}}[stage]
    fix = {"convert": "convert.iter", "train": "train.resume"}[stage]
    return [
        Case(f"{stage}-truncated", stage, ["work/iter_9.pth: not a readable tunedag checkpoint", fix], point, setup=forge("truncated")),
        Case(f"{stage}-text-file", stage, ["work/iter_9.pth: not a readable tunedag checkpoint"], point, setup=forge("text")),
        Case(f"{stage}-foreign", stage, ["work/iter_9.pth: not a tunedag checkpoint", fix], point, setup=forge("foreign")),
        Case(f"{stage}-pickle-with-code", stage, ["work/iter_9.pth: refused: the file holds pickled Python objects (posix.system)", "weights_only=True", fix],
             point, setup=forge("pickle-with-code")),
        Case(f"{stage}-other-rank", stage, ["work/iter_9.pth does not match params.yaml", "r: checkpoint 4 vs params 8"],
             merge_dicts(point, {"lora": {"r": 8}}), setup=forge("other-rank")),
        Case(f"{stage}-wrong-shapes", stage, ["work/iter_9.pth: LoRA weights do not fit the model (size mismatch", "retrain", fix], point,
             setup=forge("wrong-shapes")),
        Case(f"{stage}-missing", stage, ["work/iter_99.pth: checkpoint not found", fix],
             merge_dicts(point, {"convert": {"iter": "99"}} if stage == "convert" else {"train": {"resume": "work/iter_99.pth"}})),
    ]


CHECKPOINTS = checkpoint_cases("convert") + checkpoint_cases("train")
CASES = DATA + PARAMS + MODELS + CHECKPOINTS


def test_the_suite_is_big_enough():
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_cleanly(case, prepared, tmp_path, monkeypatch, capsys):
    workspace = prepared.copy_to(tmp_path / "ws")
    root = workspace.root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    workspace.set_params(case.params)
    for name, content in case.files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    if case.setup:
        case.setup(root)
    before = tree_files(root)

    message = workspace.run_error(case.stage, monkeypatch, capsys)

    for fragment in case.expected:
        assert fragment in message, f"{fragment!r} not in: {message}"
    after = tree_files(root)
    assert after.keys() == before.keys(), f"files appeared or vanished: {sorted(after.keys() ^ before.keys())}"
    assert [name for name in before if before[name] != after[name]] == [], "an output was overwritten"
