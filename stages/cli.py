"""The `tunedag` command: small helpers around the pipeline (`tunedag presets`, `tunedag verify`)."""

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
    verify = commands.add_parser("verify", help="rebuild from scratch and compare with dvc.lock (python -m stages.verify)")
    verify.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "presets":
        list_presets()
    elif args.command == "verify":
        from stages import verify as verify_command

        verify_command.main(args.args)


if __name__ == "__main__":
    main()
