"""The model registry, in DVC's own terms: `artifacts:` in dvc.yaml, versions and stages as GTO git
tags (`model@v0.0.3`, `model#prod#2`), files in the DVC remote.

`tunedag publish` registers the committed run's artifacts and assigns them to a stage (params
publish.*), only when its evaluation passed the gate. Anyone with the repo then gets a version with
`dvc artifacts get REPO model --stage prod`; `fetch_release` does the same for deployment, so a
server runs what was published, not whatever is in the workspace.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from tunedag.core.errors import UserError, command_main
from tunedag.core.io import read_yaml, write_json
from tunedag.core.params import Params, load_params
from tunedag.evaluation.gate import EVAL_METRICS, read_gate
from tunedag.release.card import base_model_id, card_license

DVC_YAML = Path("dvc.yaml")
ARTIFACTS = ("model", "adapter", "gguf")  # the names in dvc.yaml's artifacts:
DEPLOY_DIR = Path(".cache/deploy")  # fetched releases, and SERVING: what a server now runs
SERVING = DEPLOY_DIR / "serving.json"
HUB_TOKEN_ENV = "HF_TOKEN"


@dataclass(frozen=True)
class Release:
    name: str
    version: str
    stage: str
    commit: str
    path: str


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"`git {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout.strip()


def artifact_meta(params: Params, eval_metrics: dict, trained: dict) -> dict:
    """What a registry reader needs to choose a version: base model, identity, gate numbers, recipe."""
    return {
        "base_model": base_model_id(params) or params.model.source,
        "license": card_license(params),
        "identity": {"name": params.data.name, "owner": params.data.owner},
        "eval": {key: eval_metrics[key] for key in ("identity_acc", "leakage", "ppl_drift")} | {"gate_passed": True},
        "params": {"model.preset": params.model.preset, "chat.system_prompt": params.chat.system_prompt,
                   **{key: value for key, value in trained.items() if "." in key}},
        "gguf.outtype": params.gguf.outtype,
    }


def _write_meta(meta: dict) -> bool:
    """Put `meta` into each artifact of dvc.yaml (comments kept); True if dvc.yaml changed."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.width = 4096
    doc = yaml.load(DVC_YAML)
    missing = [name for name in ARTIFACTS if name not in (doc.get("artifacts") or {})]
    if missing:
        raise UserError(f"{DVC_YAML} has no artifacts {missing}: `tunedag publish` registers {list(ARTIFACTS)}. "
                        "Restore the artifacts: section from the project's dvc.yaml.")
    if all(dict(doc["artifacts"][name].get("meta") or {}) == json.loads(json.dumps(meta)) for name in ARTIFACTS):
        return False
    for name in ARTIFACTS:
        doc["artifacts"][name]["meta"] = meta
    with open(DVC_YAML, "w", encoding="utf-8") as fh:
        yaml.dump(doc, fh)
    return True


def _require_committed_run() -> None:
    """The registered commit must hold the run: its outputs match dvc.lock, and both are committed."""
    from dvc.repo import Repo

    dirty = _git("diff", "--name-only", "HEAD").splitlines()
    if dirty:
        raise UserError(
            f"uncommitted changes ({', '.join(dirty[:5])}): a version is a commit, "
            "so commit the run first (`git add -A && git commit`), then publish."
        )
    with Repo() as repo:  # the artifacts' stages and everything upstream (serve_check need not have run)
        changed = repo.status(targets=[repo.artifacts.get_path(name) for name in ARTIFACTS], with_deps=True)
    if changed:
        raise UserError(
            f"the workspace does not match dvc.lock (changed: {', '.join(list(changed)[:5])}): run `dvc repro`, "
            "commit dvc.lock, then publish."
        )


