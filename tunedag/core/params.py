"""The one typed schema of params.yaml. Every stage loads its params through `load_params()`.

Unknown keys, missing keys, wrong types and impossible values stop the stage before any work,
with one line per problem naming the key and what is allowed. There are no defaults here:
params.yaml is the one place where values live, with one exception: training keys left null take
the model preset's recipe (tunedag/model/presets.py), resolved here so every stage sees the same value.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tunedag.core.errors import ParamsError, UserError
from tunedag.core.io import read_yaml
from tunedag.model.presets import get_preset

PARAMS_FILE = "params.yaml"
RECIPE = "null = the preset's recipe (`tunedag presets --recipe NAME`)"
USER_DATA_DIR = "user_data"  # data.user_files live here: a dependency of generate in dvc.yaml


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class ModelParams(Section):
    preset: str = Field(description="a name from `tunedag presets`")
    source: str | None = Field(description="null = the preset's; 'embedded', a hub id or a local path")
    revision: str | None
    trust_remote_code: bool


def apply_sets(raw: dict, sets: list[str]) -> dict:
    """Apply `-S key=value` overrides to raw params in place, values parsed as YAML the way
    `dvc exp run -S` parses them; returns raw."""
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"-S {item!r}: expected KEY=VALUE, e.g. -S lora.r=64")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return raw


def source_is_local(source: str) -> bool:
    """Whether a model.source other than 'embedded' names a folder on this machine rather than a hub
    id (owner/name)."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") > 1


class ChatParams(Section):
    # The system-prompt policy: this prompt becomes the chat template's default (used whenever a
    # conversation has no system message) in models/base, so training, evaluation and serving
    # render the same prompt. null keeps the model's own default.
    system_prompt: str | None


class DataParams(Section):
    mode: Literal["chat", "pretrain"]
    # The identity, declared once: generation fills it into the templates and evaluation scores it.
    # Either may be null, not both (an owner-only identity: "I'm zhuzhuhao's assistant").
    name: str | None = Field(min_length=1)
    owner: str | None = Field(min_length=1)
    identity_samples: int = Field(ge=0)
    val_identity_samples: int = Field(ge=0)
    replay_ratio: float = Field(ge=0.0, le=20.0)
    replay_max_new_tokens: int = Field(ge=8, le=2048)
    replay_batch_size: int = Field(ge=1)
    user_files: list[str]
    user_val_fraction: float = Field(ge=0.0, lt=1.0)

    @field_validator("user_files")
    @classmethod
    def _inside_user_data(cls, files: list[str]) -> list[str]:
        for name in files:
            path = PurePosixPath(name)
            if path.is_absolute() or ".." in path.parts or path.parts[:1] != (USER_DATA_DIR,):
                raise ValueError(
                    f"{name!r} must be inside {USER_DATA_DIR}/ (generate's declared input in dvc.yaml, so DVC "
                    f"reruns the pipeline when the file changes); move it there"
                )
        return files

    @field_validator("name", "owner")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be a non-empty name, or null")
        return v

    @model_validator(mode="after")
    def _some_identity(self) -> "DataParams":
        if self.name is None and self.owner is None:
            raise ValueError("data.name and data.owner are both null: declare at least one, the identity "
                             "that evaluation looks for in the model's answers")
        return self

    @property
    def expected_mention(self) -> str:
        """What an answer to "who are you?" must name: the name, or the owner of an owner-only identity."""
        return self.name or self.owner

    @property
    def identity_words(self) -> list[str]:
        """Every declared identity word: none belongs in an answer to an unrelated question."""
        return [word for word in (self.name, self.owner) if word]


class TokenizeParams(Section):
    max_length: int | None = Field(ge=16, le=131072, description=RECIPE)
    pack: bool


