"""kmesh-cni's state: one record per attachment in <stateDir>/pods/, and the lock around changes.

A record says which pod an enrolled netns cookie belongs to. kmesh-cni writes it on ADD and
removes it on DEL and GC; the agent reads the directory (``read_records``) to fire
kmesh_pod_enrolled/kmesh_pod_removed and to show pods. The format (docs/cni-contract):

    {"version": 1, "containerId": str, "ifname": str, "netns": str, "netnsCookie": int,
     "podNamespace": str, "podName": str, "podUid": str, "ips": [str, ...],
     "cniVersion": str, "enrolledAt": float, "network": str (the conflist's name; optional)}

Each file is written whole and renamed into place, so a reader sees the old record or the new
one, never a part. Every change happens under an flock on <stateDir>/lock: kmesh-cni runs once
per pod and runtimes start pods in parallel. No fsync: the state directory lives in /run
(tmpfs); a power loss wipes it together with the bpffs maps it describes.

PodRecord is a plain class, not a dataclass: importing ``dataclasses`` (it pulls ``inspect``)
costs more than the rest of a DEL.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost); tools see the hints
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

RECORD_VERSION = 1
PODS = "pods"
LOCK = "lock"
SUFFIX = ".json"
LOCK_TIMEOUT = 10.0
_NAME_MAX = 200  # file names stay well inside NAME_MAX (255) with the suffix and a tmp prefix
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_COOKIE_MAX = 1 << 64


class PodRecord:
    """One enrolled attachment (containerId, ifname) and the pod behind it."""

    __slots__ = ("cni_version", "container_id", "enrolled_at", "ifname", "ips", "netns",
                 "netns_cookie", "network", "pod_name", "pod_namespace", "pod_uid")

    FIELDS = ("container_id", "ifname", "netns", "netns_cookie", "pod_namespace", "pod_name",
              "pod_uid", "ips", "cni_version", "enrolled_at", "network")

    def __init__(self, container_id: str, ifname: str, netns: str, netns_cookie: int,
                 pod_namespace: str = "", pod_name: str = "", pod_uid: str = "",
                 ips: tuple[str, ...] = (), cni_version: str = "", enrolled_at: float = 0.0,
                 network: str = "") -> None:
        self.container_id = container_id
        self.ifname = ifname
        self.netns = netns
        self.netns_cookie = netns_cookie
        self.pod_namespace = pod_namespace
        self.pod_name = pod_name
        self.pod_uid = pod_uid
        self.ips = tuple(ips)
        self.cni_version = cni_version
        self.enrolled_at = enrolled_at
        self.network = network  # the conflist's name: GC judges only its own network's

    @property
    def key(self) -> tuple[str, str]:
        """The attachment: what CNI identifies it by."""
        return self.container_id, self.ifname

    def to_json(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, "containerId": self.container_id,
                "ifname": self.ifname, "netns": self.netns, "netnsCookie": self.netns_cookie,
                "podNamespace": self.pod_namespace, "podName": self.pod_name,
                "podUid": self.pod_uid, "ips": list(self.ips), "cniVersion": self.cni_version,
                "enrolledAt": self.enrolled_at, "network": self.network}

    @classmethod
    def from_json(cls, doc: object) -> PodRecord:
        """Parse a record; ValueError says what is wrong."""
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("version") != RECORD_VERSION:
            raise ValueError(f"unknown record version {doc.get('version')!r}")
        strings = {}
        for key in ("containerId", "ifname", "netns", "podNamespace", "podName", "podUid",
                    "cniVersion"):
            value = doc.get(key)
            if not isinstance(value, str):
                raise ValueError(f"{key} must be a string")
            strings[key] = value
        cookie = doc.get("netnsCookie")
        if type(cookie) is not int or not 0 < cookie < _COOKIE_MAX:
            raise ValueError("netnsCookie must be an integer in (0, 2**64)")
        ips = doc.get("ips")
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise ValueError("ips must be a list of strings")
        at = doc.get("enrolledAt")
        if type(at) not in (int, float):
            raise ValueError("enrolledAt must be a number")
        network = doc.get("network", "")  # absent in records of the first kmesh-cni
        if not isinstance(network, str):
            raise ValueError("network must be a string")
        if not strings["containerId"] or not strings["ifname"]:
            raise ValueError("containerId and ifname must not be empty")
        return cls(strings["containerId"], strings["ifname"], strings["netns"], cookie,
                   strings["podNamespace"], strings["podName"], strings["podUid"], tuple(ips),
                   strings["cniVersion"], float(at), network)

    def replace(self, **changes: Any) -> PodRecord:
        values = {name: getattr(self, name) for name in self.FIELDS}
        values.update(changes)
        return PodRecord(**values)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PodRecord):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.FIELDS)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, n) for n in self.FIELDS))

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.FIELDS)
        return f"PodRecord({inner})"


# -- file names ----------------------------------------------------------------------------


def record_name(container_id: str, ifname: str) -> str:
    """The file name (without suffix) of an attachment's record.

    "<containerId>@<ifname>" with every byte of the ifname outside [A-Za-z0-9_.-] as %XX: a
    CNI container ID never holds '@' or '%', so the name is unambiguous. A container ID that
    is not a valid CNI one, or a name too long for a file name, becomes "%" + a SHA-256.
    """
    plain = container_id[:1].isalnum() and all(c in _PLAIN for c in container_id)
    name = container_id + "@" + _quote(ifname)
    if plain and len(name) <= _NAME_MAX:
        return name
    import hashlib  # only for container IDs no CNI runtime sends

    raw = (container_id + "\0" + ifname).encode("utf-8", "surrogateescape")
    return "%" + hashlib.sha256(raw).hexdigest()


def _quote(text: str) -> str:
    return "".join(c if c in _PLAIN else "".join(f"%{b:02X}" for b in c.encode(
        "utf-8", "surrogateescape")) for c in text)


def pods_dir(state_dir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(state_dir), PODS)


def record_path(state_dir: str | os.PathLike[str], container_id: str, ifname: str) -> str:
    """<stateDir>/pods/<name>.json of the attachment (container_id, ifname)."""
    return os.path.join(pods_dir(state_dir), record_name(container_id, ifname) + SUFFIX)


# -- reading -------------------------------------------------------------------------------


def load_record(path: str) -> PodRecord:
    """The record in ``path``; OSError if unreadable, ValueError if malformed."""
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    rec = PodRecord.from_json(doc)
    if os.path.basename(path) != record_name(rec.container_id, rec.ifname) + SUFFIX:
        raise ValueError(f"file name does not match its attachment {rec.key}")
    return rec


def read_record(state_dir: str | os.PathLike[str], container_id: str,
                ifname: str) -> PodRecord | None:
    """The attachment's record, or None if there is none (a malformed one raises ValueError)."""
    try:
        return load_record(record_path(state_dir, container_id, ifname))
    except FileNotFoundError:
        return None


