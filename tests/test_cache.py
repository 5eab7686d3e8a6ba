import json
from datetime import UTC, datetime

from exporter.cache import InMemoryCache, TimedStore
from exporter.clock import FakeClock
from tests.records import make_record


def test_records_expire_with_injected_clock():
    clock = FakeClock()
    seen = []
    cache = InMemoryCache(storage_duration_s=120, max_records=1000, clock=clock, consumer=seen.append)
    for i in range(5):
        cache.add_stats(make_record(seq=i + 1, ts=clock.time()))
        clock.advance(30)
    # now = start + 150: the record from +0 is older than 120 s; the one from +30 is exactly 120 s old and stays.
    kept = cache.recent("/test")
    assert [r.seq for r in kept] == [2, 3, 4, 5]
    assert [r.seq for r in seen] == [1, 2, 3, 4, 5]
    clock.advance(1000)
    assert cache.recent("/test") == []


def test_count_bound_and_query_window():
    clock = FakeClock()
    cache = InMemoryCache(storage_duration_s=10_000, max_records=3, clock=clock)
    t0 = clock.time()
    for i in range(6):
        cache.add_stats(make_record(seq=i + 1, ts=t0 + i))
        clock.advance(1)
    assert [r.seq for r in cache.recent("/test")] == [4, 5, 6]
    assert [r.seq for r in cache.recent("/test", count=2)] == [5, 6]
    start = datetime.fromtimestamp(t0 + 4, UTC)
    assert [r.seq for r in cache.recent("/test", start=start)] == [5, 6]
    end = datetime.fromtimestamp(t0 + 4, UTC)
    assert [r.seq for r in cache.recent("/test", end=end)] == [4, 5]
    assert cache.latest("/test").seq == 6
    assert cache.recent("/test", count=0) == []


def test_remove_and_evict_all():
    clock = FakeClock()
    cache = InMemoryCache(storage_duration_s=60, max_records=10, clock=clock)
    cache.add_stats(make_record(name="/a", ts=clock.time()))
    cache.add_stats(make_record(name="/b", ts=clock.time()))
    assert sorted(cache.names()) == ["/a", "/b"]
    cache.remove("/a")
    assert "/a" not in cache and cache.recent("/a") == []
    clock.advance(61)
    cache.evict_all()
    assert cache.recent("/b") == []


def test_out_of_order_record_is_kept_sorted():
    store = TimedStore(max_age_s=1000, max_items=10)
    for seq, ts in ((1, 10.0), (2, 30.0), (3, 20.0)):
        store.add(ts, make_record(seq=seq, ts=ts).json_bytes(), now=30.0)
    assert [json.loads(p)["seq"] for p in store.get()] == [1, 3, 2]


def test_history_round_trips_exactly_and_compactly():
    clock = FakeClock()
    cache = InMemoryCache(storage_duration_s=1000, max_records=1000, clock=clock)
    sent = []
    for i in range(50):
        record = make_record(seq=i + 1, ts=clock.time(), cpu_ns=i * 123_456_789)
        sent.append(record)
        cache.add_stats(record)
        clock.advance(1)
    got = cache.recent("/test")
    assert got == sent
    assert cache.latest("/test") is sent[-1]
    store = cache._stores["/test"]
    packed = sum(len(data) for _, data in store._items)
    raw = sum(len(r.json_bytes()) for r in sent)
    assert packed < raw / 4


def test_latest_expires_with_storage_duration():
    clock = FakeClock()
    cache = InMemoryCache(storage_duration_s=60, max_records=10, clock=clock)
    cache.add_stats(make_record(ts=clock.time()))
    assert cache.latest("/test") is not None
    clock.advance(61)
    assert cache.latest("/test") is None
