"""End-to-end: what a pod's process sees of the socket-level load balancer (issue 10).

* Unconnected UDP: a DNS-style client ``sendto()``s queries to a UDP Service's ClusterIP:53;
  each datagram is translated as a connect would be (the locality-chosen endpoint answers),
  and ``recvfrom()`` reports the ClusterIP:53 as the answer's source. Connected UDP (glibc's
  resolver: ``connect``, ``send``, ``recvfrom``): the same, and ``getpeername()`` shows the
  ClusterIP.
* TCP: ``getpeername()`` shows the ClusterIP:port the process dialled, while the kernel's
  socket table (the result's ``endpoint``, from /proc/self/net) names the chosen endpoint.
* ``sessionAffinity: ClientIP``: one client's connections and datagrams stick to one endpoint
  while it stays eligible and in the best tier; the choice is made again once the timeout
  passed since the last use, or when that endpoint goes.

Every answer names its instance (the pod's name: the helloworld body, the DNS TXT record), so
the tests assert *which* endpoint answered. Controls show what the datapath did: the same
queries to a pod IP, or from a pod outside the CNI chain (``Lab.add_unenrolled_pod``), are not
rewritten (and an untranslated datagram to a ClusterIP fails with ENETUNREACH: pods have no
default route). The lab removes everything it made, also when a test fails.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from kmesh_lab.cluster import Lab
from kmesh_lab.kind import SEED_LOCALITY
from kmesh_lab.kube import CURL_IMAGE, DNS_IMAGE, HELLOWORLD_IMAGE, RunningPod
from kmesh_plugin.datapath import records
from kmesh_plugin.datapath.loader import Datapath

pytestmark = pytest.mark.lab

NS = "sample"
CLIENT_NODE = "ambient-worker"
NODES = SEED_LOCALITY
NEAR, ZONE, FAR = NODES  # the client's node, same zone other subzone, other zone


@pytest.fixture
def lab(kernel: None, cni_plugins: None) -> Iterator[Lab]:
    the_lab = Lab(NODES)
    with the_lab:
        yield the_lab
    assert not the_lab.state.exists()
    assert not the_lab.cgroup.exists()
    assert not the_lab.pin_root.exists()


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------


def service(name: str, app: str, port: int, protocol: str = "TCP", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": app}, **spec,
                     "ports": [{"name": "p", "port": port, "protocol": protocol}]}}


def affinity(timeout: int | None = None) -> dict[str, Any]:
    """Service spec fields for sessionAffinity ClientIP (Kubernetes' default timeout)."""
    spec: dict[str, Any] = {"sessionAffinity": "ClientIP"}
    if timeout is not None:
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": timeout}}
    return spec


def server_pod(name: str, app: str, node: str, kind: str = "helloworld") -> dict[str, Any]:
    """A bare Pod (its name is the instance its answers carry) on ``node``."""
    if kind == "dns":
        container = {"name": "dns", "image": DNS_IMAGE,
                     "ports": [{"containerPort": 53, "protocol": "UDP", "name": "dns"}]}
    else:
        container = {"name": "hello", "image": HELLOWORLD_IMAGE,
                     "env": [{"name": "SERVICE_VERSION", "value": name}],
                     "ports": [{"containerPort": 5000}]}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                     "containers": [container]}}


def client_pod(name: str = "client", node: str = CLIENT_NODE) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                     "containers": [{"name": "curl", "image": CURL_IMAGE}]}}


def apply(lab: Lab, *docs: dict[str, Any]) -> None:
    lab.apply(yaml.safe_dump_all(docs), NS)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def pod(lab: Lab, name: str) -> RunningPod:
    return lab.pods[(NS, name)]


def cluster_ips(lab: Lab, name: str) -> list[str]:
    return list(lab.client.get("Service", NS, name)["spec"]["clusterIPs"])


def addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def dns(lab: Lab, client: RunningPod, host: str, count: int = 20,
        **options: Any) -> list[dict[str, Any]]:
    command = {"op": "dns", "host": host, "port": options.pop("port", 53), "count": count,
               "timeout": 2.0, **options}
    return lab.call(client, command)["results"]


def get(lab: Lab, client: RunningPod, url: str, count: int = 20,
        family: int | None = None) -> list[dict[str, Any]]:
    command: dict[str, Any] = {"op": "get", "url": url, "count": count, "timeout": 2.0,
                               "endpoint": True}
    if family is not None:
        command["family"] = family
    return lab.call(client, command)["results"]


