"""The real DAG on the real embedded SmolLM2, through `dvc repro`, in a fresh copy of this repo."""

import json
import sys

import pytest
import torch

from tests.conftest import make_project
from tests.conftest import run_cmd as run
from tunedag.model.presets import PRESETS

SMALL = {
    "data": {"identity_samples": 16, "val_identity_samples": 4, "replay_ratio": 0.25, "replay_max_new_tokens": 24},
    "train": {"max_steps": 2, "batch_size": 2, "save_steps": 1, "evaluation_freq": 2,
              "evaluation_inputs": ["Who are you?"], "evaluation_max_new_tokens": 8},
    "eval": {"max_new_tokens": 8},
}


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh clone of the working tree (committed or not), as a teammate would get it."""
    return make_project(tmp_path_factory.mktemp("clone") / "repo", SMALL)


@pytest.mark.slow
def test_dvc_repro_runs_the_whole_dag_then_skips_everything(clone):
    # Up to evaluate: serve_check needs a model trained long enough to name itself (tests/test_serve.py
    # covers serving on a tiny model).
    first = run(["dvc", "repro", "evaluate"], clone, timeout=1800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("base", "generate", "tokenize", "train", "convert", "merge", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout
    assert json.loads((clone / "metrics/eval.json").read_text())["counts"]["identity_questions"] > 0
    assert (clone / "models/merged/model.safetensors").exists()
    assert json.loads((clone / "data/tokenized/stats.json").read_text())["train"]["rows"] > 0

    second = run(["dvc", "repro", "evaluate"], clone, timeout=600)
    assert second.returncode == 0
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in second.stdout

    # An experiment on a training param reruns train and what follows, nothing upstream.
    exp = run(["dvc", "exp", "run", "-S", "lora.r=8", "-n", "r8"], clone, timeout=1800)
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    for stage in ("base", "generate", "tokenize"):
        assert f"Running stage '{stage}'" not in exp.stdout
    for stage in ("train", "convert", "merge", "evaluate"):
        assert f"Running stage '{stage}'" in exp.stdout
    table = json.loads(run(["dvc", "exp", "show", "--json"], clone).stdout)
    experiments = [e for row in table for e in (row.get("experiments") or [])]
    r8 = [e for e in experiments if e.get("name") == "r8"]
    assert r8, table
    revision = r8[0]["revs"][0]["data"]
    assert revision["params"]["params.yaml"]["data"]["lora"]["r"] == 8
    assert "identity_acc" in revision["metrics"]["metrics/eval.json"]["data"]
    # The short view: the gate's metrics and the key params, not every latency and dependency hash.
    short = run([sys.executable, "-m", "tunedag", "experiments", "--csv"], clone)
    assert short.returncode == 0, short.stderr
    header = short.stdout.splitlines()[0].split(",")
    trained_r = "metrics/train/params.yaml:lora.r"  # the value train ran with: params.yaml's lora.r is the recipe's null
    assert {"identity_acc", "leakage", "gate.passed", trained_r, "model.preset", "data.name"} <= set(header), header
    assert len(header) < 22, header
    rows = [dict(zip(header, line.split(","))) for line in short.stdout.splitlines()[1:]]
    assert [row[trained_r] for row in rows if row["Experiment"] == "r8"] == ["8"], rows
    # The committed baseline trained with the recipe's r (the workspace row now holds r8's).
    assert str(PRESETS["smollm2-135m-instruct"].recipe.r) in {row[trained_r] for row in rows}, rows

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunedag.model.generation import chat_generate

    tokenizer = AutoTokenizer.from_pretrained(clone / "models/merged")
    model = AutoModelForCausalLM.from_pretrained(clone / "models/merged", dtype=torch.float32)
    [(answer, _)] = chat_generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12)
    assert len(answer.split()) >= 2


@pytest.mark.slow
def test_the_seed_tutorials_own_data_trains_with_replay_and_is_scored_by_its_owner(clone):
    """XTuner's tutorial file (2 records, 3,751 copies each, naming only an owner) as a DVC experiment:
    replay scales with it, evaluation looks for the owner, leakage is measured on general prompts only."""
    from tests.test_data import seed_tutorial_file

    seed_tutorial_file(clone / "user_data/personal_assistant.json")
    exp = run(["dvc", "exp", "run", "-n", "seed-data", "-S", "data.name=null", "-S", "data.owner=zhuzhuhao",
               "-S", "data.identity_samples=0", "-S", "data.user_files=[user_data/personal_assistant.json]"],
              clone, timeout=1800)
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    assert "user_data/personal_assistant.json: 7,502 records, 2 distinct" in exp.stdout
    assert "repeats its records" in exp.stderr

    train = [json.loads(line) for line in (clone / "data/raw/train.jsonl").read_text().splitlines()]
    kinds = {kind: sum(r["kind"] == kind for r in train) for kind in ("user", "replay", "identity")}
    assert kinds == {"user": 7502, "replay": round(7502 * SMALL["data"]["replay_ratio"]), "identity": 0}
    metrics = json.loads((clone / "metrics/eval.json").read_text())
    assert metrics["counts"]["general_prompts"] == 64  # the held-out general bank, not the user's two prompts
    assert (clone / "metrics/eval.md").read_text().startswith("# Evaluation: zhuzhuhao")
    # The model is refused after 2 steps; the last thing the pipeline says is why.
    said = [line for line in exp.stdout.splitlines() if line.startswith("GATE ")]
    assert said and said[-1].startswith("GATE FAILED: identity_acc"), exp.stdout[-2000:]
