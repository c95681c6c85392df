"""Talking to the Kubernetes API server: the official client for config, auth and transport.

The official ``kubernetes`` client loads the configuration (in-cluster service account, or a
kubeconfig with any of its auth methods, token refresh included) and owns the HTTP transport
(urllib3, TLS). We use neither its generated models (strict: they reject objects with missing
fields) nor its ``Watch`` and informer (they retry a 410 with the same stale resourceVersion,
have no backoff and no keepalive): requests here return raw bytes, decoded by our own bounded
decoder, and :mod:`kmesh_plugin.sources.reflector` does what client-go's reflector does.

Every failure becomes an :class:`ApiError` carrying what a retry policy needs: the HTTP status
(0 when no answer came), the API server's reason (``Expired``, ``TooManyRequests``, ...) or
the transport's (``connection refused``, ``read timeout``), its message and ``Retry-After``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmesh_plugin.errors import KmeshError
from kmesh_plugin.sources.decode import load_json, load_json_parts

# A list page of 500 EndpointSlices of 100 endpoints each is about 12 MB of JSON; refuse
# anything far beyond, rather than let a broken server exhaust the agent's memory.
MAX_RESPONSE_BYTES = 128 << 20
# One watch event is one object; an EndpointSlice holds at most 1000 endpoints (~250 kB).
MAX_EVENT_BYTES = 16 << 20
CONNECT_TIMEOUT = 10.0
# TCP keepalive: an idle connection is probed after 15 s, and declared dead after 3 unanswered
# probes 5 s apart, so a silently dropped watch (a partition, a vanished NAT entry) is noticed
# within about 30 s rather than hanging forever (the client's default has no keepalive).
KEEPALIVE_IDLE = 15
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3


class ApiError(KmeshError):
    """A request to the API server failed. ``status`` 0: no HTTP answer (transport error)."""

    def __init__(
        self, what: str, status: int, reason: str, message: str = "",
        retry_after: float | None = None,
    ) -> None:
        self.what = what
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        code = f"HTTP {status} " if status else ""
        text = f"{what}: {code}{reason}"
        if message and message != reason:
            text += f": {message}"
        super().__init__(text)

    @property
    def expired(self) -> bool:
        """410 Gone: the resourceVersion or continue token is too old; relist."""
        return self.status == 410


def keepalive_options() -> list[tuple[int, int, int]]:
    import urllib3

    options = list(urllib3.connection.HTTPConnection.default_socket_options)
    options.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return options


def load_configuration(kubeconfig: Path | None) -> Any:
    """The client Configuration: ``kubeconfig`` if given; else in-cluster (the pod's service
    account), then ``$KUBECONFIG``, then ``~/.kube/config``. Raises KmeshError naming what was
    tried and why each failed."""
    from kubernetes import client, config

    configuration = client.Configuration()
    tried: list[str] = []
    candidates: list[Path | None]
    if kubeconfig is not None:
        candidates = [kubeconfig]
    else:
        candidates = [None]  # in-cluster
        env = os.environ.get("KUBECONFIG")
        if env:
            candidates += [Path(p) for p in env.split(os.pathsep) if p]
        candidates.append(Path.home() / ".kube" / "config")
    for candidate in candidates:
        try:
            if candidate is None:
                config.load_incluster_config(client_configuration=configuration)
            else:
                config.load_kube_config(config_file=str(candidate),
                                        client_configuration=configuration)
        except Exception as e:  # any failure of one method: note it, try the next
            tried.append(f"{'in-cluster config' if candidate is None else candidate}: "
                         f"{str(e).strip() or type(e).__name__}")
            continue
        configuration.socket_options = keepalive_options()
        configuration.retries = False  # the reflector retries, with backoff and a reason
        configuration.connection_pool_maxsize = 16
        return configuration
    raise KmeshError("no Kubernetes API configuration found: " + "; ".join(tried))


@dataclass
class Transport:
    """Raw GETs against one API server through the official client's transport and auth."""

    configuration: Any

    def __post_init__(self) -> None:
        from kubernetes import client

        self.api = client.ApiClient(self.configuration)
        self.api.user_agent = "kmesh-plugin"

    @classmethod
    def load(cls, kubeconfig: Path | None) -> Transport:
        return cls(load_configuration(kubeconfig))

    @property
    def server(self) -> str:
        return str(self.configuration.host)

    def close(self) -> None:
        self.api.close()

    def _open(self, path: str, query: Mapping[str, str], read_timeout: float, what: str) -> Any:
        import urllib3

        method, url, headers, _, _ = self.api.param_serialize(
            "GET", path, query_params=list(query.items()),
            header_params={"Accept": "application/json"}, auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(
                method, url, header_params=headers,
                _request_timeout=(CONNECT_TIMEOUT, read_timeout),
            ).response
        except urllib3.exceptions.HTTPError as e:
            raise ApiError(what, 0, _transport_reason(e), str(e)) from None
        except Exception as e:  # TLS, auth plugin, anything: ours from here on
            raise ApiError(what, 0, type(e).__name__, str(e)) from None
        if response.status >= 300:
            try:
                body = response.read(MAX_EVENT_BYTES, decode_content=True)
            except Exception:
                body = b""
            finally:
                response.release_conn()
            raise _status_error(what, response.status, response.headers, body)
        return response

    def get(self, path: str, query: Mapping[str, str], *, read_timeout: float = 60.0,
            what: str = "") -> tuple[Any, bool]:
        """GET ``path`` and decode the JSON answer: ``(document, suspect)`` as
        :func:`~kmesh_plugin.sources.decode.load_json_parts` returns them (a malformed object
        in a list must not cost the rest of it)."""
        what = what or f"GET {path}"
        response = self._open(path, query, read_timeout, what)
        try:
            body = response.read(MAX_RESPONSE_BYTES + 1, decode_content=True)
        except Exception as e:
            raise ApiError(what, 0, _transport_reason(e), str(e)) from None
        finally:
            response.release_conn()
        if len(body) > MAX_RESPONSE_BYTES:
            raise ApiError(what, response.status, "response too large",
                           f"more than {MAX_RESPONSE_BYTES} bytes")
        return load_json_parts(body, what, max_bytes=MAX_RESPONSE_BYTES)

    def stream(self, path: str, query: Mapping[str, str], *, read_timeout: float,
               what: str = "") -> WatchStream:
        """Open a watch: an iterator of decoded events, one per line of the chunked body."""
        what = what or f"WATCH {path}"
        return WatchStream(self._open(path, query, read_timeout, what), what)


class WatchStream:
    """The events of one watch response. ``close()`` may be called from another thread: it
    unblocks a read in progress (the agent stopping)."""

    def __init__(self, response: Any, what: str) -> None:
        self.response = response
        self.what = what

    def __iter__(self) -> Iterator[tuple[Any, bool]]:
        """``(event, suspect)`` per line; see :func:`load_json_parts`."""
        buffer = b""
        try:
            if self.response.chunked:
                pieces = self.response.read_chunked(decode_content=True)
            else:
                pieces = iter(lambda: self.response.read1(65536), b"")
            for piece in pieces:
                buffer += piece
                while b"\n" in buffer:
                    line, _, buffer = buffer.partition(b"\n")
                    if line.strip():
                        yield self._event(line)
                if len(buffer) > MAX_EVENT_BYTES:
                    raise ApiError(self.what, 200, "event too large",
                                   f"a line of more than {MAX_EVENT_BYTES} bytes")
        except ApiError:
            raise
        except KmeshError:
            raise
        except Exception as e:
            raise ApiError(self.what, 0, _transport_reason(e), str(e)) from None
        if buffer.strip():
            yield self._event(buffer)

    def _event(self, line: bytes) -> tuple[Any, bool]:
        try:
            return load_json_parts(line, f"{self.what}: event", max_bytes=MAX_EVENT_BYTES)
        except KmeshError as e:
            # Not JSON at all: nothing to name, nothing to apply. Yielded as an error the
            # reflector counts, so one broken line does not end a working watch.
            return e, False

    def close(self) -> None:
        # Both may fail on a connection that is already gone; closing is best effort.
        with contextlib.suppress(Exception):
            self.response.shutdown()
        with contextlib.suppress(Exception):
            self.response.release_conn()


def _transport_reason(e: BaseException) -> str:
    """A short reason for a failure below HTTP: what an operator needs to read first."""
    import urllib3

    inner: BaseException = e
    if isinstance(e, urllib3.exceptions.MaxRetryError) and e.reason is not None:
        inner = e.reason
    if isinstance(inner, urllib3.exceptions.ReadTimeoutError | TimeoutError | socket.timeout):
        return "read timeout"
    if isinstance(inner, urllib3.exceptions.ConnectTimeoutError):
        return "connect timeout"
    if isinstance(inner, urllib3.exceptions.NewConnectionError):
        text = str(inner).lower()
        if "refused" in text:
            return "connection refused"
        return "cannot connect"
    if isinstance(inner, urllib3.exceptions.ProtocolError):
        return "connection lost"
    if isinstance(inner, urllib3.exceptions.SSLError):
        return "TLS error"
    return type(inner).__name__


def _status_error(what: str, status: int, headers: Any, body: bytes) -> ApiError:
    """An ApiError from a non-2xx answer: the Status object's reason and message if any."""
    reason, message = "", ""
    try:
        payload = load_json(body, what, max_bytes=MAX_EVENT_BYTES) if body else None
    except KmeshError:
        payload = None
    if isinstance(payload, dict) and payload.get("kind") == "Status":
        reason = str(payload.get("reason") or "")
        message = str(payload.get("message") or "")
    if not reason:
        reason = _HTTP_REASONS.get(status, "error")
    retry_after = None
    raw = headers.get("Retry-After") if headers is not None else None
    if raw is not None:
        try:
            retry_after = max(0.0, float(raw))
        except ValueError:
            retry_after = None  # an HTTP date: rare from the API server; use our backoff
    return ApiError(what, status, reason, message, retry_after)


_HTTP_REASONS = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
    410: "Expired", 429: "TooManyRequests", 500: "InternalError", 502: "BadGateway",
    503: "ServiceUnavailable", 504: "GatewayTimeout",
}
