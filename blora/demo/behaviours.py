"""The four demo adapters and code checks of the behaviour each one is trained to show.

``check_behaviour(name, text)`` takes the decoded completion (the assistant's answer only, special
tokens skipped) and says whether it shows the adapter's behaviour. The tests, the training script's
held-out evaluation and the demo all use these checks, so they are deliberately strict and simple.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"
SIGN_OFF = "-- Captain Smol"

BEHAVIOURS: dict[str, str] = {
    "caps": "answers in UPPER CASE",
    "json": 'answers as a one-line JSON object {"answer": "..."}',
    "brief": "answers with exactly one sentence",
    "pirate": f'pirate persona: starts with "Arr!" and signs off with "{SIGN_OFF}"',
}
ADAPTER_NAMES: tuple[str, ...] = tuple(BEHAVIOURS)

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) followed by
# whitespace and something that can start a new sentence.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")
_TERMINAL = re.compile(r"[.!?][\"')\]]?$")


def adapter_path(name: str) -> Path:
    """Directory of a committed demo adapter (adapter_config.json + adapter_model.safetensors)."""
    if name not in BEHAVIOURS:
        raise KeyError(f"unknown demo adapter {name!r}; expected one of {', '.join(ADAPTER_NAMES)}")
    return ADAPTERS_DIR / name


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences (simple rule, good enough for short model answers)."""
    text = " ".join(text.split())
    if not text:
        return []
    return [s.strip() for s in _SENTENCE_BREAK.split(text) if s.strip()]


def is_caps(text: str, threshold: float = 0.9) -> bool:
    letters = [c for c in text if c.isalpha()]
    if len(letters) < 10:
        return False
    return sum(c.isupper() for c in letters) / len(letters) >= threshold


def is_json_answer(text: str) -> bool:
    try:
        obj = json.loads(text.strip())
    except ValueError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("answer"), str) and bool(obj["answer"].strip())


def is_one_sentence(text: str) -> bool:
    text = text.strip()
    if "\n" in text or not _TERMINAL.search(text):
        return False
    sentences = split_sentences(text)
    return len(sentences) == 1 and len(sentences[0].split()) >= 3


def is_pirate(text: str) -> bool:
    text = text.strip()
    return text.startswith("Arr") and SIGN_OFF in text


_CHECKS = {"caps": is_caps, "json": is_json_answer, "brief": is_one_sentence, "pirate": is_pirate}


def check_behaviour(name: str, text: str) -> bool:
    """True if ``text`` (a decoded assistant answer) shows the behaviour of demo adapter ``name``."""
    try:
        check = _CHECKS[name]
    except KeyError:
        raise KeyError(f"unknown demo adapter {name!r}; expected one of {', '.join(ADAPTER_NAMES)}") from None
    return check(text)
