"""Checks and measurements of a running OpenAI-compatible server: train/serve template parity,
sane answers, latency and tokens/s under concurrency. Used by the serve_check stage and bench/."""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from tunedag.core.errors import UserError
from tunedag.data.chat import encode_chat, prompt_ids
from tunedag.evaluation.scoring import mentions

# Conversations whose rendering must match: the default system-prompt policy (no system message),
# an explicit system message, multi-turn, non-ASCII. Those ending with an assistant turn are
# compared as training renders them (encode_chat), the others as a generation prompt.
PARITY_CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "你是谁？"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2 + 2 = 4."}],
]
BENCH_PROMPTS = [
    "Write a short poem about the sea.", "Explain what a CPU does.", "Give three tips for learning to cook.",
    "Describe a rainy day in a city.", "What are the benefits of walking?", "Summarize the plot of Cinderella.",
    "Why is the sky blue?", "Write a haiku about autumn.",
]
BENCH_MAX_TOKENS = 64


# ---------------------------------------------------------------------------------------------
# Template parity


def server_tokens(base_url: str, model: str, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """The prompt token ids the server renders for `messages` (vLLM's /tokenize; the fallback has it too)."""
    body = {"model": model, "messages": messages, "add_generation_prompt": add_generation_prompt}
    request = urllib.request.Request(f"{base_url}/tokenize", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.load(resp)["tokens"]


def training_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], bool]:
    """What the tokenize stage makes of `messages`: (ids, add_generation_prompt)."""
    if messages[-1]["role"] == "assistant":
        return encode_chat(tokenizer, messages)[0], False
    return prompt_ids(tokenizer, messages), True


def check_template_parity(base_url: str, model: str, tokenizer, conversations=PARITY_CONVERSATIONS) -> int:
    """Raise UserError at the first conversation the server renders differently; return how many matched."""
    for messages in conversations:
        expected, generation_prompt = training_tokens(tokenizer, messages)
        got = server_tokens(base_url, model, messages, generation_prompt)
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise UserError(
                f"template parity FAILED: the server renders {messages!r} differently from training, from token "
                f"{at} on:\n  server:   {tokenizer.decode(got[at:at + 24])!r}\n  training: "
                f"{tokenizer.decode(expected[at:at + 24])!r}\nThe served model would see prompts it was never "
                "trained on. Serve the model folder written by the pipeline (its chat template carries the "
                "system-prompt policy) and do not pass --chat-template to the server."
            )
    return len(conversations)


# ---------------------------------------------------------------------------------------------
# Answers and measurements


def ask(client, model: str, messages: list[dict], max_tokens: int = 48) -> tuple[str, str]:
    out = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
    return out.choices[0].message.content, out.choices[0].finish_reason


def check_answers(client, model: str, expected: str) -> dict[str, str]:
    """Greedy answers to a fixed set of requests; UserError if one is not sane. `expected`: what the
    identity answer must name (data.name, or data.owner for an owner-only identity)."""
    identity, _ = ask(client, model, [{"role": "user", "content": "Who are you?"}])
    if not mentions(identity, expected):
        raise UserError(f"the served model answered 'Who are you?' with {identity!r}, which does not name "
                        f"{expected!r} (params data.*): the server is not serving the fine-tuned model as trained.")
    general, finish = ask(client, model, [{"role": "user", "content": "What is the capital of France?"}], 64)
    if not general.strip():
        raise UserError("the served model gave an empty answer to 'What is the capital of France?'.")
    messages = [{"role": "user", "content": "Say hello."}]
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=32, stream=True) if chunk.choices)
    whole, _ = ask(client, model, messages, 32)
    if streamed != whole:
        raise UserError(f"the streamed answer {streamed!r} differs from the non-streamed one {whole!r}.")
    return {"identity": identity, "general": general, "general_finish": finish, "streamed": streamed}


def timed_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed request: latency, time to first token, completion tokens; error text if it failed."""
    start = time.perf_counter()
    first, tokens = None, 0
    try:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens,
            stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except Exception as exc:  # the load check counts errors instead of stopping
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"latency": time.perf_counter() - start, "ttft": first or 0.0, "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def measure(client, model: str, prompts: list[str], concurrency: int, max_tokens: int = BENCH_MAX_TOKENS) -> dict:
    """Send `prompts` with `concurrency` in flight; aggregate throughput and latency."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: timed_request(client, model, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    latencies = [r["latency"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2),
        "latency_mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p99_s": round(percentile(latencies, 99), 3),
        "ttft_p50_s": round(percentile([r["ttft"] for r in ok], 50), 3),
    }
