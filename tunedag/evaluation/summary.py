"""Where users look after a run: `tunedag gate` (the verdict, as an exit status) and
`tunedag experiments` (`dvc exp show` cut down to the gate's metrics and the params people change)."""

from __future__ import annotations

import argparse
import subprocess
import sys

from tunedag.core.errors import UserError, command_main
from tunedag.evaluation.gate import EVAL_METRICS, gate_verdict, read_gate

# Columns of the short view: dvc exp show's names (metrics by key, params by dotted path). The
# training values are the ones train ran with (metrics/train/params.yaml): params.yaml leaves recipe
# keys null.
TRAINED_WITH = "metrics/train/params.yaml:"
EXPERIMENT_COLUMNS = [
    "Experiment", "Created", "identity_acc", "leakage", "ppl_drift", "gate.passed", "served", "model.preset",
    "data.name", "data.owner", "data.identity_samples", "data.replay_ratio", "data.user_files",
    *(TRAINED_WITH + key for key in ("lora.r", "lora.alpha", "lora.quant", "train.lr", "train.max_steps")), "seed",
]


@command_main("gate")
def gate_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="tunedag gate",
        description=f"Print the evaluation gate's verdict from {EVAL_METRICS}; exit 1 if the model failed it "
                    "(for scripts: `dvc repro && tunedag gate`).",
    )
    parser.parse_args(argv)
    gate = read_gate()
    if gate is None:
        raise UserError(f"{EVAL_METRICS} not found: the model has not been evaluated. Run `dvc repro evaluate`.")
    print(gate_verdict(gate))
    if not gate["passed"]:
        sys.exit(1)


def experiments_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="tunedag experiments",
        description="`dvc exp show` with only the gate's metrics and the params people change. Any other "
                    "arguments go to `dvc exp show` (e.g. --csv, --md, -A).",
    )
    _, rest = parser.parse_known_args(argv)
    keep = "^(" + "|".join(column.replace(".", r"\.") for column in EXPERIMENT_COLUMNS) + ")$"
    sys.exit(subprocess.call(["dvc", "exp", "show", "--no-pager", "--drop", ".*", "--keep", keep, *rest]))