def answered(results: list[dict[str, Any]]) -> collections.Counter[str]:
    """Which instance answered each query (or the errno of a failed one)."""
    return collections.Counter(r["instance"] if r["ok"] else f"error {r['errno']}"
                               for r in results)


def sources(results: list[dict[str, Any]]) -> set[str | None]:
    return {r["source"] for r in results}


def endpoint_of(lab: Lab, instance: str, port: int, family: int = 4) -> str:
    p = pod(lab, instance)
    host = p.ip if family == 4 else p.ipv6
    assert host, f"pod {instance} has no IPv{family} address"
    return addr(host, port)


def one_instance(results: list[dict[str, Any]]) -> str:
    """The single instance that answered every one of ``results`` (asserted)."""
    seen = answered(results)
    assert len(seen) == 1 and all(r["ok"] for r in results), seen
    return next(iter(seen))


# --------------------------------------------------------------------------------------------
# UDP: DNS-shaped queries to a ClusterIP:53
# --------------------------------------------------------------------------------------------


def dns_lab(lab: Lab, **spec: Any) -> None:
    """Service ``dns`` (UDP 53, PreferClose) and ``dns-any`` (no strategy) over the same three
    DNS pods (one per node), a client on the near node."""
    apply(lab,
          service("dns", "dns", 53, "UDP", trafficDistribution="PreferClose", **spec),
          service("dns-any", "dns", 53, "UDP", **spec),
          server_pod("dns-near", "dns", NEAR, "dns"),
          server_pod("dns-zone", "dns", ZONE, "dns"),
          server_pod("dns-far", "dns", FAR, "dns"),
          client_pod())


def test_unconnected_udp_is_answered_by_the_close_endpoint_from_the_cluster_ip(lab: Lab) -> None:
    dns_lab(lab)
    client = pod(lab, "client")
    (cip,) = cluster_ips(lab, "dns")
    (any_cip,) = cluster_ips(lab, "dns-any")

    # sendto() the ClusterIP, a new socket per query, and one socket for all of them: the
    # PreferClose choice answers, and recvfrom() says the answer came from the ClusterIP:53.
    for reuse in (False, True):
        results = dns(lab, client, "dns", 20, reuse=reuse)  # the name resolves to the ClusterIP
        assert answered(results) == {"dns-near": 20}, results
        assert sources(results) == {addr(cip, 53)}
        assert {(r["peer"], r["endpoint"], r["ignored"]) for r in results} == {(None, None, 0)}

    # Per datagram: one unconnected socket spreads over every endpoint of a Service without a
    # strategy, and every answer, whichever endpoint sent it, comes from that ClusterIP.
    results = dns(lab, client, any_cip, 60, reuse=True)
    seen = answered(results)
    assert set(seen) == {"dns-near", "dns-zone", "dns-far"}, seen
    assert min(seen.values()) >= 5, seen  # 20 expected each
    assert sources(results) == {addr(any_cip, 53)}

    # Not a Service address: the datagram goes where it was sent and its answer keeps the
    # endpoint's address as its source.
    zone_ep = endpoint_of(lab, "dns-zone", 53)
    results = dns(lab, client, pod(lab, "dns-zone").ip, 10)
    assert answered(results) == {"dns-zone": 10}
    assert sources(results) == {zone_ep}

    # A port or protocol the Service does not serve is refused at once, never sent.
    assert answered(dns(lab, client, cip, 5, port=54)) == {"error ECONNREFUSED": 5}
    probe = {"op": "connect", "host": cip, "port": 53, "proto": "tcp", "count": 5}
    assert {r["errno"] for r in lab.call(client, probe)["results"]} == {"ECONNREFUSED"}

    # Failover: the near endpoint goes; the same-zone one answers, still from the ClusterIP.
    lab.delete("Pod", NS, "dns-near")
    results = dns(lab, client, "dns", 20, reuse=True)
    assert answered(results) == {"dns-zone": 20}, results
    assert sources(results) == {addr(cip, 53)}

    # A pod outside the CNI chain, on the client's node: its datagram to the ClusterIP is not
    # translated (and cannot leave its namespace); to a pod IP it is answered unrewritten.
    outsider = lab.add_unenrolled_pod(CLIENT_NODE, namespace=NS)
    assert answered(dns(lab, outsider, "dns", 5)) == {"error ENETUNREACH": 5}
    results = dns(lab, outsider, pod(lab, "dns-zone").ip, 5)
    assert answered(results) == {"dns-zone": 5}
    assert sources(results) == {zone_ep}


