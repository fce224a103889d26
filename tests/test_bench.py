"""bench/report.py: the benchmark pages are rendered from bench/results/*.json, never typed."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench/report.py"), *args], capture_output=True, text=True, cwd=REPO)


def test_committed_pages_match_the_committed_results():
    result = report("--check")
    assert result.returncode == 0, result.stderr


def test_pages_follow_the_results_files(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(REPO / "bench/results", results)
    readme, doc = tmp_path / "README.md", tmp_path / "benchmarks.md"
    shutil.copy(REPO / "README.md", readme)
    shutil.copy(REPO / "docs/benchmarks.md", doc)
    pages = ["--results-dir", str(results), "--doc", str(doc), str(readme)]

    train = json.loads((results / "train.json").read_text())
    train["recipes"]["ours"]["label_tok_s"] = 12345.6
    train["speedup"]["target_met"] = not train["speedup"]["target_met"]
    (results / "train.json").write_text(json.dumps(train))
    (results / "tokenize.json").unlink()

    assert report("--check", *pages).returncode == 1  # the pages no longer say what the results say
    assert report(*pages).returncode == 0
    assert report("--check", *pages).returncode == 0
    summary = readme.read_text().split("<!-- bench:summary -->")[1].split("<!-- /bench:summary -->")[0]
    assert "12,346" in summary
    assert ("**not met**" in summary) != train["speedup"]["target_met"]
    assert "tokenization" not in summary
    assert "_Not measured yet: run `python bench/tokenization.py`" in doc.read_text()
