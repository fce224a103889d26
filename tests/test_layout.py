"""The code layout that keeps DVC's promise "a change reruns exactly what depends on it":
each stage's `deps:` in dvc.yaml list exactly the project modules the stage runs (its module and
the library modules it imports, transitively), an edit makes exactly those stages stale in a fresh
clone, and nothing in stages/ or flows/ gets installed."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PROJECT_PACKAGES = ("tunedag", "stages", "flows")


def module_file(name: str) -> Path | None:
    """The file of project module `name` ("tunedag.core.io" -> tunedag/core/io.py), if it is one."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = REPO / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """Project modules that `path` imports anywhere (also inside functions), plus module names it
    passes as strings (`python -m tunedag.serving.hf_server` runs that module's code too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("tunedag."):
            names.add(node.value)
    return {name for name in names if module_file(name)}


def code_deps(stage_module: str) -> set[str]:
    """Every project file the stage's module runs, transitively; package __init__ files are left
    out (they hold only a docstring, which test_package_inits_hold_no_code checks)."""
    seen: set[Path] = set()
    todo = [module_file(stage_module)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [module_file(name) for name in imported_modules(path)]
    return {str(p.relative_to(REPO)) for p in seen if p.name != "__init__.py"}


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(dvc_stages()))
def test_stage_deps_list_exactly_the_code_it_runs(stage):
    spec = dvc_stages()[stage]
    module = spec["cmd"].removeprefix("python -m ")
    declared = {d for d in spec["deps"] if d.endswith(".py")}
    expected = code_deps(module)
    missing, extra = sorted(expected - declared), sorted(declared - expected)
    assert not missing and not extra, (
        f"dvc.yaml stage {stage!r}: add {missing} / remove {extra}. Its code deps are:\n"
        + "\n".join(f"      - {d}" for d in sorted(expected, key=lambda d: (not d.startswith("stages/"), d))))


def test_every_code_dep_is_a_python_file():
    """A folder or a missing file as a code dep would bring back whole-folder hashing."""
    for name, spec in dvc_stages().items():
        for dep in spec["deps"]:
            if dep.startswith(("stages", "tunedag")) and not dep.startswith("tunedag/data/assets"):
                assert dep.endswith(".py") and (REPO / dep).is_file(), f"{name}: {dep}"


def test_package_inits_hold_no_code():
    """Stages' deps leave out __init__.py files, which is right only while they do nothing."""
    for init in REPO.glob("tunedag/**/__init__.py"):
        body = ast.parse(init.read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), init


def test_only_the_library_is_installed():
    """`pip install .` must not put the generic names `stages` or `flows` into site-packages."""
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["tunedag*"]
    assert pyproject["project"]["scripts"]["tunedag"] == "tunedag.cli:main"


# ---------------------------------------------------------------------------------------------
# The committed lock and what an edit reruns, checked on a fresh clone (as a teammate gets it)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """`git clone` of the committed state: no outputs, no DVC cache, only what git tracks."""
    from tests.conftest import run_cmd

    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    root = tmp_path_factory.mktemp("clone") / "project"
    result = run_cmd(["git", "clone", "-q", str(REPO), str(root)], REPO)
    assert result.returncode == 0, result.stderr
    return root


def stale_stages(root: Path) -> dict[str, list[str]]:
    """Stages whose recorded code/data deps, params or command differ from `root`'s files (missing
    outputs and deps that are other stages' missing outputs are expected in a fresh clone)."""
    from tests.conftest import run_cmd

    status = run_cmd(["dvc", "status", "--json"], root)
    assert status.returncode == 0, status.stderr
    stale: dict[str, list[str]] = {}
    for stage, entries in json.loads(status.stdout or "{}").items():
        for entry in entries:
            if isinstance(entry, dict):
                why = [f"{dep} {how}" for dep, how in entry.get("changed deps", {}).items() if how != "deleted"]
                why += ["params"] * bool(entry.get("changed params")) + ["command"] * bool(entry.get("changed command"))
                if why:
                    stale.setdefault(stage, []).extend(why)
    return stale


def test_a_fresh_clone_is_what_dvc_lock_records(clone):
    stale = stale_stages(clone)
    assert not stale, (f"the committed dvc.lock does not match the committed tree; a teammate's clone would rerun "
                       f"{stale}. Commit the code, run `dvc repro`, commit dvc.lock.")


@pytest.mark.parametrize("edited, reruns", [
    ("tunedag/serving/server.py", {"serve_check"}),
    ("tunedag/serving/web.py", set()),
    ("tunedag/serving/static/index.html", set()),
    ("tunedag/serving/chat.py", set()),
    ("tunedag/evaluation/scoring.py", {"evaluate", "gguf", "serve_check"}),
    ("stages/train.py", {"train"}),
    ("tunedag/core/io.py", set(dvc_stages())),
])
def test_an_edit_reruns_exactly_the_stages_that_run_it(clone, edited, reruns):
    path = clone / edited
    original = path.read_bytes()
    path.write_bytes(original + (b"\n<!-- edited -->\n" if edited.endswith(".html") else b"\n# edited\n"))
    try:
        assert set(stale_stages(clone)) == reruns
    finally:
        path.write_bytes(original)
