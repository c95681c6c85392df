"""The Kubernetes source against a real HTTP API server (kmesh_lab.apiserver) with faults.

These tests drive :class:`KubernetesSource` itself and compare what it delivered with what the
server holds. The same source inside a real agent, with the kernel maps compared after a long
random fault sequence, is in test_kubernetes_agent.py.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmesh_lab.apiserver import ApiServer
from kmesh_plugin.model.objects import ObjectKey
from kmesh_plugin.sources.base import Batch
from kmesh_plugin.sources.kubernetes import KubernetesSource

TOKEN = "kmesh-test-token"


def node(name: str, zone: str = "z1") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}}


def service(name: str, ip: str, ns: str = "default", **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}


def endpoint_slice(name: str, service_name: str, *addresses: str,
                   ns: str = "default") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [a], "nodeName": "n1"} for a in addresses]}


@pytest.fixture
def server() -> Iterator[ApiServer]:
    with ApiServer(token=TOKEN, bookmark_interval=0.5) as s:
        yield s


@pytest.fixture
def kubeconfig(server: ApiServer, tmp_path: Path) -> Path:
    return server.write_kubeconfig(tmp_path / "kubeconfig")


class Collector:
    """Runs a source and keeps the view its batches build, as the agent's state would."""

    def __init__(self, source: KubernetesSource) -> None:
        self.source = source
        self.view: dict[ObjectKey, Any] = {}
        self.batches: list[Batch] = []

    def pump(self, until: Any, timeout: float = 20.0) -> None:
        """Take batches until ``until(self)`` holds."""
        deadline = time.monotonic() + timeout
        while not until(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s; source: "
                                     f"{self.source.describe()}")
            batch = self.source.next_batch(0.2)
            if batch is None:
                continue
            self.batches.append(batch)
            for event in batch.events:
                if event.obj is None:
                    self.view.pop(event.key, None)
                else:
                    self.view[event.key] = event.obj

    def names(self, kind: str) -> set[str]:
        return {k.name for k in self.view if k.kind == kind}


@pytest.fixture
def collector(kubeconfig: Path) -> Iterator[Collector]:
    source = KubernetesSource(kubeconfig, reflector_options={"page_size": 4})
    source.start()
    try:
        yield Collector(source)
    finally:
        source.close()


def server_names(server: ApiServer, plural: str) -> set[str]:
    return {o["metadata"]["name"] for o in server.list(plural)}


def synced(c: Collector) -> bool:
    return bool(c.batches) and c.batches[0].synced


def test_the_first_batch_is_the_complete_state_paged_through(
    server: ApiServer, kubeconfig: Path
) -> None:
    for i in range(3):
        server.create(node(f"n{i}"))
    for i in range(11):
        server.create(service(f"s{i}", f"198.19.0.{10 + i}"))
        server.create(endpoint_slice(f"s{i}-a", f"s{i}", f"198.18.0.{10 + i}"))
    source = KubernetesSource(kubeconfig, reflector_options={"page_size": 4})
    source.start()
    try:
        c = Collector(source)
        c.pump(synced)
    finally:
        source.close()
    first = c.batches[0]
    assert c.names("Service") == {f"s{i}" for i in range(11)}
    assert c.names("EndpointSlice") == {f"s{i}-a" for i in range(11)}
    assert c.names("Node") == {"n0", "n1", "n2"}
    assert set(first.revision) == {"nodes", "namespaces", "services", "endpointslices"}
    # Paged: 11 services at 4 a page is 3 requests, the later ones with a continue token.
    lists = [r for r in server.requests_for("/api/v1/services") if "watch" not in r.query]
    assert [r.query.get("limit") for r in lists] == ["4", "4", "4"]
    assert [bool(r.query.get("continue")) for r in lists] == [False, True, True]
    # kube-proxy's selector, and a watch from the list's resourceVersion with bookmarks.
    assert lists[0].query["labelSelector"] == (
        "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name")
    watch = next(r for r in server.requests_for("/api/v1/services") if "watch" in r.query)
    assert watch.query["allowWatchBookmarks"] == "true"
    assert 300 <= int(watch.query["timeoutSeconds"]) <= 600


