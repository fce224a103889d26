"""Prefect orchestration over dvc.yaml (flows/): real DVC and real Prefect on a toy DVC project whose
stages take milliseconds, so the tests check the orchestration, not the model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from flows.experiment import experiment, sweep
from flows.pipeline import pipeline, read_stages
from tests.conftest import api_post, wait_for
from tunedag.core.io import read_yaml
from tunedag.evaluation.gate import gate_verdict, read_gate
from tunedag.serving.server import free_port

REPO = Path(__file__).resolve().parents[1]

# A diamond: prep -> (left, right) -> evaluate, reading the project's own params.yaml (copied), so
# the experiment flow's schema check passes. `fail: <stage>` in toy.yaml makes that stage exit 3.
# evaluate writes metrics/eval.json with a gate like stages/evaluate.py's: the toy's identity_acc
# is lora.r / 8 (at most 1), so lora.r 4 fails eval.min_identity_acc and 8 or more passes.
TOY_STEP = '''\
import json, os, sys, yaml
from tunedag.core.params import load_params
name, out, *inputs = sys.argv[1:]
params = load_params()  # as the real stages read it: recipe keys (lora.r) resolved
print(f"{name}: start", flush=True)
if yaml.safe_load(open("toy.yaml"))["fail"] == name:
    print(f"{name}: failing on purpose", file=sys.stderr, flush=True)
    sys.exit(3)
text = "".join(open(i, encoding="utf-8").read() for i in inputs) + f"{name}={params.data.name}\\n"
open(out, "w", encoding="utf-8").write(text)
print(f"{name}: wrote {out}", flush=True)
if name == "evaluate":
    acc, limit = min(1.0, params.lora.r / 8), params.eval.min_identity_acc
    failures = [] if acc >= limit else [f"identity_acc {acc:.3f} < eval.min_identity_acc {limit}"]
    os.makedirs("metrics", exist_ok=True)
    json.dump({"identity_acc": acc, "gate": {"passed": not failures, "failures": failures}},
              open("metrics/eval.json", "w"))
'''
TOY_DVC_YAML = textwrap.dedent("""\
    stages:
      prep:
        cmd: python step.py prep prep.txt
        deps: [step.py]
        params: [data.name, train.max_steps]
        outs: [prep.txt]
      left:
        cmd: python step.py left left.txt prep.txt
        deps: [step.py, prep.txt]
        outs: [left.txt]
      right:
        cmd: python step.py right right.txt prep.txt
        deps: [step.py, prep.txt]
        params: [{toy.yaml: [fail]}]
        outs: [right.txt]
        meta:
          prefect: {retries: 1, retry_delay_seconds: 0, tags: [toy]}
      evaluate:
        cmd: python step.py evaluate evaluate.txt left.txt right.txt
        deps: [step.py, left.txt, right.txt]
        params: [lora.r, eval.min_identity_acc]
        outs: [evaluate.txt]
        metrics:
          - metrics/eval.json: {cache: false}
    """)
STAGES = ["prep", "left", "right", "evaluate"]


def make_toy(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "step.py").write_text(TOY_STEP)
    shutil.copyfile(REPO / "params.yaml", root / "params.yaml")
    (root / "toy.yaml").write_text("fail: none\n")
    (root / "dvc.yaml").write_text(TOY_DVC_YAML)
    # What `dvc repro` would add, committed up front so the repo stays clean for `dvc exp run`.
    (root / ".gitignore").write_text("/prep.txt\n/left.txt\n/right.txt\n/evaluate.txt\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "toy"]):
        subprocess.run(cmd, cwd=root, check=True)
    return root


@pytest.fixture
def toy(tmp_path) -> Path:
    return make_toy(tmp_path / "toy")


@pytest.fixture(scope="session")
def prefect_harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def task_runs(flow_run_id) -> dict:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run for run in runs}


def log_messages(flow_run_id) -> list[str]:
    APILogHandler().flush()  # logs go to the API in batches: send them now
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def artifact(key: str, flow_run_id):
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                      flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert found, f"no artifact {key!r} on flow run {flow_run_id}"
    return json.loads(found[0].data) if found[0].type == "table" else found[0].data


def set_params(root: Path, *overrides: str) -> None:
    """Edit the toy's params.yaml the way `dvc exp run -S` does (DVC's own code)."""
    from dvc.utils.hydra import apply_overrides

    apply_overrides(root / "params.yaml", list(overrides))


def toy_name(root: Path):
    return read_yaml(root / "params.yaml")["data"]["name"]


def graph_labels(flow_run_id, api: str | None = None) -> list[str]:
    """The task-run nodes of the UI's flow-run graph, as the UI gets them (/graph-v2)."""
    graph = httpx.get(f"{api or PREFECT_API_URL.value()}/flow_runs/{flow_run_id}/graph-v2", timeout=10).json()
    return sorted(node["label"] for _, node in graph["nodes"])


