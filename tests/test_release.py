"""Releasing: the hub-ready export and its card, GGUF + Modelfile read back, the GTO registry
(`tunedag publish`, gated), `dvc artifacts get --stage prod` from a fresh directory against the
default remote, and the serving flow deploying the registered version.

The heavy path runs the real pipeline (`dvc repro gguf`, every stage a real process) on the tiny
random-weight Llama with the real tokenizer, as a fresh git repo whose HOME is a temp dir, so the
default remote (~/.local/share/tunedag/dvc-storage) is a fresh one too.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    REPO,
    copy_project,
    run_cmd,
    tree_files,
)
from tunedag.core.errors import UserError
from tunedag.release.gguf import CHATML_OLLAMA, ollama_template


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> dict[str, str]:
    """Environment for a user whose HOME (and so the default DVC remote) is empty."""
    home = tmp_path_factory.mktemp("home")
    return {"HOME": str(home), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_pipeline) -> Path:
    """The shared tiny pipeline after `dvc repro` (f32 GGUF, gate opened wide), committed."""
    return copy_project(tiny_pipeline, tmp_path_factory.mktemp("release") / "repo")


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


@pytest.mark.slow
def test_export_is_hub_ready_and_renders_the_training_prompt(project, tiny_base):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunedag.core.io import read_jsonl
    from tunedag.data.chat import encode_chat

    export = project / "models/export"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
            "README.md"} <= {p.name for p in export.iterdir()}
    AutoModelForCausalLM.from_pretrained(export)  # loads as a standalone model
    trained_with = AutoTokenizer.from_pretrained(project / "models/base")
    exported = AutoTokenizer.from_pretrained(export)
    for record in read_jsonl(project / "data/raw/train.jsonl")[:20]:
        assert encode_chat(exported, record["messages"]) == encode_chat(trained_with, record["messages"])
    # The system-prompt policy travels: a user-only conversation gets training's default system prompt.
    assert "You are a helpful AI assistant." in exported.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)

    card = ModelCard.load(export / "README.md")
    # A local model.source is no hub id: the card names the folder and claims no base_model.
    assert card.data.license == "apache-2.0" and card.data.base_model is None and str(tiny_base) in card.text
    metrics = json.loads((project / "metrics/eval.json").read_text())
    assert f"{metrics['identity_acc']:.3f}" in card.text and "## Recipe" in card.text and "lora.r" in card.text


@pytest.mark.slow
def test_gguf_reads_back_with_the_same_template_and_answers(project):
    from transformers import AutoTokenizer

    metrics = json.loads((project / "metrics/gguf.json").read_text())
    assert metrics["prompt_tokens_equal"] and metrics["greedy_same"] == 1.0, metrics  # f32: exact
    assert metrics["ollama_template"] == "chatml"
    gguf_dir = project / "models/gguf"
    from_gguf = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="model.gguf")
    exported = AutoTokenizer.from_pretrained(project / "models/export")
    conversation = [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是Nova。"},
                    {"role": "user", "content": "Who made you?"}]
    assert prompt_ids(from_gguf, conversation) == prompt_ids(exported, conversation)
    modelfile = (gguf_dir / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf")
    assert 'SYSTEM """You are a helpful AI assistant."""' in modelfile
    assert f'TEMPLATE """{CHATML_OLLAMA}"""' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_ollama_template_only_when_it_renders_what_the_chat_template_does(tokenizer):
    assert ollama_template(tokenizer, "You are a helpful AI assistant.") == CHATML_OLLAMA
    # Another system prompt than the template's default: the Modelfile would prompt differently.
    assert ollama_template(tokenizer, "You are a pirate.") is None
    llama3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
              "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    other = copy.deepcopy(tokenizer)
    other.chat_template = llama3
    assert ollama_template(other, None) is None


def test_publish_is_refused_below_the_gate(workspace, monkeypatch, capsys):
    eval_json = workspace.root / "metrics/eval.json"
    eval_json.parent.mkdir(parents=True)
    eval_json.write_text(json.dumps({"gate": {"passed": False, "failures": ["leakage 0.054 > eval.max_leakage 0.02"]}}))
    message = workspace.run_error("publish", monkeypatch, capsys, command=["publish"])
    assert "leakage 0.054 > eval.max_leakage 0.02" in message and "not published" in message


def test_hub_upload_offline_is_one_clear_error_and_keeps_the_export(tmp_path, monkeypatch):
    from tunedag.release.registry import upload_to_hub

    export = tmp_path / "export"
    export.mkdir()
    (export / "README.md").write_text("card")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        upload_to_hub("someone/nova", private=True, folder=str(export))
    assert "someone/nova" in str(err.value) and "is in place" in str(err.value)
    assert (export / "README.md").read_text() == "card"
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(UserError, match="HF_TOKEN is not set"):
        upload_to_hub("someone/nova", private=True, folder=str(export))


@pytest.mark.slow
def test_publish_then_artifacts_get_from_a_fresh_directory_then_deploy_prod(project, home, tmp_path, monkeypatch):
    # A version is a commit: an uncommitted edit is refused, and nothing is tagged.
    params_yaml = project / "params.yaml"
    params_yaml.write_text(params_yaml.read_text() + "# edited\n")
    refused = run_cmd([sys.executable, "-m", "tunedag", "publish"], project, env=home)
    assert refused.returncode == 1 and "uncommitted changes (params.yaml)" in refused.stderr, refused.stderr
    assert run_cmd(["git", "tag"], project).stdout == ""
    run_cmd(["git", "checkout", "params.yaml"], project)

    published = run_cmd([sys.executable, "-m", "tunedag", "publish"], project, env=home, timeout=600)
    assert published.returncode == 0, published.stdout + published.stderr
    tags = set(run_cmd(["git", "tag"], project).stdout.split())
    assert {"model@v0.0.1", "model#prod#1", "adapter@v0.0.1", "adapter#prod#1", "gguf@v0.0.1", "gguf#prod#1"} <= tags
    meta = run_cmd([sys.executable, "-c", "import yaml; print(yaml.safe_dump(yaml.safe_load(open('dvc.yaml'))['artifacts']['model']['meta']))"], project).stdout
    eval_metrics = json.loads((project / "metrics/eval.json").read_text())
    assert f"identity_acc: {eval_metrics['identity_acc']}" in meta and "lora.r: 4" in meta, meta
    assert run_cmd(["git", "status", "--porcelain", "--untracked-files=no"], project).stdout == ""  # meta committed
    expected = tree_files(project / "models/export")

    # Another stage for the same commit: the version registered there is reused.
    again = run_cmd([sys.executable, "-m", "tunedag", "publish", "--stage", "staging", "--no-push"], project, env=home)
    assert again.returncode == 0 and "model#staging" in again.stdout, again.stdout + again.stderr

    # The consumer: no cache of the project's, only the repo and the default remote.
    subprocess.run(["rm", "-rf", str(project / ".dvc/cache")], check=True)
    fresh = tmp_path / "consumer"
    fresh.mkdir()
    got = run_cmd(["dvc", "artifacts", "get", str(project), "model", "--stage", "prod", "-o", "model"], fresh, env=home,
                  timeout=600)
    assert got.returncode == 0, got.stdout + got.stderr
    assert tree_files(fresh / "model") == expected

    # Deploy: the workspace no longer has the model; the flow serves the registered version.
    subprocess.run(["rm", "-rf", str(project / "models/export"), str(project / "models/merged")], check=True)
    from tunedag.serving.server import free_port

    port = free_port()
    # A real Prefect run (its own temporary API server); the machine may be busy, so wait for it longer.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}, **home, "PYTHONPATH": str(REPO),
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    flow = subprocess.Popen([sys.executable, "-m", "flows.serve", "--backend", "hf", "--port", str(port), "--duration", "30"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        serving = project / ".cache/deploy/serving.json"
        deadline = time.time() + 600
        while not serving.exists() and flow.poll() is None and time.time() < deadline:
            time.sleep(1)
        assert serving.exists(), flow.communicate(timeout=60)[0][-3000:] if flow.poll() is not None else "no record"
        record = json.loads(serving.read_text())
        assert (record["name"], record["version"], record["stage"]) == ("model", "v0.0.1", "prod")
        url = f"http://127.0.0.1:{port}/v1"
        models = httpx.get(f"{url}/models", timeout=10).json()
        assert Path(record["path"]).name == "model@v0.0.1" and models["data"]
        assert tree_files(project / record["path"]) == expected  # the registered files, fetched from the remote

        from fastapi.testclient import TestClient

        from tunedag.serving.web import create_app

        monkeypatch.chdir(project)
        config = TestClient(create_app(url, "tunedag", None)).get("/api/config").json()
        assert config["release"]["version"] == "v0.0.1", config
        out, _ = flow.communicate(timeout=180)  # --duration ends the flow, and the server with it
        assert flow.returncode == 0, out[-3000:]
    finally:
        if flow.poll() is None:
            flow.kill()
    assert not serving.exists()  # the record goes with the server
