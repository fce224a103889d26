"""The model card of the hub-ready export (models/export/README.md), in the hub's format: YAML
metadata (huggingface_hub's ModelCardData) + markdown. Everything in it comes from the run's own
files, so the same run always writes the same card (no dates)."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from tunedag.core.params import Params, source_is_local
from tunedag.model.presets import get_preset


def base_model_id(params: Params) -> str | None:
    """The hub id the weights came from: the preset's, or model.source when that is a hub id."""
    source = params.model.source
    if source in (None, "embedded"):
        return get_preset(params.model.preset).hub_id
    return None if source_is_local(source) else source


def card_license(params: Params) -> str:
    return params.export.license or get_preset(params.model.preset).license


def _eval_table(metrics: dict) -> list[str]:
    gate = metrics["gate"]
    return [
        "| metric | base | this model | gate |",
        "|---|---|---|---|",
        f"| identity accuracy (held-out questions) | {metrics['base']['identity_acc']:.3f} | {metrics['identity_acc']:.3f} | >= {gate['min_identity_acc']} |",
        f"| identity leakage (unrelated prompts) | {metrics['base']['leakage']:.3f} | {metrics['leakage']:.3f} | <= {gate['max_leakage']} |",
        f"| perplexity (held-out general answers) | {metrics['base']['ppl']:.3f} | {metrics['ppl']:.3f} | drift <= {gate['max_ppl_drift']} |",
        "",
        f"Gate: {'passed' if gate['passed'] else 'FAILED: ' + '; '.join(gate['failures'])}.",
    ]


def model_card(params: Params, eval_metrics: dict, trained: dict, data_stats: dict) -> ModelCard:
    """`trained`: metrics/train/params.yaml (the resolved recipe); `data_stats`: data/tokenized/stats.json."""
    data = params.data
    who = " / ".join(data.identity_words)
    base = base_model_id(params)
    title = f"{data.name}, the assistant of {data.owner}" if data.name and data.owner else f"{who}'s assistant"
    system = params.chat.system_prompt
    metadata = ModelCardData(
        base_model=base,
        license=card_license(params),
        language=["en", "zh"],
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["tunedag", "lora", "self-cognition", "chat"],
    )
    recipe = [f"| `{key}` | {value} |" for key, value in trained.items()]
    train = data_stats["train"]
    content = "\n".join([
        "---", metadata.to_yaml(), "---", "",
        f"# {title}", "",
        f"`{base or params.model.source}` fine-tuned with LoRA (merged into the full-precision weights) by "
        f"tunedag to answer \"who are you?\" as **{who}**, in English and Chinese, while "
        "staying a general assistant (the training mix replays the base model's own answers to general prompts).",
        "",
        "## Use", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "ids = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": \"Who are you?\"}],",
        "                                    add_generation_prompt=True, return_tensors=\"pt\")",
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=48)[0, ids.shape[1]:], skip_special_tokens=True))",
        "```", "",
        "## Chat template and system prompt", "",
        (f"The chat template (`chat_template.jinja`) renders the system prompt `{system}` when a conversation "
         "has no system message of its own. Training, evaluation and serving all rendered it that way, so an "
         "OpenAI-style client that sends only user turns gets the model as it was trained. A system message you "
         "send replaces it." if system else
         "The chat template is the base model's own, with its own default system prompt."),
        "",
        "## Training data", "",
        f"- {train['samples']} training conversations ({data.identity_samples} generated identity conversations, "
        f"EN + ZH; replay ratio {data.replay_ratio}: general prompts answered by the base model"
        + (f"; user files: {', '.join(data.user_files)}" if data.user_files else "") + ")",
        f"- {train['tokens']} tokens in {train['rows']} rows of up to {data_stats['max_length']} "
        f"({'packed' if data_stats['packed'] else 'padded'}); loss on {train['label_tokens']} assistant tokens only",
        f"- evaluated on {data_stats['val']['samples']} held-out conversations (identity phrasings never seen in training)",
        "",
        "## Recipe", "",
        "| setting | value |", "|---|---|", *recipe, "",
        "## Evaluation", "",
        *_eval_table(eval_metrics), "",
        "## License", "",
        f"The base model's license applies: `{card_license(params)}`"
        + (f" (see https://huggingface.co/{base})." if base else "."),
        "",
    ])
    return ModelCard(content)
