"""The shipped params.yaml is valid, and null training keys take the preset's recipe.
(Malformed params: tests/test_bad_input.py.)"""

import pytest
import yaml

from tests.conftest import REPO, merge_dicts
from tunedag.core.params import load_params, parse_params
from tunedag.model.presets import PRESETS


def shipped() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_shipped_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.model.preset == "smollm2-135m-instruct"
    assert params.lora.r > 0
    assert params.serve.host == "127.0.0.1" and params.model.trust_remote_code is False  # safe defaults


@pytest.mark.parametrize("preset", PRESETS)
def test_switching_preset_switches_the_recipe(preset):
    params = parse_params(merge_dicts(shipped(), {"model": {"preset": preset}}))
    recipe = PRESETS[preset].recipe
    assert params.train.lr == recipe.lr and params.train.max_steps == recipe.max_steps
    assert params.tokenize.max_length == recipe.max_length
    assert (params.lora.r, params.lora.alpha, params.lora.quant) == (recipe.r, recipe.alpha, recipe.quant)
    assert params.train.gradient_checkpointing is recipe.gradient_checkpointing
    assert params.train.batch_size * params.train.accumulative_counts == recipe.batch_size * recipe.accumulative_counts


def test_the_7b_recipe_is_not_the_135m_one():
    small = parse_params(shipped())
    big = parse_params(merge_dicts(shipped(), {"model": {"preset": "qwen2-7b-instruct"}}))
    assert big.lora.quant == "nf4" and small.lora.quant == "none"
    assert big.train.lr < small.train.lr and big.tokenize.max_length > small.tokenize.max_length


def test_a_value_in_params_yaml_overrides_the_recipe():
    params = parse_params(merge_dicts(shipped(), {"model": {"preset": "qwen2-7b-instruct"},
                                                   "lora": {"r": 8, "quant": "none"}, "train": {"lr": 0.01}}))
    assert (params.lora.r, params.lora.quant, params.train.lr) == (8, "none", 0.01)
    assert params.lora.alpha == PRESETS["qwen2-7b-instruct"].recipe.alpha  # the rest still the recipe's


def test_presets_command_prints_a_recipe_with_its_reason(capsys):
    from tunedag.cli import main

    main(["presets", "--recipe", "internlm2-chat-1.8b"])
    out = capsys.readouterr().out
    recipe = PRESETS["internlm2-chat-1.8b"].recipe
    assert f"lora.r: {recipe.r}" in out and f"train.lr: {recipe.lr}" in out and "XTuner" in out
