"""The lab API server's exec protocol pieces (kmesh_lab.apiserver.remotecommand) without HTTP:
RFC 6455 framing (masking, lengths, fragmentation, control frames, errors), the exec query,
the handshake, the error-channel Status, and one ExecSession over a socket pair."""

from __future__ import annotations

import email.message
import json
import os
import socket
import subprocess
import threading

import pytest

from kmesh_lab.apiserver.errors import ApiError
from kmesh_lab.apiserver.remotecommand import (
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    PROTOCOL_V4,
    PROTOCOL_V5,
    Decoder,
    ExecRequest,
    ExecSession,
    ProtocolError,
    RecentRefusals,
    accept_key,
    apply_mask,
    choose_protocol,
    close_payload,
    encode_frame,
    exit_status,
    handshake_key,
    is_websocket_upgrade,
    parse_close,
    parse_exec_query,
    refusal_key,
)

MASK = b"\x37\xfa\x21\x3d"


def test_rfc6455_examples() -> None:
    # Section 5.7: a single-frame unmasked and masked "Hello".
    assert encode_frame(OP_TEXT, b"Hello") == bytes.fromhex("810548656c6c6f")
    assert encode_frame(OP_TEXT, b"Hello", mask=MASK) == bytes.fromhex("818537fa213d7f9f4d5158")
    # A fragmented unmasked text message and an unmasked ping.
    decoder = Decoder(expect_masked=False)
    assert decoder.feed(bytes.fromhex("010348656c")) == []
    assert decoder.feed(bytes.fromhex("80026c6f")) == [(OP_TEXT, b"Hello")]
    assert decoder.feed(bytes.fromhex("890548656c6c6f")) == [(OP_PING, b"Hello")]
    # Section 1.3: the accept key.
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 300_000])
def test_lengths_round_trip_masked_and_unmasked(size: int) -> None:
    payload = os.urandom(size)
    frame = encode_frame(OP_BINARY, payload, mask=MASK)
    header = 2 + (2 if 126 <= size < 65536 else 8 if size >= 65536 else 0) + 4
    assert len(frame) == header + size
    assert Decoder().feed(frame) == [(OP_BINARY, payload)]
    assert Decoder(expect_masked=False).feed(encode_frame(OP_BINARY, payload)) == [
        (OP_BINARY, payload)]
    assert apply_mask(apply_mask(payload, MASK), MASK) == payload


def test_byte_by_byte_feeding_and_control_frames_between_fragments() -> None:
    stream = (encode_frame(OP_BINARY, b"\x00one ", fin=False, mask=MASK)
              + encode_frame(OP_PING, b"p", mask=MASK)
              + encode_frame(OP_CONTINUATION, b"two ", fin=False, mask=MASK)
              + encode_frame(OP_CONTINUATION, b"three", mask=MASK)
              + encode_frame(OP_CLOSE, close_payload(CLOSE_NORMAL, "bye"), mask=MASK))
    decoder = Decoder()
    got = [m for b in stream for m in decoder.feed(bytes([b]))]
    assert got == [(OP_PING, b"p"), (OP_BINARY, b"\x00one two three"),
                   (OP_CLOSE, b"\x03\xe8bye")]
    assert parse_close(got[-1][1]) == (CLOSE_NORMAL, "bye")
    assert parse_close(b"") == (1005, "")


