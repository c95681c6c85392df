"""Whatever the pinned maps hold, `dump`, `status` and a restarting agent read it without a
traceback: garbage written straight into the real kernel maps (hypothesis), then decoded by
the same code the operator tools and the writer's recovery use."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmesh_plugin.datapath import inspect, loader, records
from kmesh_plugin.datapath.build import Capacities
from kmesh_plugin.datapath.writer import MapWriter, read_table

pytestmark = pytest.mark.kernel

settings.register_profile("ci", max_examples=30, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("fuzz", max_examples=10_000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
CAPS = Capacities(8, 64)
ARRAYS = (records.MAP_ACTIVE, records.MAP_RECORDS, records.MAP_STATS, records.MAP_CONFIG,
          records.MAP_TRANSLATED, records.MAP_FRONTEND_CACHE)


def entries(name: str) -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    spec = loader.map_specs(CAPS)[name]
    if name in ARRAYS:
        keys = st.integers(0, spec.max_entries - 1).map(records.U32.pack)
    else:
        keys = st.binary(min_size=spec.key_size, max_size=spec.key_size)
    size = spec.value_size
    if name == records.MAP_STATS:
        return st.just([])  # per-CPU: its values only ever add up; covered by the codecs
    if name == records.MAP_FRONTEND_CACHE:
        # Also whole lines (their check right) for any key and sid: a foreign writer's.
        whole = st.builds(records.frontend_line,
                          st.binary(min_size=records.FRONTEND_KEY.size,
                                    max_size=records.FRONTEND_KEY.size),
                          st.integers(0, 2**32 - 1))
        return st.lists(st.tuples(keys, st.one_of(whole, st.binary(min_size=size,
                                                                   max_size=size))),
                        max_size=6)
    return st.lists(st.tuples(keys, st.binary(min_size=size, max_size=size)), max_size=6)


GARBAGE = st.fixed_dictionaries({name: entries(name) for name in loader.map_specs(CAPS)})


@pytest.fixture(scope="module")
def datapath(tmp_path_factory: pytest.TempPathFactory, kernel: None) -> loader.Datapath:
    import secrets

    from kmesh_lab import procs
    from kmesh_plugin.datapath.mounts import cgroup2_root

    pin_dir = Path("/sys/fs/bpf") / f"kmesh-test-{secrets.token_hex(4)}"
    cgroup = cgroup2_root() / f"kmesh-test-{secrets.token_hex(4)}"
    cgroup.mkdir()
    dp = loader.attach(pin_dir, cgroup, CAPS, tmp_path_factory.mktemp("build"))
    try:
        yield dp
    finally:
        dp.close()
        loader.remove(pin_dir)
        procs.remove_cgroup_tree(str(cgroup))


@PROFILE
@given(garbage=GARBAGE)
def test_garbage_in_the_maps_is_read_without_a_traceback(
    datapath: loader.Datapath, garbage: dict[str, list[tuple[bytes, bytes]]]
) -> None:
    for name, items in garbage.items():
        m = datapath[name]
        if name not in ARRAYS:
            for key in list(m.keys()):  # hashes start empty; arrays are overwritten
                m.delete(key)
        for key, value in items:
            with contextlib.suppress(OSError):  # a full hash: what fits is garbage enough
                m.update(key, value)
    table = read_table(datapath)
    view = inspect.read(datapath)
    view.to_json()
    for frontend, published in view.groups.items():
        inspect.group_json(frontend, published, view.stats.get(published.sid, {}))
    # A restarting agent adopts whatever is readable and plans its repairs.
    writer = MapWriter(datapath)
    try:
        assert writer.recover() == len(table)
        # Every cache line a connect would use names what kmesh_frontends holds, at its line.
        cache = datapath[records.MAP_FRONTEND_CACHE]
        for key, value in cache.lookup_batch():
            line = records.read_frontend_line(value)
            if line is None:
                assert value == bytes(len(value))
                continue
            frontend = records.Frontend.unpack(line[0])
            assert frontend.pack() == line[0] and table[frontend].sid == line[1]
            assert records.U32.unpack(key)[0] in \
                records.frontend_candidates(line[0], cache.max_entries)
        # ... and can take every one of them away again: nothing it adopted is unwritable.
        stats = writer.sync({})
        assert stats.removed == len(table) and not stats.left_out
        assert writer.settle(10.0)
        assert read_table(datapath) == {}
        assert list(datapath[records.MAP_FRONTENDS].keys()) == []
        assert list(datapath[records.MAP_SLOTS].keys()) == []
        assert list(datapath[records.MAP_VIPS].keys()) == []
        assert all(v == bytes(len(v)) for _, v in cache.lookup_batch())
    finally:
        writer.close()
