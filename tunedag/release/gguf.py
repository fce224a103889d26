"""GGUF for llama.cpp and Ollama, through llama.cpp's own converter (convert_hf_to_gguf.py).

scripts/install.sh extracts the converter (with the gguf-py and conversion/ modules it imports)
from the source archive of llama-cpp-python into .venv/share/llama.cpp: the converter is Python,
and nothing is compiled. The Modelfile gives Ollama the chat template and system prompt the model
was trained with, written in Ollama's Go template language for the template families it knows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tunedag.core.errors import UserError

CONVERTER_DIR = Path(os.environ.get("TUNEDAG_LLAMA_CPP_DIR", Path(sys.prefix) / "share" / "llama.cpp"))

# ChatML (SmolLM2, Qwen2/2.5, InternLM2's chat format) in Ollama's template language. Ollama puts the
# Modelfile's SYSTEM first in .Messages when a request has no system message, as the saved chat
# template does with chat.system_prompt.
CHATML_OLLAMA = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)


def converter_version() -> str:
    """The llama-cpp-python release the converter came from (written by scripts/install.sh)."""
    marker = CONVERTER_DIR / "llama-cpp-python.version"
    return marker.read_text().strip() if marker.exists() else "unknown"


def convert(model_dir: Path, out_file: Path, outtype: str) -> str:
    """Run llama.cpp's converter on a HF folder; returns its log. Raises UserError if it fails."""
    script = CONVERTER_DIR / "convert_hf_to_gguf.py"
    if not script.exists():
        raise UserError(
            f"llama.cpp's converter is not installed ({script} not found). Rerun `bash scripts/install.sh`: it "
            "extracts convert_hf_to_gguf.py from llama-cpp-python's source archive into .venv/share/llama.cpp "
            "(or point TUNEDAG_LLAMA_CPP_DIR at a llama.cpp checkout)."
        )
    done = subprocess.run([sys.executable, str(script), str(model_dir), "--outfile", str(out_file), "--outtype", outtype],
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        raise UserError(
            f"llama.cpp's convert_hf_to_gguf.py failed on {model_dir} (gguf.outtype {outtype}): {tail}. Its "
            f"architecture may be one llama.cpp does not support; the HF export in models/export is unaffected."
        )
    return done.stdout + done.stderr


def _chatml(messages: list[dict]) -> str:
    """What CHATML_OLLAMA renders (with SYSTEM already placed first in the messages)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def ollama_template(tokenizer, system_prompt: str | None) -> str | None:
    """The Ollama template equivalent to the tokenizer's chat template, or None if it is not ChatML.
    Checked, not guessed: the saved template must render a multi-turn conversation (without a
    system message, so its default applies) exactly as the Ollama template would."""
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Who are you?"}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return CHATML_OLLAMA if rendered == _chatml(system + conversation) else None


def modelfile(gguf_name: str, template: str | None, system_prompt: str | None, stop: str) -> str:
    """An Ollama Modelfile: `ollama create NAME -f Modelfile` in the folder that holds the GGUF."""
    lines = [f"FROM ./{gguf_name}", ""]
    if template:
        lines += [f'TEMPLATE """{template}"""', ""]
    else:
        lines += ["# The chat template is not ChatML: Ollama reads the one stored in the GGUF (tokenizer.chat_template).", ""]
    if system_prompt:
        lines += [f'SYSTEM """{system_prompt}"""', ""]
    lines += [f'PARAMETER stop "{stop}"', "PARAMETER temperature 0", ""]
    return "\n".join(lines)
