"""train / convert / merge on the tiny model: learning, accumulation, exact resume, round trips."""

import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from datasets import load_from_disk
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from stages.train import count_labels, label_positions_loss_matches, token_loss_sum
from tests.conftest import git_commit, run_cmd, tree_files
from tunedag.core.params import load_params
from tunedag.data.packing import collate
from tunedag.model.checkpoints import load_lora_state
from tunedag.model.lora import add_lora


@pytest.fixture
def tokenized(workspace, monkeypatch):
    workspace.run("generate", monkeypatch)
    workspace.run("tokenize", monkeypatch)
    return workspace


def lora_model(workspace, params=None):
    params = params or load_params(workspace.root / "params.yaml")
    base = AutoModelForCausalLM.from_pretrained(workspace.root / "models/base", dtype=torch.float32)
    torch.manual_seed(0)
    return add_lora(base, params), params


def fixed_batch(workspace, n=8):
    rows = load_from_disk(str(workspace.root / "data/tokenized"))["train"]
    return [rows[i] for i in range(n)]


def test_one_step_lowers_loss_on_a_fixed_batch(tokenized):
    model, _ = lora_model(tokenized)
    batch = collate(fixed_batch(tokenized), pad_token_id=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.eval()  # no dropout: compare like with like
    before = token_loss_sum(model, batch) / count_labels(batch)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = token_loss_sum(model, batch) / count_labels(batch)
    assert after < before - 1e-3


def test_accumulation_2x4_equals_batch_8(tokenized):
    rows = fixed_batch(tokenized)
    grads = []
    for groups in ([rows], [rows[:4], rows[4:]]):
        model, _ = lora_model(tokenized)
        model.eval()
        batches = [collate(g, pad_token_id=2) for g in groups]
        n_labels = sum(count_labels(b) for b in batches)
        if len(batches) == 2:  # unequal micro-batches: where a per-micro-batch mean would be wrong
            assert count_labels(batches[0]) != count_labels(batches[1])
        for b in batches:
            (token_loss_sum(model, b) / n_labels).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4), name


