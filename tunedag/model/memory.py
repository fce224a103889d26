"""Peak GPU memory of a (Q)LoRA training run, estimated from the model config alone.

`tunedag plan` asks "does this run fit a GPU of N GiB?" before anything is downloaded or loaded.
Parameters are counted exactly on a meta-device model (no memory, no weights read), with peft's
LoRA added the way the train stage adds it; everything else is arithmetic on the config, modelled on
what the libraries tunedag trains with actually keep on the GPU (transformers' decoder layers,
peft's LoRA layers, bitsandbytes' NF4, torch's AdamW and autograd). docs/memory.md explains each
part and compares the estimate with published measurements.

The estimate is the peak of one optimizer step, at whichever of two moments is higher:
- the start of backward, when every saved activation and the loss head are alive;
- with gradient checkpointing, the backward of the last layer, when the checkpointed layer inputs,
  that layer's recomputed activations and its gradient temporaries are alive (the loss head is gone).
Parts are reported as they are at that moment, so `total` is their plain sum.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunedag.core.errors import UserError
from tunedag.model import internlm2

GIB = 2**30
CONFIG_DIR = Path(__file__).with_name("configs")  # one config.json per preset, as on the Hugging Face Hub

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTS = ("none", "nf4")
ATTENTIONS = ("sdpa", "flash_attention_2", "eager")

# --- constants, each with the reason for its value --------------------------------------------------
# bitsandbytes NF4 as tunedag loads it (tunedag.model.loading: nf4, double quant): 4-bit codes, one
# absmax per block of 64 weights (bnb's default blocksize), the absmaxes themselves quantized to 8 bits
# in blocks of 256 with one fp32 scale each ("double quant"). Embeddings, norms, biases and lm_head stay
# unquantized: transformers' bnb integration replaces only nn.Linear and skips the output embeddings.
NF4_BLOCK = 64
NF4_ABSMAX_BLOCK = 256
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_ABSMAX_BLOCK)  # 0.5159
# AdamW keeps exp_avg and exp_avg_sq, each a tensor of its parameter's dtype (amsgrad off).
ADAMW_STATES = 2
# CUDA's dropout kernel (native_dropout) saves a 1-byte bool mask per element for backward.
DROPOUT_MASK_BYTES = 1
# The eager loss (stages/train.py: logits.float() then cross_entropy) at the start of backward holds
# three fp32 (rows x vocab) tensors at once: the saved log-softmax, the gradient nll_loss hands back and
# the gradient log_softmax hands on. Its forward peak (logits + fp32 copy + log-softmax) is lower.
EAGER_LOSS_BYTES_PER_LOGIT = 12
# A fused chunked loss (torchtune's compiled CEWithChunkedOutputLoss, 8 chunks) keeps only the logits
# in the compute dtype for backward, plus one chunk's gradient at a time.
CHUNKED_LOSS_CHUNKS = 8
# Outside torch's allocator but on the GPU: the CUDA context, cuBLAS/cuDNN handles and the kernels
# loaded lazily by a training step; typically 300-600 MiB (nvidia-smi minus torch's reserved): to calibrate
# with bench/gpu_train.py.
CUDA_CONTEXT_GIB = 0.5
# The caching allocator reserves more than it hands out: blocks are rounded (512 B, 2 MiB segments)
# and split blocks leave holes. A few percent of everything allocated in a steady training loop.
ALLOCATOR_SLACK = 0.05

# Which tensor a decoder layer feeds each Llama/Qwen2 linear layer: LoRA layers that share an input
# share its saved copy (when neither a dtype cast nor dropout makes them their own).
LINEAR_INPUTS = {
    "q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
    "o_proj": "attention output",
    "gate_proj": "mlp input", "up_proj": "mlp input",
    "down_proj": "mlp product",
}


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of the model and of its LoRA adapter, counted on a meta-device model."""

    total: int  # base model, tied weights once
    quantizable: int  # weights nf4 would quantize: decoder nn.Linear weights, not lm_head
    largest_linear: int  # the biggest of those: bitsandbytes dequantizes one at a time to multiply
    lora: int
    lora_inputs: tuple[tuple[str, int], ...]  # (module name, in_features) of one decoder layer's LoRA layers


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak GPU memory of one training step, in GiB, by part."""

    weights: float
    lora: float
    optimizer: float
    gradients: float
    activations: float
    logits: float
    overhead: float
    notes: dict[str, str] = field(default_factory=dict, compare=False)  # part -> what it holds
    params: ParameterCounts | None = field(default=None, compare=False)

    PARTS = ("weights", "lora", "optimizer", "gradients", "activations", "logits", "overhead")

    @property
    def total(self) -> float:
        return sum(getattr(self, part) for part in self.PARTS)

    def fits(self, gpu_gib: float) -> bool:
        """Whether the estimated peak fits a GPU with gpu_gib GiB of memory."""
        return self.total <= gpu_gib

    def table(self) -> str:
        """One aligned line per part, then the total: what `tunedag plan` prints."""
        lines = [f"{part:<12}{getattr(self, part):8.2f} GiB  {self.notes.get(part, '')}".rstrip() for part in self.PARTS]
        lines.append(f"{'total':<12}{self.total:8.2f} GiB")
        return "\n".join(lines)


def load_config(name_or_path: str | Path):
    """The transformers config of a preset (tunedag/model/configs/<preset>.json) or of a model folder
    (its config.json). InternLM2 comes back as the LlamaConfig the base stage converts it to; another
    model_type transformers does not know (remote code) as a plain PretrainedConfig."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    folder = Path(name_or_path).expanduser()
    preset = CONFIG_DIR / f"{name_or_path}.json"
    if (folder / "config.json").is_file():
        path = folder / "config.json"
    elif preset.is_file():
        path = preset
    else:
        shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise UserError(
            f"{name_or_path!r}: neither a preset with a shipped config ({shipped}) nor a folder with a "
            "config.json. Give a preset name or a model folder."
        )
    values = json.loads(path.read_text(encoding="utf-8"))
    values.pop("auto_map", None)  # remote code is never run here
    if values.get("model_type") == internlm2.MODEL_TYPE:  # trained as the Llama the base stage makes of it
        return internlm2.llama_config_from_internlm2(values)
    config_class = CONFIG_MAPPING[values["model_type"]] if values.get("model_type") in CONFIG_MAPPING else PretrainedConfig
    return config_class.from_dict(values)


