"""Verify the recorded pipeline: rebuild it from scratch and compare every output with dvc.lock.

    tunedag verify                          # every stage but serve_check (see dvc.yaml meta.verify)
    tunedag verify train merge              # these stages and what they depend on
    tunedag verify --json report.json --keep

It copies this project (git's tracked and untracked-but-not-ignored files, plus the data of any
`.dvc` files) into a temporary directory with an empty DVC cache, runs `dvc repro --force
--no-run-cache` there, and compares each output with this project's dvc.lock. The verdict is one of:

- byte-identical: every output hash matches (same machine, params and package versions);
- numerically equivalent: some outputs differ, but every differing tensor, checkpoint value and
  metric is within TOLERANCE and every word and integer (answers, counts, steps) is equal: the same
  model computed in another environment, named from env/<stage>.json (e.g. cpu_capability AVX512 → AVX2);
- different: anything else; it lists the files that differ.

Outputs in a stage's `meta.verify.volatile` (wall-clock numbers) are shown but not compared.
Exit status 0 for the first two verdicts, 1 for "different".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunedag.core.environment import ENV_DIR
from tunedag.core.errors import UserError, command_main
from tunedag.core.io import read_yaml

console = Console(width=None if sys.stdout.isatty() else 160)  # logs and CI: room for the hashes
# "Numerically equivalent": per tensor (and per number in text outputs), max |Δ| <= atol + rtol * max |x|.
# Float kernels differ across CPUs (AVX512 vs AVX2 vs none): a LoRA trained on either lands this close.
TOLERANCE = {"rtol": 1e-3, "atol": 1e-5}


def verify_meta(dvc_yaml: dict, stage: str) -> dict:
    return (dvc_yaml["stages"][stage].get("meta") or {}).get("verify") or {}


def project_files(root: Path) -> list[str]:
    """Git's view of the project (what a commit would hold), plus the data behind `.dvc` files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, capture_output=True, text=True,
    )
    if listed.returncode != 0:
        raise UserError(f"{root} is not a git repository: verify copies the project as git sees it. Run it from "
                        "the project root of a clone (where dvc.yaml is).")
    files = [name for name in listed.stdout.split("\0") if name and (root / name).is_file()]
    for dvc_file in [f for f in files if f.endswith(".dvc")]:
        for out in read_yaml(root / dvc_file).get("outs", []):
            files.append(str(Path(dvc_file).parent / out["path"]))
    return files


