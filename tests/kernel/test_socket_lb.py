"""The socket load balancer beyond connect(): unconnected UDP (sendmsg/recvmsg), getpeername,
and sessionAffinity ClientIP, in the real kernel.

Endpoints are UDP echo servers (tests/kernel/socket_peer.py) in a test network namespace that
answer with their name; the client is a process in the namespace and the attached cgroup that
keeps sockets open across commands. Every test asserts which endpoint answered and which address
the application saw.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from datapath_bed import Bed, ip, tiers

from kmesh_lab import netns, procs
from kmesh_plugin.datapath import inspect, records
from kmesh_plugin.datapath.build import Capacities
from kmesh_plugin.datapath.records import MODE_FAILOVER, MODE_STRICT, Backend, Frontend

pytestmark = pytest.mark.kernel

PEER = [sys.executable, str(Path(__file__).with_name("socket_peer.py"))]
VIP = "198.19.0.10"
VIP6 = "2001:2:0:ff::10"
DNS = Frontend(ip(VIP), 53, records.PROTOCOLS["UDP"])
DNS6 = Frontend(ip(VIP6), 53, records.PROTOCOLS["UDP"])
WEB = Frontend(ip(VIP), 80, records.PROTOCOLS["TCP"])


class Peer:
    """A socket_peer.py process: raw socket calls, one JSON line each way."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.reader = procs.LineReader(proc.stdout)  # type: ignore[arg-type]
        self.reader.expect("ready", 20.0)

    def __call__(self, op: str, **args: Any) -> dict[str, Any]:
        import json

        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        self.proc.stdin.flush()
        return json.loads(self.reader.readline(30.0))

    def socket(self, family: int = 4, kind: str = "udp") -> int:
        return int(self("socket", family=family, type=kind)["id"])

    def ask(self, host: str, port: int = 53, count: int = 1, **args: Any) -> list[Any]:
        family = 6 if ":" in host else 4
        return self("ask", family=family, host=host, port=port, count=count, **args)["replies"]


class Beds:
    """The Bed (datapath, cgroup, namespace) plus UDP echo servers and socket peers."""

    def __init__(self, bed: Bed) -> None:
        self.bed = bed
        bed.publish = self.publish  # type: ignore[method-assign]
        self.servers: dict[str, subprocess.Popen[bytes]] = {}
        # Every 198.18.0.0/16 address is local in the namespace: endpoints without a server
        # still accept a UDP connect (the capacity tests do the same).
        subprocess.run(["ip", "-n", bed.netns, "route", "add", "local", "198.18.0.0/16", "dev",
                        "lo"], check=True)

    def udp_server(self, name: str, address: str, port: int = 5353) -> Backend:
        if ":" in address:
            self.bed.address(address)
        proc = procs.spawn([*PEER, "serve", name, address, str(port)],
                           netns=self.bed.netns_path, cgroup=None, stdin=subprocess.PIPE)
        self.bed.processes.append(proc)
        procs.LineReader(proc.stdout).expect("ready", 20.0)  # type: ignore[arg-type]
        self.servers[name] = proc
        return Backend(ip(address), port)

    def publish(self, table: dict[Frontend, records.BackendSet | None]) -> None:
        """Publish, and insist that all of it went in (a left-out set would test nothing)."""
        stats = self.bed.writer.publish(table)
        assert not stats.left_out, stats.left_out

    def release(self, name: str) -> None:
        """Let a server answer the "hold" datagram it is sitting on."""
        proc = self.servers[name]
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()

    def peer(self, *, netns: str | None = None) -> Peer:
        proc = procs.spawn([*PEER], netns=netns or self.bed.netns_path,
                           cgroup=str(self.bed.cgroup), stdin=subprocess.PIPE)
        self.bed.processes.append(proc)
        return Peer(proc)


@pytest.fixture
def beds(pin_dir: Path, cgroup: Path, netns: str, build_dir: Path) -> Iterator[Beds]:
    # Room for two sets of the 2,000-endpoint Service of the affinity tests.
    b = Bed(pin_dir, cgroup, netns, build_dir, capacities=Capacities(64, 8192))
    try:
        yield Beds(b)
    finally:
        b.close()


