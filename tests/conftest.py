"""Shared fixtures: the real SmolLM2 tokenizer (from the embedded GGUF) and a tiny random-weight
Llama built on it, laid out like models/base so stages run on it in seconds."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from tunedag.serving.server import free_port

REPO = Path(__file__).resolve().parents[1]
UP_TO_DATE = "Data and pipelines are up to date"  # what `dvc status` / `dvc repro` print
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The real SmolLM2 tokenizer and chat template, with the default system-prompt policy."""
    from transformers import AutoTokenizer

    from tunedag.core.params import load_params
    from tunedag.data.chat import with_default_system_prompt
    from tunedag.model.sources import embedded_gguf

    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.chat_template = with_default_system_prompt(tokenizer.chat_template, load_params(REPO / "params.yaml").chat.system_prompt)
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def build_tiny_llama(tokenizer_dir: Path, out: Path, hidden_size: int = 64) -> Path:
    """A 2-layer Llama with random weights and the real tokenizer, saved like models/base."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=im_end, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Random weights fall into answering "\n" forever, which decodes to an empty answer; with the
        # newline's (tied) embedding at zero the model answers in words, so replay and evaluation
        # have general conversations to work with.
        model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("Ċ")] = 0
    model.generation_config.eos_token_id = [im_end]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_base(tokenizer_dir, tmp_path_factory) -> Path:
    """Hidden 64 (head size 16): a training step takes about a second."""
    return build_tiny_llama(tokenizer_dir, tmp_path_factory.mktemp("tiny_base"))


TINY_PARAMS = {
    "threads": 1,
    "data": {"identity_samples": 24, "val_identity_samples": 8, "replay_ratio": 0.0, "replay_max_new_tokens": 8},
    "tokenize": {"max_length": 128, "pack": True},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
    "train": {"max_steps": 6, "batch_size": 2, "save_steps": 3, "evaluation_freq": 100,
              "evaluation_inputs": ["Who are you?"], "evaluation_max_new_tokens": 4},
    "eval": {"max_new_tokens": 4},
}


def merge_dicts(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge_dicts(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class Workspace:
    """A project directory holding params.yaml and models/base = the tiny model."""

    def __init__(self, root: Path, tiny_base: Path):
        self.root = root
        shutil.copytree(tiny_base, root / "models" / "base")
        self.params = yaml.safe_load((REPO / "params.yaml").read_text())
        self.set_params(TINY_PARAMS)

    @classmethod
    def at(cls, root: Path) -> "Workspace":
        """An existing workspace (e.g. a copy of a prepared one)."""
        workspace = cls.__new__(cls)
        workspace.root = root
        workspace.params = yaml.safe_load((root / "params.yaml").read_text())
        return workspace

    def copy_to(self, root: Path) -> "Workspace":
        shutil.copytree(self.root, root)
        return Workspace.at(root)

    def set_params(self, extra: dict) -> None:
        self.params = merge_dicts(self.params, extra)
        (self.root / "params.yaml").write_text(yaml.safe_dump(self.params, allow_unicode=True))

    def run(self, stage: str, monkeypatch) -> None:
        """Run a stage's main() in this process (imports are paid once per test session)."""
        monkeypatch.chdir(self.root)
        module = importlib.import_module(f"stages.{stage}")
        module.main()

    def command(self, argv: list[str], monkeypatch) -> None:
        """Run `tunedag <argv>` in this process."""
        from tunedag.cli import main

        monkeypatch.chdir(self.root)
        main(argv)

    def run_error(self, stage: str, monkeypatch, capsys, command: list[str] | None = None) -> str:
        """Run a stage, or the `tunedag` `command` named `stage`, that must fail with a user error:
        return its stderr message."""
        capsys.readouterr()  # drop what earlier stages printed
        with pytest.raises(SystemExit) as exit_info:
            self.command(command, monkeypatch) if command else self.run(stage, monkeypatch)
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        message = err.strip().splitlines()[-1]  # one paragraph, last, after any progress output
        assert message.startswith(f"error [{stage}]:"), err
        return message

    def subprocess(self, stage: str, **kwargs) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=self.root, env=env, **kwargs)


