"""User-facing errors: one clear paragraph and a non-zero exit, no traceback unless --debug."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable


class UserError(Exception):
    """A problem with the user's input (params, data, model, checkpoint): what, where, and the fix."""


class ParamsError(UserError):
    """A UserError in params.yaml itself (which `dvc exp run -S` may have written)."""


def _stage_name(fn: Callable) -> str:
    """`stages.train.main` -> "train" (under `python -m stages.train` the module is "__main__"; its
    spec keeps the real name)."""
    module = fn.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec else module
    return module.rsplit(".", 1)[-1]


def command_main(name: str) -> Callable[[Callable], Callable]:
    """Decorate a command's main() (`name` prefixes its errors): a UserError prints one paragraph to
    stderr and exits 1. `--debug` on the command line or TUNEDAG_DEBUG=1 re-raises, with traceback."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            debug = "--debug" in sys.argv or os.environ.get("TUNEDAG_DEBUG") == "1"
            if "--debug" in sys.argv:
                sys.argv.remove("--debug")
            try:
                return fn(*args, **kwargs)
            except UserError as err:
                if debug:
                    raise
                print(f"error [{name}]: {err}", file=sys.stderr)
                sys.exit(1)
            except OSError as err:  # disk full, permissions, read-only file system: the user can fix these
                if debug:
                    raise
                where = f"{err.filename}: " if err.filename else ""
                print(f"error [{name}]: {where}{err.strerror or err}. Check free disk space and permissions, "
                      "then rerun (nothing partial was kept).", file=sys.stderr)
                sys.exit(1)
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                sys.exit(130)

        return wrapper

    return decorate


def stage_main(fn: Callable[[], None]) -> Callable[[], None]:
    """command_main for a DVC stage (named after its module): on success it also records
    env/<stage>.json, what produced the outputs."""
    stage = _stage_name(fn)

    @functools.wraps(fn)
    def run_stage() -> None:
        try:
            fn()
        except UserError as err:
            raise type(err)(f"{err} {after_dvc(stage, err)}".rstrip()) from None
        from tunedag.core import (
            environment,  # imports torch: only once the stage has run
        )

        environment.record(stage)

    return command_main(stage)(run_stage)


def after_dvc(stage: str, err: UserError) -> str:
    """What DVC had already changed in the workspace when `stage` failed, and the command that
    undoes it ("" when DVC is not running the stage, or runs it in a temporary copy)."""
    # DVC sets DVC_STAGE for the commands it runs; `dvc exp run --temp`/queued runs work in
    # .dvc/tmp/exps/..., so the user's workspace is untouched there.
    if "DVC_STAGE" not in os.environ or ".dvc" in Path.cwd().parts:
        return ""
    restore = f"dvc checkout {stage}"
    tracked = git_tracked_outputs(stage)
    if isinstance(err, ParamsError):
        return (f"DVC had already removed the outputs of stage '{stage}' (and `dvc exp run -S` writes its values "
                "into params.yaml before it runs anything). Fix params.yaml and rerun, or go back to the committed "
                f"params and the last good outputs: `git checkout {' '.join(['params.yaml', *tracked])} && {restore}`.")
    if tracked:
        restore = f"git checkout {' '.join(tracked)} && {restore}"
    return (f"DVC had already removed the outputs of stage '{stage}'. Fix the above and rerun, or restore the "
            f"last good outputs: `{restore}`.")


def git_tracked_outputs(stage: str) -> list[str]:
    """The stage's `cache: false` outputs in dvc.yaml: DVC removed them too, and git holds them."""
    import yaml

    try:
        spec = yaml.safe_load(Path("dvc.yaml").read_text())["stages"][stage]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return []
    return [path for kind in ("outs", "metrics", "plots") for entry in spec.get(kind) or [] if isinstance(entry, dict)
            for path, options in entry.items() if isinstance(options, dict) and options.get("cache") is False]
