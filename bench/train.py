"""Training throughput: our `train` stage vs the seed tutorial's recipe (HF Trainer + PEFT), on the
same model (models/base), the same data (data/raw) and the same number of samples.

    python bench/train.py                       # default params.yaml, 3 repeats of each recipe, medians
    python bench/train.py --profile             # + one profiled run of each: where the time goes
    python bench/train.py --quick               # smoke test: tiny data, 3 steps, 1 thread, 1 repeat, not saved
    python bench/train.py --workspace /tmp/ws   # prepare once there (kept), rerun the bench on it later
    # GPU (never required): LoRA and QLoRA, bf16, with MFU against the card's dense bf16 peak
    python bench/train.py --device cuda --dtype bfloat16 --peak-tflops 989
    python bench/train.py --device cuda --dtype bfloat16 --quant nf4 --peak-tflops 989

What runs, in a temp copy of the repo (models/base, data/ built there by the base, generate and
tokenize stages; params.yaml = the repo's + --set/--quick overrides):
  - ours: `stages.train.main()`, the `python -m stages.train` entry point, unmodified. The bench only
    wraps functions it calls (collate, token_loss_sum, validation_loss, chat_generate,
    save_checkpoint) and the progress bar, to time each step and count tokens.
  - seed: bench/seed_recipe.py (process_func, LoRA r=8, Trainer 4 x 4, gradient checkpointing,
    DataCollatorForSeq2Seq padding, no packing), run for round(samples ours saw / 16) optimizer steps.
Each recipe runs in its own process (peak RSS is that process's ru_maxrss when training ends).

Figures per recipe (medians over --repeats):
  - effective tokens/s = label tokens (trained-on targets) / train loop seconds, and the same for
    non-pad tokens; train loop = the training steps, without the stage's in-loop evaluation
    (train.evaluation_freq) and checkpoint writes, which the seed recipe does not do.
  - wall s = process start to end of training (imports, model load, data, train loop, in-loop eval).
  - phase split of the train loop: data (batch building until the first forward), forward (incl.
    the loss), optimizer (clip + AdamW step), backward+other (the rest: backward, which for the seed
    includes the gradient-checkpointing recompute, and logging).
  - identity_acc / leakage: the evaluate stage's `score()` on data/raw/val.jsonl, with the LoRA
    weights merged into the fp32 base as the merge stage does (first repeat; CPU training is
    deterministic).
  - GPU: peak torch.cuda.max_memory_allocated, and MFU = non-pad tokens/s x FLOPs/token / peak,
    with FLOPs/token = 4 N + 6 N_lora for LoRA (forward 2N, backward only the activation grads 2N for
    frozen weights, all 6 N_lora for the adapters; attention scores not counted; full fine-tuning
    would be 6 N), N = weights of the linear layers incl. lm_head.
Writes bench/results/train.json (GPU / QLoRA runs: train-cuda.json, train-cuda-nf4.json, ...); a
--quick run saves nothing unless --out or --keep. --profile adds one run of each recipe under
torch.profiler (steps 2..1+--profile-steps, then it stops): op groups and top ops, not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    busy_warning,
    check_run,
    command_line,
    copy_repo,
    machine,
    make_tmp,
    median,
    median_dicts,
    parse_sets,
    peak_rss_mib,
    results_path,
    venv_env,
    write_params,
    write_results,
)

QUICK = {
    "threads": 1,
    "data": {"identity_samples": 16, "val_identity_samples": 4, "replay_ratio": 0.0},
    "train": {"max_steps": 3, "save_steps": 3, "evaluation_freq": 3, "evaluation_inputs": ["Who are you?"],
              "evaluation_max_new_tokens": 8},
    "eval": {"max_new_tokens": 8},
}
PREP_STAGES = (("base", "models/base"), ("generate", "data/raw"), ("tokenize", "data/tokenized"))
TARGET_SPEEDUP = 3.0


# =================================================================================================
# Worker side: one training run of one recipe, in the workspace, in its own process.
# =================================================================================================

class ProfileDone(Exception):
    """Ends a profiling run of our stage once the profiled steps are done."""


class StepTimer:
    """Per-step wall time and its split into phases, with CUDA syncs at the boundaries on GPU."""

    def __init__(self, cuda: bool):
        import torch

        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.steps: list[dict] = []
        self.current: dict | None = None
        self.in_eval = False
        self.tokens = {"samples": 0, "label": 0, "nonpad": 0, "padded": 0, "micro_batches": 0}
        self.profile_steps = 0
        self.profiler = None
        self.profile: dict | None = None
        self._opt_start = 0.0

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def begin_step(self) -> None:
        if self.profile_steps and len(self.steps) == 1:  # profile steps 2.., after the warm-up step
            self.start_profiler()
        self.current = {"start": self.now(), "data": None, "forward": 0.0, "optimizer": 0.0, "eval": 0.0, "save": 0.0}

    def end_step(self) -> None:
        if self.current is None:
            return
        self.current["total"] = self.now() - self.current.pop("start")
        self.steps.append(self.current)
        self.current = None
        if self.profiler is not None and len(self.steps) == 1 + self.profile_steps:
            self.stop_profiler()

    @contextlib.contextmanager
    def phase(self, name: str):
        step = self.current
        if step is None or (self.in_eval and name != "eval"):
            yield
            return
        began = self.now()
        if name == "forward" and step["data"] is None:
            step["data"] = began - step["start"]
        if name == "eval":
            self.in_eval = True
        try:
            yield
        finally:
            step[name] += self.now() - began
            if name == "eval":
                self.in_eval = False

    def optimizer_hooks(self) -> None:
        """Global optimizer step hooks: AdamW's step in both recipes, whoever calls it."""
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        def pre(*_):
            self._opt_start = self.now()

        def post(*_):
            if self.current is not None and not self.in_eval:
                self.current["optimizer"] += self.now() - self._opt_start

        register_optimizer_step_pre_hook(pre)
        register_optimizer_step_post_hook(post)

    def wrap_clip(self) -> None:
        import torch

        clip = torch.nn.utils.clip_grad_norm_

        def timed_clip(*args, **kwargs):
            with self.phase("optimizer"):
                return clip(*args, **kwargs)

        torch.nn.utils.clip_grad_norm_ = timed_clip

    def count(self, batch: dict, nonpad: int, samples: int) -> None:
        if self.in_eval or self.current is None:  # only the batches a timed step trains on
            return
        self.tokens["samples"] += samples
        self.tokens["label"] += int((batch["labels"][:, 1:] != -100).sum())  # targets after the shift
        self.tokens["nonpad"] += nonpad
        self.tokens["padded"] += int(batch["input_ids"].numel())
        self.tokens["micro_batches"] += 1

    def start_profiler(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profiler = profile(activities=activities)
        self.profiler.__enter__()

    def stop_profiler(self) -> None:
        import torch

        self.sync()
        self.profiler.__exit__(None, None, None)
        self.profile = profile_summary(self.profiler, torch.cuda.is_available(), len(self.steps) - 1)
        self.profiler = None

    def summary(self) -> dict:
        total = lambda key: sum(s[key] or 0.0 for s in self.steps)  # noqa: E731
        train_s = total("total") - total("eval") - total("save")
        data, forward, optimizer = total("data"), total("forward"), total("optimizer")
        return {
            "steps": len(self.steps),
            "train_s": train_s,
            "step_s_median": median([s["total"] - s["eval"] - s["save"] for s in self.steps]),
            "phases_s": {"data": data, "forward": forward, "backward_other": train_s - data - forward - optimizer,
                         "optimizer": optimizer},
            "in_loop_eval_s": total("eval"),
            "checkpoint_s": total("save"),
            "tokens": dict(self.tokens),
        }


# Profiler ops grouped into what they are, for the "where the time goes" table.
OP_GROUPS = (
    ("matmul (linear layers, lm_head, LoRA)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")),
    ("attention (sdpa)", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("softmax / cross-entropy", ("softmax", "nll_loss", "cross_entropy")),
    ("optimizer (AdamW, clip)", ("adam", "_foreach", "optimizer", "clip_grad", "aten::norm", "linalg_vector_norm")),
    ("memory copies / casts", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::cat", "aten::contiguous")),
)


def profile_summary(prof, cuda: bool, steps: int, top: int = 15) -> dict:
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    groups = {name: 0.0 for name, _ in OP_GROUPS}
    other = 0.0
    for e in events:
        for name, patterns in OP_GROUPS:
            if any(p in e.key.lower() for p in patterns):
                groups[name] += getattr(e, attr)
                break
        else:
            other += getattr(e, attr)
    groups["everything else (elementwise: SiLU, RMSNorm, rotary, dropout, masks, ...)"] = other
    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    return {
        "clock": "GPU self time" if cuda else "CPU self time",
        "steps": steps,
        "total_s": total / 1e6,
        "groups": [{"group": k, "s_per_step": v / 1e6 / steps, "pct": 100 * v / total} for k, v in groups.items()],
        "top_ops": [{"op": e.key, "calls_per_step": e.count / steps, "s_per_step": getattr(e, attr) / 1e6 / steps,
                     "pct": 100 * getattr(e, attr) / total} for e in ranked],
    }


def count_linear(model) -> tuple[int, int]:
    """(N, N_lora): weights of the frozen linear layers (incl. lm_head; 4-bit ones by shape), trainable params."""
    import torch

    n = sum(m.in_features * m.out_features for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in name)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return n, n_lora


def modules_label(modules) -> str:
    names = sorted(m.removesuffix("_proj") for m in modules)
    return "all 7 linear" if names == sorted(["q", "k", "v", "o", "gate", "up", "down"]) else ", ".join(names)


def identity_eval(lora_state: dict, config, params, device) -> dict:
    """Merge LoRA weights into the fp32 base (like the merge stage) and score it (the evaluate stage's code)."""
    import torch
    from peft import get_peft_model

    from tunedag.core.io import read_jsonl
    from tunedag.evaluation.scoring import held_out_prompts, score
    from tunedag.model.checkpoints import load_lora_state
    from tunedag.model.generation import chat_generate
    from tunedag.model.loading import load_model, load_tokenizer

    started = time.perf_counter()
    tokenizer = load_tokenizer("models/base", params.model.trust_remote_code)
    base = load_model("models/base", torch.float32, "none", params.model.trust_remote_code, device)
    model = get_peft_model(base, config)
    load_lora_state(model, lora_state, "bench")
    model = model.merge_and_unload().eval()
    identity, general = held_out_prompts(read_jsonl("data/raw/val.jsonl"))

    def generate(prompts: list[str]) -> list[str]:
        return [a for a, _ in chat_generate(model, tokenizer, prompts, params.eval.max_new_tokens, params.eval.batch_size)]

    metrics, answers = score(generate, identity, general, params.data.expected_mention, params.data.identity_words)
    return {**metrics, "identity_questions": len(identity), "general_prompts": len(general),
            "eval_s": time.perf_counter() - started,
            "answers": {q: answers[q] for q in identity[:4]}}


def run_ours(args) -> dict:
    """Our train stage, through its real entry point, with timers around what it calls."""
    import torch

    import stages.train as train
    from tunedag.core.params import load_params
    from tunedag.model.checkpoints import list_checkpoints, load_checkpoint
    from tunedag.model.lora import lora_config

    wrapped = ("tqdm", "collate", "add_lora", "token_loss_sum", "validation_loss", "chat_generate", "save_checkpoint")
    if missing := [name for name in wrapped if not hasattr(train, name)]:
        raise SystemExit(f"bench/train.py: stages/train.py no longer has {', '.join(missing)}, which the bench wraps "
                         "to time the stage's steps: update run_ours() in bench/train.py.")
    cuda = torch.cuda.is_available()
    timer = StepTimer(cuda)
    timer.profile_steps = args.profile_steps
    timer.optimizer_hooks()
    timer.wrap_clip()
    info: dict = {}

    class TimedTqdm(train.tqdm):
        def __iter__(self):
            for item in super().__iter__():
                timer.begin_step()
                yield item
                timer.end_step()
                if timer.profile is not None:  # a profiling run stops once it has its steps
                    raise ProfileDone

    def timed(name, fn):
        def wrapper(*a, **k):
            with timer.phase(name):
                return fn(*a, **k)
        return wrapper

    collate = train.collate

    def counting_collate(rows, *a, **k):
        batch = collate(rows, *a, **k)
        timer.count(batch, nonpad=sum(len(r["input_ids"]) for r in rows),
                    samples=sum(list(r["position_ids"]).count(0) for r in rows))
        return batch

    add_lora = train.add_lora

    def recording_add_lora(model, params):
        model = add_lora(model, params)
        info["n_linear"], info["n_lora"] = count_linear(model)
        return model

    train.tqdm = TimedTqdm
    train.collate = counting_collate
    train.add_lora = recording_add_lora
    train.token_loss_sum = timed("forward", train.token_loss_sum)
    train.validation_loss = timed("eval", train.validation_loss)
    train.chat_generate = timed("eval", train.chat_generate)
    train.save_checkpoint = timed("save", train.save_checkpoint)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        train.main()  # = python -m stages.train
    except ProfileDone:
        return {"profile": timer.profile}
    if timer.profiler is not None:  # fewer steps than --profile-steps
        timer.stop_profiler()
    result = finish(timer, info, cuda)
    params = load_params()
    result["hyper"] = {
        "lora": f"r={params.lora.r}, alpha={params.lora.alpha}, dropout={params.lora.dropout}, "
                f"{modules_label(lora_config(params).target_modules)}",
        "batch": f"{params.train.batch_size} packed rows x {params.train.accumulative_counts} "
                 f"(max_length {params.tokenize.max_length}, pack {params.tokenize.pack})",
        "lr": params.train.lr, "max_steps": params.train.max_steps, "gradient_checkpointing": params.train.gradient_checkpointing,
    }
    if args.eval:
        ckpt = load_checkpoint(list_checkpoints("work")[-1], params)
        result["eval"] = identity_eval(ckpt["lora"], lora_config(params), params, torch.device("cuda" if cuda else "cpu"))
    return result


def run_seed(args) -> dict:
    """The seed recipe (bench/seed_recipe.py) for round(samples / 16) optimizer steps."""
    import torch

    import bench.seed_recipe as seed
    from tunedag.core.io import read_jsonl
    from tunedag.core.params import load_params
    from tunedag.core.runtime import train_dtype
    from tunedag.model.loading import load_model, load_tokenizer
    from tunedag.model.lora import lora_state

    params = load_params()
    torch.set_num_threads(params.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = train_dtype(params, device)
    timer = StepTimer(cuda)
    timer.profile_steps = args.profile_steps
    timer.optimizer_hooks()
    timer.wrap_clip()

    tokenizer = load_tokenizer("models/base", params.model.trust_remote_code)
    records = read_jsonl("data/raw/train.jsonl")
    if any("messages" not in r for r in records):
        raise SystemExit("the seed recipe is for chat data (data.mode: chat)")
    dataset = seed.tokenized_dataset(records, tokenizer)
    max_steps = max(1, round(args.samples / seed.SAMPLES_PER_STEP))

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = load_model("models/base", dtype, params.lora.quant, params.model.trust_remote_code, device)
    model = seed.peft_model(model, params.lora.quant)
    info = dict(zip(("n_linear", "n_lora"), count_linear(model)))
    forward_start: list[float] = []
    model.register_forward_pre_hook(lambda *_: forward_start.append(phase_enter(timer, "forward")))
    model.register_forward_hook(lambda *_: phase_exit(timer, "forward", forward_start.pop()))

    with _tmp_dir() as out_dir:
        trainer = seed.trainer(model, tokenizer, dataset, out_dir, max_steps, params.seed, device.type,
                               [step_boundaries(timer)])
        trainer.data_collator = CountingCollator(trainer.data_collator, timer)
        save = trainer._save_checkpoint
        trainer._save_checkpoint = lambda *a, **k: _timed_call(timer, "save", save, *a, **k)
        trainer.train()
    if timer.profiler is not None:  # fewer steps than --profile-steps
        timer.stop_profiler()
    if args.profile_steps:
        return {"profile": timer.profile}
    result = finish(timer, info, cuda)
    result["hyper"] = {
        "lora": f"r={seed.LORA['r']}, alpha={seed.LORA['lora_alpha']}, dropout={seed.LORA['lora_dropout']}, "
                f"{modules_label(seed.TARGET_MODULES)}",
        "batch": f"{seed.ARGS['per_device_train_batch_size']} samples x {seed.ARGS['gradient_accumulation_steps']} "
                 f"(padded to the longest, max_length {seed.MAX_LENGTH})",
        "lr": seed.ARGS["learning_rate"], "max_steps": max_steps, "gradient_checkpointing": True,
    }
    if args.eval:
        result["eval"] = identity_eval(lora_state(model), seed.lora_config(), params, device)
    return result


def step_boundaries(timer: StepTimer):
    """A TrainerCallback: a step runs from the end of the previous optimizer step to the end of its own."""
    from transformers import TrainerCallback

    class StepBoundaries(TrainerCallback):
        def on_train_begin(self, *a, **k):
            timer.begin_step()

        def on_step_end(self, args, state, control, **kwargs):
            timer.end_step()
            timer.begin_step()
            if timer.profile is not None:  # a profiling run stops once it has its steps
                control.should_training_stop = True

        def on_train_end(self, *a, **k):
            timer.current = None  # the step opened after the last one

    return StepBoundaries()


class CountingCollator:
    """The recipe's DataCollatorForSeq2Seq, counting what it hands to the model."""

    def __init__(self, collator, timer: StepTimer):
        self.collator, self.timer = collator, timer

    def __call__(self, features):
        batch = self.collator(features)
        self.timer.count(batch, nonpad=int(batch["attention_mask"].sum()), samples=len(features))
        return batch


def phase_enter(timer: StepTimer, name: str) -> float:
    step = timer.current
    began = timer.now()
    if step is not None and not timer.in_eval and name == "forward" and step["data"] is None:
        step["data"] = began - step["start"]
    return began


def phase_exit(timer: StepTimer, name: str, began: float) -> None:
    if timer.current is not None and not timer.in_eval:
        timer.current[name] += timer.now() - began


def _timed_call(timer, name, fn, *a, **k):
    with timer.phase(name):
        return fn(*a, **k)


@contextlib.contextmanager
def _tmp_dir():
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="seed-trainer-", dir=".")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def finish(timer: StepTimer, info: dict, cuda: bool) -> dict:
    import torch

    if not timer.steps or not timer.tokens["micro_batches"] or "n_linear" not in info:
        raise SystemExit("bench/train.py saw no training step: the wrapped functions were not called (did the "
                         "training loop change?). Update run_ours() / run_seed() in bench/train.py.")

    t0 = float(os.environ.get("BENCH_T0", "0")) or None
    result = {**timer.summary(), **info,
              "wall_s": time.time() - t0 if t0 else None,
              "peak_rss_mib": peak_rss_mib(),
              "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
              "threads": torch.get_num_threads(), "device": "cuda" if cuda else "cpu",
              "profile": timer.profile}
    result["flops_per_token"] = 4 * info["n_linear"] + 6 * info["n_lora"]
    return result


def worker(args) -> None:
    workspace = Path(args.workspace).resolve()
    os.chdir(workspace)
    sys.path.insert(0, str(workspace))  # the workspace's copy of stages/
    result = run_ours(args) if args.worker == "ours" else run_seed(args)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False))


