"""Serve tunedag's flows as deployments of a running Prefect server, from this one process.

    bash scripts/prefect-server.sh          # in one shell; it prints the PREFECT_API_URL to export
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.deploy                   # in another: serves until Ctrl-C

Deployments (UI: Deployments; `prefect deployment ls`):
  tunedag-pipeline/nightly       the whole DAG on a cron schedule (default 03:00 every day, UTC)
  tunedag-pipeline/on-demand     the same, unscheduled: "Run" it from the UI (targets, force)
  tunedag-experiment/experiment  a DVC experiment per run; fill in lora_r, lr, max_steps, overrides
  tunedag-sweep/sweep            a grid of experiments

The flow runs execute here, as subprocesses of this process, in the project's workspace. For a
shared server with workers instead, see prefect.yaml (a process work pool).
"""

from __future__ import annotations

import argparse

from prefect import serve
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL

from flows.experiment import experiment, sweep
from flows.pipeline import TunedagFlowError, cli, find_repo, pipeline

NIGHTLY = "0 3 * * *"


def deployments(repo_dir: str, cron: str = NIGHTLY, timezone: str = "UTC") -> list:
    # repo_dir is baked into each deployment's default parameters, so a run does not depend on
    # the directory the runner happens to start its subprocess in.
    where = {"repo_dir": repo_dir}
    return [
        pipeline.to_deployment(
            name="nightly", schedule=Cron(cron, timezone=timezone), parameters=where, tags=["tunedag"],
            description="Retrain on schedule: `dvc repro` stage by stage; unchanged stages are skipped.",
        ),
        pipeline.to_deployment(name="on-demand", parameters=where, tags=["tunedag"],
                               description="`dvc repro` stage by stage, when you press Run."),
        experiment.to_deployment(name="experiment", parameters=where, tags=["tunedag", "experiment"],
                                 description="`dvc exp run --temp -S ...` with this run's parameters."),
        sweep.to_deployment(name="sweep", parameters={**where, "lora_r": [8, 16]}, tags=["tunedag", "experiment"],
                            description="One DVC experiment per combination of the lists given."),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cron", default=NIGHTLY, help=f"schedule of tunedag-pipeline/nightly (default: '{NIGHTLY}')")
    parser.add_argument("--timezone", default="UTC")
    parser.add_argument("--repo-dir", default=None, help="the DVC project (default: the one containing the current directory)")
    args = parser.parse_args(argv)

    def run():
        if not PREFECT_API_URL.value():
            # A temporary server would vanish with this process, and schedules with it.
            raise TunedagFlowError(
                "PREFECT_API_URL is not set. Schedules and deployments live in a Prefect server: start "
                "one with `bash scripts/prefect-server.sh`, export the PREFECT_API_URL it prints, and "
                "run `python -m flows.deploy` again."
            )
        root = find_repo(args.repo_dir)
        serve(*deployments(str(root), cron=args.cron, timezone=args.timezone))

    cli(run)  # cli() checks that the server answers first


if __name__ == "__main__":
    main()
