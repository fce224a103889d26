"""Verify the recorded pipeline: rebuild it from scratch and compare every output with dvc.lock.

    python -m stages.verify                 # every stage but serve_check (see dvc.yaml meta.verify)
    python -m stages.verify train merge     # these stages and what they depend on
    python -m stages.verify --json report.json --keep

It copies this project (git's tracked and untracked-but-not-ignored files, plus the data of any
`.dvc` files) into a temporary directory with an empty DVC cache, runs `dvc repro --force
--no-run-cache` there, and compares each output's content hash with this project's dvc.lock. On the
same machine, params and package versions everything must match byte for byte; outputs listed in a
stage's `meta.verify.volatile` (wall-clock numbers) are shown but not compared. For a mismatch it
prints which files of the output differ and how env/<stage>.json (versions, CPU, GPU) differs from
the run that wrote the lock. Exit status 1 if anything does not match.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from stages.common.errors import UserError, command_main
from stages.common.io import read_yaml

console = Console(width=None if sys.stdout.isatty() else 140)  # logs and CI: room for the hashes


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


def dir_manifest(root: Path, md5: str) -> dict[str, str]:
    """A directory output's file list (relpath -> md5) from a DVC cache, if the cache has it."""
    path = root / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    if not md5.endswith(".dir") or not path.exists():
        return {}
    return {entry["relpath"]: entry["md5"] for entry in json.loads(path.read_text())}


def env_diff(old: Path, new: Path) -> list[str]:
    if not old.exists():
        return [f"{old} is missing: the lock was written without an environment record"]

    def flat(obj, prefix=""):
        if isinstance(obj, dict):
            return {k: v for key, value in obj.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): obj}

    a, b = flat(json.loads(old.read_text())), flat(json.loads(new.read_text()))
    return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)]


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
            else:
                row["result"] = "MISMATCH"
                old, new = dir_manifest(root, row["expected"] or ""), dir_manifest(rebuilt, row["got"] or "")
                row["differing_files"] = sorted(f for f in old.keys() | new.keys() if old.get(f) != new.get(f))
            rows.append(row)
    return rows


def print_report(rows: list[dict], root: Path, rebuilt: Path) -> None:
    table = Table(title="stages.verify: rebuilt from scratch vs dvc.lock")
    for column in ("stage", "output", "dvc.lock", "rebuilt", "result"):
        table.add_column(column)
    style = {"match": "green", "volatile": "dim", "MISMATCH": "bold red"}
    for row in rows:
        short = lambda md5: (md5 or "-")[:12]
        table.add_row(row["stage"], row["output"], short(row["expected"]), short(row["got"]),
                      f"[{style[row['result']]}]{row['result']}[/]")
    console.print(table)
    for stage in sorted({r["stage"] for r in rows if r["result"] == "MISMATCH"}):
        for row in [r for r in rows if r["stage"] == stage and r.get("differing_files")]:
            console.print(f"{row['output']}: differing files: {', '.join(row['differing_files'][:10])}")
        diff = env_diff(root / "env" / f"{stage}.json", rebuilt / "env" / f"{stage}.json")
        console.print(f"{stage}: environment " + ("differs: " + "; ".join(diff) if diff else
                      "is identical, so this is nondeterminism in tunedag: please report it with the files above"))


@command_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="*", help="stages to rebuild (with their upstream); default: all but meta.verify.skip")
    parser.add_argument("--json", type=Path, help="also write the comparison as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the rebuilt workspace and print its path")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

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
    mismatches = sum(r["result"] == "MISMATCH" for r in rows)
    console.print(f"verify: {sum(r['result'] == 'match' for r in rows)} outputs match, {mismatches} mismatch, "
                  f"{sum(r['result'] == 'volatile' for r in rows)} volatile (not compared)")
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
