"""Model loading and presets, LoRA, training checkpoints, generation, DeepSpeed."""
