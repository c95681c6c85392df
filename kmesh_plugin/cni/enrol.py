"""Enrolment: a pod network namespace's cookie, and the kmesh_enrolled map it goes into.

Two things here are written for start-up time, because kmesh-cni is a new process on every pod
start and stop and its whole run is added to the pod's CNI chain (target: <= 50 ms p99).

**pyroute2.netns without pyroute2.** ``import pyroute2`` runs the package ``__init__``, which
imports every netlink family, NDB and IPDB: 150-300 ms here. We need only ``pyroute2.netns``
(setns). ``load_netns`` registers a bare module for the package ``pyroute2`` (its ``__path__``
from ``importlib.util.find_spec``) so that importing the submodule skips ``__init__``; it
pulls pyroute2.config, .common, .process and ctypes.util and costs a fraction. The stub is
removed right after, so a later ``import pyroute2`` in the same process runs the real package
(reusing the submodules). If anything in that path fails (a pyroute2 whose layout differs),
it falls back to the normal import: slower, still correct.

**ADD enters the pod's netns with setns(2) itself.** Even lean, pyroute2.netns costs ~34 ms
of an ADD here (ctypes.util, logging, pyroute2.config): measured with
`python -m kmesh_lab.bench --only cni`, ADD p99 was 100 ms through pyroute2 and 50 ms
without it. ADD, the call in every pod start's critical path, therefore makes the one
setns(2) call through the libc handle it already holds for bpf(2) (``fast=True``); CHECK and a
DEL that has lost its record, which no pod waits for, go through pyroute2.netns.

**kmesh_enrolled through bpf(2) directly.** ``kmesh_plugin.datapath.syscall`` is the project's
full bpf(2) layer; importing it (with records, dataclasses, inspect, platform) costs ~40 ms.
``EnrolledMap`` issues the five commands kmesh-cni needs (OBJ_GET, OBJ_GET_INFO_BY_FD and the
element commands) itself, with syscall.py's rule: every attribute goes to the kernel in a zeroed
buffer of ATTR_SIZE bytes. tests/kernel/test_cni_plugin.py checks it against syscall.Map, and
tests/unit/test_cni_protocol.py its constants against records.py.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost); tools see the hints
if TYPE_CHECKING:
    from types import ModuleType

SO_NETNS_COOKIE = 71  # include/uapi/asm-generic/socket.h
COOKIE = struct.Struct("=Q")  # the map's key, records.U64
ENROLMENT_VALUE = bytes(8)  # struct kmesh_enrolment {u32 flags; u32 pad}, all zero
MAP_ENROLLED = "kmesh_enrolled"  # records.MAP_ENROLLED
CLONE_NEWNET = 0x40000000

# bpf(2): enum bpf_cmd, map type, sizes (/usr/include/linux/bpf.h)
_MAP_LOOKUP_ELEM = 1
_MAP_UPDATE_ELEM = 2
_MAP_DELETE_ELEM = 3
_MAP_GET_NEXT_KEY = 4
_OBJ_GET = 7
_OBJ_GET_INFO_BY_FD = 15
_MAP_TYPE_HASH = 1
ATTR_SIZE = 256  # as syscall.ATTR_SIZE: larger than union bpf_attr, the tail is zero
_SYSCALL_NUMBERS = {"x86_64": 321, "amd64": 321, "aarch64": 280, "arm64": 280}

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# How pyroute2.netns was imported in this process: "lean", "full" or "" (not yet).
netns_import = ""


class NetnsError(OSError):
    """The pod's network namespace could not be opened, entered or read."""


class MapError(OSError):
    """A bpf(2) command on kmesh_enrolled failed; ``errno`` is the kernel's."""


# -- pyroute2.netns, lean --------------------------------------------------------------------


def load_netns(lean: bool = True) -> ModuleType:
    """pyroute2.netns; without running pyroute2/__init__ when ``lean`` and possible."""
    global netns_import
    mod = sys.modules.get("pyroute2.netns")
    if mod is not None:
        netns_import = netns_import or "full"
        return mod
    if lean and "pyroute2" not in sys.modules:
        try:
            mod = _lean_import()
        except Exception:
            mod = None  # the normal import below says what is wrong, if anything is
        if mod is not None:
            netns_import = "lean"
            return mod
    import pyroute2.netns

    netns_import = "full"
    return pyroute2.netns


