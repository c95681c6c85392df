"""The real datapath in the real kernel: which endpoint answers a connect() to a ClusterIP.

Every test attaches bpf/kmesh_lb.c to a fresh cgroup, runs endpoint servers in a fresh network
namespace and a client process inside both, and asserts *which* server answered (or which errno
the connect got). Nothing is mocked.
"""

from __future__ import annotations

import collections
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from datapath_bed import Bed, answered, ip, tiers

from kmesh_plugin.datapath import records, syscall
from kmesh_plugin.datapath.bpftool import Bpftool
from kmesh_plugin.datapath.build import Capacities
from kmesh_plugin.datapath.records import MODE_FAILOVER, MODE_RANDOM, MODE_STRICT, Frontend
from kmesh_plugin.datapath.writer import read_table
from kmesh_plugin.errors import DatapathError

pytestmark = pytest.mark.kernel

VIP = "198.19.0.10"
VIP6 = "2001:2:0:ff::10"
URL = f"http://{VIP}:80/hello"
FRONT = Frontend(ip(VIP), 80, socket.IPPROTO_TCP)


@pytest.fixture
def bed(pin_dir: Path, cgroup: Path, netns: str, build_dir: Path) -> Iterator[Bed]:
    b = Bed(pin_dir, cgroup, netns, build_dir)
    try:
        yield b
    finally:
        b.close()


def test_failover_uses_the_best_non_empty_tier(bed: Bed) -> None:
    near = bed.server("near", "198.18.0.1", 8080)
    mid = bed.server("mid", "198.18.0.2", 8080)
    far = bed.server("far", "198.18.0.3", 8080)
    client = bed.client()

    bed.publish({FRONT: tiers([near], [mid], [far], mode=MODE_FAILOVER)})
    assert set(answered(client.get(URL, count=20))) == {"near"}

    bed.publish({FRONT: tiers([], [mid], [far], mode=MODE_FAILOVER)})
    assert set(answered(client.get(URL, count=20))) == {"mid"}

    bed.publish({FRONT: tiers([], [], [far], mode=MODE_FAILOVER)})
    assert set(answered(client.get(URL, count=20))) == {"far"}


def test_spreads_uniformly_inside_a_tier(bed: Bed) -> None:
    a = bed.server("a", "198.18.0.1", 8080)
    b = bed.server("b", "198.18.0.2", 8080)
    c = bed.server("c", "198.18.0.3", 8080)
    client = bed.client()
    bed.publish({FRONT: tiers([a, b, c], mode=MODE_RANDOM)})
    counts = collections.Counter(answered(client.get(URL, count=300)))
    assert set(counts) == {"a", "b", "c"}
    # Uniform: each of 3 gets 100 +- a generous 5 sigma (sigma ~ 8.2).
    assert all(59 <= n <= 141 for n in counts.values()), counts


def test_spreads_uniformly_over_a_tier_larger_than_the_record_carries(bed: Bed) -> None:
    """A record carries the first INLINE_SLOTS endpoints of the picked tier; the rest are
    picked through kmesh_slots, with the same odds."""
    names = [f"ep{i}" for i in range(records.INLINE_SLOTS + 2)]
    servers = [bed.server(n, f"198.18.0.{i + 1}", 8080) for i, n in enumerate(names)]
    client = bed.client()
    bed.publish({FRONT: tiers(servers, mode=MODE_RANDOM)})
    counts = collections.Counter(answered(client.get(URL, count=600)))
    assert set(counts) == set(names)
    # Each of 6 gets 100 +- 5 sigma (sigma ~ 9.1).
    assert all(54 <= n <= 146 for n in counts.values()), counts


def test_a_record_whose_copies_disagree_with_its_slots_is_rewritten(bed: Bed) -> None:
    """The program picks from the record's copies of the tier: a record whose copies are not
    its slots (a foreign writer, garbage) is taken for an incomplete set when the writer
    recovers, and rewritten by the next publish."""
    a = bed.server("a", "198.18.0.1", 8080)
    b = bed.server("b", "198.18.0.2", 8080)
    stray = bed.server("stray", "198.18.0.3", 8080)
    client = bed.client()
    table = {FRONT: tiers([a, b], mode=MODE_RANDOM)}
    bed.publish(table)
    published = read_table(bed.dp)[FRONT]
    key = records.record_index(published.sid, published.set)
    rec = records.RECORD.unpack(bed.dp[records.MAP_RECORDS].lookup(key))
    size = records.ENDPOINT.size
    bed.dp[records.MAP_RECORDS].update(key, records.RECORD.pack(
        {**rec, "inline_slots": stray.pack() + rec["inline_slots"][size:]}))
    assert "stray" in answered(client.get(URL, count=60))  # the copies are what is read
    bed.reattach()  # a restarting agent: recover() reads the maps
    assert read_table(bed.dp)[FRONT].backends is None
    bed.publish(table)
    assert set(answered(client.get(URL, count=60))) == {"a", "b"}


