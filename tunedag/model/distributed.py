"""Multi-process training for the train stage: train.nproc_per_node x train.nnodes processes,
launched by torchrun, data parallel with torch DDP or DeepSpeed ZeRO-2 (train.deepspeed).

The world size is a param (it sets the global batch); where the processes meet is not (it differs
per machine): NODE_RANK, MASTER_ADDR and MASTER_PORT come from the environment, the names torchrun
and XTuner use. `python -m stages.train` checks them, then re-executes itself under
`python -m torch.distributed.run` and exits with its return code, so `dvc repro` still runs one
command per stage. Each node's local rank 0 writes the outputs (on one machine: rank 0 alone).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch

from tunedag.core.errors import UserError
from tunedag.core.params import Params, TrainParams

DEEPSPEED_INSTALL = "pip install -e '.[deepspeed]'"
DEFAULT_MASTER_PORT = 29500  # torchrun's default, for several machines
# Rank 0 evaluates and writes checkpoints while the others wait at a barrier: generous, so a slow
# evaluation is not taken for a hung peer.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; World() is one process alone."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def writer(self) -> bool:
        """Writes checkpoints and metrics, shows progress: each machine's first process, so every
        node's workspace gets the same outputs (DVC on each node finds them, resume reads them)."""
        return self.local_rank == 0


def world_size(cfg: TrainParams) -> int:
    return cfg.nproc_per_node * cfg.nnodes


def per_process_threads(threads: int, local_size: int) -> int:
    """The `threads` param is the machine's: split among its processes, so they never oversubscribe."""
    return max(1, threads // local_size)


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ


def require_deepspeed(cfg: TrainParams) -> None:
    if cfg.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            f"train.deepspeed is {cfg.deepspeed}, but DeepSpeed is not installed (it is an optional extra). "
            f"Install it with `{DEEPSPEED_INSTALL}`, or set train.deepspeed: null in params.yaml to train with torch DDP."
        )


# --- the launch: the first `python -m stages.train` -----------------------------------------------


def check_capacity(cfg: TrainParams) -> None:
    """One process per GPU, or per CPU core on a machine without one."""
    n = cfg.nproc_per_node
    if torch.cuda.is_available():
        have, what = torch.cuda.device_count(), "GPU(s) visible (CUDA_VISIBLE_DEVICES counts)"
    else:
        have, what = os.cpu_count() or 1, "CPU cores and no GPU"
    if n > have:
        raise UserError(
            f"train.nproc_per_node is {n}, but this machine has {have} {what}: each training process needs one of "
            f"its own. Set train.nproc_per_node to at most {have} in params.yaml (or `dvc exp run -S "
            f"train.nproc_per_node={have}`); to keep the global batch, multiply train.accumulative_counts by the "
            "factor you divide it by."
        )