def _lean_import() -> ModuleType:
    import importlib
    import importlib.util

    spec = importlib.util.find_spec("pyroute2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pyroute2 is not an importable package")
    stub = type(sys)("pyroute2")
    stub.__path__ = list(spec.submodule_search_locations)
    stub.__spec__ = spec
    stub.__file__ = spec.origin
    stub.__package__ = "pyroute2"
    before = set(sys.modules)
    sys.modules["pyroute2"] = stub
    try:
        return importlib.import_module("pyroute2.netns")
    except BaseException:
        for name in set(sys.modules) - before:
            if name.startswith("pyroute2."):
                del sys.modules[name]
        raise
    finally:
        if sys.modules.get("pyroute2") is stub:
            del sys.modules["pyroute2"]


# -- the netns cookie ------------------------------------------------------------------------


def open_netns(path: str) -> int:
    """An fd of the namespace file ``path``. FileNotFoundError if it is gone (DEL and CHECK
    treat that as "nothing to look at"), NetnsError for anything else. O_NONBLOCK: a path that
    names a FIFO must not hang the plugin."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        err = getattr(exc, "errno", None) or errno.EINVAL
        raise NetnsError(err, f"cannot open network namespace {path!r}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None


def same_netns(fd: int) -> bool:
    """Whether ``fd`` is the namespace this thread is in."""
    mine = os.stat("/proc/thread-self/ns/net")
    theirs = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


class _Setns:
    """setns(2) for a network namespace, as pyroute2.netns.setns is called here."""

    @staticmethod
    def setns(fd: int, flags: int = 0, libc: object = None) -> None:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


def netns_cookie(ns_fd: int, label: str = "", *, lean: bool = True, fast: bool = False) -> int:
    """The cookie of the network namespace ``ns_fd`` (bpf_get_netns_cookie() in the program):
    enter it with pyroute2's setns, read SO_NETNS_COOKIE from a socket made there, come back.

    The way back is an fd of /proc/thread-self/ns/net opened first (pyroute2's pushns saves
    /proc/self, the thread group leader's namespace, which is wrong off the main thread).
    ``fast``: setns(2) directly instead of pyroute2 (see the module docstring)."""
    netns = _Setns if fast else load_netns(lean)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            netns.setns(ns_fd, flags=0, libc=_libc)
        except OSError as exc:
            raise NetnsError(exc.errno or errno.EINVAL,
                             f"cannot enter network namespace {label!r}: "
                             f"{os.strerror(exc.errno) if exc.errno else exc}") from None
        try:
            return _cookie_here()
        except OSError as exc:  # a kernel without SO_NETNS_COOKIE (< 5.14): ENOPROTOOPT
            raise NetnsError(exc.errno or errno.EINVAL,
                             f"cannot read the cookie of network namespace {label!r}: "
                             f"{exc.strerror or exc}") from None
        finally:
            try:
                netns.setns(home, flags=0, libc=_libc)
            except OSError as exc:  # pragma: no cover - the kernel refuses only a bad fd
                raise NetnsError(exc.errno or errno.EINVAL,
                                 "cannot return to the plugin's network namespace") from None
    finally:
        os.close(home)


def _cookie_here() -> int:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, COOKIE.size)
    return int(COOKIE.unpack(raw)[0])


def cookie_of_path(path: str, *, lean: bool = True) -> int:
    """The cookie of the namespace at ``path`` (FileNotFoundError if it is gone)."""
    fd = open_netns(path)
    try:
        return netns_cookie(fd, path, lean=lean)
    finally:
        os.close(fd)


# -- kmesh_enrolled --------------------------------------------------------------------------


def _bpf_nr() -> int:
    machine = os.uname().machine.lower()
    if machine not in _SYSCALL_NUMBERS:
        raise MapError(errno.ENOSYS, f"bpf(2) syscall number unknown for machine {machine!r}")
    return _SYSCALL_NUMBERS[machine]


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    ret = _syscall(ctypes.c_long(_bpf_nr()), ctypes.c_long(cmd), attr, ctypes.c_long(ATTR_SIZE))
    if ret < 0:
        err = ctypes.get_errno()
        raise MapError(err, f"bpf({what}) failed: {errno.errorcode.get(err, err)} "
                            f"({os.strerror(err)})")
    return int(ret)


class EnrolledMap:
    """The pinned kmesh_enrolled map: netns cookie (u64) -> struct kmesh_enrolment (zeros)."""

    def __init__(self, pin_dir: str) -> None:
        self.path = os.path.join(pin_dir, "maps", MAP_ENROLLED)
        path = ctypes.create_string_buffer(os.fsencode(self.path))
        attr = ctypes.create_string_buffer(ATTR_SIZE)
        struct.pack_into("=Q", attr, 0, ctypes.addressof(path))
        try:
            self.fd = _bpf(_OBJ_GET, attr, f"OBJ_GET {self.path}")
        except MapError as exc:
            hint = " (is the datapath attached?)" if exc.errno == errno.ENOENT else ""
            raise MapError(exc.errno, f"{exc.strerror}{hint}") from None
        try:
            self._check()
        except BaseException:
            os.close(self.fd)
            raise

    def _check(self) -> None:
        """Refuse a pin that is not our map: a wrong key size would make the kernel read past
        our 8-byte buffers."""
        info = ctypes.create_string_buffer(24)  # type, id, key_size, value_size, max, flags
        attr = ctypes.create_string_buffer(ATTR_SIZE)
        struct.pack_into("=IIQ", attr, 0, self.fd, len(info), ctypes.addressof(info))
        _bpf(_OBJ_GET_INFO_BY_FD, attr, f"OBJ_GET_INFO_BY_FD {self.path}")
        map_type, _id, key_size, value_size, self.max_entries, _flags = struct.unpack(
            "=6I", info.raw)
        if (map_type, key_size, value_size) != (_MAP_TYPE_HASH, COOKIE.size,
                                                len(ENROLMENT_VALUE)):
            raise MapError(errno.EINVAL, f"{self.path} is not kmesh_enrolled (type {map_type},"
                                         f" key {key_size} B, value {value_size} B)")

    def _elem(self, cmd: int, what: str, key: bytes | None, out_size: int = 0,
              value: bytes | None = None) -> ctypes.Array[ctypes.c_char] | None:
        kbuf = ctypes.create_string_buffer(key, len(key)) if key is not None else None
        vbuf = (ctypes.create_string_buffer(value, len(value)) if value is not None
                else ctypes.create_string_buffer(out_size) if out_size else None)
        attr = ctypes.create_string_buffer(ATTR_SIZE)
        struct.pack_into("=IIQQQ", attr, 0, self.fd, 0,
                         ctypes.addressof(kbuf) if kbuf is not None else 0,
                         ctypes.addressof(vbuf) if vbuf is not None else 0, 0)
        try:
            _bpf(cmd, attr, f"{what} {MAP_ENROLLED}")
        except MapError as exc:
            if exc.errno == errno.ENOENT:
                return None
            if exc.errno == errno.E2BIG and cmd == _MAP_UPDATE_ELEM:
                raise MapError(exc.errno, f"{MAP_ENROLLED} is full ({self.max_entries} "
                                          "network namespaces)") from None
            raise
        return vbuf if vbuf is not None else kbuf

    def add(self, cookie: int) -> None:
        self._elem(_MAP_UPDATE_ELEM, "MAP_UPDATE_ELEM", COOKIE.pack(cookie),
                   value=ENROLMENT_VALUE)

    def contains(self, cookie: int) -> bool:
        return self._elem(_MAP_LOOKUP_ELEM, "MAP_LOOKUP_ELEM", COOKIE.pack(cookie),
                          out_size=len(ENROLMENT_VALUE)) is not None

    def remove(self, cookie: int) -> bool:
        """Delete ``cookie``; False if it was not there."""
        return self._elem(_MAP_DELETE_ELEM, "MAP_DELETE_ELEM", COOKIE.pack(cookie)) is not None

    def cookies(self) -> list[int]:
        """Every cookie in the map (GET_NEXT_KEY from the start; a hash map restarts when the
        current key vanishes, so the result is deduplicated)."""
        seen: dict[int, None] = {}
        key: bytes | None = None
        for _ in range(4 * max(self.max_entries, 1)):  # bounded even under churn
            nxt = self._elem(_MAP_GET_NEXT_KEY, "MAP_GET_NEXT_KEY", key, out_size=COOKIE.size)
            if nxt is None:
                break
            key = nxt.raw
            seen[COOKIE.unpack(key)[0]] = None
        return list(seen)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> EnrolledMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
