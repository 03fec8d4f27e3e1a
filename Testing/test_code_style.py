"""The code style every change keeps: ruff's pycodestyle and pyflakes rules, as configured in pyproject.toml."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKED = ["FCMSegmentation", "Testing", "scripts"]


def test_the_code_passes_ruff():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise"] + CHECKED,
                         cwd=REPO, capture_output=True, text=True)
    assert "No module named ruff" not in run.stderr, "ruff is a test dependency: pip install -e '.[test]'"
    assert run.returncode == 0, f"ruff found style problems (fix them, or run `ruff check --fix`):\n{run.stdout}"
