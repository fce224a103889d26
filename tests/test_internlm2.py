"""InternLM2 -> Llama conversion (tunedag/model/internlm2.py) against InternLM2's original code.

tests/fixtures/internlm2_tiny_reference.json holds logits and token ids computed once by the
original modeling_internlm2.py and tokenization_internlm2*.py (transformers 4.41, trust_remote_code;
its "source" says which files) on weights and a sentencepiece model that tests/tiny_models.py
rebuilds here bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny_models import (
    TOKENIZER_CONVERSATIONS,
    TOKENIZER_TEXTS,
    build_internlm2_sentencepiece,
    build_tiny_internlm2,
    tiny_internlm2_state_dict,
    tokenizer_json_digest,
)
from tunedag.model import internlm2
from tunedag.model.internlm2 import (
    llama_config_from_internlm2,
    llama_state_dict_from_internlm2,
    load_internlm2_tokenizer,
)
from tunedag.model.sources import load_source

REFERENCE = json.loads((Path(__file__).parent / "fixtures/internlm2_tiny_reference.json").read_text())
ATOL = 1e-4  # float32, sdpa vs the original's eager attention: observed ~2e-6


@pytest.fixture(scope="module")
def tiny_internlm2(tokenizer_dir, tmp_path_factory) -> Path:
    return build_tiny_internlm2(tokenizer_dir, tmp_path_factory.mktemp("tiny_internlm2"))


def case_config(case: str) -> dict:
    return {**REFERENCE["config"], **REFERENCE["cases"][case]["overrides"]}


def llama_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([REFERENCE["input_ids"]])).logits[0].double()


def converted(config: dict, state_dict_fn=llama_state_dict_from_internlm2):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config_from_internlm2(config)).eval()
    state = tiny_internlm2_state_dict(config, zero_rows=(REFERENCE["newline_id"],))
    model.load_state_dict(state_dict_fn(state, config), strict=True)
    return model


def max_error(logits: torch.Tensor, case: str) -> float:
    expected = torch.tensor(REFERENCE["cases"][case]["probe_logits"], dtype=torch.float64)
    return (logits[:, REFERENCE["probe_ids"]] - expected).abs().max().item()


def assert_matches(logits: torch.Tensor, case: str) -> None:
    ref = REFERENCE["cases"][case]
    assert max_error(logits, case) < ATOL
    assert logits.argmax(-1).tolist() == ref["argmax"]
    assert logits.sum().item() == pytest.approx(ref["sum"], abs=0.05)  # 51 x 49152 values
    assert logits.abs().sum().item() == pytest.approx(ref["abs_sum"], abs=0.05)
    assert (logits.max().item(), logits.min().item()) == pytest.approx((ref["max"], ref["min"]), abs=ATOL)


def test_fixture_matches_the_test_tokenizer(tiny_internlm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_internlm2)
    assert json.loads((tiny_internlm2 / "config.json").read_text()) == REFERENCE["config"]
    assert tokenizer.convert_tokens_to_ids("Ċ") == REFERENCE["newline_id"]
    assert tokenizer(REFERENCE["text"], add_special_tokens=False)["input_ids"] == REFERENCE["input_ids"]


@pytest.mark.parametrize("case", ["default", "dynamic_ntk", "bias"])
def test_converted_logits_equal_the_original_architecture(case):
    """default: internlm2-chat-1_8b's settings; dynamic_ntk: the input runs past max_position_embeddings,
    so the rope base is rescaled; bias: wqkv/wo biases split like the weights."""
    assert_matches(llama_logits(converted(case_config(case))), case)


def test_a_naive_wqkv_split_does_not_match():
    """Negative control: q/k/v as three contiguous blocks (ignoring the per-group interleave)."""

    def naive(state, config):
        out = llama_state_dict_from_internlm2(state, config)
        for key, tensor in state.items():
            if key.endswith("attention.wqkv.weight"):
                prefix = key.replace("attention.wqkv.weight", "self_attn.")
                kv_rows = (tensor.shape[0] - config["hidden_size"]) // 2
                q, k, v = torch.split(tensor, [config["hidden_size"], kv_rows, kv_rows])
                out |= {prefix + "q_proj.weight": q, prefix + "k_proj.weight": k, prefix + "v_proj.weight": v}
        return out

    error = max_error(llama_logits(converted(case_config("default"), naive)), "default")
    assert error > 100 * ATOL, error


def test_load_source_converts_an_internlm2_folder(tiny_internlm2, capsys):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, tokenizer = load_source(str(tiny_internlm2), None, False)
    assert type(model) is LlamaForCausalLM and model.config.model_type == "llama"
    assert model.dtype == torch.float32
    assert "converting it to the Llama layout" in capsys.readouterr().out
    assert_matches(llama_logits(model), "default")
    # The InternLM2 chat template, rendered as the folder's own tokenizer renders it.
    original = AutoTokenizer.from_pretrained(tiny_internlm2)
    conversation = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am me."}]
    assert tokenizer.chat_template == original.chat_template and "{{ bos_token }}" in tokenizer.chat_template
    for prompt in (True, False):
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
        assert text == original.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
        assert text.startswith("<|endoftext|><|im_start|>user\nWho are you?<|im_end|>\n")
    assert model.generation_config.eos_token_id == json.loads((tiny_internlm2 / "generation_config.json").read_text())["eos_token_id"]


def test_converted_model_reloads_without_remote_code(tiny_internlm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_source(str(tiny_internlm2), None, False)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert not list(tmp_path.glob("*.py"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False)
    assert_matches(llama_logits(reloaded.eval()), "default")


def test_sharded_and_bin_checkpoints_convert_the_same(tiny_internlm2, tmp_path):
    """The hub has sharded safetensors (model.safetensors.index.json) and, in older repos, .bin files."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_internlm2 / "model.safetensors"))
    keys = sorted(state)
    for kind in ("sharded", "bin"):
        folder = tmp_path / kind
        folder.mkdir()
        (folder / "config.json").write_text((tiny_internlm2 / "config.json").read_text())
        halves = {"a": keys[: len(keys) // 2], "b": keys[len(keys) // 2 :]}
        if kind == "sharded":
            for name, part in halves.items():
                save_file({k: state[k].to(torch.bfloat16) for k in part}, str(folder / f"model-{name}.safetensors"))
            weight_map = {k: f"model-{name}.safetensors" for name, part in halves.items() for k in part}
        else:
            for name, part in halves.items():
                torch.save({k: state[k] for k in part}, folder / f"pytorch_model-{name}.bin")
            weight_map = {k: f"pytorch_model-{name}.bin" for name, part in halves.items() for k in part}
        index = "model.safetensors.index.json" if kind == "sharded" else "pytorch_model.bin.index.json"
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        model = internlm2.load_internlm2_as_llama(folder)
        assert model.dtype == torch.float32  # bf16 shards are upcast
        if kind == "bin":
            assert_matches(llama_logits(model), "default")
        else:  # bf16 weights: close, not exact
            assert max_error(llama_logits(model), "default") < 0.5


def test_unknown_weights_are_refused():
    config = case_config("default")
    with pytest.raises(ValueError, match="unexpected InternLM2 weight 'model.layers.0.attention.extra.weight'"):
        llama_state_dict_from_internlm2({"model.layers.0.attention.extra.weight": torch.zeros(1)}, config)


def test_config_mapping_keeps_the_real_models_settings():
    from tests.tiny_models import INTERNLM2_CHAT_1_8B

    config = llama_config_from_internlm2(INTERNLM2_CHAT_1_8B)
    assert config.rope_parameters["rope_type"] == "dynamic" and config.rope_parameters["factor"] == 2.0
    assert config.rope_parameters["rope_theta"] == 1e6 and config.rms_norm_eps == 1e-5
    assert (config.head_dim, config.num_key_value_heads, config.attention_bias) == (128, 8, False)
    assert not config.tie_word_embeddings and config.max_position_embeddings == 32768


# ---------------------------------------------------------------------------------------------
# Tokenizer: InternLM2's sentencepiece tokenizer as a standard fast tokenizer


@pytest.fixture(scope="module")
def internlm2_tokenizer_dir(tmp_path_factory) -> Path:
    return build_internlm2_sentencepiece(tmp_path_factory.mktemp("internlm2_tokenizer"))


def test_tokenizer_is_the_original_fast_tokenizer(internlm2_tokenizer_dir, tmp_path):
    """Same tokenizer.json content as the remote InternLM2TokenizerFast built, same ids and texts;
    and after save_pretrained it reloads with AutoTokenizer and no remote code."""
    from transformers import AutoTokenizer

    ref = REFERENCE["tokenizer"]["fast"]
    built = load_internlm2_tokenizer(internlm2_tokenizer_dir)
    assert tokenizer_json_digest(built.backend_tokenizer.to_str()) == ref["tokenizer_json_sha256"]
    built.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "auto_map" not in saved and not saved["tokenizer_class"].startswith("InternLM2")
    reloaded = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=False)
    for tokenizer in (built, reloaded):
        assert len(tokenizer) == ref["len"]
        assert {t: tokenizer.convert_tokens_to_ids(t) for t in ref["special_ids"]} == ref["special_ids"]
        assert [tokenizer(text)["input_ids"] for text in TOKENIZER_TEXTS] == ref["encode"]
        assert [tokenizer.decode(tokenizer(text)["input_ids"]) for text in TOKENIZER_TEXTS] == ref["decode"]
        rendered = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in TOKENIZER_CONVERSATIONS]
        assert rendered == ref["chat_text"]
        assert [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered] == ref["chat_ids"]