def test_connected_udp_shows_the_cluster_ip_as_peer_and_source(lab: Lab) -> None:
    dns_lab(lab)
    client = pod(lab, "client")
    (cip,) = cluster_ips(lab, "dns")
    (any_cip,) = cluster_ips(lab, "dns-any")
    near_ep = endpoint_of(lab, "dns-near", 53)

    # glibc's resolver: connect(), send(), recvfrom() (and it drops an answer whose source
    # is not the server it asked). The kernel's socket is connected to the endpoint.
    for reuse in (False, True):
        results = dns(lab, client, "dns", 20, connected=True, reuse=reuse)
        assert answered(results) == {"dns-near": 20}, results
        assert {(r["source"], r["peer"], r["endpoint"]) for r in results} == {
            (addr(cip, 53), addr(cip, 53), near_ep)}

    # Spread over every endpoint: the kernel's peer is the endpoint that answered.
    results = dns(lab, client, any_cip, 60, connected=True)
    seen = answered(results)
    assert set(seen) == {"dns-near", "dns-zone", "dns-far"}, seen
    for r in results:
        assert (r["source"], r["peer"]) == (addr(any_cip, 53), addr(any_cip, 53)), r
        assert r["endpoint"] == endpoint_of(lab, r["instance"], 53), r

    # Control: connected to the pod IP itself, every view names the pod.
    results = dns(lab, client, pod(lab, "dns-far").ip, 5, connected=True)
    far_ep = endpoint_of(lab, "dns-far", 53)
    assert answered(results) == {"dns-far": 5}
    assert {(r["source"], r["peer"], r["endpoint"]) for r in results} == {(far_ep,) * 3}

    # A pod outside the chain: its connect() to the ClusterIP is left alone.
    outsider = lab.add_unenrolled_pod(CLIENT_NODE, namespace=NS)
    assert answered(dns(lab, outsider, "dns", 5, connected=True)) == {"error ENETUNREACH": 5}


def test_udp_over_ipv6_is_answered_from_the_ipv6_cluster_ip(lab: Lab) -> None:
    dns_lab(lab, ipFamilyPolicy="RequireDualStack")
    client = pod(lab, "client")
    cip4, cip6 = cluster_ips(lab, "dns")
    assert ":" in cip6
    near6 = endpoint_of(lab, "dns-near", 53, family=6)

    results = dns(lab, client, "dns", 20, family=6, reuse=True)
    assert answered(results) == {"dns-near": 20}, results
    assert sources(results) == {addr(cip6, 53)}
    results = dns(lab, client, "dns", 10, family=6, connected=True)
    assert answered(results) == {"dns-near": 10}, results
    assert {(r["source"], r["peer"], r["endpoint"]) for r in results} == {
        (addr(cip6, 53), addr(cip6, 53), near6)}
    # The IPv4 ClusterIP of the same Service, on the same socket type.
    assert sources(dns(lab, client, "dns", 5, family=4)) == {addr(cip4, 53)}
    # Control: the pod's IPv6 address itself.
    results = dns(lab, client, pod(lab, "dns-near").ipv6, 5)  # type: ignore[arg-type]
    assert answered(results) == {"dns-near": 5}
    assert sources(results) == {near6}


# --------------------------------------------------------------------------------------------
# TCP: getpeername() of a translated connection
# --------------------------------------------------------------------------------------------


