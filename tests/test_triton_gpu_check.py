"""``benchmarks/gpu_check.py --smoke`` runs end to end on CPU (Triton interpreter, tiny model), so the GPU
check cannot rot between GPU runs: every stage completes and writes its tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    stages = results["stages"]
    assert results["mode"] == "smoke" and set(stages) == {"env", "kernels", "engine"}
    assert not [name for name, s in stages.items() if "error" in s]
    impls = {(r["layer"], r["adapters"], r["phase"], r["impl"]) for r in stages["kernels"]["lora"]}
    assert ("qkv", 4, "decode", "triton_bgmv") in impls and ("down", 1, "prefill", "torch_ops") in impls
    assert {r["impl"] for r in stages["kernels"]["attention"]} == {"triton", "torch_gather_bmm"}
    runs = stages["engine"]["runs"]
    assert stages["engine"]["backend"] == "triton"
    assert set(runs) == {"transformers_generate_base", "peft_mixed_2", "blora_base", "blora_3_adapters"}
    assert runs["blora_3_adapters"]["distinct_adapters"] == 3 and runs["blora_3_adapters"]["tok_s"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "| blora_3_adapters |" in md and "Paged decode attention" in md
