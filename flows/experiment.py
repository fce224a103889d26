"""A Prefect run with parameters is a DVC experiment: `dvc exp run --temp -S key=value ...`.

`--temp` runs the whole pipeline in a temporary copy of the workspace, so an experiment never
touches your checkout; its params, metrics and outputs land in git refs and the DVC cache, and it
shows up in `dvc exp show` under the name of the Prefect flow run (or `name`).

Before DVC runs, the overrides are applied to a copy of params.yaml and the result is validated
with the params schema, so a typo fails the flow run in a second with a message naming the key.
An experiment whose evaluation gate failed ends Completed (it is still a result to compare) in a
state named GateFailed.

Run it once from a shell:  python -m flows.experiment --lora-r 8 --set train.epochs=2 --set data.name=小智
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from flows.pipeline import (
    TunedagFlowError,
    cli,
    find_repo,
    flatten,
    run_dvc,
    workspace_lock,
)
from tunedag.core.errors import UserError
from tunedag.core.io import read_yaml
from tunedag.core.params import PARAMS_FILE, parse_params
from tunedag.evaluation.gate import EVAL_METRICS, gate_verdict

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


# --- the overrides: quoted for Hydra, checked against the schema ---------------------------------

def parse_hydra_value(value: str):
    """What `dvc exp run -S key=<value>` would set: Hydra's own parser (DVC uses it for -S).

    Raises ValueError for what Hydra cannot parse or reads as a sweep (`a,b`) rather than a value.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    try:
        override = OverridesParser.create().parse_override(f"key={value}")
    except HydraException as exc:
        raise ValueError(str(exc).splitlines()[0]) from None
    if override.value_type != ValueType.ELEMENT:
        raise ValueError(f"Hydra reads it as a {override.value_type.name.lower()}")
    return override.value()