def names(replies: list[dict[str, Any]]) -> list[str | None]:
    return [r["data"].split(":", 1)[0] if "data" in r else r.get("errno") for r in replies]


# -- unconnected UDP ---------------------------------------------------------------------------


def test_unconnected_udp_reaches_the_best_tier_and_replies_come_from_the_cluster_ip(
    beds: Beds,
) -> None:
    near = beds.udp_server("near", "198.18.0.1")
    far = beds.udp_server("far", "198.18.0.3")
    client = beds.peer()
    beds.bed.publish({DNS: tiers([near], [far], mode=MODE_FAILOVER)})
    replies = client.ask(VIP, count=20)
    assert names(replies) == ["near"] * 20
    # recvfrom() shows the address the query went to, as a resolver checks it.
    assert {r["source"] for r in replies} == {f"{VIP}:53"}

    beds.bed.publish({DNS: tiers([], [far], mode=MODE_FAILOVER)})
    replies = client.ask(VIP, count=5)
    assert names(replies) == ["far"] * 5 and {r["source"] for r in replies} == {f"{VIP}:53"}

    # Sent straight to the endpoint, nothing is rewritten either way.
    direct = client.ask("198.18.0.3", 5353)
    assert names(direct) == ["far"] and direct[0]["source"] == "198.18.0.3:5353"


def test_one_socket_sends_to_two_services_and_each_reply_shows_its_own(beds: Beds) -> None:
    a = beds.udp_server("a", "198.18.0.1")
    b = beds.udp_server("b", "198.18.0.2")
    other = Frontend(ip("198.19.0.11"), 5000, records.PROTOCOLS["UDP"])
    beds.bed.publish({DNS: tiers([a], mode=MODE_FAILOVER), other: tiers([b], mode=MODE_FAILOVER)})
    client = beds.peer()
    sock = client.socket()
    for _ in range(3):
        assert client("sendto", id=sock, host=VIP, port=53, data="x")["ok"]
        assert client("sendto", id=sock, host="198.19.0.11", port=5000, data="y")["ok"]
        got = {client("recvfrom", id=sock)["source"] for _ in range(2)}
        assert got == {f"{VIP}:53", "198.19.0.11:5000"}


def test_ipv6_and_v4_mapped_datagrams(beds: Beds) -> None:
    six = beds.udp_server("six", "2001:2::1")
    four = beds.udp_server("four", "198.18.0.4")
    beds.bed.publish({DNS6: tiers([six], mode=MODE_FAILOVER),
                      DNS: tiers([four], mode=MODE_FAILOVER)})
    client = beds.peer()
    replies = client.ask(VIP6, count=3)
    assert names(replies) == ["six"] * 3 and {r["source"] for r in replies} == {f"[{VIP6}]:53"}
    # An IPv6 socket sending to the v4-mapped ClusterIP reaches the IPv4 endpoint, and sees
    # the reply come from the v4-mapped ClusterIP.
    mapped = client.ask(f"::ffff:{VIP}", count=3)
    assert names(mapped) == ["four"] * 3
    assert {r["source"] for r in mapped} == {f"[::ffff:{VIP}]:53"}


def test_a_datagram_to_a_service_without_endpoints_fails_with_econnrefused(beds: Beds) -> None:
    client = beds.peer()
    beds.bed.publish({DNS: tiers([], mode=MODE_STRICT)})
    assert names(client.ask(VIP, count=3)) == ["ECONNREFUSED"] * 3
    # A port the ClusterIP does not serve is refused too, never sent to the ClusterIP.
    assert names(client.ask(VIP, 54)) == ["ECONNREFUSED"]
    # Not a ClusterIP: untouched, and nothing routes it.
    assert names(client.ask("198.19.0.99", 53)) == ["ENETUNREACH"]


