"""Stage `convert` (XTuner's `pth_to_hf`): a training checkpoint -> a PEFT adapter folder.

Reads work/iter_N.pth (convert.iter: last | N), models/base/config.json, params model.*, lora.*.
Writes models/adapter/ (adapter_config.json + adapter_model.safetensors), loadable by
`PeftModel.from_pretrained` and by vLLM's LoRA loader.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from tunedag.core.errors import UserError, stage_main
from tunedag.core.io import atomic_dir
from tunedag.core.params import load_params
from tunedag.model.checkpoints import check_lora_fits, list_checkpoints, load_checkpoint
from tunedag.model.lora import lora_config, lora_shapes
from tunedag.model.presets import get_preset

BASE_DIR = "models/base"  # its config only: the shapes the adapter must have
WORK_DIR = Path("work")
OUT_DIR = "models/adapter"


@stage_main
def main() -> None:
    params = load_params()
    checkpoints = list_checkpoints(WORK_DIR)
    if params.convert.iter == "last":
        if not checkpoints:
            raise UserError(f"no checkpoint in {WORK_DIR}/: run `dvc repro train` first.")
        path = checkpoints[-1]
    else:
        path = WORK_DIR / f"iter_{params.convert.iter}.pth"
    ckpt = load_checkpoint(path, params)
    check_lora_fits(ckpt["lora"], lora_shapes(BASE_DIR, params), str(path))

    config = lora_config(params)
    config.base_model_name_or_path = get_preset(params.model.preset).hub_id
    # peft keeps target_modules as a set, whose order changes with Python's hash seed: sort it so
    # adapter_config.json is byte-identical across runs (tunedag verify found this).
    config.target_modules = sorted(config.target_modules)
    # Plain, contiguous tensors: safetensors refuses views/shared storage.
    tensors = {name: t.contiguous() for name, t in ckpt["lora"].items()}
    with atomic_dir(OUT_DIR) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, Path(tmp) / "adapter_model.safetensors", metadata={"format": "pt"})
    print(f"wrote {OUT_DIR} from {path} (step {ckpt['step']}, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