def count_parameters(config, *, lora_r: int, target_modules: list[str]) -> ParameterCounts:
    """Count the base model's and the LoRA adapter's parameters exactly, on the meta device."""
    key = (config.to_json_string(use_diff=False), lora_r, tuple(sorted(target_modules)))
    if key not in _COUNTS:
        _COUNTS[key] = _count_parameters(config, lora_r, list(target_modules))
    return _COUNTS[key]


_COUNTS: dict[tuple, ParameterCounts] = {}  # building a 7B model on meta takes a second or two


def _count_parameters(config, lora_r: int, target_modules: list[str]) -> ParameterCounts:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    try:
        with torch.device("meta"):  # shapes only: no memory used, no weights read
            model = AutoModelForCausalLM.from_config(config)
    except ValueError:  # a model_type transformers does not implement (remote code)
        raise UserError(
            f"model_type {config.model_type!r}: not an architecture transformers implements, so its memory cannot "
            "be estimated from the config alone. Estimate the closest architecture transformers has instead."
        ) from None
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    # The modules transformers' bnb quantizer leaves alone: output embeddings, tied and last weights.
    keep = get_keys_to_not_convert(model)
    linear_weights = [
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(name == k or name.endswith(f".{k}") for k in keep)
    ]
    try:
        peft_model = get_peft_model(model, LoraConfig(r=lora_r, target_modules=target_modules, task_type="CAUSAL_LM"))
    except ValueError as exc:  # peft: target modules not found in the model
        raise UserError(f"lora.target_modules {target_modules}: {exc}") from None
    lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    first_layer = peft_model.get_base_model().get_decoder().layers[0]
    lora_inputs = tuple(
        (name.rsplit(".", 1)[-1], module.in_features)
        for name, module in first_layer.named_modules()
        if isinstance(module, BaseTunerLayer)
    )
    return ParameterCounts(total, sum(linear_weights), max(linear_weights, default=0), lora, lora_inputs)