def test_two_sockets_never_see_each_others_translations(beds: Beds) -> None:
    a = beds.udp_server("a", "198.18.0.1")
    beds.bed.publish({DNS: tiers([a], mode=MODE_FAILOVER)})
    client = beds.peer()
    asked, plain = client.socket(), client.socket()
    assert client("sendto", id=asked, host=VIP, port=53, data="x")["ok"]
    assert client("recvfrom", id=asked)["source"] == f"{VIP}:53"
    # Another socket of the same process talks to the endpoint itself: its replies show the
    # endpoint, although the endpoint is also behind the Service for the first socket.
    assert client("sendto", id=plain, host="198.18.0.1", port=5353, data="y")["ok"]
    assert client("recvfrom", id=plain)["source"] == "198.18.0.1:5353"
    assert client("sendto", id=asked, host=VIP, port=53, data="z")["ok"]
    assert client("recvfrom", id=asked)["source"] == f"{VIP}:53"
    # One kmesh_reverse entry, of the first socket.
    assert len(list(beds.bed.dp[records.MAP_REVERSE].keys())) == 1


def test_a_reply_after_a_datapath_restart_still_shows_the_cluster_ip(beds: Beds) -> None:
    a = beds.udp_server("a", "198.18.0.1")
    beds.bed.publish({DNS: tiers([a], mode=MODE_FAILOVER)})
    client = beds.peer()
    sock = client.socket()
    assert client("sendto", id=sock, host=VIP, port=53, data="hold")["ok"]
    beds.bed.reattach()  # new programs over the pinned maps, links swapped
    beds.release("a")
    reply = client("recvfrom", id=sock, timeout=5.0)
    assert reply == {"ok": True, "data": "a:hold", "source": f"{VIP}:53"}


# -- getpeername and connected sockets ----------------------------------------------------------


def test_getpeername_shows_the_cluster_ip_of_a_translated_socket(beds: Beds) -> None:
    web = beds.bed.server("web", "198.18.0.5", 8080)
    dns = beds.udp_server("dns", "198.18.0.6")
    beds.bed.publish({WEB: tiers([web], mode=MODE_FAILOVER), DNS: tiers([dns], mode=MODE_FAILOVER)})
    client = beds.peer()
    tcp = client.socket(kind="tcp")
    assert client("connect", id=tcp, host=VIP, port=80)["ok"]
    assert client("getpeername", id=tcp)["peer"] == f"{VIP}:80"
    assert client("endpoint", id=tcp)["endpoint"] == "198.18.0.5:8080"

    # Connected UDP (what glibc's resolver does): getpeername and the replies' source.
    udp = client.socket()
    assert client("connect", id=udp, host=VIP, port=53)["ok"]
    assert client("getpeername", id=udp)["peer"] == f"{VIP}:53"
    assert client("endpoint", id=udp)["endpoint"] == "198.18.0.6:5353"
    assert client("send", id=udp, data="q")["ok"]
    assert client("recvfrom", id=udp) == {"ok": True, "data": "dns:q", "source": f"{VIP}:53"}
    # Reconnected elsewhere, the socket forgets the Service.
    assert client("connect", id=udp, host="198.18.0.6", port=5353)["ok"]
    assert client("getpeername", id=udp)["peer"] == "198.18.0.6:5353"

    # An untranslated socket is left alone.
    plain = client.socket(kind="tcp")
    assert client("connect", id=plain, host="198.18.0.5", port=8080)["ok"]
    assert client("getpeername", id=plain)["peer"] == "198.18.0.5:8080"


