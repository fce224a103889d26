"""The `tunedag` command: everything that is not a pipeline stage.

Stages run through DVC (`dvc repro`, their `cmd` is `python -m stages.<name>`); this command fronts
serving, chatting, the web page, the gate's verdict, a short view of experiments, verifying a lock,
listing presets and publishing a model.
"""

from __future__ import annotations

import argparse
import importlib

# command -> ("module:function" taking argv, help). Imported only when run: `tunedag presets` stays fast.
COMMANDS = {
    "serve": ("tunedag.serving.server:main", "serve the model over an OpenAI-compatible API (vLLM, or the fallback)"),
    "chat": ("tunedag.serving.chat:main", "chat in the terminal with a running server or a model folder"),
    "web": ("tunedag.serving.web:main", "a web chat page over the running server"),
    "gate": ("tunedag.evaluation.summary:gate_main", "print the evaluation gate's verdict; exit 1 if it failed"),
    "experiments": ("tunedag.evaluation.summary:experiments_main", "dvc exp show, cut to the gate and key params"),
    "verify": ("tunedag.verify:main", "rebuild the pipeline from scratch and compare it with dvc.lock"),
    "presets": ("tunedag.cli:list_presets", "list model presets (params.yaml: model.preset) and their recipes"),
    "plan": ("tunedag.model.plan:main", "estimate training's peak GPU memory and whether it fits a GPU"),
    "publish": ("tunedag.release.registry:main", "register the committed run's model with GTO and assign a stage (gated)"),
}


def list_presets(argv: list[str]) -> None:
    from tunedag.core.errors import command_main

    command_main("presets")(_presets)(argv)


def _presets(argv: list[str]) -> None:
    from tunedag.model.presets import PRESETS, get_preset

    parser = argparse.ArgumentParser(prog="tunedag presets", description="List model presets (params.yaml: model.preset).")
    parser.add_argument("--recipe", metavar="NAME", help="print this preset's recipe: the values params.yaml's null keys take")
    args = parser.parse_args(argv)
    if args.recipe:
        recipe = get_preset(args.recipe).recipe
        for section, values in recipe.params().items():
            for key, value in values.items():
                print(f"{section}.{key}: {value}")
        print(f"why: {recipe.why}")
        return
    width = max(map(len, PRESETS))
    for name, preset in PRESETS.items():
        print(f"{name:<{width}}  {preset.source:<34} {preset.notes}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tunedag", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        # Each command parses its own options: `tunedag serve --help` shows them.
        commands.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    module, function = COMMANDS[args.command][0].split(":")
    getattr(importlib.import_module(module), function)(rest)


if __name__ == "__main__":
    main()
