"""Reproducibility and faults through real DVC, git and subprocesses, on the tiny model:
a teammate's clone + `dvc pull`, `tunedag verify`, two `dvc repro` at once, kill -9 while convert or
merge writes, and write errors (a full disk, simulated with RLIMIT_FSIZE)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    UP_TO_DATE,
    copy_project,
    merge_dicts,
    ok,
    run_cmd,
    tree_files,
)

STAGES = ["base", "generate", "tokenize", "train", "convert", "merge", "evaluate", "export", "gguf"]  # serve_check: verify skips it


@pytest.fixture(scope="module", autouse=True)
def home(tmp_path_factory):
    """A HOME of its own: the default DVC remote (~/.local/share/tunedag/dvc-storage, .dvc/config)
    resolves inside it, so the tests push to the real default without touching the user's."""
    home = tmp_path_factory.mktemp("home")
    (home / ".gitconfig").write_text("[user]\n\tname = t\n\temail = t@t\n")  # dvc exp run commits
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_pipeline, home) -> Path:
    """Alice's project (the shared tiny pipeline, after `dvc repro`, committed), with a bare git
    remote `origin` (what a team shares)."""
    root = copy_project(tiny_pipeline, tmp_path_factory.mktemp("team") / "alice")
    origin = root.parent / "origin.git"
    for cmd, cwd in ((["git", "init", "-q", "--bare", str(origin)], root.parent),
                     (["git", "remote", "add", "origin", str(origin)], root),
                     (["git", "push", "-q", "origin", "HEAD"], root)):
        result = run_cmd(cmd, cwd)
        assert result.returncode == 0, result.stderr
    return root


def lock_md5(root: Path, stage: str, out: str) -> str:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == out)


def dvc_status(root: Path, stage: str) -> str:
    status = run_cmd(["dvc", "status", stage], root)
    assert status.returncode == 0, status.stderr
    return status.stdout


def chat_answer(root: Path, question: str) -> str:
    """`tunedag chat --model-dir models/merged` with the question piped in: the answer it prints."""
    chat = ok(run_cmd([sys.executable, "-m", "tunedag", "chat", "--model-dir", "models/merged", "--max-tokens", "8"],
                      root, input=question + "\n", timeout=600))
    assert chat.stdout.count("\n") == 1 and chat.stdout.strip(), chat.stdout  # piped: one answer line
    return chat.stdout


def test_teammate_clones_pulls_and_everything_is_up_to_date(project, home, tmp_path_factory):
    ok(run_cmd(["dvc", "push"], project, timeout=600))
    assert (home / ".local/share/tunedag/dvc-storage/files/md5").is_dir()  # the default remote, from .dvc/config

    # Bob works elsewhere on the machine: the default remote resolves to the same place.
    bob = tmp_path_factory.mktemp("elsewhere") / "deeper" / "bob"
    ok(run_cmd(["git", "clone", "-q", str(project.parent / "origin.git"), str(bob)], project.parent))
    assert not (bob / "models").exists()
    ok(run_cmd(["dvc", "pull"], bob, timeout=600))
    assert UP_TO_DATE in dvc_status(bob, "evaluate")
    repro = ok(run_cmd(["dvc", "repro", "evaluate"], bob, timeout=600))
    assert UP_TO_DATE in repro.stdout and "Running stage" not in repro.stdout
    for artifact in ("models/merged", "models/adapter", "work", "data/tokenized", "metrics/train", "env"):
        assert tree_files(bob / artifact) == tree_files(project / artifact), artifact
    assert chat_answer(bob, "Who are you?") == chat_answer(project, "Who are you?")

    # An experiment: Alice runs and pushes it, Bob pulls and applies it and gets that model.
    # To gguf: serve_check would start vLLM on a random-weight model that passes the wide-open gate.
    ok(run_cmd(["dvc", "exp", "run", "-n", "r8", "-S", "lora.r=8", "gguf"], project, timeout=1800))
    ok(run_cmd(["dvc", "exp", "push", "origin", "r8"], project, timeout=600))
    exp_merged = lock_md5(project, "merge", "models/merged")  # the workspace holds the experiment's results
    assert exp_merged != lock_md5(bob, "merge", "models/merged")
    exp_answer = chat_answer(project, "Who are you?")
    ok(run_cmd(["dvc", "exp", "pull", "origin", "r8"], bob, timeout=600))
    ok(run_cmd(["dvc", "exp", "apply", "r8"], bob, timeout=600))
    ok(run_cmd(["dvc", "pull"], bob, timeout=600))
    assert yaml.safe_load((bob / "params.yaml").read_text())["lora"]["r"] == 8
    assert lock_md5(bob, "merge", "models/merged") == exp_merged
    assert UP_TO_DATE in dvc_status(bob, "evaluate")
    assert tree_files(bob / "models/merged") == tree_files(project / "models/merged")
    assert chat_answer(bob, "Who are you?") == exp_answer

    # Back to the committed state for the tests that follow.
    ok(run_cmd(["git", "reset", "-q", "--hard", "HEAD"], project))
    ok(run_cmd(["dvc", "checkout", "--force"], project))
    assert UP_TO_DATE in dvc_status(project, "evaluate")