def test_a_closed_socket_takes_its_translation_with_it(beds: Beds) -> None:
    web = beds.bed.server("web", "198.18.0.5", 8080)
    web6 = beds.bed.server("web6", "2001:2::5", 8080)
    v6 = Frontend(ip(VIP6), 80, records.PROTOCOLS["TCP"])
    beds.bed.publish({WEB: tiers([web], mode=MODE_FAILOVER), v6: tiers([web6], mode=MODE_FAILOVER)})
    reverse = beds.bed.dp[records.MAP_REVERSE]
    client = beds.peer()
    socks = []
    for family, host in ((4, VIP), (6, VIP6), (6, f"::ffff:{VIP}")):
        sock = client.socket(family=family, kind="tcp")
        assert client("connect", id=sock, host=host, port=80)["ok"]
        socks.append(sock)
    udp = client.socket()
    assert client("connect", id=udp, host=VIP, port=80)["errno"] == "ECONNREFUSED"  # no UDP
    cookies = [client("cookie", id=sock)["cookie"] for sock in socks]
    # A connect notes its translation in kmesh_translated, with plain stores (no LRU update);
    # the check Python computes over the entry is the one the program wrote.
    noted = inspect.read_translated(beds.bed.dp[records.MAP_TRANSLATED].lookup_batch())
    assert {(r.socket_cookie, str(r.frontend)) for r in noted} == {
        (cookies[0], str(WEB)), (cookies[1], str(v6)), (cookies[2], str(WEB))}
    assert list(reverse.keys()) == []
    # The first getpeername moves it to kmesh_reverse, where the LRU keeps it while it is used.
    for sock, shown in zip(socks, (f"{VIP}:80", f"[{VIP6}]:80", f"[::ffff:{VIP}]:80"),
                           strict=True):
        assert client("getpeername", id=sock)["peer"] == shown
    assert {records.REVERSE_KEY.unpack(k)["socket_cookie"] for k in reverse.keys()} == set(cookies)
    for sock in socks:
        client("close", id=sock)
    # sock_release ran for each (a TCP close releases the socket at once, without linger).
    assert list(reverse.keys()) == []


def test_a_torn_or_overwritten_translation_is_never_shown(beds: Beds) -> None:
    """kmesh_translated has no lock: a reader uses a slot only when its cookie, endpoint and
    check all match, so a slot another socket took, or one caught half written, shows the
    endpoint itself, never another frontend."""
    web = beds.bed.server("web", "198.18.0.5", 8080)
    other = Frontend(ip("198.19.0.99"), 8000, records.PROTOCOLS["TCP"])
    beds.bed.publish({WEB: tiers([web], mode=MODE_FAILOVER),
                      other: tiers([web], mode=MODE_FAILOVER)})
    translated = beds.bed.dp[records.MAP_TRANSLATED]
    client = beds.peer()

    def noted() -> tuple[dict[str, object], int, bytes]:
        sock = client.socket(kind="tcp")
        assert client("connect", id=sock, host=VIP, port=80)["ok"]
        cookie = client("cookie", id=sock)["cookie"]
        key = records.U32.pack(records.translation_slot(cookie))
        entry = records.TRANSLATION.unpack(translated.lookup(key))
        assert entry["socket_cookie"] == cookie and entry["frontend"] == WEB.pack()
        return {"sock": sock, **entry}, cookie, key

    # Half written: the other frontend's bytes under the check of this one's.
    entry, cookie, key = noted()
    translated.update(key, records.TRANSLATION.pack(
        {**entry, "frontend": other.pack(), "pad": 0}))
    assert client("getpeername", id=entry["sock"])["peer"] == "198.18.0.5:8080"
    # Whole: the same bytes with their own check are believed (so the check is what decided).
    entry, cookie, key = noted()
    translated.update(key, records.TRANSLATION.pack(
        {**entry, "frontend": other.pack(), "pad": 0,
         "check": records.translation_check(cookie, web.pack(), other.pack())}))
    assert client("getpeername", id=entry["sock"])["peer"] == "198.19.0.99:8000"
    # Taken by another socket that hashed to the same slot.
    entry, cookie, key = noted()
    translated.update(key, records.TRANSLATION.pack(
        {**entry, "socket_cookie": cookie + 1, "pad": 0,
         "check": records.translation_check(cookie + 1, web.pack(), WEB.pack())}))
    assert client("getpeername", id=entry["sock"])["peer"] == "198.18.0.5:8080"