# =================================================================================================
# Orchestrator side: prepare the workspace, run the workers, take medians, print, save.
# =================================================================================================

def prepare(args, overrides: dict) -> tuple[Path, dict]:
    workspace = Path(args.workspace).resolve() if args.workspace else make_tmp("train")
    if not (workspace / "dvc.yaml").exists():
        copy_repo(workspace)
    params = write_params(workspace, overrides)
    log = workspace / "bench.log"
    for stage, out in PREP_STAGES:
        if (workspace / out).exists():
            print(f"prepare: {out} exists in {workspace}, reused")
            continue
        run = check_run([sys.executable, "-m", f"stages.{stage}"], workspace, worker_env(args, workspace), log,
                        what=f"stage {stage} (log: {log})")
        print(f"prepare: stage {stage} {run['wall_s']:.0f} s")
    stats = json.loads((workspace / "data/tokenized/stats.json").read_text())
    return workspace, {"params": params, "tokenized": stats}


def worker_env(args, workspace: Path) -> dict:
    extra = {"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}
    return venv_env(workspace, **extra)


def run_worker(args, workspace: Path, recipe: str, samples: int = 0, evaluate: bool = False,
               profile_steps: int = 0) -> dict:
    out = workspace / f"bench-{recipe}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", recipe, "--workspace", str(workspace),
           "--out", str(out), "--samples", str(samples), "--profile-steps", str(profile_steps)]
    if evaluate:
        cmd.append("--eval")
    env = {**worker_env(args, workspace), "BENCH_T0": repr(time.time())}
    env["PYTHONPATH"] = f"{workspace}:{Path(__file__).resolve().parents[1]}"  # stages from the copy, bench from here
    check_run(cmd, workspace, env, workspace / "bench.log", what=f"{recipe} run (log: {workspace / 'bench.log'})")
    return json.loads(out.read_text())