def test_verify_rebuilds_byte_identical_and_reports_a_different_model(project, tmp_path):
    report = tmp_path / "verify.json"
    same = ok(run_cmd([sys.executable, "-m", "tunedag", "verify", "--json", str(report)], project, timeout=1800))
    rows = json.loads(report.read_text())
    assert sorted({r["stage"] for r in rows}) == sorted(STAGES)
    assert [r["output"] for r in rows if r["result"] != "match"] == ["metrics/train_speed.json"]  # volatile
    assert {f"env/{s}.json" for s in STAGES} <= {r["output"] for r in rows}
    assert "verify: BYTE-IDENTICAL" in same.stdout

    # A lock that does not describe the project any more: the seed changed, nothing was rerun.
    committed = (project / "params.yaml").read_text()
    params = yaml.safe_load(committed)
    (project / "params.yaml").write_text(yaml.safe_dump({**params, "seed": params["seed"] + 1}))
    try:
        bad = run_cmd([sys.executable, "-m", "tunedag", "verify", "generate", "--json", str(report)], project, timeout=1800)
    finally:
        (project / "params.yaml").write_text(committed)
    assert bad.returncode == 1 and "verify: DIFFERENT" in bad.stdout
    rows = {r["output"]: r for r in json.loads(report.read_text())}
    assert rows["models/base"]["result"] == "match"
    assert rows["data/raw"]["result"] == "DIFFERENT" and "train.jsonl" in rows["data/raw"]["differing_files"]
    assert "environment is identical" in bad.stdout


def test_verify_calls_a_rebuild_on_other_cpu_kernels_numerically_equivalent(project, tmp_path):
    """torch's portable kernels instead of this CPU's SIMD ones (ATEN_CPU_CAPABILITY=default) sum
    floats in another order, as another CPU does: the trained weights move in the last bits."""
    report = tmp_path / "verify.json"
    other = ok(run_cmd([sys.executable, "-m", "tunedag", "verify", "train", "convert", "--json", str(report)], project,
                       env={"ATEN_CPU_CAPABILITY": "default"}, timeout=1800))
    rows = {r["output"]: r for r in json.loads(report.read_text())}
    assert "verify: NUMERICALLY EQUIVALENT" in other.stdout, other.stdout[-3000:]
    assert rows["models/adapter"]["result"] == "equivalent" and 0 < rows["models/adapter"]["max_abs_diff"] < 1e-3
    assert rows["data/tokenized"]["result"] == "match"  # integers: equal on any CPU
    assert rows["env/train.json"]["result"] == "environment"
    assert "cpu_capability: " in other.stdout and "→ DEFAULT" in other.stdout


