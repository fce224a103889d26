"""tunedag.model.memory: parameter counts, the activation model against what autograd really saves,
and the estimate's behaviour (quantization, checkpointing, scaling, the fits verdict)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO
from tunedag.core.errors import UserError
from tunedag.model.memory import (
    CONFIG_DIR,
    GIB,
    MemoryPlan,
    count_parameters,
    estimate_training_memory,
    load_config,
)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def plan(config, **overrides) -> MemoryPlan:
    settings = dict(quant="none", dtype="bfloat16", lora_r=16, target_modules=ALL_LINEAR, batch_size=2,
                    max_length=512, gradient_checkpointing=False)
    return estimate_training_memory(config, **{**settings, **overrides})


def llama_style_params(config) -> tuple[int, int]:
    """(total, linear weights in the decoder) from the config alone, written out independently of the
    estimator: embeddings, per-layer q/k/v/o (+ Qwen2's q/k/v biases), SwiGLU, two norms, final norm."""
    h, i, n_layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q, kv = heads * head_dim, config.num_key_value_heads * head_dim
    linear = h * q + 2 * h * kv + q * h + 3 * h * i
    bias = q + 2 * kv if config.model_type == "qwen2" else 0
    per_layer = linear + bias + 2 * h
    embeddings = vocab * h * (1 if config.tie_word_embeddings else 2)
    return embeddings + n_layers * per_layer + h, n_layers * linear


@pytest.mark.parametrize("preset, published", [
    ("smollm2-135m-instruct", 134.5e6),  # HuggingFaceTB/SmolLM2-135M-Instruct: 134.5M
    ("qwen2-7b-instruct", 7.62e9),  # Qwen/Qwen2-7B-Instruct: 7.62B (Qwen2.5-7B's model card: 7.61B)
    ("llama-3.1-8b-instruct", 8.03e9),  # meta-llama/Llama-3.1-8B-Instruct: 8.03B
])
def test_parameter_counts_match_the_meta_model_and_the_published_totals(preset, published):
    from transformers import AutoModelForCausalLM

    config = load_config(preset)
    counts = count_parameters(config, lora_r=8, target_modules=["q_proj", "v_proj"])
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    total, linear = llama_style_params(config)
    assert counts.total == sum(p.numel() for p in meta.parameters()) == total
    assert counts.quantizable == linear  # lm_head and embeddings are not quantized
    assert counts.total == pytest.approx(published, rel=0.003)
    # LoRA on q and v: r x (in + out) per module and layer.
    q, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q
    h = config.hidden_size
    assert counts.lora == config.num_hidden_layers * 8 * ((h + q * head_dim) + (h + kv * head_dim))


def test_every_shipped_preset_config_loads_and_a_folder_does_too(tmp_path):
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    assert {"smollm2-135m-instruct", "qwen2.5-0.5b-instruct", "qwen2-7b-instruct", "qwen2.5-7b-instruct",
            "internlm2-chat-1.8b", "llama-3.1-8b-instruct"} <= set(names)
    for name in names:
        config = load_config(name)
        assert config.hidden_size > 0 and config.num_hidden_layers > 0
    internlm2 = load_config("internlm2-chat-1.8b")  # as the Llama the base stage converts it to
    assert internlm2.model_type == "llama" and internlm2.num_key_value_heads == 8
    assert load_config("llama-3.1-8b-instruct").rope_parameters["rope_type"] == "llama3"

    (tmp_path / "config.json").write_text((CONFIG_DIR / "qwen2.5-0.5b-instruct.json").read_text())
    assert load_config(tmp_path).to_dict() == load_config("qwen2.5-0.5b-instruct").to_dict()
    with pytest.raises(UserError, match="neither a preset"):
        load_config("no-such-model")


def _saved_bytes_per_layer(config_kwargs: dict, dtype: torch.dtype, targets: list[str], packed: bool) -> float:
    """What autograd really keeps for backward, per token and decoder layer: the bytes of the distinct
    storages the forward saves (parameters excluded), in a 2-layer model minus a 1-layer one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    batch, length = 2, 32
    input_ids = torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(length).repeat(batch, 1)
    if packed:  # two samples per row: transformers builds a block-diagonal mask for sdpa
        position_ids[:, length // 2:] -= length // 2
    saved = {}
    for layers in (1, 2):
        config = LlamaConfig(num_hidden_layers=layers, **config_kwargs)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        model.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"))
        model.train()
        saved[layers] = _saved_storage_bytes(model, input_ids, position_ids)
    return (saved[2] - saved[1]) / (batch * length)


def _saved_storage_bytes(model, input_ids, position_ids) -> int:
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.get_base_model().get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    return sum(storages.values())


@pytest.mark.parametrize("dtype, targets, packed, attention", [
    ("float32", ALL_LINEAR, True, "sdpa"),  # tunedag's CPU path: fp32 LoRA on an fp32 base, packed rows
    ("bfloat16", ALL_LINEAR, True, "sdpa"),  # fp32 adapters on a bf16 base: peft casts each input
    ("bfloat16", ALL_LINEAR, False, "flash_attention_2"),  # no mask: k/v stay at kv heads, as with flash
    ("float32", ["q_proj", "v_proj"], False, "flash_attention_2"),
])
def test_activation_model_matches_what_autograd_saves(dtype, targets, packed, attention):
    from transformers import LlamaConfig

    kwargs = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    measured = _saved_bytes_per_layer(kwargs, getattr(torch, dtype), targets, packed)
    estimated = [
        plan(LlamaConfig(num_hidden_layers=layers, **kwargs), dtype=dtype, lora_r=4, target_modules=targets,
             batch_size=2, max_length=32, lora_dropout=0.0, attention=attention).activations * GIB / (2 * 32)
        for layers in (1, 2)
    ]
    assert estimated[1] - estimated[0] == pytest.approx(measured, abs=0.5)


def test_nf4_weights_are_under_a_third_of_bf16():
    config = load_config("qwen2-7b-instruct")
    bf16, nf4 = plan(config), plan(config, quant="nf4", kbit_fp32_upcast=False)
    counts = nf4.params
    # The quantized decoder layers take under a third of their bf16 bytes. Embeddings and lm_head stay
    # bf16 (1.09B of Qwen2-7B's 7.62B params), so the whole model shrinks less: 2.7x, not 3x.
    unquantized = (counts.total - counts.quantizable + counts.largest_linear) * 2 / GIB
    assert nf4.weights - unquantized < counts.quantizable * 2 / GIB / 3
    assert bf16.weights / 3 < nf4.weights < bf16.weights / 2.5
    # peft's prepare_model_for_kbit_training casts the unquantized rest (embeddings, lm_head) to fp32.
    upcast = plan(config, quant="nf4")
    assert nf4.weights < upcast.weights < bf16.weights
    assert upcast.activations > nf4.activations  # ...and the residual stream with it


def test_gradient_checkpointing_lowers_activations():
    config = load_config("qwen2.5-0.5b-instruct")
    for quant in ("none", "nf4"):
        full, checkpointed = plan(config, quant=quant), plan(config, quant=quant, gradient_checkpointing=True)
        assert checkpointed.activations < full.activations / 4
        assert checkpointed.total < full.total
        assert (checkpointed.weights, checkpointed.lora, checkpointed.optimizer) == (full.weights, full.lora, full.optimizer)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_and_logits_grow_linearly_with_tokens(checkpointing):
    config = load_config("qwen2-7b-instruct")
    # flash_attention_2: no mask, whose T x T part makes sdpa's activations grow faster than T.
    base = plan(config, gradient_checkpointing=checkpointing, attention="flash_attention_2", batch_size=1, max_length=512)
    for batch, length in ((2, 512), (1, 1024), (4, 2048)):
        bigger = plan(config, gradient_checkpointing=checkpointing, attention="flash_attention_2",
                      batch_size=batch, max_length=length)
        factor = batch * length / 512
        assert bigger.activations == pytest.approx(base.activations * factor, rel=1e-9)
        assert bigger.logits == pytest.approx(base.logits * factor, rel=1e-9)
        assert bigger.weights == base.weights
    sdpa_short = plan(config, batch_size=1, max_length=512)
    sdpa_long = plan(config, batch_size=1, max_length=4096)
    assert sdpa_long.activations > 8 * sdpa_short.activations  # the per-layer mask grows with T^2


def test_fewer_label_positions_shrink_the_logits_only_when_the_output_layer_skips_the_rest():
    config = load_config("smollm2-135m-instruct")
    half = plan(config, label_fraction=0.5, gradient_checkpointing=True)
    full = plan(config, gradient_checkpointing=True)
    assert half.logits == pytest.approx(full.logits / 2)
    assert plan(config, label_fraction=0.5, label_positions_only=False, gradient_checkpointing=True).logits == full.logits


def test_fits_at_the_boundary_and_the_table_adds_up():
    result = plan(load_config("qwen2-7b-instruct"), quant="nf4", batch_size=1, max_length=1024, gradient_checkpointing=True)
    assert result.fits(result.total) and result.fits(result.total + 0.01)
    assert not result.fits(result.total - 0.01)
    assert not plan(load_config("qwen2-7b-instruct")).fits(24)  # bf16 7B LoRA: 14 GiB of weights, more of activations
    lines = result.table().splitlines()
    assert [line.split()[0] for line in lines] == [*MemoryPlan.PARTS, "total"]
    assert float(lines[-1].split()[1]) == pytest.approx(sum(float(line.split()[1]) for line in lines[:-1]), abs=0.05)


def test_bad_settings_are_user_errors(tmp_path):
    config = load_config("smollm2-135m-instruct")
    with pytest.raises(UserError, match="quant"):
        plan(config, quant="int8")
    with pytest.raises(UserError, match="target_modules"):
        plan(config, target_modules=["wqkv"])
    unknown = load_config("smollm2-135m-instruct").to_dict() | {"model_type": "internlm3"}
    (tmp_path / "config.json").write_text(json.dumps(unknown))
    with pytest.raises(UserError, match="internlm3"):  # remote code with no converter
        plan(load_config(tmp_path))


def test_gpu_bench_smoke_run_on_cpu():
    """bench/gpu_train.py --device cpu --tiny: its whole code path (random model, save, nf4 load,
    LoRA steps, estimate) in seconds."""
    began = time.perf_counter()
    run = subprocess.run([sys.executable, "bench/gpu_train.py", "--device", "cpu", "--tiny"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout[run.stdout.index("{"):])
    assert set(summary["runs"]) == {"none", "nf4"}
    for result in summary["runs"].values():
        assert result["tokens_per_s"] > 0 and result["estimate"]["total_gib"] > 0
        assert result["loss_first"] == pytest.approx(6.24, abs=0.5)  # ln(512): random weights, 512 tokens
    assert time.perf_counter() - began < 60
