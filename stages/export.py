"""Stage `export`: the merged model as a hub-ready folder, with its model card.

Reads models/merged, metrics/eval.json, metrics/train/params.yaml (the recipe train ran with),
data/tokenized/stats.json, params model.*, chat.system_prompt, data.*, export.license.
Writes models/export/: the merged safetensors, config and generation config, the tokenizer with the
chat template that carries the system-prompt policy, and README.md, the model card (base model,
data, recipe, the evaluation table, the base model's license). `tunedag publish` registers and
uploads this folder; stage gguf converts it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tunedag.core.errors import stage_main
from tunedag.core.io import atomic_dir, read_yaml
from tunedag.core.params import load_params
from tunedag.evaluation.gate import EVAL_METRICS
from tunedag.release.card import model_card

MERGED_DIR = Path("models/merged")
TRAINED_PARAMS = "metrics/train/params.yaml"
DATA_STATS = "data/tokenized/stats.json"
OUT_DIR = "models/export"


@stage_main
def main() -> None:
    params = load_params()
    card = model_card(
        params,
        eval_metrics=json.loads(Path(EVAL_METRICS).read_text()),
        trained=read_yaml(TRAINED_PARAMS),
        data_stats=json.loads(Path(DATA_STATS).read_text()),
    )
    with atomic_dir(OUT_DIR) as tmp:
        for path in sorted(MERGED_DIR.iterdir()):  # weights, config, generation config, tokenizer, template
            shutil.copy2(path, tmp / path.name)
        card.save(tmp / "README.md")
    print(f"wrote {OUT_DIR}: {', '.join(sorted(p.name for p in Path(OUT_DIR).iterdir()))}")


if __name__ == "__main__":
    main()