def test_chat_ids_also_match_the_original_slow_tokenizer(internlm2_tokenizer_dir):
    """The slow InternLM2Tokenizer differs from its fast twin only on edge cases (a literal
    "[UNUSED_TOKEN_n]" in text, a leading space in decode); on chat-rendered text the three agree."""
    slow = REFERENCE["tokenizer"]["slow"]
    built = load_internlm2_tokenizer(internlm2_tokenizer_dir)
    rendered = [built.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in TOKENIZER_CONVERSATIONS]
    assert rendered == slow["chat_text"]
    assert [built(text, add_special_tokens=False)["input_ids"] for text in rendered] == slow["chat_ids"]


def test_load_source_needs_no_remote_code_for_an_internlm2_tokenizer(tiny_internlm2, internlm2_tokenizer_dir, tmp_path):
    """With InternLM2's own tokenizer files (tokenizer.model, tokenizer_config.json naming
    InternLM2Tokenizer), load_source builds the standard tokenizer: trust_remote_code False works."""
    import shutil

    folder = tmp_path / "internlm2_with_its_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_internlm2 / name, folder / name)
    for path in internlm2_tokenizer_dir.iterdir():
        shutil.copy(path, folder / path.name)
    (folder / "tokenization_internlm2.py").write_text("raise SystemExit('remote code ran')\n")
    _, tokenizer = load_source(str(folder), None, False)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == REFERENCE["tokenizer"]["fast"]["special_ids"]["<|im_start|>"]
    assert tokenizer("Who are you?")["input_ids"] == REFERENCE["tokenizer"]["fast"]["encode"][0]