def test_tcp_getpeername_shows_the_cluster_ip_while_the_kernel_holds_the_endpoint(
        lab: Lab) -> None:
    apply(lab,
          service("web", "web", 5000, ipFamilyPolicy="RequireDualStack"),
          server_pod("web-near", "web", NEAR),
          server_pod("web-zone", "web", ZONE),
          server_pod("web-far", "web", FAR),
          client_pod())
    client = pod(lab, "client")
    cip4, cip6 = cluster_ips(lab, "web")

    for family, cip in ((4, cip4), (6, cip6)):
        results = get(lab, client, "http://web:5000/hello", 60, family=family)
        seen = answered(results)
        assert set(seen) == {"web-near", "web-zone", "web-far"}, seen
        for r in results:
            # getpeername(): what the process dialled; /proc/self/net: where it really went,
            # the endpoint whose body came back.
            assert r["peer"] == addr(cip, 5000), r
            assert r["endpoint"] == endpoint_of(lab, r["instance"], 5000, family), r

    # A bare connect() shows the same split.
    probe = {"op": "connect", "host": cip4, "port": 5000, "proto": "tcp", "count": 20}
    results = lab.call(client, probe)["results"]
    assert {r["peer"] for r in results} == {addr(cip4, 5000)}
    all_eps = {endpoint_of(lab, name, 5000) for name in ("web-near", "web-zone", "web-far")}
    assert {r["endpoint"] for r in results} <= all_eps

    # Controls: a connection to a pod IP shows the pod as its peer; a pod outside the chain
    # is not translated at all.
    zone_ep = endpoint_of(lab, "web-zone", 5000)
    (r,) = get(lab, client, f"http://{pod(lab, 'web-zone').ip}:5000/hello", 1)
    assert (r["instance"], r["peer"], r["endpoint"]) == ("web-zone", zone_ep, zone_ep)
    outsider = lab.add_unenrolled_pod(CLIENT_NODE, namespace=NS)
    assert answered(get(lab, outsider, "http://web:5000/hello", 5)) == {"error ENETUNREACH": 5}
    (r,) = get(lab, outsider, f"http://{pod(lab, 'web-zone').ip}:5000/hello", 1)
    assert (r["instance"], r["peer"], r["endpoint"]) == ("web-zone", zone_ep, zone_ep)


# --------------------------------------------------------------------------------------------
# sessionAffinity: ClientIP
# --------------------------------------------------------------------------------------------


def affinity_entry(lab: Lab, client: RunningPod, cluster_ip: str, port: int,
                   protocol: str = "TCP") -> tuple[str, int] | None:
    """The client's kmesh_affinity entry for a frontend on its node: (endpoint, last_used in
    CLOCK_MONOTONIC ns), or None."""
    dp = Datapath.open(lab.pin_root / client.node)
    try:
        entries = dp[records.MAP_AFFINITY].lookup_batch()
    finally:
        dp.close()
    for raw_key, raw_value in entries:
        key = records.AFFINITY_KEY.unpack(raw_key)
        frontend = records.FRONTEND_KEY.unpack(key["frontend"])
        if (key["netns_cookie"], str(records.decode_addr(frontend["addr"])), frontend["port"],
                frontend["protocol"]) != (client.extra["cookie"], cluster_ip, port,
                                          records.PROTOCOLS[protocol]):
            continue
        value = records.AFFINITY.unpack(raw_value)
        endpoint = records.ENDPOINT.unpack(value["endpoint"])
        return addr(str(records.decode_addr(endpoint["addr"])), endpoint["port"]), \
            value["last_used"]
    return None


def wait_until_expired(entries: list[tuple[str, int] | None], timeout: int) -> None:
    """Sleep until ``timeout`` seconds passed since the newest ``last_used`` of ``entries``
    (the kernel's own timestamps, on the clock it reads): the expiry condition itself."""
    newest = max(e[1] for e in entries if e is not None)
    expires = newest + timeout * 1_000_000_000
    while (left := expires - time.monotonic_ns()) >= 0:
        time.sleep(left / 1e9 + 0.02)


def web_servers(count: int, nodes: tuple[str, ...] = (NEAR, ZONE, FAR),
                prefix: str = "web", app: str = "web", kind: str = "helloworld",
                ) -> list[dict[str, Any]]:
    return [server_pod(f"{prefix}-{i}", app, nodes[i % len(nodes)], kind) for i in range(count)]