def test_every_event_type_reaches_the_view(server: ApiServer, collector: Collector) -> None:
    collector.pump(synced)
    server.create(service("web", "198.19.0.10"))
    collector.pump(lambda c: "web" in c.names("Service"))
    updated = service("web", "198.19.0.10")
    updated["spec"]["ports"][0]["port"] = 81
    server.update(updated)
    key = ObjectKey("Service", "default", "web")
    collector.pump(lambda c: c.view[key].ports[0].port == 81)
    server.delete("services", "default", "web")
    collector.pump(lambda c: "web" not in c.names("Service"))
    # A bookmark moves the resourceVersion on with no event (and no reconcile work).
    rv = int(collector.source.versions["nodes"])
    server.create(service("other", "198.19.0.11"))
    collector.pump(lambda c: int(c.source.versions["nodes"]) > rv)
    assert collector.source.describe()["resources"]["nodes"]["relists"] == 0


def test_a_headless_or_foreign_service_is_not_read(
    server: ApiServer, collector: Collector
) -> None:
    collector.pump(synced)
    server.create(service("headless", "198.19.0.20", **{"service.kubernetes.io/headless": ""}))
    server.create(service("theirs", "198.19.0.21",
                          **{"service.kubernetes.io/service-proxy-name": "other"}))
    server.create(service("ours", "198.19.0.22"))
    collector.pump(lambda c: "ours" in c.names("Service"))
    assert collector.names("Service") == {"ours"}


def test_410_after_a_gap_relists_and_synthesises_the_deletes(
    server: ApiServer, collector: Collector
) -> None:
    for name in ("a", "b", "c"):
        server.create(service(name, f"198.19.0.{ord(name)}"))
    collector.pump(lambda c: synced(c) and c.names("Service") == {"a", "b", "c"})
    server.stop()  # the agent's watches break; it retries with backoff meanwhile
    server.delete("services", "default", "a")
    server.delete("services", "default", "b")
    server.create(service("d", "198.19.0.100"))
    server.faults.compact()  # the gap is no longer in the history: a watch from it is 410
    server.start()
    collector.pump(lambda c: c.names("Service") == {"c", "d"})
    assert collector.names("Service") == server_names(server, "services")
    deleted = {e.key.name for b in collector.batches for e in b.events if e.obj is None}
    assert {"a", "b"} <= deleted  # told, not just missing
    assert collector.source.describe()["resources"]["services"]["relists"] >= 1


def test_an_error_event_410_on_an_open_watch_relists(
    server: ApiServer, collector: Collector
) -> None:
    collector.pump(synced)
    server.faults.compact()
    server.faults.drop_watches()  # the re-watch from the compacted version is an ERROR 410
    server.create(service("after", "198.19.0.30"))
    collector.pump(lambda c: "after" in c.names("Service"))
    relists = collector.source.describe()["resources"]["services"]["relists"]
    assert relists >= 1 or collector.source.describe()["resources"]["services"][
        "watch_restarts"]


def test_dropped_streams_resume_from_their_version_without_a_relist(
    server: ApiServer, collector: Collector
) -> None:
    collector.pump(synced)
    server.create(service("first", "198.19.0.40"))
    collector.pump(lambda c: "first" in c.names("Service"))  # the watch has worked
    server.faults.drop_watches()
    server.create(service("second", "198.19.0.41"))
    collector.pump(lambda c: "second" in c.names("Service"))
    services = collector.source.describe()["resources"]["services"]
    assert services["relists"] == 0
    assert services["watch_restarts"] == {"connection lost": 1}


def test_a_restarted_server_with_a_new_history_changes_nothing_that_did_not_change(
    server: ApiServer, collector: Collector
) -> None:
    server.create(service("stay", "198.19.0.50"))
    server.create(service("go", "198.19.0.51"))
    collector.pump(lambda c: synced(c) and {"stay", "go"} <= c.names("Service"))
    seen = len(collector.batches)
    server.stop()
    server.delete("services", "default", "go")
    server.restart(new_history=True)
    collector.pump(lambda c: "go" not in c.names("Service"))
    events = [e for b in collector.batches[seen:] for e in b.events]
    # Every object came back with a new resourceVersion; only the real change is an event.
    assert [(e.key.name, e.obj is None) for e in events] == [("go", True)]


