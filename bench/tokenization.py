"""Tokenization throughput: the tokenize stage's code vs the seed tutorial's per-sample `process_func`.

    python bench/tokenization.py                 # data/raw/train.jsonl cycled to 20,000 samples, 5 repeats
    python bench/tokenization.py --quick         # smoke test: 300 samples, 1 repeat, not saved
    python bench/tokenization.py --data other.jsonl --base path/to/model --samples 50000

(Not `bench/tokenize.py`: Python puts a script's folder first on sys.path, so a bench/tokenize.py
would replace the standard library's `tokenize` module for every script in bench/.)

Variants, each on the same records (OpenAI `messages`) with the same tokenizer (models/base: the
chat template with the system-prompt policy), in this process, one thread:
  - ours, stage: `stages.tokenize.tokenize_split` (what `python -m stages.tokenize` runs per split):
    datasets.map batched, labels on every assistant turn (prefix rendering), truncation, packing
    (tokenize.pack) or not;
  - ours, encode_chat loop: the per-sample core of it (tunedag.data.chat.encode_chat) in a plain loop;
  - seed, dataset.map: `ds.map(process_func)`, one sample at a time, as the tutorial does
    (bench/seed_recipe.py);
  - seed, plain loop: `[process_func(r) for r in records]`.
samples/s = input conversations / wall seconds, median of --repeats (after one warm-up pass).
Writes bench/results/tokenize.json.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    REPO,
    busy_warning,
    command_line,
    machine,
    median,
    results_path,
    write_results,
)


def relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def load_inputs(args):
    """(tokenizer, records, where they came from)."""
    from tunedag.core.io import read_jsonl, read_yaml
    from tunedag.model.loading import load_tokenizer

    base = Path(args.base)
    if (base / "config.json").exists() or (base / "tokenizer.json").exists():
        tokenizer, source = load_tokenizer(base), relative(base)
    else:  # no models/base yet: the embedded SmolLM2 tokenizer with the same system-prompt policy
        from transformers import AutoTokenizer

        from tunedag.data.chat import with_default_system_prompt
        from tunedag.model.sources import embedded_gguf

        gguf = embedded_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        system_prompt = read_yaml(REPO / "params.yaml")["chat"]["system_prompt"]
        tokenizer.chat_template = with_default_system_prompt(tokenizer.chat_template, system_prompt)
        source = "embedded GGUF tokenizer (no models/base)"
    data = Path(args.data)
    if data.exists():
        records = [r for r in read_jsonl(data) if r.get("messages")]
        data_source = relative(data)
    else:  # no data/raw yet: identity conversations as the generate stage writes them
        import random

        from tunedag.core.params import load_params
        from tunedag.data.synthetic import identity_conversations

        params = load_params(REPO / "params.yaml")
        records = identity_conversations(params.data, "train", 256, random.Random(params.seed))
        data_source = "generated identity conversations (no data/raw/train.jsonl)"
    records = list(itertools.islice(itertools.cycle(records), args.samples))
    return tokenizer, records, {"tokenizer": source, "data": data_source}


def variants(tokenizer, max_length: int) -> dict:
    from bench.seed_recipe import process_func, tokenized_dataset
    from stages.tokenize import tokenize_split
    from tunedag.data.chat import encode_chat

    return {
        "ours: tokenize stage, packed": lambda recs: tokenize_split(recs, tokenizer, max_length, True, "bench-pack"),
        "ours: tokenize stage, not packed": lambda recs: tokenize_split(recs, tokenizer, max_length, False, "bench"),
        "ours: encode_chat loop": lambda recs: [encode_chat(tokenizer, r["messages"]) for r in recs],
        "seed: dataset.map(process_func)": lambda recs: tokenized_dataset(recs, tokenizer),
        "seed: process_func loop": lambda recs: [process_func(r, tokenizer) for r in recs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / "data/raw/train.jsonl"))
    parser.add_argument("--base", default=str(REPO / "models/base"), help="the tokenizer's folder")
    parser.add_argument("--samples", type=int, help="records, cycled from --data (default 20000; --quick 300)")
    parser.add_argument("--repeats", type=int, help="timed passes per variant (default 5; --quick 1)")
    parser.add_argument("--max-length", type=int, help="tokenize.max_length (default: params.yaml's)")
    parser.add_argument("--quick", action="store_true", help="smoke test: small, not saved unless --out")
    parser.add_argument("--out", help="results file (default bench/results/tokenize.json)")
    args = parser.parse_args()
    args.samples = args.samples or (300 if args.quick else 20_000)
    args.repeats = args.repeats or (1 if args.quick else 5)

    import torch
    from datasets import disable_caching, disable_progress_bars

    import tunedag.core.runtime  # noqa: F401  (the stages' environment: TOKENIZERS_PARALLELISM=false, ...)
    from tunedag.core.params import load_params

    torch.set_num_threads(1)
    disable_caching()  # as the stage does: nothing written next to the data
    disable_progress_bars()
    info = machine()
    if warning := busy_warning(info):
        print(warning)
    max_length = args.max_length or load_params(REPO / "params.yaml").tokenize.max_length
    tokenizer, records, sources = load_inputs(args)
    print(f"{len(records)} samples from {sources['data']}; tokenizer {sources['tokenizer']}; max_length {max_length}")

    runs = variants(tokenizer, max_length)
    for fn in runs.values():  # warm-up: imports, tokenizer caches, datasets' first map
        fn(records[:50])
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, fn in runs.items():  # interleaved, so a busy spell hits every variant alike
            began = time.perf_counter()
            fn(records)
            times[name].append(time.perf_counter() - began)
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{t[-1]:.2f} s" for t in times.values()), flush=True)

    seed_rate = len(records) / median(times["seed: dataset.map(process_func)"])
    results = {}
    for name, ts in times.items():
        rate = len(records) / median(ts)
        results[name] = {"samples_per_s": rate, "median_s": median(ts), "runs_s": ts, "vs_seed_map": rate / seed_rate}
    print(f"\n{'variant':<36} {'samples/s':>10} {'median s':>9} {'vs seed map':>12}")
    for name, r in results.items():
        print(f"{name:<36} {r['samples_per_s']:>10.0f} {r['median_s']:>9.2f} {r['vs_seed_map']:>11.2f}x")

    payload = {"bench": "tokenize", "command": command_line(), "quick": args.quick, "machine": info,
               "settings": {"samples": len(records), "repeats": args.repeats, "max_length": max_length, **sources},
               "results": results}
    if args.quick and not args.out:
        print("\n--quick: results not saved (--out FILE to save them)")
    else:
        write_results(results_path("tokenize", args.quick, args.out, Path(".")), payload)


if __name__ == "__main__":
    main()
