"""A model family's own forward (``fast_path``) reads plain weights: it steps aside for a quantized model."""

from __future__ import annotations

import pytest

from blora import LLM
from tests.helpers import tiny_model, tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fast_path_on_refuses_a_quantized_model():
    with pytest.raises(ValueError, match="quantized"):
        LLM(tiny_model("llama"), tokenizer=tokenizer(), quantization="int8", fast_path="on")