def rates(run: dict, peak_tflops: float | None) -> dict:
    """Derived figures of one run."""
    tokens, train_s = run["tokens"], run["train_s"]
    out = {
        "label_tok_s": tokens["label"] / train_s,
        "nonpad_tok_s": tokens["nonpad"] / train_s,
        "padded_tok_s": tokens["padded"] / train_s,
        "pad_fraction": 1 - tokens["nonpad"] / tokens["padded"],
        "tokens_per_micro_batch": tokens["padded"] / tokens["micro_batches"],
        "backward_over_forward": run["phases_s"]["backward_other"] / max(run["phases_s"]["forward"], 1e-9),
    }
    out["mfu"] = out["nonpad_tok_s"] * run["flops_per_token"] / (peak_tflops * 1e12) if peak_tflops else None
    return out


def print_report(summary: dict) -> None:
    ours, seed = summary["recipes"]["ours"], summary["recipes"]["seed"]
    rows = [
        ("samples seen", "{:.0f}", lambda r: r["tokens"]["samples"]),
        ("optimizer steps", "{:.0f}", lambda r: r["steps"]),
        ("label tokens", "{:.0f}", lambda r: r["tokens"]["label"]),
        ("non-pad tokens", "{:.0f}", lambda r: r["tokens"]["nonpad"]),
        ("padded tokens computed", "{:.0f}", lambda r: r["tokens"]["padded"]),
        ("train loop s", "{:.1f}", lambda r: r["train_s"]),
        ("wall s (start to trained)", "{:.1f}", lambda r: r["wall_s"]),
        ("label tokens/s", "{:.1f}", lambda r: r["label_tok_s"]),
        ("non-pad tokens/s", "{:.1f}", lambda r: r["nonpad_tok_s"]),
        ("pad fraction", "{:.3f}", lambda r: r["pad_fraction"]),
        ("peak RSS MiB", "{:.0f}", lambda r: r["peak_rss_mib"]),
        ("peak GPU MiB", "{:.0f}", lambda r: r["peak_gpu_mib"]),
        ("MFU", "{:.2%}", lambda r: r["mfu"]),
        ("identity_acc", "{:.3f}", lambda r: (r.get("eval") or {}).get("identity_acc")),
        ("leakage", "{:.3f}", lambda r: (r.get("eval") or {}).get("leakage")),
    ]
    print(f"\n{'median of ' + str(summary['repeats']) + ' runs':<28} {'ours':>12} {'seed recipe':>12}")
    for label, fmt, get in rows:
        a, b = get(ours), get(seed)
        if a is None and b is None:
            continue
        show = lambda v: fmt.format(v) if v is not None else "-"  # noqa: E731
        print(f"{label:<28} {show(a):>12} {show(b):>12}")
    s = summary["speedup"]
    print(f"\nspeedup, label tokens/s: {s['label_tok_s']:.2f}x (non-pad: {s['nonpad_tok_s']:.2f}x); "
          f"target >= {TARGET_SPEEDUP:g}x: {'met' if s['target_met'] else 'NOT met'}")
    print("\ntrain loop split, s per optimizer step (share of the loop):")
    print(f"{'phase':<16} {'ours':>16} {'seed recipe':>16}")
    for phase in ("data", "forward", "backward_other", "optimizer"):
        cells = []
        for r in (ours, seed):
            v = r["phases_s"][phase]
            cells.append(f"{v / r['steps']:.3f} ({100 * v / r['train_s']:.0f}%)")
        print(f"{phase:<16} {cells[0]:>16} {cells[1]:>16}")
    for recipe, prof in summary.get("profile", {}).items():
        print(f"\nprofile of {recipe} ({prof['clock']}, {prof['steps']} steps, s per step):")
        for g in prof["groups"]:
            print(f"  {g['group']:<72} {g['s_per_step']:8.3f}  {g['pct']:5.1f}%")
        for op in prof["top_ops"][:10]:
            print(f"    {op['op']:<50} {op['calls_per_step']:8.0f} calls {op['s_per_step']:8.3f} s {op['pct']:5.1f}%")


