"""Runs a test file's `*_in_interpreter` tests under Triton's CPU interpreter, in a child pytest,
and code in a child Python where Triton cannot be imported.

Triton decides at the first import of `triton.language` whether its functions are interpreted,
so the interpreter cannot be switched on inside a process that imported Triton already.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Markers of the kernel test files: this process runs under the interpreter (the child pytest),
# Triton is installed, a GPU is present.
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
in_interpreter = pytest.mark.skipif(
    not (INTERPRETER and HAS_TRITON),
    reason="needs triton imported under TRITON_INTERPRET=1: test_interpreter_tests_in_a_subprocess",
)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_interpreter_tests(test_file: str) -> None:
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
        + ["-k", "in_interpreter"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary, summary


def assert_runs_without_triton(code: str) -> None:
    """Run `code` in a child Python in which `import triton` raises ImportError."""
    prelude = "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise
    result = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
