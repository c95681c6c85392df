"""kmesh_frontend_cache in the real kernel: the program finds a frontend's sid in the cache
line before it asks kmesh_frontends, and the writer keeps every line naming only what
kmesh_frontends holds (bpf/kmesh_lb.h, struct kmesh_frontend_line).

To tell a cache hit from a hash hit, a test takes an entry out of one map behind the writer's
back (as a foreign writer could) and watches which connects still translate.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from datapath_bed import Bed, answered, ip, tiers

from kmesh_plugin.datapath import records
from kmesh_plugin.datapath.records import MODE_RANDOM, Frontend
from kmesh_plugin.datapath.writer import read_table

pytestmark = pytest.mark.kernel

VIP_A = "198.19.0.10"
FRONT_A = Frontend(ip(VIP_A), 80, socket.IPPROTO_TCP)


@pytest.fixture
def bed(pin_dir: Path, cgroup: Path, netns: str, build_dir: Path) -> Iterator[Bed]:
    b = Bed(pin_dir, cgroup, netns, build_dir)
    try:
        yield b
    finally:
        b.close()


def lines(bed: Bed) -> int:
    return bed.dp[records.MAP_FRONTEND_CACHE].max_entries


def line_of(bed: Bed, frontend: Frontend, way: int = 0) -> bytes:
    """Line ``way`` of the pair ``frontend`` may sit in."""
    return records.U32.pack(records.frontend_pair(frontend.pack(), lines(bed)) + way)


def read_line(bed: Bed, frontend: Frontend, way: int = 0) -> bytes | None:
    return bed.dp[records.MAP_FRONTEND_CACHE].lookup(line_of(bed, frontend, way))


EMPTY = bytes(records.FRONTEND_LINE.size)


def sid_of(bed: Bed, frontend: Frontend) -> int:
    return read_table(bed.dp)[frontend].sid


def sharing_a_pair(bed: Bed, frontend: Frontend, count: int) -> list[Frontend]:
    """``count`` other ClusterIPs on the same port whose cache pair is ``frontend``'s."""
    want = line_of(bed, frontend)
    base = int(ipaddress.IPv4Address("198.19.1.0"))
    out = []
    for i in range(64 * lines(bed)):  # a pair is hit once in lines / 2 tries on average
        other = Frontend(ipaddress.IPv4Address(base + i), frontend.port, frontend.protocol)
        if line_of(bed, other) == want:
            out.append(other)
            if len(out) == count:
                return out
    raise AssertionError("too few ClusterIPs share the pair")  # odds about e^-100


def errnos(results: list[dict[str, object]]) -> set[object]:
    return {r["errno"] for r in results}


def test_the_line_the_writer_writes_is_the_one_the_program_reads(bed: Bed) -> None:
    a = bed.server("a", "198.18.0.1", 8080)
    client = bed.client()
    bed.publish({FRONT_A: tiers([a], mode=MODE_RANDOM)})
    assert read_line(bed, FRONT_A) == records.frontend_line(FRONT_A.pack(), sid_of(bed, FRONT_A))
    assert bed.writer.entries()[records.MAP_FRONTEND_CACHE] == 1

    # Without its kmesh_frontends entry the frontend still translates: the line answered.
    bed.dp[records.MAP_FRONTENDS].delete(FRONT_A.pack())
    assert set(answered(client.get(f"http://{VIP_A}:80/hello", count=20))) == {"a"}
    # Without the line as well, nothing does (the ClusterIP is known: refused).
    bed.dp[records.MAP_FRONTEND_CACHE].update(line_of(bed, FRONT_A), EMPTY)
    assert errnos(client.connect(VIP_A, 80, count=5)) == {"ECONNREFUSED"}
    # A restarting agent rewrites the cache from kmesh_frontends: no line for what it lacks.
    bed.reattach()
    assert read_line(bed, FRONT_A) == EMPTY


