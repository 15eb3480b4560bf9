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
