"""The lab's API server (kmesh_lab.apiserver) against the two real clients: the official
Python client and kubectl, plus its own behaviour (watches, compaction, faults, restarts).

Every server is stopped at the end of its test and leaves no thread behind; every kubectl
call, HTTP read and client request has a timeout, so a hang fails a test instead of
blocking the run. kubectl tests skip without kubectl (fail under KMESH_REQUIRE_BPF=1).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, watch

from conftest import missing
from kmesh_lab.apiserver import ApiServer

TIMEOUT = 10.0  # seconds for one HTTP exchange
KUBECTL_TIMEOUT = 60.0
Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def leftover_threads(port: int) -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name.startswith(f"apiserver-{port}-") and t.is_alive()]


def stop_cleanly(server: ApiServer) -> None:
    server.stop()
    deadline = time.monotonic() + 5
    while leftover_threads(server.port) and time.monotonic() < deadline:
        time.sleep(0.01)  # a connection thread is between its last byte and its exit
    assert not leftover_threads(server.port)
    assert not server.internal_errors, server.internal_errors[0]


@pytest.fixture
def server() -> Iterator[ApiServer]:
    s = ApiServer(bookmark_interval=0.2).start()
    try:
        yield s
    finally:
        stop_cleanly(s)


@pytest.fixture
def api(server: ApiServer, tmp_path: Path) -> Iterator[client.ApiClient]:
    """The official client, configured from the server's kubeconfig (not globally)."""
    path = server.write_kubeconfig(tmp_path / "kubeconfig")
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=cfg)
    api_client = client.ApiClient(cfg)
    try:
        yield api_client
    finally:
        api_client.close()


def make_kubectl(server: ApiServer, tmp_path: Path) -> Kubectl:
    if shutil.which("kubectl") is None:
        missing("kubectl is not installed")
    kubeconfig = server.write_kubeconfig(tmp_path / f"kubectl-{server.port}.config")
    cache = tmp_path / f"kubectl-cache-{server.port}"
    env = {**os.environ, "HOME": str(tmp_path)}

    def run(*args: str, stdin: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["kubectl", "--kubeconfig", str(kubeconfig), "--cache-dir", str(cache), *args],
            input=stdin, capture_output=True, text=True, timeout=KUBECTL_TIMEOUT, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {proc.returncode}: "
                                 f"{proc.stderr.strip()}")
        return proc

    return run


@pytest.fixture
def kubectl(server: ApiServer, tmp_path: Path) -> Kubectl:
    return make_kubectl(server, tmp_path)


def node(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def service(name: str, ns: str = "default", **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}],
                     "selector": {"app": name}}}


def pod(name: str, node_name: str = "", **labels: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "busybox"}]}
    if node_name:
        spec["nodeName"] = node_name
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": labels}, "spec": spec}


def endpoint_slice(name: str, service_name: str, ns: str = "default",
                   endpoints: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": "IPv4",
        "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [f"198.18.{i // 250}.{i % 250 + 1}"],
                       "conditions": {"ready": True, "serving": True, "terminating": False},
                       "nodeName": f"node-{i}", "zone": "zone1"} for i in range(endpoints)],
    }


# --- raw HTTP ------------------------------------------------------------------------------


