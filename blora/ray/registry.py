"""The cluster's adapter registry and replica stats board: one small Serve deployment every other one asks.

Engine replicas cannot be addressed one by one through a Serve handle, so changes are not pushed to them:
every change bumps ``version``; the ingress sends the version it knows with each request and replicas
report their stats every fraction of a second, getting the current version back. A replica that sees a
newer version re-reads the registry and drops adapters that were removed or now point elsewhere, so no
request runs on an adapter the cluster has unloaded.

The registry lives in one replica's memory: if that replica is restarted, it starts again from the
adapters given at deploy time (runtime loads are lost; the replicas then unload them on their next sync).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ray import serve


@dataclass
class ClusterState:
    """One read of the registry: adapters (name -> source), their version, and each replica's last report
    as ``(time.time() when received, stats)``; reports of dead replicas stay (their counters count)."""

    version: int
    adapters: dict[str, str]
    reports: dict[str, tuple[float, dict]] = field(default_factory=dict)


class AdapterExistsError(ValueError):
    """A runtime load of a name the cluster already serves."""


@serve.deployment(
    name="AdapterRegistry",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    logging_config={"enable_access_log": False},  # replicas report several times a second
)
class AdapterRegistry:
    """Adapters the cluster serves (name -> source) with a version, and the replicas' latest stats."""

    def __init__(self, adapters: dict[str, str] | None = None) -> None:
        self._adapters = dict(adapters or {})
        self._version = 1
        self._reports: dict[str, tuple[float, dict]] = {}

    async def snapshot(self) -> tuple[int, dict[str, str]]:
        return self._version, dict(self._adapters)

    async def register(self, name: str, source: str) -> int:
        if name in self._adapters:
            raise AdapterExistsError(
                f"adapter {name!r} is already registered in the cluster (from {self._adapters[name]})"
            )
        self._adapters[name] = source
        self._version += 1
        return self._version

    async def remove(self, name: str) -> int:
        if self._adapters.pop(name, None) is None:
            raise KeyError(f"adapter {name!r} is not registered in the cluster")
        self._version += 1
        return self._version

    async def report(self, replica: str, stats: dict) -> int:
        """A replica's periodic stats; returns the registry version so the replica can re-sync."""
        self._reports[replica] = (time.time(), stats)
        return self._version

    async def state(self) -> ClusterState:
        return ClusterState(self._version, dict(self._adapters), dict(self._reports))
