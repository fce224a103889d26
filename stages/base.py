"""Stage `base`: materialize the base model as a plain HF folder in models/base.

Reads params model.*, chat.system_prompt. Writes models/base/ (safetensors, tokenizer, chat template
carrying the system-prompt policy, generation config that stops at the end-of-turn token).
"""

from __future__ import annotations

from tunedag.core.errors import UserError, stage_main
from tunedag.core.io import atomic_dir
from tunedag.core.params import load_params
from tunedag.core.runtime import setup
from tunedag.data.chat import end_of_turn_id, with_default_system_prompt
from tunedag.model.presets import get_preset
from tunedag.model.sources import load_source

OUT_DIR = "models/base"


@stage_main
def main() -> None:
    params = load_params()
    setup(params)
    preset = get_preset(params.model.preset)
    source = params.model.source or preset.source

    print(f"loading {source} (preset {params.model.preset}) ...", flush=True)
    model, tokenizer = load_source(source, params.model.revision, params.model.trust_remote_code)

    if not tokenizer.chat_template:
        raise UserError(f"model.source {source!r} has no chat template; tunedag fine-tunes chat models only.")
    tokenizer.chat_template = with_default_system_prompt(tokenizer.chat_template, params.chat.system_prompt)
    if tokenizer.pad_token is None:  # batching needs one; eos is never a label via padding (labels -100)
        tokenizer.pad_token = tokenizer.eos_token
    # Generation stops at the end of the assistant's turn, whatever the model's config said.
    eot = end_of_turn_id(tokenizer)
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    model.generation_config.eos_token_id = eos + [eot] if eot not in eos else eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    with atomic_dir(OUT_DIR) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {OUT_DIR}: {model.config.model_type}, {n_params / 1e6:.1f}M params, {model.dtype}")


if __name__ == "__main__":
    main()
