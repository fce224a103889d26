"""The DVC remote on S3: README's S3 recipe ("Share artifacts: the DVC remote"), run as written against
moto's S3 server on 127.0.0.1 (a real subprocess speaking the S3 protocol), on the tiny model. Alice
points the remote at the bucket and pushes; a teammate clones and pulls through S3 and gets the same
bytes. The keys are fake and exist only in this test's environment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.conftest import (
    REPO,
    UP_TO_DATE,
    copy_project,
    run_cmd,
    tree_files,
)

BUCKET = "tunedag-team"
PIP_LINE = "pip install -e '.[s3]'"
TEAMMATE = "# a teammate"


def s3_recipe() -> tuple[str, str]:
    """README's S3 block, without its `pip install` line, split where the teammate starts:
    (Alice's commands, the teammate's)."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!-- s3-recipe\b.*?-->\n```bash\n(.*?)\n```", readme, re.DOTALL)
    assert match, "README.md lost its `<!-- s3-recipe -->` block"
    lines = match.group(1).splitlines()
    assert lines[0].split("#")[0].strip() == PIP_LINE, lines[0]
    assert any(line.startswith("dvc remote modify storage endpointurl $S3_ENDPOINT") for line in lines)
    start = next(i for i, line in enumerate(lines) if line.startswith(TEAMMATE))
    return "\n".join(lines[1:start]), "\n".join(lines[start:])


def run_script(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The recipe's lines as one bash script: stops at the first failing command, names unset
    variables an error, echoes each command (-x) for the failure message."""
    result = run_cmd(["bash", "-euxo", "pipefail", "-c", script], cwd, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture
def aws_env(tmp_path, monkeypatch) -> dict[str, str]:
    """HOME and AWS settings for this test only: fake keys, no profile or config file of the user's
    (~/.aws resolves into the temp HOME), no instance-metadata lookups."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[user]\n\tname = t\n\temail = t@t\n")  # the recipe commits
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    env = {"HOME": str(home), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           # Only 127.0.0.1 is reached: a request for anywhere else (AWS itself, were the endpoint
           # lost) goes to a proxy port where nothing listens, and fails here.
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost"}
    for name in ("http_proxy", "https_proxy", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_endpoint(tmp_path, aws_env):
    """moto's S3 server on 127.0.0.1, on a port the OS picks (it prints it), with the bucket made."""
    import boto3

    log = tmp_path / "moto.log"
    with open(log, "w") as fh:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                                  stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **aws_env})
    try:
        deadline = time.time() + 60
        while not (port := re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text())):
            assert server.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port.group(1)}"
        s3 = boto3.client("s3", endpoint_url=endpoint)  # keys and region: aws_env
        s3.create_bucket(Bucket=BUCKET)
        yield endpoint, s3
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_readme_s3_recipe_pushes_and_a_teammate_pulls(tmp_path, tiny_pipeline, aws_env, s3_endpoint):
    endpoint, s3 = s3_endpoint
    alice_script, teammate_script = s3_recipe()
    # The recipe's `pip install -e '.[s3]'` is the one line not run (it would reinstall this venv's
    # tunedag from the temp copy): its extra is what the dev install already brought.
    s3_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["s3"]
    assert any(req.startswith("dvc-s3") for req in s3_extra)
    import dvc_s3  # noqa: F401

    # Alice: the tiny model through the whole pipeline, committed, with the git remote the team shares.
    alice = copy_project(tiny_pipeline, tmp_path / "alice")
    origin = tmp_path / "origin.git"
    for cmd, cwd in ((["git", "init", "-q", "--bare", str(origin)], tmp_path),
                     (["git", "remote", "add", "origin", str(origin)], alice),
                     (["git", "push", "-q", "-u", "origin", "HEAD"], alice)):
        result = run_cmd(cmd, cwd)
        assert result.returncode == 0, result.stderr

    env = {**aws_env, "BUCKET": BUCKET, "S3_ENDPOINT": endpoint, "REPO": str(origin)}
    run_script(alice_script, alice, env)

    # The address is committed and pushed; the keys are nowhere in git.
    config = run_cmd(["git", "show", "@{u}:.dvc/config"], alice).stdout
    assert f"url = s3://{BUCKET}/tunedag" in config and f"endpointurl = {endpoint}" in config, config
    assert aws_env["AWS_SECRET_ACCESS_KEY"] not in config and not (alice / ".dvc/config.local").exists()
    # Every file of Alice's cache is an object in the bucket, in DVC's files/md5 layout.
    cache = alice / ".dvc/cache"
    cached = {str(p.relative_to(cache)) for p in (cache / "files/md5").rglob("*") if p.is_file()}
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="tunedag/")
    objects = {obj["Key"].removeprefix("tunedag/") for page in pages for obj in page.get("Contents", [])}
    assert cached and any(name.endswith(".dir") for name in cached)
    assert objects == cached

    # The teammate: a clone elsewhere, a fresh cache, everything through S3.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_script(teammate_script, elsewhere, env)
    bob = elsewhere / "tunedag"
    status = run_cmd(["dvc", "status", "gguf"], bob, env=env)  # serve_check: no outputs, never run
    assert status.returncode == 0 and UP_TO_DATE in status.stdout, status.stdout + status.stderr
    for artifact in ("models/base", "data/tokenized", "work", "models/merged", "models/gguf"):
        assert tree_files(bob / artifact) == tree_files(alice / artifact), artifact
