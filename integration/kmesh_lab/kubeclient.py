"""A small JSON client of the Kubernetes API, for the lab's controller roles.

The lab plays kubelet, scheduler, Deployment and EndpointSlice controllers, and like the real
ones it writes through the API server. This client is deliberately plain (urllib, raw dicts):
the official client's generated models reject the partial objects a lab writes, and the lab
should not share the product's transport code with the agent it is testing.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kmesh_lab.kube import LabError


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    group: str = ""
    version: str = "v1"
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        parts = [root]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{urllib.parse.quote(namespace)}")
        parts.append(self.plural)
        if name is not None:
            parts.append(urllib.parse.quote(name))
        if subresource:
            parts.append(subresource)
        return "/".join(parts)


KINDS = {k.kind: k for k in (
    Kind("Namespace", "namespaces", namespaced=False),
    Kind("Node", "nodes", namespaced=False),
    Kind("Service", "services"),
    Kind("Pod", "pods"),
    Kind("ConfigMap", "configmaps"),
    Kind("EndpointSlice", "endpointslices", "discovery.k8s.io"),
    Kind("Deployment", "deployments", "apps"),
)}


# The lab's own components write with this User-Agent; the API server's write barrier of
# `lab up` waits only on everybody else's (kubectl's) writes.
USER_AGENT = "kmesh-lab/0.1"


class ApiStatusError(LabError):
    """The API server refused a request; ``code`` and ``reason`` are its Status's."""

    def __init__(self, method: str, path: str, code: int, reason: str, message: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{method} {path}: {code} {reason}: {message}")


class KubeClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0,
                 ca_pem: bytes | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        # https with the server's own certificate as the only trusted one (the lab's server
        # makes a throwaway self-signed one: kubectl sends a token only over TLS).
        self.context = ssl.create_default_context(cadata=ca_pem.decode()) if ca_pem else None

    # -- requests ---------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *,
                query: dict[str, str] | None = None,
                content_type: str = "application/json") -> Any:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        req.add_header("User-Agent", USER_AGENT)
        if data is not None:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout,  # loopback only
                                        context=self.context) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                status = json.loads(raw)
            except ValueError:
                status = {}
            raise ApiStatusError(method, path, e.code, str(status.get("reason") or e.reason),
                                 str(status.get("message") or raw[:200])) from None
        except (urllib.error.URLError, OSError) as e:
            raise LabError(f"{method} {path}: the lab's API server did not answer: {e}") from None
        return json.loads(payload) if payload else None

    # -- verbs ------------------------------------------------------------------------------

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", KINDS[kind].path(namespace, name))
        except ApiStatusError as e:
            if e.code == 404:
                return None
            raise

    def list(self, kind: str, namespace: str | None = None, *,
             label_selector: str | None = None,
             field_selector: str | None = None) -> list[dict[str, Any]]:
        query = {}
        if label_selector:
            query["labelSelector"] = label_selector
        if field_selector:
            query["fieldSelector"] = field_selector
        body = self.request("GET", KINDS[kind].path(namespace), query=query)
        items = body.get("items") or []
        k = KINDS[kind]
        for item in items:  # list items carry no kind: give them theirs back
            item.setdefault("kind", k.kind)
            item.setdefault("apiVersion", k.api_version)
        return items

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        k = KINDS[obj["kind"]]
        return self.request("POST", k.path(obj["metadata"].get("namespace")), obj)

    def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        k = KINDS[obj["kind"]]
        meta = obj["metadata"]
        return self.request("PUT", k.path(meta.get("namespace"), meta["name"]), obj)

    def patch(self, kind: str, namespace: str | None, name: str, patch: dict[str, Any], *,
              subresource: str | None = None) -> dict[str, Any]:
        return self.request("PATCH", KINDS[kind].path(namespace, name, subresource), patch,
                            content_type="application/merge-patch+json")

    def delete(self, kind: str, namespace: str | None, name: str, *,
               grace_seconds: int | None = None) -> Any:
        query = {} if grace_seconds is None else {"gracePeriodSeconds": str(grace_seconds)}
        try:
            return self.request("DELETE", KINDS[kind].path(namespace, name), query=query)
        except ApiStatusError as e:
            if e.code == 404:
                return None
            raise

    def watch(self, kind: str, resource_version: str, timeout_seconds: int) -> Iterator[Any]:
        """Events of one watch, until the server ends it (``timeout_seconds``)."""
        url = self.base_url + KINDS[kind].path() + "?" + urllib.parse.urlencode({
            "watch": "1", "resourceVersion": resource_version,
            "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds),
        })
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=timeout_seconds + 30,
                                    context=self.context) as response:
            for line in response:
                if line.strip():
                    yield json.loads(line)
