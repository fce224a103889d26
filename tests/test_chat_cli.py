"""`tunedag chat` run as a user runs it (a subprocess, stdin piped) on the tiny random-weight model:
piped questions get one answer line each and no prompts, and a missing server is reported before
anything is read."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cmd
from tunedag.serving.server import Server, ServerSpec, free_port

PROMPTS = ("you>", "bot>", "chatting with", "new conversation")


@pytest.fixture(scope="module")
def model_dir(tiny_base) -> Path:
    return tiny_base


def chat(root, args: list[str], questions: str):
    return run_cmd([sys.executable, "-m", "tunedag", "chat", "--max-tokens", "8", *args], root, input=questions,
                   timeout=300)


def answer_lines(result) -> list[str]:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not any(prompt in result.stdout for prompt in PROMPTS), result.stdout
    return result.stdout.splitlines()


def test_piped_questions_get_one_answer_line_each(workspace, model_dir):
    lines = answer_lines(chat(workspace.root, ["--model-dir", str(model_dir)], "Hello there\n\nWho are you?\n"))
    assert len(lines) == 2 and all(line.strip() for line in lines), lines  # the blank line is skipped


def test_piped_lines_are_one_conversation_with_reset_and_exit(model_dir):
    """Piped as typed: line 2 carries line 1's turn, /reset drops it, /exit stops reading; one
    answer line per question and nothing else, asked for with no prompt."""
    from tunedag.serving.chat import chat_loop, local_generate

    generate = local_generate(str(model_dir), temperature=0, max_tokens=8, threads=1)
    seen = []

    def recording(messages):
        seen.append(list(messages))
        yield from generate(messages)

    lines = iter(["Hello there", "", "Who are you?", "/reset", "Who are you?", "/exit", "Never asked"])
    prompts = []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        return next(lines)

    out = io.StringIO()
    chat_loop(recording, None, read=read, write=out, piped=True)
    assert set(prompts) == {""}
    assert [len(m) for m in seen] == [1, 3, 1]
    assert seen[1][1] == {"role": "assistant", "content": "".join(generate(seen[0])).strip()}
    assert out.getvalue().count("\n") == 3 and not any(p in out.getvalue() for p in PROMPTS), out.getvalue()


def test_one_line_keeps_answer_i_on_line_i():
    from tunedag.serving.chat import one_line

    assert one_line("a\nb\r\nc\rd") == "a b c d"


def test_no_server_is_reported_before_reading_stdin(workspace):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    result = chat(workspace.root, ["--url", url], "Hello there\n")
    assert result.returncode == 1
    assert result.stdout == ""  # no banner, no prompt: it did not get as far as asking
    err = result.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error [chat]:") and url in err, err
    assert "tunedag serve" in err and "--model-dir models/merged" in err, err


def test_piped_questions_against_the_fallback_server(workspace, model_dir):
    """The real HF fallback server over the same model gives the same answers as --model-dir; a
    wrong model name is reported before reading stdin, with the names the server does serve."""
    questions = "Hello there\nWho are you?\n"
    local = answer_lines(chat(workspace.root, ["--model-dir", str(model_dir)], questions))
    spec = ServerSpec(model_dir=model_dir, adapter_dir=None, backend="hf", host="127.0.0.1", port=free_port(),
                      api_key="test-key", served_model_name="tiny", max_model_len=256, kv_cache_gib=0.25,
                      startup_timeout_s=300, threads=1)
    with Server(spec):
        url = f"{spec.url}/v1"
        served = chat(workspace.root, ["--url", url, "--model", "tiny", "--api-key", "test-key"], questions)
        assert answer_lines(served) == local
        wrong = chat(workspace.root, ["--url", url, "--model", "other", "--api-key", "test-key"], questions)
        assert wrong.returncode == 1 and wrong.stdout == "", wrong.stdout + wrong.stderr
        assert "'other'" in wrong.stderr and "tiny" in wrong.stderr and "--model" in wrong.stderr, wrong.stderr
