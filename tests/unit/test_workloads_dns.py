"""The lab's DNS workload: the wire format it speaks, its server and the client's ``dns`` op.

Sockets are on loopback only (the network rules); nothing here needs root.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmesh_lab import kube, workloads
from kmesh_lab.workloads import (
    DnsQuestion,
    dns_answer,
    dns_query,
    parse_dns_answer,
    parse_dns_query,
)

# A query as a resolver puts it on the wire: id 0x1234, RD, one question whoami.kmesh-lab. TXT IN.
QUERY = (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
         b"\x06whoami\x09kmesh-lab\x00\x00\x10\x00\x01")
QUESTION = QUERY[12:]


def test_query_encoding_is_the_wire_format() -> None:
    assert dns_query(0x1234) == QUERY
    assert dns_query(0x1234, "WhoAmI.kmesh-lab") == QUERY.replace(b"whoami", b"WhoAmI")
    assert dns_query(7, ".")[12:] == b"\x00\x00\x10\x00\x01"  # the root name


def test_answer_repeats_id_and_question_and_carries_one_txt_record() -> None:
    question = parse_dns_query(QUERY)
    assert question == DnsQuestion(0x1234, 0x0100, "whoami.kmesh-lab.", 16, 1, QUESTION)
    reply = dns_answer(question, "dns-near")
    assert reply == (
        b"\x12\x34\x85\x00\x00\x01\x00\x01\x00\x00\x00\x00"  # QR AA RD, 1 question, 1 answer
        + QUESTION
        + b"\xc0\x0c\x00\x10\x00\x01\x00\x00\x00\x05\x00\x09"  # -> name, TXT IN, TTL 5, 9 B
        + b"\x08dns-near"
    )
    assert parse_dns_answer(reply, 0x1234) == "dns-near"


def test_a_question_of_another_type_gets_no_answer() -> None:
    question = parse_dns_query(dns_query(9, qtype=1))  # A
    reply = dns_answer(question, "x")
    assert struct.unpack("!6H", reply[:12]) == (9, 0x8500, 1, 0, 0, 0)
    assert parse_dns_answer(reply, 9) is None


def test_long_texts_are_split_into_character_strings() -> None:
    text = "n" * 300
    reply = dns_answer(parse_dns_query(dns_query(1)), text)
    rdata = reply[len(dns_query(1)) + 12:]
    assert rdata[0] == 255 and rdata[256] == 45
    assert parse_dns_answer(reply, 1) == text
    assert parse_dns_answer(dns_answer(parse_dns_query(dns_query(1)), ""), 1) == ""


def test_additional_records_of_a_query_are_ignored() -> None:
    # glibc and dig add an EDNS OPT record (arcount 1).
    opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
    query = QUERY[:10] + b"\x00\x01" + QUERY[12:] + opt
    question = parse_dns_query(query)
    assert question.raw == QUESTION
    assert parse_dns_answer(dns_answer(question, "a"), 0x1234) == "a"


@pytest.mark.parametrize("packet", [
    b"",
    QUERY[:11],  # shorter than a header
    b"\x12\x34\x81\x00" + QUERY[4:],  # QR set: a response
    b"\x12\x34\x09\x00" + QUERY[4:],  # opcode 1 (inverse query)
    QUERY[:4] + b"\x00\x00" + QUERY[6:],  # no question
    QUERY[:4] + b"\x00\x02" + QUERY[6:],  # two questions
    QUERY[:6] + b"\x00\x01" + QUERY[8:],  # an answer in a query
    QUERY[:8] + b"\x00\x01" + QUERY[10:],  # an authority record in a query
    QUERY[:12] + b"\xc0\x0c\x00\x10\x00\x01",  # a compression pointer in the question
    QUERY[:12] + b"\x40" + b"a" * 64 + b"\x00\x00\x10\x00\x01",  # a 64-byte label
    QUERY[:12] + b"\x03\xff\xfe\xfd\x00\x00\x10\x00\x01",  # not ASCII
    QUERY[:12] + b"\x3f" + (b"a" * 63 + b"\x3f") * 4 + b"\x00\x00\x10\x00\x01",  # name > 255
    *(QUERY[:n] for n in range(12, len(QUERY))),  # truncated anywhere in the question
])
def test_malformed_queries_are_refused(packet: bytes) -> None:
    with pytest.raises(ValueError):
        parse_dns_query(packet)


def test_answers_that_do_not_answer_this_query_are_refused() -> None:
    reply = dns_answer(parse_dns_query(QUERY), "x")
    with pytest.raises(ValueError, match="answer to query 4660, not 4661"):
        parse_dns_answer(reply, 0x1235)
    with pytest.raises(ValueError, match="a query"):
        parse_dns_answer(QUERY, 0x1234)
    with pytest.raises(ValueError, match="rcode 3"):
        parse_dns_answer(reply[:3] + b"\x03" + reply[4:], 0x1234)  # NXDOMAIN
    for n in range(len(reply)):
        with pytest.raises(ValueError):
            parse_dns_answer(reply[:n], 0x1234)


def test_names_and_ids_out_of_range_are_refused_when_encoding() -> None:
    with pytest.raises(ValueError, match="16 bits"):
        dns_query(0x10000)
    with pytest.raises(ValueError, match=r"1\.\.63"):
        dns_query(1, "a" * 64 + ".example")
    with pytest.raises(ValueError, match=r"1\.\.63"):
        dns_query(1, "a..b")
    with pytest.raises(ValueError, match="255"):
        dns_query(1, ".".join(["a" * 63] * 4))


@given(st.binary(max_size=600))
def test_any_datagram_is_a_query_or_a_value_error(data: bytes) -> None:
    try:
        question = parse_dns_query(data)
    except ValueError:
        return
    assert parse_dns_answer(dns_answer(question, "i"), question.id) in ("i", None)


@given(st.integers(0, 0xFFFF),
       st.lists(st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=63),
                max_size=3),
       st.text(max_size=400))
def test_round_trip(qid: int, labels: list[str], text: str) -> None:
    name = ".".join(labels) + "."
    question = parse_dns_query(dns_query(qid, name))
    assert (question.id, question.name, question.qtype) == (qid, name, 16)
    assert parse_dns_answer(dns_answer(question, text), qid) == text


# --------------------------------------------------------------------------------------------
# The server and the client's dns op, on loopback
# --------------------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[int]:
    """serve_dns on 127.0.0.1:<free port> in a thread; yields the port."""
    sock = workloads._udp_server("127.0.0.1", 0)
    stop = threading.Event()
    thread = threading.Thread(target=workloads.serve_dns, args=(sock, "inst-a", stop.is_set))
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close()
    assert not thread.is_alive()


def test_server_drops_garbage_and_answers_queries(server: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        for junk in (b"", b"hello", QUERY[:20], dns_answer(parse_dns_query(QUERY), "spoof")):
            sock.sendto(junk, ("127.0.0.1", server))
        sock.sendto(QUERY, ("127.0.0.1", server))
        data, source = sock.recvfrom(4096)  # the first datagram back answers the query
        assert source == ("127.0.0.1", server)
        assert parse_dns_answer(data, 0x1234) == "inst-a"
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recvfrom(4096)  # and nothing answered the junk


@pytest.mark.parametrize("connected", [False, True])
@pytest.mark.parametrize("reuse", [False, True])
def test_dns_op_reports_instance_source_and_peer(server: int, connected: bool,
                                                 reuse: bool) -> None:
    command = {"op": "dns", "host": "127.0.0.1", "port": server, "count": 3,
               "connected": connected, "reuse": reuse, "id": 5}
    reply = workloads.handle_command(json.dumps(command), None, [])
    assert reply["id"] == 5
    for r in reply["results"]:
        assert (r["ok"], r["errno"], r["instance"], r["ignored"]) == (True, None, "inst-a", 0)
        assert r["source"] == f"127.0.0.1:{server}"
        expected = f"127.0.0.1:{server}" if connected else None
        assert (r["peer"], r["endpoint"]) == (expected, expected)
        assert r["rtt_ms"] >= 0


def test_dns_op_resolves_names_and_reports_failures(tmp_path: Path, server: int) -> None:
    hosts = str(tmp_path / "hosts")
    Path(hosts).write_text("127.0.0.1 dns.kube-system.svc.cluster.local\n")
    search = ["kube-system.svc.cluster.local"]
    ok = workloads.handle_command(json.dumps(
        {"op": "dns", "host": "dns", "port": server}), hosts, search)
    assert ok["results"][0]["instance"] == "inst-a"
    (nosuch,) = workloads.handle_command(json.dumps({"op": "dns", "host": "nosuch"}),
                                         hosts, search)["results"]
    assert (nosuch["ok"], nosuch["errno"]) == (False, "EAI_NONAME")
    # Nothing listens on the port: a connected socket hears ICMP port unreachable.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    (refused,) = workloads.handle_command(json.dumps(
        {"op": "dns", "host": "127.0.0.1", "port": free, "connected": True, "timeout": 1}),
        None, [])["results"]
    assert refused["errno"] == "ECONNREFUSED"
    (silent,) = workloads.handle_command(json.dumps(
        {"op": "dns", "host": "127.0.0.1", "port": free, "timeout": 0.2}), None, [])["results"]
    assert silent["errno"] == "ETIMEDOUT"


@pytest.mark.parametrize("command", [
    {"op": "dns"},  # no host
    {"op": "dns", "host": "127.0.0.1", "family": 5},
    {"op": "dns", "host": "127.0.0.1", "port": 0},
    {"op": "dns", "host": "127.0.0.1", "count": 0},
])
def test_dns_op_refuses_bad_commands(command: dict[str, object]) -> None:
    assert "error" in workloads.handle_command(json.dumps(command), None, [])


@pytest.mark.parametrize("image", [kube.DNS_IMAGE, "registry.k8s.io/coredns/coredns:v1.11.1",
                                   "coredns/coredns:1.11.1", "docker.io/coredns/coredns"])
def test_the_coredns_image_runs_the_dns_workload(image: str) -> None:
    assert kube.image_kind(image, "x") == "dns"


def test_main_parses_the_dns_program() -> None:
    args = workloads._parser().parse_args(["dns", "--instance", "a"])
    assert (args.port, args.instance, args.bind, args.run) == (53, "a", None, workloads.run_dns)
