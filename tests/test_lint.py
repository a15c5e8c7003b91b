"""The code base stays clean under the project's ruff configuration (pyproject.toml [tool.ruff])."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_is_clean():
    exe = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    proc = subprocess.run([exe, "check", "--output-format", "concise", "."], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
