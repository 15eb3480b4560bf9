"""``ClusterEngine``: the ingress's engine. It implements ``EngineClient`` like ``AsyncLLM``, so ``create_app``
serves the cluster with the single-process server's code (routes, validation, errors, streaming, metrics), while every
request runs on an engine replica behind a Serve handle.

- ``generate``: routed with ``multiplexed_model_id=<adapter>`` (Ray's model multiplexing), base-model and
  mixture requests to any replica; replica errors are unwrapped to the exception the engine raised, so the
  server turns them into the same responses. A replica that dies before the first output is retried on
  another one; after it, the request fails with 503 (``replica_unavailable``) for the client to retry.
- ``abort``: cancels the request's stream; the replica's ``AsyncLLM`` aborts it and frees its blocks, and
  the stream ends as an aborted ``AsyncLLM`` stream does (a final output with finish_reason "abort").
- ``list_adapters`` / ``stats``: the registry and the replicas' reports, refreshed in the background
  (the server reads both synchronously).
- ``load_adapter`` / ``unload_adapter``: validate on one replica, then register for all; unregister for all
  (each replica unloads at its next sync, once its running requests are done). Replacing an adapter in
  place is not supported (``limits.replace_adapters`` is False): unload it, then load.
- ``limits``, ``tokenizer``: a replica's (every replica runs the same engine); ``structured_outputs``: a
  grammar compiler for the same tokenizer and vocabulary, to check requests at the ingress.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError, RequestCancelledError

from blora.engine.client import EngineLimits
from blora.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from blora.engine.sampling_params import SamplingParamError, SamplingParams
from blora.engine.structured import StructuredOutputs
from blora.engine.wire import Unpacker
from blora.lora import AdapterInUseError
from blora.ray.registry import ClusterState
from blora.server.errors import APIError

logger = logging.getLogger("blora.ray")

STALE_S = 5.0  # a replica silent for this long no longer counts in gauges (its counters still do)
RETRIES_BEFORE_OUTPUT = 3
UNLOAD_POLL_S = 0.05  # unload_adapter(wait=True): how often it looks whether the adapter's requests ended


class ReplicaUnavailableError(APIError):
    """The replica running a request died after it had produced output; the client should retry."""

    status_code = 503
    error_type = "server_error"
    default_code = "replica_unavailable"


def unwrap(exc: BaseException) -> BaseException:
    """The exception a replica raised, without Ray's wrapper (so messages match the single-process server)."""
    cause = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else None
    return cause if isinstance(cause, Exception) else exc


def aborted_output(
    last: RequestOutput | None, request_id: str, prompt: Any, params: Any, adapter: Any
) -> RequestOutput:
    """The final output ``AsyncLLM`` yields for an aborted request: what it had, unfinished choices "abort"."""
    if last is None:
        n, logprobs = getattr(params, "n", 1), getattr(params, "logprobs", None)
        outputs = [CompletionOutput(i, "", [], logprobs=None if logprobs is None else []) for i in range(n)]
        ids = list(prompt) if isinstance(prompt, list) else []
        name = adapter if isinstance(adapter, str) else None
        last = RequestOutput(request_id, None, ids, outputs, False, name, RequestMetrics(time.time()))
    outputs = [
        dataclasses.replace(
            c,
            finish_reason=c.finish_reason or "abort",
            delta_text="",
            delta_token_ids=[],
            delta_logprobs=None if c.delta_logprobs is None else [],
        )
        for c in last.outputs
    ]
    return dataclasses.replace(last, outputs=outputs, finished=True)


def _adapter_names(adapter: str | dict[str, float] | None) -> list[str]:
    return [] if adapter is None else [adapter] if isinstance(adapter, str) else list(adapter)


