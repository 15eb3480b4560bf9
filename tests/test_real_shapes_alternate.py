"""``benchmarks/real_shapes.py --alternate``: one engine, base-only and the adapters alternated (here on the
tiny model with two PEFT adapters named as the benchmark names its own)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from benchmarks import real_shapes as rs
from tests.helpers import make_adapter, save_tiny_model, targets, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_alternate_times_both_runs_every_round(tmp_path, capsys, caching):
    model = save_tiny_model("llama", tmp_path / "model")
    base = tiny_model("llama")
    for i in range(2):
        make_adapter(
            base,
            tmp_path / "adapters" / f"bench-{i:03d}",
            seed=i + 1,
            r=4,
            target_modules=targets("llama", "attn"),
        )
    args = SimpleNamespace(
        threads=1, dtype="float32", adapters=2, requests=4, new_tokens=3, no_prefix_caching=not caching,
        alternate=3,
    )  # fmt: skip
    rs.alternate(args, model, tmp_path / "adapters")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    times = re.findall(r"\[([^\]]*)\] s", line)
    assert line.startswith("model: base-only") and len(times) == 2
    assert all(len(t.split(",")) == 3 for t in times)  # three rounds each
    assert 0 < float(line.rsplit(":", 1)[1]) < 100