def test_client_ip_affinity_sticks_while_a_service_without_it_spreads(lab: Lab) -> None:
    apply(lab,
          service("sticky", "web", 5000, **affinity()),
          service("plain", "web", 5000),
          service("sticky-dns", "dns", 53, "UDP", **affinity()),
          *web_servers(4),
          *web_servers(4, prefix="dns", app="dns", kind="dns"),
          client_pod("client"), client_pod("client2"))
    client, client2 = pod(lab, "client"), pod(lab, "client2")
    (sticky_cip,) = cluster_ips(lab, "sticky")
    (dns_cip,) = cluster_ips(lab, "sticky-dns")
    web = {f"web-{i}" for i in range(4)}

    plain = answered(get(lab, client, "http://plain:5000/hello", 60))
    assert set(plain) == web, plain  # each missed with probability (3/4)^60

    for c in (client, client2):
        chosen = one_instance(get(lab, c, "http://sticky:5000/hello", 40))
        assert chosen in web
        # The kernel remembers the choice for this client (its netns) and this frontend.
        entry = affinity_entry(lab, c, sticky_cip, 5000)
        assert entry is not None and entry[0] == endpoint_of(lab, chosen, 5000), entry
        # Interleaved with the Service without affinity, the sticky one does not move.
        assert set(answered(get(lab, c, "http://plain:5000/hello", 40))) == web
        assert one_instance(get(lab, c, "http://sticky:5000/hello", 20)) == chosen
    print(f"sticky: client -> {affinity_entry(lab, client, sticky_cip, 5000)}, "
          f"client2 -> {affinity_entry(lab, client2, sticky_cip, 5000)}")

    # Datagrams too: unconnected, one socket or a new one each time, and connected sockets.
    chosen = one_instance(dns(lab, client, "sticky-dns", 30, reuse=True))
    assert chosen.startswith("dns-")
    assert one_instance(dns(lab, client, "sticky-dns", 20)) == chosen
    results = dns(lab, client, "sticky-dns", 20, connected=True)
    assert one_instance(results) == chosen
    assert {r["endpoint"] for r in results} == {endpoint_of(lab, chosen, 53)}
    assert sources(results) == {addr(dns_cip, 53)}
    entry = affinity_entry(lab, client, dns_cip, 53, "UDP")
    assert entry is not None and entry[0] == endpoint_of(lab, chosen, 53), entry


def test_client_ip_affinity_lasts_timeout_seconds_after_the_last_use(lab: Lab) -> None:
    timeout = 2
    clients = [f"client{i}" for i in range(3)]
    apply(lab, service("sticky", "web", 5000, **affinity(timeout)), *web_servers(8),
          *(client_pod(name) for name in clients))
    pods = [pod(lab, name) for name in clients]
    (cip,) = cluster_ips(lab, "sticky")
    url = "http://sticky:5000/hello"
    chosen = {p.spec.name: one_instance(get(lab, p, url, 10)) for p in pods}

    # Used again well within the timeout, the affinity holds past it: it counts from the last
    # use (each use moves last_used), not from the first choice.
    first = {p.spec.name: affinity_entry(lab, p, cip, 5000) for p in pods}
    for _ in range(3):
        time.sleep(timeout / 2)
        for p in pods:
            assert one_instance(get(lab, p, url, 2)) == chosen[p.spec.name]
    later = {p.spec.name: affinity_entry(lab, p, cip, 5000) for p in pods}
    for name in clients:
        assert first[name] is not None and later[name] is not None
        assert later[name][1] - first[name][1] > timeout * 1_000_000_000  # type: ignore[index]
        assert later[name][0] == first[name][0]  # type: ignore[index]

    # Unused for the timeout: a fresh choice, then sticky to it. With 8 endpoints and three
    # clients, a round re-picks the same endpoint for every client with probability 1/512;
    # three rounds leave one chance in ~10^8 of seeing no change at all.
    moved = []
    for _round in range(3):
        wait_until_expired(list(later.values()), timeout)
        for p in pods:
            now = one_instance(get(lab, p, url, 10))
            if now != chosen[p.spec.name]:
                moved.append((p.spec.name, chosen[p.spec.name], now))
            chosen[p.spec.name] = now
        later = {p.spec.name: affinity_entry(lab, p, cip, 5000) for p in pods}
        if moved:
            break
    print(f"after the timeout: {moved}")
    assert moved, "no client got a new endpoint after its affinity expired"