def _env_int(name: str, default: int, low: int, high: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise UserError(f"environment variable {name}={raw!r}: must be a whole number from {low} to {high}. "
                        f"Set it right (or unset it: the default is {default}) and rerun.")
    return value


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like torchrun's store: a port left in TIME_WAIT by an earlier run is free, a listening one is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def rendezvous(cfg: TrainParams) -> tuple[int, str, int]:
    """(NODE_RANK, MASTER_ADDR, MASTER_PORT) from the environment, checked: node ranks run from 0 to
    train.nnodes - 1; on the master node (NODE_RANK 0) the port must be free."""
    if cfg.nnodes == 1 and os.environ.get("NODE_RANK", "0") != "0":
        raise UserError(
            f"NODE_RANK={os.environ['NODE_RANK']} is set, but train.nnodes is 1: there is no other node. Set "
            "train.nnodes to the number of machines in params.yaml (the same on every machine), or unset NODE_RANK."
        )
    node_rank = _env_int("NODE_RANK", 0, 0, cfg.nnodes - 1)
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ and cfg.nnodes == 1:
        return node_rank, addr, free_port()
    port = _env_int("MASTER_PORT", DEFAULT_MASTER_PORT, 1, 65535)
    if node_rank == 0 and port_in_use(port):
        raise UserError(
            f"MASTER_PORT {port} is already in use on this machine (another training run, or another service), and "
            "rank 0's rendezvous must listen there. Pick a free port, the same on every node: "
            f"`MASTER_PORT=<free port> dvc repro train`"
            + (" (with train.nnodes: 1 you can also unset MASTER_PORT: a free port is picked)." if cfg.nnodes == 1 else ".")
        )
    return node_rank, addr, port


def _pdeathsig() -> Callable[[], None]:
    """A function that makes the calling process get SIGKILL when its parent dies (Linux's
    PR_SET_PDEATHSIG; elsewhere it does nothing). torchrun starts its workers in sessions of their
    own, so without it a `kill -9` of the stage (DVC's, a test's, the OOM killer's) would leave them
    training and writing into the workspace. Resolved here, so a forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return lambda: None
    return lambda: prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def launch(params: Params, module: str) -> int:
    """Run `python -m module` in train.nproc_per_node processes on this node under torchrun; its exit code."""
    cfg = params.train
    check_capacity(cfg)
    node_rank, addr, port = rendezvous(cfg)
    threads = per_process_threads(params.threads, cfg.nproc_per_node)
    torch.set_num_threads(threads)  # what env/train.json records: each process's share
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cfg.nproc_per_node),
           "--nnodes", str(cfg.nnodes), "--node-rank", str(node_rank), "--master-addr", addr,
           "--master-port", str(port), "-m", module]
    print(f"launching {world_size(cfg)} training processes ({cfg.nproc_per_node} on this node, node {node_rank} of "
          f"{cfg.nnodes}, rendezvous {addr}:{port}, {threads} torch threads each)", flush=True)
    # OMP_NUM_THREADS: else torchrun sets 1 and warns about it.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    code = subprocess.run(cmd, check=False, env=env, preexec_fn=_pdeathsig()).returncode  # torchrun dies with us
    if code != 0:  # the failing process printed its error first, then torchrun its report: say where to look
        print(f"error [{module.rsplit('.', 1)[-1]}]: a training process failed (torchrun exit code {code}); its own message is above "
              "torchrun's report (\"Root Cause\" names its rank).", file=sys.stderr)
    return code


# --- inside each training process ------------------------------------------------------------------


def join(params: Params, device: torch.device) -> tuple[World, torch.device]:
    """This process's World and device; under the launcher it also joins the process group (gloo on
    CPU, nccl on GPU) and takes its share of the threads and its own GPU."""
    cfg = params.train
    if not under_launcher():
        return World(), device
    _pdeathsig()()  # dies with torchrun (nothing was written before this point)
    if os.getppid() == 1:  # torchrun died while this process was starting: orphaned already
        raise SystemExit(1)
    world = World(rank=int(os.environ["RANK"]), size=int(os.environ["WORLD_SIZE"]),
                  local_rank=int(os.environ["LOCAL_RANK"]),
                  local_size=int(os.environ.get("LOCAL_WORLD_SIZE", cfg.nproc_per_node)))
    if world.size != world_size(cfg):
        raise UserError(
            f"the launcher started {world.size} training processes, but train.nproc_per_node x train.nnodes is "
            f"{cfg.nproc_per_node} x {cfg.nnodes} in params.yaml. Set those params to the processes you launch "
            "(or run `python -m stages.train` / `dvc repro train` without a launcher: it starts them itself)."
        )
    torch.set_num_threads(per_process_threads(params.threads, world.local_size))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=device)
    else:
        torch.distributed.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    if not world.writer:  # one progress bar per machine
        from transformers.utils import logging

        logging.disable_progress_bar()
    return world, device


def leave() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(world: World) -> None:
    if world.size > 1:
        torch.distributed.barrier()


def all_sum(value: float, world: World, device: torch.device) -> float:
    if world.size == 1:
        return value
    total = torch.tensor(value, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return float(total)


def all_gather(obj, world: World) -> list:
    """Every rank's `obj`, on every rank (each node's writer needs them all)."""
    if world.size == 1:
        return [obj]
    objects = [None] * world.size
    torch.distributed.all_gather_object(objects, obj)
    return objects


# --- the training step: one process, DDP or DeepSpeed behind the same three calls -------------------


class LossModule(torch.nn.Module):
    """forward(batch) = loss_fn(model, batch). The train stage computes its loss from the decoder and
    the output layer on label positions only, past model.forward: DDP and DeepSpeed wrap this module
    instead, so they see the forward that really runs."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