def results_name(args) -> str:
    """train.json for the CPU default; train-cuda.json, train-cuda-nf4.json, ... for the other setups."""
    if args.device == "cpu" and args.quant == "none":
        return "train"
    return f"train-{args.device}" + (f"-{args.quant}" if args.quant != "none" else "")


def orchestrate(args) -> None:
    overrides = parse_sets(args.set)
    if args.quick:
        from bench.common import merge

        overrides = merge(QUICK, overrides)
    if args.threads:
        overrides["threads"] = args.threads
    if args.max_steps:
        overrides.setdefault("train", {})["max_steps"] = args.max_steps
    if args.dtype != "auto":
        overrides.setdefault("train", {})["dtype"] = args.dtype
    if args.quant != "none":
        overrides.setdefault("lora", {})["quant"] = args.quant
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible to torch")
    info = machine(args.device)
    if warning := busy_warning(info):
        print(warning)

    workspace, setup = prepare(args, overrides)
    print(f"workspace {workspace}; train rows {setup['tokenized']['train']['rows']}, samples "
          f"{setup['tokenized']['train']['samples']}")
    runs: dict[str, list] = {"ours": [], "seed": []}
    for i in range(args.repeats):
        first = i == 0
        ours = run_worker(args, workspace, "ours", evaluate=first and not args.no_eval)
        runs["ours"].append(ours)
        seed = run_worker(args, workspace, "seed", samples=ours["tokens"]["samples"], evaluate=first and not args.no_eval)
        runs["seed"].append(seed)
        print(f"run {i + 1}/{args.repeats}: ours {ours['tokens']['label'] / ours['train_s']:.1f} label tok/s "
              f"({ours['train_s']:.1f} s), seed {seed['tokens']['label'] / seed['train_s']:.1f} label tok/s "
              f"({seed['train_s']:.1f} s)", flush=True)
    profile = {}
    if args.profile:
        samples = runs["ours"][0]["tokens"]["samples"]
        for recipe in ("ours", "seed"):
            run = run_worker(args, workspace, recipe, samples=samples, profile_steps=args.profile_steps)
            profile[recipe] = run["profile"]

    recipes = {}
    for recipe, rs in runs.items():
        derived = [{**r, **rates(r, args.peak_tflops)} for r in rs]
        recipes[recipe] = median_dicts([{k: v for k, v in d.items() if k not in ("eval", "profile")} for d in derived])
        recipes[recipe]["eval"] = rs[0].get("eval")
    ours, seed = recipes["ours"], recipes["seed"]
    acc_ok = (ours["eval"] or {}).get("identity_acc", 0) >= (seed["eval"] or {}).get("identity_acc", 0)
    speedup = {
        "label_tok_s": ours["label_tok_s"] / seed["label_tok_s"],
        "nonpad_tok_s": ours["nonpad_tok_s"] / seed["nonpad_tok_s"],
        "wall_s": seed["wall_s"] / ours["wall_s"] if ours["wall_s"] else None,
    }
    speedup["target_met"] = speedup["label_tok_s"] >= TARGET_SPEEDUP and acc_ok
    summary = {
        "bench": "train", "command": command_line(), "quick": args.quick, "machine": info,
        "settings": {"repeats": args.repeats, "device": args.device, "dtype": args.dtype, "quant": args.quant,
                     "peak_tflops": args.peak_tflops, "overrides": overrides,
                     "threads": setup["params"]["threads"], "tokenized": setup["tokenized"]},
        "repeats": args.repeats, "recipes": recipes, "speedup": speedup, "profile": profile, "runs": runs,
    }
    print_report(summary)
    keep = args.keep or args.workspace
    if args.quick and not (args.out or keep):
        print("\n--quick: results not saved (--out FILE or --keep to save them)")
    else:
        write_results(results_path(results_name(args), args.quick, args.out, workspace), summary)
    if not keep:
        import shutil

        shutil.rmtree(workspace, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, help="runs of each recipe; figures are medians (default 3, --quick 1)")
    parser.add_argument("--threads", type=int, help="torch threads (params threads); default: params.yaml's")
    parser.add_argument("--max-steps", type=int, help="our train.max_steps; the seed recipe follows in samples")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml override for the workspace, e.g. --set data.identity_samples=64")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="train.dtype for both recipes (auto: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--quant", choices=("none", "nf4"), default="none", help="nf4: QLoRA for both recipes")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak TFLOPS in --dtype, for MFU")
    parser.add_argument("--profile", action="store_true", help="one extra torch.profiler run of each recipe")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--no-eval", action="store_true", help="skip the identity evaluation")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny params, 1 thread, 1 repeat")
    parser.add_argument("--workspace", help="prepare or reuse this workspace, kept (its models/base, data/raw and "
                        "data/tokenized are reused if present: delete them after changing data params); "
                        "default: a temp dir, deleted")
    parser.add_argument("--keep", action="store_true", help="keep the temp workspace")
    parser.add_argument("--out", help="results file (default bench/results/train.json, train-cuda.json, ...; "
                        "--quick: none unless --keep/--workspace, then in the workspace)")
    # worker mode (used by the orchestrator)
    parser.add_argument("--worker", choices=("ours", "seed"), help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--eval", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.worker:
        worker(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
