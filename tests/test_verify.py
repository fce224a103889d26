"""tunedag verify's comparison of two versions of an output file (the whole command runs in
tests/test_reliability.py): what counts as the same model computed elsewhere, and what does not."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from tunedag.verify import TOLERANCE, file_delta


def write(path, text: str):
    path.write_text(text)
    return path


def test_text_outputs_allow_float_noise_but_not_other_words_or_counts(tmp_path):
    recorded = write(tmp_path / "a", '{"identity_acc": 1.0, "ppl": 1.863, "steps": 50, "answer": "I am Nova."}')
    close = write(tmp_path / "b", '{"identity_acc": 1.0, "ppl": 1.8629, "steps": 50, "answer": "I am Nova."}')
    assert 0 < file_delta("eval.json", recorded, close) <= 1.1e-4
    far = write(tmp_path / "c", '{"identity_acc": 0.9474, "ppl": 1.863, "steps": 50, "answer": "I am Nova."}')
    other_answer = write(tmp_path / "d", '{"identity_acc": 1.0, "ppl": 1.863, "steps": 50, "answer": "I am Nova!"}')
    other_count = write(tmp_path / "e", '{"identity_acc": 1.0, "ppl": 1.863, "steps": 51, "answer": "I am Nova."}')
    for different in (far, other_answer, other_count):
        assert file_delta("eval.json", recorded, different) is None
    assert file_delta("eval.json", recorded, write(tmp_path / "f", recorded.read_text())) == 0.0


def test_tensors_within_tolerance_are_equivalent_and_beyond_it_different(tmp_path):
    weights = {"lora_A": torch.randn(8, 64, generator=torch.Generator().manual_seed(0))}
    scale = float(weights["lora_A"].abs().max())
    save_file(weights, tmp_path / "a")  # a DVC cache file: no suffix, the output's name decides
    save_file({"lora_A": weights["lora_A"] + 1e-6}, tmp_path / "b")
    save_file({"lora_A": weights["lora_A"] + 10 * TOLERANCE["rtol"] * scale}, tmp_path / "c")
    save_file({"lora_A": weights["lora_A"][:4]}, tmp_path / "d")
    name = "adapter_model.safetensors"
    assert 0 < file_delta(name, tmp_path / "a", tmp_path / "b") < 1e-5
    assert file_delta(name, tmp_path / "a", tmp_path / "c") is None
    assert file_delta(name, tmp_path / "a", tmp_path / "d") is None  # another shape


def test_checkpoints_compare_tensors_and_require_equal_steps(tmp_path):
    state = {"step": 6, "lora": {"w": torch.ones(4)}, "optimizer": {"state": {0: {"exp_avg": torch.zeros(4)}}}}
    torch.save(state, tmp_path / "a")
    torch.save({**state, "lora": {"w": torch.ones(4) + 1e-7}}, tmp_path / "b")
    torch.save({**state, "step": 7}, tmp_path / "c")
    assert 0 < file_delta("iter_6.pth", tmp_path / "a", tmp_path / "b") < 1e-6
    assert file_delta("iter_6.pth", tmp_path / "a", tmp_path / "c") is None
