"""Multi-process training on CPU: the train stage relaunches itself under torchrun as 2 real
processes over gloo (train.nproc_per_node: 2), with torch DDP or DeepSpeed ZeRO-2, and trains like
one process that accumulates twice as many micro-batches; kill -9 + resume; the bad inputs.

What is not tested here (no GPU, one machine): nccl, several nodes (NODE_RANK > 0), bf16."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stages.train import rank_micro_batches
from tests.conftest import REPO, Workspace, tree_files
from tests.test_train import checkpoint_diff, training_outputs
from tunedag.core.errors import UserError
from tunedag.core.params import load_params
from tunedag.model.checkpoints import check_resumable
from tunedag.model.distributed import World

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two training processes need two CPU cores")

# Dropout draws its masks per process (each rank seeds its own stream), so 2 processes cannot equal 1
# process with dropout on: the comparisons run without it. threads: 1 (TINY_PARAMS) in every process.
COMMON = {"lora": {"dropout": 0.0},
          "train": {"max_steps": 6, "save_steps": 2, "batch_size": 1, "evaluation_freq": 100}}
# The same global batch (2 rows a step) three ways: 1 process x 2 micro-batches, 2 processes x 1.
RUNS = {
    "one": {"train": {"nproc_per_node": 1, "accumulative_counts": 2}},
    "ddp": {"train": {"nproc_per_node": 2, "accumulative_counts": 1}},
    "zero2": {"train": {"nproc_per_node": 2, "accumulative_counts": 1, "deepspeed": "zero2"}},
}
# Measured max |delta| of the final LoRA tensors against the one-process run: 0.0 for DDP and for
# ZeRO-2 (2 ranks: x2 then /2 is exact, and gloo sums the two gradients in one order). The values are
# ~0.1, so 1e-6 is ~100 float32 ulps of margin for another machine's kernels.
LORA_ATOL = 1e-6
LOSS_RTOL = 1e-6


@pytest.fixture(scope="module")
def tokenized_once(tmp_path_factory, tiny_base) -> Workspace:
    workspace = Workspace(tmp_path_factory.mktemp("tokenized"), tiny_base)
    workspace.set_params(COMMON)
    with pytest.MonkeyPatch.context() as monkeypatch:
        for stage in ("generate", "tokenize"):
            workspace.run(stage, monkeypatch)
    return workspace


def train_subprocess(workspace: Workspace, timeout: int = 600) -> str:
    """`python -m stages.train` as DVC runs it (it launches torchrun itself); its output."""
    proc = workspace.subprocess("train", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def runs(tokenized_once, tmp_path_factory):
    """name -> a workspace trained the RUNS[name] way, each trained once, on first use."""
    done: dict[str, Workspace] = {}

    def get(name: str) -> Workspace:
        if name not in done:
            workspace = tokenized_once.copy_to(tmp_path_factory.mktemp(name) / "ws")
            workspace.set_params(RUNS[name])
            if name == "one":  # in this process: its imports are paid already
                with pytest.MonkeyPatch.context() as monkeypatch:
                    workspace.run("train", monkeypatch)
            else:
                output = train_subprocess(workspace)
                assert "launching 2 training processes" in output
            done[name] = workspace
        return done[name]

    return get


def lora(root: Path, step: int = 6) -> dict[str, torch.Tensor]:
    return torch.load(root / f"work/iter_{step}.pth", weights_only=True)["lora"]


def loss_history(root: Path) -> list[tuple[int, float]]:
    rows = (root / "metrics/train/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    return [(int(step), float(loss)) for step, loss in (row.split("\t") for row in rows)]


@pytest.mark.parametrize("name", ["ddp", "zero2"])
def test_two_processes_train_like_one_process_accumulating_twice(runs, name):
    one, two = runs("one").root, runs(name).root
    reference, trained = lora(one), lora(two)
    assert reference.keys() == trained.keys()
    delta = max(float((reference[k] - trained[k]).abs().max()) for k in reference)
    assert delta <= LORA_ATOL, f"max |delta| {delta}"
    assert any(float(t.abs().max()) > 1e-3 for k, t in trained.items() if "lora_B" in k)  # training moved B off 0

    # The same data order, logged once: rank 0 alone writes, no duplicate rows.
    history, expected = loss_history(two), loss_history(one)
    assert [step for step, _ in history] == [step for step, _ in expected] == list(range(1, 7))
    assert [loss for _, loss in history] == pytest.approx([loss for _, loss in expected], rel=LOSS_RTOL)
    assert sorted(training_outputs(two)) == sorted(training_outputs(one))  # the same files, no more
    ckpt = torch.load(two / "work/iter_6.pth", weights_only=True)
    assert ckpt["order"]["world_size"] == 2 and len(ckpt["rng"]["ranks"]) == 2
    if name == "zero2":  # each rank's ZeRO-2 shard, as plain data
        shards = ckpt["optimizer"]["zero_shards"]
        assert len(shards) == 2 and shards[0]["partition_count"] == [2]


def test_rank_r_takes_the_micro_batches_k_congruent_to_r():
    indices = list(range(10, 18))  # a global step of 8 rows, micro-batches of 2
    one = rank_micro_batches(indices, 2, World(), None)  # 1 process accumulating 4
    four = [rank_micro_batches(indices, 2, World(rank=r, size=4, local_rank=r, local_size=4), 1) for r in range(4)]
    assert [rows for rows, _ in one] == [rows for rank in four for rows, _ in rank]
    two = [rank_micro_batches(indices, 2, World(rank=r, size=2, local_rank=r, local_size=2), 2) for r in range(2)]
    assert two == [[([10, 11], 1.0), ([14, 15], 1.0)], [([12, 13], 1.0), ([16, 17], 1.0)]]
    # A short last step (epochs ran out): ranks without rows get a weight-0 stand-in, as many backward passes.
    short = [rank_micro_batches([3, 4, 5], 2, World(rank=r, size=2, local_rank=r, local_size=2), 2) for r in range(2)]
    assert short == [[([3, 4], 1.0), ([3, 4], 0.0)], [([5], 1.0), ([3, 4], 0.0)]]


def test_a_checkpoint_without_a_world_size_is_one_process():
    """Checkpoints written before train.nproc_per_node existed resume as they did."""
    params = load_params(REPO / "params.yaml")
    order = {"seed": params.seed, "batch_size": params.train.batch_size, "accumulative_counts": params.train.accumulative_counts}
    check_resumable({"order": order, "optimizer": {"state": {}, "param_groups": []}}, Path("iter_2.pth"), params)
    two = params.model_copy(update={"train": params.train.model_copy(update={"nproc_per_node": 2})})
    with pytest.raises(UserError, match="written by 1 training process"):
        check_resumable({"order": order, "optimizer": {"state": {}, "param_groups": []}}, Path("iter_2.pth"), two)


def processes_in(root: Path) -> list[int]:
    """Processes whose working directory is `root` (a training process left behind)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == root.resolve():
                found.append(int(proc.name))
        except OSError:  # gone, a zombie, or not ours
            pass
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
# ZeRO-2 only: DDP resumes through the same code (the world size in the order, every rank's RNG state,
# the metrics trimmed by the writer) with the one-process optimizer state that test_train resumes
# byte-identically; it passed the same test (byte-identical) but costs another ~60 s on 2 cores.
@pytest.mark.parametrize("name", ["zero2"])
def test_killed_after_the_first_checkpoint_and_resumed_is_byte_identical(runs, tokenized_once, tmp_path, name):
    """kill -9 of the whole process group (the stage and torchrun; the workers, in sessions of their
    own, die with their parent) once work/iter_2.pth exists, then train.resume: auto: the same bytes
    as the uninterrupted run (every rank's RNG state and, under DeepSpeed, ZeRO shard restored)."""
    reference = training_outputs(runs(name).root)
    workspace = tokenized_once.copy_to(tmp_path / "ws")
    workspace.set_params(RUNS[name])
    root = workspace.root
    proc = workspace.subprocess("train", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (root / "work/iter_2.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while processes_in(root) and time.time() < deadline:
        time.sleep(0.1)
    assert not processes_in(root), "training processes outlived the kill"
    assert (root / "work/iter_2.pth").exists() and not (root / "work/iter_6.pth").exists(), "not killed in time"

    workspace.set_params({"train": {"resume": "auto"}})
    output = train_subprocess(workspace)
    assert "resumed from work/iter_" in output
    resumed = training_outputs(root)
    assert resumed.keys() == reference.keys()
    differing = [key for key in reference if reference[key] != resumed[key]]
    assert differing == [], checkpoint_diff(reference, resumed, differing)
    assert not list((root / "work").glob(".*")), "a killed run's temp files were left in work/"


@pytest.fixture
def busy_port():
    """A port something listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def bad_input_case(runs, tokenized_once, tmp_path, monkeypatch, busy_port: int, case: str) -> tuple[Workspace, str]:
    """(workspace, the fragment its error must contain) for each bad input."""
    if case in ("resume-other-world-size", "resume-without-deepspeed"):
        source = runs("ddp" if case == "resume-other-world-size" else "zero2")
        workspace = source.copy_to(tmp_path / "ws")
        workspace.set_params({"train": {"resume": "auto", "nproc_per_node": 1, "accumulative_counts": 2}
                              if case == "resume-other-world-size" else {"resume": "auto", "deepspeed": None}})
        return workspace, ("train.nproc_per_node" if case == "resume-other-world-size" else "train.deepspeed")
    workspace = tokenized_once.copy_to(tmp_path / "ws")
    workspace.set_params(RUNS["ddp"])
    if case == "more-processes-than-cores":
        workspace.set_params({"train": {"nproc_per_node": (os.cpu_count() or 1) + 1}})
        return workspace, "train.nproc_per_node"
    if case == "port-in-use":
        monkeypatch.setenv("MASTER_PORT", str(busy_port))
        return workspace, f"MASTER_PORT {busy_port} is already in use"
    if case == "node-rank-outside-nnodes":
        workspace.set_params({"train": {"nnodes": 2}})
        monkeypatch.setenv("NODE_RANK", "2")
        return workspace, "NODE_RANK"
    assert case == "deepspeed-missing"
    workspace.set_params(RUNS["zero2"])
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what an install without the extra looks like
    return workspace, "pip install -e '.[deepspeed]'"


@pytest.mark.parametrize("case", ["more-processes-than-cores", "port-in-use", "node-rank-outside-nnodes",
                                  "deepspeed-missing", "resume-other-world-size", "resume-without-deepspeed"])
def test_bad_input_is_one_paragraph_before_any_process_starts(runs, tokenized_once, tmp_path, monkeypatch, capsys,
                                                             busy_port, case):
    """Checked by the first process, before torchrun starts: one paragraph naming the param (or the
    environment variable) and the fix, exit 1, the workspace untouched."""
    workspace, expected = bad_input_case(runs, tokenized_once, tmp_path, monkeypatch, busy_port, case)
    before = tree_files(workspace.root)
    message = workspace.run_error("train", monkeypatch, capsys)
    assert expected in message, message
    assert tree_files(workspace.root) == before  # nothing written, nothing removed