def exp_show(root: Path) -> dict:
    """{experiment name: params.yaml of it}, from `dvc exp show --json`."""
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=root, capture_output=True,
                                      text=True, check=True).stdout)
    return {rev["name"]: rev["data"]["params"]["params.yaml"]["data"]
            for baseline in shown for exp in baseline.get("experiments") or [] for rev in exp["revs"]}


# --- the DAG comes from dvc.yaml ----------------------------------------------------------------

def test_stages_come_from_dvc_yaml_upstream_first(toy):
    stages = read_stages(toy)
    assert [stage.name for stage in stages] == STAGES
    by_name = {stage.name: stage for stage in stages}
    assert by_name["prep"].upstream == []
    assert by_name["evaluate"].upstream == ["left", "right"]
    assert "metrics/eval.json" in by_name["evaluate"].outs
    assert (by_name["right"].retries, by_name["right"].retry_delay_seconds, by_name["right"].tags) == (1, 0, ["toy"])
    assert (by_name["left"].retries, by_name["left"].tags) == (0, [])
    # a target brings its upstream, like `dvc repro right`
    assert [stage.name for stage in read_stages(toy, ["right"])] == ["prep", "right"]


# --- the pipeline flow --------------------------------------------------------------------------

def test_pipeline_runs_stages_skips_unchanged_ones_and_reports_the_gate(toy, prefect_harness):
    first = pipeline(repo_dir=str(toy), return_state=True)
    assert first.is_completed(), first.message
    assert first.name == "Completed"  # the gate passed (lora.r 8 or more)
    assert first.result() == dict.fromkeys(STAGES, "ran")
    assert (toy / "evaluate.txt").read_text() == "".join(f"{s}={toy_name(toy)}\n" for s in ["prep", "left", "prep", "right", "evaluate"])
    flow_run_id = first.state_details.flow_run_id
    runs = task_runs(flow_run_id)
    assert sorted(runs) == sorted(STAGES)
    assert "toy" in runs["right"].tags and "dvc-stage" in runs["left"].tags
    # the stage's own output, streamed into the Prefect log of its task
    assert "right: wrote right.txt" in log_messages(flow_run_id)
    assert artifact("tunedag-stages", flow_run_id) == [{"stage": s, "result": "ran"} for s in STAGES]
    assert {"file": "metrics/eval.json", "metric": "identity_acc", "value": 1.0} in artifact("tunedag-metrics", flow_run_id)
    assert graph_labels(flow_run_id) == sorted(STAGES)

    second = pipeline(repo_dir=str(toy), return_state=True)
    assert second.result() == dict.fromkeys(STAGES, "skipped")
    runs = task_runs(second.state_details.flow_run_id)
    # Skipped stages are named so: the flow-run graph shows a node's name, colored by state type.
    assert sorted(runs) == sorted(f"{s} (skipped)" for s in STAGES)
    assert {run.state.name for run in runs.values()} == {"Skipped"}
    assert graph_labels(second.state_details.flow_run_id) == sorted(runs)

    # Only evaluate reads lora.r: it reruns, the rest is skipped, and the toy's gate fails.
    set_params(toy, "lora.r=4")
    third = pipeline(repo_dir=str(toy), return_state=True)
    assert (third.type.value, third.name) == ("FAILED", "GateFailed")
    assert third.message == gate_verdict(read_gate(toy / "metrics/eval.json"))
    assert third.message.startswith("GATE FAILED: identity_acc 0.500 < eval.min_identity_acc ")
    runs = task_runs(third.state_details.flow_run_id)
    assert sorted(runs) == sorted(["prep (skipped)", "left (skipped)", "right (skipped)", "evaluate"])
    assert runs["evaluate"].state.name == "Completed"
    assert graph_labels(third.state_details.flow_run_id) == sorted(runs)


def test_failing_stage_fails_the_flow_and_downstream_does_not_run(toy, prefect_harness):
    (toy / "toy.yaml").write_text("fail: right\n")
    state = pipeline(repo_dir=str(toy), return_state=True)
    assert state.is_failed() and state.name == "Failed"
    assert "stage right failed; not run: evaluate" in state.message
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["right"].state.is_failed() and "exited with 3" in runs["right"].state.message
    assert runs["right"].run_count == 2  # meta.prefect.retries: 1
    assert runs["evaluate"].state.name == "NotReady" and runs["evaluate"].run_count == 0
    assert runs["left"].state.is_completed()
    assert not (toy / "evaluate.txt").exists()