def copy_project(root: Path, dest: Path) -> None:
    for name in project_files(root):
        source, target = root / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        elif source.exists():
            shutil.copy2(source, target)
    (dest / "dvc.lock").unlink()  # the rebuild writes its own lock, holding only the stages it ran
    # A git repo with one commit: dvc wants git, and dvclive fails in a repo without commits.
    git = ["git", "-c", "user.name=tunedag verify", "-c", "user.email=verify@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "tunedag verify: project copy"]):
        subprocess.run(git + cmd, cwd=dest, check=True, capture_output=True)


def lock_outputs(lock: dict, stage: str) -> dict[str, str]:
    return {out["path"]: out.get("md5", "") for out in lock["stages"].get(stage, {}).get("outs", [])}


def cache_path(root: Path, md5: str) -> Path:
    return root / ".dvc/cache/files/md5" / md5[:2] / md5[2:]


def dir_manifest(root: Path, md5: str) -> dict[str, str]:
    """A directory output's file list (relpath -> md5) from a DVC cache, if the cache has it."""
    path = cache_path(root, md5)
    if not md5.endswith(".dir") or not path.exists():
        return {}
    return {entry["relpath"]: entry["md5"] for entry in json.loads(path.read_text())}


def manifest_md5(manifest: dict[str, str]) -> str:
    """DVC's hash of a directory: md5 of its file list as DVC writes it into the cache (.dir)."""
    entries = [{"md5": md5, "relpath": rel} for rel, md5 in sorted(manifest.items())]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def output_files(root: Path, output: str, md5: str, workspace: bool) -> dict[str, Path] | None:
    """relpath -> file of one recorded output version ("" for a single file), or None if it is not
    at hand. `workspace`: the files are in root's workspace (the rebuild); else in root's cache,
    or in its workspace for outputs DVC does not cache (git-tracked metrics, env records)."""
    if md5.endswith(".dir"):
        if not workspace and (manifest := dir_manifest(root, md5)):
            return {rel: cache_path(root, file_md5) for rel, file_md5 in manifest.items()}
        folder = root / output  # the rebuild, or an output DVC does not cache (cache: false)
        files = {str(f.relative_to(folder)): f for f in sorted(folder.rglob("*")) if f.is_file()} if folder.is_dir() else {}
        if workspace or manifest_md5({rel: hashlib.md5(f.read_bytes()).hexdigest() for rel, f in files.items()}) == md5:
            return files or None
        return None
    if workspace:
        return {"": root / output} if (root / output).is_file() else None
    if cache_path(root, md5).is_file():
        return {"": cache_path(root, md5)}
    committed = root / output  # not cached: the workspace copy, if it is still the recorded one
    if committed.is_file() and hashlib.md5(committed.read_bytes()).hexdigest() == md5:
        return {"": committed}
    return None


def _within(delta: float, scale: float) -> bool:
    return delta <= TOLERANCE["atol"] + TOLERANCE["rtol"] * scale


def _close(a: float, b: float) -> bool:
    return _within(abs(a - b), abs(a))


def _tensor_delta(a, b) -> float | None:
    """max |a - b| of two tensors, or None if they cannot be compared (shape, dtype, out of tolerance)."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return None
    if not (a.is_floating_point() or a.is_complex()):
        return 0.0 if torch.equal(a, b) else None
    a, b = a.double(), b.double()
    delta = float((a - b).abs().max()) if a.numel() else 0.0
    scale = float(a.abs().max()) if a.numel() else 0.0
    return delta if _within(delta, scale) else None


def _structure_delta(a, b) -> float | None:
    """Like _tensor_delta over nested checkpoint contents (dicts, lists, tensors, numbers)."""
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return _tensor_delta(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return None
        parts = [_structure_delta(a[k], b[k]) for k in a]
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return None
        parts = [_structure_delta(x, y) for x, y in zip(a, b)]
    elif isinstance(a, float) and isinstance(b, float):
        return abs(a - b) if _close(a, b) else None
    else:
        return 0.0 if a == b else None
    return None if None in parts else max(parts, default=0.0)


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _text_delta(a: str, b: str) -> float | None:
    """Texts equal but for floating-point numbers within tolerance (metrics, loss curves, eval
    tables); words and integers (steps, counts, generated answers) must be equal."""
    numbers_a, numbers_b = NUMBER.findall(a), NUMBER.findall(b)
    if NUMBER.split(a) != NUMBER.split(b) or len(numbers_a) != len(numbers_b):
        return None
    worst = 0.0
    for x, y in zip(numbers_a, numbers_b):
        if x == y:
            continue
        if not any(c in x + y for c in ".eE") or not _close(float(x), float(y)):
            return None
        worst = max(worst, abs(float(x) - float(y)))
    return worst


def file_delta(name: str, a: Path, b: Path) -> float | None:
    """How far two versions of the file `name` are apart (a DVC cache file has no name of its own):
    0.0 if equal, max |Δ| if numerically equivalent (tensors, checkpoints, text with numbers),
    None if different."""
    if a.read_bytes() == b.read_bytes():
        return 0.0
    suffix = Path(name).suffix
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return _structure_delta(load_file(a), load_file(b))
    if suffix in (".pth", ".pt", ".bin"):
        import torch

        return _structure_delta(torch.load(a, map_location="cpu", weights_only=True),
                                torch.load(b, map_location="cpu", weights_only=True))
    try:
        return _text_delta(a.read_text(encoding="utf-8"), b.read_text(encoding="utf-8"))
    except UnicodeDecodeError:  # other binary files (arrow tables, tokenizer models) must be equal
        return None


def classify(root: Path, rebuilt: Path, row: dict) -> None:
    """Set row["result"] for an output whose hash differs: "equivalent" (every differing file within
    tolerance) or "DIFFERENT", with the files and max |Δ| that decided it."""
    recorded = output_files(root, row["output"], row["expected"] or "", workspace=False)
    fresh = output_files(rebuilt, row["output"], row["got"] or "", workspace=True)
    if recorded is None or fresh is None:
        row["result"], row["detail"] = "DIFFERENT", "the recorded version is not in the DVC cache (dvc pull it to compare)"
        return
    deltas = {rel: file_delta(rel or row["output"], recorded[rel], fresh[rel]) if rel in recorded and rel in fresh else None
              for rel in sorted(recorded.keys() | fresh.keys())}
    row["differing_files"] = [rel for rel, delta in deltas.items() if delta != 0.0]
    different = [rel or row["output"] for rel, delta in deltas.items() if delta is None]
    if different:
        row["result"], row["detail"] = "DIFFERENT", f"not within tolerance: {', '.join(different[:5])}"
    else:
        row["result"], row["max_abs_diff"] = "equivalent", max(deltas.values())
        row["detail"] = f"max |Δ| {row['max_abs_diff']:.3g}"


def env_diff(old: Path, new: Path) -> list[str]:
    if not old.exists():
        return [f"{old} is missing: the lock was written without an environment record"]

    def flat(obj, prefix=""):
        if isinstance(obj, dict):
            return {k: v for key, value in obj.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): obj}

    a, b = flat(json.loads(old.read_text())), flat(json.loads(new.read_text()))
    return [f"{key}: {a.get(key)} → {b.get(key)}" for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)]


def compare(root: Path, rebuilt: Path, stages: list[str], dvc_yaml: dict) -> list[dict]:
    recorded, fresh = read_yaml(root / "dvc.lock"), read_yaml(rebuilt / "dvc.lock")
    rows = []
    for stage in stages:
        volatile = set(verify_meta(dvc_yaml, stage).get("volatile", []))
        expected, got = lock_outputs(recorded, stage), lock_outputs(fresh, stage)
        for path in sorted(expected.keys() | got.keys()):
            row = {"stage": stage, "output": path, "expected": expected.get(path), "got": got.get(path)}
            if path in volatile:
                row["result"] = "volatile"
            elif row["expected"] == row["got"]:
                row["result"] = "match"
            elif path.startswith(f"{ENV_DIR}/"):  # the environment record: how the runs differ, not a result
                row["result"] = "environment"
            else:
                classify(root, rebuilt, row)
            rows.append(row)
    return rows


def verdict(rows: list[dict]) -> str:
    results = {row["result"] for row in rows}
    if "DIFFERENT" in results:
        return "different"
    return "numerically equivalent" if "equivalent" in results else "byte-identical"


STYLE = {"match": "green", "volatile": "dim", "environment": "dim", "equivalent": "yellow", "DIFFERENT": "bold red"}


def print_report(rows: list[dict], root: Path, rebuilt: Path) -> None:
    table = Table(title="tunedag verify: rebuilt from scratch vs dvc.lock")
    for column in ("stage", "output", "dvc.lock", "rebuilt", "result", "detail"):
        table.add_column(column)
    for row in rows:
        short = lambda md5: (md5 or "-")[:12]
        table.add_row(row["stage"], row["output"], short(row["expected"]), short(row["got"]),
                      f"[{STYLE[row['result']]}]{row['result']}[/]", row.get("detail", ""))
    console.print(table)
    for stage in sorted({r["stage"] for r in rows if r["result"] in ("equivalent", "DIFFERENT")}):
        for row in [r for r in rows if r["stage"] == stage and r.get("differing_files")]:
            console.print(f"{row['output']}: differing files: {', '.join(row['differing_files'][:10])}")
        diff = env_diff(root / ENV_DIR / f"{stage}.json", rebuilt / ENV_DIR / f"{stage}.json")
        console.print(f"{stage}: environment " + ("differs: " + "; ".join(diff) if diff else
                      "is identical, so this is nondeterminism in tunedag: please report it with the files above"))


@command_main("verify")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tunedag verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="*", help="stages to rebuild (with their upstream); default: all but meta.verify.skip")
    parser.add_argument("--json", type=Path, help="also write the comparison as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the rebuilt workspace and print its path")
    args = parser.parse_args(argv)

    root = Path.cwd()
    if not (root / "dvc.lock").exists():
        raise UserError("dvc.lock not found: there is nothing recorded to verify. Run it from the project root "
                        "after `dvc repro` (or `dvc pull`).")
    dvc_yaml, lock = read_yaml(root / "dvc.yaml"), read_yaml(root / "dvc.lock")
    targets = args.stages or [s for s in dvc_yaml["stages"] if not verify_meta(dvc_yaml, s).get("skip")]
    for stage in targets:
        if stage not in dvc_yaml["stages"]:
            raise UserError(f"unknown stage {stage!r}; dvc.yaml has: {', '.join(dvc_yaml['stages'])}.")
        if stage not in lock["stages"]:
            raise UserError(f"dvc.lock has no record of stage {stage!r}: run `dvc repro {stage}` first, then verify.")

    rebuilt = Path(tempfile.mkdtemp(prefix="tunedag-verify-"))
    try:
        copy_project(root, rebuilt)
        console.print(f"verify: rebuilding {', '.join(targets)} from scratch in {rebuilt}")
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        repro = subprocess.run(["dvc", "repro", "--force", "--no-run-cache", *targets], cwd=rebuilt, env=env)
        if repro.returncode != 0:
            raise UserError(f"`dvc repro` failed in the rebuilt workspace {rebuilt} (exit {repro.returncode}; its "
                            "output is above). Fix that first: the recorded pipeline does not rebuild here.")
        ran = [s for s in read_yaml(rebuilt / "dvc.lock")["stages"] if s in dvc_yaml["stages"]]
        rows = compare(root, rebuilt, ran, dvc_yaml)
        print_report(rows, root, rebuilt)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    finally:
        if args.keep:
            console.print(f"verify: kept {rebuilt}")
        else:
            shutil.rmtree(rebuilt, ignore_errors=True)
    counts = {result: sum(r["result"] == result for r in rows) for result in STYLE}
    found = verdict(rows)
    console.print(f"verify: {found.upper()}: " + ", ".join(f"{n} {result.lower()}" for result, n in counts.items() if n))
    if found == "numerically equivalent":
        console.print(f"verify: every differing output is within rtol {TOLERANCE['rtol']} / atol {TOLERANCE['atol']} "
                      "of the recorded one: the same model, computed in another environment (see above).")
    if found == "different":
        sys.exit(1)

if __name__ == "__main__":
    main()
