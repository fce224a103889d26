"""The seed tutorial's recipe, re-implemented as the baseline for bench/train.py and
bench/tokenization.py: datawhale "self-llm", Qwen2-7B-Instruct LoRA (HF PEFT + `Trainer`).

What the tutorial does, and what this file keeps:
  - `process_func` (MAX_LENGTH 384): the prompt (system + user turn, then "assistant") and the response
    are tokenized separately with add_special_tokens=False; input_ids = prompt + response + [pad];
    attention_mask all ones; labels = [-100] * len(prompt) + response + [pad]; truncated to 384.
    `dataset.map(process_func, remove_columns=...)`, one sample at a time.
  - LoraConfig(task_type=CAUSAL_LM, target_modules=q,k,v,o,gate,up,down _proj, r=8, lora_alpha=32,
    lora_dropout=0.1); model.enable_input_require_grads() for gradient checkpointing.
  - TrainingArguments(per_device_train_batch_size=4, gradient_accumulation_steps=4, logging_steps=10,
    num_train_epochs=3, save_steps=100, learning_rate=1e-4, gradient_checkpointing=True,
    save_on_each_node=True); Trainer(..., data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True)):
    no packing, each batch padded to its longest sample.

Adapted, and why:
  - The tutorial writes its ChatML prompt as an f-string with a fixed system prompt. Here the prompt
    is the model's own chat template (tunedag.data.chat.render) over the conversation up to its last
    assistant turn, so both recipes see the same text (the default system prompt, multi-turn
    history); the last assistant turn is the response. For ChatML models (Qwen2, SmolLM2) that is
    the f-string's text.
  - The pad token ends the response, as in the tutorial. For SmolLM2 pad is <|im_end|> (models/base),
    the end-of-turn token; for Qwen2 it was <|endoftext|>.
  - num_train_epochs=3 -> max_steps: bench/train.py gives both recipes the same number of samples.
  - bf16 -> the dtype the bench runs in (fp32 on CPU, where bf16 is slow; bf16 on GPU).
  - report_to="none", a temp output_dir, seed = params.yaml's seed, use_cpu on CPU.
"""

from __future__ import annotations

MAX_LENGTH = 384
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1}
ARGS = {
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 4,
    "logging_steps": 10,
    "num_train_epochs": 3,
    "save_steps": 100,
    "learning_rate": 1e-4,
    "gradient_checkpointing": True,
    "save_on_each_node": True,
}
SAMPLES_PER_STEP = ARGS["per_device_train_batch_size"] * ARGS["gradient_accumulation_steps"]


def process_func(example: dict, tokenizer) -> dict:
    """The tutorial's per-sample tokenization, on a `{"messages": [...]}` record."""
    from tunedag.data.chat import render

    messages = example["messages"]
    instruction = tokenizer(render(tokenizer, messages[:-1], add_generation_prompt=True), add_special_tokens=False)
    response = tokenizer(messages[-1]["content"], add_special_tokens=False)
    input_ids = instruction["input_ids"] + response["input_ids"] + [tokenizer.pad_token_id]
    attention_mask = instruction["attention_mask"] + response["attention_mask"] + [1]
    labels = [-100] * len(instruction["input_ids"]) + response["input_ids"] + [tokenizer.pad_token_id]
    if len(input_ids) > MAX_LENGTH:
        input_ids = input_ids[:MAX_LENGTH]
        attention_mask = attention_mask[:MAX_LENGTH]
        labels = labels[:MAX_LENGTH]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def tokenized_dataset(records: list[dict], tokenizer):
    """`ds.map(process_func, remove_columns=ds.column_names)`, as the tutorial does."""
    from datasets import Dataset

    ds = Dataset.from_list([{"messages": r["messages"]} for r in records])
    return ds.map(process_func, fn_kwargs={"tokenizer": tokenizer}, remove_columns=ds.column_names)


def lora_config():
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=TARGET_MODULES, inference_mode=False, **LORA)


def peft_model(model, quant: str = "none"):
    """get_peft_model as the tutorial does, after enable_input_require_grads (gradient checkpointing)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quant == "nf4":  # the usual QLoRA variant of the recipe
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ARGS["gradient_checkpointing"])
    model.enable_input_require_grads()
    return get_peft_model(model, lora_config())


def trainer(model, tokenizer, dataset, output_dir: str, max_steps: int, seed: int, device: str, callbacks=()):
    """The tutorial's Trainer. Like the tutorial (a bf16-loaded model, no bf16/fp16 flag), the model's
    own dtype decides the precision: no autocast."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=output_dir,
        **{k: v for k, v in ARGS.items() if k != "num_train_epochs"},
        max_steps=max_steps,  # replaces num_train_epochs: same samples as our train stage
        seed=seed,
        use_cpu=device == "cpu",
        report_to="none",
        disable_tqdm=True,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True),
        callbacks=list(callbacks),
    )
