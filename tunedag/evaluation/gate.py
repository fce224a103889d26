"""The quality gate written by the evaluate stage and respected by serving."""

from __future__ import annotations

import json
from pathlib import Path

from tunedag.core.errors import UserError
from tunedag.core.params import EvalParams

EVAL_METRICS = Path("metrics/eval.json")


def gate_failures(metrics: dict, limits: EvalParams) -> list[str]:
    """Human-readable failures of `metrics` against the eval.* limits (empty: the gate passes)."""
    failures = []
    if metrics["identity_acc"] < limits.min_identity_acc:
        failures.append(f"identity_acc {metrics['identity_acc']:.3f} < eval.min_identity_acc {limits.min_identity_acc}")
    if metrics["leakage"] > limits.max_leakage:
        failures.append(f"leakage {metrics['leakage']:.3f} > eval.max_leakage {limits.max_leakage}")
    if metrics["ppl_drift"] > limits.max_ppl_drift:
        failures.append(f"ppl_drift {metrics['ppl_drift']:.3f} > eval.max_ppl_drift {limits.max_ppl_drift}")
    return failures


def read_gate(path: str | Path = EVAL_METRICS) -> dict | None:
    """The gate section of metrics/eval.json (passed, failures, limits); None if not evaluated yet."""
    path = Path(path)
    return json.loads(path.read_text())["gate"] if path.exists() else None


def gate_verdict(gate: dict) -> str:
    """One line for the end of a run: `GATE PASSED` or `GATE FAILED: <metric> <value> <limit>; ...`."""
    if gate["passed"]:
        return "GATE PASSED"
    return f"GATE FAILED: {'; '.join(gate['failures'])} (see metrics/eval.md)"


def require_gate(path: str | Path = EVAL_METRICS, force: bool = False) -> None:
    """Refuse (UserError) a model whose evaluation failed the gate, unless forced."""
    gate = read_gate(path)
    if gate is None:
        if force:
            return
        raise UserError(f"{path} not found: the model has not been evaluated. Run `dvc repro evaluate`, or force.")
    if not gate["passed"] and not force:
        raise UserError(
            f"the model failed the evaluation gate ({'; '.join(gate['failures'])}, see {path}). Retrain with "
            "other params, relax eval.* in params.yaml, or force serving (serve --force)."
        )
