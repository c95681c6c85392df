"""Map record codecs: the Python side of bpf/kmesh_lb.h, declared once.

Each ``Layout`` lists a C struct's fields in order with their struct-module codes; offsets follow
C's natural alignment, exactly as clang lays the struct out. ``tests/unit/test_records.py``
compares every layout with the BTF of the compiled object (names, offsets, sizes), so a change on
one side without the other fails the tests instead of corrupting maps.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Constants shared with bpf/kmesh_lb.h (the header names them once on its side).
MAX_TIERS = 8
SETS = 2
LAYOUT_VERSION = 8  # KMESH_LAYOUT_VERSION
INLINE_SLOTS = 4  # KMESH_INLINE_SLOTS: slots of the picked tier a record carries
MODE_RANDOM = 0
MODE_FAILOVER = 1
MODE_STRICT = 2
MODE_NAMES = {MODE_RANDOM: "random", MODE_FAILOVER: "failover", MODE_STRICT: "strict"}
ENROL_ALL = 0  # KMESH_ENROL_ALL: every socket in the attached cgroup subtree
ENROL_CNI = 1  # KMESH_ENROL_CNI: only sockets of network namespaces in kmesh_enrolled
ENROL_NAMES = {ENROL_ALL: "all", ENROL_CNI: "cni"}
MAX_PODS = 8192  # KMESH_MAX_PODS
MAX_REVERSE = 65536  # KMESH_MAX_REVERSE
MAX_AFFINITY = 65536  # KMESH_MAX_AFFINITY
MAX_TRANSLATED = 65536  # KMESH_MAX_TRANSLATED (a power of two)
FRONTEND_SEED = 0x9E3779B97F4A7C15  # KMESH_FRONTEND_SEED
FRONTEND_WAYS = 2  # KMESH_FRONTEND_WAYS: the lines of a pair (a frontend has two pairs)
FRONTEND_LINES_PER_SERVICE = 4  # kmesh_frontend_cache lines per service group, rounded up
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds: Kubernetes' sessionAffinityConfig default

# Pinned object names (the program and map names in bpf/kmesh_lb.c).
MAP_FRONTENDS = "kmesh_frontends"
MAP_FRONTEND_CACHE = "kmesh_frontend_cache"
MAP_VIPS = "kmesh_vips"
MAP_ACTIVE = "kmesh_active"
MAP_RECORDS = "kmesh_records"
MAP_SLOTS = "kmesh_slots"
MAP_STATS = "kmesh_stats"
MAP_CONFIG = "kmesh_config"
MAP_ENROLLED = "kmesh_enrolled"
MAP_REVERSE = "kmesh_reverse"
MAP_AFFINITY = "kmesh_affinity"
MAP_TRANSLATED = "kmesh_translated"
PROG_CONNECT4 = "kmesh_connect4"
PROG_CONNECT6 = "kmesh_connect6"
PROG_SENDMSG4 = "kmesh_sendmsg4"
PROG_SENDMSG6 = "kmesh_sendmsg6"
PROG_RECVMSG4 = "kmesh_recvmsg4"
PROG_RECVMSG6 = "kmesh_recvmsg6"
PROG_GETPEERNAME4 = "kmesh_getpeername4"
PROG_GETPEERNAME6 = "kmesh_getpeername6"
PROG_RELEASE = "kmesh_release"

_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


@dataclass(frozen=True)
class Field:
    """One C struct member: ``code`` is a struct-module code for one element."""

    name: str
    code: str
    count: int = 1  # C array length; 1 for a scalar. "16s" is one 16-byte element.
    big_endian: bool = False  # __be16 / __be32: stored in network order
    struct: str | None = None  # a nested C struct of that name, carried as its bytes ("20s")

    @property
    def element_size(self) -> int:
        return struct.calcsize("=" + self.code)

    @property
    def alignment(self) -> int:
        # A byte array aligns to 1; scalars align to their own size, as in C.
        return 1 if self.code.endswith("s") else self.element_size

    @property
    def size(self) -> int:
        return self.element_size * self.count


class Layout:
    """A C struct as a sequence of fields, with C's offsets and trailing padding.

    ``pack_fields`` packs positional values with one precompiled struct.Struct (big-endian
    fields are byte-swapped first): the writer packs a hundred thousand slots per sync.
    """

    def __init__(self, c_name: str, fields: list[Field]) -> None:
        self.c_name = c_name
        self.fields = fields
        offset = 0
        self.offsets: dict[str, int] = {}
        fmt = "="
        for field in fields:
            aligned = _align(offset, field.alignment)
            fmt += "x" * (aligned - offset)
            self.offsets[field.name] = aligned
            fmt += f"{field.count}{field.code}" if field.count > 1 else field.code
            offset = aligned + field.size
        self.alignment = max(f.alignment for f in fields)
        self.size = _align(offset, self.alignment)
        self._struct = struct.Struct(fmt + "x" * (self.size - offset))
        self._swap = [
            i for i, f in enumerate(fields) if f.big_endian and f.count == 1 and f.code == "H"
        ]
        if any(f.big_endian for f in fields) and len(self._swap) != sum(
            f.big_endian for f in fields
        ):
            raise ValueError(f"{c_name}: only scalar big-endian u16 fields are supported")

    def pack_fields(self, *values: Any) -> bytes:
        """Pack values in field order (arrays flattened): the fast path of ``pack``."""
        if self._swap:
            values = tuple(socket.htons(v) if i in self._swap else v
                           for i, v in enumerate(values))
        return self._struct.pack(*values)

    def pack(self, values: dict[str, Any]) -> bytes:
        buf = bytearray(self.size)
        for field in self.fields:
            value = values.get(field.name, 0 if not field.code.endswith("s") else b"")
            fmt = (">" if field.big_endian else "=") + field.code
            offset = self.offsets[field.name]
            if field.count == 1:
                struct.pack_into(fmt, buf, offset, value)
            else:
                items = list(value) + [0] * (field.count - len(value))
                if len(items) != field.count:
                    raise ValueError(f"{self.c_name}.{field.name}: at most {field.count} items")
                for i, item in enumerate(items):
                    struct.pack_into(fmt, buf, offset + i * field.element_size, item)
        return bytes(buf)

    def unpack(self, data: bytes) -> dict[str, Any]:
        if len(data) < self.size:
            raise ValueError(f"{self.c_name}: need {self.size} bytes, got {len(data)}")
        out: dict[str, Any] = {}
        for field in self.fields:
            fmt = (">" if field.big_endian else "=") + field.code
            offset = self.offsets[field.name]
            if field.count == 1:
                (out[field.name],) = struct.unpack_from(fmt, data, offset)
            else:
                out[field.name] = tuple(
                    struct.unpack_from(fmt, data, offset + i * field.element_size)[0]
                    for i in range(field.count)
                )
        return out


def _align(offset: int, alignment: int) -> int:
    return (offset + alignment - 1) // alignment * alignment


FRONTEND_KEY = Layout(
    "kmesh_frontend_key",
    [Field("addr", "16s"), Field("port", "H", big_endian=True), Field("protocol", "B"),
     Field("pad", "B")],
)
FRONTEND = Layout("kmesh_frontend", [Field("sid", "I")])
FRONTEND_LINE = Layout(
    "kmesh_frontend_line",
    [Field("frontend", f"{FRONTEND_KEY.size}s", struct="kmesh_frontend_key"), Field("sid", "I"),
     Field("check", "Q")],
)
VIP = Layout("kmesh_vip", [Field("addr", "16s")])
ENDPOINT = Layout(
    "kmesh_endpoint",
    [Field("addr", "16s"), Field("port", "H", big_endian=True), Field("pad", "H")],
)
RECORD = Layout(
    "kmesh_record",
    [Field("frontend", f"{FRONTEND_KEY.size}s", struct="kmesh_frontend_key"),
     Field("generation", "I"), Field("mode", "B"), Field("ntiers", "B"),
     Field("inline_tier", "B"), Field("pad", "B"),
     Field("count", "H", count=MAX_TIERS), Field("affinity_timeout", "I"),
     Field("inline_slots", f"{INLINE_SLOTS * ENDPOINT.size}s", struct="kmesh_endpoint")],
)
SLOT_KEY = Layout(
    "kmesh_slot_key",
    [Field("sid", "I"), Field("set", "B"), Field("tier", "B"), Field("index", "H")],
)
STATS = Layout("kmesh_stats", [Field("hits", "Q", count=MAX_TIERS), Field("refused", "Q")])
CONFIG = Layout("kmesh_config", [Field("enrolment", "I"), Field("pad", "I")])
ENROLMENT = Layout("kmesh_enrolment", [Field("flags", "I"), Field("pad", "I")])
REVERSE_KEY = Layout(
    "kmesh_reverse_key",
    [Field("socket_cookie", "Q"), Field("endpoint", f"{ENDPOINT.size}s", struct="kmesh_endpoint"),
     Field("pad", "I")],
)
REVERSE = Layout("kmesh_reverse",
                 [Field("frontend", f"{FRONTEND_KEY.size}s", struct="kmesh_frontend_key")])
TRANSLATION = Layout(
    "kmesh_translation",
    [Field("socket_cookie", "Q"),
     Field("endpoint", f"{ENDPOINT.size}s", struct="kmesh_endpoint"),
     Field("frontend", f"{FRONTEND_KEY.size}s", struct="kmesh_frontend_key"),
     Field("check", "Q"), Field("pad", "Q")],
)
AFFINITY_KEY = Layout(
    "kmesh_affinity_key",
    [Field("netns_cookie", "Q"),
     Field("frontend", f"{FRONTEND_KEY.size}s", struct="kmesh_frontend_key"), Field("pad", "I")],
)
AFFINITY = Layout(
    "kmesh_affinity",
    [Field("endpoint", f"{ENDPOINT.size}s", struct="kmesh_endpoint"), Field("tier", "H"),
     Field("index", "H"), Field("last_used", "Q")],
)
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")  # kmesh_enrolled's key: a netns cookie

ALL_LAYOUTS = (FRONTEND_KEY, FRONTEND, FRONTEND_LINE, VIP, RECORD, SLOT_KEY, ENDPOINT, STATS,
               CONFIG, ENROLMENT, REVERSE_KEY, REVERSE, TRANSLATION, AFFINITY_KEY, AFFINITY)


_U64 = (1 << 64) - 1
_WORDS5 = struct.Struct("=5I")


def _mix(x: int) -> int:
    """kmesh_mix in bpf/kmesh_lb.c: murmur3's 64-bit finaliser."""
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _U64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _U64
    return x ^ (x >> 33)


