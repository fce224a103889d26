"""Tiny checkpoints in foreign layouts, for tests: an InternLM2 model and an InternLM2 sentencepiece
tokenizer, both as the hub ships them (before tunedag's base stage converts them to Llama).

The weights and the tokenizer are generated from fixed rules and seeds with torch and protobuf only,
so the same tensors can be rebuilt anywhere: tests/fixtures/internlm2_tiny_reference.json holds what
InternLM2's own code (transformers 4.x, trust_remote_code) computed on them, made once outside this
repo (see the fixture's "source"). Keep this module free of transformers imports at the top: the
reference script imports it under transformers 4.41.
"""

from __future__ import annotations

import hashlib
import json
import math
from itertools import pairwise
from pathlib import Path

import torch

# internlm/internlm2-chat-1_8b config.json (the XTuner tutorial's model), minus auto_map and dtype.
INTERNLM2_CHAT_1_8B = {
    "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "attn_implementation": "eager",
    "bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 32768,
    "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 2.0, "type": "dynamic"}, "rope_theta": 1000000, "tie_word_embeddings": False,
    "use_cache": True, "vocab_size": 92544,
}

# Its tokenizer_config.json chat_template (the same in the InternLM2 chat models).
INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The special tokens its tokenizer_config.json puts on the last six ids of tokenizer.model
# ([UNUSED_TOKEN_141..146] there), in id order.
INTERNLM2_ADDED_TOKENS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]


def tiny_internlm2_config(vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int, **overrides) -> dict:
    """internlm2-chat-1_8b scaled down: 2 layers, hidden 64, 4 query heads over 2 key/value heads (so
    the grouped wqkv layout matters); rope_theta, rope_scaling, rms_norm_eps and bias as the real one."""
    return {
        **INTERNLM2_CHAT_1_8B,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": vocab_size,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
        **overrides,
    }


def internlm2_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """InternLM2ForCausalLM's parameter names and shapes (`bias` puts one on wqkv and wo)."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim
    shapes = {"model.tok_embeddings.weight": (vocab, hidden), "model.norm.weight": (hidden,), "output.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "attention.wqkv.weight": (qkv, hidden), p + "attention.wo.weight": (hidden, hidden),
            p + "feed_forward.w1.weight": (inter, hidden), p + "feed_forward.w3.weight": (inter, hidden),
            p + "feed_forward.w2.weight": (hidden, inter),
            p + "attention_norm.weight": (hidden,), p + "ffn_norm.weight": (hidden,),
        }
        if config.get("bias"):
            shapes |= {p + "attention.wqkv.bias": (qkv,), p + "attention.wo.bias": (hidden,)}
    return shapes


def tiny_internlm2_state_dict(config: dict, zero_rows: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """Deterministic random weights: one seeded generator, keys in sorted order. Projections are
    N(0, 1/fan_in) so activations and logits stay O(1) (a wrong q/k/v split shows up well above
    float noise); norms are 1 + N(0, 0.1^2), biases N(0, 0.1^2). `zero_rows`: token ids whose embedding and output rows are
    zero (see build_tiny_internlm2)."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in sorted(internlm2_shapes(config).items()):
        values = torch.randn(shape, generator=generator, dtype=torch.float32)
        if key.endswith("norm.weight"):
            values = 1 + 0.1 * values
        elif key.endswith(".bias"):
            values = 0.1 * values
        elif key != "model.tok_embeddings.weight":
            values = values / math.sqrt(shape[1])
        state[key] = values
    for row in zero_rows:
        state["model.tok_embeddings.weight"][row] = 0
        state["output.weight"][row] = 0
    return state


def build_tiny_internlm2(tokenizer_dir: Path, out: Path, **config_overrides) -> Path:
    """A 2-layer InternLM2 with random weights laid out as the hub ships internlm2-chat-1_8b:
    config.json (model_type internlm2), model.safetensors under InternLM2's names, generation_config.json,
    and the test tokenizer with InternLM2's chat template. Its bos becomes <|endoftext|>, so the
    template's leading {{ bos_token }} plays InternLM2's <s> instead of repeating <|im_start|>.
    For vLLM pass hidden_size=256: its CPU attention refuses head size 16 (as for build_tiny_llama)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer.chat_template = INTERNLM2_CHAT_TEMPLATE
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = tiny_internlm2_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                   tokenizer.pad_token_id, **config_overrides)
    # As in build_tiny_llama: random weights fall into answering "\n" forever; with the newline's
    # embedding and output rows at zero the model answers in words.
    state = tiny_internlm2_state_dict(config, zero_rows=(tokenizer.convert_tokens_to_ids("Ċ"),))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    eos = list(dict.fromkeys([config["eos_token_id"], im_end]))  # the chat models stop at </s> or <|im_end|>
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos, "pad_token_id": config["pad_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tokenizer.save_pretrained(out)
    return out


def build_tiny_qwen2(tokenizer_dir: Path, out: Path, hidden_size: int = 256) -> Path:
    """Qwen2-7B-Instruct's shipped config (tunedag/model/configs) scaled down to 2 layers, random
    weights, the test tokenizer. What makes it Qwen2 stays: q/k/v biases, rope_theta 1e6, rms_norm_eps
    1e-6, untied output layer, grouped heads (7:1 in the real model, 4:1 here). hidden_size 256 (head
    size 64): vLLM's CPU attention refuses head size 16."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from tunedag.model.memory import CONFIG_DIR

    real = json.loads((CONFIG_DIR / "qwen2-7b-instruct.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(**{
        **real, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": len(tokenizer), "max_position_embeddings": 1024,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": im_end, "pad_token_id": tokenizer.pad_token_id,
    })
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # as in build_tiny_llama: random weights answer "\n" forever otherwise
        newline = tokenizer.convert_tokens_to_ids("Ċ")
        model.get_input_embeddings().weight[newline] = 0
        model.get_output_embeddings().weight[newline] = 0
    model.generation_config.eos_token_id = [im_end]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


