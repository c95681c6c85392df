"""Map record codecs, and the Python layouts against the BTF that clang emits."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
from typing import Any

import pytest

from kmesh_plugin.datapath import records
from kmesh_plugin.datapath.build import Capacities, compile_object
from kmesh_plugin.datapath.records import (
    ALL_LAYOUTS,
    ENDPOINT,
    FRONTEND_KEY,
    MAX_TIERS,
    MODE_FAILOVER,
    MODE_STRICT,
    RECORD,
    SLOT_KEY,
    Backend,
    BackendSet,
    Frontend,
    decode_addr,
    encode_addr,
    record_index,
    slot_key,
)

REQUIRE_BPF = os.environ.get("KMESH_REQUIRE_BPF") == "1"


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# -- addresses ------------------------------------------------------------------------------


def test_ipv4_is_stored_v4_mapped() -> None:
    raw = encode_addr(ip("198.18.0.10"))
    assert raw == bytes(10) + b"\xff\xff" + bytes([198, 18, 0, 10])
    assert raw == ipaddress.IPv6Address("::ffff:198.18.0.10").packed
    assert decode_addr(raw) == ip("198.18.0.10")


def test_ipv6_is_stored_as_is() -> None:
    raw = encode_addr(ip("fd00::10"))
    assert raw == ipaddress.IPv6Address("fd00::10").packed
    assert decode_addr(raw) == ip("fd00::10")


# -- frontends ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frontend",
    [
        Frontend(ip("198.18.0.10"), 5000),
        Frontend(ip("198.18.0.10"), 53, socket.IPPROTO_UDP),
        Frontend(ip("0.0.0.1"), 1, socket.IPPROTO_SCTP),
        Frontend(ip("fd00::10"), 65535),
        Frontend(ip("2001:db8::ffff:1"), 443, socket.IPPROTO_UDP),
    ],
)
def test_frontend_round_trip(frontend: Frontend) -> None:
    raw = frontend.pack()
    assert len(raw) == FRONTEND_KEY.size == 20
    assert Frontend.unpack(raw) == frontend


def test_frontend_v4_bytes() -> None:
    raw = Frontend(ip("198.18.0.10"), 5000, socket.IPPROTO_TCP).pack()
    # addr (16, v4-mapped), port in network order, protocol, pad.
    assert raw == (
        bytes(10) + b"\xff\xff" + bytes([198, 18, 0, 10])
        + struct.pack(">H", 5000) + bytes([socket.IPPROTO_TCP, 0])
    )


def test_frontend_v6_bytes() -> None:
    raw = Frontend(ip("fd00::10"), 80, socket.IPPROTO_UDP).pack()
    assert raw == ip("fd00::10").packed + b"\x00\x50" + bytes([socket.IPPROTO_UDP, 0])


def test_frontend_str() -> None:
    assert str(Frontend(ip("198.18.0.10"), 5000)) == "198.18.0.10:5000/TCP"
    assert str(Frontend(ip("fd00::10"), 53, socket.IPPROTO_UDP)) == "[fd00::10]:53/UDP"


def test_frontend_port_out_of_range() -> None:
    with pytest.raises(struct.error):
        Frontend(ip("198.18.0.10"), 65536).pack()


# -- backends -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend",
    [Backend(ip("198.19.1.1"), 8080), Backend(ip("fd00:1::1"), 1), Backend(ip("10.0.0.1"), 65535)],
)
def test_backend_round_trip(backend: Backend) -> None:
    raw = backend.pack()
    assert len(raw) == ENDPOINT.size == 20
    assert Backend.unpack(raw) == backend


def test_backend_bytes() -> None:
    raw = Backend(ip("198.19.1.1"), 8080).pack()
    assert raw == bytes(10) + b"\xff\xff" + bytes([198, 19, 1, 1]) + b"\x1f\x90" + bytes(2)
    assert str(Backend(ip("198.19.1.1"), 8080)) == "198.19.1.1:8080"
    assert str(Backend(ip("fd00::1"), 80)) == "[fd00::1]:80"


def test_unpack_needs_the_whole_record() -> None:
    with pytest.raises(ValueError, match="kmesh_endpoint: need 20 bytes, got 19"):
        Backend.unpack(bytes(19))


# -- backend sets and records ---------------------------------------------------------------

FRONT_KEY = Frontend(ip("198.19.0.10"), 80).pack()


def test_backend_set_record_round_trip() -> None:
    a, b, c = (Backend(ip(f"198.19.0.{i}"), 80) for i in (1, 2, 3))
    backends = BackendSet(MODE_FAILOVER, ((a,), (b, c), (), (), ()))
    assert backends.size == 3
    raw = backends.record(7, FRONT_KEY)
    assert len(raw) == RECORD.size == 128
    assert RECORD.unpack(raw) == {
        "frontend": FRONT_KEY, "generation": 7, "mode": MODE_FAILOVER, "ntiers": 5,
        "inline_tier": 0, "pad": 0, "count": (1, 2, 0, 0, 0, 0, 0, 0), "affinity_timeout": 0,
        "inline_slots": a.pack() + bytes(60),
    }
    # The frontend's key first (the program compares it), then native-order integers.
    assert raw[:20] == FRONT_KEY
    assert raw[20:24] == struct.pack("=I", 7)
    assert raw[28:30] == struct.pack("=H", 1)


def test_backend_set_record_strict_full() -> None:
    tiers = tuple((Backend(ip(f"198.19.0.{i + 1}"), 80),) * (i + 1) for i in range(MAX_TIERS))
    raw = BackendSet(MODE_STRICT, tiers).record(0xFFFFFFFF, FRONT_KEY)
    assert RECORD.unpack(raw) == {
        "frontend": FRONT_KEY, "generation": 0xFFFFFFFF, "mode": MODE_STRICT,
        "ntiers": MAX_TIERS, "inline_tier": 0, "pad": 0,
        "count": tuple(range(1, MAX_TIERS + 1)), "affinity_timeout": 0,
        "inline_slots": tiers[0][0].pack() + bytes(60),
    }


def test_a_record_carries_the_first_slots_of_the_tier_a_connect_picks_from() -> None:
    near = tuple(Backend(ip(f"198.19.1.{i}"), 80) for i in range(1, 7))
    far = (Backend(ip("198.19.2.1"), 80),)
    # Failover: the first non-empty tier (tier 1 here), its first INLINE_SLOTS endpoints.
    rec = RECORD.unpack(BackendSet(MODE_FAILOVER, ((), near, far)).record(1, FRONT_KEY))
    assert rec["inline_tier"] == 1
    assert rec["inline_slots"] == b"".join(b.pack() for b in near[:records.INLINE_SLOTS])
    # Strict picks from tier 0 only: an empty tier 0 carries nothing.
    rec = RECORD.unpack(BackendSet(MODE_STRICT, ((), near)).record(1, FRONT_KEY))
    assert rec["inline_tier"] == 0 and rec["inline_slots"] == bytes(RECORD.size - 48)


@pytest.mark.parametrize("ntiers", [0, MAX_TIERS + 1])
def test_backend_set_tier_count(ntiers: int) -> None:
    with pytest.raises(ValueError, match="tiers"):
        BackendSet(MODE_FAILOVER, ((),) * ntiers)


def test_backend_sets_compare_by_value() -> None:
    a = Backend(ip("198.19.0.1"), 80)
    assert BackendSet(MODE_FAILOVER, ((a,), ())) == BackendSet(
        MODE_FAILOVER, ((Backend(ip("198.19.0.1"), 80),), ())
    )
    assert BackendSet(MODE_FAILOVER, ((a,), ())) != BackendSet(MODE_FAILOVER, ((a,),))
    assert BackendSet(MODE_FAILOVER, ((a,),)) != BackendSet(MODE_STRICT, ((a,),))


def test_an_affinity_set_sorts_its_tiers_and_records_its_timeout() -> None:
    # The program binary-searches an affinity group's tier: it must be sorted the way the
    # program compares (address bytes, then port, network order), whatever order it came in.
    a, b, c = (Backend(ip("198.19.0.9"), 80), Backend(ip("198.19.0.10"), 79),
               Backend(ip("198.19.0.10"), 8080))
    backends = BackendSet(MODE_FAILOVER, ((c, a, b), (b, a)), affinity=10800)
    assert backends.tiers == ((a, b, c), (a, b))
    assert [x.addr + x.port.to_bytes(2, "big") for x in backends.tiers[0]] == sorted(
        x.addr + x.port.to_bytes(2, "big") for x in (a, b, c))
    assert RECORD.unpack(backends.record(1, FRONT_KEY))["affinity_timeout"] == 10800
    # Without affinity the order is the strategy's, kept as given.
    assert BackendSet(MODE_FAILOVER, ((c, a, b),)).tiers == ((c, a, b),)
    assert backends != BackendSet(MODE_FAILOVER, ((a, b, c), (a, b)))
    with pytest.raises(ValueError, match="affinity"):
        BackendSet(MODE_FAILOVER, ((a,),), affinity=-1)


def test_slot_key_and_record_index() -> None:
    raw = slot_key(5, 1, 3, 513)
    assert len(raw) == SLOT_KEY.size == 8
    assert SLOT_KEY.unpack(raw) == {"sid": 5, "set": 1, "tier": 3, "index": 513}
    assert raw == struct.pack("=IBBH", 5, 1, 3, 513)
    assert record_index(5, 1) == struct.pack("=I", 11)
    assert record_index(0, 0) == struct.pack("=I", 0)


def test_layout_array_too_long() -> None:
    with pytest.raises(ValueError, match=r"kmesh_record\.count: at most 8 items"):
        RECORD.pack({"count": [1] * 9})


def test_layout_offsets_follow_c_alignment() -> None:
    assert RECORD.offsets == {"frontend": 0, "generation": 20, "mode": 24, "ntiers": 25,
                              "inline_tier": 26, "pad": 27, "count": 28, "affinity_timeout": 44,
                              "inline_slots": 48}
    assert FRONTEND_KEY.offsets == {"addr": 0, "port": 16, "protocol": 18, "pad": 19}
    assert records.STATS.size == 72 and records.STATS.offsets == {"hits": 0, "refused": 64}


# -- the layouts against the compiled object's BTF ------------------------------------------


def missing(reason: str) -> None:
    if REQUIRE_BPF:
        pytest.fail(f"KMESH_REQUIRE_BPF=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def btf(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """The BTF types of bpf/kmesh_lb.c compiled with small capacities, by id."""
    for tool in ("clang", "bpftool"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed")
    obj = compile_object(Capacities(64, 1024), tmp_path_factory.mktemp("bpf-build"))
    proc = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", str(obj), "format", "raw"],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert proc.returncode == 0, f"bpftool: {proc.stdout}{proc.stderr}"
    types = json.loads(proc.stdout)["types"]
    return {t["id"]: t for t in types}


def _resolve(btf: dict[int, dict[str, Any]], type_id: int) -> dict[str, Any]:
    """Follow typedefs and qualifiers down to the underlying type."""
    t = btf[type_id]
    while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
        t = btf[t["type_id"]]
    return t


def _size(btf: dict[int, dict[str, Any]], type_id: int) -> int:
    t = _resolve(btf, type_id)
    if t["kind"] == "ARRAY":
        return t["nr_elems"] * _size(btf, t["type_id"])
    return int(t["size"])


def _struct(btf: dict[int, dict[str, Any]], name: str) -> dict[str, Any]:
    found = [t for t in btf.values() if t["kind"] == "STRUCT" and t.get("name") == name]
    assert len(found) == 1, f"struct {name}: {len(found)} definitions in the BTF"
    return found[0]


def test_every_layout_matches_the_btf(btf: dict[int, dict[str, Any]]) -> None:
    assert ALL_LAYOUTS, "no layouts declared"
    for layout in ALL_LAYOUTS:
        struct_ = _struct(btf, layout.c_name)
        where = f"struct {layout.c_name}"
        assert struct_["size"] == layout.size, f"{where}: size"
        members = struct_["members"]
        assert [m["name"] for m in members] == [f.name for f in layout.fields], f"{where}: members"
        for member, field in zip(members, layout.fields, strict=True):
            what = f"{where}.{field.name}"
            assert member["bits_offset"] == layout.offsets[field.name] * 8, f"{what}: offset"
            assert "bitfield_size" not in member or member["bitfield_size"] == 0, what
            t = _resolve(btf, member["type_id"])
            if field.struct and t["kind"] == "ARRAY":  # nested structs, carried as bytes
                element = _resolve(btf, t["type_id"])
                assert element["kind"] == "STRUCT" and element["name"] == field.struct, what
                assert t["nr_elems"] * element["size"] == field.size, f"{what}: size"
            elif field.struct:  # a nested struct, carried as its bytes
                assert t["kind"] == "STRUCT" and t["name"] == field.struct, f"{what}: struct"
                assert t["size"] == field.size, f"{what}: size"
            elif field.code.endswith("s"):  # a byte array: __u8 name[N]
                assert t["kind"] == "ARRAY", f"{what}: not an array"
                assert t["nr_elems"] * _size(btf, t["type_id"]) == field.size, f"{what}: length"
                assert _size(btf, t["type_id"]) == 1, f"{what}: element size"
            elif field.count > 1:
                assert t["kind"] == "ARRAY", f"{what}: not an array"
                assert t["nr_elems"] == field.count, f"{what}: array length"
                element = _resolve(btf, t["type_id"])
                assert element["kind"] == "INT", f"{what}: element kind"
                assert element["size"] == field.element_size, f"{what}: element size"
            else:
                assert t["kind"] == "INT", f"{what}: kind {t['kind']}"
                assert t["size"] == field.size, f"{what}: size"
                signed = t.get("encoding") == "SIGNED"
                assert signed == field.code.islower(), f"{what}: signedness"
            # Network-order fields are declared __be16/__be32 on the C side.
            typedef = btf[member["type_id"]]
            is_be = typedef["kind"] == "TYPEDEF" and typedef["name"].startswith("__be")
            assert is_be == field.big_endian, f"{what}: byte order"


def test_constants_match_the_btf_arrays(btf: dict[int, dict[str, Any]]) -> None:
    count = next(m for m in _struct(btf, "kmesh_record")["members"] if m["name"] == "count")
    assert _resolve(btf, count["type_id"])["nr_elems"] == MAX_TIERS


@pytest.mark.parametrize("layout", records.ALL_LAYOUTS, ids=lambda layout: layout.c_name)
def test_fast_packing_matches_the_declaration(layout: records.Layout) -> None:
    """pack_fields (one precompiled struct) and pack (field by field) write the same bytes."""
    values: dict[str, object] = {}
    positional: list[object] = []
    for i, field in enumerate(layout.fields):
        if field.code.endswith("s"):
            value: object = bytes(range(i, i + field.size))
            values[field.name] = value
            positional.append(value)
        elif field.count > 1:
            items = [i * 10 + k for k in range(field.count)]
            values[field.name] = items
            positional.extend(items)
        else:
            values[field.name] = i + 3
            positional.append(i + 3)
    assert layout.pack_fields(*positional) == layout.pack(values)


def test_backend_packs_like_the_endpoint_layout() -> None:
    for text, port in (("198.18.1.2", 8080), ("2001:2::7", 443)):
        b = Backend(text, port)
        assert b.pack() == records.ENDPOINT.pack(
            {"addr": records.encode_addr(ipaddress.ip_address(text)), "port": port})
        assert Backend.unpack(b.pack()) == b == Backend(ipaddress.ip_address(text), port)