# KMESH_NH_0 .. KMESH_NH_11: the key words of the NH sums in bpf/kmesh_lb.c.
NH_KEY = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0,
          0x082EFA98, 0xEC4E6C89, 0x452821E6, 0x38D01377, 0xBE5466CF, 0x34E90C6C)
_U32_MASK = (1 << 32) - 1


def _nh(words: tuple[int, ...]) -> int:
    """The NH sum (kmesh_nh terms) of an even number of 4-byte words, key words from NH_KEY[0]."""
    total = 0
    for i in range(0, len(words), 2):
        total += (((words[i] + NH_KEY[i]) & _U32_MASK)
                  * ((words[i + 1] + NH_KEY[i + 1]) & _U32_MASK))
    return total & _U64


def translation_slot(socket_cookie: int) -> int:
    """kmesh_slot_of: a socket's kmesh_translated slot, its cookie's low bits."""
    return socket_cookie & (MAX_TRANSLATED - 1)


def translation_check(socket_cookie: int, endpoint: bytes, frontend: bytes) -> int:
    """kmesh_check: what a whole kmesh_translation entry carries in ``check`` (never 0)."""
    words = (socket_cookie & _U32_MASK, socket_cookie >> 32 & _U32_MASK,
             *_WORDS5.unpack(endpoint), *_WORDS5.unpack(frontend))
    return _mix(_nh(words)) | 1


