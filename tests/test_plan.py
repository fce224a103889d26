"""`tunedag plan` and the train stage's memory check: the verdict, and the changes it proposes fit."""

import shutil

import pytest
import yaml

from tests.conftest import REPO, merge_dicts
from tunedag.core.errors import UserError
from tunedag.core.params import parse_params
from tunedag.model.memory import CONFIG_DIR, load_config
from tunedag.model.plan import changes_that_fit, plan_for, require_fit, with_changes


def params_for(preset: str, **sections):
    raw = merge_dicts(yaml.safe_load((REPO / "params.yaml").read_text()), {"model": {"preset": preset}, **sections})
    return parse_params(raw)


def run_plan(argv, monkeypatch, capsys) -> tuple[int, str]:
    from tunedag.cli import main

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", *argv])
        raise SystemExit(0)
    return exit_info.value.code, capsys.readouterr().out


def test_the_7b_recipe_fits_24_gib_and_the_plan_says_so(monkeypatch, capsys):
    code, out = run_plan(["--preset", "qwen2-7b-instruct", "--gpu-gib", "24"], monkeypatch, capsys)
    expected = plan_for(params_for("qwen2-7b-instruct"), load_config("qwen2-7b-instruct"))
    assert code == 0 and f"FITS: {expected.total:.1f} GiB estimated of 24 GiB" in out
    assert "quant nf4" in out and "gradient checkpointing on" in out  # the recipe's, not params.yaml's nulls


def test_a_run_that_does_not_fit_exits_1_with_changes_that_do(monkeypatch, capsys):
    code, out = run_plan(["--preset", "qwen2-7b-instruct", "--gpu-gib", "16", "-S", "lora.quant=none",
                          "-S", "train.gradient_checkpointing=false"], monkeypatch, capsys)
    assert code == 1 and "DOES NOT FIT" in out
    params = params_for("qwen2-7b-instruct", lora={"quant": "none"}, train={"gradient_checkpointing": False})
    config = load_config("qwen2-7b-instruct")
    change = changes_that_fit(params, config, 16)
    assert change and all(f"-S {key}=" in out for key in change)
    assert plan_for(with_changes(params, change), config).fits(16)
    assert not plan_for(params, config).fits(16)


def test_the_train_stage_check_names_the_numbers_and_the_fix(tmp_path):
    shutil.copy(CONFIG_DIR / "qwen2-7b-instruct.json", tmp_path / "config.json")  # a models/base, config only
    fitting = params_for("qwen2-7b-instruct")
    require_fit(fitting, tmp_path, gpu_gib=24)  # the recipe fits: no error
    with pytest.raises(UserError) as err:
        require_fit(params_for("qwen2-7b-instruct", lora={"quant": "none"}), tmp_path, gpu_gib=16)
    message = str(err.value)
    assert str(tmp_path) in message and "16.0 GiB" in message and "Would fit: -S" in message
    assert "train.memory_check: false" in message
