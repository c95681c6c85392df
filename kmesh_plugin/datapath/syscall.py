"""A small ctypes layer over the bpf(2) system call.

Only what the datapath needs: maps (create, open pinned, element and batch operations, per-CPU
values), object pinning, program and link introspection, cgroup bpf_links, and an RCU barrier.

Layouts and numbers come from ``/usr/include/linux/bpf.h`` (UAPI, stable). Each command gets its
own ``ctypes.Structure`` holding only the leading fields of ``union bpf_attr`` it uses, but that
struct never reaches the kernel by itself. The rule: :func:`bpf` copies it into a zeroed buffer
of :data:`ATTR_SIZE` bytes, passes that buffer and its full size, and copies the struct's bytes
back afterwards. Never pass a short struct to the kernel directly: the kernel writes output
fields at their fixed offsets in the union, which can lie past the fields a command's struct
declares (PROG_QUERY writes ``query.revision`` at offset 56, past the 40 bytes of
``_QueryAttr``; 6.16+ kernels have been seen to do so whatever size is passed, while 6.18.44
writes it only when the size reaches it). ATTR_SIZE is larger than the union of any kernel this
runs on (168 bytes on 6.18; a kernel test compares it with the running kernel's BTF); the
kernel accepts a size larger than its own union when the bytes past it are zero, and the zeros
we pass for fields we do not set mean "unset". Outputs past the caller's struct land in the
private buffer and are dropped.

Every failed command raises :class:`~kmesh_plugin.errors.BpfError` carrying the kernel's errno,
the command name and a hint of the object involved (pinned path or map name). Argument mistakes
that can be detected before calling the kernel (wrong key or value length) raise ``ValueError``.

File descriptors are owned by the object that opened them (:class:`Map`, :class:`Barrier`) and
closed by ``close()`` or the context manager; functions that return a bare ``int`` fd hand its
ownership to the caller, who must ``os.close()`` it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Self

from kmesh_plugin.errors import BpfError

# --------------------------------------------------------------------------------------------
# Numbers from /usr/include/linux/bpf.h
# --------------------------------------------------------------------------------------------

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_MAP_FREEZE = 22
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_DETACH = 34

# enum bpf_map_type
BPF_MAP_TYPE_UNSPEC = 0
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_STACK_TRACE = 7
BPF_MAP_TYPE_CGROUP_ARRAY = 8
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_HASH_OF_MAPS = 13
BPF_MAP_TYPE_DEVMAP = 14
BPF_MAP_TYPE_SOCKMAP = 15
BPF_MAP_TYPE_CPUMAP = 16
BPF_MAP_TYPE_XSKMAP = 17
BPF_MAP_TYPE_SOCKHASH = 18
BPF_MAP_TYPE_CGROUP_STORAGE = 19
BPF_MAP_TYPE_REUSEPORT_SOCKARRAY = 20
BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE = 21
BPF_MAP_TYPE_QUEUE = 22
BPF_MAP_TYPE_STACK = 23
BPF_MAP_TYPE_SK_STORAGE = 24
BPF_MAP_TYPE_DEVMAP_HASH = 25
BPF_MAP_TYPE_STRUCT_OPS = 26
BPF_MAP_TYPE_RINGBUF = 27
BPF_MAP_TYPE_INODE_STORAGE = 28
BPF_MAP_TYPE_TASK_STORAGE = 29
BPF_MAP_TYPE_BLOOM_FILTER = 30

# Short aliases of the map types the datapath uses.
HASH = BPF_MAP_TYPE_HASH
ARRAY = BPF_MAP_TYPE_ARRAY
PERCPU_HASH = BPF_MAP_TYPE_PERCPU_HASH
PERCPU_ARRAY = BPF_MAP_TYPE_PERCPU_ARRAY
LRU_HASH = BPF_MAP_TYPE_LRU_HASH
LRU_PERCPU_HASH = BPF_MAP_TYPE_LRU_PERCPU_HASH
LPM_TRIE = BPF_MAP_TYPE_LPM_TRIE
ARRAY_OF_MAPS = BPF_MAP_TYPE_ARRAY_OF_MAPS
HASH_OF_MAPS = BPF_MAP_TYPE_HASH_OF_MAPS

# Map types whose syscall-side values hold one slot per possible CPU, each slot rounded up to
# 8 bytes (kernel/bpf/syscall.c bpf_map_value_size()).
PERCPU_MAP_TYPES = frozenset(
    {
        BPF_MAP_TYPE_PERCPU_HASH,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        BPF_MAP_TYPE_LRU_PERCPU_HASH,
        BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE,
    }
)

# enum bpf_prog_type (the ones the project meets)
BPF_PROG_TYPE_UNSPEC = 0
BPF_PROG_TYPE_SOCKET_FILTER = 1
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_XDP = 6
BPF_PROG_TYPE_CGROUP_SKB = 8
BPF_PROG_TYPE_CGROUP_SOCK = 9
BPF_PROG_TYPE_SOCK_OPS = 13
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_PROG_TYPE_CGROUP_SOCKOPT = 25

# Flags of BPF_MAP_UPDATE_ELEM / elem_flags of the batch commands.
BPF_ANY = 0  # create or update
BPF_NOEXIST = 1  # create only (EEXIST if present)
BPF_EXIST = 2  # update only (ENOENT if absent)
BPF_F_LOCK = 4
ANY = BPF_ANY
NOEXIST = BPF_NOEXIST
EXIST = BPF_EXIST

# Flags of BPF_MAP_CREATE.
BPF_F_NO_PREALLOC = 1 << 0
BPF_F_NO_COMMON_LRU = 1 << 1
BPF_F_NUMA_NODE = 1 << 2
BPF_F_RDONLY = 1 << 3
BPF_F_WRONLY = 1 << 4
BPF_F_ZERO_SEED = 1 << 6
BPF_F_RDONLY_PROG = 1 << 7
BPF_F_WRONLY_PROG = 1 << 8
BPF_F_MMAPABLE = 1 << 10
BPF_F_INNER_MAP = 1 << 12

# Flags of BPF_PROG_ATTACH and BPF_LINK_UPDATE.
BPF_F_ALLOW_OVERRIDE = 1 << 0
BPF_F_ALLOW_MULTI = 1 << 1
BPF_F_REPLACE = 1 << 2

# Flags of BPF_PROG_QUERY.
BPF_F_QUERY_EFFECTIVE = 1 << 0

# enum bpf_attach_type (the cgroup part)
BPF_CGROUP_INET_INGRESS = 0
BPF_CGROUP_INET_EGRESS = 1
BPF_CGROUP_INET_SOCK_CREATE = 2
BPF_CGROUP_SOCK_OPS = 3
BPF_CGROUP_DEVICE = 6
BPF_CGROUP_INET4_BIND = 8
BPF_CGROUP_INET6_BIND = 9
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_INET4_POST_BIND = 12
BPF_CGROUP_INET6_POST_BIND = 13
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP6_SENDMSG = 15
BPF_CGROUP_SYSCTL = 18
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_UDP6_RECVMSG = 20
BPF_CGROUP_GETSOCKOPT = 21
BPF_CGROUP_SETSOCKOPT = 22
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_CGROUP_INET6_GETPEERNAME = 30
BPF_CGROUP_INET4_GETSOCKNAME = 31
BPF_CGROUP_INET6_GETSOCKNAME = 32
BPF_CGROUP_INET_SOCK_RELEASE = 34

# Short aliases of the attach types the datapath uses.
CGROUP_INET4_CONNECT = BPF_CGROUP_INET4_CONNECT
CGROUP_INET6_CONNECT = BPF_CGROUP_INET6_CONNECT
CGROUP_UDP4_SENDMSG = BPF_CGROUP_UDP4_SENDMSG
CGROUP_UDP6_SENDMSG = BPF_CGROUP_UDP6_SENDMSG
CGROUP_UDP4_RECVMSG = BPF_CGROUP_UDP4_RECVMSG
CGROUP_UDP6_RECVMSG = BPF_CGROUP_UDP6_RECVMSG
CGROUP_INET4_GETPEERNAME = BPF_CGROUP_INET4_GETPEERNAME
CGROUP_INET6_GETPEERNAME = BPF_CGROUP_INET6_GETPEERNAME

# enum bpf_link_type
BPF_LINK_TYPE_UNSPEC = 0
BPF_LINK_TYPE_RAW_TRACEPOINT = 1
BPF_LINK_TYPE_TRACING = 2
BPF_LINK_TYPE_CGROUP = 3
BPF_LINK_TYPE_ITER = 4
BPF_LINK_TYPE_NETNS = 5
BPF_LINK_TYPE_XDP = 6
BPF_LINK_TYPE_PERF_EVENT = 7
BPF_LINK_TYPE_KPROBE_MULTI = 8
BPF_LINK_TYPE_STRUCT_OPS = 9

BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8

# The kernel-internal ENOTSUPP (include/linux/errno.h), which leaks to user space from bpf(2)
# when a map type lacks an operation (e.g. batch ops). Not the same as EOPNOTSUPP (95).
ENOTSUPP = 524

_SYSCALL_NUMBERS = {"x86_64": 321, "amd64": 321, "aarch64": 280, "arm64": 280}

# The size of the buffer that backs every bpf(2) attribute (see the module docstring): union
# bpf_attr is 168 bytes on 6.18; the margin covers the fields later kernels add, and the kernel
# accepts it as long as the bytes past its own union are zero (bpf_check_uarg_tail_zero).
ATTR_SIZE = 256

# --------------------------------------------------------------------------------------------
# Raw system call
# --------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


@functools.cache
def _bpf_nr() -> int:
    machine = platform.machine().lower()
    try:
        return _SYSCALL_NUMBERS[machine]
    except KeyError:
        raise OSError(
            errno.ENOSYS, f"bpf(2) syscall number unknown for machine {machine!r}"
        ) from None


def bpf(cmd: int, attr: ctypes.Structure, operation: str, target: str = "") -> int:
    """Run bpf(cmd, buf, ATTR_SIZE) with ``attr`` at the start of a zeroed buffer ``buf``.

    Returns the command's non-negative result (often an fd). The kernel sees ``attr``'s fields
    and zeros up to ATTR_SIZE; afterwards the first ``sizeof(attr)`` bytes of the buffer are
    copied back into ``attr``, so its output fields (batch counts, prog_cnt, ...) are set, also
    when the command fails, and whatever the kernel wrote past them stays in the buffer.
    Raises :class:`BpfError` with the kernel's errno, ``operation`` (the command name without
    ``BPF_``) and ``target`` (what was acted on).
    """
    size = ctypes.sizeof(attr)
    if size > ATTR_SIZE:
        raise ValueError(f"bpf({operation}): attribute of {size} bytes > ATTR_SIZE {ATTR_SIZE}")
    buf = (ctypes.c_char * ATTR_SIZE)()  # zero-filled
    ctypes.memmove(buf, ctypes.addressof(attr), size)
    # All arguments as longs: syscall() is variadic and reads full registers.
    ret = _syscall(
        ctypes.c_long(_bpf_nr()),
        ctypes.c_long(cmd),
        buf,
        ctypes.c_long(ATTR_SIZE),
    )
    err = ctypes.get_errno()
    ctypes.memmove(ctypes.addressof(attr), buf, size)
    if ret < 0:
        raise BpfError(err, operation, target)
    return int(ret)


def _addr(buf: ctypes.Array | None) -> int:  # type: ignore[type-arg]
    """The address of a ctypes buffer as the kernel's __aligned_u64 pointer (0 for NULL)."""
    return 0 if buf is None else ctypes.addressof(buf)