def test_backoff_after_server_errors_is_bounded(server: ApiServer, kubeconfig: Path) -> None:
    server.faults.fail(3, status=500, match=r"^/api/v1/nodes$")
    source = KubernetesSource(kubeconfig)
    source.start()
    try:
        c = Collector(source)
        c.pump(synced, timeout=30)
    finally:
        source.close()
    lists = [r for r in server.requests_for("/api/v1/nodes") if "watch" not in r.query]
    gaps = [b.at - a.at for a, b in itertools.pairwise(lists)][:3]
    # 0.8 s doubling, each stretched by at most a quarter (and a little for the machine).
    for gap, base in zip(gaps, (0.8, 1.6, 3.2), strict=True):
        assert base <= gap <= base * 1.25 + 0.3, gaps
    assert source.describe()["resources"]["nodes"]["errors"] == {"InternalError": 3}


def test_429_is_retried_after_the_servers_retry_after(
    server: ApiServer, kubeconfig: Path
) -> None:
    server.faults.fail(1, status=429, retry_after=2, match=r"^/api/v1/namespaces$")
    source = KubernetesSource(kubeconfig)
    source.start()
    try:
        Collector(source).pump(synced, timeout=30)
    finally:
        source.close()
    lists = [r for r in server.requests_for("/api/v1/namespaces") if "watch" not in r.query]
    assert lists[1].at - lists[0].at >= 2.0


def test_while_the_api_is_down_nothing_changes_then_the_difference_arrives(
    server: ApiServer, collector: Collector
) -> None:
    server.create(service("kept", "198.19.0.60"))
    collector.pump(lambda c: synced(c) and "kept" in c.names("Service"))
    before = dict(collector.view)
    seen = len(collector.batches)
    server.stop()
    server.create(service("new", "198.19.0.61"))
    server.delete("services", "default", "kept")
    # The source keeps reporting the outage and nothing else.
    collector.pump(lambda c: c.source.describe()["resources"]["services"]["failing_since"])
    assert collector.view == before
    assert all(not b.events for b in collector.batches[seen:])
    server.start()
    collector.pump(lambda c: c.names("Service") == {"new"})
    assert collector.source.describe()["resources"]["services"]["failing_since"] is None


def test_a_malformed_object_is_named_and_its_last_good_version_kept(
    server: ApiServer, collector: Collector
) -> None:
    server.create(service("web", "198.19.0.70"))
    key = ObjectKey("Service", "default", "web")
    collector.pump(lambda c: key in c.view)
    good = collector.view[key]
    broken = service("web", "198.19.0.70")
    broken["spec"]["ports"][0]["port"] = 10**30
    server.update(broken)
    collector.pump(lambda c: c.source.errors)
    message = collector.source.errors["Service default/web"]
    assert "Service default/web" in message and "spec.ports[0].port" in message
    assert collector.view[key] == good
    server.update(service("web", "198.19.0.70"))
    collector.pump(lambda c: not c.source.errors)


def test_a_malformed_object_in_a_list_costs_only_itself(
    server: ApiServer, kubeconfig: Path
) -> None:
    server.create(service("good", "198.19.0.80"))
    broken = service("broken", "198.19.0.81")
    broken["spec"]["ports"][0]["port"] = 10**30
    server.create(broken)
    deep: dict[str, Any] = {}
    node_ = deep
    for _ in range(100):
        node_["x"] = {}
        node_ = node_["x"]
    deep_service = service("deep", "198.19.0.82")
    deep_service["spec"]["extension"] = deep  # a field the agent never reads, far too deep
    server.create(deep_service)
    source = KubernetesSource(kubeconfig, reflector_options={"page_size": 2})
    source.start()
    try:
        c = Collector(source)
        c.pump(synced)
    finally:
        source.close()
    assert c.names("Service") == {"good"}
    assert set(source.errors) == {"Service default/broken", "Service default/deep"}
    assert "spec.ports[0].port" in source.errors["Service default/broken"]
    assert "nested deeper than" in source.errors["Service default/deep"]
