"""ops.locate: which running agent serves a node, read from /proc (a fake tree, then real
processes: one whose command line looks like an agent's, and one in its own mount namespace
that sees another file at the same path)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import missing  # the shared skip-or-fail rule (KMESH_REQUIRE_BPF)
from kmesh_plugin import cli
from kmesh_plugin.config import MAX_CONFIG_BYTES
from kmesh_plugin.ops.locate import LocateError, agent_config_arg, config_for_node, running_agents

# -- command lines ---------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "config"), [
    (["/usr/bin/python3", "/usr/local/bin/kmesh-plugin", "run", "--config", "/e/p.toml"],
     "/e/p.toml"),
    (["kmesh-plugin", "run"], "plugin.toml"),
    (["kmesh-plugin", "run", "-c", "a.toml"], "a.toml"),
    (["kmesh-plugin", "run", "--config=b.toml", "--lock-timeout", "3"], "b.toml"),
    (["kmesh-plugin", "run", "-cc.toml"], "c.toml"),
    # argparse: "-c=x" is x (not "=x"), an unambiguous prefix is the option, the last one wins.
    (["kmesh-plugin", "run", "-c=d.toml"], "d.toml"),
    (["kmesh-plugin", "run", "--conf", "e.toml"], "e.toml"),
    (["kmesh-plugin", "run", "--con=f.toml", "--lock-t", "1"], "f.toml"),
    (["kmesh-plugin", "run", "--c", "g.toml"], "g.toml"),
    (["kmesh-plugin", "run", "-c", "old.toml", "--config", "new.toml"], "new.toml"),
    (["/venv/bin/python", "-m", "kmesh_plugin.cli", "run", "--config", "x"], "x"),
    # The interpreter's own options, as CPython parses them.
    (["python3", "-Im", "kmesh_plugin.cli", "run", "-c", "y"], "y"),
    (["python3", "-Imkmesh_plugin.cli", "run", "-c", "y"], "y"),
    (["python3", "-Im", "kmesh_plugin", "run", "-c", "y"], "y"),
    (["python3.11", "-I", "-W", "ignore", "-X", "dev", "-m", "kmesh_plugin.cli", "run"],
     "plugin.toml"),
    (["python3", "-sEWerror", "-Xutf8", "/v/bin/kmesh-plugin", "run", "-c", "z"], "z"),
    (["python3", "--check-hash-based-pycs", "never", "-m", "kmesh_plugin.cli", "run"],
     "plugin.toml"),
    (["python3", "-u", "--", "/v/bin/kmesh-plugin", "run", "-c", "w"], "w"),
    # Not agents: operator commands, other programs, and what the agent's parser refuses
    # (such a process exits at once, printing usage).
    (["kmesh-plugin", "status", "--config", "x"], None),
    (["kmesh-plugin", "run", "--help"], None),
    (["kmesh-plugin", "run", "--lock-timeout", "soon"], None),
    (["kmesh-plugin", "run", "extra"], None),
    (["kmesh-plugin", "-h", "run"], None),
    (["kmesh-plugin"], None),
    (["python", "-m", "http.server", "run"], None),
    (["python3", "-m", "kmesh_plugin.clix", "run"], None),
    (["python3", "-c", "import kmesh_plugin", "/v/bin/kmesh-plugin", "run"], None),
    (["python3", "-W", "-m", "kmesh_plugin.cli", "run"], None),  # "-m" is -W's value
    (["python3", "-V", "/v/bin/kmesh-plugin", "run"], None),
    (["python3", "-m"], None),
    (["vim", "kmesh-plugin.toml", "run"], None),
    # A wrapper is not the agent: its child, the interpreter, shows itself.
    (["sudo", "kmesh-plugin", "run"], None),
    ([], None),
    ([""], None),
])
def test_agent_command_lines(argv: list[str], config: str | None) -> None:
    assert agent_config_arg(argv) == config


@pytest.mark.parametrize("args", [
    ["run"], ["run", "-c", "a"], ["run", "-c=a"], ["run", "-ca"], ["run", "--conf", "a"],
    ["run", "--config=", "--lock-timeout=2"], ["run", "--lock", "2"], ["run", "-c"],
    ["run", "--", "-c", "a"], ["run", "--config", "a", "b"], ["status"], ["run", "-x"],
])
def test_the_command_line_reads_as_the_agents_parser_reads_it(
        args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever the CLI's own parser makes of an agent's arguments, locate makes of them: the
    --config it runs with, or no agent where the parser refuses them (that process exits)."""
    try:
        parsed = cli._parser().parse_args(args)
    except SystemExit:
        expected = None
    else:
        expected = (str(parsed.config or "plugin.toml") if parsed.func is cli.cmd_run else None)
    capsys.readouterr()
    assert agent_config_arg(["kmesh-plugin", *args]) == expected
    assert capsys.readouterr() == ("", "")  # the scan never prints usage or help