def hydra_value(key: str, value: str) -> str:
    """`value` written so that `-S key=<it>` sets exactly it.

    Hydra's grammar takes numbers, booleans, null, lists and plain ASCII text as they are; those
    go unquoted, so params.yaml keeps their YAML type. It rejects non-ASCII (`data.name=小智`),
    quotes and `#`, reads `a,b` as a sweep and strips outer spaces: such a value is single-quoted,
    escaped as Hydra requires. A value already in Hydra quotes (`'16'`, DVC's own way to pass a
    number as text) goes as it is.
    """
    try:
        parsed = parse_hydra_value(value)
        if not isinstance(parsed, str) or parsed == value or value[:1] in ("'", '"'):
            return value
    except ValueError:
        pass
    # Inside '...', Hydra reads \' as a quote, so a quote and the backslashes before it (or before
    # the closing quote) are escaped; other backslashes are literal.
    quoted = "'" + re.sub(r"(\\*)('|\Z)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value) + "'"
    try:
        if parse_hydra_value(quoted) == value:
            return quoted
    except ValueError:
        pass
    raise TunedagFlowError(
        f"{key}={value!r} cannot be passed to `dvc exp run -S`: Hydra's override grammar reads it as "
        "something else even quoted. Set it in params.yaml (`git add params.yaml`) and run the "
        "experiment without this override."
    )


def dvc_overrides(settings: dict[str, str]) -> list[str]:
    """The `--set-param` values of `dvc exp run` for {key: value} (key may be `file.yaml:key`)."""
    return [f"{key}={hydra_value(key, value)}" for key, value in settings.items()]


def check_params(root: Path, overrides: list[str]) -> None:
    """Apply the overrides to a copy of params.yaml and validate it, before `dvc exp run`.

    DVC's own code applies them (dvc.utils.hydra.apply_overrides, what `dvc exp run -S` calls), and
    the copy is read back as the stages read params.yaml, so the types are what the stages would
    see; the schema then catches a bad value in a second rather than at the stage that reads it.
    """
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    mine = to_path_overrides(overrides).get(PARAMS_FILE, [])  # not those for other params files
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / PARAMS_FILE
        shutil.copyfile(root / PARAMS_FILE, copy)
        try:
            apply_overrides(copy, mine)
        except InvalidArgumentError as exc:
            cause = str(exc.__cause__ or exc).splitlines()[0]  # Hydra's next line suggests +key=: not here
            raise TunedagFlowError(
                f"Cannot set {', '.join(mine)} in {PARAMS_FILE}: {cause} Only keys that already exist "
                f"in {PARAMS_FILE} can be set (its schema allows no others): check the key's spelling."
            ) from None
        try:
            parse_params(read_yaml(copy), f"{PARAMS_FILE} with {', '.join(mine)}" if mine else PARAMS_FILE)
        except UserError as exc:
            raise TunedagFlowError(str(exc)) from None


# --- the experiment -----------------------------------------------------------------------------

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


def experiment_gate(root: Path, name: str) -> dict:
    """The gate section of the experiment's metrics/eval.json, read from the experiment's commit.

    Its row has `gate.passed`, but `dvc exp show` drops lists, so not the failures the verdict names.
    """
    import dvc.api

    with workspace_lock(root):
        return json.loads(dvc.api.read(EVAL_METRICS.as_posix(), repo=str(root), rev=name, encoding="utf-8"))["gate"]


@task(cache_policy=NO_CACHE)
def run_experiment(name: str, overrides: list[str], root: str):
    """`dvc exp run --temp --name <name> -S key=value ...`, streamed into the task log."""
    args = ["exp", "run", "--temp", "--name", name, *(f"--set-param={override}" for override in overrides)]
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

    overrides: any other params.yaml keys, e.g. {"lora.alpha": "16", "data.name": "小智"}. Numbers,
    booleans and null keep their type; other values are set as the exact text given.
    name: the experiment's name in `dvc exp show` (default: this flow run's name).

    Ends Failed, before DVC runs, if params.yaml with these changes is not valid; Completed in a
    state named GateFailed if the experiment's evaluation gate failed.
    """
    settings = experiment_settings(lora_r, lr, max_steps, overrides)
    try:
        root = find_repo(repo_dir)
        check_git_state(root)
        dvc_args = dvc_overrides(settings)
        check_params(root, dvc_args)
    except TunedagFlowError as exc:
        return Failed(message=str(exc))
    name = name or flow_run.get_name()

    state = run_experiment.with_options(task_run_name=f"dvc exp run {name}")(name, dvc_args, str(root), return_state=True)
    if not state.is_completed():
        return state
    row = state.result()
    create_table_artifact(
        key="tunedag-experiment", table=[{"column": key, "value": value} for key, value in row.items()],
        description=f"DVC experiment `{name}` ({', '.join(f'{k}={v}' for k, v in settings.items()) or 'no changes'})",
    )
    if row.get(f"{EVAL_METRICS.as_posix()}:gate.passed") is False:
        # Completed, not Failed: the experiment ran and its row is a result to compare (a sweep
        # keeps it); the state's name and message say the model would not ship.
        return Completed(name="GateFailed", message=gate_verdict(experiment_gate(root, name)), data=row)
    return row


def experiment_settings(lora_r, lr, max_steps, overrides) -> dict[str, str]:
    """{params.yaml key: value as text} from the typed flow parameters and the free overrides."""
    typed = {"lora_r": lora_r, "lr": lr, "max_steps": max_steps}
    settings = {PARAM_KEYS[arg]: str(value) for arg, value in typed.items() if value is not None}
    settings.update({key: str(value) for key, value in (overrides or {}).items()})
    return settings


@flow(name="tunedag-sweep")
def sweep(lora_r: list[int] | None = None, lr: list[float] | None = None, max_steps: list[int] | None = None,
          repo_dir: str | None = None):
    """One experiment per combination of the given values, then one table comparing them."""
    grid = {arg: values for arg, values in {"lora_r": lora_r, "lr": lr, "max_steps": max_steps}.items() if values}
    rows, failed, gate_failed = [], [], []
    # One after another: experiments share the workspace lock (flows.pipeline.workspace_lock).
    for combination in itertools.product(*grid.values()):
        params = dict(zip(grid, combination))
        state = experiment(**params, repo_dir=repo_dir, return_state=True)
        if state.is_completed():
            rows.append(state.result())  # a GateFailed experiment too: its row is still a result
            if state.name == "GateFailed":
                gate_failed.append(f"{params}: {state.message}")
        else:
            failed.append(f"{params}: {state.message}")
    total = len(rows) + len(failed)
    gate_summary = (f"{len(gate_failed)} of {len(rows)} failed the evaluation gate: " + "; ".join(gate_failed)
                    if gate_failed else f"none of {len(rows)} failed the evaluation gate")
    if rows:
        create_table_artifact(key="tunedag-sweep", table=rows,
                              description=f"One row per experiment of the sweep; {gate_summary}")
    if failed:
        return Failed(message=f"{len(failed)} of {total} experiments failed: " + "; ".join(failed)
                      + f". Of the {len(rows)} that ran, {gate_summary}")
    return Completed(message=f"{total} experiments ran; {gate_summary}", data=rows)


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

    overrides = dict(item.split("=", 1) for item in args.set)

    def run():
        root = find_repo(None)  # fail before Prefect starts anything
        check_git_state(root)
        check_params(root, dvc_overrides(experiment_settings(args.lora_r, args.lr, args.max_steps, overrides)))
        state = experiment(lora_r=args.lora_r, lr=args.lr, max_steps=args.max_steps, name=args.name,
                           overrides=overrides, return_state=True)
        if not state.is_completed():
            raise TunedagFlowError(state.message or f"the experiment flow ended {state.name}")
        json.dump(state.result(), sys.stdout, indent=2, default=str, ensure_ascii=False)
        print()
        if state.name == "GateFailed":  # the experiment is there to compare, but the model would not ship
            print(state.message, file=sys.stderr)
            raise SystemExit(1)

    cli(run)


if __name__ == "__main__":
    main()