def test_base_stage_materializes_the_converted_model(workspace, tiny_internlm2, monkeypatch):
    workspace.set_params({"model": {"source": str(tiny_internlm2)}, "chat": {"system_prompt": "You are terse."}})
    workspace.run("base", monkeypatch)
    base = workspace.root / "models/base"
    config = json.loads((base / "config.json").read_text())
    assert config["model_type"] == "llama" and config["rope_parameters"]["rope_type"] == "dynamic"
    template = (base / "chat_template.jinja").read_text()
    assert '"You are terse."' in template and "{{ bos_token }}" in template
    from transformers import AutoModelForCausalLM

    assert_matches(llama_logits(AutoModelForCausalLM.from_pretrained(base).eval()), "default")


def test_hub_id_is_downloaded_at_its_revision_without_code(tiny_internlm2, monkeypatch, tmp_path):
    """A hub id whose config.json says internlm2: the snapshot at model.revision, no *.py files."""
    import huggingface_hub

    calls = []

    def hf_hub_download(repo_id, filename, revision=None, **kwargs):
        calls.append(("file", repo_id, filename, revision))
        return str(tiny_internlm2 / filename)

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append(("snapshot", repo_id, revision, tuple(allow_patterns)))
        return str(tiny_internlm2)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model, _ = load_source("internlm/internlm2-chat-1_8b", "abc123", False)
    assert_matches(llama_logits(model), "default")
    assert calls[0] == ("file", "internlm/internlm2-chat-1_8b", "config.json", "abc123")
    assert calls[1][:3] == ("snapshot", "internlm/internlm2-chat-1_8b", "abc123") and len(calls) == 2
    assert not any(pattern.endswith(".py") or pattern == "*" for pattern in calls[1][3])