class Trainer:
    """Backward of a micro-batch and the optimizer step, for one process, torch DDP or DeepSpeed ZeRO-2.

    The loss of a micro-batch is divided by the label tokens of the whole global step, so the
    gradients every rank ends up with are those of one process running all micro-batches of the step.
    DDP averages gradients over ranks, DeepSpeed also divides by gradient_accumulation_steps: both are
    multiplied back here."""

    def __init__(self, model, optimizer, trainable, loss_fn: Callable, params: Params, dtype: torch.dtype,
                 world: World, device: torch.device):
        self.params, self.world, self.trainable = params, world, trainable
        self.module = LossModule(model, loss_fn)
        self.optimizer, self.engine, self.ddp = optimizer, None, None
        if params.train.deepspeed:
            self.engine, self.optimizer = deepspeed_engine(self.module, optimizer, params, dtype, world)
        elif world.size > 1:
            # Only the trainable (LoRA) tensors: the frozen base is loaded identically by every rank,
            # and broadcasting it would send the whole model at start-up.
            frozen = [f"model.{name}" for name, p in model.named_parameters() if not p.requires_grad]
            frozen += [f"model.{name}" for name, _ in model.named_buffers()]
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.module, frozen)
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
            )

    def backward(self, batch: dict[str, torch.Tensor], n_labels: int, last: bool, weight: float = 1.0) -> float:
        """Forward and backward of one micro-batch, its loss divided by `n_labels` (the label tokens of
        the whole global step). `last`: the step's last micro-batch on this rank (DDP all-reduces the
        gradients there); `weight` 0: a stand-in that only keeps the ranks in step. Returns the loss."""
        if self.engine is not None:
            loss = self.engine(batch) / max(n_labels, 1) * weight
            # DeepSpeed divides by its accumulation count and averages over ranks; it steps at the boundary.
            self.engine.backward(loss * self.params.train.accumulative_counts * self.world.size)
            self.engine.step()
        elif self.ddp is not None:
            with contextlib.nullcontext() if last else self.ddp.no_sync():
                loss = self.ddp(batch) / max(n_labels, 1) * weight
                (loss * self.world.size).backward()  # DDP averages over ranks
        else:
            loss = self.module(batch) / max(n_labels, 1)
            loss.backward()
        return loss.detach().item()

    def step(self) -> None:
        if self.engine is not None:  # stepped in backward(), at the accumulation boundary
            return
        torch.nn.utils.clip_grad_norm_(self.trainable, self.params.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> dict:
        """The optimizer's state for the checkpoint. Collective under DeepSpeed: every rank's ZeRO
        shard, gathered ({"zero_shards": [rank 0's, rank 1's, ...]})."""
        if self.engine is None:
            return self.optimizer.state_dict()
        return {"zero_shards": all_gather(zero_shard(self.optimizer), self.world)}

    def load_optimizer_state(self, state: dict) -> None:
        if self.engine is None:
            self.optimizer.load_state_dict(state)
            return
        shards = state.get("zero_shards") if isinstance(state, dict) else None
        if not shards or len(shards) != self.world.size:
            raise UserError(
                "the checkpoint holds no DeepSpeed ZeRO optimizer state for this world size (it was written without "
                "train.deepspeed, or by an older tunedag). Resume with the train.deepspeed it was written with, or "
                "start fresh with train.resume: null."
            )
        # The fp32 master weights come from the checkpoint too: exact on a bf16 GPU as on CPU.
        self.optimizer.load_state_dict(shards, load_optimizer_states=True, load_from_fp32_weights=True)


# --- DeepSpeed -----------------------------------------------------------------------------------------


def deepspeed_config(params: Params, dtype: torch.dtype) -> dict:
    cfg = params.train
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.accumulative_counts,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
        "seed": params.seed,
    }


@contextlib.contextmanager
def _single_process_group(world: World):
    """DeepSpeed wants a process group and the launcher's variables even for one process: a
    one-member gloo group in memory (no port), the variables only while the engine is built."""
    if world.size > 1 or torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    saved = {key: os.environ.get(key) for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def deepspeed_engine(module: torch.nn.Module, optimizer, params: Params, dtype: torch.dtype, world: World):
    """(engine, ZeRO-2 optimizer): the engine does backward/step; our scheduler stays in charge of the lr
    (it sets the lr of the param groups the ZeRO optimizer steps)."""
    import deepspeed

    with _single_process_group(world):
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=deepspeed_config(params, dtype)
        )
    return engine, ds_optimizer


# Entries of DeepSpeed's ZeRO-1/2 state_dict() that are Python objects, not data: the loss scaler (static
# 1.0 in fp32 and bf16, the engine rebuilds the same; fp16 is not a train.dtype) and the parameter
# slice map of DeepSpeed's "universal checkpoint" (we load by rank, never through it).
_ZERO_OBJECTS = ("loss_scaler", "param_slice_mappings", "universal_checkpoint_info")


def _plain(obj, where: str):
    """Tensors (on CPU, compact), numbers, strings and containers only: what weights_only=True loads."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu").clone()
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):  # IntEnum (ZeroStageEnum) -> int
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, dict):
        return {_plain(k, where): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} in DeepSpeed's optimizer state; "
                    "the checkpoint holds plain data only (weights_only=True loading)")


def zero_shard(optimizer) -> dict:
    """This rank's ZeRO optimizer state as plain data (loadable with weights_only=True)."""
    state = optimizer.state_dict()
    return _plain({k: v for k, v in state.items() if k not in _ZERO_OBJECTS}, "zero_shard")