def publish(params: Params, stage: str, push: bool = True) -> list[str]:
    """Register the committed run's artifacts and assign them to `stage`. Returns the new tags."""
    import gto.api

    gate = read_gate()
    if gate is None:
        raise UserError(f"{EVAL_METRICS} not found: nothing evaluated to publish. Run `dvc repro` first.")
    if not gate["passed"]:
        raise UserError(
            f"not published: the model failed the evaluation gate ({'; '.join(gate['failures'])}; see "
            "metrics/eval.md). Retrain until `tunedag gate` passes; the gate is not bypassed for publishing."
        )
    _require_committed_run()
    meta = artifact_meta(params, json.loads(Path(EVAL_METRICS).read_text()), read_yaml("metrics/train/params.yaml"))
    if _write_meta(meta):
        _git("commit", "-q", "-m", f"publish: artifact meta (identity_acc {meta['eval']['identity_acc']}, "
                                   f"leakage {meta['eval']['leakage']})", "--", str(DVC_YAML))
    if push:
        from dvc.exceptions import DvcException
        from dvc.repo import Repo

        with Repo() as repo:
            paths = [repo.artifacts.get_path(name) for name in ARTIFACTS]
            try:
                repo.push(targets=paths)
            except DvcException as err:
                raise UserError(f"`dvc push` of {', '.join(paths)} failed ({err}): consumers could not download "
                                "this version. Check the default remote (`dvc remote list`), or publish with "
                                "--no-push.") from None
    tags = []
    for name in ARTIFACTS:
        # Registers the next version at HEAD, or reuses the one already there (a second stage).
        assignment = gto.api.assign(".", name, stage, ref="HEAD", message=f"{name} to {stage}: {json.dumps(meta['eval'])}")
        tags += [f"{name}@{assignment.version}", f"{name}#{stage}"]
    return tags


def upload_to_hub(repo_id: str, private: bool, folder: str = "models/export") -> str:
    """Upload the export with huggingface_hub (token from HF_TOKEN); one clear error offline."""
    from huggingface_hub import HfApi

    token = os.environ.get(HUB_TOKEN_ENV)
    if not token:
        raise UserError(f"publish.hub_repo is {repo_id!r} but {HUB_TOKEN_ENV} is not set: export a write token "
                        f"({HUB_TOKEN_ENV}=hf_...), or set publish.hub_repo: null. {folder} is in place.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="tunedag publish")
    except Exception as err:  # network, auth, hub errors: one message, the export stays
        raise UserError(
            f"uploading {folder} to the hub as {repo_id} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            f"The export is in place and the registry tags are made: retry when online with "
            f"`hf upload {repo_id} {folder}`, or set publish.hub_repo: null."
        ) from None
    return str(info)


def fetch_release(name: str, stage: str, repo: str = ".") -> Release:
    """Download the version of artifact `name` assigned to `stage` (as `dvc artifacts get` does)
    into .cache/deploy/NAME@VERSION; reused when already there."""
    import gto.api
    from dvc.repo import Repo

    found = gto.api.find_versions_in_stage(repo, name, stage)
    if not found:
        raise UserError(f"no version of artifact {name!r} is assigned to stage {stage!r}: publish one "
                        f"(`tunedag publish` when the gate passed), or serve the workspace (no --stage).")
    vstage = found[0] if isinstance(found, list) else found
    out = DEPLOY_DIR / f"{name}@{vstage.version}"
    if not out.exists():
        with Repo(repo) as dvc_repo:
            tmp = out.with_name(out.name + ".tmp")
            dvc_repo.artifacts.download(name, stage=stage, out=str(tmp), force=True)
            os.replace(tmp, out)
    return Release(name=name, version=vstage.version, stage=stage, commit=vstage.commit_hexsha, path=str(out))


def record_serving(release: Release | None, url: str) -> None:
    """What the server at `url` runs, for the web chat; None: the server has stopped."""
    if release is None:
        SERVING.unlink(missing_ok=True)
    else:
        write_json(SERVING, {**asdict(release), "url": url})


def serving_release(url: str) -> dict | None:
    """The release the server at `url` runs (None: the workspace model, or unknown)."""
    if not SERVING.exists():
        return None
    record = json.loads(SERVING.read_text())
    return record if record.get("url") == url else None


@command_main("publish")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tunedag publish", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", help="default: publish.stage")
    parser.add_argument("--no-push", action="store_true", help="do not `dvc push` the artifacts' files")
    args = parser.parse_args(argv)
    params = load_params()
    stage = args.stage or params.publish.stage
    tags = publish(params, stage, push=not args.no_push)
    print(f"registered and assigned to {stage}: {', '.join(tags)}")
    print("share it: git push && git push --tags; get it: dvc artifacts get REPO model --stage " + stage)
    if params.publish.hub_repo:
        print(f"uploaded: {upload_to_hub(params.publish.hub_repo, params.publish.hub_private)}")
