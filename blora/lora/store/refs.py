"""Reference counts: which requests hold an adapter, and the unload or replace that waits for them.

Invariants (engine thread only, so no lock):

- ``users`` maps each request (owner) that holds the adapter to the generation of the weights it runs on:
  the current ``generation``, or the next one for a request that arrived during a waiting replace.
- At most one ``pending`` action (unload or replace) per adapter. It can finish once no owner holds the
  current generation; finishing a replace advances ``generation``, so the owners that waited for the new
  weights become current.
- While an unload is pending, no new owner is accepted.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from typing import Literal

from blora.lora.errors import AdapterError
from blora.lora.prepared import PreparedAdapter

Action = Literal["unload", "replace"]


class AdapterInUseError(AdapterError):
    """Unload/replace of an adapter that unfinished requests still use (and ``wait`` was not asked for)."""


@dataclass(eq=False)
class PendingAction:
    """An unload or replace waiting for the requests that hold the current generation; ``future`` is done
    when it happened; ``prepared``: a replace's new weights."""

    action: Action
    future: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)
    prepared: PreparedAdapter | None = None


@dataclass(eq=False)
class References:
    """The requests holding one adapter (see the module docstring for the invariants)."""

    users: dict[str, int] = field(default_factory=dict)  # owner (request id) -> generation it runs on
    pending: PendingAction | None = None
    generation: int = 0

    def check_open(self, name: str) -> None:
        """Refuse new requests while an unload is pending."""
        if self.pending is not None and self.pending.action == "unload":
            raise AdapterError(f"adapter {name!r} is being unloaded; it accepts no new requests")

    def acquire(self, name: str, owner: str) -> None:
        """``owner`` starts using the adapter; refused while an unload is pending."""
        self.check_open(name)
        self.users[owner] = self.generation + (1 if self.pending is not None else 0)

    def release(self, owner: str) -> bool:
        """``owner`` is done; False if it did not hold the adapter."""
        return self.users.pop(owner, None) is not None

    def is_current(self, owner: str) -> bool:
        """Whether ``owner`` (holding the adapter or not yet) runs on the current weights."""
        return self.users.get(owner, self.generation) == self.generation

    def holders(self) -> list[str]:
        """Owners running on the current generation."""
        return [owner for owner, gen in self.users.items() if gen == self.generation]

    def start(self, name: str, action: Action, prepared: PreparedAdapter | None = None) -> PendingAction:
        if self.pending is not None:
            raise AdapterInUseError(
                f"adapter {name!r} already has a pending {self.pending.action}; wait for it"
            )
        self.pending = PendingAction(action, prepared=prepared)
        return self.pending

    def due(self) -> PendingAction | None:
        """The pending action if no owner holds the current generation any more (it must happen now)."""
        return self.pending if self.pending is not None and not self.holders() else None

    def finish(self) -> None:
        """The due action happened: a replace moves every owner of the next generation to current."""
        assert self.pending is not None, "finish() without a pending action"  # a caller bug, not input
        if self.pending.action == "replace":
            self.generation += 1
        self.pending = None

    def in_use(self, name: str, action: Action) -> AdapterInUseError:
        users = sorted(self.users)
        return AdapterInUseError(
            f"adapter {name!r} is used by {len(users)} unfinished request(s) (e.g. {users[0]}); "
            f"abort them or wait for them to finish before the {action} (or pass wait=True)"
        )
