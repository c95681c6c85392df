"""The lab's API server against the real kubectl beyond the basics of test_apiserver: the
server-side Table columns ``kubectl get`` prints, ``apply``/``create -f`` with kubectl's
default (server-side, strict) field validation through ``/openapi/v3``, ``scale``,
``rollout status``, ``wait``, the commands the server does not serve (an error at once, never
a hang) and the ``after_write`` hook. Plus unit tests of the table cells.

Every kubectl call has a timeout (test_apiserver.make_kubectl) and every server is stopped
at the end of its test with no thread left behind. kubectl tests skip without kubectl (fail
under KMESH_REQUIRE_BPF=1).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_apiserver import DEPLOYMENT as BASE_DEPLOYMENT
from test_apiserver import (
    Kubectl,
    endpoint_slice,
    http_request,
    make_kubectl,
    namespace,
    node,
    pod,
    service,
    stop_cleanly,
)

from kmesh_lab.apiserver import ApiServer, tables
from kmesh_lab.apiserver.selectors import SelectorError, format_label_selector

TABLE_ACCEPT = ("application/json;as=Table;v=v1;g=meta.k8s.io,"
                "application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json")
AGE = re.compile(r"^\d+s$")


@pytest.fixture
def server() -> Iterator[ApiServer]:
    s = ApiServer(bookmark_interval=0.5).start()
    try:
        yield s
    finally:
        stop_cleanly(s)


@pytest.fixture
def kubectl(server: ApiServer, tmp_path: Path) -> Kubectl:
    return make_kubectl(server, tmp_path)


def columns(out: str) -> list[dict[str, str]]:
    """kubectl's human output as one dict per row, cut at the header's column starts (a
    header may hold a space, e.g. NOMINATED NODE; a cell may be empty)."""
    lines = [line for line in out.splitlines() if line.strip()]
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"\S+(?: \S+)*", header)]
    names = [header[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() if b else line[a:].strip()
                 for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


def header(out: str) -> list[str]:
    return re.findall(r"\S+(?: \S+)*", out.splitlines()[0])


def without_age(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    for row in rows:
        assert AGE.match(row.pop("AGE")), row
    return rows


def ready_node(name: str, **labels: str) -> dict[str, Any]:
    obj = node(name, **labels)
    obj["status"] = {
        "conditions": [{"type": "MemoryPressure", "status": "False"},
                       {"type": "Ready", "status": "True"}],
        "addresses": [{"type": "Hostname", "address": name},
                      {"type": "InternalIP", "address": "10.0.0.1"}],
        "nodeInfo": {"kubeletVersion": "v1.31.2", "osImage": "Debian GNU/Linux 12 (bookworm)",
                     "kernelVersion": "6.1.0-18-amd64",
                     "containerRuntimeVersion": "containerd://1.6.20"},
    }
    return obj


def put(server: ApiServer, obj: dict[str, Any]) -> dict[str, Any]:
    """Create, then write the status the create dropped (kinds with a status subresource)."""
    status = obj.pop("status", None)
    created = server.create(obj)
    if status is None:
        return created
    return server.update_status({**created, "status": status})


def rfc3339(seconds_ago: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds_ago))


def running(obj: dict[str, Any], ip: str, restarts: int = 0) -> dict[str, Any]:
    status: dict[str, Any] = {"ready": True, "restartCount": restarts, "name": "c",
                              "state": {"running": {"startedAt": rfc3339(5)}}}
    if restarts:
        status["lastState"] = {"terminated": {"exitCode": 1, "finishedAt": rfc3339(130)}}
    obj["status"] = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                     "conditions": [{"type": "Ready", "status": "True"}],
                     "containerStatuses": [status]}
    return obj


# --- tables --------------------------------------------------------------------------------


def test_get_nodes_prints_the_server_columns(server: ApiServer, kubectl: Kubectl) -> None:
    put(server, ready_node("control", **{"node-role.kubernetes.io/control-plane": "",
                                         "kubernetes.io/role": "master"}))
    other = node("worker-1", zone="z1")
    other["spec"] = {"unschedulable": True}
    other["status"] = {"conditions": [{"type": "Ready", "status": "False"}]}
    put(server, other)
    server.create(node("worker-2"))

    out = kubectl("get", "nodes").stdout
    assert header(out) == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    assert without_age(columns(out)) == [
        {"NAME": "control", "STATUS": "Ready", "ROLES": "control-plane,master",
         "VERSION": "v1.31.2"},
        {"NAME": "worker-1", "STATUS": "NotReady,SchedulingDisabled", "ROLES": "<none>",
         "VERSION": ""},
        {"NAME": "worker-2", "STATUS": "Unknown", "ROLES": "<none>", "VERSION": ""},
    ]
    out = kubectl("get", "nodes", "-o", "wide", "-l", "zone!=z1").stdout
    assert header(out) == ["NAME", "STATUS", "ROLES", "AGE", "VERSION", "INTERNAL-IP",
                           "EXTERNAL-IP", "OS-IMAGE", "KERNEL-VERSION", "CONTAINER-RUNTIME"]
    rows = without_age(columns(out))
    assert rows[0] == {
        "NAME": "control", "STATUS": "Ready", "ROLES": "control-plane,master",
        "VERSION": "v1.31.2", "INTERNAL-IP": "10.0.0.1", "EXTERNAL-IP": "<none>",
        "OS-IMAGE": "Debian GNU/Linux 12 (bookworm)", "KERNEL-VERSION": "6.1.0-18-amd64",
        "CONTAINER-RUNTIME": "containerd://1.6.20"}
    assert rows[1]["NAME"] == "worker-2" and rows[1]["OS-IMAGE"] == "<unknown>"
    assert len(rows) == 2

    out = kubectl("get", "nodes", "--show-labels", "-L", "zone").stdout
    assert header(out) == ["NAME", "STATUS", "ROLES", "AGE", "VERSION", "ZONE", "LABELS"]
    by_name = {r["NAME"]: r for r in columns(out)}
    assert by_name["worker-1"]["ZONE"] == "z1" and by_name["worker-1"]["LABELS"] == "zone=z1"
    assert by_name["worker-2"]["ZONE"] == "" and by_name["worker-2"]["LABELS"] == "<none>"
    assert kubectl("get", "node", "worker-1", "--no-headers").stdout.split()[:3] == [
        "worker-1", "NotReady,SchedulingDisabled", "<none>"]


def test_get_pods_ready_status_restarts(server: ApiServer, kubectl: Kubectl) -> None:
    server.create(namespace("demo"))
    put(server, running(pod("app-1", "worker-1", app="x"), "10.244.1.5"))
    put(server, running(pod("app-2", "worker-1", app="x"), "10.244.1.6", restarts=3))
    crashing = pod("crash", "worker-1", app="y")
    crashing["status"] = {"phase": "Running", "containerStatuses": [
        {"name": "c", "ready": False, "restartCount": 7,
         "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}
    put(server, crashing)
    done = pod("done", "worker-1")
    done["status"] = {"phase": "Succeeded", "containerStatuses": [
        {"name": "c", "ready": False, "restartCount": 0,
         "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}
    put(server, done)
    server.create(pod("pending"))  # no status at all: Pending, as the real defaulting says
    other = pod("elsewhere", "worker-2")
    other["metadata"]["namespace"] = "demo"
    server.create(other)

    out = kubectl("get", "pods").stdout
    assert header(out) == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    rows = without_age(columns(out))
    assert rows[0] == {"NAME": "app-1", "READY": "1/1", "STATUS": "Running", "RESTARTS": "0"}
    assert rows[1]["READY"] == "1/1" and re.fullmatch(r"3 \(2m1\ds ago\)", rows[1]["RESTARTS"])
    assert rows[2:] == [
        {"NAME": "crash", "READY": "0/1", "STATUS": "CrashLoopBackOff", "RESTARTS": "7"},
        {"NAME": "done", "READY": "0/1", "STATUS": "Completed", "RESTARTS": "0"},
        {"NAME": "pending", "READY": "0/1", "STATUS": "Pending", "RESTARTS": "0"},
    ]

    out = kubectl("get", "pods", "-o", "wide", "-l", "app=x").stdout
    assert header(out) == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE",
                           "NOMINATED NODE", "READINESS GATES"]
    first = columns(out)[0]
    assert (first["NAME"], first["IP"], first["NODE"], first["NOMINATED NODE"],
            first["READINESS GATES"]) == ("app-1", "10.244.1.5", "worker-1", "<none>", "<none>")
    assert [r["NAME"] for r in columns(out)] == ["app-1", "app-2"]

    out = kubectl("get", "pods", "-A").stdout
    assert header(out) == ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert [(r["NAMESPACE"], r["NAME"]) for r in columns(out)] == [
        ("default", "app-1"), ("default", "app-2"), ("default", "crash"),
        ("default", "done"), ("default", "pending"), ("demo", "elsewhere")]
    out = kubectl("get", "pods", "-n", "demo", "-L", "app", "--show-labels").stdout
    assert header(out) == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "APP", "LABELS"]

    server.delete("pods", "default", "app-1", grace_period_seconds=30)
    row = columns(kubectl("get", "pod", "app-1").stdout)
    assert len(row) == 1 and row[0]["STATUS"] == "Terminating"

    # The other output formats are the objects, never the Table.
    listed = json.loads(kubectl("get", "pods", "-l", "app=x", "-o", "json").stdout)
    assert listed["kind"] == "List" and listed["items"][0]["kind"] == "Pod"
    assert kubectl("get", "pod", "app-2", "-o", "jsonpath={.status.podIP}").stdout == \
        "10.244.1.6"
    assert "kind: Pod" in kubectl("get", "pod", "app-2", "-o", "yaml").stdout
    assert kubectl("get", "pods", "-o", "name", "-l", "app=x").stdout.split() == [
        "pod/app-1", "pod/app-2"]


def test_get_services_deployments_slices_namespaces(server: ApiServer,
                                                    kubectl: Kubectl) -> None:
    server.create(namespace("demo"))
    web = service("web", "demo")
    web["spec"].update(clusterIP="10.96.0.10", clusterIPs=["10.96.0.10"])
    web["spec"]["ports"] = [{"port": 5000, "protocol": "TCP"},
                            {"port": 53, "protocol": "UDP", "name": "dns"}]
    server.create(web)
    lb = service("edge", "demo")
    lb["spec"].update(type="LoadBalancer", clusterIP="10.96.0.11", clusterIPs=["10.96.0.11"],
                      selector={"app": "edge", "tier": "front"})
    lb["spec"]["ports"] = [{"port": 80, "nodePort": 30080, "protocol": "TCP"}]
    server.create(lb)
    out = kubectl("get", "svc", "-n", "demo", "-o", "wide").stdout
    assert header(out) == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE",
                           "SELECTOR"]
    assert without_age(columns(out)) == [
        {"NAME": "edge", "TYPE": "LoadBalancer", "CLUSTER-IP": "10.96.0.11",
         "EXTERNAL-IP": "<pending>", "PORT(S)": "80:30080/TCP",
         "SELECTOR": "app=edge,tier=front"},
        {"NAME": "web", "TYPE": "ClusterIP", "CLUSTER-IP": "10.96.0.10", "EXTERNAL-IP": "<none>",
         "PORT(S)": "5000/TCP,53/UDP", "SELECTOR": "app=web"},
    ]

    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "demo"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}, "matchExpressions": [
                     {"key": "tier", "operator": "In", "values": ["b", "a"]}]},
                 "template": {"metadata": {"labels": {"app": "web", "tier": "a"}},
                              "spec": {"containers": [{"name": "app", "image": "img:1"},
                                                      {"name": "side", "image": "proxy:2"}]}}},
    }
    server.create(deployment)
    server.patch("deployments", "demo", "web", {"status": {
        "replicas": 2, "updatedReplicas": 2, "readyReplicas": 1, "availableReplicas": 1}},
        "merge", "status")
    out = kubectl("get", "deployments", "-n", "demo", "-o", "wide").stdout
    assert header(out) == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE", "CONTAINERS",
                           "IMAGES", "SELECTOR"]
    assert without_age(columns(out)) == [
        {"NAME": "web", "READY": "1/2", "UP-TO-DATE": "2", "AVAILABLE": "1",
         "CONTAINERS": "app,side", "IMAGES": "img:1,proxy:2",
         "SELECTOR": "app=web,tier in (a,b)"}]

    server.create(endpoint_slice("web-abc", "web", "demo", endpoints=4))
    out = kubectl("get", "endpointslices", "-n", "demo").stdout
    assert header(out) == ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"]
    assert without_age(columns(out)) == [
        {"NAME": "web-abc", "ADDRESSTYPE": "IPv4", "PORTS": "8080",
         "ENDPOINTS": "198.18.0.1,198.18.0.2,198.18.0.3 + 1 more..."}]

    out = kubectl("get", "namespaces").stdout
    assert header(out) == ["NAME", "STATUS", "AGE"]
    assert without_age(columns(out)) == [{"NAME": "default", "STATUS": "Active"},
                                         {"NAME": "demo", "STATUS": "Active"}]
    kubectl("create", "configmap", "settings", "-n", "demo", "--from-literal=a=1",
            "--from-literal=b=2")
    out = kubectl("get", "cm", "-n", "demo").stdout
    assert header(out) == ["NAME", "DATA", "AGE"]
    assert without_age(columns(out)) == [{"NAME": "settings", "DATA": "2"}]


def test_get_watch_prints_table_rows(server: ApiServer, kubectl: Kubectl) -> None:
    server.create(pod("a"))
    later(1.5, lambda: server.create(pod("b")))
    started = time.monotonic()
    out = kubectl("get", "pods", "-w", "--request-timeout=4s").stdout
    assert time.monotonic() - started < 15
    rows = without_age(columns(out))  # one header: every event's Table has the same columns
    assert rows == [{"NAME": n, "READY": "0/1", "STATUS": "Pending", "RESTARTS": "0"}
                    for n in ("a", "b")]
    watches = [r for r in server.requests if r.query.get("watch") in ("1", "true")]
    assert watches and watches[-1].path == "/api/v1/namespaces/default/pods"


def test_the_table_on_the_wire(server: ApiServer) -> None:
    for i in range(3):
        server.create(node(f"n{i}", role="x"))
    code, headers, table = http_request(server, "GET", "/api/v1/nodes?limit=2",
                                        accept=TABLE_ACCEPT)
    assert code == 200 and headers["Content-Type"].startswith("application/json;as=Table")
    assert table["kind"] == "Table" and table["apiVersion"] == "meta.k8s.io/v1"
    assert table["metadata"]["resourceVersion"] == str(server.revision)
    assert table["metadata"]["continue"] and table["metadata"]["remainingItemCount"] == 1
    assert [(c["name"], c["priority"]) for c in table["columnDefinitions"]] == [
        ("Name", 0), ("Status", 0), ("Roles", 0), ("Age", 0), ("Version", 0),
        ("Internal-IP", 1), ("External-IP", 1), ("OS-Image", 1), ("Kernel-Version", 1),
        ("Container-Runtime", 1)]
    assert table["columnDefinitions"][0]["format"] == "name"
    row = table["rows"][0]
    assert row["cells"][:3] == ["n0", "Unknown", "<none>"] and len(row["cells"]) == 10
    assert row["object"]["kind"] == "PartialObjectMetadata"
    assert row["object"]["apiVersion"] == "meta.k8s.io/v1"
    assert row["object"]["metadata"]["labels"] == {"role": "x"}

    for include, expect in (("None", None), ("Object", "Node"), ("Metadata",
                                                                  "PartialObjectMetadata")):
        _, _, table = http_request(server, "GET", f"/api/v1/nodes/n1?includeObject={include}",
                                   accept=TABLE_ACCEPT)
        obj = table["rows"][0]["object"]
        assert (obj and obj["kind"]) == expect
    code, _, status = http_request(server, "GET", "/api/v1/nodes?includeObject=All",
                                   accept=TABLE_ACCEPT)
    assert code == 400 and status["kind"] == "Status"
    _, _, table = http_request(server, "GET", "/api/v1/nodes/n1",
                               accept="application/json;as=Table;v=v1beta1;g=meta.k8s.io")
    assert table["apiVersion"] == "meta.k8s.io/v1beta1"
    _, _, plain = http_request(server, "GET", "/api/v1/nodes/n1")
    assert plain["kind"] == "Node"


# --- table cells ---------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (-5, "<invalid>"), (-1, "0s"), (0, "0s"), (59.9, "59s"), (119, "119s"), (120, "2m"),
    (125, "2m5s"), (599, "9m59s"), (600, "10m"), (3 * 3600 - 1, "179m"), (3 * 3600, "3h"),
    (3 * 3600 + 120, "3h2m"), (8 * 3600, "8h"), (47 * 3600, "47h"), (48 * 3600, "2d"),
    (50 * 3600, "2d2h"), (8 * 86400, "8d"), (729 * 86400, "729d"), (730 * 86400, "2y"),
    (731 * 86400, "2y1d"), (8 * 365 * 86400, "8y"),
])
def test_human_duration(seconds: float, text: str) -> None:
    assert tables.human_duration(seconds) == text


def test_age_and_timestamps() -> None:
    at = tables.parse_time("2024-01-01T00:00:00Z")
    assert at == 1704067200.0
    assert tables.parse_time("2024-01-01T01:00:00.5+01:00") == at + 0.5
    assert tables.parse_time("yesterday") is None
    assert tables.age("2024-01-01T00:00:00Z", now=at + 3 * 86400 + 3600) == "3d1h"
    assert tables.age(None) == "<unknown>"


def test_label_selector_strings() -> None:
    assert format_label_selector(None) == ""
    assert format_label_selector({"matchLabels": {"b": "2", "a": "1"}}) == "a=1,b=2"
    assert format_label_selector({"matchExpressions": [
        {"key": "z", "operator": "Exists"}, {"key": "y", "operator": "DoesNotExist"},
        {"key": "x", "operator": "NotIn", "values": ["q", "p"]}]}) == "x notin (p,q),!y,z"
    with pytest.raises(SelectorError):
        format_label_selector({"matchExpressions": [{"key": "k", "operator": "Near"}]})


def test_pod_cells() -> None:
    base = {"metadata": {"name": "p", "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}],
                     "initContainers": [{"name": "init"}],
                     "readinessGates": [{"conditionType": "x/ready"}]}}
    now = 1704067200.0 + 90
    init = {**base, "status": {"phase": "Pending", "initContainerStatuses": [
        {"name": "init", "restartCount": 2,
         "state": {"waiting": {"reason": "PodInitializing"}}}]}}
    cells, _ = tables.pod_cells(init, now)
    assert cells[:5] == ["p", "0/2", "Init:0/1", "2", "90s"]
    assert cells[8] == "0/1"
    failed_init = {**base, "status": {"phase": "Pending", "initContainerStatuses": [
        {"name": "init", "state": {"terminated": {"exitCode": 3}}}]}}
    assert tables.pod_cells(failed_init, now)[0][2] == "Init:ExitCode:3"
    evicted = {**base, "status": {"phase": "Failed", "reason": "Evicted"}}
    assert tables.pod_cells(evicted, now)[0][2] == "Evicted"
    assert tables.print_pod(evicted)["conditions"][0]["reason"] == "Failed"
    half = {**base, "status": {"phase": "Running", "conditions": [
        {"type": "x/ready", "status": "True"}], "containerStatuses": [
        {"name": "a", "ready": True, "state": {"running": {}}},
        {"name": "b", "ready": False, "state": {"terminated": {"exitCode": 0,
                                                             "reason": "Completed"}}}]}}
    cells, _ = tables.pod_cells(half, now)
    assert cells[1:3] == ["1/2", "NotReady"] and cells[8] == "1/1"
    sidecar = {"metadata": {"name": "s"}, "spec": {
        "containers": [{"name": "a"}],
        "initContainers": [{"name": "i", "restartPolicy": "Always"}]},
        "status": {"phase": "Running", "initContainerStatuses": [
            {"name": "i", "started": True, "ready": True, "state": {"running": {}}}],
            "containerStatuses": [{"name": "a", "ready": True, "state": {"running": {}}}]}}
    cells, _ = tables.pod_cells(sidecar, now)
    assert cells[1:5] == ["2/2", "Running", "0", "<unknown>"]


def test_table_accept_parsing() -> None:
    assert tables.table_version(TABLE_ACCEPT) == "meta.k8s.io/v1"
    assert tables.table_version("application/json") is None
    assert tables.table_version("") is None
    assert tables.table_version("application/json;as=Table;v=v2;g=meta.k8s.io") is None


# --- apply, create -f with kubectl's default validation ------------------------------------

DEPLOYMENT = BASE_DEPLOYMENT.replace("replicas: 1", "replicas: 2")


def kubectl_writes(server: ApiServer, since: int = 0) -> list[tuple[str, str, dict[str, str]]]:
    return [(r.method, r.path, r.query) for r in list(server.requests)[since:]
            if r.user_agent.startswith("kubectl/") and r.method not in ("GET", "HEAD")]


@pytest.mark.parametrize("minor", [27, 31, 33])
def test_apply_and_create_with_default_validation(minor: int, tmp_path: Path) -> None:
    with ApiServer(version=(1, minor)) as server:
        try:
            run = make_kubectl(server, tmp_path)
            assert run("create", "namespace", "demo").stdout.strip() == "namespace/demo created"
            out = run("apply", "-f", "-", stdin=DEPLOYMENT.replace("IMAGE", "img:1")).stdout
            assert out.strip() == "deployment.apps/web created"
            (post,) = kubectl_writes(server)[1:]
            assert post[:2] == ("POST", "/apis/apps/v1/namespaces/demo/deployments")
            assert post[2]["fieldValidation"] == "Strict"
            assert any(r.path == "/openapi/v3" for r in server.requests)

            before = len(server.requests)
            changed = DEPLOYMENT.replace("IMAGE", "img:2").replace(
                'env: [{name: A, value: "1"}]',
                'env: [{name: A, value: "1"}, {name: B, value: "2"}]')
            proc = run("apply", "-f", "-", stdin=changed)
            assert proc.stdout.strip() == "deployment.apps/web configured"
            assert proc.stderr == ""
            (patch,) = kubectl_writes(server, before)
            assert patch[:2] == ("PATCH", "/apis/apps/v1/namespaces/demo/deployments/web")
            assert patch[2]["fieldValidation"] == "Strict"
            dep = server.get("deployments", "demo", "web")
            (container,) = dep["spec"]["template"]["spec"]["containers"]
            assert container["image"] == "img:2"
            assert container["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
            assert container["ports"] == [{"containerPort": 80}]
            assert dep["metadata"]["generation"] == 2
            revision = server.revision
            out = run("apply", "-f", "-", stdin=changed).stdout
            assert out.strip() == "deployment.apps/web unchanged"
            assert server.revision == revision

            # Strict (the default) refuses an unknown field, warn drops it with a warning.
            bogus = changed.replace("spec:\n  replicas", "bogus: 1\nspec:\n  replicas", 1)
            proc = run("apply", "-f", "-", stdin=bogus, check=False)
            assert proc.returncode != 0
            assert 'strict decoding error: unknown field "bogus"' in proc.stderr
            assert server.revision == revision
            proc = run("apply", "--validate=warn", "-f", "-", stdin=bogus)
            assert 'Warning: unknown field "bogus"' in proc.stderr
            assert "bogus" not in server.get("deployments", "demo", "web")
            proc = run("apply", "--validate=false", "-f", "-",
                       stdin=changed.replace("img:2", "img:3"))
            assert proc.stdout.strip() == "deployment.apps/web configured"

            cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: demo}\n" \
                 "data: {k: v}\n"
            assert run("create", "-f", "-", stdin=cm).stdout.strip() == "configmap/c created"
            proc = run("create", "-f", "-", stdin=cm.replace("data:", "datum:"), check=False)
            assert 'unknown field "datum"' in proc.stderr
            proc = run("create", "-f", "-", stdin=cm.replace("name: c,", "name: c, nick: x,")
                       .replace("{name: c", "{name: d"), check=False)
            assert 'unknown field "metadata.nick"' in proc.stderr, proc.stderr
        finally:
            stop_cleanly(server)


def test_openapi_documents(server: ApiServer) -> None:
    code, _, root = http_request(server, "GET", "/openapi/v3")
    assert code == 200
    assert set(root["paths"]) == {"api/v1", "apis/apps/v1", "apis/discovery.k8s.io/v1"}
    url = root["paths"]["apis/apps/v1"]["serverRelativeURL"]
    assert url.startswith("/openapi/v3/apis/apps/v1?hash=")
    code, _, doc = http_request(server, "GET", url)
    assert code == 200 and doc["openapi"].startswith("3.")
    patch = doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"]
    assert patch["x-kubernetes-group-version-kind"] == {"group": "apps", "version": "v1",
                                                        "kind": "Deployment"}
    assert "fieldValidation" in [p["name"] for p in patch["parameters"]]
    scale = doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale"]
    assert scale["put"]["x-kubernetes-group-version-kind"]["kind"] == "Scale"
    schema = doc["components"]["schemas"]["io.k8s.api.apps.v1.Deployment"]
    assert schema["x-kubernetes-group-version-kind"] == [
        {"group": "apps", "version": "v1", "kind": "Deployment"}]
    code, _, core = http_request(server, "GET", "/openapi/v3/api/v1")
    assert "/api/v1/nodes/{name}" in core["paths"]
    assert "/api/v1/namespaces/{namespace}/pods/{name}/status" in core["paths"]
    assert http_request(server, "GET", "/openapi/v3/apis/example.com/v1")[0] == 404
    code, _, swagger = http_request(server, "GET", "/openapi/v2")
    assert code == 200 and swagger["swagger"] == "2.0"
    patch = swagger["paths"]["/api/v1/nodes/{name}"]["patch"]
    assert patch["x-kubernetes-group-version-kind"]["kind"] == "Node"
    assert "fieldValidation" in [p["name"] for p in patch["parameters"]]
    code, headers, body = http_request(
        server, "GET", "/openapi/v2",
        accept="application/com.github.proto-openapi.spec.v2@v1.0+protobuf")
    assert code == 200 and body[:5] == b"\n\x032.0"
    assert headers["Content-Type"] == "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"

    code, _, status = http_request(server, "POST", "/api/v1/namespaces?fieldValidation=Loud",
                                   namespace("x"))
    assert code == 400 and "fieldValidation" in status["message"]
    code, headers, created = http_request(server, "POST", "/api/v1/namespaces",
                                          {**namespace("x"), "extra": 1})
    assert code == 201 and "extra" not in created
    assert headers["Warning"] == '299 - "unknown field \\"extra\\""'
    code, headers, _ = http_request(server, "POST", "/api/v1/namespaces?fieldValidation=Ignore",
                                    {**namespace("y"), "extra": 1})
    assert code == 201 and headers["Warning"] is None


# --- scale, rollout status, wait -------------------------------------------------------------


def deployment(name: str = "web", ns: str = "default", replicas: int = 1) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "c", "image": "i"}]}}}}


def rolled_out(server: ApiServer, name: str = "web", ns: str = "default") -> None:
    """What the deployment controller reports once every replica is up."""
    dep = server.get("deployments", ns, name)
    replicas = dep["spec"]["replicas"]
    server.patch("deployments", ns, name, {"status": {
        "observedGeneration": dep["metadata"]["generation"], "replicas": replicas,
        "updatedReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas,
        "conditions": [{"type": "Available", "status": "True",
                        "reason": "MinimumReplicasAvailable"},
                       {"type": "Progressing", "status": "True",
                        "reason": "NewReplicaSetAvailable"}]}}, "merge", "status")


def later(seconds: float, action: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()), daemon=True)
    thread.start()
    return thread


def test_scale(server: ApiServer, kubectl: Kubectl) -> None:
    server.create(deployment(replicas=1))
    out = kubectl("scale", "deployment", "web", "--replicas=3").stdout
    assert out.strip() == "deployment.apps/web scaled"
    dep = server.get("deployments", "default", "web")
    assert dep["spec"]["replicas"] == 3 and dep["metadata"]["generation"] == 2
    # --current-replicas makes kubectl GET the Scale and PUT it back.
    out = kubectl("scale", "deploy/web", "--current-replicas=3", "--replicas=0").stdout
    assert out.strip() == "deployment.apps/web scaled"
    assert server.get("deployments", "default", "web")["spec"]["replicas"] == 0
    proc = kubectl("scale", "deploy/web", "--current-replicas=5", "--replicas=1", check=False)
    assert proc.returncode != 0 and "Expected replicas to be 5, was 0" in proc.stderr
    proc = kubectl("scale", "deploy/nope", "--replicas=1", check=False)
    assert proc.stderr.strip() == "error: no objects passed to scale"  # kubectl drops the 404

    path = "/apis/apps/v1/namespaces/default/deployments/web/scale"
    code, _, scale = http_request(server, "GET", path)
    assert code == 200 and scale["kind"] == "Scale" and scale["apiVersion"] == "autoscaling/v1"
    assert scale["spec"] == {"replicas": 0} and scale["status"] == {"replicas": 0,
                                                                   "selector": "app=web"}
    stale = {**scale, "metadata": {**scale["metadata"], "resourceVersion": "1"},
             "spec": {"replicas": 2}}
    assert http_request(server, "PUT", path, stale)[0] == 409
    code, _, status = http_request(server, "PATCH", path, {"spec": {"replicas": -1}},
                                   "application/merge-patch+json")
    assert code == 422 and "spec.replicas" in status["message"]
    code, _, _ = http_request(server, "PATCH", f"{path}?dryRun=All", {"spec": {"replicas": 4}},
                              "application/merge-patch+json")
    assert code == 200 and server.get("deployments", "default", "web")["spec"]["replicas"] == 0
    _, _, doc = http_request(server, "GET", "/apis/apps/v1")
    (entry,) = [r for r in doc["resources"] if r["name"] == "deployments/scale"]
    assert (entry["group"], entry["version"], entry["kind"]) == ("autoscaling", "v1", "Scale")
    assert sorted(entry["verbs"]) == ["get", "patch", "update"]


def test_rollout_status_and_wait(server: ApiServer, kubectl: Kubectl) -> None:
    server.create(deployment(replicas=2))
    started = time.monotonic()
    proc = kubectl("rollout", "status", "deployment/web", "--timeout=1s", check=False)
    assert proc.returncode != 0
    assert 'Waiting for deployment spec update to be observed' in proc.stdout
    assert time.monotonic() - started < 15

    thread = later(1.0, lambda: rolled_out(server))
    out = kubectl("rollout", "status", "deployment/web", "--timeout=30s").stdout
    assert out.strip().splitlines()[-1] == 'deployment "web" successfully rolled out'
    thread.join()
    lists = [r for r in server.requests if r.path == "/apis/apps/v1/namespaces/default/"
             "deployments" and r.user_agent.startswith("kubectl/")]
    assert lists and all(r.query.get("fieldSelector") == "metadata.name=web" for r in lists)

    # A new generation is not rolled out until the controller observed it.
    kubectl("scale", "deployment", "web", "--replicas=3")
    proc = kubectl("rollout", "status", "deployment/web", "--timeout=1s", check=False)
    assert proc.returncode != 0
    later(0.5, lambda: rolled_out(server))
    out = kubectl("wait", "--for=condition=Available", "deployment/web", "--timeout=30s").stdout
    assert out.strip() == "deployment.apps/web condition met"
    out = kubectl("rollout", "status", "deploy/web", "--timeout=10s").stdout
    assert "successfully rolled out" in out

    server.create(pod("app-1", "worker-1", app="x"))
    server.create(pod("app-2", "worker-1", app="x"))

    def ready() -> None:
        for name in ("app-1", "app-2"):
            status = running(pod(name), "10.0.0.1")["status"]
            server.patch("pods", "default", name, {"status": status}, "merge", "status")

    later(1.0, ready)
    out = kubectl("wait", "--for=condition=Ready", "pod", "-l", "app=x",
                  "--timeout=30s").stdout
    assert sorted(out.split("\n")[:2]) == ["pod/app-1 condition met", "pod/app-2 condition met"]
    proc = kubectl("wait", "--for=condition=Ready", "pod", "-l", "app=none", "--timeout=2s",
                   check=False)
    assert proc.returncode != 0 and "no matching resources found" in proc.stderr

    later(1.0, lambda: server.delete("pods", "default", "app-1", grace_period_seconds=0))
    out = kubectl("wait", "--for=delete", "pod/app-1", "--timeout=30s").stdout
    assert out.strip() == "pod/app-1 condition met"
    started = time.monotonic()
    proc = kubectl("wait", "--for=delete", "pod/app-2", "--timeout=2s", check=False)
    assert proc.returncode != 0 and "timed out" in proc.stderr
    assert time.monotonic() - started < 15


def test_label_namespace_delete_and_get_all(server: ApiServer, kubectl: Kubectl) -> None:
    server.create(node("worker-1"))
    assert kubectl("create", "namespace", "demo").stdout.strip() == "namespace/demo created"
    assert kubectl("label", "node", "worker-1", "k=v").stdout.strip() == "node/worker-1 labeled"
    assert kubectl("label", "node", "worker-1", "k=w", "--overwrite").stdout.strip() == \
        "node/worker-1 labeled"
    assert server.get("nodes", None, "worker-1")["metadata"]["labels"] == {"k": "w"}
    server.create(deployment("web", "demo"))
    other = pod("p", "worker-1")
    other["metadata"]["namespace"] = "demo"
    server.create(other)
    out = kubectl("get", "pods", "-A").stdout
    assert [(r["NAMESPACE"], r["NAME"]) for r in columns(out)] == [("demo", "p")]
    out = kubectl("delete", "deployment", "-n", "demo", "web").stdout
    assert out.strip() == 'deployment.apps "web" deleted'
    assert server.list("deployments") == []
    proc = kubectl("get", "deployments", "-A")
    assert proc.stdout == "" and proc.stderr.strip() == "No resources found"


# --- what the server does not serve --------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (("logs", "app-1"), "Error from server (NotFound): the server could not find the "
                        "requested resource"),
    (("port-forward", "pod/app-1", "18080:80"), "error upgrading connection"),
    (("get", "secrets"), 'the server doesn\'t have a resource type "secrets"'),
    (("top", "pods"), "Metrics API not available"),
    (("auth", "can-i", "get", "pods"), "the server could not find the requested resource"),
])
def test_unsupported_commands_fail_fast(server: ApiServer, kubectl: Kubectl,
                                        args: tuple[str, ...], message: str) -> None:
    put(server, running(pod("app-1", "worker-1"), "10.0.0.1"))
    started = time.monotonic()
    proc = kubectl(*args, check=False)
    assert time.monotonic() - started < 20
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


# --- after_write ---------------------------------------------------------------------------


def test_after_write_hook(tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    fail = threading.Event()

    def hook(user_agent: str, revision: int) -> None:
        calls.append((user_agent, revision, server.revision))
        if fail.is_set():
            raise RuntimeError("the lab is down")

    server = ApiServer(after_write=hook).start()
    try:
        run = make_kubectl(server, tmp_path)
        run("create", "namespace", "demo")
        ((agent, revision, current),) = calls
        assert agent.startswith("kubectl/v1.31.") and revision == current == server.revision
        run("create", "namespace", "dry", "--dry-run=server")
        assert len(calls) == 1
        run("get", "namespaces")
        assert len(calls) == 1
        server.create(deployment())
        assert len(calls) == 1, "in-process writes are not HTTP writes"
        run("scale", "deployment", "web", "--replicas=2")
        run("label", "namespace", "demo", "a=b")
        run("delete", "namespace", "demo", "--wait=false")
        assert len(calls) == 4 and calls[-1][1] == server.revision

        fail.set()
        out = run("label", "namespace", "default", "c=d").stdout
        assert out.strip() == "namespace/default labeled"
        assert len(server.internal_errors) == 1 and "the lab is down" in \
            server.internal_errors[0]
        server.internal_errors.clear()
    finally:
        stop_cleanly(server)
