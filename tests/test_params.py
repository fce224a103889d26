"""The shipped params.yaml is valid. (Malformed params: tests/test_bad_input.py.)"""

from tests.conftest import REPO
from tunedag.core.params import load_params


def test_shipped_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.model.preset == "smollm2-135m-instruct"
    assert params.lora.r > 0
    assert params.serve.host == "127.0.0.1" and params.model.trust_remote_code is False  # safe defaults
