"""ops.locate: which running agent serves a node, read from /proc (a fake tree, then a real
process whose command line looks like an agent's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmesh_plugin.ops.locate import LocateError, agent_config_arg, config_for_node, running_agents


@pytest.mark.parametrize(("argv", "config"), [
    (["/usr/bin/python3", "/usr/local/bin/kmesh-plugin", "run", "--config", "/e/p.toml"],
     "/e/p.toml"),
    (["kmesh-plugin", "run"], "plugin.toml"),
    (["kmesh-plugin", "run", "-c", "a.toml"], "a.toml"),
    (["kmesh-plugin", "run", "--config=b.toml", "--lock-timeout", "3"], "b.toml"),
    (["kmesh-plugin", "run", "-cc.toml"], "c.toml"),
    (["/venv/bin/python", "-m", "kmesh_plugin.cli", "run", "--config", "x"], "x"),
    (["kmesh-plugin", "status", "--config", "x"], None),  # an operator command, not an agent
    (["kmesh-plugin"], None),
    (["python", "-m", "http.server", "run"], None),
    (["vim", "kmesh-plugin.toml", "run"], None),
])
def test_agent_command_lines(argv: list[str], config: str | None) -> None:
    assert agent_config_arg(argv) == config


def fake_process(proc: Path, pid: int, argv: list[str], cwd: Path, *, root: Path = Path("/"),
                 environ: dict[str, str] | None = None) -> None:
    entry = proc / str(pid)
    entry.mkdir(parents=True)
    (entry / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (entry / "environ").write_bytes(b"\0".join(f"{k}={v}".encode()
                                               for k, v in (environ or {}).items()))
    os.symlink(cwd, entry / "cwd")
    os.symlink(root, entry / "root")


def test_finds_each_nodes_config(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    for name in ("w1", "w2"):
        (nodes / f"{name}.toml").write_text(f'[node]\nname = "{name}"\n')
    (nodes / "anon.toml").write_text("[agent]\n")
    fake_process(proc, 10, ["kmesh-plugin", "run", "--config", "w1.toml"], nodes)
    fake_process(proc, 11, ["kmesh-plugin", "run", "--config", str(nodes / "w2.toml")], Path("/"))
    fake_process(proc, 12, ["kmesh-plugin", "run", "-c", "anon.toml"], nodes,
                 environ={"NODE_NAME": "from-env", "PATH": "/bin"})
    fake_process(proc, 13, ["bash"], nodes)
    (proc / "self").mkdir()
    agents = running_agents(proc)
    assert [(a.pid, a.node) for a in agents] == [(12, "from-env"), (10, "w1"), (11, "w2")]
    assert config_for_node("w1", proc) == nodes / "w1.toml"
    assert config_for_node("w2", proc) == nodes / "w2.toml"
    with pytest.raises(LocateError, match=r"no kmesh-plugin agent for node 'w3'.*"
                       r"from-env \(pid 12\), w1 \(pid 10\), w2 \(pid 11\)"):
        config_for_node("w3", proc)


def test_two_agents_for_one_node_is_an_error(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for i in (1, 2):
        (tmp_path / f"{i}.toml").write_text('[node]\nname = "w"\n')
        fake_process(proc, 20 + i, ["kmesh-plugin", "run", "-c", f"{i}.toml"], tmp_path)
    with pytest.raises(LocateError, match=r"more than one .* 'w' \(pid 21: .*1.toml, pid 22"):
        config_for_node("w", proc)


def test_a_containerised_agent_is_read_through_its_root(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc" / "kmesh").mkdir(parents=True)
    (rootfs / "etc" / "kmesh" / "plugin.toml").write_text("[agent]\n")
    (rootfs / "etc" / "hostname").write_text("pod-host\n")
    fake_process(proc, 30, ["kmesh-plugin", "run", "-c", "/etc/kmesh/plugin.toml"], Path("/"),
                 root=rootfs)
    # /proc/PID/root of a real process is a magic link; here a symlink to the rootfs does.
    (agent,) = running_agents(proc)
    assert agent.node == "pod-host"
    assert agent.config.read_text() == "[agent]\n"


def test_a_real_process(tmp_path: Path) -> None:
    config = tmp_path / "plugin.toml"
    config.write_text('[node]\nname = "locate-test-node"\n')
    # An interpreter running a script named kmesh-plugin, as the console script runs.
    script = tmp_path / "kmesh-plugin"
    script.write_text("import sys, time\nsys.stdout.write('up\\n'); sys.stdout.flush()\n"
                      "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(script), "run", "--config", "plugin.toml"],
                            cwd=tmp_path, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        assert config_for_node("locate-test-node") == config
    finally:
        proc.kill()
        proc.wait()  # reaped: its /proc entry is gone
    with pytest.raises(LocateError, match="no kmesh-plugin agent for node 'locate-test-node'"):
        config_for_node("locate-test-node")
