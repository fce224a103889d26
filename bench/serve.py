"""Serving throughput: vLLM vs plain HF generate, same model, same prompts, same client.

    python bench/serve.py [--model-dir models/merged] [--concurrency 1,8,16] [--max-tokens 32] [--repeats 3]
    python bench/serve.py --load 1000            # + load check: 1,000 requests at 16 concurrency on vLLM
    python bench/serve.py --backends hf --concurrency 1 --max-tokens 4 --repeats 1 --out /tmp/s.json  # smoke

"HF" is the fallback server (tunedag/serving/hf_server.py): HF `generate` one request at a time,
like the seed project's Streamlit demo, behind the same OpenAI API, so both backends see the
identical streamed requests from the same client (stages.serve_check.measure). Greedy decoding;
tokens/s = completion tokens of all requests / wall time, median of --repeats measurements per level.
Servers bind 127.0.0.1 on a free port. Writes bench/results/serve.json (docs/benchmarks.md, via
bench/report.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openai import OpenAI  # noqa: E402

from bench.common import command_line, machine, median_dicts, write_results  # noqa: E402
from tunedag.core.params import load_params  # noqa: E402
from tunedag.serving.checks import BENCH_PROMPTS, measure  # noqa: E402
from tunedag.serving.server import Server, ServerSpec, free_port  # noqa: E402

LOAD_CONCURRENCY = 16
LOAD_MAX_TOKENS = 8  # the load check is about errors and queueing, not long answers


def prompts_for(n: int) -> list[str]:
    return [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] for i in range(n)]


def bench_backend(spec: ServerSpec, levels: list[int], max_tokens: int, load: int, log_dir: Path, repeats: int) -> dict:
    results = {}
    with Server(spec, log=log_dir / f"bench-{spec.backend}.log") as server:
        print(f"{spec.backend}: up in {server.startup_s:.0f} s", flush=True)
        client = OpenAI(base_url=f"{spec.url}/v1", api_key=spec.api_key or "none", max_retries=0, timeout=600)
        measure(client, spec.served_model_name, prompts_for(1), 1, 4)  # warm-up, not counted
        for c in levels:
            runs = [measure(client, spec.served_model_name, prompts_for(max(4, c)), c, max_tokens) for _ in range(repeats)]
            results[c] = run = {**median_dicts(runs), "errors": sum(r["errors"] for r in runs),
                                "first_error": next((r["first_error"] for r in runs if r["first_error"]), None)}
            print(f"{spec.backend} c={c}: {run['tokens_per_s']} tok/s, p50 {run['latency_p50_s']} s, "
                  f"errors {run['errors']}", flush=True)
        if load:
            results["load"] = measure(client, spec.served_model_name, prompts_for(load), LOAD_CONCURRENCY, LOAD_MAX_TOKENS)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="models/merged")
    parser.add_argument("--backends", default="vllm,hf")
    parser.add_argument("--concurrency", default="1,8,16")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--load", type=int, default=0, help="requests for the load check (vLLM only); 0 = skip")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per level; figures are medians")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "serve.json"),
                        help="results file; '' = do not write one")
    args = parser.parse_args()
    params = load_params()
    info = machine()
    levels = [int(c) for c in args.concurrency.split(",")]
    log_dir = Path(".cache")
    log_dir.mkdir(exist_ok=True)
    table = {}
    for backend in args.backends.split(","):
        spec = ServerSpec(model_dir=Path(args.model_dir), adapter_dir=None, backend=backend, host="127.0.0.1",
                          port=free_port(), api_key=None, served_model_name="bench",
                          max_model_len=params.serve.max_model_len, kv_cache_gib=params.serve.kv_cache_gib,
                          startup_timeout_s=params.serve.startup_timeout_s, threads=params.threads)
        table[backend] = bench_backend(spec, levels, args.max_tokens, args.load if backend == "vllm" else 0, log_dir,
                                       args.repeats)

    print(f"\nmodel {args.model_dir}, greedy, max_tokens {args.max_tokens}, requests per level max(4, concurrency)")
    print(f"{'backend':<8} {'conc':>4} {'reqs':>5} {'tokens':>7} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} {'ttft p50':>9} {'errors':>6}")
    for backend, results in table.items():
        for c in levels:
            r = results[c]
            print(f"{backend:<8} {c:>4} {r['requests']:>5} {r['tokens']:>7} {r['tokens_per_s']:>8} "
                  f"{r['latency_p50_s']:>7} {r['latency_p99_s']:>7} {r['ttft_p50_s']:>9} {r['errors']:>6}")
    if "vllm" in table and "hf" in table:
        for c in levels:
            speedup = table["vllm"][c]["tokens_per_s"] / max(table["hf"][c]["tokens_per_s"], 1e-9)
            print(f"vLLM / HF tokens/s at concurrency {c}: {speedup:.1f}x")
    if args.load and "vllm" in table:
        load = table["vllm"]["load"]
        print(f"\nload check (vllm): {load['requests']} requests at concurrency {LOAD_CONCURRENCY}, max_tokens "
              f"{LOAD_MAX_TOKENS}: {load['errors']} errors, p50 {load['latency_p50_s']} s, p99 {load['latency_p99_s']} s, "
              f"{load['wall_s']} s wall, {load['tokens_per_s']} tok/s")
    if args.out:
        write_results(Path(args.out), {
            "bench": "serve", "command": command_line(), "quick": False, "machine": info,
            "settings": {"model_dir": args.model_dir, "max_tokens": args.max_tokens, "concurrency": levels,
                         "repeats": args.repeats, "threads": params.threads},
            "results": {b: {str(c): r for c, r in res.items() if c != "load"} for b, res in table.items()},
            "load": {**table["vllm"]["load"], "concurrency": LOAD_CONCURRENCY} if args.load and "vllm" in table else None,
        })
    if args.load and "vllm" in table and table["vllm"]["load"]["errors"]:
        print(f"first error: {table['vllm']['load']['first_error']}")
        sys.exit(1)


if __name__ == "__main__":
    main()
