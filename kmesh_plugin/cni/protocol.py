"""The CNI execution protocol as kmesh-cni speaks it: environment, stdin, versions, results, errors.

Facts from the CNI spec (SPEC.md 1.1.0 and the 0.3.x/0.4.0/1.0.0 texts):

- Parameters come in CNI_* environment variables; which ones are required depends on the command
  (ADD/CHECK: CONTAINERID, NETNS, IFNAME; DEL: CONTAINERID, IFNAME; GC: PATH).
- The request configuration comes on stdin as one JSON object with ``cniVersion`` and ``name``.
- A plugin answers only in a version it supports. CHECK exists since 0.4.0, GC and STATUS since
  1.1.0: an older version asking for them gets "incompatible CNI version" (code 1).
- Results of 0.3.0, 0.3.1 and 0.4.0 share one shape, in which every ``ips`` entry carries a
  ``version`` ("4"/"6"); 1.0.0 dropped that key and 1.1.0 kept 1.0.0's shape.
- An error is ``{"cniVersion", "code", "msg", "details"}`` on stdout and a non-zero exit.

This module imports only what the interpreter has loaded anyway (os, json): every millisecond of
import time is paid on each pod start and stop.
"""

from __future__ import annotations

import json
import os
import time

TYPE_CHECKING = False  # typing itself costs milliseconds to import; hints need it only in tools
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"
COMMANDS = ("ADD", "CHECK", "DEL", "GC", "STATUS", "VERSION")

# A conflist entry plus a prevResult is a few KiB. The bound keeps a runaway writer from making
# the plugin buffer without limit; past it the request is refused (code 5) instead of cut.
STDIN_LIMIT = 1 << 20
# A runtime writes the whole request and closes stdin. If it never closes, give up rather than
# hold a pod start forever.
STDIN_TIMEOUT = 30.0

# Error codes of the spec (0-99 are reserved for it).
E_INCOMPATIBLE_VERSION = 1
E_UNSUPPORTED_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_INVALID_ENV = 4
E_IO = 5
E_DECODE = 6
E_INVALID_CONFIG = 7
E_TRY_AGAIN = 11
E_NOT_AVAILABLE = 50
# Ours (100+).
E_INTERNAL = 100  # a bug: anything not turned into a CniError on purpose
E_NETNS = 101  # the pod's network namespace could not be entered or read
E_DATAPATH = 102  # the kmesh_enrolled map could not be opened or written
E_STATE = 103  # the state directory could not be read or written
E_NOT_ENROLLED = 104  # CHECK: the attachment is not (or no longer) enrolled

# Which environment variables each command needs (SPEC.md section 2), besides CNI_COMMAND.
REQUIRED_ENV: dict[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "GC": ("CNI_PATH",),
    "STATUS": (),
    "VERSION": (),
}
# The first spec version that has each command (older ones are refused with code 1).
SINCE: dict[str, str] = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}

_NAME_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_NAME_REST = _NAME_FIRST | frozenset("_.-")
IFNAME_MAX = 15  # IFNAMSIZ - 1


class CniError(Exception):
    """An error result: ``code`` is a spec code (or ours, 100+)."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


class Env:
    """The CNI_* parameters of one invocation."""

    __slots__ = ("args", "command", "container_id", "ifname", "netns", "path")

    def __init__(self, command: str, container_id: str, netns: str, ifname: str,
                 args: dict[str, str], path: str) -> None:
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.args = args
        self.path = path


def parse_env(environ: Mapping[str, str]) -> Env:
    """Read and validate the parameters; code 4 names every missing or invalid variable."""
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CniError(E_INVALID_ENV, "required env variables [CNI_COMMAND] missing")
    if command not in REQUIRED_ENV:
        raise CniError(E_INVALID_ENV, f"unknown CNI_COMMAND: {command!r}",
                       f"CNI_COMMAND must be one of {', '.join(COMMANDS)}")
    missing = [name for name in REQUIRED_ENV[command] if not environ.get(name)]
    if missing:
        raise CniError(E_INVALID_ENV, f"required env variables [{','.join(missing)}] missing")
    container_id = environ.get("CNI_CONTAINERID", "")
    ifname = environ.get("CNI_IFNAME", "")
    if "CNI_CONTAINERID" in REQUIRED_ENV[command] and not valid_name(container_id):
        raise CniError(E_INVALID_ENV, "invalid characters in CNI_CONTAINERID", container_id)
    if "CNI_IFNAME" in REQUIRED_ENV[command]:
        problem = ifname_problem(ifname)
        if problem:
            raise CniError(E_INVALID_ENV, f"invalid CNI_IFNAME: {problem}", ifname)
    return Env(command, container_id, environ.get("CNI_NETNS", ""), ifname,
               parse_cni_args(environ.get("CNI_ARGS", "")), environ.get("CNI_PATH", ""))


def valid_name(text: str) -> bool:
    """A container ID or network name: an alphanumeric, then alphanumerics, '_', '.', '-'."""
    return bool(text) and text[0] in _NAME_FIRST and all(c in _NAME_REST for c in text)


def ifname_problem(name: str) -> str:
    """Why ``name`` cannot be a Linux interface name ("" if it can)."""
    if not name:
        return "empty"
    if len(name.encode("utf-8", "surrogateescape")) > IFNAME_MAX:
        return f"longer than {IFNAME_MAX} bytes"
    if name in (".", ".."):
        return "'.' or '..'"
    if any(c in "/:" or c.isspace() for c in name):
        return "contains '/', ':' or white space"
    return ""


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS "K=V;K2=V2" as a dict. Pairs without '=' are skipped: runtimes pass flags we do
    not read (podman: IgnoreUnknown=1), and a malformed one must not fail a pod start."""
    out: dict[str, str] = {}
    for pair in text.split(";"):
        key, sep, value = pair.partition("=")
        if sep and key:
            out[key.strip()] = value.strip()
    return out


