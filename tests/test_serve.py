"""Serving: the real vLLM server (and the HF fallback) on a tiny model, called with the openai client.

One server per backend for the whole module (vLLM's start-up costs ~50-100 s on 2 cores): the
`server` fixture is parametrized over both backends, so every API test runs against each. It runs
in `lora` mode (tiny base + a random LoRA adapter, served under NAME), the path with more moving
parts; merged-model serving runs in the CLI tests below, in serve_check and in bench/serve.py.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from tests.conftest import build_tiny_llama
from tunedag.core.errors import UserError
from tunedag.serving.checks import PARITY_CONVERSATIONS, check_template_parity
from tunedag.serving.server import Server, ServerSpec, free_port

NAME = "tiny"
KEY = "test-key"
MAX_LEN = 256


@pytest.fixture(scope="module")
def tiny_model(tokenizer_dir, tmp_path_factory) -> Path:
    """Hidden 256 / 4 heads = head size 64: vLLM's CPU attention does not take conftest's 16."""
    return build_tiny_llama(tokenizer_dir, tmp_path_factory.mktemp("tiny_serve"), hidden_size=256)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter with random A and B (not the zero-B init), so it visibly changes answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("tiny_adapter")
    get_peft_model(model, config).save_pretrained(out)
    return out


def spec_for(model_dir: Path, backend: str, api_key: str | None = KEY, adapter_dir: Path | None = None) -> ServerSpec:
    return ServerSpec(model_dir=model_dir, adapter_dir=adapter_dir, backend=backend, host="127.0.0.1", port=free_port(),
                      api_key=api_key, served_model_name=NAME, max_model_len=MAX_LEN, kv_cache_gib=0.25,
                      startup_timeout_s=400, threads=2)


@pytest.fixture(scope="module", params=["vllm", "hf"])
def server(request, tiny_model, tiny_adapter, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / f"{request.param}.log"
    with Server(spec_for(tiny_model, request.param, adapter_dir=tiny_adapter), log=log) as running:
        yield running
    assert running.proc.poll() is not None, "the server outlived its fixture"


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.spec.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, content="Hello there", **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 12, **kwargs}
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], **kwargs)


def test_models_endpoint_names_the_backend(client, server):
    models = {m.id: m for m in client.models.list().data}
    # vLLM also lists the bare base model; the fallback serves the adapted one only.
    assert set(models) == ({NAME, f"{NAME}-base"} if server.spec.backend == "vllm" else {NAME})
    # The fallback says so where clients look.
    assert ("fallback" in models[NAME].owned_by) == (server.spec.backend == "hf")


def test_served_model_is_base_plus_adapter(client, tiny_model, tiny_adapter):
    """Greedy answers equal HF + peft's in-process; and the adapter matters (base alone differs)."""
    from peft import PeftModel

    from tunedag.model.generation import chat_generate
    from tunedag.model.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    prompts = ["Hello there", "What is the capital of France?"]
    base = [a for a, _ in chat_generate(load_model(tiny_model), tokenizer, prompts, 8, batch_size=1)]
    tuned = [a for a, _ in chat_generate(PeftModel.from_pretrained(load_model(tiny_model), tiny_adapter), tokenizer, prompts, 8, batch_size=1)]
    assert tuned != base, "the random adapter should change the answers"
    served = [ask(client, p, max_tokens=8).choices[0].message.content.strip() for p in prompts]
    assert served == tuned


