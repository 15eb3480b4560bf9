"""Regular expressions from adapter configs (``target_modules``, ``exclude_modules``, ``layers_pattern``,
``rank_pattern`` / ``alpha_pattern`` keys), matched with a time budget and without holding the GIL.

PEFT matches these with Python's ``re``, whose backtracking never releases the GIL: a 20-byte pattern with
nested quantifiers (``(\\w+\\.?)+\\.?(\\w*)*z``) takes ~10 s per module name there, and every other thread
(the engine, the event loop) stops meanwhile. Here a pattern is first compiled with ``re`` (so a pattern
PEFT refuses is refused, with ``re``'s reason), then matched with the ``regex`` package (a dependency of
``transformers``; the same syntax and results for ``re`` patterns), which releases the GIL while it matches
(``concurrent=True``), prunes most such backtracking, and stops at a timeout. All patterns of one adapter
share one ``PatternBudget``: an adapter whose matching takes longer is refused with a message naming the
field and the pattern.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import regex

from blora.lora.errors import AdapterError

MAX_PATTERN_CHARS = 4096
MATCH_BUDGET_S = 2.0  # all regex matching of one adapter against the base model's module names


class PatternBudget:
    """Seconds of regex matching left for one adapter (shared by all its patterns)."""

    def __init__(self, seconds: float = MATCH_BUDGET_S) -> None:
        self.seconds = seconds
        self.left = seconds


class Pattern:
    """One config regex; ``field`` and ``where`` name it in errors (``"target_modules"``, the adapter)."""

    def __init__(self, text: str, field: str, where: str, budget: PatternBudget) -> None:
        self.field, self.where, self.budget = field, where, budget
        shown = text if len(text) <= 80 else text[:77] + "..."
        self.shown = shown
        if len(text) > MAX_PATTERN_CHARS:
            raise AdapterError(
                f"{where}: {field} pattern is {len(text)} characters long (at most {MAX_PATTERN_CHARS}); "
                "list module names instead"
            )
        try:
            re.compile(text)  # PEFT's own compiler decides what is a valid pattern
            self._rx = regex.compile(text)
        except (re.error, regex.error, RecursionError, OverflowError, ValueError) as exc:
            raise AdapterError(
                f"{where}: {field} {shown!r} is not a valid regular expression: {exc}"
            ) from None

    def fullmatch(self, key: str) -> regex.Match | None:
        return self._run(self._rx.fullmatch, key)

    def match(self, key: str) -> regex.Match | None:
        return self._run(self._rx.match, key)

    def _run(self, fn: Callable[..., regex.Match | None], key: str) -> regex.Match | None:
        if self.budget.left <= 0:
            raise self._too_slow()
        t0 = time.perf_counter()
        try:
            return fn(key, timeout=self.budget.left, concurrent=True)
        except TimeoutError:
            raise self._too_slow() from None
        finally:
            self.budget.left -= time.perf_counter() - t0

    def _too_slow(self) -> AdapterError:
        return AdapterError(
            f"{self.where}: matching {self.field} {self.shown!r} against the base model's module names took "
            f"more than {self.budget.seconds:g} s (nested quantifiers backtrack exponentially); simplify the "
            "pattern or list the module names"
        )
