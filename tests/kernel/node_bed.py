"""A node for tests that run the real agent (`kmesh-plugin run` as a process): a plugin.toml, a
manifest directory, endpoint servers in a test network namespace and a client in the test cgroup.

Agents run outside the test cgroup and namespace (the agent is not a workload); their JSON log
lines are collected by a reader thread, so a test waits for a line (``AgentProc.wait_for``)
instead of sleeping.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datapath_bed import WORKLOADS, Client

from kmesh_lab import procs
from kmesh_plugin.datapath import loader, syscall

NODE = "n1"
START_TIMEOUT = 20.0


def link_progs(pin_dir: Path) -> dict[str, int]:
    """The program id each pinned link runs: what a swap changes, and what must not change."""
    out = {}
    for name in loader.PROGRAMS:
        fd = syscall.obj_get(pin_dir / "links" / name)
        try:
            out[name] = syscall.link_info(fd).prog_id
        finally:
            os.close(fd)
    return out


def write_config(
    path: Path, *, pin_dir: Path, cgroup: Path, build_dir: Path, manifests: Path,
    status_file: Path, datapath: tuple[str, ...] = (), extra: tuple[str, ...] = (),
) -> Path:
    """``datapath``: more [datapath] keys; ``extra``: more sections, e.g. [cni]."""
    path.write_text("\n".join([
        "[node]", f'name = "{NODE}"',
        "[datapath]", f'cgroup = "{cgroup}"', f'pin_dir = "{pin_dir}"',
        f'build_dir = "{build_dir}"', "max_services = 64", "max_endpoints = 1024", *datapath,
        "[source]", f'path = "{manifests}"',
        "[agent]", f'status_file = "{status_file}"', "metrics = false",
        'log_format = "json"', 'log_level = "info"', *extra,
    ]) + "\n")
    return path


def write_service(manifests: Path, vip: str, port: int, endpoints: list[tuple[str, int]],
                  revision: str) -> None:
    """One Service (no strategy: every endpoint alike) with its EndpointSlice, atomically."""
    manifests.mkdir(parents=True, exist_ok=True)
    doc = {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": {}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc", "namespace": "t"},
         "spec": {"clusterIP": vip, "ports": [{"name": "http", "port": port}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "svc-1", "namespace": "t",
                      "labels": {"kubernetes.io/service-name": "svc"}},
         "addressType": "IPv4",
         "ports": [{"name": "http", "port": endpoints[0][1] if endpoints else 8080}],
         "endpoints": [{"addresses": [a], "nodeName": NODE, "conditions": {"ready": True}}
                       for a, _ in endpoints]},
    ]}
    for name, text in (("svc.json", json.dumps(doc)), (".revision", revision)):
        fd, tmp = tempfile.mkstemp(dir=manifests.parent, prefix=".node-bed-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, manifests / name)


@dataclass
class AgentProc:
    """`kmesh-plugin run` as a child process; its JSON log lines in ``lines``."""

    proc: subprocess.Popen[bytes]
    lines: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    eof: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            text = raw.decode(errors="replace").rstrip("\n")
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                line = {"msg": text}
            with self.cond:
                self.raw.append(text)
                self.lines.append(line if isinstance(line, dict) else {"msg": text})
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0,
                 start: int = 0) -> int:
        """Index of the first log line from ``start`` on that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout

        def found() -> int | None:
            for i in range(start, len(self.lines)):
                if predicate(self.lines[i]):
                    return i
            return None

        with self.cond:
            while (index := found()) is None:
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    raise AssertionError(
                        f"agent {self.pid}: no matching log line (exit {self.proc.poll()}); "
                        "log:\n" + "\n".join(self.raw[-40:]))
                self.cond.wait(left)
            return index

    def messages(self) -> list[str]:
        with self.cond:
            return [str(line.get("msg", "")) for line in self.lines]

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=30)

    def stop(self) -> int:
        return procs.stop(self.proc, timeout=15)


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_the_test() -> None:
    # Between fork and exec: if the test process itself is killed (no teardown runs), the
    # kernel kills the agent too instead of leaving it running on the test's pin dir.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def start_agent(config: Path, *args: str) -> AgentProc:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmesh_plugin.cli", "run", "-c", str(config), *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True, preexec_fn=_die_with_the_test,
    )
    agent = AgentProc(proc)
    threading.Thread(target=agent._read, daemon=True).start()
    return agent


@contextmanager
def agents() -> Iterator[list[AgentProc]]:
    """A list to put started agents in; every one is stopped at the end, also on failure."""
    started: list[AgentProc] = []
    try:
        yield started
    finally:
        for agent in started:
            procs.stop(agent.proc, timeout=15)


@dataclass
class Workloads:
    """Endpoint servers in ``netns``; clients in ``cgroup`` and ``netns``."""

    netns: str
    cgroup: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    def server(self, name: str, address: str, port: int) -> tuple[str, int]:
        subprocess.run(["ip", "-n", self.netns, "addr", "add", f"{address}/32", "dev", "lo"],
                       check=True)
        proc = procs.spawn(
            [*WORKLOADS, "helloworld", "--port", str(port), "--version", name,
             "--instance", name, "--bind", address],
            netns=self.netns_path, cgroup=None,
        )
        self.processes.append(proc)
        procs.LineReader(proc.stdout).expect("ready", START_TIMEOUT)  # type: ignore[arg-type]
        return address, port

    def client(self) -> Client:
        proc = procs.spawn([*WORKLOADS, "client"], netns=self.netns_path,
                           cgroup=str(self.cgroup), stdin=subprocess.PIPE)
        self.processes.append(proc)
        return Client(proc)

    def close(self) -> None:
        for proc in self.processes:
            procs.stop(proc)
