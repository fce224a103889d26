"""The DVC pipeline as a Prefect flow: one Prefect task per stage of dvc.yaml.

There is no second DAG here. The stages and their order come from DVC's own graph
(`Repo().index.graph`) at run time, and each task runs `dvc repro --single-item <stage>`, so DVC
still decides what is up to date, caches outputs and writes dvc.lock. Prefect adds the UI, per-stage
state and logs, retries, schedules and artifacts.

Per-stage Prefect options live in the stage's `meta:` in dvc.yaml (DVC ignores `meta` when it
hashes a stage, so adding them reruns nothing):

    train:
      meta:
        prefect: {retries: 1, retry_delay_seconds: 30, tags: [heavy]}

When the run reproduces the stage that writes metrics/eval.json (evaluate) and the evaluation
gate failed, the flow run ends Failed, in a state named GateFailed whose message is the verdict.

Run it once from a shell:  python -m flows.pipeline [--force] [stage ...]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.futures import wait
from prefect.states import Completed, Failed

from tunedag.evaluation.gate import EVAL_METRICS, gate_verdict, read_gate

# What `dvc repro` prints when it did not run a stage's command (DVC 3).
UNCHANGED = "didn't change, skipping"
FROM_RUN_CACHE = "is cached - skipping run, checking out outputs"


class TunedagFlowError(RuntimeError):
    """A problem the user can fix; the CLI prints its message as one paragraph, no traceback."""


@dataclass
class Stage:
    name: str
    upstream: list[str]  # stages whose outputs this one depends on
    outs: list[str] = field(default_factory=list)  # what it writes (outs, metrics, plots), relative to the repo
    retries: int = 0
    retry_delay_seconds: float = 10
    tags: list[str] = field(default_factory=list)


# --- the workspace ------------------------------------------------------------------------------

def find_repo(repo_dir: str | None) -> Path:
    """The DVC repo root containing repo_dir (default: the current directory)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    if shutil.which("dvc") is None:
        raise TunedagFlowError(
            "The `dvc` command was not found on PATH. The flows run every stage through the DVC CLI, "
            "like `dvc repro` does: activate the project environment (`. .venv/bin/activate`) or "
            "install it with `bash scripts/install.sh`, then run again."
        )
    try:
        return Path(Repo.find_root(repo_dir or os.getcwd()))
    except NotDvcRepoError:
        raise TunedagFlowError(
            f"{Path(repo_dir or os.getcwd()).resolve()} is not inside a DVC project (no .dvc/ folder "
            "found). Run the flow from the tunedag checkout, or pass repo_dir=<path to it>."
        ) from None


def workspace_lock(root: Path) -> FileLock:
    """One DVC command at a time per workspace, across every flow run and process on this machine.

    DVC holds a repo-wide lock while it reproduces, so two `dvc repro`/`dvc exp run` in one
    workspace would fail rather than run side by side. A file lock (not a Prefect concurrency
    limit) scopes this to the workspace itself and needs no setup on the Prefect server.
    .dvc/tmp is git-ignored by DVC.
    """
    return FileLock(root / ".dvc" / "tmp" / "tunedag-workspace.lock")


