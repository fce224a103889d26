"""Security defaults: loopback-only servers unless told, no remote code unless a param allows it,
checkpoints loaded with weights_only=True. (A pickle with code in it is refused in
tests/test_bad_input.py: the *-pickle-with-code cases, which also check nothing ran.)"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO
from tunedag.core.params import load_params
from tunedag.serving.server import free_port, server_command, spec_from_params

MODEL_CODE = '''
from pathlib import Path
Path("remote_code_ran.txt").write_text("the model's own code was imported")
from transformers import LlamaConfig
class CustomConfig(LlamaConfig):
    model_type = "custom-llama"
'''


def listening_addresses(pid: int) -> set[str]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {c.laddr.ip for p in procs for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def test_default_server_commands_bind_loopback():
    params = load_params(REPO / "params.yaml")
    for backend in ("vllm", "hf"):
        cmd = server_command(spec_from_params(params, backend=backend))
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1", cmd


def test_a_running_server_listens_on_loopback_only(workspace, tiny_base):
    shutil.copytree(tiny_base, workspace.root / "models/merged")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tunedag", "serve", "--backend", "hf", "--force", "--port", str(port)],
                            cwd=workspace.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        while not proc.stdout.readline().startswith("serving"):
            assert proc.poll() is None, "tunedag serve exited before serving"
        deadline = time.time() + 60
        while not (addresses := listening_addresses(proc.pid)) and time.time() < deadline:
            time.sleep(0.2)
        assert addresses == {"127.0.0.1"}
    finally:
        proc.kill()
        for child in psutil.Process().children(recursive=True):
            child.kill()


@pytest.fixture
def model_with_code(tiny_base, tmp_path) -> Path:
    """A model folder whose config points at its own Python code (auto_map), like internlm2."""
    folder = tmp_path / "custom_model"
    shutil.copytree(tiny_base, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text(MODEL_CODE)
    return folder


def test_remote_code_runs_only_when_the_param_allows_it(workspace, model_with_code, monkeypatch, capsys):
    workspace.set_params({"model": {"source": str(model_with_code)}})
    message = workspace.run_error("base", monkeypatch, capsys)
    assert "set model.trust_remote_code: true" in message
    assert not (workspace.root / "remote_code_ran.txt").exists()

    workspace.set_params({"model": {"source": str(model_with_code), "trust_remote_code": True}})
    try:
        workspace.run("base", monkeypatch)
    except SystemExit:
        pass  # the test model's code is only a marker; what matters is that it ran now
    assert (workspace.root / "remote_code_ran.txt").exists()


def test_every_torch_load_uses_weights_only():
    calls = []
    for path in [*REPO.glob("tunedag/**/*.py"), *REPO.glob("stages/**/*.py"), *REPO.glob("flows/**/*.py"), *REPO.glob("bench/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(node.func.value, "id", None) == "torch":
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                calls.append((path.name, node.lineno, bool(weights_only) and getattr(weights_only[0].value, "value", None) is True))
    assert calls, "no torch.load found: the scan is broken"
    assert [c for c in calls if not c[2]] == []
