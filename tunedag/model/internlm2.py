"""InternLM2 checkpoints as Llama, with no remote code.

InternLM2 (internlm/internlm2-chat-1_8b, the XTuner tutorial's model) is a Llama with other names and
a fused attention projection, but its hub repo ships modeling and tokenizer code written for
transformers 4.x. On the pinned transformers that tokenizer code still loads but silently appends
<|im_start|> and friends as new ids past the vocabulary, and vLLM, PEFT and merge are simpler on a
standard architecture. So the base stage converts: the same mapping as InternLM's own
tools/convert2llama.py (written here, not copied), and a standard fast tokenizer built from
tokenizer.model the way InternLM2TokenizerFast converts it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

MODEL_TYPE = "internlm2"

# InternLM2Config's defaults (configuration_internlm2.py): a config.json may omit any of these.
INTERNLM2_DEFAULTS = {
    "vocab_size": 103168, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True, "pad_token_id": 0, "bos_token_id": 1,
    "eos_token_id": 2, "tie_word_embeddings": False, "bias": True, "rope_theta": 10000, "rope_scaling": None,
}

# InternLM2 key suffix -> Llama key suffix, per decoder layer (wqkv is split, see split_wqkv).
_LAYER_RENAMES = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_RENAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def is_internlm2(folder: Path) -> bool:
    config = Path(folder) / "config.json"
    return config.exists() and read_config(folder).get("model_type") == MODEL_TYPE


def _config(config: dict) -> dict:
    """config.json as InternLM2Config reads it (its defaults; no key/value heads = one per query head)."""
    merged = {**INTERNLM2_DEFAULTS, **config}
    if merged["num_key_value_heads"] is None:
        merged["num_key_value_heads"] = merged["num_attention_heads"]
    return merged


def _head_dim(c: dict) -> int:
    # InternLM2Attention: head_dim = hidden_size // num_attention_heads (no head_dim key).
    if c["hidden_size"] % c["num_attention_heads"]:
        raise ValueError(f"hidden_size {c['hidden_size']} is not a multiple of num_attention_heads {c['num_attention_heads']}")
    return c["hidden_size"] // c["num_attention_heads"]


def llama_config_from_internlm2(config: dict):
    """The LlamaConfig computing what InternLM2ForCausalLM computes for this config.json dict."""
    from transformers import LlamaConfig

    c = _config(config)
    rope = {"rope_type": "default", "rope_theta": float(c["rope_theta"])}
    if c["rope_scaling"] is not None:
        # InternLM2 knows {"type": "dynamic" | "linear", "factor": f}; Llama implements both the same way
        # (dynamic NTK only changes the base beyond max_position_embeddings).
        kind = c["rope_scaling"].get("type") or c["rope_scaling"].get("rope_type")
        if kind not in ("dynamic", "linear"):
            raise ValueError(f"rope_scaling type {kind!r} is not one InternLM2 supports (dynamic or linear)")
        rope = {**rope, "rope_type": kind, "factor": float(c["rope_scaling"]["factor"])}
    return LlamaConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        head_dim=_head_dim(c),
        hidden_act=c["hidden_act"],
        max_position_embeddings=c["max_position_embeddings"],
        initializer_range=c["initializer_range"],
        rms_norm_eps=c["rms_norm_eps"],
        use_cache=c["use_cache"],
        pad_token_id=c["pad_token_id"],
        bos_token_id=c["bos_token_id"],
        eos_token_id=c["eos_token_id"],
        tie_word_embeddings=c["tie_word_embeddings"],
        rope_parameters=rope,
        attention_bias=bool(c["bias"]),  # InternLM2's `bias` is on wqkv and wo; its MLP never has one
        mlp_bias=False,
        architectures=["LlamaForCausalLM"],
    )


def split_wqkv(wqkv: torch.Tensor, config: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v rows of a fused wqkv weight (or bias).

    The fused rows are grouped per key/value head: for each of the num_key_value_heads heads,
    num_key_value_groups query heads, then its key head, then its value head, head_dim rows each
    ("(h gs d)" with gs = groups + 2 in modeling_internlm2.py). Query head h*groups+g is the g-th of
    group h, which is the order Llama's repeat_kv pairs query heads with key/value heads.
    """
    c = _config(config)
    head_dim, kv_heads = _head_dim(c), c["num_key_value_heads"]
    groups = c["num_attention_heads"] // kv_heads
    rest = wqkv.shape[1:]
    grouped = wqkv.reshape(kv_heads, groups + 2, head_dim, *rest)
    q = grouped[:, :groups].reshape(kv_heads * groups * head_dim, *rest)
    k = grouped[:, groups].reshape(kv_heads * head_dim, *rest)
    v = grouped[:, groups + 1].reshape(kv_heads * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def llama_state_dict_from_internlm2(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """InternLM2 weights under LlamaForCausalLM's names (same tensors, wqkv split into q/k/v).

    Works on a shard too (keys are converted one by one). Unknown keys raise: a silently dropped
    weight would leave random values in the model.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = tensor
            continue
        if key.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved; Llama recomputes it
            continue
        match = _LAYER_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"unexpected InternLM2 weight {key!r}")
        layer, name, kind = match.groups()
        prefix = f"model.layers.{layer}."
        if name == "attention.wqkv":
            q, k, v = split_wqkv(tensor, config)
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{prefix}self_attn.{proj}.{kind}"] = part
        elif name in _LAYER_RENAMES:
            out[f"{prefix}{_LAYER_RENAMES[name]}.{kind}"] = tensor
        else:
            raise ValueError(f"unexpected InternLM2 weight {key!r}")
    return out


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors preferred, then PyTorch .bin; sharded or not."""
    folder = Path(folder)
    for index, pattern in (("model.safetensors.index.json", "*.safetensors"), ("pytorch_model.bin.index.json", "*.bin")):
        if (folder / index).exists():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        files = sorted(folder.glob(pattern))
        if pattern == "*.bin":
            files = [f for f in files if f.name != "training_args.bin"]
        if files:
            return files
    raise FileNotFoundError(f"no model weights (*.safetensors or pytorch_model*.bin) in {folder}")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)  # weights only: no pickled code runs


def load_internlm2_as_llama(folder: Path):
    """A LlamaForCausalLM in float32 with an InternLM2 checkpoint's weights (no remote code runs)."""
    from transformers import GenerationConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    folder = Path(folder)
    raw = read_config(folder)
    config = llama_config_from_internlm2(raw)
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):  # shard by shard, upcast as we go: peak memory ~ one fp32 copy
        shard = read_weights(path)
        state.update({k: v.to(torch.float32) for k, v in llama_state_dict_from_internlm2(shard, raw).items()})
        del shard
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to embed_tokens, as InternLM2's output is to tok_embeddings

    # Built on the meta device and filled by assignment: no random init, no second copy of the weights.
    with torch.device("meta"), no_init_weights():
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"InternLM2 checkpoint does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # non-persistent buffers, still on meta
    if config.tie_word_embeddings:
        model.tie_weights()
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"InternLM2 conversion left tensors unset: {leftover[:5]}")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Tokenizer