# --------------------------------------------------------------------------------------------
# union bpf_attr members (each only as long as needed: bpf() backs it with ATTR_SIZE zeroed bytes)
# --------------------------------------------------------------------------------------------


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("map_ifindex", ctypes.c_uint32),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class _MapElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # also next_key for GET_NEXT_KEY
        ("flags", ctypes.c_uint64),
    ]


class _MapBatchAttr(ctypes.Structure):
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    ]


class _GetIdAttr(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint32),  # start_id / prog_id / map_id / link_id
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _QueryAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_uint64),
        ("prog_cnt", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("prog_attach_flags", ctypes.c_uint64),
    ]


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class _LinkUpdateAttr(ctypes.Structure):
    _fields_ = [
        ("link_fd", ctypes.c_uint32),
        ("new_prog_fd", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("old_prog_fd", ctypes.c_uint32),
    ]


class _LinkDetachAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32)]


# --------------------------------------------------------------------------------------------
# struct bpf_{map,prog,link}_info (info_len tells the kernel how much of it we know)
# --------------------------------------------------------------------------------------------


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class _ProgInfo(ctypes.Structure):
    # Only up to the name (plus the fields before it); every pointer field stays 0 so the
    # kernel copies no arrays out.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * BPF_TAG_SIZE),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),  # a 1-bit bitfield plus 31 bits of padding
    ]


