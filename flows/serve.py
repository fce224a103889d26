"""Serving as a Prefect flow: `python -m flows.serve [--stage prod] [--backend hf] [--duration 600]`.

Deploys the model registered at a stage (default publish.stage, `prod`): the version `tunedag
publish` assigned there, fetched as `dvc artifacts get . model --stage prod` would, so the server
runs what passed the gate and was published, not whatever is in the workspace. `--workspace` serves
models/merged instead (behind the evaluation gate, as `tunedag serve` does).

Runs the same server as `tunedag serve` (tunedag/serving/server.py: params serve.*, the
process-group stop), so a Prefect UI or a deployment can start and stop it. The URL and the version
are logged and attached as a markdown artifact, and recorded for the web chat (`tunedag web` shows
the version); the flow runs until the server exits, the run is cancelled, or `duration_s` has
passed. Independent of flows/pipeline.py: it may run beside a pipeline run.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tunedag.core.params import load_params
from tunedag.evaluation.gate import require_gate
from tunedag.release.registry import fetch_release, record_serving
from tunedag.serving.server import Server, spec_from_params

LOG = Path(".cache/serve-flow.log")


@flow(name="tunedag-serve")
def serve(stage: str | None = None, workspace: bool = False, force: bool = False, backend: str | None = None,
          mode: str | None = None, port: int | None = None, duration_s: float | None = None) -> dict:
    logger = get_run_logger()
    params = load_params()
    if workspace:
        release = None
        require_gate(force=force or params.serve.force)  # a UserError fails the run with its message
        spec = spec_from_params(params, mode, backend=backend, port=port)
    else:  # the registered version passed the gate when it was published
        release = fetch_release("model", stage or params.publish.stage)
        spec = spec_from_params(params, "merged", backend=backend, port=port, model_dir=Path(release.path))
        logger.info("deploying %s %s (stage %s, commit %s)", release.name, release.version, release.stage, release.commit)
    what = f"{release.name} {release.version} ({release.stage})" if release else f"workspace {spec.model_dir}"
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with Server(spec, log=LOG) as server:
        url = f"{spec.url}/v1"
        record_serving(release, url)
        logger.info("serving %s as %s with %s at %s (started in %.0f s; server log %s)",
                    what, spec.served_model_name, spec.backend, url, server.startup_s, LOG)
        create_markdown_artifact(
            key="tunedag-serve",
            markdown=f"**{spec.served_model_name}**: {what}, {spec.backend}, at `{url}`\n\n"
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
        finally:
            record_serving(None, url)
    return {"url": url, "backend": spec.backend, "startup_s": round(server.startup_s, 1), "exit_code": code,
            "version": release.version if release else None}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", help="deploy the version registered at this stage (default: publish.stage)")
    parser.add_argument("--workspace", action="store_true", help="serve models/merged, not a registered version")
    parser.add_argument("--force", action="store_true", help="with --workspace: serve a model that failed the gate")
    parser.add_argument("--backend", choices=["vllm", "hf"])
    parser.add_argument("--mode", choices=["merged", "lora"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--duration", type=float, help="stop after this many seconds (default: run until stopped)")
    args = parser.parse_args()
    serve(stage=args.stage, workspace=args.workspace, force=args.force, backend=args.backend, mode=args.mode,
          port=args.port, duration_s=args.duration)


if __name__ == "__main__":
    main()