def test_a_second_dvc_repro_is_refused_while_the_first_runs(project, tmp_path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(merge_dicts(params, {"train": {"lr": 0.002}})))
    log = tmp_path / "first.log"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with open(log, "w") as fh:
        first = subprocess.Popen(["dvc", "repro", "evaluate"], cwd=project, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while "Running stage 'train'" not in log.read_text() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        second = run_cmd(["dvc", "repro", "evaluate"], project, timeout=600)
        assert first.poll() is None, "the first repro ended before the second started: the test proved nothing"
        assert second.returncode != 0
        # DVC's lock message: the outputs are busy, held by the first `dvc repro` (its PID and command).
        assert "is busy, it is being blocked by" in second.stderr and "dvc repro evaluate" in second.stderr, second.stderr
        assert first.wait(timeout=1200) == 0, log.read_text()[-3000:]
        output = log.read_text()
        for stage in ("train", "convert", "merge", "evaluate"):
            assert output.count(f"Running stage '{stage}'") == 1
        assert UP_TO_DATE in dvc_status(project, "evaluate")
    finally:
        first.kill()
        first.wait()  # reaped: DVC frees the locks of processes that are gone
        # Back to the committed state (dvc's autostage staged the new lock and metrics), then its outputs.
        # --really-refresh first: an edit of the same size within the same second looks unchanged to git.
        assert run_cmd(["git", "update-index", "-q", "--really-refresh"], project).returncode == 0
        assert run_cmd(["git", "reset", "-q", "--hard", "HEAD"], project).returncode == 0
        assert run_cmd(["dvc", "checkout", "--force"], project).returncode == 0
    assert UP_TO_DATE in dvc_status(project, "evaluate")


def workspace_files(root: Path) -> dict[str, bytes]:
    """What a user sees: every file but git's, DVC's scratch space and bytecode."""
    return {name: data for name, data in tree_files(root).items()
            if not name.startswith((".git/", ".dvc/tmp/")) and "__pycache__" not in name}


def test_a_bad_param_through_dvc_exp_run_names_the_restore_command_and_it_works(project):
    before = workspace_files(project)
    exp = run_cmd(["dvc", "exp", "run", "-S", "lora.r=abc"], project, timeout=600)
    assert exp.returncode != 0
    message = next(line for line in exp.stderr.splitlines() if line.startswith("error [train]"))
    assert "lora.r: Input should be a valid integer" in message and "(got 'abc')" in message
    # What the message explains: DVC wrote the value and removed train's outputs before train ran.
    assert "r: abc" in (project / "params.yaml").read_text() and not (project / "env/train.json").exists()
    restore = ("git checkout params.yaml env/train.json metrics/train/metrics.json metrics/train_speed.json "
               "metrics/train/plots/metrics && dvc checkout train")
    assert message.endswith(f"`{restore}`."), message
    ok(run_cmd(["bash", "-c", restore], project))
    assert workspace_files(project) == before


def test_a_bad_user_file_through_dvc_repro_names_the_restore_command_and_it_works(project):
    before = workspace_files(project)
    user_file = project / "user_data/general.jsonl"
    good = user_file.read_bytes()
    user_file.write_bytes(good + b'{"messages": [}\n')
    repro = run_cmd(["dvc", "repro", "evaluate"], project, timeout=600)
    assert repro.returncode != 0
    message = next(line for line in repro.stderr.splitlines() if line.startswith("error [generate]"))
    assert "user_data/general.jsonl line 17: bad JSON" in message and not (project / "data/raw").exists()
    restore = "git checkout env/generate.json && dvc checkout generate"
    assert message.endswith(f"restore the last good outputs: `{restore}`."), message
    user_file.write_bytes(good)
    ok(run_cmd(["bash", "-c", restore], project))
    assert workspace_files(project) == before
    assert UP_TO_DATE in dvc_status(project, "evaluate")


def run_and_kill(project: Path, stage: str, when) -> bool:
    """`dvc repro --force` one stage and kill -9 its whole process group (dvc and the stage) once
    `when()` is true. False if the stage finished first."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = ["dvc", "repro", "--force", "--no-run-cache", "--single-item", stage]
    proc = subprocess.Popen(cmd, cwd=project, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if when():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    return False


def assert_recovers(project: Path, stage: str, output: str, recorded: str) -> None:
    """After a kill: no output DVC would accept, then a rerun equal to the uninterrupted one."""
    assert not (project / output).exists()  # DVC removed the old one first; the partial one was never renamed in
    assert UP_TO_DATE not in dvc_status(project, stage)
    repro = run_cmd(["dvc", "repro", "evaluate"], project, timeout=1200)
    assert repro.returncode == 0, repro.stderr[-3000:]
    assert lock_md5(project, stage, output) == recorded
    assert not list(project.glob(f"{Path(output).parent}/.{Path(output).name}.tmp-*")), "temp output left behind"
    assert UP_TO_DATE in dvc_status(project, "evaluate")


def test_kill_while_merge_writes_leaves_nothing_taken_as_valid(project):
    recorded = lock_md5(project, "merge", "models/merged")
    partial = lambda: [p for p in project.glob("models/.merged.tmp-*") if any(p.iterdir())]
    assert any(run_and_kill(project, "merge", partial) for _ in range(3)), "merge was never caught mid-write"
    assert partial(), "the kill came after the temp output was gone"
    # The next stage refuses what is not there rather than reading the partial model.
    evaluate = run_cmd([sys.executable, "-m", "stages.evaluate"], project)
    assert evaluate.returncode == 1 and "Traceback" not in evaluate.stderr, evaluate.stderr[-2000:]
    assert "models/merged" in evaluate.stderr.strip().splitlines()[-1]
    assert_recovers(project, "merge", "models/merged", recorded)


@pytest.mark.parametrize("delay_s", [0.3, 1.5, 3.0])
def test_kill_during_convert_at_several_points(project, delay_s):
    """convert's write lasts milliseconds on the tiny model, so it is killed at several points of
    its run instead (it writes through the same atomic_dir that the merge test catches mid-write)."""
    recorded = lock_md5(project, "convert", "models/adapter")
    started: list[float] = []

    def after_delay() -> bool:
        if not started and not (project / "models/adapter").exists():  # DVC removed it: the stage starts
            started.append(time.time())
        return bool(started) and time.time() - started[0] > delay_s

    if not run_and_kill(project, "convert", after_delay):
        pytest.fail(f"convert finished within {delay_s} s of starting: pick a shorter delay")
    assert_recovers(project, "convert", "models/adapter", recorded)


def limit_file_size(max_bytes: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


@pytest.mark.parametrize("stage, output, limit", [
    ("train", "work/iter_3.pth", 20_000),        # torch.save into our atomic file
    ("merge", "models/merged", 1_000_000),        # safetensors' own writer
])
def test_a_full_disk_gives_a_clear_error_and_no_partial_output(prepared, tmp_path, stage, output, limit):
    workspace = prepared.copy_to(tmp_path / "ws")
    before = tree_files(workspace.root)
    proc = workspace.subprocess(stage, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=limit_file_size(limit))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-2000:]
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"error [{stage}]: {output}: File too large. Check free disk space"), message
    after = tree_files(workspace.root)
    if stage == "train":  # a fresh run clears work/ and metrics first; nothing half-written is left
        assert not [name for name in after if name.startswith("work/")], sorted(after)
    else:
        assert after == before
    assert not [p for p in workspace.root.rglob(".*.tmp-*")], "temp output left behind"