class _LinkInfoCgroup(ctypes.Structure):
    _fields_ = [
        ("cgroup_id", ctypes.c_uint64),
        ("attach_type", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class _LinkInfoUnion(ctypes.Union):
    # raw sized like the largest member in the 6.1 UAPI (iter: 32 bytes) with headroom; the
    # kernel writes only the member of the link's type.
    _fields_ = [
        ("cgroup", _LinkInfoCgroup),
        ("raw", ctypes.c_uint8 * 48),
    ]


class _LinkInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("u", _LinkInfoUnion),
    ]


def _obj_info(fd: int, info: ctypes.Structure, target: str) -> None:
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "OBJ_GET_INFO_BY_FD", target)


# --------------------------------------------------------------------------------------------
# CPUs, pinning
# --------------------------------------------------------------------------------------------


def parse_cpu_list(text: str) -> list[int]:
    """CPU ids of a kernel cpu list such as ``"0-3,5"`` (as in /sys/devices/system/cpu/*)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        first, sep, last = part.partition("-")
        if sep:
            cpus.extend(range(int(first), int(last) + 1))
        else:
            cpus.append(int(first))
    return cpus


@functools.cache
def possible_cpus() -> int:
    """Number of possible CPUs: the number of slots in a per-CPU map value.

    This is the weight of the possible mask (as the kernel's num_possible_cpus()), not the
    highest id + 1: slot ``i`` of a per-CPU value belongs to the ``i``-th possible CPU, i.e.
    ``parse_cpu_list(<possible>)[i]``. The possible mask is fixed at boot, so it is cached.
    """
    with open("/sys/devices/system/cpu/possible", encoding="ascii") as f:
        count = len(parse_cpu_list(f.read()))
    if count <= 0:
        raise OSError(errno.EINVAL, "empty /sys/devices/system/cpu/possible")
    return count


def _path_buf(path: str | os.PathLike[str]) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(os.fsencode(path))


def obj_get(path: str | os.PathLike[str], *, flags: int = 0) -> int:
    """Open the BPF object pinned at ``path``; return a new fd (caller owns it).

    ``flags`` may be BPF_F_RDONLY or BPF_F_WRONLY. A missing pin raises BpfError(ENOENT) naming
    the path.
    """
    buf = _path_buf(path)
    attr = _ObjAttr(pathname=_addr(buf), file_flags=flags)
    return bpf(BPF_OBJ_GET, attr, "OBJ_GET", os.fspath(path))


def obj_pin(fd: int, path: str | os.PathLike[str]) -> None:
    """Pin the BPF object ``fd`` at ``path`` on a bpffs (EEXIST if the path exists)."""
    buf = _path_buf(path)
    attr = _ObjAttr(pathname=_addr(buf), bpf_fd=fd)
    bpf(BPF_OBJ_PIN, attr, "OBJ_PIN", os.fspath(path))


def _round8(n: int) -> int:
    return (n + 7) & ~7


# --------------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------------

# errnos of a batch command meaning "this map type has no batch operation"
_NO_BATCH_ERRNOS = frozenset({errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP})


class Map:
    """An open BPF map. Owns its fd: close it with ``close()`` or use ``with``.

    Keys and values are ``bytes`` of exactly ``key_size`` / ``value_size`` (encoding is the
    caller's business); lengths are checked here, so the kernel never reads past a buffer.
    Attributes come from BPF_OBJ_GET_INFO_BY_FD when the map is opened.
    """

    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    id: int
    name: str
    label: str

    def __init__(self, fd: int, label: str = "") -> None:
        """Wrap ``fd`` (ownership is taken). Prefer the ``create``/``open_pinned`` constructors.

        ``label`` names the map in error messages (a pinned path or a role name); the kernel's
        map name is used when empty.
        """
        self._fd = fd
        try:
            info = _MapInfo()
            _obj_info(fd, info, label or f"fd {fd}")
        except BaseException:
            os.close(fd)
            self._fd = -1
            raise
        self.map_type = info.type
        self.id = info.id
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.max_entries = info.max_entries
        self.map_flags = info.map_flags
        self.name = info.name.decode("ascii", "replace")
        self.label = label or self.name or f"map id {self.id}"

    # -- constructors ----------------------------------------------------------------------

    @classmethod
    def open_pinned(cls, path: str | os.PathLike[str], *, read_only: bool = False) -> Self:
        """Open the map pinned at ``path`` (errors name the path).

        ``read_only`` opens it with BPF_F_RDONLY: the kernel refuses every write through the
        fd (EPERM), and only read permission on the pin is needed."""
        return cls(obj_get(path, flags=BPF_F_RDONLY if read_only else 0), os.fspath(path))

    @classmethod
    def from_fd(cls, fd: int, name: str = "") -> Self:
        """Wrap an existing map fd; the new object owns it (and closes it, even on error).

        ``name`` labels the map in error messages (the kernel's map name if empty).
        """
        return cls(fd, name)

    @classmethod
    def from_id(cls, map_id: int, name: str = "") -> Self:
        """Open the map with kernel id ``map_id``."""
        attr = _GetIdAttr(id=map_id)
        fd = bpf(BPF_MAP_GET_FD_BY_ID, attr, "MAP_GET_FD_BY_ID", name or f"map id {map_id}")
        return cls(fd, name)

    @classmethod
    def create(
        cls,
        map_type: int,
        key_size: int,
        value_size: int,
        max_entries: int,
        *,
        flags: int = 0,
        name: str = "",
        inner_map_fd: int | None = None,
    ) -> Self:
        """Create a map. ``inner_map_fd`` is the template map for ARRAY_OF_MAPS/HASH_OF_MAPS.

        ``name`` is the kernel object name (at most 15 characters of [A-Za-z0-9_.]).
        """
        raw_name = name.encode("ascii")
        if len(raw_name) >= BPF_OBJ_NAME_LEN:
            raise ValueError(f"map name {name!r} longer than {BPF_OBJ_NAME_LEN - 1} characters")
        attr = _MapCreateAttr(
            map_type=map_type,
            key_size=key_size,
            value_size=value_size,
            max_entries=max_entries,
            map_flags=flags,
            inner_map_fd=inner_map_fd if inner_map_fd is not None else 0,
            map_name=raw_name,
        )
        fd = bpf(BPF_MAP_CREATE, attr, "MAP_CREATE", name or f"type {map_type}")
        return cls(fd, name)

    # -- fd ownership ----------------------------------------------------------------------

    def fileno(self) -> int:
        """The map fd (still owned by this object)."""
        if self._fd < 0:
            raise ValueError(f"map {self.label} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the fd (idempotent). A map with no fd, pin or program reference is freed."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def pin(self, path: str | os.PathLike[str]) -> None:
        """Pin this map at ``path``."""
        obj_pin(self.fileno(), path)

    def freeze(self) -> None:
        """Make the map read-only for user space from now on (BPF_MAP_FREEZE): every later
        write through any fd fails with EPERM. Programs keep their access."""
        attr = _MapElemAttr(map_fd=self.fileno())
        bpf(BPF_MAP_FREEZE, attr, "MAP_FREEZE", self.label)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A safety net only: owners are expected to close() deterministically.
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        return (
            f"Map({self.label!r}, id={self.id}, type={self.map_type}, key={self.key_size}, "
            f"value={self.value_size}, max={self.max_entries}, fd={self._fd})"
        )

    # -- sizes -----------------------------------------------------------------------------

    @property
    def is_percpu(self) -> bool:
        """True if values hold one slot per possible CPU on the syscall side."""
        return self.map_type in PERCPU_MAP_TYPES

    @property
    def value_stride(self) -> int:
        """Bytes per CPU slot in a per-CPU value buffer (value_size rounded up to 8)."""
        return _round8(self.value_size)

    @property
    def buffer_size(self) -> int:
        """Bytes of one value as exchanged with the kernel (all CPU slots for per-CPU maps)."""
        if self.is_percpu:
            return self.value_stride * possible_cpus()
        return self.value_size

    def _check_key(self, key: bytes) -> None:
        if len(key) != self.key_size:
            raise ValueError(
                f"map {self.label}: key is {len(key)} bytes, key_size is {self.key_size}"
            )

    def _value_buffer(self, value: bytes) -> bytes:
        """The kernel-side value for ``value``, replicating a single per-CPU value if needed."""
        if len(value) == self.buffer_size:
            return value
        if self.is_percpu and len(value) == self.value_size:
            slot = value.ljust(self.value_stride, b"\0")
            return slot * possible_cpus()
        expected = f"{self.value_size}"
        if self.is_percpu:
            expected += f" (or {self.buffer_size} for all {possible_cpus()} CPUs)"
        raise ValueError(f"map {self.label}: value is {len(value)} bytes, value_size is {expected}")

    def split_percpu(self, raw: bytes) -> list[bytes]:
        """Split a per-CPU value buffer into one ``value_size`` slice per possible CPU."""
        stride, size = self.value_stride, self.value_size
        return [raw[i * stride : i * stride + size] for i in range(len(raw) // stride)]

    # -- elements --------------------------------------------------------------------------

    def lookup(self, key: bytes) -> bytes | None:
        """The value of ``key`` or None if absent.

        For per-CPU maps this is the raw buffer of round_up(value_size, 8) * possible_cpus()
        bytes; see :meth:`lookup_percpu`. For map-in-map and fd-array maps it is the id
        (u32) of the referenced object.
        """
        self._check_key(key)
        kbuf = ctypes.create_string_buffer(key, len(key))
        vbuf = ctypes.create_string_buffer(self.buffer_size)
        attr = _MapElemAttr(map_fd=self.fileno(), key=_addr(kbuf), value=_addr(vbuf))
        try:
            bpf(BPF_MAP_LOOKUP_ELEM, attr, "MAP_LOOKUP_ELEM", self.label)
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return vbuf.raw

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        """One ``value_size`` slice per possible CPU, or None if absent (per-CPU maps only)."""
        if not self.is_percpu:
            raise ValueError(f"map {self.label} (type {self.map_type}) is not a per-CPU map")
        raw = self.lookup(key)
        return None if raw is None else self.split_percpu(raw)

    def update(self, key: bytes, value: bytes, flags: int = ANY) -> None:
        """Set ``key`` to ``value``. ``flags``: ANY, NOEXIST (EEXIST if present), EXIST (ENOENT
        if absent).

        For per-CPU maps ``value`` is either one value (written to every CPU) or the full
        per-CPU buffer. For map-in-map it is the inner map fd as a u32.
        """
        self._check_key(key)
        data = self._value_buffer(value)
        kbuf = ctypes.create_string_buffer(key, len(key))
        vbuf = ctypes.create_string_buffer(data, len(data))
        attr = _MapElemAttr(map_fd=self.fileno(), key=_addr(kbuf), value=_addr(vbuf), flags=flags)
        bpf(BPF_MAP_UPDATE_ELEM, attr, "MAP_UPDATE_ELEM", self.label)

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False if it was absent. Arrays cannot delete (EINVAL)."""
        self._check_key(key)
        kbuf = ctypes.create_string_buffer(key, len(key))
        attr = _MapElemAttr(map_fd=self.fileno(), key=_addr(kbuf))
        try:
            bpf(BPF_MAP_DELETE_ELEM, attr, "MAP_DELETE_ELEM", self.label)
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def next_key(self, key: bytes | None) -> bytes | None:
        """The key after ``key`` (the first key for None), or None at the end."""
        kbuf = None
        if key is not None:
            self._check_key(key)
            kbuf = ctypes.create_string_buffer(key, len(key))
        nbuf = ctypes.create_string_buffer(self.key_size)
        attr = _MapElemAttr(map_fd=self.fileno(), key=_addr(kbuf), value=_addr(nbuf))
        try:
            bpf(BPF_MAP_GET_NEXT_KEY, attr, "MAP_GET_NEXT_KEY", self.label)
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return nbuf.raw

    def keys(self) -> Iterator[bytes]:
        """Iterate keys with BPF_MAP_GET_NEXT_KEY.

        Concurrent changes are tolerated but not hidden: if the current key is deleted
        meanwhile (by the caller or a BPF program), hash maps restart from the first key
        (kernel htab_map_get_next_key), so keys may be yielded more than once; keys added
        meanwhile may or may not be seen. The iteration still ends once it reaches the last
        key. To delete many keys, collect ``list(m.keys())`` first or use
        :meth:`delete_batch`.
        """
        key = self.next_key(None)
        while key is not None:
            yield key
            key = self.next_key(key)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Iterate (key, value) pairs; keys deleted between the two calls are skipped."""
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def __iter__(self) -> Iterator[bytes]:
        return self.keys()

    # -- batch operations ------------------------------------------------------------------

    def lookup_batch(self, chunk: int = 1024) -> list[tuple[bytes, bytes]]:
        """All (key, value) pairs, read ``chunk`` at a time with BPF_MAP_LOOKUP_BATCH.

        Values are raw (full per-CPU buffers for per-CPU maps). ENOENT means end of map, also
        when it comes with the last entries. A hash bucket larger than ``chunk`` (ENOSPC)
        doubles the chunk. If the map type has no batch support (EINVAL/ENOTSUPP on the first
        call) this falls back to :meth:`items`. Not a snapshot: concurrent updates may or
        may not be seen.
        """
        if chunk <= 0:
            raise ValueError(f"map {self.label}: chunk must be positive, got {chunk}")
        ks, vs = self.key_size, self.buffer_size
        # The batch token is a u32 bucket for hash maps, a key for the generic implementation.
        token = max(ks, 8)
        in_batch = ctypes.create_string_buffer(token)
        out_batch = ctypes.create_string_buffer(token)
        keys = ctypes.create_string_buffer(ks * chunk)
        values = ctypes.create_string_buffer(vs * chunk)
        result: list[tuple[bytes, bytes]] = []
        first = True
        while True:
            attr = _MapBatchAttr(
                in_batch=0 if first else _addr(in_batch),
                out_batch=_addr(out_batch),
                keys=_addr(keys),
                values=_addr(values),
                count=chunk,
                map_fd=self.fileno(),
            )
            end = False
            try:
                bpf(BPF_MAP_LOOKUP_BATCH, attr, "MAP_LOOKUP_BATCH", self.label)
            except BpfError as e:
                if e.errno == errno.ENOENT:
                    end = True
                elif e.errno == errno.ENOSPC and attr.count == 0:
                    chunk *= 2
                    keys = ctypes.create_string_buffer(ks * chunk)
                    values = ctypes.create_string_buffer(vs * chunk)
                    continue
                elif e.errno == errno.EINTR:
                    # generic_map_lookup_batch gives up on keys that keep vanishing; what it
                    # returned is valid, and the batch token points past it.
                    pass
                elif first and e.errno in _NO_BATCH_ERRNOS:
                    return list(self.items())
                else:
                    raise
            n = attr.count
            kraw, vraw = keys.raw, values.raw
            result.extend(
                (kraw[i * ks : (i + 1) * ks], vraw[i * vs : (i + 1) * vs]) for i in range(n)
            )
            if end:
                return result
            if n:
                ctypes.memmove(in_batch, out_batch, token)
                first = False

    def _batch_write(
        self,
        cmd: int,
        operation: str,
        keys: Sequence[bytes],
        values: Sequence[bytes] | None,
        flags: int,
        chunk: int,
    ) -> int:
        """Shared loop of update_batch/delete_batch; returns how many elements were done.

        ``values`` None means delete.
        """
        if chunk <= 0:
            raise ValueError(f"map {self.label}: chunk must be positive, got {chunk}")
        total = len(keys)
        for key in keys:
            self._check_key(key)
        datas = [self._value_buffer(v) for v in values] if values is not None else None
        done = 0
        while done < total:
            n = min(chunk, total - done)
            kbuf = ctypes.create_string_buffer(b"".join(keys[done : done + n]), n * self.key_size)
            vbuf = None
            if datas is not None:
                joined = b"".join(datas[done : done + n])
                vbuf = ctypes.create_string_buffer(joined, len(joined))
            attr = _MapBatchAttr(
                keys=_addr(kbuf),
                values=_addr(vbuf),
                count=n,
                map_fd=self.fileno(),
                elem_flags=flags,
            )
            try:
                bpf(cmd, attr, operation, self.label)
            except BpfError as e:
                # The kernel writes back in count how many elements of this chunk it processed
                # before the failing one; when it rejects the command up front (bad flags, no
                # batch support) count keeps our input n, and a batch that did all n succeeds.
                processed = attr.count if attr.count < n else 0
                if processed == 0 and e.errno in (ENOTSUPP, errno.EOPNOTSUPP):
                    # This map type has no batch operations: finish element by element.
                    return self._each_write(keys, datas, flags, done)
                done += processed
                raise self._partial_error(e.errno, operation, done, total) from e
            done += n
        return done

    def _each_write(
        self,
        keys: Sequence[bytes],
        datas: Sequence[bytes] | None,
        flags: int,
        done: int,
    ) -> int:
        """Element-by-element fallback of _batch_write from index ``done``."""
        total = len(keys)
        operation = "MAP_DELETE_ELEM" if datas is None else "MAP_UPDATE_ELEM"
        for i in range(done, total):
            try:
                if datas is None:
                    if not self.delete(keys[i]):
                        raise BpfError(errno.ENOENT, "MAP_DELETE_ELEM", self.label)
                else:
                    self.update(keys[i], datas[i], flags)
            except BpfError as e:
                raise self._partial_error(e.errno, operation, i, total) from e
        return total

    def _partial_error(self, err: int | None, operation: str, done: int, total: int) -> BpfError:
        return BpfError(
            err or errno.EIO,
            operation,
            f"{self.label}: {done} of {total} done, failed at element {done}",
        )

    def update_batch(
        self, items: Sequence[tuple[bytes, bytes]], flags: int = ANY, *, chunk: int = 4096
    ) -> int:
        """Write all ``items`` with BPF_MAP_UPDATE_BATCH, ``chunk`` at a time.

        Returns the number written. On failure BpfError says how many were written before the
        failing element (those stay written; the map is not rolled back).

        ``flags`` applies to every element. The kernel's batch update accepts only BPF_ANY
        (and BPF_F_LOCK) as elem_flags and answers EINVAL to NOEXIST/EXIST, so with those
        flags, and for map types without batch support (ENOTSUPP), the elements are written
        one BPF_MAP_UPDATE_ELEM at a time with the same semantics.
        """
        keys = [k for k, _ in items]
        values = [v for _, v in items]
        if flags & ~BPF_F_LOCK:
            for key in keys:
                self._check_key(key)
            datas = [self._value_buffer(v) for v in values]
            return self._each_write(keys, datas, flags, 0)
        return self._batch_write(
            BPF_MAP_UPDATE_BATCH, "MAP_UPDATE_BATCH", keys, values, flags, chunk
        )

    def delete_batch(self, keys: Sequence[bytes], *, chunk: int = 4096) -> int:
        """Delete all ``keys`` with BPF_MAP_DELETE_BATCH, ``chunk`` at a time.

        A missing key fails with ENOENT; the keys before it in ``keys`` stay deleted. Returns
        the number deleted; on failure BpfError says how many were deleted.
        """
        return self._batch_write(BPF_MAP_DELETE_BATCH, "MAP_DELETE_BATCH", keys, None, 0, chunk)


# --------------------------------------------------------------------------------------------
# Programs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProgInfo:
    """What BPF_OBJ_GET_INFO_BY_FD says about a program."""

    id: int
    type: int
    name: str
    tag: str  # hex, as bpftool prints it


def prog_info(fd: int) -> ProgInfo:
    """Id, type, name and tag of the program ``fd``."""
    info = _ProgInfo()
    _obj_info(fd, info, f"prog fd {fd}")
    return ProgInfo(
        id=info.id,
        type=info.type,
        name=info.name.decode("ascii", "replace"),
        tag=bytes(info.tag).hex(),
    )


def prog_get_fd_by_id(prog_id: int) -> int:
    """A new fd for the program with kernel id ``prog_id`` (caller owns it)."""
    attr = _GetIdAttr(id=prog_id)
    return bpf(BPF_PROG_GET_FD_BY_ID, attr, "PROG_GET_FD_BY_ID", f"prog id {prog_id}")


# Initial prog_query buffer: a cgroup holds few programs per hook (at most 64, more with
# inherited ones); ENOSPC tells the real count.
_QUERY_CAPACITY = 16


def prog_query(target_fd: int, attach_type: int, *, effective: bool = False) -> list[int]:
    """Ids of the programs attached to ``target_fd`` (a cgroup) for ``attach_type``.

    Programs attached directly, by link or legacy attach, in execution order; with
    ``effective`` also the inherited ones that will actually run.
    """
    capacity = _QUERY_CAPACITY
    while True:
        ids = (ctypes.c_uint32 * capacity)()
        attr = _QueryAttr(
            target_fd=target_fd,
            attach_type=attach_type,
            query_flags=BPF_F_QUERY_EFFECTIVE if effective else 0,
            prog_ids=ctypes.addressof(ids),
            prog_cnt=capacity,
        )
        try:
            bpf(BPF_PROG_QUERY, attr, "PROG_QUERY", f"fd {target_fd} attach type {attach_type}")
        except BpfError as e:
            # ENOSPC: the buffer was too small; prog_cnt now holds the real count.
            if e.errno == errno.ENOSPC and attr.prog_cnt > capacity:
                capacity = attr.prog_cnt
                continue
            raise
        return list(ids[: attr.prog_cnt])


# --------------------------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """What BPF_OBJ_GET_INFO_BY_FD says about a link (cgroup fields only for cgroup links)."""

    id: int
    type: int
    prog_id: int
    cgroup_id: int | None = None
    attach_type: int | None = None


def link_create(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> int:
    """Attach ``prog_fd`` to ``target_fd`` (e.g. a cgroup directory fd) as a bpf_link.

    Returns the link fd (caller owns it). The attachment lives while the link has an fd or a
    pin: pin it (:func:`obj_pin`) to make it outlive the process.
    """
    attr = _LinkCreateAttr(
        prog_fd=prog_fd, target_fd=target_fd, attach_type=attach_type, flags=flags
    )
    return bpf(BPF_LINK_CREATE, attr, "LINK_CREATE", f"target fd {target_fd} type {attach_type}")


def link_update(link_fd: int, new_prog_fd: int, *, old_prog_fd: int | None = None) -> None:
    """Atomically swap the program of a link to ``new_prog_fd``.

    With ``old_prog_fd`` BPF_F_REPLACE is set: the kernel swaps only if the link still runs
    that program (cgroup links fail with EPERM otherwise), which makes concurrent updaters
    safe. The kernel checks only the program type (EINVAL if it differs): a program of the
    same type loaded for another attach type (a connect6 program on a connect4 link) is
    accepted, so the caller must pass the right one.
    """
    attr = _LinkUpdateAttr(link_fd=link_fd, new_prog_fd=new_prog_fd)
    if old_prog_fd is not None:
        attr.flags = BPF_F_REPLACE
        attr.old_prog_fd = old_prog_fd
    bpf(BPF_LINK_UPDATE, attr, "LINK_UPDATE", f"link fd {link_fd}")


def link_detach(link_fd: int) -> None:
    """Detach the link from its target now, even if other fds or pins still hold it."""
    bpf(BPF_LINK_DETACH, _LinkDetachAttr(link_fd=link_fd), "LINK_DETACH", f"link fd {link_fd}")


def link_get_fd_by_id(link_id: int) -> int:
    """A new fd for the link with kernel id ``link_id`` (caller owns it)."""
    attr = _GetIdAttr(id=link_id)
    return bpf(BPF_LINK_GET_FD_BY_ID, attr, "LINK_GET_FD_BY_ID", f"link id {link_id}")


def link_info(fd: int) -> LinkInfo:
    """Id, type and program of the link ``fd``; cgroup id and attach type for cgroup links."""
    info = _LinkInfo()
    _obj_info(fd, info, f"link fd {fd}")
    if info.type == BPF_LINK_TYPE_CGROUP:
        return LinkInfo(
            id=info.id,
            type=info.type,
            prog_id=info.prog_id,
            cgroup_id=info.u.cgroup.cgroup_id,
            attach_type=info.u.cgroup.attach_type,
        )
    return LinkInfo(id=info.id, type=info.type, prog_id=info.prog_id)


# --------------------------------------------------------------------------------------------
# RCU barrier
# --------------------------------------------------------------------------------------------

_BARRIER_INNER = (BPF_MAP_TYPE_ARRAY, 4, 4, 1)


class Barrier:
    """Wait until every BPF program that was running has finished.

    After any update of a map-in-map the kernel calls synchronize_rcu() (kernel/bpf/syscall.c
    maybe_wait_bpf_programs()) before returning to user space. BPF
    programs other than sleepable ones run inside an RCU read-side section, so when
    :meth:`wait` returns, every such program that started before it has completed. The
    datapath uses this to know that no program still uses an old map or old value, e.g.
    before reusing a slot or freeing a backend. A wait costs one RCU grace period: about 8 ms
    (two jiffies at HZ=250) on the machines this was measured on, so callers batch their work
    behind one wait and keep it off latency-critical paths.

    The barrier is an ARRAY_OF_MAPS with one slot whose inner map is a 1-entry ARRAY(4, 4);
    :meth:`wait` rewrites slot 0 with the same inner map. Owns both fds.
    """

    def __init__(self, outer: Map, inner: Map) -> None:
        self.outer = outer
        self.inner = inner

    @staticmethod
    def _new_inner() -> Map:
        return Map.create(*_BARRIER_INNER, name="kmesh_barrier_i")

    @classmethod
    def create(cls) -> Self:
        """A private (unpinned) barrier."""
        inner = cls._new_inner()
        try:
            outer = Map.create(
                BPF_MAP_TYPE_ARRAY_OF_MAPS,
                4,
                4,
                1,
                name="kmesh_barrier",
                inner_map_fd=inner.fileno(),
            )
        except BaseException:
            inner.close()
            raise
        return cls(outer, inner)

    @classmethod
    def create_pinned(cls, path: str | os.PathLike[str]) -> Self:
        """A new barrier whose outer map is pinned at ``path`` (EEXIST if taken)."""
        barrier = cls.create()
        try:
            barrier.outer.pin(path)
            barrier.outer.label = os.fspath(path)
        except BaseException:
            barrier.close()
            raise
        return barrier

    @classmethod
    def open_pinned(cls, path: str | os.PathLike[str]) -> Self:
        """Open a barrier pinned at ``path``.

        The outer map only keeps its template's shape, not an fd to it, so a fresh inner
        ARRAY(4, 4, 1) is created: the kernel accepts any inner map whose type, key size,
        value size, max_entries and flags match the template.
        """
        outer = Map.open_pinned(path)
        try:
            if outer.map_type != BPF_MAP_TYPE_ARRAY_OF_MAPS or outer.max_entries < 1:
                raise ValueError(
                    f"{os.fspath(path)}: not a barrier map (type {outer.map_type}, "
                    f"max_entries {outer.max_entries})"
                )
            inner = cls._new_inner()
        except BaseException:
            outer.close()
            raise
        return cls(outer, inner)

    def wait(self) -> float:
        """Block until pre-existing BPF programs have finished; return the seconds it took."""
        start = time.monotonic()
        # Keys and fd values are native-endian u32 on the syscall side.
        self.outer.update(bytes(ctypes.c_uint32(0)), bytes(ctypes.c_uint32(self.inner.fileno())))
        return time.monotonic() - start

    def close(self) -> None:
        """Close both fds (idempotent); a pinned outer map stays."""
        self.outer.close()
        self.inner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
