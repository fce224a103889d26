"""The one typed schema of params.yaml. Every stage loads its params through `load_params()`.

Unknown keys, wrong types and impossible values stop the stage before any work, with one line per
problem naming the key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.common.errors import UserError
from stages.common.io import read_yaml

PARAMS_FILE = "params.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class ModelParams(Section):
    preset: str = Field("smollm2-135m-instruct", description="a name from `tunedag presets`")
    source: str | None = Field(None, description="null = the preset's; 'embedded', a hub id or a local path")
    revision: str | None = None
    trust_remote_code: bool = False


class ChatParams(Section):
    # The system-prompt policy: this prompt becomes the chat template's default (used whenever a
    # conversation has no system message) in models/base, so training, evaluation and serving
    # render the same prompt. null keeps the model's own default.
    system_prompt: str | None = "You are a helpful AI assistant."


class DataParams(Section):
    mode: Literal["chat", "pretrain"] = "chat"
    name: str = Field("Nova", min_length=1)
    owner: str = Field("Alice", min_length=1)
    identity_samples: int = Field(240, ge=0)
    val_identity_samples: int = Field(48, ge=0)
    replay_ratio: float = Field(1.0, ge=0.0, le=20.0)
    replay_max_new_tokens: int = Field(80, ge=8, le=2048)
    replay_batch_size: int = Field(16, ge=1)
    user_files: list[str] = []
    user_val_fraction: float = Field(0.05, ge=0.0, lt=1.0)

    @field_validator("name", "owner")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty name")
        return v


class TokenizeParams(Section):
    max_length: int = Field(256, ge=16, le=131072)
    pack: bool = True


class LoraParams(Section):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(None, description="null = the preset's")
    quant: Literal["none", "nf4"] = "none"


class TrainParams(Section):
    lr: float = Field(5e-4, gt=0.0, lt=1.0)
    max_steps: int = Field(60, ge=1)
    epochs: int = Field(10, ge=1, description="upper bound; max_steps usually ends the run first")
    batch_size: int = Field(8, ge=1)
    accumulative_counts: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    save_steps: int = Field(20, ge=1)
    evaluation_freq: int = Field(30, ge=1)
    evaluation_inputs: list[str] = ["Who are you?", "你是谁？", "What is the capital of France?"]
    evaluation_max_new_tokens: int = Field(32, ge=1)
    resume: str | None = Field(None, description="null | auto | a path to work/iter_N.pth")
    deepspeed: Literal["zero2", "zero3"] | None = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


class ConvertParams(Section):
    iter: str = Field("last", description="last | N (the N of work/iter_N.pth)")

    @field_validator("iter", mode="before")
    @classmethod
    def _last_or_int(cls, v: object) -> str:
        if str(v) == "last" or (str(v).isdigit() and int(str(v)) > 0):
            return str(v)
        raise ValueError("must be 'last' or a positive step number")


class MergeParams(Section):
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_shard_size: str = Field("2GB", pattern=r"^\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)$")


class EvalParams(Section):
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(16, ge=1)
    min_identity_acc: float = Field(0.95, ge=0.0, le=1.0)
    max_leakage: float = Field(0.02, ge=0.0, le=1.0)
    max_ppl_drift: float = Field(0.05, ge=0.0)


class Params(Section):
    seed: int = Field(42, ge=0, lt=2**32)
    threads: int = Field(1, ge=1, le=512, description="torch threads on CPU")
    model: ModelParams = ModelParams()
    chat: ChatParams = ChatParams()
    data: DataParams = DataParams()
    tokenize: TokenizeParams = TokenizeParams()
    lora: LoraParams = LoraParams()
    train: TrainParams = TrainParams()
    convert: ConvertParams = ConvertParams()
    merge: MergeParams = MergeParams()
    eval: EvalParams = EvalParams()

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        if self.data.mode == "pretrain" and not self.data.user_files:
            raise ValueError("data.mode 'pretrain' needs plain-text files in data.user_files")
        return self


def _describe(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key (check the spelling against params.yaml's documented keys)"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    got = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {msg}{got}"


def parse_params(raw: object, source: str = PARAMS_FILE) -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source} must be a mapping of sections (seed, model, data, ...), got {type(raw).__name__}.")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = "; ".join(_describe(e) for e in exc.errors())
        raise UserError(f"invalid params in {source}: {lines}. Fix these keys in {source} and rerun.") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: run the stage from the project root (where dvc.yaml is).")
    try:
        raw = read_yaml(path)
    except Exception as exc:  # yaml.YAMLError and decoding errors
        raise UserError(f"{path} is not valid YAML ({exc}). Fix the syntax and rerun.") from None
    return parse_params(raw, str(path))
