"""Stage `serve_check`: serve models/merged for real, check it, measure it, stop it.

Reads models/merged, models/base's tokenizer (the one the tokenize stage used), metrics/eval.json
(the gate), params data.name/owner and serve.*. Writes metrics/serve.json (DVC metrics).

1. A model that failed the evaluation gate (and serve.force is false) is not served: the refusal
   is recorded in metrics/serve.json ({"served": false, ...}) and the stage ends there.
2. Starts the server (serve.backend, on a free port of serve.host) and records its start-up time.
3. Template parity: the prompt tokens the server renders (its /tokenize endpoint, with `messages`)
   must equal what the tokenize stage produced for the same conversations, system-prompt policy
   included. Any difference stops the stage: the model would be served a prompt it never saw.
4. Sane answers through the official `openai` client: the identity question names the identity, a
   general question gets a finished answer, a streamed answer equals the non-streamed one.
5. Latency and tokens/s at 1 and 8 concurrent streamed requests.
"""

from __future__ import annotations

from pathlib import Path

from tunedag.core.errors import UserError, stage_main
from tunedag.core.io import write_json
from tunedag.core.params import load_params
from tunedag.evaluation.gate import gate_verdict, read_gate, require_gate
from tunedag.model.loading import load_tokenizer
from tunedag.serving.checks import (
    BENCH_PROMPTS,
    check_answers,
    check_template_parity,
    measure,
)
from tunedag.serving.server import (
    BASE_DIR,
    MERGED_DIR,
    Server,
    free_port,
    spec_from_params,
)

METRICS = Path("metrics/serve.json")
SERVER_LOG = Path(".cache/serve_check.log")


@stage_main
def main() -> None:
    from openai import OpenAI

    params = load_params()
    try:
        require_gate(force=params.serve.force)
    except UserError as refusal:
        # A model below the gate is a legitimate outcome of the DAG, not a crash: record the refusal
        # (dvc exp show lists it) and serve nothing. `tunedag serve` refuses it too.
        write_json(METRICS, {"served": False, "refused": str(refusal)})
        print(f"serve_check: NOT SERVED: {refusal}", flush=True)
        gate = read_gate()
        if gate:
            print(gate_verdict(gate), flush=True)  # the pipeline's last word, where users look
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
        answers = check_answers(client, spec.served_model_name, params.data.expected_mention)
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
