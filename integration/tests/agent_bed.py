"""A real agent process (`kmesh-plugin run`, kubernetes source) for the integration tests:
start it against an in-test API server, wait until it applied the server's state, read back
what the kernel maps let a connect reach; and the endpoint servers and clients around it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmesh_lab import procs
from kmesh_lab.apiserver import ApiServer
from kmesh_plugin.sources.inotify import Inotify
from kmesh_plugin.sources.resources import WATCHED

WORKLOADS = [sys.executable, "-m", "kmesh_lab.workloads"]


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    config: Path
    status: Path
    log: Path

    def read_status(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.status.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def dump(self) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "kmesh_plugin.cli", "dump", "-o", "json",
                              "-c", str(self.config)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


def start_agent(tmp: Path, name: str, kubeconfig: Path, pin_dir: Path, cgroup: Path,
                build_dir: Path, node: str = "n1") -> AgentProcess:
    state = tmp / name
    state.mkdir(exist_ok=True)
    config = state / "plugin.toml"
    config.write_text("\n".join([
        "[node]", f'name = "{node}"',
        "[datapath]", f'cgroup = "{cgroup}"', f'pin_dir = "{pin_dir}"',
        f'build_dir = "{build_dir}"', "max_services = 256", "max_endpoints = 4096",
        "[source]", 'kind = "kubernetes"', f'kubeconfig = "{kubeconfig}"',
        "[agent]", f'status_file = "{state / "status.json"}"', "metrics = false",
    ]) + "\n")
    log = state / "agent.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kmesh_plugin.cli", "run", "-c",
                                 str(config)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    return AgentProcess(proc, config, state / "status.json", log)


def converged(agent: AgentProcess, server: ApiServer, timeout: float = 60.0) -> dict[str, Any]:
    """Until the agent's status says it applied the server's last change of every resource."""
    targets = {r.plural: server.last_change(r.plural) for r in WATCHED}
    deadline = time.monotonic() + timeout
    with Inotify() as watch:
        watch.watch(agent.status.parent)  # the agent replaces its status file by rename
        while True:
            st = agent.read_status()
            revision = (st or {}).get("source_revision")
            if isinstance(revision, dict) and all(
                int(revision.get(p) or 0) >= rv for p, rv in targets.items()
            ):
                return st or {}
            if agent.proc.poll() is not None:
                raise AssertionError(f"agent exited {agent.proc.returncode}:\n"
                                     + agent.log.read_text()[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"agent did not converge on {targets}: {revision}\n"
                                     + agent.log.read_text()[-3000:])
            watch.wait(min(1.0, max(0.0, deadline - time.monotonic())))


def frontends(dump: dict[str, Any]) -> dict[str, Any]:
    """What a connect can reach, per frontend: ids, generations and counters left out."""
    return {f["frontend"]: (f.get("mode"), [sorted(t) for t in f.get("tiers", [])],
                            f.get("error"))
            for f in dump["frontends"]}




@dataclass
class Endpoints:
    """helloworld servers in a network namespace, each answering with its own address as its
    version, so every answer says which endpoint it came from."""

    netns: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, address: str, port: int = 8080) -> None:
        subprocess.run(["ip", "-n", self.netns, "addr", "add", f"{address}/32", "dev", "lo"],
                       check=True)
        proc = procs.spawn([*WORKLOADS, "helloworld", "--port", str(port), "--version",
                            address, "--instance", address, "--bind", address],
                           netns=f"/var/run/netns/{self.netns}", cgroup=None)
        self.processes.append(proc)
        procs.LineReader(proc.stdout).expect("ready", 20)  # type: ignore[arg-type]

    def close(self) -> None:
        for proc in self.processes:
            procs.stop(proc)


@dataclass
class Client:
    """The workloads client in the agent's cgroup and the namespace: its connects go through
    the datapath under test."""

    proc: subprocess.Popen[bytes]
    reader: procs.LineReader

    @classmethod
    def start(cls, netns: str, cgroup: Path) -> Client:
        proc = procs.spawn([*WORKLOADS, "client"], netns=f"/var/run/netns/{netns}",
                           cgroup=str(cgroup), stdin=subprocess.PIPE)
        client = cls(proc, procs.LineReader(proc.stdout))  # type: ignore[arg-type]
        client.reader.expect("ready", 20)
        return client

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()

    def receive(self, timeout: float) -> dict[str, Any]:
        reply = json.loads(self.reader.readline(timeout))
        assert "error" not in reply, reply
        return reply

    def close(self) -> None:
        procs.stop(self.proc)
