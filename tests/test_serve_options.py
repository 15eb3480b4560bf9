"""``blora serve``'s options (``blora.server.options``) turn into the engine and the server every entry point
runs: the single engine (``blora serve``, ``python -m blora.server``) and Ray's (``--ray``, ``app_builder``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from blora.engine import LLM
from blora.engine.llm_engine import EngineConfig
from blora.server.options import (
    add_serve_arguments,
    check_args,
    engine_args,
    sampling_defaults,
    server_config,
)
from tests.helpers import save_tiny_model


def parse(*argv: str) -> argparse.Namespace:
    args = add_serve_arguments(argparse.ArgumentParser()).parse_args(list(argv))
    check_args(args)
    return args


def test_engine_args_build_the_engine_they_describe(tmp_path):
    model = save_tiny_model("llama", tmp_path / "model")
    args = parse(str(model), "--max-model-len", "96", "--max-loras", "3", "--max-num-seqs", "5",
                 "--max-lora-rank", "8", "--num-kv-blocks", "40", "--no-enable-prefix-caching",
                 "--lora-backend", "torch", "--seed", "7", "--dtype", "float32", "--device", "cpu",
                 "--stream-interval", "3")  # fmt: skip
    built = engine_args(args)
    assert built.model == str(model) and built.dtype == "float32" and built.device == "cpu"
    expected = dataclasses.replace(
        EngineConfig(), max_model_len=96, max_loras=3, max_num_seqs=5, max_lora_rank=8, num_kv_blocks=40,
        enable_prefix_caching=False, lora_backend="torch", seed=7, stream_interval=3,
    )  # fmt: skip
    assert built.config == expected
    llm = LLM(**built.kwargs())  # every field reaches the engine's config
    assert llm.engine.config == expected and llm.max_model_len == 96


def test_the_engine_process_is_chosen_by_flag_or_by_spare_cores(tmp_path, monkeypatch):
    from blora.server import cli

    built = []

    class Fake:
        def __init__(self, adapters=None, threads=None, log_level=None, **kwargs):
            built.append((type(self).__name__, adapters, threads, log_level, kwargs["max_loras"]))

    class EngineProcess(Fake):
        pass

    class AsyncLLM(Fake):
        def __init__(self, adapters=None, **kwargs):
            super().__init__(adapters, torch.get_num_threads(), None, **kwargs)

    monkeypatch.setattr("blora.engine.process.EngineProcess", EngineProcess)
    monkeypatch.setattr("blora.engine.AsyncLLM", AsyncLLM)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    before = torch.get_num_threads()
    try:
        cli.build_engine(
            parse("--threads", "3", "--max-loras", "3", "--lora-modules", "a=/x", "--device", "cpu")
        )
        assert torch.get_num_threads() == before  # the child sets its own threads
        cli.build_engine(parse("--threads", "4", "--device", "cpu", "--log-level", "debug"))  # every core
        cli.build_engine(parse("--engine-process", "on", "--threads", "4", "--device", "cpu"))
        cli.build_engine(parse("--engine-process", "off", "--threads", "1", "--device", "cpu"))
    finally:
        torch.set_num_threads(before)
    assert built == [
        ("EngineProcess", {"a": "/x"}, 3, "INFO", 3),
        ("AsyncLLM", None, 4, None, 16),
        ("EngineProcess", None, 4, "INFO", 16),
        ("AsyncLLM", None, 1, None, 16),
    ]
    assert not cli.engine_in_process(parse("--device", "cuda"))  # a GPU: always its own process
    with pytest.raises(SystemExit):
        parse("--engine-process", "maybe")
    with pytest.raises(SystemExit, match="Ray replicas run their engines in processes of their own"):
        parse("--ray", "--engine-process", "on")


def test_server_config_and_generation_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.4, "max_new_tokens": 9}))
    args = parse("--model", str(tmp_path), "--served-model-name", "a", "b", "--max-queue", "-1",
                 "--max-body-mb", "1", "--lora-modules", '{"name": "x", "path": "/x", "base_model_name": "a"}')  # fmt: skip
    config = server_config(args, sampling_defaults=sampling_defaults(args))
    assert (config.served_model_name, config.served_model_aliases) == ("a", ("b",))
    assert config.model_source == str(tmp_path) and config.max_queue is None
    assert config.max_body_bytes == 1 << 20 and config.adapter_parents == {"x": "a"}
    assert config.sampling_defaults == {"temperature": 0.4, "max_tokens": 9}
    assert sampling_defaults(parse("--model", str(tmp_path), "--generation-config", "vllm")) == {}


def test_ray_options_build_the_same_engine_and_server(tmp_path):
    pytest.importorskip("ray")
    from ray import serve

    from blora.ray.app import app_builder, app_from_args, cluster_config

    args = parse("--ray", "--replicas", "3", "--replica-cpus", "0.5", "--max-loras", "2",
                 "--max-num-seqs", "4", "--lora-modules", f"a={tmp_path}")  # fmt: skip
    cluster = cluster_config(args)
    assert (cluster.replicas, cluster.replica_cpus, cluster.max_adapters_per_replica) == (3, 0.5, 2)
    assert isinstance(app_from_args(args), serve.Application)  # built, not deployed (no cluster needed)
    assert isinstance(app_builder({"replicas": "2", "max_loras": "2"}), serve.Application)
    with pytest.raises(SystemExit, match="--replicas must be >= 1"):
        app_builder({"replicas": "0"})


def test_the_entry_points_share_the_options():
    """``python -m blora.server`` and ``blora serve`` parse the same options and refuse the same mistakes."""
    from blora.server.cli import main as server_main

    with pytest.raises(SystemExit, match="only apply with --ray"):
        server_main(["--replicas", "2"])
    with pytest.raises(SystemExit, match=r"--ray: start it with `blora serve --ray"):
        server_main(["--ray"])
    from blora.cli import main as blora_main

    with pytest.raises(SystemExit, match="only apply with --ray"):
        blora_main(["serve", "--replicas", "2"])
    with pytest.raises(SystemExit, match="needs --adapter-root"):
        blora_main(["serve", "--allow-runtime-adapters"])
    with pytest.raises(SystemExit, match="--stream-interval must be >= 1"):
        blora_main(["serve", "--stream-interval", "0"])


def test_options_module_loads_nothing_heavy():
    """Parsing options imports neither the HTTP app nor Ray (``blora --help`` stays quick)."""
    import subprocess
    import sys

    code = (
        "import sys, argparse; from blora.server.options import add_serve_arguments;"
        "add_serve_arguments(argparse.ArgumentParser()).parse_args([]);"
        "print(sorted(m for m in ('fastapi', 'ray', 'blora.server.app') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_model_path_is_made_absolute_for_replicas(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from blora.ray.app import _absolute

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    assert _absolute("m") == str((tmp_path / "m").resolve())
    assert _absolute("org/not-a-path") == "org/not-a-path"  # a hub id stays as it is
    assert Path(_absolute(str(tmp_path))).is_absolute()