def frontend_lines(max_services: int) -> int:
    """KMESH_FRONTEND_LINES for a capacity: FRONTEND_LINES_PER_SERVICE lines per group, rounded
    up to a power of two (a pair is a hash masked with it). A frontend may sit in any line of
    two pairs, and the writer moves a holder to make room, so that one finds no line only when
    the cache is nearly full."""
    return 1 << (FRONTEND_LINES_PER_SERVICE * max(1, max_services) - 1).bit_length()


def frontend_hash(frontend: bytes) -> int:
    """kmesh_frontend_hash over a packed frontend key."""
    return _mix(FRONTEND_SEED ^ _nh((*_WORDS5.unpack(frontend), 0)))


def frontend_pairs(frontend: bytes, lines: int) -> tuple[int, int]:
    """The first lines of the two pairs a packed frontend key may sit in (each pair's other
    line is the next one), in a cache of ``lines``: the hash's low half, then its high half."""
    h = frontend_hash(frontend)
    return h & (lines - FRONTEND_WAYS), (h >> 32) & (lines - FRONTEND_WAYS)


def frontend_candidates(frontend: bytes, lines: int) -> tuple[int, ...]:
    """Every line a packed frontend key may sit in, in the order the program tries them (two
    pairs, or one when both halves of its hash name the same pair)."""
    first, second = frontend_pairs(frontend, lines)
    pairs = (first,) if first == second else (first, second)
    return tuple(pair + way for pair in pairs for way in range(FRONTEND_WAYS))