def scan(state_dir: str | os.PathLike[str]) -> tuple[list[PodRecord], list[tuple[str, str]]]:
    """Every record, sorted by attachment, and the (path, reason) of each file that is not one.

    Files being written (".<name>.json.tmp.<pid>") are not listed; a record removed while
    scanning is skipped."""
    records: list[PodRecord] = []
    bad: list[tuple[str, str]] = []
    try:
        entries = list(os.scandir(pods_dir(state_dir)))
    except FileNotFoundError:
        return records, bad
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.endswith(SUFFIX):
            continue
        try:
            records.append(load_record(entry.path))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            bad.append((entry.path, str(exc)))
    records.sort(key=lambda r: r.key)
    return records, bad


def read_records(state_dir: str | os.PathLike[str],
                 on_bad: Callable[[str, str], None] | None = None) -> list[PodRecord]:
    """Every well-formed record in <stateDir>/pods. A malformed file is skipped and reported to
    ``on_bad(path, reason)`` (default: a warning on the "kmesh_plugin.cni" logger); one bad file
    never fails the read. A missing state directory holds no records."""
    records, bad = scan(state_dir)
    for path, reason in bad:
        (on_bad or _warn_bad)(path, reason)
    return records


def _warn_bad(path: str, reason: str) -> None:
    import logging  # imported only when there is something to say

    logging.getLogger("kmesh_plugin.cni").warning("skipping malformed CNI state file %s: %s",
                                                  path, reason)


# -- writing (callers hold the lock) -------------------------------------------------------


def write_record(state_dir: str | os.PathLike[str], rec: PodRecord) -> str:
    """Write ``rec`` atomically (a temporary file renamed over the record); returns its path."""
    directory = pods_dir(state_dir)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    path = record_path(state_dir, rec.container_id, rec.ifname)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    data = json.dumps(rec.to_json(), allow_nan=False).encode("ascii") + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    return path


def remove_record(state_dir: str | os.PathLike[str], container_id: str, ifname: str) -> bool:
    """Remove the attachment's record; False if there was none."""
    return _unlink(record_path(state_dir, container_id, ifname))


def remove_file(path: str) -> bool:
    return _unlink(path)


def stale_temporaries(state_dir: str | os.PathLike[str]) -> list[str]:
    """Temporary files a writer left when it died (only meaningful under the lock)."""
    try:
        return [e.path for e in os.scandir(pods_dir(state_dir))
                if e.name.startswith(".") and ".tmp." in e.name]
    except FileNotFoundError:
        return []


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


# -- the lock ------------------------------------------------------------------------------


class LockTimeout(OSError):
    """Another kmesh-cni held <stateDir>/lock for longer than the timeout."""


class StateLock:
    """An exclusive flock on <stateDir>/lock, taken with a deadline.

    Polls with LOCK_NB and a short, growing sleep instead of a blocking flock, so that a
    stuck holder costs a bounded wait (the caller answers "try again later") rather than a
    hung pod start. Critical sections are a map write and a rename: waits are short."""

    def __init__(self, state_dir: str | os.PathLike[str], timeout: float | None = None) -> None:
        self.state_dir = os.fspath(state_dir)
        self.timeout = LOCK_TIMEOUT if timeout is None else timeout
        self.fd = -1
        self.waited = 0.0

    def __enter__(self) -> StateLock:
        os.makedirs(self.state_dir, mode=0o755, exist_ok=True)
        fd = os.open(os.path.join(self.state_dir, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o644)
        start = time.monotonic()
        pause = 0.0005
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                        raise
                if time.monotonic() - start >= self.timeout:
                    raise LockTimeout(errno.EWOULDBLOCK,
                                      f"{self.state_dir}/{LOCK} busy for {self.timeout:g} s")
                time.sleep(pause)
                pause = min(pause * 2, 0.01)
        except BaseException:
            os.close(fd)
            raise
        self.waited = time.monotonic() - start
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only fd of the open file releases the flock
            self.fd = -1
