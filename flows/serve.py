"""Serving as a Prefect flow: `python -m flows.serve [--force] [--backend hf] [--duration 600]`.

Runs the same server as `tunedag serve` (tunedag/serving/server.py: params serve.*, the evaluation
gate, the process-group stop), so a Prefect UI or a deployment can start and stop it. The URL is
logged and attached as a markdown artifact; the flow runs until the server exits, the run is
cancelled, or `duration_s` (optional) has passed. Independent of flows/pipeline.py: serving
writes nothing in the workspace, so it may run beside a pipeline run.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tunedag.core.params import load_params
from tunedag.evaluation.gate import require_gate
from tunedag.serving.server import Server, spec_from_params

LOG = Path(".cache/serve-flow.log")


@flow(name="tunedag-serve")
def serve(force: bool = False, backend: str | None = None, mode: str | None = None, port: int | None = None,
          duration_s: float | None = None) -> dict:
    logger = get_run_logger()
    params = load_params()
    require_gate(force=force or params.serve.force)  # a UserError fails the run with its message
    spec = spec_from_params(params, mode, backend=backend, port=port)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with Server(spec, log=LOG) as server:
        url = f"{spec.url}/v1"
        logger.info("serving %s with %s at %s (started in %.0f s; server log %s)",
                    spec.served_model_name, spec.backend, url, server.startup_s, LOG)
        create_markdown_artifact(
            key="tunedag-serve",
            markdown=f"**{spec.served_model_name}** ({spec.backend}, {spec.model_dir}) at `{url}`\n\n"
                     f"```bash\ncurl {url}/chat/completions -H 'Content-Type: application/json' \\\n"
                     f"  -d '{{\"model\": \"{spec.served_model_name}\", \"messages\": "
                     f"[{{\"role\": \"user\", \"content\": \"Who are you?\"}}]}}'\n```",
            description="the running model server",
        )
        try:
            code = server.proc.wait(timeout=duration_s)
            logger.warning("the server exited with code %s (log: %s)", code, LOG)
        except subprocess.TimeoutExpired:
            logger.info("duration_s=%s reached: stopping the server", duration_s)
            code = 0
    return {"url": url, "backend": spec.backend, "startup_s": round(server.startup_s, 1), "exit_code": code}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="serve even if the model failed the evaluation gate")
    parser.add_argument("--backend", choices=["vllm", "hf"])
    parser.add_argument("--mode", choices=["merged", "lora"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--duration", type=float, help="stop after this many seconds (default: run until stopped)")
    args = parser.parse_args()
    serve(force=args.force, backend=args.backend, mode=args.mode, port=args.port, duration_s=args.duration)


if __name__ == "__main__":
    main()