def run_dvc(args: list[str], root: Path) -> tuple[int, list[str]]:
    """Run `dvc <args>` in the workspace, streaming every output line into the Prefect log."""
    logger = get_run_logger()
    # Unbuffered, so the stages' own prints reach the log as they happen, not at exit.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lines: list[str] = []
    lock = workspace_lock(root)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for %s: another DVC command is running in this workspace", lock.lock_file)
        lock.acquire()
    try:
        logger.info("$ dvc %s", " ".join(args))
        with subprocess.Popen(["dvc", *args], cwd=root, env=env, text=True, bufsize=1,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
            for line in proc.stdout:
                line = line.rstrip()
                if line:
                    lines.append(line)
                    logger.info(line)
    finally:
        lock.release()
    return proc.returncode, lines


def read_stages(root: Path, targets: list[str] | None = None) -> list[Stage]:
    """The stages of dvc.yaml, upstream first, with their Prefect options from `meta.prefect`."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        # DVC's graph has an edge from each stage to every stage it depends on.
        graph = nx.DiGraph(repo.index.graph)

        def target(stage) -> str:  # what `dvc repro` takes when run in the repo root
            dvcfile = os.path.relpath(stage.dvcfile.path, root)
            return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"

        by_name = {target(stage): stage for stage in graph}
        unknown = sorted(set(targets or []) - set(by_name))
        if unknown:
            raise TunedagFlowError(f"No stage named {', '.join(unknown)} in dvc.yaml; stages: {', '.join(by_name)}.")
        if targets:  # a target and everything upstream of it, like `dvc repro <target>`
            keep = set().union(*({by_name[t], *nx.descendants(graph, by_name[t])} for t in targets))
            graph = graph.subgraph(keep)
        # Upstream first; between independent stages, dvc.yaml's order.
        position = {target(stage): i for i, stage in enumerate(repo.index.stages)}
        upstream_first = nx.lexicographical_topological_sort(graph.reverse(), key=lambda s: position[target(s)])
        stages = []
        for stage in upstream_first:
            options = (stage.meta or {}).get("prefect", {}) if isinstance(stage.meta, dict) else {}
            stages.append(Stage(
                name=target(stage),
                upstream=sorted(target(dep) for dep in graph.successors(stage)),
                outs=[Path(os.path.relpath(out.fs_path, root)).as_posix() for out in stage.outs],
                retries=int(options.get("retries", 0)),
                retry_delay_seconds=float(options.get("retry_delay_seconds", 10)),
                tags=list(options.get("tags", [])),
            ))
        return stages


# --- the flow -----------------------------------------------------------------------------------

# NO_CACHE: DVC decides what is up to date; Prefect must always hand the stage to DVC.
@task(cache_policy=NO_CACHE)
def run_stage(stage: str, root: str, force: bool = False):
    """`dvc repro --single-item <stage>`: "ran", or a Completed state named Skipped or Restored."""
    args = ["repro", "--single-item", *(["--force"] if force else []), stage]
    returncode, lines = run_dvc(args, Path(root))
    if returncode != 0:
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-3:]
        # A Failed state rather than an exception: Prefect still retries it (meta.prefect.retries)
        # and the log shows dvc's own error instead of a Python traceback of this function.
        return Failed(message=f"dvc repro exited {returncode}: " + " | ".join(errors))
    output = "\n".join(lines)
    # Named Completed states, so the task run list shows "Skipped"/"Restored" rather than "Completed".
    if f"Stage '{stage}' {UNCHANGED}" in output:
        label_task_run(f"{stage} (skipped)")
        return Completed(name="Skipped", message="unchanged: dvc.lock matches deps, params and outs", data="skipped")
    if f"Stage '{stage}' {FROM_RUN_CACHE}" in output:
        label_task_run(f"{stage} (restored)")
        return Completed(name="Restored", message="outputs restored from DVC's run cache", data="restored from cache")
    return "ran"


def label_task_run(name: str) -> None:
    """Rename the running task run, e.g. `train (skipped)`, so the flow-run graph shows it.

    The graph draws each task run as its name, colored by its state *type*: a Skipped stage is
    Completed (no other type fits: Cancelled or Failed would trip automations), so without this it
    is as green as a stage that ran. The server records task runs from the engine's state events,
    which carry the run's name, so renaming the engine's TaskRun here reaches the server with the
    final state; it is what Prefect's own `task_run_name=` does at the start of a run.
    """
    TaskRunContext.get().task_run.name = name


@flow(name="tunedag-pipeline")
def pipeline(targets: list[str] | None = None, force: bool = False, repo_dir: str | None = None) -> dict[str, str]:
    """Reproduce dvc.yaml (or `targets` and their upstream), one task per stage.

    Returns {stage: "ran" | "skipped" | "restored from cache"}. A failed stage fails the flow;
    stages downstream of it never start (Prefect leaves them Pending "NotReady"). If the run
    includes the stage that writes metrics/eval.json and its gate failed, the flow ends Failed
    in a state named GateFailed, with the gate's verdict as the message.
    """
    try:
        root = find_repo(repo_dir)
        stages = read_stages(root, targets)
    except TunedagFlowError as exc:  # the message is the whole story: no traceback in the UI
        return Failed(message=str(exc))
    futures = {}
    # Upstream first. Stages with no path between them are submitted together (parallel branches
    # in the UI); the workspace lock makes their dvc commands take turns.
    for stage in stages:
        options = run_stage.with_options(
            task_run_name=stage.name, retries=stage.retries,
            retry_delay_seconds=stage.retry_delay_seconds, tags=["dvc-stage", *stage.tags],
        )
        futures[stage.name] = options.submit(stage.name, str(root), force,
                                             wait_for=[futures[name] for name in stage.upstream])

    wait(list(futures.values()))
    states = {name: future.state for name, future in futures.items()}
    results = {name: describe(state) for name, state in states.items()}
    publish_artifacts(root, results)
    failed = [name for name, state in states.items() if state.is_failed() or state.is_crashed()]
    if failed:
        not_run = [name for name, result in results.items() if result == "not run"]
        return Failed(message=f"stage {', '.join(failed)} failed"
                      + (f"; not run: {', '.join(not_run)}" if not_run else "")
                      + ". The stage's task log has its output.")
    # Only when this run reproduced the evaluation: after `python -m flows.pipeline tokenize`, an
    # older metrics/eval.json says nothing about this run.
    gate = read_gate(root / EVAL_METRICS) if any(EVAL_METRICS.as_posix() in s.outs for s in stages) else None
    if gate and not gate["passed"]:
        # Every stage worked, but the model must not ship: a FAILED state type, so failure
        # notifications and automations fire, named so the UI says why.
        return Failed(name="GateFailed", message=gate_verdict(gate))
    return results


def describe(state) -> str:
    if state.is_completed():
        return state.result()
    if state.is_pending():  # "NotReady": an upstream stage failed, so this one never started
        return "not run"
    return state.name.lower()


def publish_artifacts(root: Path, results: dict[str, str]) -> None:
    """What each stage did, and the pipeline's metrics (every `metrics:` file in dvc.yaml)."""
    create_table_artifact(
        key="tunedag-stages", description="What each DVC stage did in this run",
        table=[{"stage": name, "result": result} for name, result in results.items()],
    )
    from dvc.repo import Repo

    # Every `metrics:` file of dvc.yaml that exists (a failed run may not have written them all).
    with Repo(str(root)) as repo:
        workspace = repo.metrics.show(on_error="return").get("", {}).get("data", {})
    metrics = {path: entry["data"] for path, entry in workspace.items() if "data" in entry}
    rows = [{"file": path, "metric": key, "value": value}
            for path, values in metrics.items() for key, value in flatten(values).items()]
    if rows:
        create_table_artifact(key="tunedag-metrics", table=rows, description="Metrics files declared in dvc.yaml")
        create_markdown_artifact(key="tunedag-metrics-summary", markdown=metrics_markdown(rows),
                                 description="Metrics after this run")


def flatten(values, prefix: str = "") -> dict:
    if not isinstance(values, dict):
        return {prefix: values}
    out = {}
    for key, value in values.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def metrics_markdown(rows: list[dict]) -> str:
    lines = ["| file | metric | value |", "|---|---|---|"]
    lines += [f"| `{row['file']}` | {row['metric']} | {row['value']} |" for row in rows]
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------

def check_server() -> None:
    """If PREFECT_API_URL is set, the server must answer: otherwise one clear message, not a traceback."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return  # Prefect starts a temporary local server for this one run
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        raise TunedagFlowError(
            f"The Prefect server at PREFECT_API_URL={url} is unreachable ({exc.__class__.__name__}). "
            "Start it with `bash scripts/prefect-server.sh` (it prints the URL to export), or "
            "`unset PREFECT_API_URL` to run once against a temporary local server."
        ) from None


def cli(run) -> None:
    """Run `run()` and turn TunedagFlowError into one paragraph on stderr and exit status 1."""
    try:
        check_server()
        run()
    except TunedagFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=pipeline.__doc__)
    parser.add_argument("targets", nargs="*", help="stages to reproduce with their upstream (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun stages even if unchanged")
    args = parser.parse_args(argv)

    def run():
        read_stages(find_repo(None), args.targets or None)  # fail before Prefect starts anything
        state = pipeline(targets=args.targets or None, force=args.force, return_state=True)
        if state.name == "GateFailed":  # not a problem with the run: the verdict, as evaluate prints it
            print(state.message, file=sys.stderr)
            raise SystemExit(1)
        if not state.is_completed():
            raise TunedagFlowError(state.message or f"the pipeline flow ended {state.name}")
        print(state.result())

    cli(run)


if __name__ == "__main__":
    main()
