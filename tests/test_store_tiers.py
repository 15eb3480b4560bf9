"""The adapter store's tiers one by one, without an engine: admission is a pure check (only the loader
reads, inline at ``prefetch`` when there is no loader thread), the host cache's budget and reservations,
slot LRU with pinning, references during a waiting replace/unload, the public ``residency``/``stats``/
``registered`` views, and one confinement function for the store's roots and the server's runtime loads.
"""

from __future__ import annotations

import threading

import pytest
import torch

from blora.lora import AdapterError
from blora.lora.manager import LoraManager
from blora.lora.paths import NotAnAdapterError, adapter_dir_inside
from blora.lora.prepared import LoraWeights, PreparedAdapter
from blora.lora.store import AdapterInUseError, AdapterStore, StoreConfig
from blora.lora.store.cache import HostCache
from blora.lora.store.refs import References
from tests.helpers import make_adapter, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def dirs(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiers")
    return {
        name: make_adapter(base, root / name, seed=i, r=2, target_modules=["q_proj"])
        for i, name in enumerate("abc")
    }


class Spy:
    """Counts ``LoraManager.prepare`` calls (reads of adapter files) and the threads they ran on."""

    def __init__(self, manager: LoraManager) -> None:
        self.calls: list[tuple[str, str]] = []
        self._prepare = manager.prepare
        manager.prepare = self  # type: ignore[method-assign]  # instance attribute shadows the method

    def __call__(self, name, *args, **kwargs):
        self.calls.append((name, threading.current_thread().name))
        return self._prepare(name, *args, **kwargs)


def new_store(base, **config) -> tuple[AdapterStore, Spy]:
    import copy

    manager = LoraManager(copy.deepcopy(base))
    spy = Spy(manager)
    return AdapterStore(manager, StoreConfig(**config)), spy


def fake(name: str, nbytes: int) -> PreparedAdapter:
    """A prepared adapter of exactly ``nbytes`` bytes (one fp32 tensor), for cache bookkeeping."""
    a = torch.zeros(nbytes // 4, 1)
    return PreparedAdapter(name, "mem", {"m": LoraWeights(a, torch.zeros(1, 0))})


# ---------------------------------------------------------------------------------------- admission


def test_admission_never_reads_the_disk_even_without_a_loader_thread(base, dirs):
    store, spy = new_store(base, max_loras=2, background=False)
    store.register("a", dirs["a"])
    store.acquire("a", "r1")
    assert store.ready("a", "r1") is False  # not in memory: waits, nothing read
    assert spy.calls == []
    assert store.stats().requests_waited_for_load == 1
    store.prefetch(["a"])  # the engine's defined point: the loader reads the window now, in this thread
    assert spy.calls == [("a", threading.current_thread().name)]
    assert store.ready("a", "r1") is True
    store.activate(["a"], busy=set())
    residency = store.residency()
    assert residency.active == ("a",) and residency.resident == ("a",)
    store.release("a", "r1")


def test_the_background_loader_reads_in_its_own_thread(base, dirs):
    store, spy = new_store(base, max_loras=2)
    try:
        store.register("a", dirs["a"])
        assert store.ready("a") is False and spy.calls == []
        store.prefetch(["a"])
        for _ in range(500):
            if store.ready("a"):
                break
            store.wait_for_load(0.02)
        assert spy.calls == [("a", "blora-adapter-loader")]
        assert store.ready("a") and not store.loading()
    finally:
        store.close()


def test_a_failed_load_is_reported_once_then_retried(base, dirs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    store, spy = new_store(base, background=False)
    store.register("x", broken)
    store.prefetch(["x"])
    assert store.ready("x") is False
    failures = store.take_failures()
    assert list(failures) == ["x"] and isinstance(failures["x"], AdapterError)
    assert store.take_failures() == {}
    store.prefetch(["x"])  # the error was cleared: a later request retries
    assert [name for name, _ in spy.calls] == ["x", "x"]
    assert store.stats().load_failures == 2


# ------------------------------------------------------------------------------------- host cache


def test_host_cache_lru_budget_reservations_and_optional_inserts():
    cache = HostCache(threading.Condition(), budget_bytes=3000)
    for name in "abc":
        cache.put(name, fake(name, 1000))
    assert cache.names() == ["a", "b", "c"] and cache.nbytes == 3000
    cache.get("a", touch=True)  # now most recent: "b" is the LRU
    cache.put("d", fake("d", 1000))
    assert cache.names() == ["c", "a", "d"] and cache.evictions == 1
    cache.reserve_window(["c"])
    cache.promise("a")
    cache.put("e", fake("e", 1000))  # only "d" may go
    assert cache.names() == ["c", "a", "e"]
    assert not cache.fits(fake("g", 2500))  # "e" is the only unreserved one
    assert not cache.put("g", fake("g", 2500), required=False)  # optional: dropped, evicts nothing
    assert cache.names() == ["c", "a", "e"]
    assert cache.put("f", fake("f", 1000), required=False)  # fits once "e" goes
    assert cache.names() == ["c", "a", "f"] and cache.evictions == 3
    cache.clear_promises()
    assert cache.fits(fake("g", 2000))
    assert cache.peak_bytes == 3000 and cache.nbytes == 3000


def test_host_cache_count_limit():
    cache = HostCache(threading.Condition(), budget_bytes=10**6, max_count=2)
    for name in "abc":
        cache.put(name, fake(name, 100))
    assert cache.names() == ["b", "c"]


# ------------------------------------------------------------------------------------------- slots


def test_slots_are_lru_and_pinned_adapters_take_extra_slots(base, dirs):
    store, _ = new_store(base, max_loras=1, background=False)
    for name in "abc":
        store.register(name, dirs[name])
    store.pin("a")
    for name in ("b", "c"):
        store.prefetch([name])
        store.activate([name], busy=set())
    residency = store.residency()
    assert residency.active == ("a", "c") and residency.pinned == ("a",)
    assert store.stats().slot_evictions == 1  # b -> c, never a
    assert "b" in residency.cached  # on CPU an evicted slot's weights go back to the cache
    with pytest.raises(RuntimeError, match="no free adapter slot"):
        store.activate(["b"], busy={"c"})  # the only LRU slot is held by a running request


# -------------------------------------------------------------------------------------- references


def test_references_of_a_waiting_replace():
    refs = References()
    refs.acquire("x", "old")
    pending = refs.start("x", "replace")
    refs.acquire("x", "new")  # arrived during the replace: waits for the next generation
    assert refs.is_current("old") and not refs.is_current("new")
    assert refs.due() is None  # "old" still runs on the current weights
    with pytest.raises(AdapterInUseError, match="pending replace"):
        refs.start("x", "unload")
    assert refs.release("old") and refs.due() is pending
    refs.finish()
    assert refs.is_current("new") and refs.generation == 1 and refs.pending is None


def test_waiting_unload_refuses_new_requests_and_leaves_registered(base, dirs):
    store, _ = new_store(base, background=False)
    store.load("a", dirs["a"])
    store.acquire("a", "r1")
    assert store.registered() == {"a": str(dirs["a"])}
    with pytest.raises(AdapterInUseError, match="unfinished request"):
        store.unload("a")
    future = store.unload("a", wait=True)
    assert future is not None and not future.done()
    assert store.registered() == {}  # departing: not offered as loaded any more
    assert "a" in store.list()  # but still known until its last request finishes
    with pytest.raises(AdapterError, match="being unloaded"):
        store.acquire("a", "r2")
    store.release("a", "r1")
    assert future.done() and "a" not in store.list() and store.residency().resident == ()


# ------------------------------------------------------------------------------------------- stats


def test_stats_is_a_dataclass_with_a_dict_form(base, dirs):
    store, _ = new_store(base, background=False)
    store.load("a", dirs["a"])
    stats = store.stats()
    assert stats.registered == 1 and stats.loads == 1 and stats.cached == ["a"]
    assert stats.load_ms["n"] == 1 and stats.resident_bytes == stats.cache_bytes > 0
    as_dict = stats.as_dict()
    assert as_dict["cached"] == ["a"] and as_dict["resident_bytes"] == stats.resident_bytes


# ------------------------------------------------------------------------------------ confinement


def test_one_confinement_function_for_store_roots_and_server_paths(base, dirs, tmp_path):
    root = tmp_path / "root"
    (root / "empty").mkdir(parents=True)
    (root / "link").symlink_to(dirs["a"], target_is_directory=True)
    make_adapter(base, root / "ok", seed=5, r=2, target_modules=["q_proj"])
    assert adapter_dir_inside(root, "ok", "ok", "adapter 'ok'") == (root / "ok").resolve()
    assert adapter_dir_inside(root, "missing", "missing", "adapter 'missing'") is None
    with pytest.raises(NotAnAdapterError, match="no adapter_config.json"):
        adapter_dir_inside(root, "empty", "empty", "adapter 'empty'")
    with pytest.raises(AdapterError, match="leaves the adapter root"):
        adapter_dir_inside(root, "link", "link", "adapter 'link'")
    store, _ = new_store(base, roots=(root,))
    assert set(store.list()) == {"ok"}
    with pytest.raises(AdapterError, match="leaves the adapter root"):
        store.source("link")

    from blora.server.adapters import resolve_adapter_path
    from blora.server.errors import InvalidRequestError, NotFoundError

    assert resolve_adapter_path(root, "ok") == (root / "ok").resolve()
    with pytest.raises(InvalidRequestError, match="leaves the adapter root"):
        resolve_adapter_path(root, "link")
    with pytest.raises(InvalidRequestError, match="no adapter_config.json"):
        resolve_adapter_path(root, "empty")
    with pytest.raises(NotFoundError):
        resolve_adapter_path(root, "missing")


def test_lookup_answers_one_name_without_listing_or_recording(base, dirs, tmp_path):
    """``lookup`` is ``list().get(name)`` for one name: registered adapters, then the roots; it records
    nothing (the server calls it per request from the event loop) and offers nothing outside a root."""
    root = tmp_path / "root"
    make_adapter(base, root / "ok", seed=5, r=2, target_modules=["q_proj"])
    (root / "empty").mkdir()
    (root / "link").symlink_to(dirs["a"], target_is_directory=True)
    store, _ = new_store(base, roots=(root,))
    store.register("mine", str(dirs["b"]))
    listed = store.list()
    assert set(listed) == {"mine", "ok"}
    for name in ("mine", "ok", "empty", "link", "nope", "../root", "ok/..", "/etc", ""):
        assert store.lookup(name) == listed.get(name), name
    assert store.registered() == {"mine": str(dirs["b"])}  # the root lookups left no record
