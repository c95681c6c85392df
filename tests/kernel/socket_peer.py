"""Raw socket calls for tests/kernel/test_socket_lb.py, as a process the test places in a
cgroup and network namespace: ``python socket_peer.py``.

It reads one JSON command per line and answers each with one JSON line. Sockets stay open
between commands (by id), so a test can send on one socket, restart the datapath, then receive
on it. Standard library only.

Commands (every answer has "ok"; a failure has "errno" with the errno name):
  {"op": "socket", "family": 4|6, "type": "udp"|"tcp"}           -> {"id": N}
  {"op": "sendto", "id": N, "host": H, "port": P, "data": S}
  {"op": "send", "id": N, "data": S}
  {"op": "recvfrom", "id": N, "timeout": T}   -> {"data": S, "source": "host:port"}
  {"op": "connect", "id": N, "host": H, "port": P}
  {"op": "getpeername", "id": N}               -> {"peer": "host:port"}
  {"op": "endpoint", "id": N}                  -> {"endpoint": "host:port"} (kernel's table)
  {"op": "cookie", "id": N}                    -> {"cookie": int} (SO_COOKIE)
  {"op": "ask", "family": F, "host": H, "port": P, "count": C, "connected": bool}
      C round trips, each on a fresh UDP socket -> {"replies": [{"data", "source"} | errno]}
  {"op": "close", "id": N}
  {"op": "netns_cookie"}                       -> {"cookie": int} (SO_NETNS_COOKIE)
The UDP echo server: ``python socket_peer.py serve NAME ADDRESS PORT`` answers each datagram
with "NAME:<its payload>"; it prints "ready" once bound, and a payload "hold" is answered only
after the server reads a line on stdin (to reply across a datapath restart).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from typing import Any

SO_NETNS_COOKIE = 71
SO_COOKIE = 57


def fmt(address: tuple[Any, ...]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def kernel_peer(sock: socket.socket) -> str | None:
    """The socket's remote address in /proc/self/net/*: what no BPF hook rewrites."""
    inode = str(os.fstat(sock.fileno()).st_ino)
    table = ("tcp" if sock.type == socket.SOCK_STREAM else "udp") + (
        "6" if sock.family == socket.AF_INET6 else "")
    with open(f"/proc/self/net/{table}") as handle:
        for line in handle.read().splitlines()[1:]:
            fields = line.split()
            if fields[9] == inode:
                host, port = fields[2].split(":")
                raw = bytes.fromhex(host)
                packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                family = socket.AF_INET if len(packed) == 4 else socket.AF_INET6
                return fmt((socket.inet_ntop(family, packed), int(port, 16)))
    return None


def serve(name: str, address: str, port: int) -> int:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((address, port))
    print("ready", flush=True)
    while True:
        data, source = sock.recvfrom(65536)
        if data == b"hold":
            sys.stdin.readline()
        sock.sendto(name.encode() + b":" + data, source)


def run(command: dict[str, Any], sockets: dict[int, socket.socket]) -> dict[str, Any]:
    op = command["op"]
    if op == "socket":
        family = socket.AF_INET6 if command.get("family") == 6 else socket.AF_INET
        kind = socket.SOCK_STREAM if command.get("type") == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(family, kind)
        sockets[sock.fileno()] = sock
        return {"id": sock.fileno()}
    if op == "netns_cookie":
        with socket.socket() as sock:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        return {"cookie": int.from_bytes(raw, sys.byteorder)}
    if op == "ask":
        replies = []
        for _ in range(command.get("count", 1)):
            family = socket.AF_INET6 if command.get("family") == 6 else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.settimeout(command.get("timeout", 2.0))
                target = (command["host"], command["port"])
                try:
                    if command.get("connected"):
                        sock.connect(target)
                        sock.send(b"q")
                    else:
                        sock.sendto(b"q", target)
                    data, source = sock.recvfrom(65536)
                    replies.append({"data": data.decode(), "source": fmt(source)})
                except OSError as e:
                    replies.append({"errno": _errno(e)})
        return {"replies": replies}
    sock = sockets[command["id"]]
    sock.settimeout(command.get("timeout", 2.0))
    if op == "sendto":
        sock.sendto(command["data"].encode(), (command["host"], command["port"]))
        return {}
    if op == "send":
        sock.send(command["data"].encode())
        return {}
    if op == "recvfrom":
        data, source = sock.recvfrom(65536)
        return {"data": data.decode(), "source": fmt(source)}
    if op == "connect":
        sock.connect((command["host"], command["port"]))
        return {}
    if op == "getpeername":
        return {"peer": fmt(sock.getpeername())}
    if op == "endpoint":
        return {"endpoint": kernel_peer(sock)}
    if op == "cookie":
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
        return {"cookie": int.from_bytes(raw, sys.byteorder)}
    if op == "close":
        sockets.pop(command["id"]).close()
        return {}
    raise ValueError(f"unknown op {op!r}")


def _errno(e: OSError) -> str:
    if isinstance(e, TimeoutError) and not e.errno:
        return "ETIMEDOUT"
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        return serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    sockets: dict[int, socket.socket] = {}
    print("ready", flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        try:
            answer = {"ok": True, **run(command, sockets)}
        except OSError as e:
            answer = {"ok": False, "errno": _errno(e)}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