@pytest.fixture
def workspace(tmp_path, tiny_base) -> Workspace:
    return Workspace(tmp_path, tiny_base)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tiny_base) -> Workspace:
    """A workspace where generate, tokenize, train and convert have run (work/iter_3 and iter_6).
    Shared: tests take a copy (prepared.copy_to)."""
    workspace = Workspace(tmp_path_factory.mktemp("prepared"), tiny_base)
    with pytest.MonkeyPatch.context() as monkeypatch:
        for stage in ("generate", "tokenize", "train", "convert"):
            workspace.run(stage, monkeypatch)
    return workspace


def run_cmd(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run a command (dvc, git, python -m ...) with this venv's tools first on PATH, capturing output;
    `env`: variables to add."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)


def make_project(root: Path, params: dict) -> Path:
    """A copy of this repo's working tree (committed or not) as a fresh git repo with `params` merged
    into params.yaml: what a teammate gets from `git clone`."""
    files = run_cmd(["git", "ls-files", "--cached", "--others", "--exclude-standard"], REPO).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    merged = merge_dicts(yaml.safe_load((root / "params.yaml").read_text()), params)
    (root / "params.yaml").write_text(yaml.safe_dump(merged, allow_unicode=True, sort_keys=False))
    git_commit(root, "init", init=True)
    return root


# The project the pipeline-level tests share: the tiny model through every stage.
PIPELINE_PARAMS = merge_dicts(TINY_PARAMS, {
    # General conversations from a user file: the tiny random model's own replay answers are noise.
    "data": {"user_files": ["user_data/general.jsonl"], "user_val_fraction": 0.25},
    # Mechanics, not quality: a 6-step random-weight model passes a gate opened wide.
    "eval": {"min_identity_acc": 0.0, "max_leakage": 1.0, "max_ppl_drift": 1000.0},
    "gguf": {"outtype": "f32", "check_prompts": 4, "check_max_new_tokens": 8},
})


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_base) -> Path:
    """A project after `dvc repro gguf` (every stage with cached outputs, each a real process; the
    serve_check stage has none) on the tiny model, committed. Built once per session: tests that
    change it take a copy (copy_project)."""
    root = make_project(tmp_path_factory.mktemp("pipeline") / "repo",
                        merge_dicts(PIPELINE_PARAMS, {"model": {"source": str(tiny_base)}}))
    (root / "user_data/general.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n"
        for i in range(16)))
    home = tmp_path_factory.mktemp("pipeline_home")  # nothing of the user's (~/.config/dvc, the default remote)
    repro = run_cmd(["dvc", "repro", "gguf"], root, env={"HOME": str(home)}, timeout=1800)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    git_commit(root, "trained")
    return root


def copy_project(src: Path, dest: Path) -> Path:
    """A copy of a project with its git history, DVC cache and workspace."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """A finished command that must have succeeded; its output tail is the failure message."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def git_commit(root: Path, message: str, init: bool = False) -> None:
    for cmd in ([["git", "init", "-q"]] if init else []) + [
            ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message]]:
        result = run_cmd(cmd, root)
        assert result.returncode == 0, result.stdout + result.stderr


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- a real `prefect server start` (tests/test_flows.py, tests/test_workers.py) -------------------

def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def api_post(api: str, path: str, body: dict):
    # Like Prefect's own client, retry a 503: a busy server's SQLite answers it while locked.
    for attempt in range(5):
        response = httpx.post(f"{api}{path}", json=body, timeout=10)
        if response.status_code != 503:
            break
        time.sleep(2 ** attempt)
    response.raise_for_status()
    return response.json()


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    """scripts/prefect-server.sh on a free port, with its database in a tmp PREFECT_HOME: the API URL."""
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
           "PORT": str(port), "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1"}  # default 60: schedule at once
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(["bash", str(REPO / "scripts" / "prefect-server.sh")], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(lambda: httpx.get(f"{api}/health", timeout=2).json() is True, 120, f"server: {log}")
        assert f"export PREFECT_API_URL={api}" in log.read_text()
        yield api
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
