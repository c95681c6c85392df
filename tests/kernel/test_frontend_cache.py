"""kmesh_frontend_cache in the real kernel: the program finds a frontend's sid in the cache
line before it asks kmesh_frontends, and the writer keeps every line naming only what
kmesh_frontends holds (bpf/kmesh_lb.h, struct kmesh_frontend_line).

To tell a cache hit from a hash hit, a test takes an entry out of one map behind the writer's
back (as a foreign writer could) and watches which connects still translate.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from datapath_bed import Bed, answered, ip, tiers

from kmesh_plugin.datapath import inspect, records
from kmesh_plugin.datapath.build import Capacities
from kmesh_plugin.datapath.records import MODE_RANDOM, Backend, Frontend
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


def candidates(bed: Bed, frontend: Frontend) -> tuple[int, ...]:
    return records.frontend_candidates(frontend.pack(), lines(bed))


def line_of(bed: Bed, frontend: Frontend, which: int = 0) -> bytes:
    """The key of candidate line ``which`` of ``frontend``, in the order the program tries
    them (0 and 1: its first pair)."""
    return records.U32.pack(candidates(bed, frontend)[which])


def read_line(bed: Bed, frontend: Frontend, which: int = 0) -> bytes | None:
    return bed.dp[records.MAP_FRONTEND_CACHE].lookup(line_of(bed, frontend, which))


def read_lines(bed: Bed, first: int) -> list[bytes | None]:
    """Both lines of the pair that starts at line ``first``."""
    cache = bed.dp[records.MAP_FRONTEND_CACHE]
    return [cache.lookup(records.U32.pack(first + way)) for way in range(records.FRONTEND_WAYS)]


EMPTY = bytes(records.FRONTEND_LINE.size)


def sid_of(bed: Bed, frontend: Frontend) -> int:
    return read_table(bed.dp)[frontend].sid


def clusterips(bed: Bed, want: Callable[[tuple[int, ...]], bool], count: int) -> list[Frontend]:
    """``count`` TCP frontends on port 80 whose candidate lines satisfy ``want``, from
    198.19.1.0 on."""
    base = int(ipaddress.IPv4Address("198.19.1.0"))
    out = []
    for i in range(1 << 20):
        other = Frontend(ipaddress.IPv4Address(base + i), 80, socket.IPPROTO_TCP)
        if want(candidates(bed, other)):
            out.append(other)
            if len(out) == count:
                return out
    raise AssertionError("too few ClusterIPs have such lines")


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


def test_a_holder_moves_to_make_room_and_a_frontend_without_room_waits(bed: Bed) -> None:
    """X may sit in pairs P and Q; S1, S2 and S3 in P only (both halves of their hash name
    it). X and S1 take P's lines; S2 finds them taken, so X moves to Q (its copy first) and S2
    takes X's line; S3 finds P held by two frontends that cannot move, and waits."""
    servers = {name: bed.server(name, f"198.18.0.{i + 1}", 8080)
               for i, name in enumerate(("x", "s1", "s2", "s3"))}
    client = bed.client()
    (s1,) = clusterips(bed, lambda c: len(c) == 2, 1)
    p = candidates(bed, s1)[0]
    first, s2, s3 = clusterips(bed, lambda c: c == (p, p + 1), 3)
    assert first == s1
    (x,) = clusterips(bed, lambda c: len(c) == 4 and c[0] == p, 1)
    q = candidates(bed, x)[2]
    names = {x: "x", s1: "s1", s2: "s2", s3: "s3"}
    for frontend in (x, s1, s2, s3):
        bed.publish({frontend: tiers([servers[names[frontend]]], mode=MODE_RANDOM)})
    sid = {f: sid_of(bed, f) for f in names}
    line = {f: records.frontend_line(f.pack(), sid[f]) for f in names}
    assert read_lines(bed, p) == [line[s2], line[s1]]
    assert read_lines(bed, q) == [line[x], EMPTY]
    assert bed.writer.entries()[records.MAP_FRONTEND_CACHE] == 3

    def answers(frontend: Frontend) -> set[str]:
        return set(answered(client.get(f"http://{frontend.ip}:{frontend.port}/hello",
                                       count=10)))

    # The lines answer: without their kmesh_frontends entries X, S1 and S2 still translate,
    # and S3, which waits, answers from the hash.
    for frontend in (x, s1, s2):
        bed.dp[records.MAP_FRONTENDS].delete(frontend.pack())
    for frontend, name in names.items():
        assert answers(frontend) == {name}
    for frontend in (x, s1, s2):
        bed.dp[records.MAP_FRONTENDS].update(frontend.pack(),
                                             records.FRONTEND.pack({"sid": sid[frontend]}))

    # S2 goes: its line is S3's before S2's kmesh_frontends entry is deleted, and S2 is no
    # Service the moment publish returns (untouched, it has no route here).
    bed.publish({s2: None})
    assert read_lines(bed, p) == [line[s3], line[s1]]
    assert errnos(client.connect(str(s2.ip), 80, count=5)) == {"ENETUNREACH"}
    bed.dp[records.MAP_FRONTENDS].delete(s3.pack())  # S3 now answers from its line
    assert answers(s3) == {"s3"}
    bed.dp[records.MAP_FRONTENDS].update(s3.pack(), records.FRONTEND.pack({"sid": sid[s3]}))

    # Nobody waits: a line that goes is cleared.
    bed.publish({s1: None})
    assert read_lines(bed, p) == [line[s3], EMPTY]
    bed.publish({s3: None, x: None})
    assert read_lines(bed, p) == read_lines(bed, q) == [EMPTY, EMPTY]
    assert bed.writer.entries()[records.MAP_FRONTEND_CACHE] == 0
    assert errnos(client.connect(str(s3.ip), 80, count=5)) == {"ENETUNREACH"}


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


def test_every_frontend_of_a_full_default_capacity_finds_a_line(
        pin_dir: Path, cgroup: Path, netns: str, build_dir: Path) -> None:
    """At the shipped capacity, 16,384 groups (16 ports per ClusterIP, as the bench makes
    them) fill a quarter of the 65,536 lines: with one pair per frontend about 3% found no
    line. With two pairs and moves every one of them has a line the program would use."""
    caps = Capacities(16384, 2 * 16384)
    assert records.frontend_lines(caps.max_services) == 65536
    full = Bed(pin_dir, cgroup, netns, build_dir, capacities=caps)
    try:
        base = int(ipaddress.IPv4Address("10.96.0.0"))
        endpoint = tiers([Backend(ip("198.18.0.1"), 8080)], mode=MODE_RANDOM)
        table = {Frontend(ipaddress.IPv4Address(base + i // 16), 1000 + i % 16,
                          socket.IPPROTO_TCP): endpoint for i in range(caps.max_services)}
        stats = full.writer.sync(table)
        assert stats.added == len(table) and not stats.left_out
        view = inspect.read(full.dp)
        assert view.cached == set(table)
        assert full.writer.entries()[records.MAP_FRONTEND_CACHE] == len(table)
    finally:
        full.close()