def test_strict_refuses_at_once_when_tier_0_is_empty(bed: Bed) -> None:
    other = bed.server("other-node", "198.18.0.2", 8080)
    client = bed.client()
    bed.publish({FRONT: tiers([], mode=MODE_STRICT)})
    results = client.get(URL, count=10)
    assert [r["errno"] for r in results] == ["ECONNREFUSED"] * 10
    assert max(r["connect_ms"] for r in results) < 100
    # Strict never looks past tier 0, even if the core wrote more tiers.
    bed.publish({FRONT: tiers([], [other], mode=MODE_STRICT)})
    assert {r["errno"] for r in client.get(URL, count=10)} == {"ECONNREFUSED"}


def test_a_frontend_without_endpoints_refuses_and_never_leaks(bed: Bed) -> None:
    client = bed.client()
    bed.publish({FRONT: tiers([], [], mode=MODE_FAILOVER)})
    assert {r["errno"] for r in client.connect(VIP, 80, count=5)} == {"ECONNREFUSED"}
    # Not a frontend: passes untouched, and the namespace has no route for it.
    assert {r["errno"] for r in client.connect("198.19.0.99", 80)} == {"ENETUNREACH"}
    # A ClusterIP on a port it does not serve is refused too: it must not leave untranslated.
    assert {r["errno"] for r in client.connect(VIP, 81)} == {"ECONNREFUSED"}
    assert {r["errno"] for r in client.connect(VIP, 80, proto="udp")} == {"ECONNREFUSED"}


def test_connected_udp_is_translated(bed: Bed) -> None:
    ep = bed.server("udp", "198.18.0.7", 5353)  # a UDP connect needs no listener
    client = bed.client()
    front = Frontend(ip(VIP), 53, socket.IPPROTO_UDP)
    bed.publish({front: tiers([ep], mode=MODE_FAILOVER)})
    results = client.connect(VIP, 53, proto="udp", count=3)
    assert [r["endpoint"] for r in results] == ["198.18.0.7:5353"] * 3
    # No TCP frontend on that ClusterIP and port: refused, not leaked.
    assert client.connect(VIP, 53, proto="tcp")[0]["errno"] == "ECONNREFUSED"
    # Once the Service is gone, its address is nobody's: untouched again.
    bed.publish({front: None})
    assert client.connect(VIP, 53, proto="udp")[0]["errno"] == "ENETUNREACH"


def test_ipv6_and_v4_mapped(bed: Bed) -> None:
    v6 = bed.server("six", "2001:2::1", 8080)
    v4 = bed.server("four", "198.18.0.4", 8080)
    client = bed.client()
    bed.publish({
        Frontend(ip(VIP6), 80, socket.IPPROTO_TCP): tiers([v6], mode=MODE_FAILOVER),
        FRONT: tiers([v4], mode=MODE_FAILOVER),
    })
    assert set(answered(client.get(f"http://[{VIP6}]:80/hello", count=5))) == {"six"}
    # An IPv6 socket connecting to the v4-mapped ClusterIP reaches the IPv4 endpoint.
    mapped = client.connect(f"::ffff:{VIP}", 80, count=3)
    assert [r["endpoint"] for r in mapped] == ["[::ffff:198.18.0.4]:8080"] * 3


def test_per_cpu_counters_count_hits_per_tier_and_refusals(bed: Bed) -> None:
    near = bed.server("near", "198.18.0.1", 8080)
    far = bed.server("far", "198.18.0.3", 8080)
    client = bed.client()
    bed.publish({FRONT: tiers([near], [far], mode=MODE_FAILOVER)})
    client.connect(VIP, 80, count=7)
    bed.publish({FRONT: tiers([], [far], mode=MODE_FAILOVER)})
    client.connect(VIP, 80, count=5)
    bed.publish({FRONT: tiers([], mode=MODE_STRICT)})
    client.connect(VIP, 80, count=3)

    sid = bed.writer.published[FRONT].sid
    per_cpu = [records.STATS.unpack(v) for v in
               bed.dp[records.MAP_STATS].lookup_percpu(records.U32.pack(sid)) or []]
    hits = [sum(v["hits"][t] for v in per_cpu) for t in range(records.MAX_TIERS)]
    assert hits == [7, 5, 0, 0, 0, 0, 0, 0]
    assert sum(v["refused"] for v in per_cpu) == 3
    # A new group on a recycled sid starts from zero.
    bed.publish({FRONT: None})
    bed.writer.settle()
    other = Frontend(ip("198.19.0.77"), 80)
    bed.publish({other: tiers([near], mode=MODE_FAILOVER)})
    assert bed.writer.published[other].sid == sid
    fresh = bed.dp[records.MAP_STATS].lookup_percpu(records.U32.pack(sid)) or []
    assert all(records.STATS.unpack(v) == {"hits": (0,) * 8, "refused": 0} for v in fresh)


