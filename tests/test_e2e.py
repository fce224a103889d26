"""The real DAG on the real embedded SmolLM2, through `dvc repro`, in a fresh copy of this repo."""

import json

import pytest
import torch

from tests.conftest import make_project
from tests.conftest import run_cmd as run

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

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunedag.model.generation import chat_generate

    tokenizer = AutoTokenizer.from_pretrained(clone / "models/merged")
    model = AutoModelForCausalLM.from_pretrained(clone / "models/merged", dtype=torch.float32)
    [(answer, _)] = chat_generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12)
    assert len(answer.split()) >= 2