def test_a_third_frontend_on_a_pair_waits_for_a_line(bed: Bed) -> None:
    a = bed.server("a", "198.18.0.1", 8080)
    b = bed.server("b", "198.18.0.2", 8080)
    c = bed.server("c", "198.18.0.3", 8080)
    client = bed.client()
    front_b, front_c = sharing_a_pair(bed, FRONT_A, 2)
    urls = {name: f"http://{f.ip}:80/hello" for name, f in
            (("a", FRONT_A), ("b", front_b), ("c", front_c))}
    for frontend, server in ((FRONT_A, a), (front_b, b), (front_c, c)):
        bed.publish({frontend: tiers([server], mode=MODE_RANDOM)})
    sid = {f: sid_of(bed, f) for f in (FRONT_A, front_b, front_c)}
    line = {f: records.frontend_line(f.pack(), sid[f]) for f in sid}
    # The first two hold the pair's lines; the third is found by the hash.
    assert [read_line(bed, FRONT_A, 0), read_line(bed, FRONT_A, 1)] == \
        [line[FRONT_A], line[front_b]]
    for name, url in urls.items():
        assert set(answered(client.get(url, count=10))) == {name}
    assert bed.writer.entries()[records.MAP_FRONTEND_CACHE] == 2

    # A goes: its line is C's before A's kmesh_frontends entry is deleted, and A is no
    # Service the moment publish returns (untouched, it has no route here).
    bed.publish({FRONT_A: None})
    assert read_line(bed, FRONT_A, 0) == line[front_c]
    assert errnos(client.connect(VIP_A, 80, count=5)) == {"ENETUNREACH"}
    bed.dp[records.MAP_FRONTENDS].delete(front_c.pack())  # C now answers from its line
    assert set(answered(client.get(urls["c"], count=10))) == {"c"}
    bed.dp[records.MAP_FRONTENDS].update(front_c.pack(),
                                         records.FRONTEND.pack({"sid": sid[front_c]}))

    # Nobody waits: a line that goes is cleared.
    bed.publish({front_b: None})
    assert [read_line(bed, FRONT_A, 0), read_line(bed, FRONT_A, 1)] == [line[front_c], EMPTY]
    bed.publish({front_c: None})
    assert [read_line(bed, FRONT_A, 0), read_line(bed, FRONT_A, 1)] == [EMPTY, EMPTY]
    assert bed.writer.entries()[records.MAP_FRONTEND_CACHE] == 0
    assert errnos(client.connect(str(front_c.ip), 80, count=5)) == {"ENETUNREACH"}


def test_a_line_torn_or_naming_another_sid_never_routes_to_another_service(bed: Bed) -> None:
    a = bed.server("a", "198.18.0.1", 8080)
    b = bed.server("b", "198.18.0.2", 8080)
    client = bed.client()
    front_b = Frontend(ip("198.19.0.11"), 80, socket.IPPROTO_TCP)
    bed.publish({FRONT_A: tiers([a], mode=MODE_RANDOM), front_b: tiers([b], mode=MODE_RANDOM)})
    cache = bed.dp[records.MAP_FRONTEND_CACHE]
    sid_b = sid_of(bed, front_b)

    # Half of another write: A's key with B's sid under A's check. The check fails, the line
    # is a miss, and kmesh_frontends answers.
    good = records.frontend_line(FRONT_A.pack(), sid_of(bed, FRONT_A))
    torn = good[:20] + records.U32.pack(sid_b) + good[24:]
    cache.update(line_of(bed, FRONT_A), torn)
    assert set(answered(client.get(f"http://{VIP_A}:80/hello", count=20))) == {"a"}

    # A whole line that names A with B's sid (only a foreign writer makes one): B's record
    # names B, so the connect finds no set of A's and is refused; it never reaches B.
    cache.update(line_of(bed, FRONT_A), records.frontend_line(FRONT_A.pack(), sid_b))
    assert errnos(client.connect(VIP_A, 80, count=10)) == {"ECONNREFUSED"}
    bed.reattach()  # and recovery puts the line right
    assert cache is not bed.dp[records.MAP_FRONTEND_CACHE]
    assert read_line(bed, FRONT_A) == good
    assert set(answered(client.get(f"http://{VIP_A}:80/hello", count=20))) == {"a"}