def frontend_line(frontend: bytes, sid: int) -> bytes:
    """The kmesh_frontend_line that caches ``frontend`` (packed) -> ``sid``."""
    check = (frontend_hash(frontend) ^ sid << 32) | 1  # kmesh_line_check
    return FRONTEND_LINE.pack_fields(frontend, sid, check)


def read_frontend_line(raw: bytes) -> tuple[bytes, int] | None:
    """(packed frontend key, sid) of a line the program would use; None for an empty or
    inconsistent one."""
    line = FRONTEND_LINE.unpack(raw)
    if raw[:FRONTEND_LINE.size] != frontend_line(line["frontend"], line["sid"]):
        return None  # the check is 0 (empty) or does not cover these fields
    return line["frontend"], line["sid"]


def parse_ip(text: str) -> IPAddress:
    """An address from its text, via inet_pton: about 4x faster than ipaddress.ip_address."""
    if ":" in text:
        return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, text))
    return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))


def encode_addr(ip: IPAddress) -> bytes:
    """16 bytes as the kernel side stores them: IPv4 v4-mapped."""
    if ip.version == 4:
        return _V4_MAPPED_PREFIX + ip.packed
    return ip.packed


def vip_key(ip: IPAddress) -> bytes:
    return VIP.pack({"addr": encode_addr(ip)})


def decode_addr(raw: bytes) -> IPAddress:
    if raw[:12] == _V4_MAPPED_PREFIX:
        return ipaddress.IPv4Address(raw[12:16])
    return ipaddress.IPv6Address(raw[:16])


PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": socket.IPPROTO_SCTP}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}


@dataclass(frozen=True, order=True)
class Frontend:
    """A ClusterIP:port/protocol the datapath translates."""

    ip: IPAddress
    port: int
    protocol: int = socket.IPPROTO_TCP

    layout: ClassVar[Layout] = FRONTEND_KEY

    def __hash__(self) -> int:
        # Cached: a sync hashes every frontend a dozen times (its dicts of changes, holders,
        # published groups), and an ipaddress object hashes in Python.
        found = self.__dict__.get("_hash")
        if found is None:
            found = hash((self.ip.version, int(self.ip), self.port, self.protocol))
            object.__setattr__(self, "_hash", found)
        return found

    def pack(self) -> bytes:
        return FRONTEND_KEY.pack(
            {"addr": encode_addr(self.ip), "port": self.port, "protocol": self.protocol}
        )

    @classmethod
    def unpack(cls, raw: bytes) -> Frontend:
        v = FRONTEND_KEY.unpack(raw)
        return cls(decode_addr(v["addr"]), v["port"], v["protocol"])

    def __str__(self) -> str:
        host = f"[{self.ip}]" if self.ip.version == 6 else str(self.ip)
        return f"{host}:{self.port}/{PROTOCOL_NAMES.get(self.protocol, self.protocol)}"