# --- the experiment flow ------------------------------------------------------------------------

def test_experiment_flow_is_a_dvc_experiment(toy, prefect_harness):
    # Values Hydra's override grammar rejects unquoted (non-ASCII, a quote) or would split (a comma).
    names = {"data.name": "小智", "data.owner": "O'Neil, Ada"}
    state = experiment(max_steps=7, overrides=names, name="exp-from-prefect", repo_dir=str(toy), return_state=True)
    assert state.is_completed(), state.message
    assert state.name == "Completed"  # the gate passed
    assert state.result()["train.max_steps"] == 7 and state.result()["data.name"] == "小智"
    params = exp_show(toy)["exp-from-prefect"]
    assert params["data"]["name"] == "小智" and params["data"]["owner"] == "O'Neil, Ada"
    assert params["train"]["max_steps"] == 7  # a number stays a number
    rows = artifact("tunedag-experiment", state.state_details.flow_run_id)
    assert {"column": "metrics/eval.json:identity_acc", "value": 1.0} in rows
    # --temp: the workspace is untouched
    assert (toy / "params.yaml").read_text() == (REPO / "params.yaml").read_text()


def test_experiment_with_invalid_params_fails_before_dvc_runs(toy, prefect_harness):
    for overrides, expected in [({"lora.r": "abc"}, "invalid params in params.yaml with lora.r=abc: lora.r: "),
                                ({"lora.rank": "8"}, "Cannot set lora.rank=8 in params.yaml: Could not override 'lora.rank'.")]:
        state = experiment(overrides=overrides, repo_dir=str(toy), return_state=True)
        assert state.is_failed() and expected in state.message, state.message
        assert "\n" not in state.message
        assert not task_runs(state.state_details.flow_run_id)  # no `dvc exp run` task
    assert exp_show(toy) == {}
    assert (toy / "params.yaml").read_text() == (REPO / "params.yaml").read_text()


def test_sweep_keeps_experiments_that_fail_the_gate_and_counts_them(toy, prefect_harness):
    state = sweep(lora_r=[4, 8], repo_dir=str(toy), return_state=True)
    assert state.is_completed(), state.message
    assert state.message.startswith("2 experiments ran; 1 of 2 failed the evaluation gate: {'lora_r': 4}: GATE FAILED: ")
    rows = state.result()
    assert [(row["lora.r"], row["metrics/eval.json:gate.passed"]) for row in rows] == [(4, False), (8, True)]
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
    by_r = {run.parameters["lora_r"]: run.state for run in children}
    assert (by_r[4].type.value, by_r[4].name) == ("COMPLETED", "GateFailed")
    assert by_r[4].message.startswith("GATE FAILED: identity_acc 0.500 < eval.min_identity_acc ")
    assert (by_r[8].type.value, by_r[8].name) == ("COMPLETED", "Completed")
    assert {name: params["lora"]["r"] for name, params in exp_show(toy).items()} == {
        row["experiment"]: row["lora.r"] for row in rows}


def add_untracked_dep(toy: Path) -> None:
    """A new input of `prep` that git does not know (the temp experiment copy would lack it)."""
    (toy / "extra.txt").write_text("new input")
    (toy / "notes.txt").write_text("untracked, but no stage reads it")
    (toy / "dvc.yaml").write_text(TOY_DVC_YAML.replace("deps: [step.py]", "deps: [step.py, extra.txt]", 1))


def test_experiment_refuses_untracked_inputs_clearly(toy, prefect_harness):
    add_untracked_dep(toy)
    state = experiment(lora_r=4, repo_dir=str(toy), return_state=True)
    assert state.is_failed()
    assert "Untracked files that the pipeline reads" in state.message and "extra.txt" in state.message
    assert "notes.txt" not in state.message
    assert exp_show(toy) == {}


# --- errors from the command line: one paragraph, exit 1, no traceback --------------------------

def run_cli(module: str, cwd: Path, *args: str, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**base, "PYTHONPATH": str(REPO), **env})


