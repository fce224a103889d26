"""Stage `gguf`: the exported model as GGUF for llama.cpp and Ollama, checked by reading it back.

Reads models/export, data/raw/val.jsonl, params chat.system_prompt, gguf.*, threads.
Writes models/gguf/model.gguf (llama.cpp's own convert_hf_to_gguf.py, gguf.outtype), models/gguf/
Modelfile (`ollama create NAME -f Modelfile`: the same chat template and system prompt as training),
and metrics/gguf.json, the round trip: transformers reads the GGUF back, its embedded chat template
must render the same prompt tokens as the export's (else the stage fails: a served GGUF would answer
differently), and it answers gguf.check_prompts held-out prompts greedily beside models/export.
Identical answers are expected at f32; quantized types (q8_0) may part after a few tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunedag.core.errors import UserError, stage_main
from tunedag.core.io import atomic_dir, read_jsonl, write_json
from tunedag.core.params import load_params
from tunedag.core.runtime import setup
from tunedag.data.chat import end_of_turn_id, prompt_ids
from tunedag.evaluation.scoring import held_out_prompts
from tunedag.model.generation import chat_generate
from tunedag.model.loading import load_model, load_tokenizer
from tunedag.release.gguf import convert, converter_version, modelfile, ollama_template

EXPORT_DIR = Path("models/export")
VAL_FILE = "data/raw/val.jsonl"
OUT_DIR = Path("models/gguf")
GGUF_NAME = "model.gguf"
METRICS = "metrics/gguf.json"


@stage_main
def main() -> None:
    params = load_params()
    setup(params)
    cfg, system = params.gguf, params.chat.system_prompt
    tokenizer = load_tokenizer(EXPORT_DIR)
    template = ollama_template(tokenizer, system)

    with atomic_dir(OUT_DIR) as tmp:
        convert(EXPORT_DIR, tmp / GGUF_NAME, cfg.outtype)
        stop = tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer))
        (tmp / "Modelfile").write_text(modelfile(GGUF_NAME, template, system, stop))

        # The round trip, before the folder is renamed into place: a GGUF that renders another
        # prompt is not written at all.
        identity, general = held_out_prompts(read_jsonl(VAL_FILE))
        half = (cfg.check_prompts + 1) // 2
        prompts = (identity[:half] + general)[: cfg.check_prompts]
        gguf_tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=GGUF_NAME)
        chats = {p: [{"role": "user", "content": p}] for p in prompts}
        differing = [p for p, chat in chats.items() if prompt_ids(gguf_tokenizer, chat) != prompt_ids(tokenizer, chat)]
        if differing:
            raise UserError(
                f"the GGUF's embedded chat template renders {len(differing)} of {len(prompts)} prompts to other tokens "
                f"than {EXPORT_DIR} (first: {differing[0]!r}): llama.cpp or Ollama would prompt the model differently "
                "from training. Check the tokenizer's chat template in models/base, or report the converter version "
                f"(llama-cpp-python {converter_version()})."
            )
        answers = {}
        for label, model in (("export", load_model(EXPORT_DIR, torch.float32, "none")),
                             ("gguf", AutoModelForCausalLM.from_pretrained(tmp, gguf_file=GGUF_NAME, dtype=torch.float32))):
            answers[label] = [a for a, _ in chat_generate(model.eval(), tokenizer, prompts, cfg.check_max_new_tokens,
                                                          desc=f"{label} answers")]
            del model

    same = [a == b for a, b in zip(answers["export"], answers["gguf"])]
    write_json(METRICS, {
        "outtype": cfg.outtype,
        "converter": f"llama.cpp convert_hf_to_gguf.py (llama-cpp-python {converter_version()})",
        "size_mib": round((OUT_DIR / GGUF_NAME).stat().st_size / 2**20, 1),
        "prompt_tokens_equal": True,
        "greedy_same": round(sum(same) / len(same), 4),
        "prompts": len(prompts),
        "ollama_template": "chatml" if template else "from the GGUF",
        "differing": [{"prompt": p, "export": a, "gguf": b}
                      for p, a, b, s in zip(prompts, answers["export"], answers["gguf"], same) if not s],
    })
    print(f"wrote {OUT_DIR / GGUF_NAME} ({cfg.outtype}) and its Modelfile; greedy answers equal to {EXPORT_DIR} "
          f"on {sum(same)} of {len(same)} held-out prompts")


if __name__ == "__main__":
    main()
