"""A test bed for the real datapath: programs attached to a test cgroup, endpoints in a test
network namespace, and a client process placed in both.

Endpoints are helloworld servers bound to their own address on the namespace's loopback
(198.18.0.0/16 and 2001:2::/48, the benchmarking ranges); ClusterIPs come from 198.19.0.0/16,
which nothing in the namespace routes: an untranslated connect fails with ENETUNREACH.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmesh_lab import procs
from kmesh_plugin.datapath import loader
from kmesh_plugin.datapath.build import Capacities, compile_object
from kmesh_plugin.datapath.records import Backend, BackendSet, Frontend
from kmesh_plugin.datapath.writer import MapWriter

WORKLOADS = [sys.executable, "-m", "kmesh_lab.workloads"]
START_TIMEOUT = 20.0


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


class Client:
    """The workloads client (JSON lines over stdin/stdout), inside the bed's netns and cgroup."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.reader = procs.LineReader(proc.stdout)  # type: ignore[arg-type]
        self.reader.expect("ready", START_TIMEOUT)

    def call(self, command: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()
        reply = json.loads(self.reader.readline(timeout))
        assert "error" not in reply, reply
        return reply

    def connect(self, host: str, port: int, proto: str = "tcp", count: int = 1,
                timeout: float = 2.0) -> list[dict[str, Any]]:
        return self.call({"op": "connect", "host": host, "port": port, "proto": proto,
                          "count": count, "timeout": timeout})["results"]

    def get(self, url: str, count: int = 1, timeout: float = 2.0) -> list[dict[str, Any]]:
        return self.call({"op": "get", "url": url, "count": count, "timeout": timeout})["results"]

    def send(self, command: dict[str, Any]) -> None:
        """Start a command without waiting for its reply (see ``receive``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()

    def receive(self, timeout: float = 120.0) -> dict[str, Any]:
        return json.loads(self.reader.readline(timeout))


@dataclass
class Bed:
    pin_dir: Path
    cgroup: Path
    netns: str
    build_dir: Path
    capacities: Capacities = field(default_factory=lambda: Capacities(64, 1024))
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    defines: tuple[str, ...] = ()  # a test variant of the object (KMESH_TEST_* macros)

    def __post_init__(self) -> None:
        self.obj = compile_object(self.capacities, self.build_dir, defines=self.defines)
        self.dp = loader.attach(self.pin_dir, self.cgroup, self.capacities, self.build_dir,
                                obj=self.obj)
        self.writer = MapWriter(self.dp)
        self.writer.recover()
        self._addresses: set[str] = set()

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    def reattach(self) -> None:
        """What a restarting agent does: load again over the pinned maps and swap the links."""
        self.writer.close()
        self.dp.close()
        self.dp = loader.attach(self.pin_dir, self.cgroup, self.capacities, self.build_dir,
                                obj=self.obj)
        self.writer = MapWriter(self.dp)
        self.writer.recover()

    def address(self, text: str) -> None:
        """Put ``text`` on the namespace's loopback (v6 without DAD, usable at once)."""
        if text in self._addresses:
            return
        cidr = f"{text}/128" if ":" in text else f"{text}/32"
        extra = ["nodad"] if ":" in text else []
        subprocess.run(["ip", "-n", self.netns, "addr", "add", cidr, "dev", "lo", *extra],
                       check=True)
        self._addresses.add(text)

    def server(self, name: str, address: str, port: int) -> Backend:
        """A helloworld server answering with version ``name`` on address:port."""
        self.address(address)
        proc = procs.spawn(
            [*WORKLOADS, "helloworld", "--port", str(port), "--version", name,
             "--instance", name, "--bind", address],
            netns=self.netns_path, cgroup=None,
        )
        self.processes.append(proc)
        procs.LineReader(proc.stdout).expect("ready", START_TIMEOUT)  # type: ignore[arg-type]
        return Backend(ip(address), port)

    def client(self) -> Client:
        proc = procs.spawn([*WORKLOADS, "client"], netns=self.netns_path, cgroup=str(self.cgroup),
                           stdin=subprocess.PIPE)
        self.processes.append(proc)
        return Client(proc)

    def publish(self, table: dict[Frontend, BackendSet | None]) -> None:
        self.writer.publish(table)

    def close(self) -> None:
        for proc in self.processes:
            procs.stop(proc)
        self.writer.close()
        self.dp.close()


def tiers(*groups: list[Backend], mode: int) -> BackendSet:
    return BackendSet(mode, tuple(tuple(g) for g in groups))


def answered(results: list[dict[str, Any]]) -> list[str | None]:
    """The version (server name) behind each HTTP result; None for a failure."""
    return [r["version"] if r["ok"] else None for r in results]