def estimate_training_memory(
    config,
    *,
    quant: str,
    dtype: str,
    lora_r: int,
    target_modules: list[str],
    batch_size: int,
    max_length: int,
    gradient_checkpointing: bool,
    label_positions_only: bool = True,
    label_fraction: float = 1.0,
    lora_dropout: float = 0.05,
    attention: str = "sdpa",
    lora_dtype: str | None = None,
    kbit_fp32_upcast: bool = True,
    chunked_loss: bool = False,
) -> MemoryPlan:
    """Peak GPU memory of one (Q)LoRA training step of `config` (llama/qwen2-style decoder).

    The defaults describe tunedag's train stage: peft LoRA layers in fp32 (peft upcasts adapters of a
    16-bit model), nf4 through peft's prepare_model_for_kbit_training (which casts every parameter
    it leaves unquantized to fp32), lora.dropout 0.05, sdpa with a mask (padded or packed rows), the
    eager fp32 loss. label_fraction is the share of positions that carry a label: with
    label_positions_only the output layer runs on those only; the default 1.0 is the conservative
    bound (every position a label). The other keywords describe other trainers (docs/memory.md)."""
    if quant not in QUANTS or dtype not in DTYPE_BYTES or attention not in ATTENTIONS:
        raise UserError(f"quant {quant!r}, dtype {dtype!r}, attention {attention!r}: expected quant in {QUANTS}, "
                        f"dtype in {tuple(DTYPE_BYTES)}, attention in {ATTENTIONS}")
    counts = count_parameters(config, lora_r=lora_r, target_modules=target_modules)
    compute = DTYPE_BYTES[dtype]
    upcast = quant == "nf4" and kbit_fp32_upcast
    # peft casts 16-bit adapters to fp32 (autocast_adapter_dtype); an nf4 base gives it no float dtype
    # to follow, so the adapters are created in fp32 as well.
    lora_bytes = DTYPE_BYTES[lora_dtype] if lora_dtype else 4
    # Activations run in the parameters' dtype; after the fp32 upcast the residual stream and every
    # layer output are fp32 (bnb returns its matmul in the input's dtype).
    act = 4 if upcast else compute
    tokens = batch_size * max_length

    # Weights.
    if quant == "nf4":
        other = counts.total - counts.quantizable
        weights = (counts.quantizable * NF4_BYTES_PER_WEIGHT + other * (4 if upcast else compute)
                   + counts.largest_linear * compute)  # one weight dequantized for its matmul, then freed
        weights_note = (f"{counts.total / 1e9:.2f}B params: {counts.quantizable / 1e9:.2f}B nf4, the rest "
                        f"{'float32 (prepare_model_for_kbit_training)' if upcast else dtype}")
    else:
        weights = counts.total * compute
        weights_note = f"{counts.total / 1e9:.2f}B params in {dtype}"

    # Activations of one decoder layer, bytes per token.
    dims = _dimensions(config)
    per_layer = _layer_bytes_per_token(
        dims, counts, act=act, lora_bytes=lora_bytes, lora_r=lora_r, dropout=lora_dropout > 0,
        attention=attention, seq_len=max_length,
    )
    # Backward of a layer before its saved tensors are freed: gradients of the MLP's three
    # intermediate-size tensors and two hidden-size ones, in the widest of the two dtypes.
    backward_work = (3 * dims["intermediate"] + 2 * dims["hidden"]) * max(act, lora_bytes)
    final_norm = 4 * dims["hidden"] + 4  # the final RMSNorm keeps an fp32 copy of its input
    shared = batch_size * max_length * max_length if attention == "sdpa" else 0  # transformers' bool mask, once
    if gradient_checkpointing:
        kept = dims["layers"] * dims["hidden"] * act  # each layer's input, kept to recompute it
        layer_work = per_layer + backward_work  # one layer recomputed, then its backward
    else:
        kept = dims["layers"] * per_layer
        layer_work = backward_work

    rows = tokens * (label_fraction if label_positions_only else 1.0)
    per_logit = compute * (1 + 1 / CHUNKED_LOSS_CHUNKS) if chunked_loss else EAGER_LOSS_BYTES_PER_LOGIT
    head = rows * dims["vocab"] * per_logit
    if final_norm * tokens + head >= layer_work * tokens:  # peak at the start of backward
        activations = (kept + final_norm) * tokens + shared
        logits = head
        moment = "start of backward"
    else:  # peak in the last layer's backward: the loss head is freed by then
        activations = (kept + layer_work) * tokens + shared
        logits = 0.0
        moment = "backward of the last layer"

    lora = counts.lora * lora_bytes
    optimizer = ADAMW_STATES * counts.lora * lora_bytes
    gradients = counts.lora * lora_bytes
    allocated = weights + lora + optimizer + gradients + activations + logits
    overhead = CUDA_CONTEXT_GIB * GIB + ALLOCATOR_SLACK * allocated
    lora_dtype_name = lora_dtype or "float32"
    notes = {
        "weights": weights_note,
        "lora": f"{counts.lora / 1e6:.1f}M params (r={lora_r}, {len(counts.lora_inputs)} modules/layer) in {lora_dtype_name}",
        "optimizer": f"AdamW: {ADAMW_STATES} {lora_dtype_name} states per LoRA param",
        "gradients": f"one {lora_dtype_name} gradient per LoRA param",
        "activations": (f"{'layer inputs (gradient checkpointing)' if gradient_checkpointing else 'saved for backward'}, "
                        f"{batch_size}x{max_length} tokens in {'float32' if act == 4 else dtype}; peak at {moment}"),
        "logits": (f"{rows:.0f} rows x {dims['vocab']} vocab, {per_logit:g} B each"
                   + ("" if logits else " (freed before the peak)")),
        "overhead": f"CUDA context {CUDA_CONTEXT_GIB:g} GiB + {ALLOCATOR_SLACK:.0%} allocator slack",
    }
    return MemoryPlan(
        weights=weights / GIB, lora=lora / GIB, optimizer=optimizer / GIB, gradients=gradients / GIB,
        activations=activations / GIB, logits=logits / GIB, overhead=overhead / GIB, notes=notes, params=counts,
    )