def test_getpeername_in_ipv6_and_across_a_restart(beds: Beds) -> None:
    web6 = beds.bed.server("web6", "2001:2::5", 8080)
    beds.bed.publish({Frontend(ip(VIP6), 80, records.PROTOCOLS["TCP"]):
                      tiers([web6], mode=MODE_FAILOVER)})
    client = beds.peer()
    tcp = client.socket(family=6, kind="tcp")
    assert client("connect", id=tcp, host=VIP6, port=80)["ok"]
    assert client("getpeername", id=tcp)["peer"] == f"[{VIP6}]:80"
    beds.bed.reattach()
    # The translation is in a pinned map: the new programs read it.
    assert client("getpeername", id=tcp)["peer"] == f"[{VIP6}]:80"
    assert client("endpoint", id=tcp)["endpoint"] == "[2001:2::5]:8080"


# -- sessionAffinity ClientIP -------------------------------------------------------------------


def endpoints(count: int, block: int = 1) -> list[Backend]:
    """``count`` endpoints from 198.18.<4 * block>.1 on (local addresses without a server)."""
    base = int(ip(f"198.18.{4 * block}.1"))
    return [Backend(str(ip(base + i)), 5353) for i in range(count)]


def connect_endpoints(client: Peer, count: int, host: str = VIP) -> list[str | None]:
    """The endpoint of ``count`` fresh connected UDP sockets (a connect runs the program)."""
    out = []
    for _ in range(count):
        sock = client.socket()
        answer = client("connect", id=sock, host=host, port=53)
        out.append(client("endpoint", id=sock)["endpoint"] if answer["ok"] else answer["errno"])
        client("close", id=sock)
    return out


def test_affinity_holds_one_endpoint_per_client(beds: Beds) -> None:
    pool = endpoints(8)
    client = beds.peer()
    beds.bed.publish({DNS: tiers(pool, mode=MODE_FAILOVER)})
    spread = collections.Counter(connect_endpoints(client, 40))
    assert len(spread) > 1, spread  # without affinity: spread over the tier

    beds.bed.publish({DNS: records.BackendSet(MODE_FAILOVER, (tuple(pool),), affinity=10800)})
    held = connect_endpoints(client, 40)
    assert len(set(held)) == 1, collections.Counter(held)
    # Datagrams of the same client (another socket, same netns) reach the same endpoint.
    sock = client.socket()
    assert client("sendto", id=sock, host=VIP, port=53, data="x")["ok"]
    cookie = client("cookie", id=sock)["cookie"]
    sent = [records.REVERSE_KEY.unpack(k) for k in beds.bed.dp[records.MAP_REVERSE].keys()]
    assert [str(Backend.unpack(k["endpoint"])) for k in sent if k["socket_cookie"] == cookie] \
        == [held[0]]
    entries = dict(beds.bed.dp[records.MAP_AFFINITY].lookup_batch())
    (key, value), = entries.items()
    assert records.AFFINITY_KEY.unpack(key)["netns_cookie"] == client("netns_cookie")["cookie"]
    assert records.AFFINITY_KEY.unpack(key)["frontend"] == DNS.pack()
    assert str(Backend.unpack(records.AFFINITY.unpack(value)["endpoint"])) == held[0]

    # A client in another network namespace (another pod) has an affinity of its own.
    other_ns = f"{beds.bed.netns}-b"
    netns.add(other_ns)
    try:
        subprocess.run(["ip", "-n", other_ns, "route", "add", "local", "198.18.0.0/16", "dev",
                        "lo"], check=True)
        other = beds.peer(netns=netns.path(other_ns))
        assert len(set(connect_endpoints(other, 20))) == 1
        cookies = {records.AFFINITY_KEY.unpack(k)["netns_cookie"]
                   for k in beds.bed.dp[records.MAP_AFFINITY].keys()}
        assert cookies == {client("netns_cookie")["cookie"], other("netns_cookie")["cookie"]}
        procs.stop(other.proc)
    finally:
        netns.delete(other_ns)


