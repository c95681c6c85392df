"""The lab's Kubernetes logic without I/O: ClusterIP families, slices per family, images."""

from __future__ import annotations

from typing import Any

import pytest

from kmesh_lab import kube, workloads
from kmesh_lab.kube import ClusterIPs, LabError


def svc(**spec: Any) -> dict[str, Any]:
    return {"kind": "Service", "metadata": {"name": "s", "namespace": "n"},
            "spec": {"selector": {"app": "a"}, "ports": [{"name": "http", "port": 80}], **spec}}


@pytest.mark.parametrize(("spec", "families"), [
    ({}, ["IPv4"]),
    ({"ipFamilyPolicy": "PreferDualStack"}, ["IPv4", "IPv6"]),
    ({"ipFamilyPolicy": "RequireDualStack"}, ["IPv4", "IPv6"]),
    ({"ipFamilies": ["IPv6"]}, ["IPv6"]),
    ({"ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "RequireDualStack"}, ["IPv6", "IPv4"]),
])
def test_clusterip_families_follow_the_api_server(spec: dict[str, Any],
                                                  families: list[str]) -> None:
    s = svc(**spec)
    ClusterIPs().assign(s, ("n", "s"))
    assert s["spec"]["ipFamilies"] == families
    for ip, family in zip(s["spec"]["clusterIPs"], families, strict=True):
        assert (":" in ip) == (family == "IPv6")
    assert s["spec"]["clusterIP"] == s["spec"]["clusterIPs"][0]


def test_reapplying_keeps_the_addresses_and_others_get_new_ones() -> None:
    ips = ClusterIPs()
    first = svc(ipFamilyPolicy="RequireDualStack")
    ips.assign(first, ("n", "s"))
    again = svc(ipFamilyPolicy="RequireDualStack")
    ips.assign(again, ("n", "s"))
    assert again["spec"]["clusterIPs"] == first["spec"]["clusterIPs"]
    other = svc(ipFamilyPolicy="RequireDualStack")
    ips.assign(other, ("n", "t"))
    assert set(other["spec"]["clusterIPs"]).isdisjoint(first["spec"]["clusterIPs"])


@pytest.mark.parametrize(("ip", "message"), [
    ("10.96.0.1", "outside the lab's service ranges"),
    ("2001:db8::1", "outside the lab's service ranges"),
    ("nope", "is not an IP address"),
])
def test_addresses_outside_the_benchmarking_ranges_are_refused(ip: str, message: str) -> None:
    with pytest.raises(LabError, match=message):
        ClusterIPs().assign(svc(clusterIP=ip), ("n", "s"))


def test_a_taken_clusterip_names_its_owner() -> None:
    ips = ClusterIPs()
    ips.assign(svc(clusterIP="198.19.0.50"), ("n", "s"))
    with pytest.raises(LabError, match="taken by Service n/s"):
        ips.assign(svc(clusterIP="198.19.0.50"), ("n", "t"))


def pod(name: str, node: str, ip: str, ipv6: str | None, *, ready: bool = True,
        terminating: bool = False) -> dict[str, Any]:
    """A Pod object as the lab's kubelet reports it."""
    meta: dict[str, Any] = {"name": name, "namespace": "n", "labels": {"app": "a"},
                            "uid": f"uid-{name}"}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "kind": "Pod", "metadata": meta,
        "spec": {"nodeName": node, "containers": [
            {"name": "c", "image": kube.HELLOWORLD_IMAGE,
             "ports": [{"containerPort": 5000, "name": "web"}]}]},
        "status": {"podIPs": [{"ip": ip}] + ([{"ip": ipv6}] if ipv6 else []),
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def test_one_slice_per_family_with_that_familys_addresses() -> None:
    s = svc(ipFamilyPolicy="RequireDualStack")
    s["spec"]["ports"][0]["targetPort"] = "web"
    ClusterIPs().assign(s, ("n", "s"))
    pods = [pod("p1", "n1", "198.18.1.10", "2001:2::1:10"),
            pod("p2", "n2", "198.18.2.10", "2001:2::2:10", terminating=True),
            pod("p3", "n2", "198.18.2.11", "2001:2::2:11", ready=False)]  # starting: left out
    v4, v6 = kube.endpoint_slices(s, pods, {"n1": "z1"})
    assert (v4["addressType"], v6["addressType"]) == ("IPv4", "IPv6")
    assert v6["metadata"]["name"] == v4["metadata"]["name"] + "-v6"
    assert [e["addresses"] for e in v6["endpoints"]] == [["2001:2::1:10"], ["2001:2::2:10"]]
    assert v4["ports"] == [{"name": "http", "port": 5000, "protocol": "TCP"}]
    assert v4["endpoints"][0]["zone"] == "z1" and "zone" not in v4["endpoints"][1]
    # Terminating but still Ready: serving, not ready (kube's EndpointSlice controller).
    assert v4["endpoints"][1]["conditions"] == {"ready": False, "serving": True,
                                                "terminating": True}


def test_a_deployments_pods_carry_its_template_hash_and_owner() -> None:
    dep = {"kind": "Deployment", "metadata": {"name": "web", "namespace": "n", "uid": "u1"},
           "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "a"}},
                    "template": {"metadata": {"labels": {"app": "a"}},
                                 "spec": {"containers": [{"name": "c",
                                                          "image": kube.CURL_IMAGE}]}}}}
    first, second = kube.pod_for(dep), kube.pod_for(dep)
    digest = kube.template_hash(dep["spec"]["template"])
    assert first["metadata"]["name"].startswith(f"web-{digest}-")
    assert first["metadata"]["name"] != second["metadata"]["name"]
    assert first["metadata"]["labels"] == {"app": "a", kube.TEMPLATE_HASH_LABEL: digest}
    assert kube.owner_of(first) == ("web", "u1")
    assert kube.pod_spec_of({**first, "metadata": {**first["metadata"]}}).owner == "web"


@pytest.mark.parametrize(("image", "kind"), [
    ("docker.io/istio/examples-helloworld-v1", "helloworld"),
    ("istio/examples-helloworld-v1:1.0", "helloworld"),
    ("curlimages/curl@sha256:abc", "curl"),
    ("docker.io/curlimages/curl:8.5.0", "curl"),
])
def test_supported_images(image: str, kind: str) -> None:
    assert kube.image_kind(image, "x") == kind


def test_other_images_are_a_clear_error() -> None:
    with pytest.raises(LabError, match="image 'nginx' cannot run in the lab"):
        kube.image_kind("nginx", "Deployment n/web: containers[0]")


def test_resolve_by_family() -> None:
    hosts = {"echo.web.svc.cluster.local": ["198.19.0.10", "2001:2:0:ff::a"]}
    search = ["web.svc.cluster.local", "svc.cluster.local", "cluster.local"]
    assert workloads.resolve("echo", hosts, search) == "198.19.0.10"
    assert workloads.resolve("echo", hosts, search, 6) == "2001:2:0:ff::a"
    with pytest.raises(workloads.ResolveError, match="to IPv6"):
        workloads.resolve("other", {"other.web.svc.cluster.local": ["198.19.0.11"]}, search, 6)