def test_label_positions_loss_equals_the_full_forward(tokenized):
    batch = collate(fixed_batch(tokenized), pad_token_id=2)
    results = []
    for label_positions_only in (False, True):
        model, _ = lora_model(tokenized)
        model.eval()
        loss = token_loss_sum(model, batch, label_positions_only)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (full, full_grads), (fast, fast_grads) = results
    assert torch.allclose(full, fast, rtol=1e-5)
    for name in full_grads:
        assert torch.allclose(full_grads[name], fast_grads[name], atol=1e-6, rtol=1e-4), name
    assert label_positions_loss_matches(model, batch)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tokenized):
    """The recipes of the large presets turn it on: it must only trade compute for memory."""
    batch = collate(fixed_batch(tokenized), pad_token_id=2)
    results = []
    for checkpointing in (False, True):
        model, _ = lora_model(tokenized)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # checkpointing only acts in training mode; the model's dropout draws replay exactly
        torch.manual_seed(1)
        loss = token_loss_sum(model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (checkpointed, checkpointed_grads) = results
    assert model.get_base_model().model.gradient_checkpointing  # it was on
    assert torch.allclose(plain, checkpointed, rtol=1e-6)
    for name in plain_grads:
        assert torch.allclose(plain_grads[name], checkpointed_grads[name], atol=1e-6, rtol=1e-4), name


def test_a_model_that_rescales_its_logits_keeps_the_full_forward(tokenized):
    """Like Cohere's logit scale: the shortcut would skip what the forward does after the output layer."""
    model, _ = lora_model(tokenized)
    causal_lm = model.get_base_model()
    original_forward = causal_lm.forward

    def scaled(*args, **kwargs):
        output = original_forward(*args, **kwargs)
        output.logits = output.logits * 0.5
        return output

    causal_lm.forward = scaled
    assert not label_positions_loss_matches(model, collate(fixed_batch(tokenized), pad_token_id=2))


def test_train_writes_checkpoints_and_metrics(tokenized, monkeypatch):
    tokenized.run("train", monkeypatch)
    work = tokenized.root / "work"
    assert sorted(p.name for p in work.glob("iter_*.pth")) == ["iter_3.pth", "iter_6.pth"]
    ckpt = torch.load(work / "iter_6.pth", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["adapter"]["r"] == 4
    assert (tokenized.root / "metrics/train/metrics.json").exists()
    assert (tokenized.root / "metrics/train/plots/metrics/train/loss.tsv").read_text().count("\n") == 7


def logged_steps(root) -> int:
    loss = root / "metrics/train/plots/metrics/train/loss.tsv"
    return max(len(loss.read_text().splitlines()) - 1, 0) if loss.exists() else 0


def training_outputs(root) -> dict[str, bytes]:
    """What train writes and DVC hashes (the wall-clock speed file aside)."""
    return {**{f"work/{k}": v for k, v in tree_files(root / "work").items()},
            **{f"metrics/train/{k}": v for k, v in tree_files(root / "metrics/train").items()}}


def checkpoint_diff(reference: dict, resumed: dict, names: list[str]) -> str:
    """Which entries of the differing checkpoints differ: the message when byte-identity fails."""
    import io

    def flat(obj, prefix=""):
        if isinstance(obj, dict):
            return {k: v for key, value in obj.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        if isinstance(obj, (list, tuple)):
            return {k: v for i, value in enumerate(obj) for k, v in flat(value, f"{prefix}{i}.").items()}
        return {prefix: obj}

    lines = []
    for name in [n for n in names if n.endswith(".pth")][:1]:
        a, b = (flat(torch.load(io.BytesIO(d[name]), weights_only=True)) for d in (reference, resumed))
        same = lambda x, y: torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
        lines.append(f"{name}: {[k for k in a.keys() | b.keys() if not same(a.get(k), b.get(k))][:10]}")
    return f"differing files {names}; " + "; ".join(lines)


@pytest.mark.parametrize("kill_at_steps", [(2, 9, 17)], ids=["three-kills"])
def test_killed_and_resumed_training_is_byte_identical(tokenized, kill_at_steps):
    """kill -9 before the first checkpoint, between checkpoints and late; each time resume with
    train.resume: auto. The end result equals an uninterrupted run byte for byte."""
    tokenized.set_params({"train": {"max_steps": 20, "save_steps": 4, "evaluation_freq": 10}})
    root = tokenized.root
    assert tokenized.subprocess("train").wait(timeout=600) == 0
    reference = training_outputs(root)
    shutil.rmtree(root / "work"), shutil.rmtree(root / "metrics/train")

    for kill_at in kill_at_steps:
        proc = tokenized.subprocess("train", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while logged_steps(root) < kill_at and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (root / "work/iter_20.pth").exists(), f"the run finished before the kill at step {kill_at}"
        tokenized.set_params({"train": {"resume": "auto"}})
    assert tokenized.subprocess("train").wait(timeout=600) == 0

    resumed = training_outputs(root)
    assert resumed.keys() == reference.keys()
    differing = [name for name in reference if reference[name] != resumed[name]]
    assert differing == [], checkpoint_diff(reference, resumed, differing)
    assert not list((root / "work").glob(".*")), "a killed run's temp files were left in work/"


def test_train_in_a_git_repo_without_a_commit_asks_for_one(tokenized, monkeypatch, capsys):
    """dvclive fails with "Empty git repo" there: the stage says what to do, before any work."""
    assert run_cmd(["git", "init", "-q"], tokenized.root).returncode == 0
    before = tree_files(tokenized.root)
    err = tokenized.run_error("train", monkeypatch, capsys)
    assert "has no commit yet" in err and "git commit" in err
    assert tree_files(tokenized.root) == before
    git_commit(tokenized.root, "tunedag project")
    tokenized.run("train", monkeypatch)
    assert (tokenized.root / "metrics/train/metrics.json").exists()


def test_convert_and_merge_round_trip(tokenized, monkeypatch):
    tokenized.run("train", monkeypatch)
    tokenized.run("convert", monkeypatch)
    tokenized.run("merge", monkeypatch)
    root = tokenized.root
    assert (root / "models/adapter/adapter_config.json").exists()
    ids = torch.tensor([[1, 2, 3, 400, 500, 600, 700, 2]])

    from_pth, _ = lora_model(tokenized)
    load_lora_state(from_pth, torch.load(root / "work/iter_6.pth", weights_only=True)["lora"], "iter_6")
    base = AutoModelForCausalLM.from_pretrained(root / "models/base", dtype=torch.float32)
    from_adapter = PeftModel.from_pretrained(base, root / "models/adapter")
    merged = AutoModelForCausalLM.from_pretrained(root / "models/merged", dtype=torch.float32)
    with torch.no_grad():
        a, b, c = (m.eval()(input_ids=ids).logits for m in (from_pth, from_adapter, merged))
        plain = AutoModelForCausalLM.from_pretrained(root / "models/base", dtype=torch.float32)(input_ids=ids).logits
    assert torch.equal(a, b)
    assert torch.allclose(b, c, atol=1e-4)
    assert not torch.allclose(plain, c, atol=1e-4)  # the adapter did change the model
    adapter = load_file(root / "models/adapter/adapter_model.safetensors")
    assert any("lora_A" in k for k in adapter) and (root / "models/merged/chat_template.jinja").read_text() == (
        root / "models/base/chat_template.jinja").read_text()


def test_qlora_nf4_trains_and_merges_into_the_full_precision_base(tokenized, monkeypatch):
    tokenized.set_params({"lora": {"quant": "nf4"}, "train": {"max_steps": 2, "save_steps": 2}})
    tokenized.run("train", monkeypatch)
    tokenized.run("convert", monkeypatch)
    tokenized.run("merge", monkeypatch)
    merged = AutoModelForCausalLM.from_pretrained(tokenized.root / "models/merged")
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    base = AutoModelForCausalLM.from_pretrained(tokenized.root / "models/base")
    name = "model.layers.0.self_attn.q_proj.weight"
    delta = merged.state_dict()[name] - base.state_dict()[name]
    # The LoRA delta is small next to the weights: merged = full-precision base + B@A, not a dequantized copy.
    assert 0 < delta.abs().max() < 0.1 * base.state_dict()[name].abs().max()


def test_deepspeed_zero2_runs_single_process_on_cpu(tokenized):
    """One process: DeepSpeed on a one-member gloo group of its own (no port); multi-process ZeRO-2 and
    its resume are in tests/test_distributed.py."""
    tokenized.set_params({"train": {"deepspeed": "zero2", "max_steps": 2, "save_steps": 2, "accumulative_counts": 2}})
    proc = tokenized.subprocess("train", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-3000:]
    assert "output layer on label positions only" in output  # the engine wraps the same loss as without it
    ckpt = torch.load(tokenized.root / "work/iter_2.pth", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(t).all() for t in ckpt["lora"].values())
    assert len(ckpt["optimizer"]["zero_shards"]) == 1 and ckpt["order"]["world_size"] == 1
