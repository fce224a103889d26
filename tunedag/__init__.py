"""tunedag: the library the pipeline stages (stages/), the Prefect flows (flows/) and the `tunedag`
command share. Split by role: core (params, errors, atomic IO, runtime, environment record), data
(user formats, chat template + labels, packing), model (loading, LoRA, checkpoints, generation),
evaluation (scoring, the gate), serving (launcher, fallback server, checks, chat CLI, web page)."""