def http_request(server: ApiServer, method: str, path: str, body: Any = None,
                 content_type: str = "application/json", token: str | None = None,
                 accept: str | None = None) -> tuple[int, http.client.HTTPMessage, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        headers = {"Content-Type": content_type}
        if accept:
            headers["Accept"] = accept
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, data, headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw
        return resp.status, resp.headers, payload
    finally:
        conn.close()


class Dropped(Exception):
    """The watch connection ended without the terminating chunk."""


class RawWatch:
    """A watch read at the chunk level, to tell a clean end from a cut connection."""

    def __init__(self, server: ApiServer, path: str, timeout: float = TIMEOUT) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
        self.conn.request("GET", path)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.pending: list[dict[str, Any]] = []
        self.ended = False

    def next(self) -> dict[str, Any] | None:
        """The next event; None once the server ended the stream cleanly."""
        fp = self.resp.fp
        while not self.pending:
            if self.ended:
                return None
            size_line = fp.readline()
            if not size_line.strip():
                raise Dropped
            size = int(size_line.strip(), 16)
            if size == 0:
                fp.readline()
                self.ended = True
                return None
            data = fp.read(size)
            if len(data) < size:
                raise Dropped
            fp.readline()
            self.pending.extend(json.loads(line) for line in data.splitlines() if line.strip())
        return self.pending.pop(0)

    def events(self, count: int) -> list[dict[str, Any]]:
        out = []
        while len(out) < count:
            event = self.next()
            if event is None:
                break
            out.append(event)
        return out

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def raw_watches() -> Iterator[Callable[..., RawWatch]]:
    opened: list[RawWatch] = []

    def open_watch(server: ApiServer, path: str, timeout: float = TIMEOUT) -> RawWatch:
        w = RawWatch(server, path, timeout)
        opened.append(w)
        return w

    yield open_watch
    for w in opened:
        w.close()


def kinds(events: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(e["type"], e["object"]["metadata"].get("name")) for e in events]


# --- the official Python client ------------------------------------------------------------


def test_python_client_create_list_patch_delete(server: ApiServer,
                                                api: client.ApiClient) -> None:
    core, disc, apps = client.CoreV1Api(api), client.DiscoveryV1Api(api), client.AppsV1Api(api)
    assert core.create_namespace(namespace("demo")).status.phase == "Active"
    created = core.create_node(node("n1", zone="z1"))
    assert created.metadata.uid and created.metadata.resource_version
    svc = core.create_namespaced_service("demo", service("web", "demo"))
    assert svc.spec.ports[0].port == 80 and svc.metadata.namespace == "demo"
    assert [s.metadata.name for s in core.list_namespaced_service("demo").items] == ["web"]

    patched = core.patch_node("n1", {"metadata": {"labels": {"zone": "z2"}}})
    assert patched.metadata.labels == {"zone": "z2"}
    assert int(patched.metadata.resource_version) > int(created.metadata.resource_version)
    svc = core.patch_namespaced_service("web", "demo", {"spec": {"ports": [
        {"port": 80, "targetPort": 9090}]}})  # strategic merge: ports merge by port
    assert svc.spec.ports[0].target_port == 9090 and svc.spec.ports[0].protocol == "TCP"

    slice_ = disc.create_namespaced_endpoint_slice("demo", endpoint_slice("web-a", "web", "demo"))
    assert slice_.endpoints[0].addresses == ["198.18.0.1"]
    listed = disc.list_namespaced_endpoint_slice(
        "demo", label_selector="kubernetes.io/service-name=web")
    assert [s.metadata.name for s in listed.items] == ["web-a"]

    dep = apps.create_namespaced_deployment("demo", {
        "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": "img:1"}]}}}})
    assert dep.metadata.generation == 1
    status = apps.patch_namespaced_deployment_status(
        "web", "demo", {"status": {"readyReplicas": 1, "replicas": 1}})
    assert status.status.ready_replicas == 1 and status.metadata.generation == 1
    dep = apps.patch_namespaced_deployment("web", "demo", {"spec": {"template": {"spec": {
        "containers": [{"name": "c", "image": "img:2"}]}}}})
    assert dep.metadata.generation == 2 and dep.status.ready_replicas == 1

    with pytest.raises(client.ApiException) as err:
        core.create_namespaced_service("demo", service("web", "demo"))
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "AlreadyExists"

    assert core.delete_namespaced_service("web", "demo").metadata.name == "web"
    core.delete_node("n1")
    apps.delete_namespaced_deployment("web", "demo")
    for read in (lambda: core.read_namespaced_service("web", "demo"),
                 lambda: core.read_node("n1"),
                 lambda: apps.read_namespaced_deployment("web", "demo")):
        with pytest.raises(client.ApiException) as err:
            read()
        assert err.value.status == 404
        assert json.loads(err.value.body)["kind"] == "Status"


