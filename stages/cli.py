"""The `tunedag` command: small helpers around the pipeline (`tunedag presets`)."""

from __future__ import annotations

import argparse

from stages.common.presets import PRESETS


def list_presets() -> None:
    width = max(map(len, PRESETS))
    for name, preset in PRESETS.items():
        trust = " [trust_remote_code]" if preset.needs_trust_remote_code else ""
        print(f"{name:<{width}}  {preset.source:<34} {preset.notes}{trust}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tunedag", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("presets", help="list model presets (params.yaml: model.preset)")
    args = parser.parse_args(argv)
    if args.command == "presets":
        list_presets()


if __name__ == "__main__":
    main()