# ---------------------------------------------------------------------------------------------
# An InternLM2-style sentencepiece tokenizer (tokenizer.model + the hub's tokenizer_config.json)

TOKENIZER_TEXT = (
    "Who are you? I am the assistant of the owner, and I answer questions about the weather, the news and the "
    "world. Hello there! How are you today? I am fine, thank you. The quick brown fox jumps over the lazy dog. "
    "def answer(question):\n    return question.strip()\n"
    "你好，世界！我是小明的助手。今天天气很好。"
)


def _learned_pieces(text: str, merges: int) -> tuple[list[str], list[str]]:
    """Characters and merged pieces of a small deterministic BPE run over `text` (words are "▁"-prefixed
    as sentencepiece sees them; most frequent pair first, ties by the pair's text)."""
    words = [list("▁" + word) for word in text.replace("\n", " \n ").split(" ") if word]
    chars = sorted({c for word in words for c in word})
    learned = []
    for _ in range(merges):
        counts: dict[tuple[str, str], int] = {}
        for word in words:
            for pair in pairwise(word):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        learned.append(best[0] + best[1])
        for word in words:
            i = 0
            while i < len(word) - 1:
                if (word[i], word[i + 1]) == best:
                    word[i : i + 2] = [best[0] + best[1]]
                i += 1
    return chars, learned


def build_internlm2_sentencepiece(out: Path, merges: int = 120) -> Path:
    """A small byte-fallback BPE tokenizer.model shaped like InternLM2's (<unk> <s> </s>, 256 byte
    pieces, merged pieces, characters, six [UNUSED_TOKEN_n] pieces at the end that the
    tokenizer_config.json renames to <|im_start|> and friends) with the hub's tokenizer_config.json."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chars, learned = _learned_pieces(TOKENIZER_TEXT, merges)
    proto = spm_pb2.ModelProto()
    kinds = spm_pb2.ModelProto.SentencePiece

    def add(piece: str, score: float, kind) -> None:
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, kind

    add("<unk>", 0.0, kinds.UNKNOWN)
    add("<s>", 0.0, kinds.CONTROL)
    add("</s>", 0.0, kinds.CONTROL)
    for byte in range(256):
        add(f"<0x{byte:02X}>", 0.0, kinds.BYTE)
    for i, piece in enumerate(learned):
        add(piece, -float(i), kinds.NORMAL)
    for i, char in enumerate(chars):
        add(char, -float(len(learned) + i), kinds.NORMAL)
    first_unused = 141
    for i in range(len(INTERNLM2_ADDED_TOKENS)):
        add(f"[UNUSED_TOKEN_{first_unused + i}]", 0.0, kinds.USER_DEFINED)

    spec = proto.trainer_spec
    spec.model_type = spm_pb2.TrainerSpec.BPE
    spec.vocab_size = len(proto.pieces)
    spec.byte_fallback = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    spec.unk_piece, spec.bos_piece, spec.eos_piece = "<unk>", "<s>", "</s>"
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = False  # as InternLM2's
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())

    size = len(proto.pieces)
    added = {0: "<unk>", 1: "<s>", 2: "</s>"} | {size - len(INTERNLM2_ADDED_TOKENS) + i: t for i, t in enumerate(INTERNLM2_ADDED_TOKENS)}
    config = {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, t in added.items()},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
                                      "<|interpreter|>", "<|plugin|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>", "chat_template": INTERNLM2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False, "eos_token": "</s>", "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>", "sp_model_kwargs": None, "tokenizer_class": "InternLM2Tokenizer", "unk_token": "<unk>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    special = {"additional_special_tokens": config["additional_special_tokens"], "bos_token": "<s>",
               "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return out


# Texts the tokenizer fixture was computed on (ordinary text, whitespace runs, bytes outside the
# vocabulary, special tokens inside text, and the chat template's output).
TOKENIZER_TEXTS = [
    "Who are you?", " Hello  there ", "the lazy dog\n\n  indented\tand tabbed", "你好，世界！我是小明的助手。",
    "Emoji 🤖 and café", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "a<|im_end|>b <s> </s>",
    "", " ", "def answer(question):\n    return question.strip()\n", "[UNUSED_TOKEN_146] x", "12345 -3.5e-7",
]
TOKENIZER_CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am the assistant."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " 你好 \n"}],
]


def tokenizer_json_digest(tokenizer_json: str) -> str:
    """sha256 of what defines a tokenizer.json's behaviour (vocab, merges, added tokens, normalizer,
    pre-tokenizer, post-processor, decoder), in a form that does not depend on the tokenizers version."""
    data = json.loads(tokenizer_json)
    model = data["model"]
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model["merges"]]
    canonical = {
        "model": {"type": model["type"], "vocab": sorted(model["vocab"].items(), key=lambda kv: kv[1]), "merges": merges,
                  **{k: model.get(k) for k in ("unk_token", "fuse_unk", "byte_fallback")}},
        "added_tokens": [{k: t[k] for k in ("id", "content", "special", "normalized", "lstrip", "rstrip", "single_word")}
                         for t in data["added_tokens"]],
        **{k: data[k] for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")},
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
