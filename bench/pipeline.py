"""End to end: `dvc repro` from scratch in a fresh copy of the repo, stage by stage; a no-op
`dvc repro`; the Prefect pipeline flow's overhead per stage.

    python bench/pipeline.py                  # default params.yaml: 3 from-scratch repros, 5 no-ops, 3 flow runs
    python bench/pipeline.py --repros 1       # one from-scratch repro (~10 min on 2 idle cores)
    python bench/pipeline.py --quick          # smoke test: tiny params, 1 thread, 1 of each, not saved

What it measures, in a fresh copy of the working tree (tracked + untracked-not-ignored files, no
models/, data/, DVC cache or dvc.lock; git-initialised like a clone), with the copy's params.yaml =
the repo's (+ --set / --quick overrides):
  1. `dvc repro` from scratch (fresh copy and empty DVC cache each time): total wall time, and per
     stage the time from DVC's "Running stage 'X'" line to the next one (the stage's command plus
     DVC hashing and caching its outputs); "dvc start" is before the first stage. Median of --repros.
  2. no-op `dvc repro` right after (nothing changed): median of --noops runs; and
     `dvc repro --single-item <stage>` for each stage, which is what the flow runs per task.
  3. Prefect: `pipeline()` of flows/pipeline.py in one Python process against a temporary local
     server (PREFECT_HOME in a temp dir), every stage up to date: the first call (starts the
     server), then the median of --flows warm calls. Overhead per stage = (warm flow - sum of
     no-op `dvc repro --single-item` over the stages) / stages. Also `python -m flows.pipeline`
     as a user runs it (a new process and temporary server each time), median of --flows.
Writes bench/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    busy_warning,
    command_line,
    copy_repo,
    machine,
    make_tmp,
    median,
    merge,
    parse_sets,
    results_path,
    run_timed,
    venv_env,
    write_params,
    write_results,
)

QUICK = {  # like tests/test_e2e.py: every stage runs, on a few samples
    "threads": 1,
    "data": {"identity_samples": 16, "val_identity_samples": 4, "replay_ratio": 0.25, "replay_max_new_tokens": 24},
    "train": {"max_steps": 2, "batch_size": 2, "save_steps": 1, "evaluation_freq": 2,
              "evaluation_inputs": ["Who are you?"], "evaluation_max_new_tokens": 8},
    "eval": {"max_new_tokens": 8},
}
RUNNING = re.compile(r"^Running stage '([^']+)'")
TARGETS = {"repro_s": 600, "noop_s": 3}


def remove_outputs(repo: Path) -> None:
    """Delete every outs/metrics/plots path of dvc.yaml (git-tracked metrics and stray untracked
    outputs of the working tree included), and dvc.lock: the copy starts from scratch."""
    import yaml

    (repo / "dvc.lock").unlink(missing_ok=True)
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for entry in [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]:
            path = repo / (entry if isinstance(entry, str) else next(iter(entry)))
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def fresh_copy(root: Path, overrides: dict) -> tuple[Path, dict]:
    repo = copy_repo(root / "repo")
    remove_outputs(repo)  # from scratch: no lock file, no outputs, no DVC cache (not copied)
    params = write_params(repo, overrides)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench copy"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    return repo, params


def timed_repro(repo: Path, log: Path) -> dict:
    """One `dvc repro`, every output line time-stamped; per-stage spans from the "Running stage" lines."""
    began = time.perf_counter()
    marks: list[tuple[str, float]] = []
    with open(log, "a") as out, subprocess.Popen(["dvc", "repro"], cwd=repo, env=venv_env(), text=True, bufsize=1,
                                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            out.write(line)
            out.flush()
            if match := RUNNING.match(line):
                marks.append((match.group(1), time.perf_counter() - began))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    total = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"dvc repro failed ({proc.returncode}); log: {log}\n{log.read_text()[-3000:]}")
    ends = [t for _, t in marks[1:]] + [total]
    stages = {name: end - start for (name, start), end in zip(marks, ends)}
    return {"total_s": total, "dvc_start_s": marks[0][1] if marks else total, "stages_s": stages,
            "peak_rss_mib_largest_process": usage.ru_maxrss / 1024}


def noop(cmd: list[str], repo: Path, runs: int, log: Path) -> list[float]:
    times = []
    for _ in range(runs):
        run = run_timed(cmd, repo, venv_env(), log)
        if run["returncode"] != 0:
            raise SystemExit(f"{' '.join(cmd)} failed; log: {log}")
        times.append(run["wall_s"])
    return times


def prefect_env(home: Path, repo: Path) -> dict:
    env = {k: v for k, v in venv_env(repo).items() if not k.startswith("PREFECT_")}  # no server of the user's
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
            # the temporary server's start-up limit (default 20 s) is too short on a busy 2-core machine
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def flow_worker(args) -> None:
    """In a child process (PREFECT_HOME in a temp dir): the pipeline flow, cold then warm."""
    repo = Path(args.repo).resolve()
    os.chdir(repo)
    sys.path.insert(0, str(repo))
    from flows.pipeline import pipeline

    times, results = [], []
    for _ in range(1 + args.flows):
        began = time.perf_counter()
        state = pipeline(repo_dir=str(repo), return_state=True)
        times.append(time.perf_counter() - began)
        if not state.is_completed():
            raise SystemExit(f"the pipeline flow ended {state.name}: {state.message}")
        results.append(state.result())
    Path(args.out).write_text(json.dumps({"cold_s": times[0], "warm_s": times[1:], "results": results[-1]}))


def measure_prefect(args, repo: Path, root: Path, stages: list[str], single_item_total: float, log: Path) -> dict:
    home = root / "prefect-home"
    home.mkdir(exist_ok=True)
    out = root / "flow.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--flow-worker", "--repo", str(repo), "--out", str(out),
           "--flows", str(args.flows)]
    run = run_timed(cmd, repo, prefect_env(home, repo), log)
    if run["returncode"] != 0:
        raise SystemExit(f"the flow worker failed; log: {log}\n{log.read_text()[-3000:]}")
    flow = json.loads(out.read_text())
    skipped = all(v == "skipped" for v in flow["results"].values())
    cli = []
    for _ in range(args.flows):  # as a user runs it: new process, new temporary server
        r = run_timed([sys.executable, "-m", "flows.pipeline"], repo, prefect_env(home, repo), log)
        if r["returncode"] != 0:
            raise SystemExit(f"python -m flows.pipeline failed; log: {log}")
        cli.append(r["wall_s"])
    warm = median(flow["warm_s"])
    return {
        "stages": len(stages),
        "all_skipped": skipped,
        "flow_cold_s": flow["cold_s"],
        "flow_warm_s": warm,
        "flow_warm_runs_s": flow["warm_s"],
        "dvc_single_items_total_s": single_item_total,
        "overhead_per_stage_s": (warm - single_item_total) / len(stages),
        "cli_s": median(cli),
        "cli_runs_s": cli,
    }


def report(summary: dict) -> None:
    repro, noop_r, prefect = summary["repro"], summary["noop"], summary["prefect"]
    n = summary["settings"]["repros"]
    print(f"\ndvc repro from scratch (median of {n}): {repro['total_s']:.1f} s "
          f"(target <= {TARGETS['repro_s']} s: {'met' if repro['total_s'] <= TARGETS['repro_s'] else 'NOT met'})")
    print(f"  {'dvc start':<14} {repro['dvc_start_s']:8.1f} s")
    for stage, t in repro["stages_s"].items():
        print(f"  {stage:<14} {t:8.1f} s")
    print(f"no-op dvc repro (median of {len(noop_r['runs_s'])}): {noop_r['dvc_repro_s']:.2f} s "
          f"(target <= {TARGETS['noop_s']} s: {'met' if noop_r['dvc_repro_s'] <= TARGETS['noop_s'] else 'NOT met'})")
    print("no-op dvc repro --single-item per stage: "
          + ", ".join(f"{s} {t:.2f} s" for s, t in noop_r["single_item_s"].items()))
    print(f"Prefect pipeline flow, all {prefect['stages']} stages up to date: first call {prefect['flow_cold_s']:.1f} s "
          f"(starts the temporary server), then {prefect['flow_warm_s']:.1f} s; the same {prefect['stages']} "
          f"`dvc repro --single-item` alone {prefect['dvc_single_items_total_s']:.1f} s")
    print(f"  Prefect overhead per stage: {prefect['overhead_per_stage_s']:.2f} s; `python -m flows.pipeline` "
          f"(new process + temporary server): {prefect['cli_s']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repros", type=int, help="from-scratch repros, each in a fresh copy (default 3; --quick 1)")
    parser.add_argument("--noops", type=int, help="no-op repros (default 5; --quick 2)")
    parser.add_argument("--flows", type=int, help="warm flow runs and CLI runs (default 3; --quick 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params.yaml override")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny params, 1 thread, not saved")
    parser.add_argument("--keep", action="store_true", help="keep the temp copies")
    parser.add_argument("--out", help="results file (default bench/results/pipeline.json)")
    parser.add_argument("--flow-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repo", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repros = args.repros or (1 if args.quick else 3)
    args.noops = args.noops or (2 if args.quick else 5)
    args.flows = args.flows or (1 if args.quick else 3)
    if args.flow_worker:
        flow_worker(args)
        return
    if shutil.which("dvc", path=venv_env()["PATH"]) is None:
        raise SystemExit("dvc not found: run from the project's venv (. .venv/bin/activate)")

    overrides = merge(QUICK, parse_sets(args.set)) if args.quick else parse_sets(args.set)
    info = machine()
    if warning := busy_warning(info):
        print(warning)
    repros, roots = [], []
    for i in range(args.repros):
        root = make_tmp("pipeline")
        roots.append(root)
        repo, params = fresh_copy(root, overrides)
        print(f"repro {i + 1}/{args.repros} in {repo} (log: {root / 'dvc.log'}) ...", flush=True)
        repros.append(timed_repro(repo, root / "dvc.log"))
        print(f"  {repros[-1]['total_s']:.1f} s: " + ", ".join(f"{s} {t:.0f} s" for s, t in repros[-1]["stages_s"].items()),
              flush=True)
        if i < args.repros - 1 and not args.keep:  # the last copy is used for the no-op measurements
            shutil.rmtree(root, ignore_errors=True)
    root, repo, log = roots[-1], roots[-1] / "repo", roots[-1] / "dvc.log"
    stages = list(repros[-1]["stages_s"])

    before = log.stat().st_size
    noop_runs = noop(["dvc", "repro"], repo, args.noops, log)
    with open(log) as fh:
        fh.seek(before)
        if any(RUNNING.match(line) for line in fh):
            raise SystemExit(f"the no-op `dvc repro` ran a stage; log: {log}")
    single = {s: median(noop(["dvc", "repro", "--single-item", s], repo, args.noops, log)) for s in stages}
    prefect = measure_prefect(args, repo, root, stages, sum(single.values()), root / "prefect.log")

    summary = {
        "bench": "pipeline", "command": command_line(), "quick": args.quick, "machine": info,
        "settings": {"repros": args.repros, "noops": args.noops, "flows": args.flows, "overrides": overrides,
                     "threads": params["threads"]},
        "repro": {
            "total_s": median([r["total_s"] for r in repros]),
            "dvc_start_s": median([r["dvc_start_s"] for r in repros]),
            "stages_s": {s: median([r["stages_s"].get(s) for r in repros]) for s in stages},
            "peak_rss_mib_largest_process": median([r["peak_rss_mib_largest_process"] for r in repros]),
            "runs": repros,
        },
        "noop": {"dvc_repro_s": median(noop_runs), "runs_s": noop_runs, "single_item_s": single},
        "prefect": prefect,
        "targets": TARGETS,
    }
    report(summary)
    if args.quick and not args.out:
        print("\n--quick: results not saved (--out FILE to save them)")
    else:
        write_results(results_path("pipeline", args.quick, args.out, root), summary)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