def read_stdin(fd: int = 0, limit: int | None = None, timeout: float | None = None) -> bytes:
    """All of stdin, at most ``limit`` bytes (STDIN_LIMIT), within ``timeout`` s
    (STDIN_TIMEOUT); code 5 otherwise."""
    import select  # a C module; only an invocation with stdin pays for it

    limit = STDIN_LIMIT if limit is None else limit
    timeout = STDIN_TIMEOUT if timeout is None else timeout

    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + timeout
    poller = select.poll()
    try:
        poller.register(fd, select.POLLIN | select.POLLHUP)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise CniError(E_IO, f"stdin not closed within {timeout:g} s",
                               f"read {size} bytes")
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise CniError(E_IO, f"network configuration on stdin exceeds {limit} bytes",
                               f"kmesh-cni reads at most {limit} bytes of stdin")
            chunks.append(chunk)
    except OSError as exc:
        raise CniError(E_IO, f"error reading from stdin: {exc.strerror or exc}") from None


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def decode_config(data: bytes) -> dict[str, Any]:
    """The request configuration: one JSON object (code 6 otherwise). NaN, Infinity and numbers
    too large for a double are refused here, so whatever is decoded can be printed back as
    strict JSON (a prevResult goes out again)."""
    try:
        conf = json.loads(data, parse_float=_finite, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise CniError(E_DECODE, "error decoding network config", str(exc)[:300]) from None
    if not isinstance(conf, dict):
        raise CniError(E_DECODE, "error decoding network config",
                       f"expected a JSON object, got {type(conf).__name__}")
    return conf


def version_tuple(version: str) -> tuple[int, int, int]:
    """"1.0.0" -> (1, 0, 0); ValueError for anything else."""
    parts = version.split(".")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() and p.isascii() for p in parts):
        raise ValueError(f"invalid version {version!r}")
    nums = [int(p) for p in parts] + [0] * (3 - len(parts))
    return nums[0], nums[1], nums[2]


def request_version(conf: Mapping[str, Any], command: str) -> str:
    """The request's cniVersion if we speak it and it has ``command``; code 1 otherwise."""
    version = conf.get("cniVersion", "")
    if not isinstance(version, str):
        raise CniError(E_DECODE, "cniVersion must be a string", repr(version)[:100])
    if version not in SUPPORTED_VERSIONS:
        raise CniError(E_INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f"config is {version[:40]!r}, plugin supports "
                       f"{list(SUPPORTED_VERSIONS)}")
    since = SINCE.get(command)
    if since and version_tuple(version) < version_tuple(since):
        raise CniError(E_INCOMPATIBLE_VERSION, f"config version does not allow {command}",
                       f"{command} needs CNI {since} or later, config is {version}")
    return version


def version_answer(data: bytes) -> dict[str, Any]:
    """The VERSION result. It echoes the request's cniVersion (any well-formed one: VERSION is
    how a runtime finds out what we speak), else our latest; stdin problems never fail it."""
    version = LATEST
    try:
        conf = json.loads(data)
        asked = conf.get("cniVersion") if isinstance(conf, dict) else None
        if isinstance(asked, str) and len(asked) <= 16:
            version_tuple(asked)
            version = asked
    except (ValueError, RecursionError):
        pass
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}