def test_client_ip_affinity_fails_over_when_the_sticky_endpoint_goes(
        lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    apply(lab, service("sticky", "web", 5000, **affinity()), *web_servers(4), client_pod())
    client = pod(lab, "client")
    (cip,) = cluster_ips(lab, "sticky")
    url = "http://sticky:5000/hello"
    gone = one_instance(get(lab, client, url, 20))

    # Load runs while the sticky endpoint is deleted: each request a new connection, stamped
    # with the host's monotonic clock. The pod turns terminating, every agent applies that
    # (the lab's converge() returns), and only then does its process stop. From that moment
    # on no connection may reach it; one in flight to it when it stopped may fail (the lab's
    # servers do not drain on SIGTERM).
    applied: list[float] = []
    stopped: list[float] = []
    real_converge, real_stop = lab.converge, lab._stop_pod

    def converge(*args: Any, **kwargs: Any) -> None:
        real_converge(*args, **kwargs)
        applied.append(time.monotonic())

    def stop_pod(running: RunningPod) -> None:
        if running.spec.name == gone:
            stopped.append(time.monotonic())
        real_stop(running)

    monkeypatch.setattr(lab, "converge", converge)
    monkeypatch.setattr(lab, "_stop_pod", stop_pod)
    running, done = threading.Event(), threading.Event()
    during: list[dict[str, Any]] = []

    def load() -> None:
        while not done.is_set():
            loop = {"op": "loop", "urls": [url], "seconds": 0.2, "timeout": 2.0}
            during.extend(lab.call(client, loop)["results"])
            running.set()

    worker = threading.Thread(target=load)
    worker.start()
    try:
        assert running.wait(30)
        lab.delete("Pod", NS, gone)
    finally:
        done.set()
        worker.join(timeout=60)
    (stop_time,) = stopped
    change = max(t for t in applied if t < stop_time)  # terminating, applied everywhere
    before = [r for r in during if r["t"] < change]
    after = [r for r in during if r["t"] >= change]
    assert before and after, (len(before), len(after))
    # The version is the pod's name (server_pod sets SERVICE_VERSION so).
    assert all(r["errno"] is None and r["version"] != gone for r in after), after
    failed = [r for r in before if r["errno"] is not None]
    assert all(r["done"] >= stop_time for r in failed), failed  # in flight when it stopped

    moved = one_instance(get(lab, client, url, 30))
    assert moved != gone and moved.startswith("web-")
    # Under that load, one switch: the old endpoint until the change, the new one after.
    runs = [k for k, _ in itertools.groupby(r["version"] for r in during if not r["errno"])]
    assert runs in ([gone], [gone, moved]), runs
    assert {r["version"] for r in after} == {moved}
    entry = affinity_entry(lab, client, cip, 5000)
    assert entry is not None and entry[0] == endpoint_of(lab, moved, 5000), entry
    # ... and sticks to the new one.
    assert one_instance(get(lab, client, url, 30)) == moved
    print(f"sticky {gone} deleted: moved to {moved}; {len(before)} requests before every agent "
          f"had applied it, {len(after)} after; {len(failed)} in flight to {gone} failed")


def test_client_ip_affinity_respects_locality(lab: Lab) -> None:
    # PreferClose, endpoints in the client's subzone and elsewhere: every client's sticky
    # endpoint is one in its subzone.
    clients = [f"client{i}" for i in range(3)]
    near = [server_pod(f"near-{i}", "web", NEAR) for i in range(3)]
    apply(lab,
          service("sticky", "web", 5000, trafficDistribution="PreferClose", **affinity()),
          *near, *web_servers(5, nodes=(ZONE, FAR), prefix="away"),
          *(client_pod(name) for name in clients))
    url = "http://sticky:5000/hello"
    for name in clients:
        chosen = one_instance(get(lab, pod(lab, name), url, 30))
        assert chosen.startswith("near-"), (name, chosen)

    # The sticky endpoint leaves the best tier when a better one appears: a client held to a
    # same-zone endpoint moves to the one endpoint in its subzone as soon as it exists.
    for doc in near:
        lab.delete("Pod", NS, doc["metadata"]["name"])
    client = pod(lab, clients[0])
    zone_one = one_instance(get(lab, client, url, 30))
    assert pod(lab, zone_one).node == ZONE, zone_one
    apply(lab, server_pod("near-new", "web", NEAR))
    assert one_instance(get(lab, client, url, 30)) == "near-new"
    # It goes again: a fresh choice among the same-zone endpoints, sticky again.
    lab.delete("Pod", NS, "near-new")
    again = one_instance(get(lab, client, url, 30))
    assert pod(lab, again).node == ZONE, again
    assert one_instance(get(lab, client, url, 20)) == again
