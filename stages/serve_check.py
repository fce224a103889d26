"""Stage `serve_check`: serve models/merged for real, check it, measure it, stop it.

Reads models/merged, models/base's tokenizer (the one the tokenize stage used), metrics/eval.json
(the gate), params data.name and serve.*. Writes metrics/serve.json (DVC metrics).

1. A model that failed the evaluation gate (and serve.force is false) is not served: the refusal
   is recorded in metrics/serve.json ({"served": false, ...}) and the stage ends there.
2. Starts the server (serve.backend, on a free port of serve.host) and records its start-up time.
3. Template parity: the prompt tokens the server renders (its /tokenize endpoint, with `messages`)
   must equal what the tokenize stage produced for the same conversations, system-prompt policy
   included. Any difference stops the stage: the model would be served a prompt it never saw.
4. Sane answers through the official `openai` client: the identity question names data.name, a
   general question gets a finished answer, a streamed answer equals the non-streamed one.
5. Latency and tokens/s at 1 and 8 concurrent streamed requests.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stages.common.chat import encode_chat, render
from stages.common.errors import UserError, stage_main
from stages.common.gate import require_gate
from stages.common.io import write_json
from stages.common.models import load_tokenizer
from stages.common.params import load_params
from stages.evaluate import mentions
from stages.serve import BASE_DIR, MERGED_DIR, Server, free_port, spec_from_params

METRICS = Path("metrics/serve.json")
SERVER_LOG = Path(".cache/serve_check.log")

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
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"], True


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


def check_answers(client, model: str, name: str) -> dict[str, str]:
    """Greedy answers to a fixed set of requests; UserError if one is not sane."""
    identity, _ = ask(client, model, [{"role": "user", "content": "Who are you?"}])
    if not mentions(identity, name):
        raise UserError(f"the served model answered 'Who are you?' with {identity!r}, which does not name "
                        f"{name!r} (data.name): the server is not serving the fine-tuned model as trained.")
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


# ---------------------------------------------------------------------------------------------


@stage_main
def main() -> None:
    from openai import OpenAI

    params = load_params()
    try:
        require_gate(force=params.serve.force)
    except UserError as refusal:
        # A model below the gate is a legitimate outcome of the DAG, not a crash: record the refusal
        # (dvc exp show lists it) and serve nothing. `python -m stages.serve` refuses it too.
        write_json(METRICS, {"served": False, "refused": str(refusal)})
        print(f"serve_check: NOT SERVED: {refusal}", flush=True)
        return
    # Always the merged model (what this stage depends on), on a free port: a server the user
    # already runs on serve.port is left alone.
    spec = spec_from_params(params, mode="merged", port=free_port(params.serve.host))
    tokenizer = load_tokenizer(BASE_DIR)
    print(f"serve_check: starting {spec.backend} on {MERGED_DIR} at {spec.url} (log: {SERVER_LOG})", flush=True)
    SERVER_LOG.parent.mkdir(parents=True, exist_ok=True)
    with Server(spec, log=SERVER_LOG) as server:
        print(f"serve_check: up in {server.startup_s:.1f} s", flush=True)
        checked = check_template_parity(spec.url, spec.served_model_name, tokenizer)
        print(f"serve_check: template parity OK on {checked} conversations", flush=True)
        client = OpenAI(base_url=f"{spec.url}/v1", api_key=spec.api_key or "none", max_retries=0, timeout=300)
        answers = check_answers(client, spec.served_model_name, params.data.name)
        print(f"serve_check: answers OK (identity: {answers['identity']!r})", flush=True)
        runs = {}
        for concurrency, n in ((1, 4), (8, 16)):
            prompts = [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] for i in range(n)]
            runs[f"c{concurrency}"] = run = measure(client, spec.served_model_name, prompts, concurrency)
            if run["errors"]:
                raise UserError(f"{run['errors']} of {n} requests failed at concurrency {concurrency}: {run['first_error']}")
            print(f"serve_check: concurrency {concurrency}: {run['tokens_per_s']} tok/s, "
                  f"p50 latency {run['latency_p50_s']} s", flush=True)
    write_json(METRICS, {
        "served": True,
        "backend": spec.backend,
        "startup_s": round(server.startup_s, 1),
        "parity_conversations": checked,
        "identity_named": True,
        # Numbers only (dvc metrics diff); the first error is kept for the message above.
        **{name: {k: v for k, v in run.items() if k != "first_error"} for name, run in runs.items()},
    })
    print(f"serve_check: wrote {METRICS}")


if __name__ == "__main__":
    main()