def check_name(conf: Mapping[str, Any]) -> None:
    """The network name the runtime inserts (code 7 if missing or malformed)."""
    name = conf.get("name")
    if not isinstance(name, str) or not name:
        raise CniError(E_INVALID_CONFIG, "missing network name")
    if not valid_name(name):
        raise CniError(E_INVALID_CONFIG, "invalid characters found in network name", name[:100])


def path_field(conf: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    """An absolute path from our conflist entry: missing or not a string is an invalid
    config (7); a value we cannot use (relative, NUL) is an unsupported field (2)."""
    value = conf.get(key)
    if value is None or value == "":
        if required:
            raise CniError(E_INVALID_CONFIG, f"missing {key} in the kmesh-cni configuration",
                           "kmesh-plugin cni install writes pinDir and stateDir")
        return None
    if not isinstance(value, str):
        raise CniError(E_INVALID_CONFIG, f"{key} must be a string", repr(value)[:100])
    if not value.startswith("/") or "\0" in value:
        raise CniError(E_UNSUPPORTED_FIELD, f"unsupported {key}: {value[:200]!r}",
                       f"{key} must be an absolute path")
    return value


def required_path(conf: Mapping[str, Any], key: str) -> str:
    value = path_field(conf, key, required=True)
    assert value is not None  # path_field raised otherwise
    return value


def required_prev_result(conf: Mapping[str, Any], command: str) -> dict[str, Any]:
    prev = prev_result(conf, command, required=True)
    assert prev is not None  # prev_result raised otherwise
    return prev


def prev_result(conf: Mapping[str, Any], command: str, *, required: bool) -> dict[str, Any] | None:
    """The prevResult: kmesh-cni only chains after an interface plugin, so ADD (and CHECK)
    without one is an invalid config."""
    prev = conf.get("prevResult")
    if prev is None:
        if required:
            raise CniError(E_INVALID_CONFIG, f"{command} without prevResult",
                           "kmesh-cni is a chained plugin: list it after the interface "
                           "plugin (e.g. bridge) in a conflist")
        return None
    if not isinstance(prev, dict):
        raise CniError(E_INVALID_CONFIG, "prevResult must be a JSON object",
                       f"got {type(prev).__name__}")
    return prev


def result_ips(prev: Mapping[str, Any] | None, valid: Callable[[str], bool]) -> list[str]:
    """The addresses of a result's ``ips`` (prefix length dropped), those ``valid`` accepts."""
    out: list[str] = []
    ips = prev.get("ips") if prev else None
    if not isinstance(ips, list):
        return out
    for entry in ips:
        address = entry.get("address") if isinstance(entry, dict) else None
        if isinstance(address, str):
            addr = address.partition("/")[0]
            if valid(addr) and addr not in out:
                out.append(addr)
    return out


def convert_result(prev: Mapping[str, Any], version: str) -> dict[str, Any]:
    """``prev`` as a result of ``version``: the same object with that cniVersion. Only when the
    prevResult comes in the other result shape (0.3.x/0.4.0 vs 1.x) are the ``ips`` entries'
    ``version`` keys added or dropped, as the spec's conversions do."""
    out = dict(prev)
    out["cniVersion"] = version
    old = _major_shape(prev.get("cniVersion"))
    new = _major_shape(version)
    ips = prev.get("ips")
    if old is None or old == new or not isinstance(ips, list):
        return out
    converted: list[Any] = []
    for entry in ips:
        if isinstance(entry, dict):
            entry = dict(entry)
            if new == "1":
                entry.pop("version", None)
            elif "version" not in entry and isinstance(entry.get("address"), str):
                entry["version"] = "6" if ":" in entry["address"] else "4"
        converted.append(entry)
    out["ips"] = converted
    return out


def _major_shape(version: object) -> str | None:
    """"0" for the 0.3.x/0.4.0 result shape, "1" for 1.x, None if unknown."""
    if not isinstance(version, str):
        return None
    try:
        major = version_tuple(version)[0]
    except ValueError:
        return None
    return "1" if major >= 1 else "0"


def encode(document: Mapping[str, Any]) -> bytes:
    """One JSON document and a newline, ASCII only (any surrogate an environment carried is
    escaped, never an encoding error)."""
    return (json.dumps(document, allow_nan=False) + "\n").encode("ascii")


def error_document(err: CniError, version: str) -> dict[str, Any]:
    return {"cniVersion": version, "code": err.code, "msg": err.msg, "details": err.details}