def _dimensions(config) -> dict[str, int]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "hidden": config.hidden_size,
        "intermediate": config.intermediate_size,
        "layers": config.num_hidden_layers,
        "heads": heads,
        "q_dim": heads * head_dim,
        "kv_dim": (getattr(config, "num_key_value_heads", None) or heads) * head_dim,
        "vocab": config.vocab_size,
    }


def _layer_bytes_per_token(dims, counts: ParameterCounts, *, act: int, lora_bytes: int, lora_r: int, dropout: bool,
                           attention: str, seq_len: int) -> float:
    """Bytes per token that one decoder layer saves for backward (transformers' Llama/Qwen2 layer,
    peft LoRA layers). Frozen linear layers save nothing: their input gradient needs only the weight."""
    h, i = dims["hidden"], dims["intermediate"]
    q, kv = dims["q_dim"], dims["kv_dim"]
    # Two RMSNorms: each keeps its input upcast to fp32 and the fp32 inverse RMS.
    norms = 2 * (4 * h + 4)
    # Attention kernel (flash / memory-efficient): q, k, v, the output and an fp32 logsumexp per head.
    # Whenever sdpa gets a mask, transformers repeats k and v to all heads first, and torch turns the
    # bool mask into an additive one of the activation dtype that the kernel keeps (per layer).
    kv_saved = 2 * q if attention in ("sdpa", "eager") else 2 * kv
    attn = (2 * q + kv_saved) * act + 4 * dims["heads"]
    if attention == "sdpa":
        attn += math.ceil(seq_len / 16) * 16 * act  # the mask's row, padded to 16 for the kernel
    if attention == "eager":  # the fp32 softmax, its dtype copy and dropout's mask: heads x seq_len each
        attn += dims["heads"] * seq_len * (4 + act + 1)
    # SwiGLU: gate (SiLU's input), SiLU(gate) and up (the product's inputs).
    mlp = 3 * i * act
    # LoRA: lora_A keeps its input, lora_B keeps lora_A's output (r values). peft casts the input to the
    # adapter dtype and applies dropout per LoRA layer, which gives each layer its own copy; otherwise
    # layers reading the same tensor share it, and o_proj's input is the attention output saved above.
    if dropout:
        lora_in = sum(width * (lora_bytes + DROPOUT_MASK_BYTES) for _, width in counts.lora_inputs)
    elif lora_bytes != act:
        lora_in = sum(width * lora_bytes for _, width in counts.lora_inputs)
    else:
        sources = {LINEAR_INPUTS.get(name, name): width for name, width in counts.lora_inputs}
        lora_in = sum(width * act for source, width in sources.items() if source != "attention output")
    lora_out = len(counts.lora_inputs) * lora_r * lora_bytes
    return norms + attn + mlp + lora_in + lora_out
