import pytest
import yaml

from stages.common.errors import UserError
from stages.common.params import load_params, parse_params
from tests.conftest import REPO, merge_dicts

SHIPPED = yaml.safe_load((REPO / "params.yaml").read_text())


def test_shipped_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.model.preset == "smollm2-135m-instruct"
    assert params.lora.r > 0


@pytest.mark.parametrize(
    "raw, key, hint",
    [
        ({"lora": {"r": -1}}, "lora.r", "greater than or equal to 1"),
        ({"data": {"name": ""}}, "data.name", "at least 1 character"),
        ({"data": {"name": "   "}}, "data.name", "non-empty"),
        ({"lora": {"quant": "int3"}}, "lora.quant", "'none' or 'nf4'"),
        ({"train": {"lr": "fast"}}, "train.lr", "valid number"),
        ({"train": {"max_step": 10}}, "train.max_step", "unknown key"),
        ({"bogus": 1}, "bogus", "unknown key"),
        ({"convert": {"iter": "first"}}, "convert.iter", "'last' or a positive step number"),
        ({"merge": {"max_shard_size": "lots"}}, "merge.max_shard_size", "pattern"),
        ({"data": {"mode": "pretrain"}}, "data.mode 'pretrain'", "user_files"),
    ],
)
def test_bad_params_name_the_key(raw, key, hint):
    with pytest.raises(UserError) as err:
        parse_params(merge_dicts(SHIPPED, raw))
    message = str(err.value)
    assert key in message and hint in message
    assert "\n" not in message


def test_missing_key_is_named():
    raw = merge_dicts(SHIPPED, {})
    del raw["lora"]["r"]
    with pytest.raises(UserError, match=r"lora.r: missing"):
        parse_params(raw)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(UserError, match="must be a mapping"):
        load_params(path)
    path.write_text("lora: {r: [")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(path)