def test_python_client_pagination_is_consistent(server: ApiServer,
                                                api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    for i in range(7):
        server.create(service(f"svc-{i}"))
    first = core.list_namespaced_service("default", limit=3)
    assert [s.metadata.name for s in first.items] == ["svc-0", "svc-1", "svc-2"]
    assert first.metadata.remaining_item_count == 4
    server.delete("services", "default", "svc-3")  # after the first page: not seen
    server.create(service("svc-9"))
    names = [s.metadata.name for s in first.items]
    token = first.metadata._continue
    while token:
        page = core.list_namespaced_service("default", limit=3, _continue=token)
        assert page.metadata.resource_version == first.metadata.resource_version
        names += [s.metadata.name for s in page.items]
        token = page.metadata._continue
    assert names == [f"svc-{i}" for i in range(7)]
    latest = core.list_namespaced_service("default")
    assert int(latest.metadata.resource_version) == server.revision
    assert [s.metadata.name for s in latest.items][-1] == "svc-9"


def test_python_client_watch_sees_every_event_type_and_bookmarks(
    server: ApiServer, api: client.ApiClient
) -> None:
    core = client.CoreV1Api(api)
    server.create(service("old"))
    rv = core.list_namespaced_service("default").metadata.resource_version
    seen: list[tuple[str, str | None]] = []
    wanted = {("ADDED", "new"), ("MODIFIED", "old"), ("DELETED", "old"), ("BOOKMARK", None)}

    def writes() -> None:
        server.create(service("new"))
        server.patch("services", "default", "old", {"metadata": {"labels": {"x": "y"}}})
        server.delete("services", "default", "old")

    writer = threading.Thread(target=writes)
    writer.start()  # whenever the watch opens, it starts from rv: nothing is missed
    w = watch.Watch()
    try:
        for event in w.stream(core.list_namespaced_service, "default", resource_version=rv,
                              allow_watch_bookmarks=True, timeout_seconds=5,
                              _request_timeout=TIMEOUT):
            seen.append((event["type"], event["raw_object"]["metadata"].get("name")))
            if wanted <= set(seen):
                w.stop()
    finally:
        writer.join(TIMEOUT)
    assert wanted <= set(seen), seen
    assert seen.index(("ADDED", "new")) < seen.index(("MODIFIED", "old")) < seen.index(
        ("DELETED", "old"))
    assert w.resource_version == str(server.revision)  # bookmarks advance it too


def test_python_client_410_after_compaction(server: ApiServer, api: client.ApiClient) -> None:
    """Client 37: an ERROR 410 is retried once with the same stale RV, then ApiException."""
    core = client.CoreV1Api(api)
    server.create(service("a"))
    rv = core.list_namespaced_service("default").metadata.resource_version
    server.create(service("b"))
    server.faults.compact()
    before = len(server.requests)
    with pytest.raises(client.ApiException) as err:
        for _ in watch.Watch().stream(core.list_namespaced_service, "default",
                                      resource_version=rv, _request_timeout=TIMEOUT):
            pass
    assert err.value.status == 410
    assert "Expired: too old resource version" in str(err.value.reason)
    watches = [r for r in list(server.requests)[before:] if r.query.get("watch")]
    assert [r.query["resourceVersion"] for r in watches] == [rv, rv]


def test_bearer_token(tmp_path: Path) -> None:
    with ApiServer(token="s3cret") as server:
        try:
            status, _, body = http_request(server, "GET", "/api/v1/nodes")
            assert (status, body["reason"]) == (401, "Unauthorized")
            assert http_request(server, "GET", "/api/v1/nodes", token="wrong")[0] == 401
            assert http_request(server, "GET", "/api/v1/nodes", token="s3cret")[0] == 200
            cfg = client.Configuration()
            config.load_kube_config(config_file=str(server.write_kubeconfig(tmp_path / "kc")),
                                    client_configuration=cfg)
            with client.ApiClient(cfg) as api_client:
                assert client.CoreV1Api(api_client).list_node().items == []
        finally:
            stop_cleanly(server)


# --- kubectl --------------------------------------------------------------------------------


def kubectl_requests(server: ApiServer, since: int = 0) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in list(server.requests)[since:]
            if r.user_agent.startswith("kubectl/")]


def test_kubectl_get(server: ApiServer, kubectl: Kubectl) -> None:
    server.create(node("worker-1", zone="z1"))
    server.create(namespace("demo"))
    server.create(service("web", "demo"))
    server.create(pod("app-1", app="x"))
    server.create(pod("other", app="y"))

    table = kubectl("get", "nodes").stdout  # the server's Table (test_apiserver_kubectl)
    assert table.split()[:5] == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    assert table.splitlines()[1].split()[:3] == ["worker-1", "Unknown", "<none>"]
    listed = json.loads(kubectl("get", "svc", "-n", "demo", "-o", "json").stdout)
    assert [s["metadata"]["name"] for s in listed["items"]] == ["web"]
    assert listed["items"][0]["spec"]["ports"][0]["port"] == 80
    name = kubectl("get", "pods", "-l", "app=x", "-o",
                   "jsonpath={.items[0].metadata.name}").stdout
    assert name == "app-1"

    asked = kubectl_requests(server)
    # Aggregated discovery is asked for, answered with the legacy documents, and kubectl
    # falls back to walking every group version.
    for path in ("/api", "/apis", "/api/v1", "/apis/apps/v1", "/apis/discovery.k8s.io/v1"):
        assert ("GET", path) in asked, asked
    lists = [r for r in server.requests if r.path == "/api/v1/namespaces/default/pods"]
    assert lists[-1].query == {"labelSelector": "app=x", "limit": "500"}
    assert any(r.path == "/version" for r in server.requests)  # the dispatcher's question


DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: demo
  labels: {app: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: app
        image: IMAGE
        ports: [{containerPort: 80}]
        env: [{name: A, value: "1"}]
"""


def test_kubectl_create_apply_label_delete(server: ApiServer, kubectl: Kubectl) -> None:
    server.create(node("worker-1"))
    assert kubectl("create", "namespace", "demo").stdout.strip() == "namespace/demo created"
    assert server.get("namespaces", None, "demo")["status"]["phase"] == "Active"

    out = kubectl("apply", "--validate=false", "-f", "-",
                  stdin=DEPLOYMENT.replace("IMAGE", "img:1")).stdout
    assert out.strip() == "deployment.apps/web created"
    before = len(server.requests)
    changed = DEPLOYMENT.replace("IMAGE", "img:2").replace(
        'env: [{name: A, value: "1"}]', 'env: [{name: A, value: "1"}, {name: B, value: "2"}]')
    out = kubectl("apply", "--validate=false", "-f", "-", stdin=changed).stdout
    assert out.strip() == "deployment.apps/web configured"
    assert ("PATCH", "/apis/apps/v1/namespaces/demo/deployments/web") in kubectl_requests(
        server, before)
    dep = server.get("deployments", "demo", "web")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "img:2"
    assert container["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
    assert container["ports"] == [{"containerPort": 80}]
    assert dep["metadata"]["generation"] == 2
    assert "kubectl.kubernetes.io/last-applied-configuration" in dep["metadata"]["annotations"]
    revision = server.revision
    assert "unchanged" in kubectl("apply", "--validate=false", "-f", "-", stdin=changed).stdout
    assert server.revision == revision, "an apply that changes nothing writes nothing"

    kubectl("label", "node", "worker-1", "zone=z1")
    assert kubectl("label", "node", "worker-1", "zone=z2", "--overwrite").stdout.strip() == \
        "node/worker-1 labeled"
    assert server.get("nodes", None, "worker-1")["metadata"]["labels"] == {"zone": "z2"}
    assert kubectl("label", "node", "worker-1", "zone-").stdout.strip() == \
        "node/worker-1 unlabeled"
    assert not server.get("nodes", None, "worker-1")["metadata"].get("labels")

    out = kubectl("delete", "deployment", "web", "-n", "demo").stdout
    assert out.strip() == 'deployment.apps "web" deleted'
    assert server.list("deployments") == []


def test_kubectl_unknown_resource_fails_fast(server: ApiServer, kubectl: Kubectl) -> None:
    started = time.monotonic()
    proc = kubectl("get", "widgets", check=False)
    assert proc.returncode != 0
    assert 'the server doesn\'t have a resource type "widgets"' in proc.stderr
    proc = kubectl("get", "--raw", "/apis/example.com/v1/widgets", check=False)
    assert proc.returncode != 0
    assert "the server could not find the requested resource" in proc.stderr
    proc = kubectl("get", "deployment", "nope", "-n", "default", check=False)
    assert 'deployments.apps "nope" not found' in proc.stderr
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("minor", [27, 33])
def test_kubectl_dispatcher_follows_the_version(minor: int, tmp_path: Path) -> None:
    """kubectl 1.32+ send typed objects as protobuf: `create namespace` still works."""
    with ApiServer(version=(1, minor)) as server:
        try:
            run = make_kubectl(server, tmp_path)
            run("create", "namespace", "demo")
            run("create", "configmap", "settings", "-n", "demo", "--from-literal=k=v")
            assert server.get("configmaps", "demo", "settings")["data"] == {"k": "v"}
            agents = {r.user_agent.split()[0] for r in server.requests
                      if r.user_agent.startswith("kubectl/")}
            assert agents and all(a.startswith(f"kubectl/v1.{minor}.") for a in agents), agents
        finally:
            stop_cleanly(server)


def test_kubectl_with_a_token_over_tls(tmp_path: Path) -> None:
    """kubectl sends a kubeconfig's token only over https (client-go's clientcmd)."""
    if shutil.which("openssl") is None:
        missing("openssl is not installed")
    with ApiServer(token="s3cret", tls=True, version=(1, 30)) as server:
        try:
            assert server.url.startswith("https://127.0.0.1:")
            server.create(node("worker-1"))
            out = make_kubectl(server, tmp_path)("get", "nodes", "-o", "name").stdout
            assert out.strip() == "node/worker-1"
            assert any(r.user_agent.startswith("kubectl/v1.30.") for r in server.requests)
        finally:
            stop_cleanly(server)


# --- watches over HTTP ---------------------------------------------------------------------


def test_watch_streams_initial_state_then_changes(
    server: ApiServer, raw_watches: Callable[..., RawWatch]
) -> None:
    server.create(service("existing"))
    w = raw_watches(server, "/api/v1/namespaces/default/services?watch=true")
    assert w.status == 200
    assert kinds(w.events(1)) == [("ADDED", "existing")]  # resourceVersion unset
    server.create(service("new"))
    server.patch("services", "default", "new", {"metadata": {"labels": {"a": "b"}}})
    deleted = server.delete("services", "default", "existing")
    events = w.events(3)
    assert kinds(events) == [("ADDED", "new"), ("MODIFIED", "new"), ("DELETED", "existing")]
    assert events[2]["object"]["metadata"]["resourceVersion"] == \
        deleted["metadata"]["resourceVersion"]


def test_watch_selectors_add_and_delete_as_objects_move(
    server: ApiServer, raw_watches: Callable[..., RawWatch]
) -> None:
    rv = server.revision
    labels = raw_watches(server, f"/api/v1/pods?watch=1&resourceVersion={rv}"
                                 f"&labelSelector=app%3Dweb")
    fields = raw_watches(server, f"/api/v1/namespaces/default/pods?watch=1&resourceVersion={rv}"
                                 f"&fieldSelector=spec.nodeName%3Dn1")
    server.create(pod("p", node_name="n2", app="db"))
    server.patch("pods", "default", "p", {"metadata": {"labels": {"app": "web"}}})
    server.patch("pods", "default", "p", {"metadata": {"labels": {"app": "db"}}})
    server.create(pod("q", node_name="n1", app="web"))
    assert kinds(labels.events(3)) == [("ADDED", "p"), ("DELETED", "p"), ("ADDED", "q")]
    assert kinds(fields.events(1)) == [("ADDED", "q")]


def test_bookmarks_at_the_interval_and_before_the_timeout(
    raw_watches: Callable[..., RawWatch]
) -> None:
    with ApiServer(bookmark_interval=60) as server:
        try:
            w = raw_watches(server, f"/api/v1/nodes?watch=1&resourceVersion={server.revision}"
                                    f"&allowWatchBookmarks=true&timeoutSeconds=3")
            started = time.monotonic()
            event = w.next()
            assert event is not None and event["type"] == "BOOKMARK"
            assert event["object"] == {"kind": "Node", "apiVersion": "v1",
                                       "metadata": {"resourceVersion": str(server.revision)}}
            assert 0.5 < time.monotonic() - started < 2.5  # 2 s before the 3 s timeout
            assert w.next() is None and w.ended  # then the stream ends cleanly
            assert 2.5 < time.monotonic() - started < 5
        finally:
            stop_cleanly(server)
    with ApiServer(bookmark_interval=0.1) as server:
        try:
            w = raw_watches(server, f"/api/v1/nodes?watch=1&resourceVersion={server.revision}"
                                    f"&allowWatchBookmarks=1")
            assert [e["type"] for e in w.events(3)] == ["BOOKMARK"] * 3
        finally:
            stop_cleanly(server)


def test_a_watch_from_before_a_compaction_gets_an_error_event(
    server: ApiServer, raw_watches: Callable[..., RawWatch]
) -> None:
    old = server.revision
    server.create(node("n1"))
    floor = server.faults.compact()
    w = raw_watches(server, f"/api/v1/nodes?watch=1&resourceVersion={old}")
    assert w.status == 200  # as kube-apiserver: the error is an event
    (event,) = w.events(5)
    assert event["type"] == "ERROR"
    assert event["object"] == {"kind": "Status", "apiVersion": "v1", "metadata": {},
                               "status": "Failure", "reason": "Expired", "code": 410,
                               "message": f"too old resource version: {old} ({floor})"}
    assert w.ended
    fresh = raw_watches(server, f"/api/v1/nodes?watch=1&resourceVersion={floor}")
    server.create(node("n2"))
    assert kinds(fresh.events(1)) == [("ADDED", "n2")]


def test_a_continue_token_from_before_a_compaction_is_expired(server: ApiServer) -> None:
    for i in range(4):
        server.create(node(f"n{i}"))
    status, _, first = http_request(server, "GET", "/api/v1/nodes?limit=2")
    assert status == 200 and first["metadata"]["remainingItemCount"] == 2
    server.faults.compact()
    status, _, body = http_request(server, "GET", "/api/v1/nodes?limit=2&continue="
                                   + first["metadata"]["continue"])
    assert (status, body["reason"], body["code"]) == (410, "Expired", 410)
    assert body["message"].startswith("The provided continue parameter is too old to display "
                                      "a consistent list result.")
    status, _, rest = http_request(server, "GET", "/api/v1/nodes?continue="
                                   + body["metadata"]["continue"])  # the inconsistent token
    assert status == 200 and [n["metadata"]["name"] for n in rest["items"]] == ["n2", "n3"]


def test_dropped_watches_end_without_the_terminating_chunk(
    server: ApiServer, raw_watches: Callable[..., RawWatch]
) -> None:
    w = raw_watches(server, f"/api/v1/nodes?watch=1&resourceVersion={server.revision}")
    server.create(node("n1"))
    assert kinds(w.events(1)) == [("ADDED", "n1")]
    wait_for(lambda: server.open_watches == 1)
    assert server.faults.drop_watches() == 1
    with pytest.raises(Dropped):
        w.next()
    assert http_request(server, "GET", "/api/v1/nodes")[0] == 200  # the server itself lives


def wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_a_watch_its_client_abandoned_ends(
    server: ApiServer, raw_watches: Callable[..., RawWatch]
) -> None:
    w = raw_watches(server, f"/api/v1/nodes?watch=1&resourceVersion={server.revision}")
    wait_for(lambda: server.open_watches == 1)
    w.close()  # no event will come that would make the server notice by writing
    wait_for(lambda: server.open_watches == 0, timeout=5)


def test_deletecollection_and_dry_run(server: ApiServer) -> None:
    for name, app in (("a", "x"), ("b", "x"), ("c", "y")):
        server.create({"apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": {"name": name, "namespace": "default",
                                    "labels": {"app": app}}})
    revision = server.revision
    status, _, body = http_request(server, "POST", "/api/v1/namespaces/default/configmaps"
                                   "?dryRun=All", {"metadata": {"name": "d"}})
    assert status == 201 and body["metadata"]["name"] == "d"
    status, _, body = http_request(server, "DELETE", "/api/v1/namespaces/default/configmaps/a"
                                   "?dryRun=All")
    assert status == 200 and server.revision == revision
    status, _, body = http_request(server, "DELETE",
                                   "/api/v1/namespaces/default/configmaps?labelSelector=app%3Dx")
    assert status == 200 and body["kind"] == "ConfigMapList"
    assert [c["metadata"]["name"] for c in body["items"]] == ["a", "b"]
    assert [c["metadata"]["name"] for c in server.list("configmaps")] == ["c"]


def test_stop_and_start_on_the_same_port(server: ApiServer) -> None:
    server.create(node("n1"))
    port = server.port
    server.stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port),
                                                                         timeout=TIMEOUT):
        pass
    server.create(node("n2"))  # the in-process API works while the port is closed
    server.start()
    assert server.port == port
    status, _, body = http_request(server, "GET", "/api/v1/nodes")
    assert status == 200
    assert [n["metadata"]["name"] for n in body["items"]] == ["n1", "n2"]


def test_restart_with_a_new_history_expires_every_version(
    server: ApiServer, raw_watches: Callable[..., RawWatch]
) -> None:
    server.create(node("n1"))
    held = server.revision
    server.restart(new_history=True)
    assert server.revision > held
    w = raw_watches(server, f"/api/v1/nodes?watch=1&resourceVersion={held}")
    (event,) = w.events(2)
    assert event["type"] == "ERROR" and event["object"]["code"] == 410
    status, _, body = http_request(server, "GET", "/api/v1/nodes")
    assert status == 200 and int(body["metadata"]["resourceVersion"]) == server.revision
    assert [n["metadata"]["name"] for n in body["items"]] == ["n1"]  # the objects stay
    server.restart(new_history=False)
    assert kinds(raw_watches(server, f"/api/v1/nodes?watch=1&resourceVersion={server.revision}"
                                     f"&timeoutSeconds=1").events(1)) == []


# --- faults, errors, auth ---------------------------------------------------------------------


def test_injected_failures(server: ApiServer) -> None:
    server.faults.fail(2, status=429, retry_after=3, match=r"^/api/v1/nodes$")
    server.faults.fail(1, status=500)
    status, headers, body = http_request(server, "GET", "/api/v1/nodes")
    assert (status, headers["Retry-After"], body["reason"]) == (429, "3", "TooManyRequests")
    assert body["details"] == {"retryAfterSeconds": 3}
    status, _, body = http_request(server, "GET", "/api/v1/namespaces")  # not matched: 500
    assert (status, body["reason"]) == (500, "InternalError")
    assert http_request(server, "GET", "/api/v1/nodes")[0] == 429
    assert http_request(server, "GET", "/api/v1/nodes")[0] == 200
    assert server.faults.pending == 0
    server.faults.fail(1, status=503)
    status, headers, body = http_request(server, "GET", "/version")
    assert (status, body["reason"], headers["Retry-After"]) == (503, "ServiceUnavailable", None)


def test_latency(server: ApiServer) -> None:
    server.faults.latency = 0.3
    started = time.monotonic()
    assert http_request(server, "GET", "/api/v1/nodes")[0] == 200
    assert time.monotonic() - started >= 0.3
    server.faults.clear()
    started = time.monotonic()
    http_request(server, "GET", "/api/v1/nodes")
    assert time.monotonic() - started < 0.3


@pytest.mark.parametrize(
    ("method", "path", "body", "code", "reason", "message"),
    [
        ("GET", "/api/v1/widgets", None, 404, "NotFound",
         "the server could not find the requested resource"),
        ("GET", "/apis/example.com/v1/widgets", None, 404, "NotFound",
         "the server could not find the requested resource"),
        ("GET", "/api/v1/pods/x", None, 404, "NotFound",
         "the server could not find the requested resource"),
        ("POST", "/api/v1/nodes/n1", {}, 405, "MethodNotAllowed",
         "the server does not allow this method on the requested resource"),
        ("PUT", "/api/v1/namespaces/default/services", {}, 405, "MethodNotAllowed",
         "the server does not allow this method on the requested resource"),
        ("GET", "/api/v1/nodes?labelSelector=a%20in%20b", None, 400, "BadRequest", None),
        ("GET", "/api/v1/nodes?fieldSelector=spec.nodeName%3Dx", None, 400, "BadRequest",
         "field label not supported: spec.nodeName"),
        ("POST", "/api/v1/namespaces/default/services",
         {"metadata": {"name": "x", "namespace": "other"}}, 400, "BadRequest",
         "the namespace of the provided object does not match the namespace sent on the "
         "request"),
        ("POST", "/api/v1/namespaces/nowhere/services", {"metadata": {"name": "x"}}, 404,
         "NotFound", 'namespaces "nowhere" not found'),
        ("GET", "/api/v1/namespaces/default/services/x", None, 404, "NotFound",
         'services "x" not found'),
        ("GET", "/openapi/v3/apis/example.com/v1", None, 404, "NotFound",
         "the server could not find the requested resource"),
        ("GET", "/openapi/v1", None, 404, "NotFound",
         "the server could not find the requested resource"),
        ("GET", "/apis/apps/v1/namespaces/default/deployments/x/scale?watch=1", None, 405,
         "MethodNotAllowed", "the server does not allow this method on the requested "
                             "resource"),
        ("POST", "/api/v1/namespaces?fieldValidation=Loud", {"metadata": {"name": "x"}}, 400,
         "BadRequest", 'fieldValidation: Unsupported value: "Loud": supported values: '
                       '"Ignore", "Strict", "Warn"'),
    ],
)
def test_errors_are_status_objects(server: ApiServer, method: str, path: str, body: Any,
                                   code: int, reason: str, message: str | None) -> None:
    started = time.monotonic()
    status, headers, answer = http_request(server, method, path, body)
    assert time.monotonic() - started < 2
    assert status == code and headers["Content-Type"] == "application/json"
    assert answer["kind"] == "Status" and answer["apiVersion"] == "v1"
    assert answer["status"] == "Failure" and answer["metadata"] == {}
    assert (answer["code"], answer["reason"]) == (code, reason)
    if message is not None:
        assert answer["message"] == message


def test_stale_update_is_a_conflict_and_patch_types(server: ApiServer) -> None:
    created = server.create(node("n1"))
    server.patch("nodes", None, "n1", {"metadata": {"labels": {"a": "1"}}}, "merge")
    status, _, body = http_request(server, "PUT", "/api/v1/nodes/n1", created)
    assert (status, body["reason"]) == (409, "Conflict")
    assert body["message"].startswith('Operation cannot be fulfilled on nodes "n1"')
    status, _, patched = http_request(server, "PATCH", "/api/v1/nodes/n1",
                                      [{"op": "add", "path": "/metadata/labels/b", "value": "2"}],
                                      "application/json-patch+json")
    assert status == 200 and patched["metadata"]["labels"] == {"a": "1", "b": "2"}
    status, _, body = http_request(server, "PATCH", "/api/v1/nodes/n1", {},
                                   "application/apply-patch+yaml")
    assert (status, body["reason"]) == (415, "UnsupportedMediaType")


def test_discovery_documents(server: ApiServer) -> None:
    _, _, version = http_request(server, "GET", "/version")
    assert (version["major"], version["minor"], version["gitVersion"]) == ("1", "31", "v1.31.0")
    _, _, groups = http_request(server, "GET", "/apis")
    assert [g["name"] for g in groups["groups"]] == ["discovery.k8s.io", "apps"]
    _, _, core = http_request(server, "GET", "/api/v1")
    by_name = {r["name"]: r for r in core["resources"]}
    assert by_name["pods"]["shortNames"] == ["po"] and by_name["pods"]["namespaced"]
    assert by_name["pods/status"]["verbs"] == ["get", "patch", "update"]
    assert not by_name["nodes"]["namespaced"] and "watch" in by_name["nodes"]["verbs"]


# --- performance -----------------------------------------------------------------------------


def test_watch_event_latency(server: ApiServer, raw_watches: Callable[..., RawWatch]) -> None:
    server.create(node("n1"))
    w = raw_watches(server, f"/api/v1/nodes?watch=1&resourceVersion={server.revision}")
    latencies = []
    for i in range(100):
        written = time.perf_counter()
        server.patch("nodes", None, "n1", {"metadata": {"labels": {"seq": str(i)}}}, "merge")
        event = w.next()
        latencies.append(time.perf_counter() - written)
        assert event is not None and event["object"]["metadata"]["labels"]["seq"] == str(i)
    median = statistics.median(latencies)
    print(f"write -> watch event: median {median * 1e3:.2f} ms, "
          f"max {max(latencies) * 1e3:.2f} ms over {len(latencies)} events")
    assert median < 0.005


def test_listing_ten_thousand_services_and_slices_is_fast(server: ApiServer) -> None:
    server.create(namespace("bench"))
    for i in range(10_000):
        server.create(service(f"svc-{i:05d}", "bench"))
        server.create(endpoint_slice(f"svc-{i:05d}-a", f"svc-{i:05d}", "bench", endpoints=10))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        started = time.perf_counter()
        counts = []
        for path in ("/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices"):
            token, items, rv = "", 0, None
            while True:
                query = "?limit=500" + (f"&continue={token}" if token else "")
                conn.request("GET", path + query)
                body = conn.getresponse().read()
                meta_end = body.index(b',"items":[')
                meta = json.loads(body[body.index(b'"metadata":') + 11:meta_end])
                rv = rv or meta["resourceVersion"]
                assert meta["resourceVersion"] == rv
                items += body.count(b'{"kind":"', meta_end)
                token = meta.get("continue")
                if not token:
                    break
            counts.append(items)
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    print(f"paginated list of 10k Services + 10k EndpointSlices: {elapsed * 1e3:.0f} ms")
    assert counts == [10_000, 10_000]
    assert elapsed < 1.0


def test_urllib_sees_the_same_server(server: ApiServer) -> None:
    """A plain client without keep-alive: each request its own connection."""
    with urllib.request.urlopen(server.url + "/healthz", timeout=TIMEOUT) as resp:
        assert resp.read() == b"ok"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.url + "/api/v1/widgets", timeout=TIMEOUT)
    assert err.value.code == 404
    err.value.close()