@pytest.mark.parametrize(("data", "code", "why"), [
    (encode_frame(OP_BINARY, b"x"), CLOSE_PROTOCOL_ERROR, "must be masked"),
    (encode_frame(OP_CONTINUATION, b"x", mask=MASK), CLOSE_PROTOCOL_ERROR, "without a start"),
    (encode_frame(OP_BINARY, b"x", fin=False, mask=MASK) + encode_frame(OP_TEXT, b"y", mask=MASK),
     CLOSE_PROTOCOL_ERROR, "before the last one ended"),
    (encode_frame(OP_PING, b"x" * 126, mask=MASK), CLOSE_PROTOCOL_ERROR, "at most 125"),
    (encode_frame(OP_PING, b"x", fin=False, mask=MASK), CLOSE_PROTOCOL_ERROR, "final"),
    (bytes([0xC2]) + encode_frame(OP_BINARY, b"x", mask=MASK)[1:], CLOSE_PROTOCOL_ERROR,
     "reserved bits"),
    (bytes([0x83]) + encode_frame(OP_BINARY, b"x", mask=MASK)[1:], CLOSE_PROTOCOL_ERROR,
     "unknown opcode"),
    (encode_frame(OP_BINARY, b"x" * 2000, mask=MASK), CLOSE_TOO_BIG, "larger than"),
    (encode_frame(OP_BINARY, b"x" * 600, fin=False, mask=MASK)
     + encode_frame(OP_CONTINUATION, b"x" * 600, mask=MASK), CLOSE_TOO_BIG, "larger than"),
])
def test_protocol_errors(data: bytes, code: int, why: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        Decoder(max_message=1024).feed(data)
    assert caught.value.code == code and why in caught.value.reason


def test_a_client_rejects_masked_server_frames_and_bad_close_payloads() -> None:
    with pytest.raises(ProtocolError, match="must not be masked"):
        Decoder(expect_masked=False).feed(encode_frame(OP_BINARY, b"x", mask=MASK))
    with pytest.raises(ProtocolError):
        parse_close(b"\x03")
    with pytest.raises(ProtocolError):
        parse_close((999).to_bytes(2, "big"))


def test_exec_query() -> None:
    request = parse_exec_query("command=sh&command=-c&command=echo+%22a+b%22&container=app"
                               "&stdin=true&stdout=1&stderr=true&tty=false", "ns", "web")
    assert request == ExecRequest("ns", "web", "app", ["sh", "-c", 'echo "a b"'],
                                  stdin=True, stdout=True, stderr=True, tty=False)
    tty = parse_exec_query("command=sh&stdin=true&stdout=true&stderr=true&tty=true", "ns", "p")
    assert (tty.container, tty.tty, tty.stderr) == ("", True, False)  # as the kubelet does
    for query, message in (("stdout=true", "at least 1 command"),
                           ("command=x", "at least 1 of stdin, stdout, stderr"),
                           ("command=x&stdout=yes", "ParseBool")):
        with pytest.raises(ApiError, match=message) as caught:
            parse_exec_query(query, "ns", "p")
        assert caught.value.code == 400


def headers(**fields: str) -> email.message.Message:
    message = email.message.Message()
    for name, value in fields.items():
        message[name.replace("_", "-")] = value
    return message


def test_handshake() -> None:
    offer = headers(Upgrade="websocket", Connection="keep-alive, Upgrade",
                    Sec_WebSocket_Version="13", Sec_WebSocket_Key="dGhlIHNhbXBsZSBub25jZQ==",
                    Sec_WebSocket_Protocol=f"v3.channel.k8s.io, {PROTOCOL_V4}, {PROTOCOL_V5}")
    assert is_websocket_upgrade(offer)
    assert choose_protocol(offer) == PROTOCOL_V5
    assert handshake_key(offer) == "dGhlIHNhbXBsZSBub25jZQ=="
    assert not is_websocket_upgrade(headers(Upgrade="SPDY/3.1", Connection="Upgrade"))
    assert choose_protocol(headers(Sec_WebSocket_Protocol="channel.k8s.io")) is None
    for bad in (headers(Sec_WebSocket_Version="8", Sec_WebSocket_Key="dGhlIHNhbXBsZSBub25jZQ=="),
                headers(Sec_WebSocket_Version="13", Sec_WebSocket_Key="short")):
        with pytest.raises(ApiError):
            handshake_key(bad)


def test_exit_status_is_what_the_kubelet_writes() -> None:
    assert json.dumps(exit_status(0), separators=(",", ":")) == \
        '{"metadata":{},"status":"Success"}'
    assert exit_status(2) == {
        "metadata": {}, "status": "Failure",
        "message": "command terminated with non-zero exit code: exit status 2",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": "2"}]}}
    assert exit_status(-9)["details"]["causes"][0]["message"] == "137"


def test_recent_refusals() -> None:
    refusals = RecentRefusals(ttl=60, size=2)
    error = ApiError(400, "no")
    refusals.remember(refusal_key("ns", "p", "b=1&a=2"), error)
    assert refusals.take(refusal_key("ns", "p", "a=2&b=1")) is error
    assert refusals.take(refusal_key("ns", "p", "a=2&b=1")) is None  # answered once
    for name in ("x", "y", "z"):
        refusals.remember(refusal_key("ns", name, ""), error)
    assert refusals.take(refusal_key("ns", "x", "")) is None  # bounded


def test_a_session_over_a_socket_pair() -> None:
    server_sock, client = socket.socketpair()
    client.settimeout(10)
    proc = subprocess.Popen(["sh", "-c", "cat; echo err >&2; exit 5"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    request = ExecRequest("ns", "p", "c", ["sh"], stdin=True, stdout=True, stderr=True,
                          tty=False)
    early = encode_frame(OP_BINARY, b"\x00early ", mask=MASK)
    session = ExecSession(server_sock, proc, request, PROTOCOL_V5, early)
    thread = threading.Thread(target=session.run)
    thread.start()
    try:
        client.sendall(encode_frame(OP_BINARY, b"\x00" + b"y" * 200_000, mask=MASK)
                       + encode_frame(OP_PING, b"hb", mask=MASK)
                       + encode_frame(OP_BINARY, b"\xff\x00", mask=MASK))
        decoder = Decoder(expect_masked=False)
        got: list[tuple[int, bytes]] = []
        while not got or got[-1][0] != OP_CLOSE:
            data = client.recv(65536)
            assert data
            got += decoder.feed(data)
        client.sendall(encode_frame(OP_CLOSE, close_payload(CLOSE_NORMAL), mask=MASK))
        thread.join(10)
        assert not thread.is_alive()
    finally:
        session.close()
        thread.join(10)
        session.cleanup()
        client.close()
        server_sock.close()

    def channel(n: int) -> bytes:
        return b"".join(p[1:] for op, p in got if op == OP_BINARY and p[0] == n)

    assert channel(1) == b"early " + b"y" * 200_000
    assert channel(2) == b"err\n"
    assert json.loads(channel(3)) == exit_status(5)
    assert (OP_PONG, b"hb") in got
    assert (session.outcome, session.returncode, proc.returncode) == ("exited", 5, 5)
