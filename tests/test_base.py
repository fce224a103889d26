"""The base stage's model sources: clear errors for what cannot be loaded, nothing written."""

import pytest

from stages.cli import main as cli_main


@pytest.mark.parametrize(
    "model, expected",
    [
        ({"source": "Qwen/Qwen2.5-0.5B-Instruct"}, "could not be downloaded from the Hugging Face Hub"),
        ({"source": "./no/such/folder"}, "not a model folder (no config.json"),
        ({"preset": "internlm2-chat-1.8b"}, "set model.trust_remote_code: true"),
        ({"preset": "llama-9000"}, "unknown preset 'llama-9000'"),
    ],
)
def test_unloadable_sources_fail_clearly(workspace, monkeypatch, capsys, model, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = sorted(p.name for p in (workspace.root / "models/base").iterdir())
    workspace.set_params({"model": model})
    assert expected in workspace.run_error("base", monkeypatch, capsys)
    assert sorted(p.name for p in (workspace.root / "models/base").iterdir()) == before


def test_local_folder_source_materializes_with_the_policy(workspace, monkeypatch, tiny_base):
    workspace.set_params({"model": {"source": str(tiny_base)}, "chat": {"system_prompt": "You are terse."}})
    workspace.run("base", monkeypatch)
    template = (workspace.root / "models/base/chat_template.jinja").read_text()
    assert '"You are terse."' in template and template.count("tunedag: default system prompt") == 2


def test_presets_command_lists_presets(capsys):
    cli_main(["presets"])
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "internlm2-chat-1.8b" in out and "[trust_remote_code]" in out