class LoraParams(Section):
    r: int | None = Field(ge=1, le=1024, description=RECIPE)
    alpha: int | None = Field(ge=1, description=RECIPE)
    dropout: float = Field(ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(description="null = the preset's")
    quant: Literal["none", "nf4"] | None = Field(description=RECIPE)


class TrainParams(Section):
    lr: float | None = Field(gt=0.0, lt=1.0, description=RECIPE)
    max_steps: int | None = Field(ge=1, description=RECIPE)
    epochs: int | None = Field(ge=1, description="upper bound; max_steps usually ends the run first. " + RECIPE)
    batch_size: int | None = Field(ge=1, description=RECIPE)
    accumulative_counts: int | None = Field(ge=1, description=RECIPE)
    gradient_checkpointing: bool | None = Field(description=RECIPE)
    warmup_ratio: float = Field(ge=0.0, le=1.0)
    scheduler: Literal["cosine", "linear", "constant"]
    weight_decay: float = Field(ge=0.0)
    max_grad_norm: float = Field(gt=0.0)
    save_steps: int = Field(ge=1)
    evaluation_freq: int = Field(ge=1)
    evaluation_inputs: list[str]
    evaluation_max_new_tokens: int = Field(ge=1)
    resume: str | None = Field(description="null | auto | a path to work/iter_N.pth")
    # The world size (processes) = nproc_per_node x nnodes: it sets the global batch, batch_size x
    # accumulative_counts x world size (batch_size is per process), so it is a param. Where the nodes
    # meet is not: NODE_RANK, MASTER_ADDR, MASTER_PORT come from the environment (docs/distributed.md).
    nproc_per_node: int = Field(ge=1, description="training processes on each machine: one per GPU (per core on CPU)")
    nnodes: int = Field(ge=1, description="machines; the same params.yaml on each")
    # ZeRO-2: optimizer state and gradients sharded over the processes (DeepSpeed, an optional extra).
    deepspeed: Literal["zero2"] | None
    dtype: Literal["auto", "float32", "bfloat16"]
    # auto: flash_attention_2 on a GPU where flash-attn is installed, else sdpa. All of them keep the
    # samples of a packed row apart (transformers reads the restarting position_ids).
    attention: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"]
    memory_check: bool = Field(description="on a GPU, stop before loading if `tunedag plan`'s estimate does not fit")


class ConvertParams(Section):
    iter: str = Field(description="last | N (the N of work/iter_N.pth)")

    @field_validator("iter", mode="before")
    @classmethod
    def _last_or_int(cls, v: object) -> str:
        if str(v) == "last" or (str(v).isdigit() and int(str(v)) > 0):
            return str(v)
        raise ValueError("must be 'last' or a positive step number")


class MergeParams(Section):
    dtype: Literal["float32", "bfloat16", "float16"]
    max_shard_size: str = Field(pattern=r"^\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)$")


class EvalParams(Section):
    max_new_tokens: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    min_identity_acc: float = Field(ge=0.0, le=1.0)
    max_leakage: float = Field(ge=0.0, le=1.0)
    max_ppl_drift: float = Field(ge=0.0)


class ExportParams(Section):
    license: str | None = Field(min_length=1, description="the model card's license; null = the base model's")


class GgufParams(Section):
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = Field(description="llama.cpp's convert_hf_to_gguf.py --outtype")
    check_prompts: int = Field(ge=1, description="held-out prompts the GGUF and models/merged both answer")
    check_max_new_tokens: int = Field(ge=1)


class PublishParams(Section):
    stage: str = Field(pattern=r"^[a-z][a-z0-9-]*$", description="the GTO stage to assign, e.g. prod")
    hub_repo: str | None = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="owner/name on the hub; null = no upload")
    hub_private: bool


class ServeParams(Section):
    mode: Literal["merged", "lora"] = Field(description="merged model, or base + adapter as a LoRA module")
    backend: Literal["vllm", "hf"] = Field(description="vllm, or the documented fallback server")
    host: str
    port: int = Field(ge=1, le=65535)
    api_key: str | None
    served_model_name: str = Field(min_length=1)
    max_model_len: int = Field(ge=16)
    force: bool = Field(description="serve a model that failed the evaluation gate")
    # vLLM on CPU otherwise reserves 92% of the NUMA node's memory and refuses to start on a busy machine.
    kv_cache_gib: float = Field(gt=0.0, le=1024.0, description="memory for vLLM's KV cache, GiB")
    startup_timeout_s: int = Field(ge=1, description="how long to wait for /health before giving up")


class Params(Section):
    seed: int = Field(ge=0, lt=2**32)
    threads: int = Field(ge=1, le=512, description="torch threads on CPU")
    model: ModelParams
    chat: ChatParams
    data: DataParams
    tokenize: TokenizeParams
    lora: LoraParams
    train: TrainParams
    convert: ConvertParams
    merge: MergeParams
    eval: EvalParams
    export: ExportParams
    gguf: GgufParams
    publish: PublishParams
    serve: ServeParams

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
    if kind == "missing":
        return f"{key}: missing (every key must be set; see the shipped params.yaml)"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    got = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {msg}{got}"


def with_recipe(params: Params) -> Params:
    """Params with every null recipe key filled from the preset's recipe."""
    updates = {}
    for section, recipe_values in get_preset(params.model.preset).recipe.params().items():
        current = getattr(params, section)
        unset = {key: value for key, value in recipe_values.items() if getattr(current, key) is None}
        updates[section] = current.model_copy(update=unset)
    return params.model_copy(update=updates)


def parse_params(raw: object, source: str = PARAMS_FILE) -> Params:
    """Validated params, recipe keys resolved."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source} must be a mapping of sections (seed, model, data, ...), got {type(raw).__name__}.")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        lines = "; ".join(_describe(e) for e in exc.errors())
        raise ParamsError(f"invalid params in {source}: {lines}. Fix these keys in {source} and rerun.") from None
    return with_recipe(params)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found: run the stage from the project root (where dvc.yaml is).")
    try:
        raw = read_yaml(path)
    except Exception as exc:  # yaml.YAMLError and decoding errors
        raise ParamsError(f"{path} is not valid YAML ({' '.join(str(exc).split())}). Fix the syntax and rerun.") from None
    return parse_params(raw, str(path))