def test_update_returns_only_after_the_new_set_is_live(bed: Bed) -> None:
    """After publish() returns, the next connect must see the new set: alternate 100 times."""
    one = bed.server("one", "198.18.0.1", 8080)
    two = bed.server("two", "198.18.0.2", 8080)
    client = bed.client()
    for i in range(100):
        want, ep = ("one", one) if i % 2 == 0 else ("two", two)
        bed.publish({FRONT: tiers([ep], mode=MODE_FAILOVER)})
        assert client.connect(VIP, 80)[0]["endpoint"] == f"{ep.ip}:8080", f"round {i}: {want}"


def test_connects_racing_updates_never_see_a_hole(bed: Bed) -> None:
    """A client connects in a tight loop while sets flip between shapes: no failure at all,
    and only endpoints of the set current at some point answer."""
    eps = [bed.server(f"e{i}", f"198.18.0.{i}", 8080) for i in range(1, 6)]
    client = bed.client()
    shapes = [
        tiers(eps[0:1], eps[1:3], mode=MODE_FAILOVER),
        tiers([], eps[2:5], mode=MODE_FAILOVER),
        tiers(eps[3:5], mode=MODE_RANDOM),
        tiers(eps[0:5], mode=MODE_FAILOVER),
    ]
    bed.publish({FRONT: shapes[0]})
    client.send({"op": "connect", "host": VIP, "port": 80, "count": 3000, "timeout": 2.0})
    flips = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and flips < 400:
        bed.publish({FRONT: shapes[flips % len(shapes)]})
        flips += 1
    reply = client.receive()
    errors = collections.Counter(r["errno"] for r in reply["results"] if not r["ok"])
    assert not errors, errors
    allowed = {f"{e.ip}:8080" for e in eps}
    assert {r["endpoint"] for r in reply["results"]} <= allowed
    assert flips >= 50


def test_reload_swaps_programs_in_place_and_keeps_state(bed: Bed) -> None:
    ep = bed.server("kept", "198.18.0.1", 8080)
    client = bed.client()
    bed.publish({FRONT: tiers([ep], mode=MODE_FAILOVER)})
    tool = Bpftool()
    links_before = {n: tool.link_show(bed.dp.pins.link(n)) for n in ("kmesh_connect4",)}
    table_before = read_table(bed.dp)

    client.send({"op": "connect", "host": VIP, "port": 80, "count": 2000, "timeout": 2.0})
    bed.reattach()
    reply = client.receive()

    assert all(r["ok"] for r in reply["results"]), [r for r in reply["results"] if not r["ok"]][:3]
    links_after = {n: tool.link_show(bed.dp.pins.link(n)) for n in ("kmesh_connect4",)}
    assert links_after["kmesh_connect4"]["id"] == links_before["kmesh_connect4"]["id"]
    assert links_after["kmesh_connect4"]["prog_id"] != links_before["kmesh_connect4"]["prog_id"]
    assert read_table(bed.dp) == table_before
    assert any("BPF_LINK_UPDATE" in e for e in bed.dp.events)


def test_capacity_errors_change_nothing(bed: Bed) -> None:
    ep = bed.server("x", "198.18.0.1", 8080)
    bed.publish({FRONT: tiers([ep], mode=MODE_FAILOVER)})
    before = read_table(bed.dp)
    huge = tiers([records.Backend(ip(f"198.18.{i // 250}.{i % 250 + 1}"), 80)
                  for i in range(bed.capacities.max_endpoints)], mode=MODE_FAILOVER)
    other = Frontend(ip("198.19.0.11"), 80, socket.IPPROTO_TCP)
    # A change that cannot fit is left out, with its reason; one that fits still lands.
    stats = bed.writer.publish({FRONT: huge, other: tiers([ep], mode=MODE_FAILOVER)})
    assert set(stats.left_out) == {FRONT}
    assert stats.left_out[FRONT].reason == "max_endpoints" and stats.left_out[FRONT].stale
    assert "datapath.max_endpoints=1024" in stats.left_out[FRONT].detail
    assert stats.added == 1
    bed.writer.publish({other: None})
    bed.writer.settle()
    assert read_table(bed.dp) == before
    assert bed.dp[records.MAP_SLOTS].keys() is not None
    assert sum(1 for _ in bed.dp[records.MAP_SLOTS].keys()) == 1


