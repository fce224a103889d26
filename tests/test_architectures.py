"""The seed tutorials' two architectures, at tiny size on CPU, through the pipeline: random-weight
models built from the real Qwen2-7B-Instruct and InternLM2-Chat-1.8B configs (scaled down), with
each preset's own recipe (QLoRA nf4, gradient checkpointing), through base → generate → tokenize →
train → convert → merge → evaluate, then served by vLLM, whose per-token log-probabilities of a
prompt must equal the merged model's in transformers: the same architecture on both sides."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import pytest
import requests
import torch

from tests.conftest import Workspace
from tests.tiny_models import build_tiny_internlm2, build_tiny_qwen2


@pytest.fixture(scope="module")
def tiny_sources(tokenizer_dir, tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("tiny_sources")
    return {
        "qwen2-7b-instruct": build_tiny_qwen2(tokenizer_dir, root / "qwen2"),
        "internlm2-chat-1.8b": build_tiny_internlm2(tokenizer_dir, root / "internlm2", hidden_size=256),
    }


def prompt_logprobs_from_vllm(url: str, model: str, ids: list[int]) -> list[float]:
    reply = requests.post(f"{url}/v1/completions", timeout=120, json={
        "model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
    reply.raise_for_status()
    rows = reply.json()["choices"][0]["prompt_logprobs"]
    return [row[str(token)]["logprob"] for token, row in zip(ids[1:], rows[1:])]


def prompt_logprobs_from_transformers(model_dir, ids: list[int]) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1].log_softmax(-1)
    return logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


@pytest.mark.parametrize("preset", ["qwen2-7b-instruct", "internlm2-chat-1.8b"])
def test_the_seed_architecture_runs_the_pipeline_and_vllm_serves_it_exactly(preset, tiny_sources, tiny_base, tmp_path, monkeypatch):
    from tunedag.model.presets import PRESETS
    from tunedag.serving.checks import check_template_parity
    from tunedag.serving.server import Server, free_port, spec_from_params

    recipe = PRESETS[preset].recipe
    workspace = Workspace(tmp_path, tiny_base)
    shutil.rmtree(tmp_path / "models")  # the base stage makes models/base from the source below
    # TINY_PARAMS sizes the data and the run; the rest (nf4, gradient checkpointing, r, lr, row
    # length, accumulation) stays the preset's recipe, so its code paths run as on a GPU.
    workspace.set_params({
        "model": {"preset": preset, "source": str(tiny_sources[preset]), "trust_remote_code": False},
        "tokenize": {"max_length": None}, "lora": {"r": None, "alpha": None},
        "train": {"max_steps": 2, "save_steps": 2, "batch_size": None, "accumulative_counts": None},
    })
    assert recipe.quant == "nf4" and recipe.gradient_checkpointing
    for stage in ("base", "generate", "tokenize", "train", "convert", "merge", "evaluate"):
        workspace.run(stage, monkeypatch)

    config = json.loads((tmp_path / "models/base/config.json").read_text())
    assert config["architectures"] == [{"qwen2-7b-instruct": "Qwen2ForCausalLM", "internlm2-chat-1.8b": "LlamaForCausalLM"}[preset]]
    assert "auto_map" not in config  # no remote code downstream of base
    train_params = (tmp_path / "metrics/train/params.yaml").read_text()
    assert "lora.quant: nf4" in train_params and "train.gradient_checkpointing: true" in train_params
    adapter = json.loads((tmp_path / "models/adapter/adapter_config.json").read_text())
    assert adapter["r"] == recipe.r and adapter["lora_alpha"] == recipe.alpha
    assert "identity_acc" in json.loads((tmp_path / "metrics/eval.json").read_text())

    from tunedag.core.params import load_params
    from tunedag.data.chat import encode_chat
    from tunedag.model.loading import load_tokenizer

    tokenizer = load_tokenizer(tmp_path / "models/base")
    ids, _ = encode_chat(tokenizer, [{"role": "user", "content": "Who are you? 你是谁？"},
                                     {"role": "assistant", "content": "I am Nova. 我是Nova。"}])
    expected = prompt_logprobs_from_transformers(tmp_path / "models/merged", ids)
    spec = spec_from_params(load_params(tmp_path / "params.yaml"), mode="merged", backend="vllm", port=free_port())
    spec = dataclasses.replace(spec, model_dir=tmp_path / "models/merged", max_model_len=256)
    monkeypatch.setattr(sys, "argv", ["pytest"])
    with Server(spec, log=tmp_path / "vllm.log"):
        assert check_template_parity(spec.url, spec.served_model_name, tokenizer) > 0
        served = prompt_logprobs_from_vllm(spec.url, spec.served_model_name, ids)
    assert served == pytest.approx(expected, abs=2e-3)