def test_affinity_survives_changes_that_keep_the_endpoint(beds: Beds) -> None:
    pool = endpoints(1000)
    client = beds.peer()
    beds.bed.publish({DNS: records.BackendSet(MODE_FAILOVER, (tuple(pool),), affinity=10800)})
    (held,) = set(connect_endpoints(client, 5))
    keep = next(b for b in pool if str(b) == held)
    # Endpoints come and go before and after it in the sorted tier: its index moves, and the
    # program finds it again (binary search), for every kind of shift.
    for round_, change in enumerate([endpoints(300, block=0), endpoints(700, block=2), []]):
        others = [b for b in pool if b != keep][round_ * 100:]
        beds.bed.publish({DNS: records.BackendSet(
            MODE_FAILOVER, (tuple([*others, keep, *change]),), affinity=10800)})
        assert set(connect_endpoints(client, 5)) == {held}, round_


def test_affinity_fails_over_when_its_endpoint_goes_or_a_better_tier_appears(beds: Beds) -> None:
    pool = endpoints(6)
    client = beds.peer()
    beds.bed.publish({DNS: records.BackendSet(MODE_FAILOVER, ((), tuple(pool)), affinity=10800)})
    (first,) = set(connect_endpoints(client, 10))
    rest = [b for b in pool if str(b) != first]
    beds.bed.publish({DNS: records.BackendSet(MODE_FAILOVER, ((), tuple(rest)), affinity=10800)})
    (second,) = set(connect_endpoints(client, 10))
    assert second != first and second in {str(b) for b in rest}
    # A closer endpoint appears: locality wins over the affinity, which then holds it.
    near = Backend("198.18.9.9", 5353)
    beds.bed.publish({DNS: records.BackendSet(MODE_FAILOVER, ((near,), tuple(rest)),
                                              affinity=10800)})
    assert set(connect_endpoints(client, 10)) == {str(near)}
    # Strict mode: a held endpoint outside tier 0 is never used.
    beds.bed.publish({DNS: records.BackendSet(MODE_STRICT, ((), tuple(rest)), affinity=10800)})
    assert set(connect_endpoints(client, 3)) == {"ECONNREFUSED"}


def test_affinity_expires_timeout_seconds_after_its_last_use(beds: Beds) -> None:
    pool = endpoints(8)
    client = beds.peer()
    timeout = 30
    beds.bed.publish({DNS: records.BackendSet(MODE_FAILOVER, (tuple(pool),), affinity=timeout)})
    affinity = beds.bed.dp[records.MAP_AFFINITY]
    seen = set()
    for _ in range(12):
        (held,) = set(connect_endpoints(client, 3))
        seen.add(held)
        (key, raw), = affinity.lookup_batch()
        value = records.AFFINITY.unpack(raw)
        # Each use refreshed last_used: it is within the last second.
        assert 0 <= time.monotonic_ns() - value["last_used"] < 1_000_000_000
        # Age the entry past the timeout (as if 31 s went by without a connect).
        value["last_used"] -= (timeout + 1) * 1_000_000_000
        affinity.update(key, records.AFFINITY.pack(value))
    # Twelve expiries, each a fresh uniform choice among 8: all the same has p = 8^-11.
    assert len(seen) > 1, seen
    # An entry aged to just under the timeout still holds.
    connect_endpoints(client, 1)
    (key, raw), = affinity.lookup_batch()
    value = records.AFFINITY.unpack(raw)
    held = str(Backend.unpack(value["endpoint"]))
    value["last_used"] -= (timeout - 2) * 1_000_000_000
    affinity.update(key, records.AFFINITY.pack(value))
    assert set(connect_endpoints(client, 3)) == {held}


def test_affinity_off_leaves_the_affinity_map_alone(beds: Beds) -> None:
    beds.bed.publish({DNS: tiers(endpoints(4), mode=MODE_FAILOVER)})
    client = beds.peer()
    connect_endpoints(client, 10)
    assert list(beds.bed.dp[records.MAP_AFFINITY].keys()) == []