class Backend:
    """An endpoint address as a slot stores it: pod IP and target port.

    Kept as the 16 bytes the kernel stores (v4-mapped for IPv4) rather than an ipaddress
    object: a sync builds, compares and packs a hundred thousand of them. Immutable.
    """

    __slots__ = ("addr", "port")
    addr: bytes
    port: int

    def __init__(self, ip: IPAddress | str, port: int) -> None:
        raw = _pton16(ip) if isinstance(ip, str) else encode_addr(ip)
        object.__setattr__(self, "addr", raw)
        object.__setattr__(self, "port", port)

    @classmethod
    def from_raw(cls, addr: bytes, port: int) -> Backend:
        b = cls.__new__(cls)
        object.__setattr__(b, "addr", addr)
        object.__setattr__(b, "port", port)
        return b

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Backend is immutable")

    @property
    def ip(self) -> IPAddress:
        return decode_addr(self.addr)

    def _key(self) -> tuple[bytes, int]:
        return (self.addr, self.port)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Backend) and self.addr == other.addr and self.port == other.port

    def __lt__(self, other: Backend) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Backend({str(self.ip)!r}, {self.port})"

    def pack(self) -> bytes:
        return self.addr + _PORT_PAD.pack(self.port)

    @classmethod
    def unpack(cls, raw: bytes) -> Backend:
        if len(raw) < ENDPOINT.size:
            raise ValueError(f"kmesh_endpoint: need {ENDPOINT.size} bytes, got {len(raw)}")
        return cls.from_raw(raw[:16], _PORT_PAD.unpack_from(raw, 16)[0])

    def __str__(self) -> str:
        ip = self.ip
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        return f"{host}:{self.port}"


# kmesh_endpoint after its address: __be16 port, __u16 pad (checked against ENDPOINT in tests).
_PORT_PAD = struct.Struct(">H2x")


def _pton16(text: str) -> bytes:
    if ":" in text:
        return socket.inet_pton(socket.AF_INET6, text)
    return _V4_MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, text)


@dataclass(frozen=True)
class BackendSet:
    """What one service group's active set holds: its mode and its endpoints tier by tier.

    Tiers keep the strategy's length (trailing empty tiers included), so a set recovered from
    the maps compares equal to the same set computed again. ``affinity``: sessionAffinity
    ClientIP timeout in seconds, 0 for none; a set with affinity keeps each tier sorted (the
    program finds a client's endpoint by binary search), and sorts what it is given.
    """

    mode: int
    tiers: tuple[tuple[Backend, ...], ...]
    affinity: int = 0

    def __post_init__(self) -> None:
        if not 1 <= len(self.tiers) <= MAX_TIERS:
            raise ValueError(f"a set has 1..{MAX_TIERS} tiers, got {len(self.tiers)}")
        for tier in self.tiers:
            if len(tier) > 0xFFFF:
                raise ValueError(f"a tier holds at most 65535 endpoints, got {len(tier)}")
        if not 0 <= self.affinity <= 0xFFFFFFFF:
            raise ValueError(f"an affinity timeout is 0..2^32-1 seconds, got {self.affinity}")
        if self.affinity:
            object.__setattr__(self, "tiers", tuple(tuple(sorted(t)) for t in self.tiers))

    @property
    def size(self) -> int:
        return sum(len(t) for t in self.tiers)

    def record(self, generation: int, frontend: bytes) -> bytes:
        """The kmesh_record of this set for the group serving ``frontend`` (its packed key)."""
        counts = [len(t) for t in self.tiers] + [0] * (MAX_TIERS - len(self.tiers))
        tier = self.picked_tier()
        inline = b"".join(b.pack() for b in self.tiers[tier][:INLINE_SLOTS])
        return RECORD.pack_fields(frontend, generation, self.mode, len(self.tiers), tier, 0,
                                  *counts, self.affinity, inline)

    def picked_tier(self) -> int:
        """The tier a connect picks from (kmesh_pick): the first non-empty one, or tier 0 in
        strict mode (and when every tier is empty)."""
        if self.mode == MODE_STRICT:
            return 0
        return next((i for i, members in enumerate(self.tiers) if members), 0)


def record_index(sid: int, set_: int) -> bytes:
    return U32.pack(sid * SETS + set_)


def slot_key(sid: int, set_: int, tier: int, index: int) -> bytes:
    return SLOT_KEY.pack_fields(sid, set_, tier, index)