# -- a fake /proc ----------------------------------------------------------------------------

OUR_MNT = "mnt:[4026531841]"
OUR_UTS = "uts:[4026531838]"


def fake_proc(tmp_path: Path) -> Path:
    """A /proc whose ``self`` (this process, for locate) has OUR_MNT, OUR_UTS and root /."""
    proc = tmp_path / "proc"
    (proc / "self" / "ns").mkdir(parents=True)
    os.symlink(OUR_MNT, proc / "self" / "ns" / "mnt")
    os.symlink(OUR_UTS, proc / "self" / "ns" / "uts")
    os.symlink("/", proc / "self" / "root")
    return proc


def fake_process(proc: Path, pid: int, argv: list[str | bytes], cwd: Path, *,
                 root: Path = Path("/"), environ: dict[str, str] | None = None,
                 mnt: str | None = OUR_MNT, uts: str | None = OUR_UTS) -> Path:
    """A process entry; by default one that shares our mount and UTS namespaces. ``mnt`` or
    ``uts`` None: no link (as if not readable), so locate cannot assume it is ours."""
    entry = proc / str(pid)
    (entry / "ns").mkdir(parents=True)
    (entry / "cmdline").write_bytes(b"\0".join(a if isinstance(a, bytes) else a.encode()
                                               for a in argv) + b"\0")
    (entry / "environ").write_bytes(b"\0".join(f"{k}={v}".encode()
                                               for k, v in (environ or {}).items()))
    os.symlink(cwd, entry / "cwd")
    os.symlink(root, entry / "root")
    for name, link in (("mnt", mnt), ("uts", uts)):
        if link is not None:
            os.symlink(link, entry / "ns" / name)
    return entry


