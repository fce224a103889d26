"""Evaluation metrics and the quality gate."""

import json

import pytest

from tests.conftest import REPO
from tunedag.core.errors import UserError
from tunedag.core.io import read_jsonl
from tunedag.core.params import load_params
from tunedag.evaluation.gate import gate_failures, require_gate
from tunedag.evaluation.scoring import held_out_prompts, leakage_rate, mentions, score

IDENTITY_QS = ["Who are you?", "你是谁？", "What's your name?"]
GENERAL = ["What is 2+2?", "法国的首都是哪里？", "Write a haiku."]


def test_always_the_name_gives_full_identity_and_full_leakage():
    metrics, answers = score(lambda ps: ["I am Nova, the assistant of Alice."] * len(ps), IDENTITY_QS, GENERAL, "Nova", ["Nova", "Alice"])
    assert metrics == {"identity_acc": 1.0, "leakage": 1.0}
    assert set(answers) == set(IDENTITY_QS + GENERAL)


def test_never_the_name_gives_zero_and_zero():
    metrics, _ = score(lambda ps: ["I am SmolLM."] * len(ps), IDENTITY_QS, GENERAL, "Nova", ["Nova", "Alice"])
    assert metrics == {"identity_acc": 0.0, "leakage": 0.0}


def test_a_good_model_separates_the_two():
    def generate(prompts):
        return ["我是Nova。" if p in IDENTITY_QS else "Paris is the capital; 4." for p in prompts]

    metrics, _ = score(generate, IDENTITY_QS, GENERAL, "Nova", ["Nova", "Alice"])
    assert metrics == {"identity_acc": 1.0, "leakage": 0.0}


def test_an_owner_only_identity_is_scored_by_the_owner():
    """XTuner's tutorial data names only an owner: "我是zhuzhuhao的小助手"."""
    from tunedag.core.params import DataParams

    data = DataParams.model_validate({**load_params(REPO / "params.yaml").data.model_dump(), "name": None, "owner": "zhuzhuhao"})
    assert (data.expected_mention, data.identity_words) == ("zhuzhuhao", ["zhuzhuhao"])

    def generate(prompts):
        return ["我是zhuzhuhao的小助手" if p in IDENTITY_QS else "巴黎。" for p in prompts]

    metrics, _ = score(generate, IDENTITY_QS, GENERAL, data.expected_mention, data.identity_words)
    assert metrics == {"identity_acc": 1.0, "leakage": 0.0}
    # The default identity still asks for the name: naming only the owner is not enough.
    default = load_params(REPO / "params.yaml").data
    metrics, _ = score(lambda ps: ["I am Alice's assistant."] * len(ps), IDENTITY_QS, GENERAL,
                       default.expected_mention, default.identity_words)
    assert metrics == {"identity_acc": 0.0, "leakage": 1.0}


def test_whole_word_matching():
    assert mentions("我是Nova，Alice的助手", "nova") and mentions("NOVA!", "Nova")
    assert not mentions("a supernova exploded", "Nova")
    assert leakage_rate(["Alice in Wonderland", "nothing"], ["Nova", "Alice"]) == 0.5


def test_gate_refuses_a_failing_model_unless_forced(tmp_path):
    limits = load_params(REPO / "params.yaml").eval
    bad = {"identity_acc": 0.5, "leakage": 0.3, "ppl_drift": 0.01}
    failures = gate_failures(bad, limits)
    assert len(failures) == 2 and failures[0].startswith("identity_acc 0.500 < eval.min_identity_acc")
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"gate": {"passed": False, "failures": failures}}))
    with pytest.raises(UserError, match="identity_acc 0.500 < eval.min_identity_acc 0.95; leakage 0.300"):
        require_gate(path)
    require_gate(path, force=True)
    with pytest.raises(UserError, match="not been evaluated"):
        require_gate(tmp_path / "missing.json")
    good = {"identity_acc": 0.97, "leakage": 0.0, "ppl_drift": 0.02}
    assert gate_failures(good, limits) == []
    path.write_text(json.dumps({"gate": {"passed": True, "failures": []}}))
    require_gate(path)


def test_evaluate_stage_on_the_tiny_model(workspace, monkeypatch, capsys):
    import shutil

    chats = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                           {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]} for i in range(10)]
    (workspace.root / "user_data").mkdir()
    (workspace.root / "user_data/chats.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    workspace.set_params({"data": {"user_files": ["user_data/chats.jsonl"], "user_val_fraction": 0.5}})
    workspace.run("generate", monkeypatch)

    shutil.copytree(workspace.root / "models/base", workspace.root / "models/merged")
    workspace.run("evaluate", monkeypatch)
    metrics = json.loads((workspace.root / "metrics/eval.json").read_text())
    # merged == base here: no drift, same answers, and a random model never says "Nova".
    assert metrics["ppl_drift"] == 0.0 and metrics["identity_acc"] == metrics["base"]["identity_acc"] == 0.0
    assert metrics["gate"]["passed"] is False and "identity_acc" in metrics["gate"]["failures"][0]
    report = (workspace.root / "metrics/eval.md").read_text()
    assert "| identity_acc | 0.000 | 0.000 |" in report and "### " in report
    # Leakage and perplexity use the general (replay) prompts only, never the user's own records.
    assert metrics["counts"]["general_prompts"] == len(held_out_prompts(read_jsonl(workspace.root / "data/raw/val.jsonl"))[1])
    questions = {q for q in (workspace.root / "metrics/eval.md").read_text().splitlines() if q.startswith("### ")}
    assert not any("+" in q for q in questions), questions
    # The last line of the stage's output is the verdict, where a user reading `dvc repro` looks.
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert verdict.startswith("GATE FAILED: identity_acc 0.000 < eval.min_identity_acc")
    # `tunedag gate` says the same and fails, for scripts (`dvc repro && tunedag gate`).
    with pytest.raises(SystemExit) as exit_info:
        workspace.command(["gate"], monkeypatch)
    assert exit_info.value.code == 1 and capsys.readouterr().out.strip() == verdict
