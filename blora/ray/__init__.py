"""Scale-out on Ray Serve: N engine replicas behind one ingress that serves the single-process OpenAI API.

The ingress runs ``blora.server``'s app over a ``ClusterEngine`` and routes each adapter request with Ray
Serve's model multiplexing, so it lands on a replica that already holds its adapter; each replica keeps
its adapters resident in its own engine (LRU) and batches them together. Needs ``pip install 'blora[ray]'``.

- ``blora serve --ray --replicas N [--ray-address ADDR]`` (``blora.ray.cli``)
- ``serve run blora.ray:app_builder replicas=N lora-modules="a=/p b=/q"``
- ``serve.run(build_app(engine_kwargs, ServerConfig(...), ClusterConfig(replicas=N), adapters))``

Layout: ``app.py`` deployments wired together · ``cluster_engine.py`` the ingress's engine ·
``replica.py`` engine replicas and multiplexed adapters · ``registry.py`` adapters and stats for all ·
``wire.py`` outputs as deltas · ``cli.py`` ``blora serve --ray`` (hit rates: ``benchmarks/routing_bench.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blora.ray.app import ClusterConfig, app_builder, build_app
    from blora.ray.cluster_engine import ClusterEngine

__all__ = ["ClusterConfig", "ClusterEngine", "app_builder", "build_app"]


def __getattr__(name: str) -> Any:
    if name == "ClusterEngine":
        from blora.ray import cluster_engine

        return cluster_engine.ClusterEngine
    if name in __all__:
        from blora.ray import app

        return getattr(app, name)
    raise AttributeError(name)