class ClusterEngine:
    """Engine replicas behind a Serve handle, an ``EngineClient`` (see the module docstring). ``info``:
    a replica's ``describe()`` (its tokenizer and ``EngineLimits``)."""

    def __init__(
        self,
        replicas: Any,
        registry: Any,
        info: dict,
        affinity: bool = True,
        refresh_s: float = 0.5,
        retry_after_s: int = 1,
    ) -> None:
        self.replicas = replicas
        self.registry = registry
        self.tokenizer = info["tokenizer"]
        self.limits: EngineLimits = dataclasses.replace(info["limits"], replace_adapters=False)
        self._structured: StructuredOutputs | None = None
        self.affinity = affinity
        self.refresh_s = refresh_s
        self.retry_after_s = retry_after_s
        self._state = ClusterState(0, {})
        self._running: dict[str, tuple[Any, list[str]]] = {}  # request id -> (Serve response, adapters)
        self._aborted: set[str] = set()
        self._refresher: asyncio.Task | None = None

    @property
    def structured_outputs(self) -> StructuredOutputs:
        """A grammar compiler for the replicas' tokenizer and vocabulary (requests are checked with it)."""
        if self._structured is None:
            eos = self.tokenizer.eos_token_id
            stop = [eos] if isinstance(eos, int) else []
            self._structured = StructuredOutputs(self.tokenizer, self.limits.vocab_size, stop)
        return self._structured

    async def start(self) -> None:
        await self.refresh()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop refreshing; the replicas belong to Serve, which shuts them down itself."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher

    # -- generation ----------------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        adapter: str | dict[str, float] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Like ``AsyncLLM.generate``: the request's outputs as they arrive; closing it early aborts it."""
        if request_id is None or request_id in self._running:
            raise ValueError(f"request id {request_id!r} is missing or already in use")
        options: dict[str, Any] = {"stream": True}
        if self.affinity and isinstance(adapter, str):
            options["multiplexed_model_id"] = adapter
        handle = self.replicas.options(**options)
        unpacker, produced, attempt, finished = Unpacker(), False, 0, False
        try:
            while not finished:
                args = (prompt, sampling_params, adapter, request_id, self._state.version)
                response = handle.generate.remote(*args)
                self._running[request_id] = (response, _adapter_names(adapter))
                try:
                    async for packed in response:
                        out = unpacker.unpack(packed)
                        produced, finished = True, out.finished
                        yield out
                    finished = True
                except (RayActorError, RayTaskError, DeploymentUnavailableError) as exc:
                    cause = unwrap(exc)
                    if not isinstance(cause, (RayActorError, DeploymentUnavailableError)):
                        raise cause from None  # what the engine raised
                    response.cancel()  # in case the replica is only unreachable, not dead
                    attempt += 1
                    if produced or attempt > RETRIES_BEFORE_OUTPUT:
                        raise self._unavailable(request_id, cause) from None
                    logger.warning("replica lost before request %s started; retrying: %s", request_id, cause)
                    await asyncio.sleep(0.2 * attempt)
                except RequestCancelledError:
                    if request_id not in self._aborted:
                        raise
                    finished = True  # as AsyncLLM's stream of an aborted request ends:
                    yield aborted_output(unpacker.last, request_id, prompt, sampling_params, adapter)
        finally:
            self._aborted.discard(request_id)
            entry = self._running.pop(request_id, None)
            if entry is not None and not finished:
                entry[0].cancel()

    def _unavailable(self, request_id: str, exc: BaseException) -> ReplicaUnavailableError:
        logger.warning("request %s lost its replica: %s", request_id, exc)
        return ReplicaUnavailableError(
            "The engine replica serving this request became unavailable; retry the request",
            headers={"Retry-After": str(self.retry_after_s)},
        )

    async def abort(self, request_id: str) -> bool:
        """Cancel the request on its replica (its ``AsyncLLM`` aborts it and frees the KV blocks)."""
        entry = self._running.get(request_id)
        if entry is None:
            return False
        self._aborted.add(request_id)
        entry[0].cancel()
        return True

    # -- adapters ------------------------------------------------------------------------------------
    def list_adapters(self) -> dict[str, str]:
        return dict(self._state.adapters)

    def adapter_source(self, name: str) -> str | None:
        return self._state.adapters.get(name)

    async def load_adapter(
        self, name: str, path: str | Path, replace: bool = False, wait: bool = False
    ) -> None:
        """Validate on one replica (which keeps it resident), then register it for the whole cluster.
        ``replace`` is refused (``SamplingParamError`` naming ``replace``): replicas cannot swap an adapter
        in place; unload it, then load. ``wait`` only applies to ``replace``."""
        if replace:
            raise SamplingParamError(
                "replace", "replacing an adapter in place is not supported on Ray replicas; unload, then load"
            )
        handle = self.replicas.options(multiplexed_model_id=name) if self.affinity else self.replicas
        try:
            await handle.load.remote(name, str(path), self._state.version)
            await self.registry.register.remote(name, str(path))
        except RayTaskError as exc:
            raise unwrap(exc) from None
        await self.refresh()

    async def unload_adapter(self, name: str, wait: bool = False) -> None:
        """Unregister for the whole cluster; while requests through this ingress still use it:
        ``AdapterInUseError``, or with ``wait=True`` unregister once they have finished."""
        users = self._users(name)
        while users and wait:
            await asyncio.sleep(UNLOAD_POLL_S)
            users = self._users(name)
        if users:
            raise AdapterInUseError(
                f"adapter {name!r} is used by {len(users)} unfinished request(s) (e.g. {users[0]}); "
                "abort them or wait for them to finish before the unload"
            )
        try:
            await self.registry.remove.remote(name)
        except RayTaskError as exc:
            raise unwrap(exc) from None
        await self.refresh()

    def _users(self, name: str) -> list[str]:
        """Unfinished requests (ids, sorted) through this ingress that use adapter ``name``."""
        return sorted(rid for rid, (_, names) in self._running.items() if name in names)

    # -- state ---------------------------------------------------------------------------------------
    async def refresh(self) -> None:
        state: ClusterState = await self.registry.state.remote()
        if state.version >= self._state.version:
            self._state = state
        else:  # an older read finished after a newer one: keep the newer adapters, take the reports
            self._state.reports = state.reports

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:
                logger.warning("reading the adapter registry failed", exc_info=True)

    def replica_reports(self) -> dict[str, tuple[bool, dict]]:
        """Each replica's latest stats with whether it reported recently (live)."""
        now = time.time()
        return {name: (now - t < STALE_S, s) for name, (t, s) in self._state.reports.items()}

    def stats(self) -> dict:
        """The replicas' ``LLMEngine.stats`` combined: gauges of live replicas, counters of all."""
        counters = ("prompt_tokens_total", "generation_tokens_total", "num_preemptions_total",
                    "prefix_cache_queries_total", "prefix_cache_hits_total")  # fmt: skip
        total: dict[str, Any] = {"num_running": 0, "num_waiting": 0, **dict.fromkeys(counters, 0)}
        running: Counter[str] = Counter()
        waiting: Counter[str] = Counter()
        usage: list[float] = []
        for live, s in self.replica_reports().values():
            for key in counters:
                total[key] += s.get(key, 0)
            if not live:
                continue
            total["num_running"] += s.get("num_running", 0)
            total["num_waiting"] += s.get("num_waiting", 0)
            usage.append(s.get("kv_usage", 0.0))
            running.update(s.get("running_adapters") or {})
            waiting.update(s.get("waiting_adapters") or {})
        total["kv_usage"] = sum(usage) / len(usage) if usage else 0.0
        queries = total["prefix_cache_queries_total"]
        total["prefix_cache_hit_rate"] = total["prefix_cache_hits_total"] / queries if queries else 0.0
        total["running_adapters"], total["waiting_adapters"] = dict(running), dict(waiting)
        return total
