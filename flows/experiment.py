"""A Prefect run with parameters is a DVC experiment: `dvc exp run --temp -S key=value ...`.

`--temp` runs the whole pipeline in a temporary copy of the workspace, so an experiment never
touches your checkout; its params, metrics and outputs land in git refs and the DVC cache, and it
shows up in `dvc exp show` under the name of the Prefect flow run (or `name`).

Run it once from a shell:  python -m flows.experiment --lora-r 8 --set train.epochs=2
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Failed

from flows.pipeline import (
    TunedagFlowError,
    cli,
    find_repo,
    flatten,
    run_dvc,
    workspace_lock,
)

# The typed flow parameters and the params.yaml keys they set.
PARAM_KEYS = {"lora_r": "lora.r", "lr": "train.lr", "max_steps": "train.max_steps"}


def check_git_state(root: Path) -> None:
    """Catch the workspace states `dvc exp run --temp` cannot handle, before it fails obscurely."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)

    if git("rev-parse", "--verify", "HEAD").returncode != 0:
        raise TunedagFlowError(
            f"{root} has no git commit yet. DVC experiments are based on a commit: commit the "
            "project (`git add -A && git commit -m init`) and run again."
        )
    # The temp copy holds what git tracks (committed, staged or modified); untracked files are
    # left behind. That is fine for outputs (the experiment makes them again), not for inputs.
    untracked = git("ls-files", "--others", "--exclude-standard").stdout.split()
    inputs, outputs = pipeline_paths(root)
    missing = [path for path in untracked if under(path, inputs) and not under(path, outputs)]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise TunedagFlowError(
            f"Untracked files that the pipeline reads, in {root}: {shown}. `dvc exp run --temp` copies "
            "only files git knows into the experiment's workspace, so these would be missing there. "
            "`git add` them (no commit needed) and run again."
        )


def pipeline_paths(root: Path) -> tuple[set[str], set[str]]:
    """(what the stages read: deps, params files, dvc.yaml; what they write), relative to root."""
    from dvc.repo import Repo

    def rel(path: str) -> str:
        return os.path.relpath(path, root)

    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
        outputs = {rel(out.fs_path) for stage in stages for out in stage.outs}
        inputs = {rel(dep.fs_path) for stage in stages for dep in stage.deps}
        inputs |= {rel(stage.dvcfile.path) for stage in stages}
    return inputs, outputs


def under(path: str, roots: set[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def experiment_row(root: Path, name: str) -> dict:
    """The experiment's row of `dvc exp show --json`: its params and metrics, flattened."""
    with workspace_lock(root):
        shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=root, capture_output=True, text=True, check=True)
    for baseline in json.loads(shown.stdout):
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                if rev.get("name") == name:
                    data = rev["data"]
                    row = {"experiment": name, "rev": rev["rev"][:7], "baseline": baseline.get("name") or baseline["rev"][:7]}
                    for file, values in (data.get("params") or {}).items():
                        prefix = "" if file == "params.yaml" else f"{file}:"
                        row.update({prefix + key: value for key, value in flatten(values.get("data", {})).items()})
                    for file, values in (data.get("metrics") or {}).items():
                        row.update({f"{file}:{key}": value for key, value in flatten(values.get("data", {})).items()})
                    return row
    raise TunedagFlowError(f"experiment {name!r} ran but is not in `dvc exp show`")


@task(cache_policy=NO_CACHE)
def run_experiment(name: str, settings: dict[str, str], root: str):
    """`dvc exp run --temp --name <name> -S key=value ...`, streamed into the task log."""
    args = ["exp", "run", "--temp", "--name", name, *(f"--set-param={key}={value}" for key, value in settings.items())]
    returncode, lines = run_dvc(args, Path(root))
    if returncode != 0:
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-3:]
        return Failed(message=f"dvc exp run exited {returncode}: " + " | ".join(dict.fromkeys(errors)))
    return experiment_row(Path(root), name)


@flow(name="tunedag-experiment")
def experiment(
    lora_r: int | None = None,
    lr: float | None = None,
    max_steps: int | None = None,
    overrides: dict[str, str] | None = None,
    name: str | None = None,
    repo_dir: str | None = None,
):
    """Run the pipeline as a DVC experiment with these params changed (None = as in params.yaml).

    overrides: any other params.yaml keys, e.g. {"lora.alpha": "16", "data.name": "Orion"}.
    name: the experiment's name in `dvc exp show` (default: this flow run's name).
    """
    try:
        root = find_repo(repo_dir)
        check_git_state(root)
    except TunedagFlowError as exc:
        return Failed(message=str(exc))
    typed = {"lora_r": lora_r, "lr": lr, "max_steps": max_steps}
    settings = {PARAM_KEYS[arg]: str(value) for arg, value in typed.items() if value is not None}
    settings.update({key: str(value) for key, value in (overrides or {}).items()})
    name = name or flow_run.get_name()

    state = run_experiment.with_options(task_run_name=f"dvc exp run {name}")(name, settings, str(root), return_state=True)
    if not state.is_completed():
        return state
    row = state.result()
    create_table_artifact(
        key="tunedag-experiment", table=[{"column": key, "value": value} for key, value in row.items()],
        description=f"DVC experiment `{name}` ({', '.join(f'{k}={v}' for k, v in settings.items()) or 'no changes'})",
    )
    return row


@flow(name="tunedag-sweep")
def sweep(lora_r: list[int] | None = None, lr: list[float] | None = None, max_steps: list[int] | None = None,
          repo_dir: str | None = None):
    """One experiment per combination of the given values, then one table comparing them."""
    grid = {arg: values for arg, values in {"lora_r": lora_r, "lr": lr, "max_steps": max_steps}.items() if values}
    rows, failed = [], []
    # One after another: experiments share the workspace lock (flows.pipeline.workspace_lock).
    for combination in itertools.product(*grid.values()):
        params = dict(zip(grid, combination))
        state = experiment(**params, repo_dir=repo_dir, return_state=True)
        if state.is_completed():
            rows.append(state.result())
        else:
            failed.append(f"{params}: {state.message}")
    if rows:
        create_table_artifact(key="tunedag-sweep", table=rows, description="One row per experiment of the sweep")
    if failed:
        return Failed(message=f"{len(failed)} of {len(failed) + len(rows)} experiments failed: " + "; ".join(failed))
    return rows


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.experiment", description=experiment.__doc__)
    parser.add_argument("--lora-r", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other param")
    parser.add_argument("--name")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.set):
        parser.error("--set takes KEY=VALUE")

    def run():
        check_git_state(find_repo(None))  # fail before Prefect starts anything
        state = experiment(lora_r=args.lora_r, lr=args.lr, max_steps=args.max_steps, name=args.name,
                           overrides=dict(item.split("=", 1) for item in args.set), return_state=True)
        if not state.is_completed():
            raise TunedagFlowError(state.message or f"the experiment flow ended {state.name}")
        json.dump(state.result(), sys.stdout, indent=2, default=str)
        print()

    cli(run)


if __name__ == "__main__":
    main()