def test_finds_each_nodes_config(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
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
    agents = running_agents(proc)
    assert [(a.pid, a.node) for a in agents] == [(12, "from-env"), (10, "w1"), (11, "w2")]
    assert config_for_node("w1", proc) == nodes / "w1.toml"
    assert config_for_node("w2", proc) == nodes / "w2.toml"
    with pytest.raises(LocateError, match=r"no kmesh-plugin agent for node 'w3'.*"
                       r"from-env \(pid 12\), w1 \(pid 10\), w2 \(pid 11\)"):
        config_for_node("w3", proc)


def test_the_node_name_is_resolved_as_the_agent_resolves_it(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    (tmp_path / "anon.toml").write_text("[agent]\n")
    # os.environ keeps the first of two NODE_NAME entries, even an empty one (then: host name).
    entry = fake_process(proc, 10, ["kmesh-plugin", "run", "-c", "anon.toml"], tmp_path)
    (entry / "environ").write_bytes(b"NODE_NAME=first\0NOEQUALS\0NODE_NAME=second\0")
    entry = fake_process(proc, 11, ["kmesh-plugin", "run", "-c", "anon.toml"], tmp_path)
    (entry / "environ").write_bytes(b"NODE_NAME=\0NODE_NAME=second\0")
    assert [(a.pid, a.node) for a in running_agents(proc)] == sorted(
        [(10, "first"), (11, socket.gethostname())], key=lambda a: (a[1], a[0]))


def test_two_agents_for_one_node_is_an_error(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    for i in (1, 2):
        (tmp_path / f"{i}.toml").write_text('[node]\nname = "w"\n')
        fake_process(proc, 20 + i, ["kmesh-plugin", "run", "-c", f"{i}.toml"], tmp_path)
    with pytest.raises(LocateError, match=r"more than one .* 'w' \(pid 21: .*1.toml, pid 22"):
        config_for_node("w", proc)


def test_one_file_by_two_paths_is_one_agent(tmp_path: Path) -> None:
    """An agent re-executing itself, or one config seen through a symlink: the same file."""
    proc = fake_proc(tmp_path)
    (tmp_path / "plugin.toml").write_text('[node]\nname = "w"\n')
    (tmp_path / "link.toml").symlink_to("plugin.toml")
    fake_process(proc, 21, ["kmesh-plugin", "run"], tmp_path)
    fake_process(proc, 22, ["kmesh-plugin", "run", "-c", "link.toml"], tmp_path)
    assert config_for_node("w", proc) == tmp_path / "plugin.toml"


def container(tmp_path: Path) -> Path:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc" / "kmesh").mkdir(parents=True)
    (rootfs / "etc" / "kmesh" / "plugin.toml").write_text("[agent]\n")
    (rootfs / "etc" / "hostname").write_text("pod-host\n")
    return rootfs


def test_a_containerised_agent_is_read_through_its_root(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    rootfs = container(tmp_path)
    # Another mount and UTS namespace. /proc/PID/root of a real process is a magic link
    # (its readlink "/" for a container); here a symlink to the rootfs stands in for it.
    fake_process(proc, 30, ["kmesh-plugin", "run", "-c", "/etc/kmesh/plugin.toml"], Path("/"),
                 root=rootfs, mnt="mnt:[1]", uts="uts:[1]")
    # Relative to its cwd, which readlink shows under its root as readlink shows that (for a
    # real container: "/" and the cwd in its own view, see the mount namespace test below).
    fake_process(proc, 31, ["kmesh-plugin", "run", "-c", "kmesh/plugin.toml"], rootfs / "etc",
                 root=rootfs, mnt="mnt:[2]", uts="uts:[2]", environ={"NODE_NAME": "n31"})
    # Namespaces that cannot be read are not assumed to be ours.
    fake_process(proc, 32, ["kmesh-plugin", "run", "-c", "/etc/kmesh/plugin.toml"], Path("/"),
                 root=rootfs, mnt=None, uts=None, environ={"NODE_NAME": "n32"})
    agents = running_agents(proc)
    assert [(a.pid, a.node) for a in agents] == [(31, "n31"), (32, "n32"), (30, "pod-host")]
    for agent in agents:
        assert agent.config == proc / str(agent.pid) / "root" / "etc" / "kmesh" / "plugin.toml"
        assert agent.config.read_text() == "[agent]\n"


def test_a_chrooted_agent_in_our_namespace_is_read_through_its_root(tmp_path: Path) -> None:
    """Same mount namespace, another root: readlink of its cwd is under its root to us."""
    proc = fake_proc(tmp_path)
    rootfs = container(tmp_path)
    fake_process(proc, 33, ["kmesh-plugin", "run", "-c", "plugin.toml"], rootfs / "etc" / "kmesh",
                 root=rootfs, environ={"NODE_NAME": "n33"})
    (agent,) = running_agents(proc)
    assert agent.config == proc / "33" / "root" / "etc" / "kmesh" / "plugin.toml"
    assert agent.node == "n33"  # our UTS namespace, but NODE_NAME comes first


def test_a_containers_symlinks_resolve_in_its_root(tmp_path: Path) -> None:
    """A ConfigMap-style absolute symlink in the container points into the container, not at
    the host's file of that name; ``..`` stops at its root; a loop is skipped, not followed."""
    proc = fake_proc(tmp_path)
    rootfs = container(tmp_path)
    host_side = tmp_path / "host-side"  # the absolute target as the host would read it
    host_side.mkdir()
    (host_side / "plugin.toml").write_text('[node]\nname = "host-file"\n')
    inner = rootfs / host_side.relative_to("/")
    inner.mkdir(parents=True)
    (inner / "plugin.toml").write_text('[node]\nname = "pod-file"\n')
    (rootfs / "etc" / "kmesh" / "link.toml").symlink_to(host_side / "plugin.toml")
    (rootfs / "etc" / "kmesh" / "loop.toml").symlink_to("/etc/kmesh/loop.toml")
    (rootfs / "etc" / "hostname").unlink()
    (rootfs / "etc" / "hostname").symlink_to("/etc/kmesh/../name")
    (rootfs / "etc" / "name").write_text("linked-host\n")
    other = {"root": rootfs, "mnt": "mnt:[1]", "uts": "uts:[1]"}
    fake_process(proc, 40, ["kmesh-plugin", "run", "-c", "/etc/kmesh/link.toml"], Path("/"),
                 **other)
    fake_process(proc, 41, ["kmesh-plugin", "run", "-c", "/../../../etc/kmesh/plugin.toml"],
                 Path("/"), **other)
    fake_process(proc, 42, ["kmesh-plugin", "run", "-c", "/etc/kmesh/loop.toml"], Path("/"),
                 **other)
    agents = running_agents(proc)
    assert [(a.pid, a.node) for a in agents] == [(41, "linked-host"), (40, "pod-file")]
    assert agents[1].config == proc / "40" / "root" / inner.relative_to(rootfs) / "plugin.toml"


def test_the_host_name_of_an_agent_in_our_uts_namespace_is_ours(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    rootfs = container(tmp_path)  # its /etc/hostname says pod-host: not what it resolves
    fake_process(proc, 50, ["kmesh-plugin", "run", "-c", "/etc/kmesh/plugin.toml"], Path("/"),
                 root=rootfs, mnt="mnt:[1]")
    (rootfs / "etc" / "hostname").unlink()
    fake_process(proc, 51, ["kmesh-plugin", "run", "-c", "/etc/kmesh/plugin.toml"], Path("/"),
                 root=rootfs, mnt="mnt:[1]", uts="uts:[1]")  # and no way to tell its name
    assert [(a.pid, a.node) for a in running_agents(proc)] == [(50, socket.gethostname())]


# -- hostile /proc contents: every one a skip of that process, or a LocateError --------------


def test_what_cannot_be_an_agent_is_skipped(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    (nodes / "ok.toml").write_text('[node]\nname = "ok"\n')
    (nodes / "anon.toml").write_text("[agent]\n")
    (nodes / os.fsdecode(b"\xff.toml")).write_text('[node]\nname = "latin1"\n')
    (nodes / "bigint.toml").write_text('[node]\nname = "bigint"\nx = ' + "1" * 5000 + "\n")
    (nodes / "deep.toml").write_text('[node]\nname = "deep"\nx = ' + "[" * 5000 + "\n")
    (nodes / "binary.toml").write_bytes(b'[node]\nname = "\xff"\n')
    (nodes / "big.toml").write_text('[node]\nname = "big"\n' + "#" * MAX_CONFIG_BYTES + "\n")
    (nodes / "dev.toml").symlink_to("/dev/null")  # a device: the agent refuses it too
    fake_process(proc, 60, ["kmesh-plugin", "run", "-c", "ok.toml"], nodes)
    fake_process(proc, 61, [b"kmesh-plugin", b"run", b"-c", b"\xff.toml"], nodes)  # not UTF-8
    for pid, name in enumerate(("bigint", "deep", "binary", "big", "dev", "missing"), 62):
        fake_process(proc, pid, ["kmesh-plugin", "run", "-c", f"{name}.toml"], nodes)
    entry = fake_process(proc, 70, ["kmesh-plugin", "run", "-c", "anon.toml"], nodes)
    (entry / "environ").unlink()
    (entry / "environ").mkdir()  # unreadable environ: its NODE_NAME is unknown
    entry = fake_process(proc, 71, ["kmesh-plugin", "run", "-c", "ok.toml"], nodes)
    (entry / "cwd").unlink()  # it ended between reading its cmdline and its cwd
    (proc / "72").mkdir()  # and this one before its cmdline could be read
    (proc / "73").mkdir()
    (proc / "73" / "cmdline").write_bytes(b"")  # a kernel thread, or a zombie
    entry = fake_process(proc, 74, ["kmesh-plugin", "run", "-c", "ok.toml"], nodes)
    (entry / "cwd").unlink()
    os.symlink(f"{nodes} (deleted)", entry / "cwd")  # its working directory was removed
    fake_process(proc, 75, ["kmesh-plugin", "run", "-c", "ok.toml"], nodes / "missing")
    assert [(a.pid, a.node) for a in running_agents(proc)] == [(61, "latin1"), (60, "ok")]
    with pytest.raises(LocateError, match=r"not readable by this user: pid 70, 71\)"):
        config_for_node("bigint", proc)


def test_a_fifo_named_as_config_does_not_block_the_scan(tmp_path: Path) -> None:
    """Any user can start a process whose command line names a FIFO as its config."""
    proc = fake_proc(tmp_path)
    os.mkfifo(tmp_path / "fifo.toml")
    fake_process(proc, 80, ["kmesh-plugin", "run", "-c", "fifo.toml"], tmp_path)
    result: list[object] = []
    scan = threading.Thread(target=lambda: result.append(running_agents(proc)), daemon=True)
    scan.start()
    scan.join(timeout=30)
    if scan.is_alive():  # blocked opening the FIFO: a writer's open releases it
        os.close(os.open(tmp_path / "fifo.toml", os.O_WRONLY | os.O_NONBLOCK))
        scan.join()
        pytest.fail("the scan blocked on a FIFO")
    assert result == [[]]


def test_a_proc_that_cannot_be_listed_is_a_locate_error(tmp_path: Path) -> None:
    with pytest.raises(LocateError, match=r"cannot list the processes in .*/nope"):
        config_for_node("w", tmp_path / "nope")


# -- real processes --------------------------------------------------------------------------


AGENT_SCRIPT = ("import sys\nsys.stdout.write('up\\n'); sys.stdout.flush()\n"
                "sys.stdin.read()\n")  # up until the test closes its stdin (or kills it)


def fake_agent_script(directory: Path) -> Path:
    """An interpreter running a script named kmesh-plugin, as the console script runs."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "kmesh-plugin"
    script.write_text(AGENT_SCRIPT)
    return script


def test_a_real_process(tmp_path: Path) -> None:
    config = tmp_path / "plugin.toml"
    config.write_text('[node]\nname = "locate-test-node"\n')
    script = fake_agent_script(tmp_path / "bin")
    proc = subprocess.Popen([sys.executable, str(script), "run", "--config", "plugin.toml"],
                            cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        assert config_for_node("locate-test-node") == config
    finally:
        proc.kill()
        proc.wait()  # reaped: its /proc entry is gone
    with pytest.raises(LocateError, match="no kmesh-plugin agent for node 'locate-test-node'"):
        config_for_node("locate-test-node")


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_an_agent_in_another_mount_namespace(tmp_path: Path, relative: bool) -> None:
    """A real agent in its own mount namespace with a private tmpfs over its config's
    directory: the host has another file at that path. readlink of its /proc/PID/root is "/",
    as for a container, yet its config is the one in its namespace."""
    if os.geteuid() != 0:
        missing("needs root (a mount namespace)")
    if shutil.which("unshare") is None:
        missing("unshare (util-linux) is not installed")
    token = secrets.token_hex(4)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "plugin.toml").write_text(f'[node]\nname = "kmesh-test-host-{token}"\n')
    node = f"kmesh-test-ns-{token}"
    script = fake_agent_script(tmp_path / "bin")
    arg = "plugin.toml" if relative else str(etc / "plugin.toml")
    # The tmpfs is private to the new namespace and goes with it when the process ends.
    shell = ('mount -t tmpfs kmesh-test "$1" && printf "[node]\\nname = \\"%s\\"\\n" "$2" '
             '> "$1/plugin.toml" && cd "$1" && exec "$3" "$4" run --config "$5"')
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", shell, "sh",
         str(etc), node, sys.executable, str(script), arg],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        assert os.readlink(f"/proc/{proc.pid}/root") == "/"  # what misled the old check
        found = config_for_node(node)
        assert found.read_text() == f'[node]\nname = "{node}"\n'
        assert [a.pid for a in running_agents() if a.node == node] == [proc.pid]
        assert not any(a.pid == proc.pid for a in running_agents() if a.node != node)
    finally:
        proc.kill()
        proc.wait()
    assert (etc / "plugin.toml").read_text() == f'[node]\nname = "kmesh-test-host-{token}"\n'