@pytest.mark.parametrize("case", ["no dvc", "server down", "untracked", "invalid params"])
def test_cli_errors_are_one_clear_paragraph(case, toy):
    if case == "no dvc":
        # the venv's python, but a PATH without the venv's bin/ (where dvc lives)
        result = run_cli("flows.pipeline", toy, PATH="/usr/bin:/bin")
        expected = "The `dvc` command was not found on PATH"
    elif case == "server down":
        result = run_cli("flows.pipeline", toy, PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
        expected = "is unreachable"
    elif case == "untracked":
        add_untracked_dep(toy)
        result = run_cli("flows.experiment", toy)
        expected = "Untracked files that the pipeline reads"
    else:
        result = run_cli("flows.experiment", toy, "--set", "data.name=小智", "--set", "lora.r=abc")
        expected = "invalid params in params.yaml with data.name='小智', lora.r=abc: lora.r: "
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


# --- a real `prefect server start`: REST API, UI, schedules, deployments --------------------------

def latest_pipeline_run(api: str) -> dict:
    """The newest run of tunedag-pipeline started from the command line (not a deployment)."""
    return api_post(api, "/flow_runs/filter", {"flows": {"name": {"any_": ["tunedag-pipeline"]}},
                                               "flow_runs": {"deployment_id": {"is_null_": True}},
                                               "sort": "START_TIME_DESC", "limit": 1})[0]


def test_real_server_runs_the_pipeline_and_the_ui_shows_it(real_server, toy, tmp_path):
    result = run_cli("flows.pipeline", toy, PREFECT_API_URL=real_server)
    assert result.returncode == 0, result.stderr[-2000:]
    flow_run = latest_pipeline_run(real_server)
    assert flow_run["state"]["type"] == "COMPLETED"
    tasks = api_post(real_server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
    assert sorted((t["name"], t["state"]["type"]) for t in tasks) == sorted((s, "COMPLETED") for s in STAGES)

    # Only evaluate reads lora.r: it reruns alone, the others show as skipped, the gate fails.
    set_params(toy, "lora.r=4")
    result = run_cli("flows.pipeline", toy, PREFECT_API_URL=real_server)
    verdict = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and verdict.startswith("GATE FAILED: identity_acc 0.500"), result.stderr[-2000:]
    flow_run = latest_pipeline_run(real_server)
    assert (flow_run["state"]["type"], flow_run["state"]["name"], flow_run["state"]["message"]) == (
        "FAILED", "GateFailed", verdict)
    assert graph_labels(flow_run["id"], real_server) == sorted(
        ["prep (skipped)", "left (skipped)", "right (skipped)", "evaluate"])

    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (bash scripts/install-system.sh); the UI check needs it")
    shot, dom = tmp_path / "prefect-flow-run.png", tmp_path / "prefect-flow-run.html"
    url = f"{real_server.removesuffix('/api')}/runs/flow-run/{flow_run['id']}"
    subprocess.run(["bash", str(REPO / "scripts" / "screenshot-prefect.sh"), url, str(shot)], check=True,
                   timeout=120, env={**os.environ, "DOM_OUT": str(dom)})
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 30_000
    page = dom.read_text()
    assert flow_run["name"] in page  # the run's page rendered, with data from the API ...
    assert "dvc repro --single-item evaluate" in page  # ... and the stages' logs
    assert "GateFailed" in page
    assert "Can't connect to Server API" not in page


def test_deploy_serves_a_nightly_schedule_and_parametrised_experiments(real_server, toy):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
           "PREFECT_API_URL": real_server, "PYTHONPATH": str(REPO),
           "PREFECT_RUNNER_POLL_FREQUENCY": "1"}  # default 10 s between looks for new runs
    serving = subprocess.Popen([sys.executable, "-m", "flows.deploy", "--repo-dir", str(toy)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def served():
            found = {d["name"]: d for d in api_post(real_server, "/deployments/filter", {})}
            return found if found.keys() >= {"nightly", "on-demand", "experiment", "sweep"} else None

        deployments = wait_for(served, 90, "the served deployments")
        nightly = deployments["nightly"]
        assert nightly["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        # the server's scheduler creates the upcoming nightly runs by itself
        scheduled = wait_for(lambda: api_post(real_server, "/flow_runs/filter", {
            "deployments": {"id": {"any_": [nightly["id"]]}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}),
            30, "scheduled runs")
        assert all(run["expected_start_time"][11:16] == "03:00" for run in scheduled)

        # a run with parameters, as from the UI's "Run" button, executes in the serving process
        run = api_post(real_server, f"/deployments/{deployments['experiment']['id']}/create_flow_run",
                       {"parameters": {"max_steps": 11, "name": "exp-from-ui"}})
        final = wait_for(lambda: (s := httpx.get(f"{real_server}/flow_runs/{run['id']}").json()["state"])["type"]
                         in ("COMPLETED", "FAILED", "CRASHED") and s, 120, "the experiment run")
        assert final["type"] == "COMPLETED", final
        assert exp_show(toy)["exp-from-ui"]["train"]["max_steps"] == 11
    finally:
        os.killpg(serving.pid, signal.SIGTERM)
        serving.wait(timeout=30)
