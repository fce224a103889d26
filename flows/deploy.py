"""Deployments of tunedag's flows on a running Prefect server: served from this process, or put
on a work pool for a worker.

    bash scripts/prefect-server.sh          # in one shell; it prints the PREFECT_API_URL to export
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.deploy                   # in another: serves until Ctrl-C

or, with a work pool and a worker (docs/distributed.md, "Prefect work pools"):

    prefect work-pool create tunedag --type process    # once per server
    python -m flows.deploy --pool tunedag              # registers the deployments and returns
    prefect worker start --pool tunedag                # runs them, in this checkout

Deployments (UI: Deployments; `prefect deployment ls`):
  tunedag-pipeline/nightly       the whole DAG on a cron schedule (default 03:00 every day, UTC)
  tunedag-pipeline/on-demand     the same, unscheduled: "Run" it from the UI (targets, force)
  tunedag-experiment/experiment  a DVC experiment per run; fill in lora_r, lr, max_steps, overrides
  tunedag-sweep/sweep            a grid of experiments

Either way the flow runs execute in this checkout (--repo-dir): served, as subprocesses of this
process; on a process work pool, as subprocesses of the worker, which must run on this machine.
For Docker or Kubernetes work pools see prefect.yaml.
"""

from __future__ import annotations

import argparse

from prefect import deploy, serve
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL

from flows.experiment import experiment, sweep
from flows.pipeline import TunedagFlowError, cli, find_repo, pipeline

NIGHTLY = "0 3 * * *"


def deployments(repo_dir: str, cron: str = NIGHTLY, timezone: str = "UTC", for_worker: bool = False) -> list:
    # repo_dir is baked into each deployment's default parameters, so a run does not depend on
    # the directory the runner happens to start its subprocess in.
    where = {"repo_dir": repo_dir}
    flows = [pipeline, experiment, sweep]
    if for_worker:
        # Each flow loaded from the checkout's file: its deployment then carries the pull step
        # `set_working_directory: <repo_dir>`, so a worker's flow run starts in the checkout and
        # imports the checkout's flows/ and tunedag/.
        entrypoints = ["flows/pipeline.py:pipeline", "flows/experiment.py:experiment", "flows/experiment.py:sweep"]
        flows = [flow.from_source(source=repo_dir, entrypoint=entrypoint) for flow, entrypoint in zip(flows, entrypoints)]
    pipeline_, experiment_, sweep_ = flows
    return [
        pipeline_.to_deployment(
            name="nightly", schedule=Cron(cron, timezone=timezone), parameters=where, tags=["tunedag"],
            description="Retrain on schedule: `dvc repro` stage by stage; unchanged stages are skipped.",
        ),
        pipeline_.to_deployment(name="on-demand", parameters=where, tags=["tunedag"],
                                description="`dvc repro` stage by stage, when you press Run."),
        experiment_.to_deployment(name="experiment", parameters=where, tags=["tunedag", "experiment"],
                                  description="`dvc exp run --temp -S ...` with this run's parameters."),
        sweep_.to_deployment(name="sweep", parameters={**where, "lora_r": [8, 16]}, tags=["tunedag", "experiment"],
                             description="One DVC experiment per combination of the lists given."),
    ]


def check_pool(name: str) -> None:
    """The work pool must exist and be a process pool: its worker runs the flows in this checkout."""
    create = f"`prefect work-pool create {name} --type process`"
    if not name.strip():
        raise TunedagFlowError(
            "--pool is empty. Name the process work pool whose worker runs the flows, e.g. "
            "`--pool tunedag`; create it once with `prefect work-pool create tunedag --type process`."
        )
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            names = [p.name for p in client.read_work_pools()]
            raise TunedagFlowError(
                f"Work pool {name!r} (--pool) does not exist on the Prefect server at {PREFECT_API_URL.value()}"
                + (f" (its pools: {', '.join(sorted(names))})" if names else " (it has no work pools)")
                + f". Create it once with {create}, run `python -m flows.deploy --pool {name}` again, and "
                f"start its worker on this machine: `prefect worker start --pool {name}`."
            ) from None
    if pool.type != "process":
        raise TunedagFlowError(
            f"Work pool {name!r} (--pool) is a {pool.type!r} pool; `python -m flows.deploy --pool` deploys "
            "flows that run in this checkout, which needs a process pool: create one with "
            f"`prefect work-pool create NAME --type process`. For a {pool.type} pool, deploy prefect.yaml "
            f"instead: `TUNEDAG_POOL={name} prefect --no-prompt deploy --all`, with TUNEDAG_IMAGE and "
            "TUNEDAG_GIT_URL set (docs/distributed.md, \"Prefect work pools\")."
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cron", default=NIGHTLY, help=f"schedule of tunedag-pipeline/nightly (default: '{NIGHTLY}')")
    parser.add_argument("--timezone", default="UTC")
    parser.add_argument("--repo-dir", default=None, help="the DVC project (default: the one containing the current directory)")
    parser.add_argument("--pool", default=None, metavar="NAME",
                        help="put the deployments on this process work pool and return, instead of serving "
                             "them from this process; `prefect worker start --pool NAME` runs them")
    args = parser.parse_args(argv)

    def run():
        if not PREFECT_API_URL.value():
            # A temporary server would vanish with this process, and schedules with it.
            command = "python -m flows.deploy" + (f" --pool {args.pool}" if args.pool is not None else "")
            raise TunedagFlowError(
                "PREFECT_API_URL is not set. Schedules and deployments live in a Prefect server: start "
                "one with `bash scripts/prefect-server.sh`, export the PREFECT_API_URL it prints, and "
                f"run `{command}` again."
            )
        root = find_repo(args.repo_dir)
        if args.pool is None:
            serve(*deployments(str(root), cron=args.cron, timezone=args.timezone))
            return
        check_pool(args.pool)
        planned = deployments(str(root), cron=args.cron, timezone=args.timezone, for_worker=True)
        created = deploy(*planned, work_pool_name=args.pool, build=False, push=False,
                         print_next_steps_message=False, ignore_warnings=True)
        if len(created) != len(planned):  # deploy() printed a table with each one's error
            raise TunedagFlowError(f"{len(planned) - len(created)} of {len(planned)} deployments could not be "
                                   f"created on work pool {args.pool!r}: see the table above.")
        print(f"Runs of these deployments wait in work pool {args.pool!r} until a worker picks them up. "
              f"Start one on this machine, with this environment activated:\n\n"
              f"    prefect worker start --pool {args.pool}\n")

    cli(run)  # cli() checks that the server answers first


if __name__ == "__main__":
    main()