def test_chat_completion_and_streaming_agree(client):
    whole = ask(client, max_tokens=10)
    assert whole.model == NAME
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert 1 <= whole.usage.completion_tokens <= 10
    pieces = [c.choices[0].delta.content for c in ask(client, max_tokens=10, stream=True)
              if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2, "the answer did not arrive in pieces"
    assert "".join(pieces) == whole.choices[0].message.content


def test_template_parity(server, tokenizer):
    assert check_template_parity(server.spec.url, NAME, tokenizer) == len(PARITY_CONVERSATIONS)


def test_template_parity_catches_a_different_system_prompt(server, tokenizer_dir):
    """The check must fail when training used another system-prompt policy than the served template."""
    from transformers import AutoTokenizer

    from tunedag.data.chat import with_default_system_prompt

    other = AutoTokenizer.from_pretrained(tokenizer_dir)
    other.chat_template = with_default_system_prompt(other.chat_template, "You are someone else.")
    with pytest.raises(UserError, match="template parity FAILED"):
        check_template_parity(server.spec.url, NAME, other)


def test_bad_requests_get_http_errors_and_the_server_keeps_serving(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as too_long:
        ask(client, "hello " * (MAX_LEN + 10))
    assert too_long.value.status_code == 400
    keyless = openai.OpenAI(base_url=f"{server.spec.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        ask(keyless)
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as no_key:
        urllib.request.urlopen(f"{server.spec.url}/v1/models")
    assert no_key.value.code == 401
    assert ask(client).choices[0].message.content is not None  # still serving


def test_chat_cli_multi_turn_against_the_server(client, server):
    from tunedag.serving.chat import chat_loop, server_generate

    generate = server_generate(f"{server.spec.url}/v1", NAME, KEY, temperature=0, max_tokens=8)
    seen = []

    def recording(messages):
        seen.append(list(messages))
        yield from generate(messages)

    inputs = iter(["Hello", "And again", "/reset", "Fresh start", "/exit"])
    out = io.StringIO()
    chat_loop(recording, None, read=lambda prompt: next(inputs), write=out)
    assert out.getvalue().count("bot> ") == 3
    assert [len(m) for m in seen] == [1, 3, 1]  # the 2nd turn carries the history, /reset drops it
    expected = client.chat.completions.create(model=NAME, messages=seen[1], temperature=0, max_tokens=8)
    assert seen[1][1]["role"] == "assistant"
    assert expected.choices[0].message.content.strip() in out.getvalue()


# ---------------------------------------------------------------------------------------------
# No server needed, or a fast fallback one


def test_chat_cli_local_model_equals_fallback_server(tiny_model):
    """`--model-dir` (HF generate in-process) answers like the HF server does, greedy."""
    from tunedag.serving.chat import local_generate

    local = "".join(local_generate(str(tiny_model), temperature=0, max_tokens=8, threads=1)(
        [{"role": "user", "content": "Hello there"}]))
    with Server(spec_for(tiny_model, "hf")) as fallback:
        remote = openai.OpenAI(base_url=f"{fallback.spec.url}/v1", api_key=KEY, max_retries=0)
        assert ask(remote, max_tokens=8).choices[0].message.content == local


def _workspace_gate(root: Path, passed: bool) -> None:
    (root / "metrics").mkdir(exist_ok=True)
    gate = {"passed": passed, "failures": [] if passed else ["leakage 0.125 > eval.max_leakage 0.02"]}
    (root / "metrics" / "eval.json").write_text(json.dumps({"gate": gate}))


def test_serve_refuses_a_model_that_failed_the_gate(workspace, monkeypatch, capsys):
    _workspace_gate(workspace.root, passed=False)
    err = workspace.run_error("serve", monkeypatch, capsys, command=["serve", "--backend", "hf"])
    assert "failed the evaluation gate" in err and "leakage" in err and "--force" in err
    # The check stage records the refusal instead of failing the DAG, and starts no server.
    monkeypatch.setattr(sys, "argv", ["stages.serve_check"])
    workspace.run("serve_check", monkeypatch)
    record = json.loads((workspace.root / "metrics" / "serve.json").read_text())
    assert record["served"] is False and "leakage 0.125" in record["refused"]


def test_serve_forced_starts_prints_url_and_stops_on_sigterm(workspace, tiny_model):
    """`tunedag serve           --force` on the fallback: serves, then SIGTERM stops it and its children."""
    import shutil

    shutil.rmtree(workspace.root / "models" / "base")
    shutil.copytree(tiny_model, workspace.root / "models" / "merged")
    _workspace_gate(workspace.root, passed=False)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "tunedag", "serve", "--backend", "hf", "--force", "--port", str(port)],
                            cwd=workspace.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("serving"):  # the server child prints its own line first
            line = proc.stdout.readline()
            assert line, "tunedag serve exited before serving"
        assert f"http://127.0.0.1:{port}/v1" in line and "FALLBACK" in line, line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert client.models.list().data[0].id == "tunedag"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    time.sleep(0.5)
    with pytest.raises(openai.APIConnectionError):  # the server child is gone too
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=5).models.list()


def test_serve_check_stage_fails_loudly_when_the_model_does_not_know_its_name(workspace, tiny_model, monkeypatch, capsys):
    """The whole stage on the fallback backend: starts, passes parity, then rejects the random model's answer."""
    import shutil

    shutil.copytree(tiny_model, workspace.root / "models" / "merged")
    shutil.rmtree(workspace.root / "models" / "base")
    shutil.copytree(tiny_model, workspace.root / "models" / "base")
    _workspace_gate(workspace.root, passed=True)
    workspace.set_params({"serve": {"backend": "hf", "max_model_len": MAX_LEN, "startup_timeout_s": 120}})
    monkeypatch.setattr(sys, "argv", ["stages.serve_check"])
    err = workspace.run_error("serve_check", monkeypatch, capsys)
    assert "does not name 'Nova'" in err
    assert not (workspace.root / "metrics" / "serve.json").exists()