def test_maps_decode_as_bpftool_formats_them(bed: Bed) -> None:
    """The Python codecs agree with the kernel's BTF view of the same entries."""
    ep = bed.server("x", "198.18.0.9", 8080)
    bed.publish({FRONT: tiers([ep], [], mode=MODE_FAILOVER)})
    bed.writer.settle()
    tool = Bpftool()
    frontends = tool.map_dump(bed.dp.pins.map(records.MAP_FRONTENDS))
    assert len(frontends) == 1
    key = frontends[0]["formatted"]["key"]
    assert bytes(int(b, 0) if isinstance(b, str) else b for b in key["addr"]) == (
        records.encode_addr(ip(VIP))
    )
    assert socket.ntohs(key["port"]) == 80 and key["protocol"] == socket.IPPROTO_TCP
    sid = frontends[0]["formatted"]["value"]["sid"]
    slots = tool.map_dump(bed.dp.pins.map(records.MAP_SLOTS))
    assert [s["formatted"]["key"]["sid"] for s in slots] == [sid]
    value = slots[0]["formatted"]["value"]
    assert socket.ntohs(value["port"]) == 8080
    assert bytes(int(b, 0) if isinstance(b, str) else b for b in value["addr"])[12:] == (
        ip("198.18.0.9").packed
    )
    rec = [r for r in tool.map_dump(bed.dp.pins.map(records.MAP_RECORDS))
           if r["formatted"]["value"]["ntiers"]]
    assert [(r["formatted"]["value"]["mode"], r["formatted"]["value"]["count"][:2]) for r in rec] \
        == [(MODE_FAILOVER, [1, 0])]


def test_pinned_maps_of_other_capacities_are_refused(
    pin_dir: Path, cgroup: Path, build_dir: Path
) -> None:
    from kmesh_plugin.datapath import loader

    dp = loader.attach(pin_dir, cgroup, Capacities(64, 1024), build_dir)
    dp.close()
    with pytest.raises(DatapathError, match="max_entries"):
        loader.attach(pin_dir, cgroup, Capacities(64, 2048), build_dir)
    # The running datapath is untouched by the refused attach.
    links = list((pin_dir / "links").iterdir())
    assert len(links) == len(loader.PROGRAMS) == 9
    for link in links:
        fd = syscall.obj_get(link)
        try:
            assert syscall.link_info(fd).cgroup_id == cgroup.stat().st_ino
        finally:
            import os

            os.close(fd)


def test_a_link_of_another_attach_type_is_refused(
    pin_dir: Path, cgroup: Path, build_dir: Path
) -> None:
    import os

    from kmesh_plugin.datapath import loader

    dp = loader.attach(pin_dir, cgroup, Capacities(64, 1024), build_dir)
    dp.close()
    links = pin_dir / "links"
    # Swap the two link pins: each now names a link of the other hook.
    os.rename(links / "kmesh_connect4", links / "tmp")
    os.rename(links / "kmesh_connect6", links / "kmesh_connect4")
    os.rename(links / "tmp", links / "kmesh_connect6")
    before = {p.name: _link_prog(p) for p in links.iterdir()}
    with pytest.raises(DatapathError, match="attach type BPF_CGROUP_INET6_CONNECT"):
        loader.attach(pin_dir, cgroup, Capacities(64, 1024), build_dir)
    # Nothing was swapped, and the refused attempt left no program pins behind.
    assert {p.name: _link_prog(p) for p in links.iterdir()} == before
    assert sorted(p.name for p in pin_dir.iterdir()) == ["links", "maps", "progs"]


def _link_prog(path: Path) -> int:
    import os

    fd = syscall.obj_get(path)
    try:
        return syscall.link_info(fd).prog_id
    finally:
        os.close(fd)


def test_counters_lose_no_connect_when_tasks_share_a_cpu(bed: Bed) -> None:
    # Every client on CPU 0: the kernel may preempt one program run by another task's on
    # that CPU (PREEMPT_RCU); the per-CPU counters must still count every connect.
    import os
    import threading

    server = bed.server("counted", "198.18.0.1", 8080)
    bed.publish({Frontend(ip(VIP), 80, socket.IPPROTO_UDP): tiers([server], mode=MODE_RANDOM)})
    clients = [bed.client() for _ in range(4)]
    for c in clients:
        os.sched_setaffinity(c.proc.pid, {0})
    per_client = 5000
    replies: list[list[dict[str, object]]] = []

    def run(c: object) -> None:
        replies.append(c.connect(VIP, 80, proto="udp", count=per_client))  # type: ignore[attr-defined]

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r["ok"] for results in replies for r in results)
    sid = bed.writer.published[Frontend(ip(VIP), 80, socket.IPPROTO_UDP)].sid
    per_cpu = [records.STATS.unpack(v) for v in
               bed.dp[records.MAP_STATS].lookup_percpu(records.U32.pack(sid)) or []]
    counted = sum(v["hits"][0] for v in per_cpu)
    print(f"{len(clients)} clients on one CPU, {len(clients) * per_client} UDP connects, "
          f"{counted} counted")
    assert counted == len(clients) * per_client
