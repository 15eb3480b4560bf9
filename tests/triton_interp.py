"""Running Triton kernel tests under Triton's CPU interpreter without touching the rest of the suite.

``TRITON_INTERPRET=1`` only takes effect if it is set before ``triton`` is first imported, and then holds
for the whole process (a GPU test in the same process would get interpreted kernels). So each interpreter
test module names its tests ``check_*`` (not collected by the normal run) and has one ``test_*`` that runs
the module's checks in a fresh pytest process with the interpreter on (``run_checks``). To run the checks
directly: ``TRITON_INTERPRET=1 pytest tests/test_triton_lora.py -o python_functions='check_*'``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

IN_CHILD = os.environ.get("TRITON_INTERPRET") == "1"


def run_checks(module_file: str, timeout: float = 300) -> None:
    """Run ``module_file``'s ``check_*`` tests under the interpreter in a subprocess; fail with its output."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "pytest", module_file, "-q", "-p", "no:cacheprovider", "-x"]
    cmd += ["-o", "python_functions=check_*", "-o", "addopts="]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(
            f"interpreter checks failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
        )