def has_internlm2_tokenizer(folder: Path) -> bool:
    """Whether the folder's tokenizer is InternLM2's sentencepiece one (remote-code InternLM2Tokenizer)."""
    folder = Path(folder)
    path = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.model").exists() or not path.exists():
        return False
    config = json.loads(path.read_text())
    auto = json.dumps(config.get("auto_map", {}))
    return str(config.get("tokenizer_class", "")).startswith("InternLM2Tokenizer") or "tokenization_internlm2" in auto


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _bpe_merges(sp_vocab: dict[str, int], pieces: list[tuple[str, float]]) -> list[tuple[str, str]]:
    """BPE merges as transformers 4.x's SentencePieceExtractor derives them (what InternLM2TokenizerFast
    was built with): every split of a piece into two sentencepiece pieces, ordered by the piece's score
    (stable, highest first), ties by the left then right part's id."""
    scores: dict[str, float] = {}
    for piece, score in pieces:
        scores[piece] = score
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in sp_vocab and piece[i:] in sp_vocab]
        merges.extend(sorted(local, key=lambda m: (sp_vocab[m[0]], sp_vocab[m[1]])))
    merges.sort(key=lambda m: m[2], reverse=True)
    return [(left, right) for left, right, _ in merges]


def internlm2_backend_tokenizer(folder: Path):
    """The `tokenizers.Tokenizer` InternLM2TokenizerFast builds from tokenizer.model and
    tokenizer_config.json: byte-fallback BPE, spaces as "▁", no pre-tokenizer, <s> prepended."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import import_protobuf

    folder = Path(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    proto = import_protobuf().ModelProto()
    proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    if proto.trainer_spec.model_type != 2:
        raise ValueError("tokenizer.model is not a BPE sentencepiece model, which InternLM2's tokenizer is")

    sp_vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    # Ids 0-2 are <unk>, <s>, </s> with score 0; the added tokens (<|im_start|> ...) rename the
    # sentencepiece pieces at their ids ([UNUSED_TOKEN_n] in tokenizer.model).
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(p.piece, p.score) for p in proto.pieces[3:]]
    added = sorted((int(i), spec) for i, spec in config.get("added_tokens_decoder", {}).items())
    for i, spec in added:
        if i >= len(pieces):
            raise ValueError(f"added token {spec['content']!r} has id {i} past the vocabulary ({len(pieces)} pieces)")
        pieces[i] = (spec["content"], pieces[i][1])

    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    tokenizer = Tokenizer(BPE(vocab, _bpe_merges(sp_vocab, pieces), unk_token=proto.trainer_spec.unk_piece,
                              fuse_unk=True, byte_fallback=True))
    tokenizer.add_special_tokens([
        AddedToken(spec["content"], single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                   rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", False), special=True)
        for _, spec in added
    ])
    dummy_prefix = proto.normalizer_spec.add_dummy_prefix
    tokenizer.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if dummy_prefix else []) + [normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if dummy_prefix else []))

    bos, eos = _token(config.get("bos_token", "<s>")), _token(config.get("eos_token", "</s>"))
    add_bos, add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = ([(bos, vocab[bos])] if add_bos else []) + ([(eos, vocab[eos])] if add_eos else [])
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return tokenizer


def load_internlm2_tokenizer(folder: Path):
    """InternLM2's tokenizer as a standard PreTrainedTokenizerFast: same ids, special tokens and chat
    template as the remote InternLM2TokenizerFast on transformers 4.x, saved as a plain tokenizer.json."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    names = {key: _token(config.get(key, default)) for key, default in
             (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", "</s>"))}
    return PreTrainedTokenizerFast(
        tokenizer_object=internlm2_backend_tokenizer(folder),
        **names,
        additional_special_tokens=[_token(t) for t in config.get("additional_special_tokens", [])],
        chat_template=template,
        clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
        model_max_length=config.get("model_max_length", int(1e30)),
        padding_side="left",  # InternLM2TokenizerFast's class default
    )
