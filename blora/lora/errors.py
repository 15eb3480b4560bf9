"""The error every adapter check raises."""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter could not be loaded; the message names the adapter, file or key and what to do."""
