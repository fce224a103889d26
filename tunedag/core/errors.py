"""User-facing errors: one clear paragraph and a non-zero exit, no traceback unless --debug."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input (params, data, model, checkpoint): what, where, and the fix."""


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
        fn()
        from tunedag.core import (
            environment,  # imports torch: only once the stage has run
        )

        environment.record(stage)

    return command_main(stage)(run_stage)
