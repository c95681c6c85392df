"""The HTTP side: a kube-apiserver on 127.0.0.1 for tests, the lab and benchmarks.

:class:`ApiServer` serves the resource table over HTTP/1.1 (keep-alive, chunked watch
streams) closely enough for the official Python client and the real kubectl:

* routing: ``/api/v1/...`` and ``/apis/<group>/<version>/...``, namespaced and cluster-wide
  collections, objects, the ``status`` and ``scale`` (autoscaling/v1 Scale, ``kubectl
  scale``) subresources, the legacy ``/watch/`` prefix;
* verbs get, list, watch, create, update, patch (JSON, merge, strategic merge), delete and
  deletecollection; ``dryRun=All``; ``resourceVersionMatch=Exact`` on lists;
* discovery (legacy documents, see ``discovery``) and ``/version``, ``/healthz``,
  ``/livez``, ``/readyz``;
* errors are always a ``Status`` object; an unknown path, resource or verb answers at once;
* request bodies in JSON, YAML, or protobuf for the kinds kubectl 1.32+ create that way
  (see ``protobuf``); responses are JSON: objects, or for a get, list or watch whose
  Accept asks ``as=Table`` (``kubectl get``) the Table the real printers make (see
  ``tables``), rows carrying the object as ``includeObject`` says;
* ``/openapi/v3`` and a minimal ``/openapi/v2`` (see ``openapi``), enough for kubectl
  1.27-1.33 to leave field validation to the server: ``apply``/``create -f`` work with the
  default ``--validate``. ``fieldValidation`` Strict refuses unknown top-level and metadata
  fields (400), Warn (the default) drops them with a ``Warning`` header, Ignore drops them;
* ``after_write(user_agent, revision)``, called after every successful non-dry-run write
  over HTTP, just before the answer (a failure is logged to ``internal_errors`` only; an
  :class:`ApiError` it raises is the answer);
* an optional bearer token (401 without it, on every path). kubectl sends a kubeconfig's
  token only over https, so ``tls=True`` serves https with a throwaway certificate that
  :meth:`ApiServer.write_kubeconfig` puts in the kubeconfig (see ``tls``); the Python
  client sends the token over plain http too;
* fault injection (``server.faults``), stop/start on the same port, and
  :meth:`ApiServer.restart` with a new resourceVersion history;
* a bounded log of requests (``server.requests``) for tests that check what a client asked;
* ``kubectl exec`` (``pods/exec``) over WebSocket v5/v4.channel.k8s.io, the process started
  by ``exec_runner`` (see ``remotecommand``); kubectl's SPDY fallback answers a Status error.

A watch ends when its client goes away (checked every second while it is quiet), so
abandoned watches do not pile up threads.

The OpenAPI schemas are shallow (nested fields open), so ``apply`` of an existing object
computes its strategic merge patch from the rules compiled into kubectl, and ``kubectl
explain`` has nothing to show. Also left out: protobuf responses, CBOR, server-side apply
(415), finalizers, aggregated discovery, ``logs``, ``port-forward``, metrics,
authorisation (``auth can-i`` gets a 404), HTTP/2.
The server binds only to 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import os
import select
import selectors
import socket
import ssl
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from . import discovery, errors, openapi, protobuf, tables
from .errors import ApiError
from .faults import Faults
from .registry import PATCH_TYPES, AdmissionHook, Registry
from .remotecommand import (
    ExecRunner,
    ExecSession,
    RecentRefusals,
    buffered_bytes,
    choose_protocol,
    handshake_key,
    handshake_response,
    is_websocket_upgrade,
    no_runner,
    no_tty,
    parse_exec_query,
    refusal_key,
    websocket_only,
)
from .resources import (
    DEFAULT_RESOURCES,
    NAMESPACES,
    OBJECT_META_FIELDS,
    SUBRESOURCE_VERBS,
    ResourceTable,
    ResourceType,
)
from .selectors import FieldSelector, LabelSelector, SelectorError
from .store import Record, Store, dumps
from .tls import self_signed_context
from .watches import WatchStream

LOOPBACK = "127.0.0.1"
DEFAULT_WATCH_TIMEOUT = 1800.0  # kube-apiserver's --min-request-timeout
MAX_BODY = 16 * 1024 * 1024
JOIN_TIMEOUT = 5.0


class RequestRecord(NamedTuple):
    """One logged request; ``at`` is time.monotonic() when it arrived."""

    method: str
    path: str
    query: dict[str, str]
    user_agent: str
    at: float


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true")


def _accepts_json(accept: str) -> bool:
    if not accept:
        return True
    for part in accept.split(","):
        media = part.split(";", 1)[0].strip().lower()
        if media in ("application/json", "*/*", "application/*", "application/yaml", ""):
            return True
    return False


class _Handler(BaseHTTPRequestHandler):
    """One connection; ``self.server`` is the :class:`ApiServer`."""

    protocol_version = "HTTP/1.1"
    server_version = "kmesh-lab-apiserver"
    sys_version = ""
    disable_nagle_algorithm = True
    server: ApiServer  # type: ignore[assignment]

    def __init__(self, request: socket.socket, client_address: tuple[str, int],
                 server: ApiServer, control: socket.socket) -> None:
        self.control = control  # the plain socket to cut this connection with
        super().__init__(request, client_address, server)  # type: ignore[arg-type]

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is server.requests

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_OPTIONS(self) -> None:
        self._handle("OPTIONS")

    # --- plumbing ----------------------------------------------------------------------

    def _respond(self, code: int, body: bytes, content_type: str = "application/json",
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Unknown"
        lines = [f"HTTP/1.1 {code} {phrase}",
                 f"Content-Type: {content_type}",
                 f"Content-Length: {len(body)}",
                 "Cache-Control: no-cache, private"]
        lines.extend(f"{k}: {v}" for k, v in headers)
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head + (b"" if self.command == "HEAD" else body))

    def _send_error(self, error: ApiError) -> None:
        headers = []
        if error.retry_after is not None:
            headers.append(("Retry-After", str(error.retry_after)))
        self._respond(error.code, dumps(error.status), headers=headers)

    def _send_json(self, code: int, obj: Any) -> None:
        self._respond(code, dumps(obj))

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            total = 0
            while True:
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > MAX_BODY:
                    raise ApiError(413, "Request entity too large", "RequestEntityTooLarge")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, f"Request entity too large: limit is {MAX_BODY}",
                           "RequestEntityTooLarge")
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self, method: str) -> None:
        api = self.server
        split = urlsplit(self.path)
        path = split.path
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        api._log_request(RequestRecord(method, path, query, self.headers.get("User-Agent", ""),
                                       time.monotonic()))
        try:
            body = self._read_body()
        except (ValueError, ApiError) as e:
            self.close_connection = True
            self._send_error(e if isinstance(e, ApiError) else errors.bad_request(str(e)))
            return
        try:
            if api.faults.latency > 0:
                api._stopping.wait(api.faults.latency)
            fault = api.faults.take(path)
            if fault is not None:
                raise fault
            api._authenticate(self.headers.get("Authorization"))
            if not _accepts_json(self.headers.get("Accept", "")) and path != "/openapi/v2":
                raise errors.not_acceptable()
            self._route(method, path, query, body)
        except ApiError as e:
            self._send_error(e)
        except OSError:
            raise  # the connection is gone: nothing to answer
        except Exception as e:
            api.internal_errors.append(traceback.format_exc())
            self._send_error(ApiError(500, f"Internal error occurred: {type(e).__name__}: {e}",
                                      "InternalError"))

    # --- routing -----------------------------------------------------------------------

    def _route(self, method: str, path: str, query: dict[str, str], body: bytes) -> None:
        api = self.server
        parts = [unquote(p) for p in path.split("/") if p]
        if not parts or parts[0] in ("version", "healthz", "livez", "readyz", "openapi"):
            self._route_meta(method, parts)
            return
        if parts[0] == "api":
            if len(parts) == 1:
                self._discovery(method, discovery.api_versions(f"{LOOPBACK}:{api.port}"))
                return
            group, rest = "", parts[1:]
        elif parts[0] == "apis":
            if len(parts) == 1:
                self._discovery(method, discovery.api_group_list(api.table))
                return
            if len(parts) == 2:
                doc = discovery.api_group(api.table, parts[1])
                if doc is None:
                    raise errors.resource_not_found()
                self._discovery(method, doc)
                return
            group, rest = parts[1], parts[2:]
        else:
            raise errors.resource_not_found()
        version, rest = rest[0], rest[1:]
        if not rest:
            doc = discovery.api_resource_list(api.table, group, version)
            if doc is None:
                raise errors.resource_not_found()
            self._discovery(method, doc)
            return
        self._resource(method, group, version, rest, query, body)

    def _route_meta(self, method: str, parts: list[str]) -> None:
        if method not in ("GET", "HEAD"):
            raise errors.method_not_allowed()
        if not parts:
            paths = ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/readyz", "/version"]
            for group, versions in self.server.table.group_versions():
                if group:
                    paths += [f"/apis/{group}", *(f"/apis/{group}/{v}" for v in versions)]
            self._send_json(200, {"paths": sorted(paths)})
        elif parts == ["version"]:
            self._send_json(200, discovery.version_info(self.server.version))
        elif len(parts) == 1 and parts[0] in ("healthz", "livez", "readyz"):
            self._respond(200, b"ok", "text/plain; charset=utf-8")
        elif parts == ["openapi", "v3"]:
            self._respond(200, self.server.openapi_v3.root())
        elif parts[:2] == ["openapi", "v3"]:
            doc = self.server.openapi_v3.document("/".join(parts[2:]))
            if doc is None:
                raise errors.resource_not_found()
            self._respond(200, doc)
        elif parts == ["openapi", "v2"]:
            protobuf = "protobuf" in (self.headers.get("Accept") or "")
            self._respond(200, self.server.openapi_v3.swagger(protobuf),
                          openapi.V2_PROTOBUF if protobuf else "application/json")
        else:
            raise errors.resource_not_found()

    def _discovery(self, method: str, doc: dict[str, Any]) -> None:
        if method not in ("GET", "HEAD"):
            raise errors.method_not_allowed()
        self._send_json(200, doc)

    def _resource(self, method: str, group: str, version: str, rest: list[str],
                  query: dict[str, str], body: bytes) -> None:
        api = self.server
        watch = _truthy(query.get("watch"))
        if rest[0] == "watch":  # the deprecated /watch/ prefix
            watch, rest = True, rest[1:]
            if not rest:
                raise errors.resource_not_found()
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            inner = api.table.by_path(group, version, rest[2])
            if inner is not None and inner.namespaced:
                namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise errors.resource_not_found()
        rtype = api.table.by_path(group, version, rest[0])
        if rtype is None:
            raise errors.resource_not_found()
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        if sub == "exec" and rtype.plural == "pods" and not rtype.group and namespace:
            self._exec(method, rtype, namespace, name)  # the exec block, below
            return
        if sub and sub not in rtype.subresources:
            raise errors.resource_not_found()
        if rtype.namespaced and name and not namespace:
            raise errors.resource_not_found()
        if method in ("GET", "HEAD"):
            verb = "watch" if watch else ("get" if name else "list")
        else:
            verb = {("POST", False): "create", ("PUT", True): "update",
                    ("PATCH", True): "patch", ("DELETE", True): "delete",
                    ("DELETE", False): "deletecollection"}.get((method, bool(name)), "")
        allowed = SUBRESOURCE_VERBS.get(sub, ()) if sub else rtype.verbs
        if verb not in allowed or (watch and sub):
            raise errors.method_not_allowed()
        if rtype.namespaced and not namespace and verb not in ("list", "watch"):
            raise errors.method_not_allowed()
        dry_run = self._dry_run(query)
        registry = api.registry
        if verb == "get":
            if sub == "scale":
                self._send_json(200, registry.get_scale(rtype, namespace, name))
            else:
                self._object(rtype, registry.get(rtype, namespace, name), query)
            return
        if verb == "list":
            self._list(rtype, namespace, query)
            return
        if verb == "watch":
            self._watch(rtype, namespace, name, query)
            return
        fields = _FieldCheck(rtype, query.get("fieldValidation")
                             if verb in ("create", "update", "patch") else None)
        if verb in ("create", "update"):
            obj = self._json_body(body, rtype)
            if sub == "scale":
                out = dumps(registry.update_scale(rtype, namespace, name, obj, dry_run))
            else:
                if sub != "status":
                    fields(obj)
                if verb == "create":
                    out = registry.create(rtype, namespace, obj, dry_run).raw
                else:
                    out = registry.update(rtype, namespace, name, obj, sub, dry_run).raw
            code = 201 if verb == "create" else 200
        elif verb == "patch":
            content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip()
            patch_type = PATCH_TYPES.get(content_type.lower())
            if patch_type is None:
                raise errors.unsupported_patch_type(content_type)
            patch_body = self._json_body(body, rtype, any_json=True)
            if sub == "scale":
                out = dumps(registry.patch_scale(rtype, namespace, name, patch_type, patch_body,
                                                 dry_run))
            else:
                out = registry.patch(rtype, namespace, name, patch_type, patch_body, sub,
                                     dry_run, check=None if sub == "status" else fields).raw
            code = 200
        elif verb == "delete":
            options = self._delete_options(body, rtype, query)
            record = registry.delete(rtype, namespace, name, options, dry_run)
            out = record.raw if rtype.returns_deleted_object else dumps(_success(rtype, record))
            code = 200
        else:  # deletecollection
            labels, selected = self._selectors(query)
            options = self._delete_options(body, rtype, query)
            page = registry.delete_collection(rtype, namespace, labels, selected, options,
                                              dry_run)
            out, code = page.body(), 200
        if not dry_run:
            api._after_write(self.headers.get("User-Agent", ""))
        self._respond(code, out, headers=[("Warning", f'299 - "{_quote(w)}"')
                                          for w in fields.warnings])

    def _object(self, rtype: ResourceType, record: Record, query: dict[str, str]) -> None:
        """One object, or as a one-row Table when the client asks for one."""
        version = tables.table_version(self.headers.get("Accept", ""))
        if version is None:
            self._respond(200, record.raw)
            return
        obj = record.object()
        table = tables.to_table(rtype, [obj], {"resourceVersion": str(record.rv)}, version,
                                query.get("includeObject", ""))
        self._respond(200, dumps(table), _table_content_type(version))

    def _delete_options(self, body: bytes, rtype: ResourceType,
                        query: dict[str, str]) -> dict[str, Any]:
        options: dict[str, Any] = self._json_body(body, rtype) if body.strip() else {}
        if query.get("gracePeriodSeconds"):  # the query parameter wins, as in the real server
            options["gracePeriodSeconds"] = query["gracePeriodSeconds"]
        return options

    # --- exec block (helper B): pods/exec over WebSocket, see remotecommand ---------------

    def _exec(self, method: str, rtype: ResourceType, namespace: str, name: str) -> None:
        """GET with a WebSocket upgrade (v5/v4.channel.k8s.io) runs ``exec_runner``; POST
        (kubectl's SPDY fallback) and plain requests answer a Status error."""
        api = self.server
        if method not in ("GET", "POST"):
            raise errors.method_not_allowed()
        query = urlsplit(self.path).query
        request = parse_exec_query(query, namespace, name)
        api.registry.get(rtype, namespace, name)  # 404 as the real server, any protocol
        if api.exec_runner is None:
            raise no_runner()
        if request.tty:  # before any upgrade: kubectl's SPDY fallback gets the same answer
            raise no_tty()
        if method != "GET" or not is_websocket_upgrade(self.headers):
            if "upgrade" in (self.headers.get("Connection") or "").lower():
                self.close_connection = True  # SPDY: no keep-alive after a refused upgrade
            raise api._exec_refusals.take(refusal_key(namespace, name, query)) \
                or websocket_only()
        protocol = choose_protocol(self.headers)
        if protocol is None:
            raise websocket_only()
        key = handshake_key(self.headers)
        try:
            proc = api.exec_runner(request)
        except ApiError as e:
            api._exec_refusals.remember(refusal_key(namespace, name, query), e)
            raise
        self.close_connection = True  # the connection ends with the session
        session = ExecSession(self.connection, proc, request, protocol)
        api._register_exec(session)
        try:
            self.wfile.write(handshake_response(key, protocol))
            self.connection.setblocking(False)
            session.early = buffered_bytes(self.rfile)
            session.run()
        except OSError:
            pass  # the client went away; run() killed and reaped the process
        except Exception:
            api.internal_errors.append(traceback.format_exc())  # no HTTP answer after a 101
        finally:
            session.cleanup()  # also when the 101 could not be sent
            api._unregister_exec(session)

    # --- end of the exec block ---------------------------------------------------------

    def _peer_gone(self) -> bool:
        """During a watch the client sends nothing: a readable socket is its EOF (or a TLS
        close_notify before it)."""
        return _readable(self.control)

    @staticmethod
    def _dry_run(query: dict[str, str]) -> bool:
        value = query.get("dryRun")
        if value is None or value == "":
            return False
        if value != "All":
            raise errors.bad_request(f'dryRun: Unsupported value: "{value}": supported values: '
                                     f'"All"')
        return True

    def _json_body(self, body: bytes, rtype: ResourceType, any_json: bool = False) -> Any:
        content_type = (self.headers.get("Content-Type") or "").lower()
        if "protobuf" in content_type:
            try:
                return protobuf.decode(body)
            except protobuf.ProtobufError as e:
                raise ApiError(415, f"the body of the request was in an unknown format - "
                                    f"accepted media types include: application/json, "
                                    f"application/yaml ({e})", "UnsupportedMediaType") from None
        if "cbor" in content_type:
            raise ApiError(415, "the body of the request was in an unknown format - accepted "
                                "media types include: application/json, application/yaml",
                           "UnsupportedMediaType")
        try:
            if "yaml" in content_type and "apply-patch" not in content_type:
                value = yaml.safe_load(body.decode())
            else:
                value = json.loads(body or b"null")
        except (ValueError, yaml.YAMLError) as e:
            raise errors.bad_request(f"the object provided is unrecognized (must be of type "
                                     f"{rtype.kind}): {e}") from None
        if not any_json and not isinstance(value, dict):
            raise errors.bad_request(f"the object provided is unrecognized (must be of type "
                                     f"{rtype.kind}): not a JSON object")
        return value

    @staticmethod
    def _selectors(query: dict[str, str]) -> tuple[LabelSelector, FieldSelector]:
        try:
            return (LabelSelector.parse(query.get("labelSelector")),
                    FieldSelector.parse(query.get("fieldSelector")))
        except SelectorError as e:
            raise errors.bad_request(str(e)) from None

    def _list(self, rtype: ResourceType, namespace: str, query: dict[str, str]) -> None:
        labels, fields = self._selectors(query)
        try:
            limit = int(query["limit"]) if query.get("limit") else None
        except ValueError:
            raise errors.bad_request(f"invalid limit: {query['limit']!r}") from None
        exact_rv = None
        if query.get("resourceVersionMatch") == "Exact":
            try:
                exact_rv = int(query.get("resourceVersion") or "")
            except ValueError:
                raise errors.bad_request("resourceVersionMatch=Exact needs a resourceVersion"
                                         ) from None
        page = self.server.registry.list(rtype, namespace, labels, fields, limit,
                                         query.get("continue") or None, exact_rv)
        version = tables.table_version(self.headers.get("Accept", ""))
        if version is None:
            self._respond(200, page.body())
            return
        list_meta: dict[str, Any] = {"resourceVersion": str(page.rv)}
        if page.continue_token:
            list_meta["continue"] = page.continue_token
        if page.remaining is not None:
            list_meta["remainingItemCount"] = page.remaining
        table = tables.to_table(rtype, (r.object() for r in page.records), list_meta, version,
                                query.get("includeObject", ""))
        self._respond(200, dumps(table), _table_content_type(version))

    def _watch(self, rtype: ResourceType, namespace: str, name: str,
               query: dict[str, str]) -> None:
        api = self.server
        labels, fields = self._selectors(query)
        if name:  # /watch/namespaces/ns/pods/name watches one object
            fields = FieldSelector.parse(
                ",".join(filter(None, [query.get("fieldSelector"), f"metadata.name={name}"])))
        timeout = DEFAULT_WATCH_TIMEOUT
        if query.get("timeoutSeconds"):
            try:
                timeout = float(query["timeoutSeconds"])
            except ValueError:
                raise errors.bad_request("invalid timeoutSeconds") from None
        table = tables.table_version(self.headers.get("Accept", ""))
        include = query.get("includeObject", "")
        if table is not None:
            tables.to_table(rtype, [], {}, table, include)  # a bad includeObject is a 400 now
        stream = WatchStream(
            api.store, rtype, namespace, labels, fields,
            resource_version=query.get("resourceVersion"),
            send_initial_events=_truthy(query.get("sendInitialEvents")),
            allow_bookmarks=_truthy(query.get("allowWatchBookmarks")),
            timeout=timeout,
            bookmark_interval=api.bookmark_interval,
            peer_gone=self._peer_gone,
        )
        lines = stream.open()
        api._register_watch(stream, self.control)
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Cache-Control: no-cache, private\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
            while lines is not None:
                if lines:
                    if table is not None:
                        lines = [_table_event(rtype, line, table, include) for line in lines]
                    data = b"".join(lines)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                lines = stream.next_lines()
            if stream.dropped:
                self.close_connection = True  # cut: no terminating chunk
                return
            self.wfile.write(b"0\r\n\r\n")
        finally:
            api._unregister_watch(stream)
            stream.release()


def _table_event(rtype: ResourceType, line: bytes, version: str, include: str) -> bytes:
    """A watch event whose object is a one-row Table (as ``kubectl get -w`` asks); BOOKMARK
    and ERROR events pass unchanged."""
    event = json.loads(line)
    if event.get("type") not in ("ADDED", "MODIFIED", "DELETED"):
        return line
    obj = event["object"]
    rv = str((obj.get("metadata") or {}).get("resourceVersion", ""))
    event["object"] = tables.to_table(rtype, [obj], {"resourceVersion": rv}, version, include)
    return dumps(event) + b"\n"


def _table_content_type(version: str) -> str:
    group, _, v = version.partition("/")
    return f"application/json;as=Table;v={v};g={group}"


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


class _FieldCheck:
    """``fieldValidation`` for the fields the table knows (top level and metadata): Strict
    refuses an unknown one (400), Warn (the default, as in Kubernetes 1.27+) and Ignore drop
    it, Warn with a ``Warning`` header per field."""

    def __init__(self, rtype: ResourceType, directive: str | None) -> None:
        if directive not in (None, "", "Ignore", "Warn", "Strict"):
            raise errors.bad_request(f'fieldValidation: Unsupported value: "{directive}": '
                                     f'supported values: "Ignore", "Strict", "Warn"')
        self.rtype = rtype
        self.directive = directive or "Warn"
        self.warnings: list[str] = []

    def __call__(self, obj: dict[str, Any]) -> None:
        known = ("apiVersion", "kind", "metadata", *self.rtype.top_level_fields)
        unknown = [(obj, k, k) for k in obj if k not in known]
        meta = obj.get("metadata")
        if isinstance(meta, dict):
            unknown += [(meta, k, f"metadata.{k}") for k in meta if k not in OBJECT_META_FIELDS]
        if not unknown:
            return
        if self.directive == "Strict":
            kind, version = self.rtype.kind, self.rtype.version
            raise errors.bad_request(
                f'{kind} in version "{version}" cannot be handled as a {kind}: strict decoding '
                f'error: ' + ", ".join(f'unknown field "{path}"' for _, _, path in unknown))
        for parent, key, path in unknown:
            del parent[key]
            if self.directive == "Warn":
                self.warnings.append(f'unknown field "{path}"')


def _readable(sock: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True  # closed under us
    return bool(readable)


def _success(rtype: ResourceType, record: Record) -> dict[str, Any]:
    details: dict[str, Any] = {"name": record.name}
    if rtype.group:
        details["group"] = rtype.group
    details["kind"] = rtype.plural
    details["uid"] = record.uid
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": details}


class ApiServer:
    """A kube-apiserver for tests on 127.0.0.1; see the module docstring for what it serves.

    ``version`` is what ``/version`` reports (kubectl's dispatcher picks its minor from it);
    ``bookmark_interval`` the seconds between BOOKMARK events; ``admission`` hooks
    ``fn(verb, obj, old)`` (see ``registry``); ``history_limit`` the events a kind keeps for
    watches; ``request_log_size`` how many requests :attr:`requests` keeps; ``tls`` serve
    https (needed for kubectl to send ``token``); ``exec_runner`` starts the processes of
    ``kubectl exec`` (``remotecommand.ExecRunner``; None: exec answers an error);
    ``after_write(user_agent, revision)`` runs in the handler thread after each successful,
    non-dry-run HTTP write (create, update, patch, delete, deletecollection, subresources
    too), before the answer is sent; its exceptions go to :attr:`internal_errors`. The
    in-process methods (:meth:`create`, :meth:`get`, ...) have the semantics of the HTTP
    verbs (resourceVersion, events, admission), work whether or not the port is open, and
    raise :class:`ApiError`.
    """

    def __init__(
        self,
        host: str = LOOPBACK,
        port: int = 0,
        token: str | None = None,
        version: tuple[int, ...] = (1, 31),
        bookmark_interval: float = 60.0,
        admission: Sequence[AdmissionHook] = (),
        *,
        resources: ResourceTable = DEFAULT_RESOURCES,
        history_limit: int = 50_000,
        request_log_size: int = 10_000,
        tls: bool = False,
        after_write: Callable[[str, int], None] | None = None,
        exec_runner: ExecRunner | None = None,
    ) -> None:
        if host != LOOPBACK:
            raise ValueError(f"the test API server listens only on {LOOPBACK}, not {host!r}")
        if len(version) < 2:
            raise ValueError("version is (major, minor) or (major, minor, patch)")
        self.host = host
        self.port = port
        self.token = token
        self.version = tuple(version)
        self.bookmark_interval = float(bookmark_interval)
        self.table = resources
        self.store = Store(resources, history_limit)
        self.registry = Registry(self.store, resources, admission)
        self.faults = Faults(self.store.compact, self._drop_watches)
        self.requests: deque[RequestRecord] = deque(maxlen=request_log_size)
        self.internal_errors: list[str] = []  # tracebacks behind 500s that were not injected
        self.after_write = after_write
        version_text = f"v{self.version[0]}.{self.version[1]}." \
                       f"{self.version[2] if len(self.version) > 2 else 0}"
        self.openapi_v3 = openapi.OpenApiV3(resources, version_text)
        self._lifecycle = threading.Lock()
        self._conn_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._watches: dict[WatchStream, socket.socket] = {}
        self.exec_runner = exec_runner  # starts kubectl exec's processes (remotecommand)
        self._exec_sessions: dict[ExecSession, socket.socket] = {}
        self._exec_refusals = RecentRefusals()
        self._stopping = threading.Event()
        self._tls_context: ssl.SSLContext | None = None
        self.certificate_pem: bytes | None = None  # what a client trusts when tls=True
        if tls:
            self._tls_context, self.certificate_pem = self_signed_context()
        # The default namespace exists from the start, made without admission hooks.
        Registry(self.store, resources).create(
            NAMESPACES, "", {"apiVersion": "v1", "kind": "Namespace",
                             "metadata": {"name": "default"}})

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self._tls_context else "http"
        return f"{scheme}://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self._listener is not None

    def start(self) -> ApiServer:
        """Listen (on the same port as before after a stop); returns once listening."""
        with self._lifecycle:
            if self._listener is not None:
                return self
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((self.host, self.port))
                listener.listen(128)
            except OSError:
                listener.close()
                raise
            self.port = listener.getsockname()[1]
            self._stopping.clear()
            self._wake = socket.socketpair()
            self._listener = listener
            self._accept_thread = threading.Thread(
                target=self._accept_loop, args=(listener, self._wake[0]),
                name=f"apiserver-{self.port}-accept", daemon=True)
            self._accept_thread.start()
            return self

    def stop(self) -> None:
        """Close the port and every connection (watches cut); the objects stay."""
        with self._lifecycle:
            if self._listener is None:
                return
            self._stopping.set()
            assert self._wake is not None and self._accept_thread is not None
            self._wake[1].send(b"x")
            self._accept_thread.join(JOIN_TIMEOUT)
            self._listener.close()
            for sock in self._wake:
                sock.close()
            self._listener = self._wake = self._accept_thread = None
            with self._conn_lock:
                watches = list(self._watches)
                sessions = list(self._exec_sessions)
                connections = list(self._connections.items())
            for stream in watches:
                stream.close(dropped=True)
            for session in sessions:
                session.close()  # its thread kills and reaps the process
            for conn, _ in connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            deadline = time.monotonic() + JOIN_TIMEOUT
            for _, thread in connections:
                thread.join(max(0.0, deadline - time.monotonic()))

    def restart(self, new_history: bool = True) -> None:
        """Stop and start again; ``new_history``: resourceVersions jump to a new base with
        nothing before it retained, so every version a client holds is too old (410), as
        after an etcd restore. The objects are kept either way."""
        self.stop()
        if new_history:
            self.store.rebase()
        self.start()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _accept_loop(self, listener: socket.socket, wake: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is wake:
                        return
                    try:
                        conn, address = listener.accept()
                        # A second handle on the same socket: shutdown() through it cuts
                        # the connection whatever the handler thread is doing, TLS or not.
                        control = conn.dup()
                    except OSError:
                        continue
                    thread = threading.Thread(target=self._serve_connection,
                                              args=(conn, control, address), daemon=True,
                                              name=f"apiserver-{self.port}-conn")
                    with self._conn_lock:
                        self._connections[control] = thread
                    thread.start()

    def _serve_connection(self, conn: socket.socket, control: socket.socket,
                          address: tuple[str, int]) -> None:
        sock = conn
        try:
            if self._tls_context is not None:
                conn.settimeout(10.0)
                sock = self._tls_context.wrap_socket(conn, server_side=True)
                sock.settimeout(None)
            _Handler(sock, address, self, control)
        except OSError:
            pass  # the peer went away, a TLS handshake failed, or stop() cut the connection
        except Exception:
            self.internal_errors.append(traceback.format_exc())
        finally:
            with self._conn_lock:
                self._connections.pop(control, None)
            with contextlib.suppress(OSError):
                control.shutdown(socket.SHUT_RDWR)
            control.close()
            sock.close()
            conn.close()

    def _register_watch(self, stream: WatchStream, conn: socket.socket) -> None:
        with self._conn_lock:
            self._watches[stream] = conn

    def _unregister_watch(self, stream: WatchStream) -> None:
        with self._conn_lock:
            self._watches.pop(stream, None)

    def _drop_watches(self) -> int:
        with self._conn_lock:
            watches = list(self._watches.items())
        for stream, conn in watches:
            stream.close(dropped=True)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        return len(watches)

    @property
    def open_watches(self) -> int:
        with self._conn_lock:
            return len(self._watches)

    def _register_exec(self, session: ExecSession) -> None:
        with self._conn_lock:
            self._exec_sessions[session] = session.sock

    def _unregister_exec(self, session: ExecSession) -> None:
        with self._conn_lock:
            self._exec_sessions.pop(session, None)

    @property
    def open_exec_sessions(self) -> int:
        """Upgraded ``kubectl exec`` connections still running."""
        with self._conn_lock:
            return len(self._exec_sessions)

    def _authenticate(self, header: str | None) -> None:
        if self.token is None:
            return
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 self.token.encode()):
            raise errors.unauthorized()

    def _after_write(self, user_agent: str) -> None:
        """The ``after_write`` hook after an HTTP write; its failure is logged, not answered,
        unless it raises an ApiError: that is its answer to the write (the lab's write
        barrier: stored, but not acted on)."""
        if self.after_write is None:
            return
        try:
            self.after_write(user_agent, self.store.revision)
        except ApiError:
            raise
        except Exception:
            self.internal_errors.append(traceback.format_exc())

    def _log_request(self, record: RequestRecord) -> None:
        self.requests.append(record)

    def requests_for(self, path_prefix: str = "") -> list[RequestRecord]:
        """The logged requests whose path starts with ``path_prefix``."""
        return [r for r in list(self.requests) if r.path.startswith(path_prefix)]

    def write_kubeconfig(self, path: str | os.PathLike[str], namespace: str | None = None,
                         context: str = "kmesh-lab") -> Path:
        """A kubeconfig for this server (http URL, the token) that the Python client and
        kubectl both accept; mode 0600. Returns the path."""
        user: dict[str, Any] = {"token": self.token} if self.token else {}
        cluster: dict[str, Any] = {"server": self.url}
        if self.certificate_pem is not None:
            cluster["certificate-authority-data"] = base64.b64encode(
                self.certificate_pem).decode()
        ctx: dict[str, Any] = {"cluster": context, "user": context}
        if namespace:
            ctx["namespace"] = namespace
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": cluster}],
            "users": [{"name": context, "user": user}],
            "contexts": [{"name": context, "context": ctx}],
            "current-context": context,
            "preferences": {},
        }
        target = Path(path)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        return target

    # --- in-process access -------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The current global resourceVersion."""
        return self.store.revision

    def last_change(self, kind_or_plural: str) -> int:
        """The resourceVersion of the last write to a kind (0: never written)."""
        rtype = self.resource(kind_or_plural)
        with self.store.lock:
            return self.store.collection(rtype).last_change

    def resource(self, kind_or_plural: str) -> ResourceType:
        """The resource type for a kind, plural, singular or short name (404 if unknown)."""
        try:
            return self.table.lookup(kind_or_plural)
        except KeyError:
            raise errors.resource_not_found() from None

    def _type_of(self, obj: Mapping[str, Any]) -> ResourceType:
        rtype = self.table.by_kind(str(obj.get("apiVersion", "")), str(obj.get("kind", "")))
        if rtype is None:
            raise errors.bad_request(f'no kind "{obj.get("kind")}" is registered for version '
                                     f'"{obj.get("apiVersion")}"')
        return rtype

    @staticmethod
    def _fresh(obj: Mapping[str, Any]) -> dict[str, Any]:
        copied: dict[str, Any] = json.loads(json.dumps(obj))
        return copied

    @staticmethod
    def _namespace(rtype: ResourceType, namespace: str | None,
                   obj: Mapping[str, Any] | None = None) -> str:
        if not rtype.namespaced:
            return ""
        if not namespace and obj is not None:
            namespace = (obj.get("metadata") or {}).get("namespace")
        return namespace or "default"

    def create(self, obj: Mapping[str, Any], namespace: str | None = None) -> dict[str, Any]:
        """Create as POST does; the namespace comes from the object, else ``default``."""
        rtype = self._type_of(obj)
        body = self._fresh(obj)
        return self.registry.create(rtype, self._namespace(rtype, namespace, obj), body).object()

    def update(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Replace as PUT does (409 when ``metadata.resourceVersion`` is set and stale)."""
        rtype = self._type_of(obj)
        body = self._fresh(obj)
        name = str((body.get("metadata") or {}).get("name") or "")
        return self.registry.update(rtype, self._namespace(rtype, None, obj), name,
                                    body).object()

    def update_status(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Write only ``.status``, as PUT to the status subresource does."""
        rtype = self._type_of(obj)
        if not rtype.has_status:
            raise errors.resource_not_found()
        body = self._fresh(obj)
        name = str((body.get("metadata") or {}).get("name") or "")
        return self.registry.update(rtype, self._namespace(rtype, None, obj), name, body,
                                    "status").object()

    def patch(self, kind_or_plural: str, namespace: str | None, name: str, patch: Any,
              patch_type: str = "strategic", subresource: str = "") -> dict[str, Any]:
        """Patch as PATCH does; ``patch_type`` is ``strategic``, ``merge`` or ``json``."""
        rtype = self.resource(kind_or_plural)
        return self.registry.patch(rtype, self._namespace(rtype, namespace), name, patch_type,
                                   self._fresh({"p": patch})["p"], subresource).object()

    def delete(self, kind_or_plural: str, namespace: str | None, name: str,
               grace_period_seconds: int | None = None) -> dict[str, Any]:
        """Delete as DELETE does; returns the deleted object (at its deletion version), or
        for a Pod with a grace period the object now terminating."""
        rtype = self.resource(kind_or_plural)
        options = {} if grace_period_seconds is None else {
            "gracePeriodSeconds": grace_period_seconds}
        return self.registry.delete(rtype, self._namespace(rtype, namespace), name,
                                    options).object()

    def get(self, kind_or_plural: str, namespace: str | None, name: str) -> dict[str, Any]:
        rtype = self.resource(kind_or_plural)
        return self.registry.get(rtype, self._namespace(rtype, namespace), name).object()

    def list(self, kind_or_plural: str, namespace: str | None = None,
             label_selector: str | None = None,
             field_selector: str | None = None) -> list[dict[str, Any]]:
        """Objects in key order; ``namespace`` None lists every namespace."""
        rtype = self.resource(kind_or_plural)
        try:
            labels = LabelSelector.parse(label_selector)
            fields = FieldSelector.parse(field_selector)
        except SelectorError as e:
            raise errors.bad_request(str(e)) from None
        page = self.registry.list(rtype, namespace or "", labels, fields)
        return [r.object() for r in page.records]
