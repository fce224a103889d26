"""The base stage's model sources. (Unloadable sources: tests/test_bad_input.py.)"""

from tunedag.cli import main as cli_main


def test_local_folder_source_materializes_with_the_policy(workspace, monkeypatch, tiny_base):
    workspace.set_params({"model": {"source": str(tiny_base)}, "chat": {"system_prompt": "You are terse."}})
    workspace.run("base", monkeypatch)
    template = (workspace.root / "models/base/chat_template.jinja").read_text()
    assert '"You are terse."' in template and template.count("tunedag: default system prompt") == 2


def test_presets_command_lists_presets(capsys):
    cli_main(["presets"])
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "internlm2-chat-1.8b" in out
