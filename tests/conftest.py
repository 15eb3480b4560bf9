"""Generic pytest fixtures shared by the test modules (tiny models and adapters live in tests/helpers.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests import helpers


@pytest.fixture(scope="session")
def tok():
    """The shared SmolLM2 tokenizer. Read-only: use ``tok_copy`` to change it."""
    return helpers.tokenizer()


@pytest.fixture
def tok_copy(tok):
    """A private deep copy of the SmolLM2 tokenizer that a test may modify."""
    return copy.deepcopy(tok)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny-model work on one intra-op thread and restore the setting afterwards.

    Tiny matmuls gain nothing from a second thread, and on a busy machine OpenMP's thread barriers make
    them up to 100x slower (measured: 40 ms instead of 0.05 ms for a [280, 64] x [64, 128] matmul).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Modules that start servers, Ray, a browser, the embedded model or Triton's interpreter (measured: each
# takes a minute or more of the full run). `make test-fast` (pytest -m "not slow") leaves them out.
SLOW_MODULES = frozenset(
    {
        "test_api_fuzz",
        "test_demo_cli",
        "test_demo_adapters",
        "test_engine_smollm",
        "test_playground",
        "test_ray_serve",
        "test_server_e2e",
        "test_tools",
        "test_triton_attention",
        "test_triton_backend",
        "test_triton_compile",
        "test_triton_gpu_check",
        "test_triton_lora",
        "test_vllm_compat_recipe",
    }
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def needs_kernels():
    """The CPU kernels (for the engine's fast path): a build failure fails the test, a machine without a
    compiler skips it."""
    from blora import kernels

    try:
        kernels._compiler()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    assert kernels.get() is not None, "the CPU kernels did not build"
