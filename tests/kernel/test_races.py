"""Races between the map writer and connect() in the real kernel.

kmesh_frontends is a preallocated hash: the kernel gives a deleted element to the next insert
at once, while a connect() that looked it up may still be reading it. These tests recycle
elements under running connects and count the answers that came from another Service. The
datapath is built with KMESH_TEST_RACE_WINDOW (bpf/kmesh_lb.c): the program spins between the
lookup and reading the element, so the race happens in every run instead of once in a million.

kmesh_frontend_cache is read first, with the same window between the two halves of a line's
copy: the second test rewrites a line under running connects.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from datapath_bed import Bed, answered, ip, tiers

from kmesh_plugin.datapath import records
from kmesh_plugin.datapath.records import MODE_RANDOM, Frontend
from kmesh_plugin.datapath.writer import read_table

pytestmark = pytest.mark.kernel

VIP_A, VIP_B = "198.19.0.10", "198.19.0.11"
FRONT_A = Frontend(ip(VIP_A), 80, socket.IPPROTO_TCP)
FRONT_B = Frontend(ip(VIP_B), 80, socket.IPPROTO_TCP)
# bpf_loop rounds of nothing: tens of microseconds, so each connect overlaps many writer steps.
RACE_WINDOW = 20000


@pytest.fixture
def bed(pin_dir: Path, cgroup: Path, netns: str, build_dir: Path) -> Iterator[Bed]:
    b = Bed(pin_dir, cgroup, netns, build_dir, defines=(f"KMESH_TEST_RACE_WINDOW={RACE_WINDOW}",))
    try:
        yield b
    finally:
        b.close()


def test_a_recycled_frontend_element_never_routes_to_another_service(bed: Bed) -> None:
    a = bed.server("service-a", "198.18.0.1", 8080)
    b = bed.server("service-b", "198.18.0.2", 8080)
    bed.publish({FRONT_A: tiers([a], mode=MODE_RANDOM), FRONT_B: tiers([b], mode=MODE_RANDOM)})
    frontends = bed.dp[records.MAP_FRONTENDS]
    key_a, key_b = FRONT_A.pack(), FRONT_B.pack()
    value_a, value_b = frontends.lookup(key_a), frontends.lookup(key_b)
    assert value_a is not None and value_b is not None
    frontends.delete(key_b)  # B's group stays complete in the maps; only its entry toggles
    # Connects must take the hash: empty every line A may sit in.
    cache = bed.dp[records.MAP_FRONTEND_CACHE]
    for line in records.frontend_candidates(key_a, cache.max_entries):
        cache.update(records.U32.pack(line), bytes(records.FRONTEND_LINE.size))

    stop = threading.Event()
    swaps = 0

    def churn() -> None:
        # Delete A then insert B: the insert takes the element A just freed (the freelist
        # is per CPU and LIFO, and both run here), while connects may still be reading it.
        nonlocal swaps
        os.sched_setaffinity(0, {0})
        while not stop.is_set():
            frontends.delete(key_a)
            frontends.update(key_b, value_b)
            frontends.delete(key_b)
            frontends.update(key_a, value_a)
            swaps += 1

    client = bed.client()
    writer = threading.Thread(target=churn)
    writer.start()
    try:
        started = time.monotonic()
        results = client.get(f"http://{VIP_A}:80/hello", count=3000, timeout=2.0)
    finally:
        stop.set()
        writer.join()
    seconds = time.monotonic() - started
    counts = collections.Counter(answered(results))
    errors = collections.Counter(r["errno"] for r in results if not r["ok"])
    print(f"{len(results)} connects to {VIP_A} in {seconds:.1f} s against {swaps} "
          f"delete/insert swaps: {dict(counts)}, errors {dict(errors)}")
    assert counts["service-b"] == 0, "a connect to A was answered by Service B"
    assert counts["service-a"] > 0  # the race window did not stop translation altogether
    # The others met A's frontend while it was away: refused (its ClusterIP is known) or,
    # if they caught the element mid-recycle, treated as no frontend at all; never B.
    assert set(errors) <= {"ECONNREFUSED", "ENETUNREACH"}, errors


def cache_line(bed: Bed, frontend: Frontend) -> bytes:
    """The line the writer gave ``frontend`` (the first it may sit in, when it came first)."""
    lines = bed.dp[records.MAP_FRONTEND_CACHE].max_entries
    return records.U32.pack(records.frontend_candidates(frontend.pack(), lines)[0])


def test_a_cache_line_rewritten_under_a_connect_never_routes_to_another_service(
        bed: Bed) -> None:
    """A line written from user space is a plain copy: a connect may read half of A's line
    and half of B's. Such a mixture (A's key, B's sid) must fail the check and be looked up
    in kmesh_frontends, not refused (and never sent to B, which the record check ensures)."""
    a = bed.server("service-a", "198.18.0.1", 8080)
    b = bed.server("service-b", "198.18.0.2", 8080)
    bed.publish({FRONT_A: tiers([a], mode=MODE_RANDOM), FRONT_B: tiers([b], mode=MODE_RANDOM)})
    table = {f: p.sid for f, p in read_table(bed.dp).items()}
    cache = bed.dp[records.MAP_FRONTEND_CACHE]
    where = cache_line(bed, FRONT_A)
    line_a = records.frontend_line(FRONT_A.pack(), table[FRONT_A])
    line_b = records.frontend_line(FRONT_B.pack(), table[FRONT_B])
    # B's line in A's place mixes with A's into A's key (the first 16 bytes, which differ)
    # and B's port, protocol, sid and check.
    assert line_a[16:20] == line_b[16:20] and line_a[20:] != line_b[20:]
    assert cache.lookup(where) == line_a

    stop = threading.Event()
    writes = 0

    def churn() -> None:
        nonlocal writes
        while not stop.is_set():
            cache.update(where, line_b)
            cache.update(where, line_a)
            writes += 2

    client = bed.client()
    writer = threading.Thread(target=churn)
    writer.start()
    try:
        results = client.get(f"http://{VIP_A}:80/hello", count=2000, timeout=2.0)
    finally:
        stop.set()
        writer.join()
    counts = collections.Counter(answered(results))
    errors = collections.Counter(r["errno"] for r in results if not r["ok"])
    print(f"{len(results)} connects to {VIP_A} against {writes} line writes: {dict(counts)}, "
          f"errors {dict(errors)}")
    assert writes > len(results)  # the line changed under the connects
    assert counts == {"service-a": len(results)}, (counts, errors)
