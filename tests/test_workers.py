"""Prefect beyond one process: a real `prefect server start`, a process work pool, the deployments
put on it with `python -m flows.deploy --pool`, and a real `prefect worker start` that runs the
pipeline flow on the tiny model when a flow run is created through the REST API with parameters
(what the UI's Run button does). Also: the errors for a missing pool, and prefect.yaml's
deployments registered on a Kubernetes pool (not run: no cluster here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    TINY_PARAMS,
    UP_TO_DATE,
    api_post,
    make_project,
    merge_dicts,
    ok,
    wait_for,
)

POOL = "tunedag"
# Up to tokenize: three real stages on the tiny model, one of them tagged heavy, in under a minute
# here (tests/test_flows.py covers the flow past them: the gate, failures, retries).
TARGETS = ["tokenize"]
STAGES = ["base", "generate", "tokenize"]  # tokenize and its upstream, as dvc.yaml has them


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base) -> Path:
    """A fresh clone-like copy of the repo whose base model is the tiny one; nothing reproduced."""
    return make_project(tmp_path_factory.mktemp("workers") / "repo",
                        merge_dicts(TINY_PARAMS, {"model": {"source": str(tiny_base)}}))


@pytest.fixture(scope="module")
def env(real_server, tmp_path_factory) -> dict[str, str]:
    """What a user's shell has: the venv's bin/ first on PATH (prefect, dvc, python) and
    PREFECT_API_URL; none of this machine's Prefect or DVC settings (a HOME and PREFECT_HOME of
    its own). No PYTHONPATH: the deployment's pull step puts the flow run in the checkout."""
    home = tmp_path_factory.mktemp("home")
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "PYTHONPATH"}
    return {**base, "HOME": str(home), "PREFECT_HOME": str(home / ".prefect"), "PREFECT_API_URL": real_server,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def deployment(api: str, flow: str, name: str) -> dict:
    response = httpx.get(f"{api}/deployments/name/{flow}/{name}", timeout=10)
    response.raise_for_status()
    return response.json()


def test_missing_pool_is_one_paragraph_naming_it_and_the_fix(real_server, project, env):
    # deploying to a pool the server does not have
    result = run([sys.executable, "-m", "flows.deploy", "--pool", "tunedga"], project, env)
    assert result.returncode == 1
    assert result.stderr.startswith("error: Work pool 'tunedga' (--pool) does not exist on the Prefect server at "
                                    f"{real_server}"), result.stderr
    assert "`prefect work-pool create tunedga --type process`" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    # a pool of a kind whose jobs cannot see this checkout
    ok(run(["prefect", "work-pool", "create", "containers", "--type", "docker"], project, env))
    result = run([sys.executable, "-m", "flows.deploy", "--pool", "containers"], project, env)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "Work pool 'containers' (--pool) is a 'docker' pool" in result.stderr and "prefect.yaml" in result.stderr
    assert not api_post(real_server, "/deployments/filter",  # nothing was deployed there
                        {"work_pools": {"name": {"any_": ["tunedga", "containers"]}}})
    # a worker given no pool: Prefect's own message names the option, and it exits 1
    result = run(["prefect", "worker", "start"], project, env, timeout=60)
    assert result.returncode == 1 and "Missing required option '--pool'" in result.stdout + result.stderr


def test_worker_runs_a_deployment_started_through_the_api(real_server, project, env, tmp_path):
    ok(run(["prefect", "work-pool", "create", POOL, "--type", "process"], project, env))
    deployed = ok(run([sys.executable, "-m", "flows.deploy", "--pool", POOL], project, env))
    assert f"prefect worker start --pool {POOL}" in deployed.stdout
    on_demand = deployment(real_server, "tunedag-pipeline", "on-demand")
    assert on_demand["work_pool_name"] == POOL
    assert on_demand["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}]
    assert {d["name"]: d["work_pool_name"] for d in api_post(real_server, "/deployments/filter", {})} == dict.fromkeys(
        ["nightly", "on-demand", "experiment", "sweep"], POOL)

    # The worker starts elsewhere (its own folder): the deployment's pull step finds the checkout.
    log = tmp_path / "worker.log"
    worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}  # default: 10 s between polls
    with open(log, "w") as out:
        worker = subprocess.Popen(["prefect", "worker", "start", "--pool", POOL], cwd=tmp_path, env=worker_env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # What the UI's Run -> Custom run does: a flow run of the deployment with these parameters.
        created = api_post(real_server, f"/deployments/{on_demand['id']}/create_flow_run",
                           {"parameters": {"targets": TARGETS}})

        def finished():
            flow_run = httpx.get(f"{real_server}/flow_runs/{created['id']}", timeout=10).json()
            return flow_run if flow_run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        flow_run = wait_for(finished, 240, f"the flow run to finish (worker log: {log})")
        assert flow_run["state"]["type"] == "COMPLETED", (flow_run["state"], log.read_text()[-3000:])
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()

    # The worker ran it: pool, queue and the parameters the run was created with.
    assert (flow_run["work_pool_name"], flow_run["work_queue_name"]) == (POOL, "default")
    assert flow_run["parameters"]["targets"] == TARGETS and flow_run["parameters"]["repo_dir"] == str(project)
    assert f"submitting flow run '{created['id']}'" in log.read_text()
    # One task run per stage, each ran, with dvc.yaml's meta.prefect tags (generate: heavy)
    tasks = {t["name"]: t for t in api_post(real_server, "/task_runs/filter",
                                            {"flow_runs": {"id": {"any_": [created["id"]]}}})}
    assert sorted(tasks) == sorted(STAGES)
    assert {t["state"]["type"] for t in tasks.values()} == {"COMPLETED"}
    assert "heavy" in tasks["generate"]["tags"] and "heavy" not in tasks["tokenize"]["tags"]
    artifacts = api_post(real_server, "/artifacts/filter", {"artifacts": {"key": {"any_": ["tunedag-stages"]}},
                                                             "flow_runs": {"id": {"any_": [created["id"]]}}})
    assert [row["result"] for row in json.loads(artifacts[0]["data"])] == ["ran"] * len(STAGES)
    # The real effect, in the checkout: DVC's outputs and dvc.lock, up to date; train never ran.
    assert any((project / "data" / "tokenized").iterdir())
    status = ok(run(["dvc", "status", "--with-deps", *TARGETS], project, env))
    assert UP_TO_DATE in status.stdout, status.stdout
    assert not (project / "work").exists()


def test_prefect_yaml_registers_the_deployments_on_a_kubernetes_pool(real_server, project, env):
    """prefect.yaml, deployed as docs/distributed.md says: registered, not run (no cluster here). A
    Docker pool takes the same job variables (image, command)."""
    pool = "tunedag-k8s"
    ok(run(["prefect", "work-pool", "create", pool, "--type", "kubernetes"], project, env))
    git_url, image = "https://git.example.com/you/tunedag.git", "registry.example.com/tunedag:1"
    ok(run(["prefect", "--no-prompt", "deploy", "--all"], project,
           {**env, "TUNEDAG_POOL": pool, "TUNEDAG_GIT_URL": git_url, "TUNEDAG_IMAGE": image}, timeout=240))
    found = {d["name"]: d for d in api_post(real_server, "/deployments/filter",
                                            {"work_pools": {"name": {"any_": [pool]}}})}
    assert sorted(found) == ["experiment", "nightly", "on-demand", "sweep"]
    assert found["nightly"]["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    assert found["sweep"]["parameters"] == {"lora_r": [8, 16]}
    for deployment in found.values():
        clone, workdir, pull = deployment["pull_steps"]
        assert clone["prefect.deployments.steps.git_clone"]["repository"] == git_url  # read at deploy time
        assert workdir["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ clone.directory }}"
        assert pull["prefect.deployments.steps.run_shell_script"]["script"] == "dvc pull --run-cache --allow-missing"
        assert deployment["job_variables"]["image"] == image
        assert "dvc push --run-cache" in deployment["job_variables"]["command"]
        # the parameter form the UI shows comes from the flow's signature
        assert deployment["parameter_openapi_schema"]["properties"]
