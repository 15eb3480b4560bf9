"""Registry: adapter name -> where its files are, plus directory roots whose sub-folders are adapters.

Registering costs one small record; nothing is read until a request uses the adapter. A name that comes
from outside resolves under a root only through ``blora.lora.paths.adapter_dir_inside`` (the one
confinement rule, shared with the server): absolute paths, ``..`` and symlinks that leave the root are
refused. Mixture names (``mixture:{...}``) get a record on first use, after their components.

Invariants: records are added and removed on the engine thread only; other threads (the server listing
models, the loader thread) read a copy of the table (``dict.copy`` is atomic) or a single record. Each
record's fields have one writer: ``pinned`` the store's pin/unpin, ``refs`` the references
(``refs.References``), ``nbytes``/``error`` the loader, ``version``/``source`` a replace.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from blora.lora.errors import AdapterError
from blora.lora.mixtures import PREFIX, Mixture, is_mixture
from blora.lora.paths import NotAnAdapterError, adapter_dir_inside, check_relative_name, os_reason
from blora.lora.store.refs import References

_VERSIONS = itertools.count(1)  # weight versions, unique in the process (prefix-cache keys)


def next_version() -> int:
    return next(_VERSIONS)


@dataclass(eq=False)
class AdapterEntry:
    """One registered adapter. ``from_root``: found under ``root`` by name (its files must stay inside
    it); ``version``: new on every replace or re-registration (what caches keyed by adapter compare)."""

    name: str
    source: str
    from_root: bool
    root: Path | None = None
    mixture: Mixture | None = None
    pinned: bool = False
    refs: References = field(default_factory=References)
    nbytes: int | None = None  # prepared size, known after the first load
    error: Exception | None = None  # the last background load's failure (cleared when reported)
    version: int = field(default_factory=next_version)


class Registry:
    """Name -> ``AdapterEntry``; roots resolved lazily (see the module docstring)."""

    def __init__(self, roots: tuple[str | Path, ...] = ()) -> None:
        self.roots = [Path(r).expanduser() for r in roots]
        for root in self.roots:
            if not root.is_dir():
                raise ValueError(f"adapter root {str(root)!r} is not a directory")
        self._entries: dict[str, AdapterEntry] = {}

    def register(self, name: str, source: str | Path) -> AdapterEntry:
        """Record ``name`` -> ``source`` (a local directory or a hub id); reads nothing but ``exists``."""
        if not isinstance(name, str) or not name or "\x00" in name:
            raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
        if name.startswith(PREFIX):
            raise AdapterError(f"adapter names may not start with {PREFIX!r} (reserved for mixtures)")
        entry = self._entries.get(name)
        if entry is not None and not entry.from_root:
            raise AdapterError(f"adapter {name!r} is already registered (from {entry.source})")
        text = str(source)
        try:
            exists = Path(source).expanduser().exists()
        except (OSError, RuntimeError) as exc:  # a name too long, "~user" without a home
            raise AdapterError(f"adapter {name!r}: cannot use {text[:200]!r}: {os_reason(exc)}") from None
        if not exists and (text.startswith((".", "/", "~")) or text.count("/") != 1):
            raise AdapterError(f"adapter {name!r}: {text[:200]} does not exist")
        entry = self._entries[name] = AdapterEntry(name, text, from_root=False)
        return entry

    def add(self, entry: AdapterEntry) -> None:
        """Record an adapter whose weights are already known (installed before the store existed)."""
        self._entries[entry.name] = entry

    def get(self, name: str) -> AdapterEntry | None:
        """The record of ``name`` if it has one (nothing is resolved)."""
        return self._entries.get(name)

    def entry(self, name: str) -> AdapterEntry:
        """The record for ``name``; adapters under a root and mixtures get one on first use."""
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        if is_mixture(name):
            mixture = Mixture.from_key(name)
            for component in mixture.names:
                self.entry(component)
            entry = self._entries[name] = AdapterEntry(name, name, from_root=True, mixture=mixture)
            return entry
        for root in self.roots:
            path = self._find(root, name)
            if path is not None:
                entry = self._entries[name] = AdapterEntry(name, str(path), from_root=True, root=root)
                return entry
        where = f"; roots: {[str(r) for r in self.roots]}" if self.roots else ""
        known = sorted(n for n, e in self._entries.items() if not e.from_root)
        shown = f"{known[:20]}{' ...' if len(known) > 20 else ''}"
        raise AdapterError(f"unknown adapter {name[:200]!r}; registered adapters: {shown}{where}")

    @staticmethod
    def _find(root: Path, name: str) -> Path | None:
        """The adapter directory ``name`` under ``root`` (None: not there); ``AdapterError`` if it leaves."""
        shown = check_relative_name(name)
        try:
            return adapter_dir_inside(root, name, name, f"adapter name {shown!r}")
        except NotAnAdapterError:
            return None

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def entries(self) -> list[AdapterEntry]:
        """A copy of every record (safe from any thread)."""
        return list(self._entries.copy().values())

    def mixtures_of(self, name: str) -> list[AdapterEntry]:
        """The mixtures built from ``name``."""
        return [e for e in self.entries() if e.mixture is not None and name in e.mixture.names]

    def registered(self) -> dict[str, str]:
        """Adapters registered by name (``register``/``load``), not those found under a root, and not those
        being unloaded: name -> source."""
        return {
            e.name: e.source
            for e in self.entries()
            if not e.from_root and (e.refs.pending is None or e.refs.pending.action != "unload")
        }

    def lookup(self, name: str) -> str | None:
        """``list().get(name)`` without listing: the record's source, else a look for ``name`` under each
        root (a few ``stat`` calls); nothing is recorded, so any thread may call it."""
        entry = self._entries.get(name)
        if entry is not None and not entry.from_root:
            return entry.source
        for root in self.roots:
            try:
                path = self._find(root, name)
            except (AdapterError, OSError):
                continue  # a name that leaves the root, or a symlink out of it: not offered
            if path is not None:
                return str(path)
        return None

    def list(self) -> dict[str, str]:
        """Registered adapters and the adapters found under the roots (scanned now): name -> source."""
        out = {e.name: e.source for e in self.entries() if not e.from_root}
        for root in self.roots:
            for child in sorted(root.iterdir()):
                if child.name in out:
                    continue
                try:
                    path = self._find(root, child.name)
                except (AdapterError, OSError):
                    continue  # a symlink out of the root (or a loop): not offered
                if path is not None:
                    out[child.name] = str(path)
        return out
