"""`kmesh-plugin cni install | uninstall` and `kmesh-plugin uninstall`, end to end: the
installed executable on a plugin.toml whose every path is in a temporary directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmesh_plugin.datapath.mounts import cgroup2_root

EXE = Path(sys.executable).parent / "kmesh-plugin"
CLI = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "kmesh_plugin.cli"]

CONFLIST = """{
  "cniVersion": "1.0.0",
  "name": "k8s-pod-network",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}
    },
    {
      "type": "portmap",
      "capabilities": {"portMappings": true}
    }
  ]
}
"""


def node(tmp_path: Path, **cni: str) -> Path:
    """plugin.toml with the conf dir, bin dir, state dir, pins and status file in tmp_path.
    The subprocess resolves datapath.cgroup itself: give it this host's cgroup v2 root."""
    (tmp_path / "manifests").mkdir(exist_ok=True)
    (tmp_path / "net.d").mkdir(exist_ok=True)
    keys = {"conf_dir": str(tmp_path / "net.d"), "bin_dir": str(tmp_path / "bin"),
            "state_dir": str(tmp_path / "state"), **cni}
    text = "\n".join([
        "[datapath]", f"cgroup = {json.dumps(str(cgroup2_root()))}",
        f'pin_dir = "{tmp_path / "pins"}"', f'build_dir = "{tmp_path / "cache"}"',
        "[cni]", *(f"{k} = {json.dumps(v)}" for k, v in keys.items()),
        "[source]", f'path = "{tmp_path / "manifests"}"',
        "[agent]", f'status_file = "{tmp_path / "run" / "status.json"}"', "metrics = false",
    ])
    path = tmp_path / "plugin.toml"
    path.write_text(text + "\n")
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=60, check=False)


def test_install_and_uninstall(tmp_path: Path) -> None:
    config = node(tmp_path)
    conf = tmp_path / "net.d" / "10-bridge.conflist"
    conf.write_text(CONFLIST)
    conf.chmod(0o600)
    (tmp_path / "net.d" / "20-later.conflist").write_text(CONFLIST)
    launcher = tmp_path / "bin" / "kmesh-cni"

    proc = run("cni", "install", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    # The console script's interpreter (python3, say, where this test runs under python).
    python = launcher.read_text().splitlines()[0].removeprefix("#!").removesuffix(" -IS")
    assert Path(python).parent == Path(sys.executable).parent
    assert proc.stdout.splitlines() == [
        f"{conf}: chosen: the first *.conflist in {tmp_path / 'net.d'} in sorted order "
        "(cni.conflist is not set)",
        f"{launcher}: installed (runs kmesh_plugin.cni.main under {python})",
        f"{conf}: added kmesh-cni as plugin 3 of 3",
    ]
    assert proc.stderr == ""
    assert json.loads(conf.read_text())["plugins"][-1] == {
        "type": "kmesh-cni", "pinDir": str(tmp_path / "pins"), "stateDir": str(tmp_path / "state")}
    assert (conf.stat().st_mode & 0o777) == 0o600
    assert os.access(launcher, os.X_OK)
    assert (tmp_path / "net.d" / "20-later.conflist").read_text() == CONFLIST
    installed = conf.stat()

    proc = run("cni", "install", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1:] == [
        f"{launcher}: unchanged", f"{conf}: unchanged: kmesh-cni is plugin 3 of 3 with these "
        "settings"]
    assert (conf.stat().st_ino, conf.stat().st_mtime_ns) == (installed.st_ino,
                                                             installed.st_mtime_ns)

    proc = run("cni", "uninstall", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{conf}: removed kmesh-cni (plugin 3 of 3)",
                                        f"removed {launcher}"]
    assert conf.read_text() == CONFLIST and (conf.stat().st_mode & 0o777) == 0o600
    assert not launcher.exists()

    proc = run("cni", "uninstall", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("nothing to uninstall: no kmesh-cni entry in ")


def test_kmesh_plugin_uninstall_removes_the_entry(tmp_path: Path) -> None:
    config = node(tmp_path)
    conf = tmp_path / "net.d" / "10-bridge.conflist"
    conf.write_text(CONFLIST)
    assert run("cni", "install", "-c", str(config)).returncode == 0
    proc = run("uninstall", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:2] == [f"{conf}: removed kmesh-cni (plugin 3 of 3)",
                                            f"removed {tmp_path / 'bin' / 'kmesh-cni'}"]
    assert conf.read_text() == CONFLIST
    proc = run("uninstall", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "nothing to uninstall" in proc.stdout


def test_a_named_conflist_and_a_runtime_that_loads_another(tmp_path: Path) -> None:
    config = node(tmp_path, conflist="50-mine.conflist", log_file="/var/log/kmesh-cni.log")
    conf = tmp_path / "net.d" / "50-mine.conflist"
    conf.write_text(CONFLIST)
    (tmp_path / "net.d" / "10-first.conf").write_text('{"name": "x", "type": "bridge"}')
    proc = run("cni", "install", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"{conf}: chosen: cni.conflist in {config}"
    assert proc.stderr == (
        f"kmesh-plugin: warning: container runtimes load {tmp_path / 'net.d' / '10-first.conf'}"
        f" (the first *.conf, *.conflist or *.json in sorted order), not {conf}: kmesh-cni does "
        "not run until that changes\n")
    assert json.loads(conf.read_text())["plugins"][-1]["logFile"] == "/var/log/kmesh-cni.log"


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"plugins": {}}', b"\xff",
                                     b'{"name": "no plugins"}'])
def test_an_invalid_conflist_exits_2_and_is_left_untouched(tmp_path: Path, content: bytes
                                                           ) -> None:
    config = node(tmp_path)
    conf = tmp_path / "net.d" / "10-bridge.conflist"
    conf.write_bytes(content)
    before = conf.stat()
    proc = run("cni", "install", "-c", str(config))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"kmesh-plugin: {conf}: ") and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert conf.read_bytes() == content
    assert (conf.stat().st_ino, conf.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not (tmp_path / "bin").exists()


def test_no_conflist_exits_2_naming_the_directory(tmp_path: Path) -> None:
    config = node(tmp_path)
    proc = run("cni", "install", "-c", str(config))
    assert proc.returncode == 2
    assert proc.stderr == (f"kmesh-plugin: {config}: cni.conf_dir: no *.conflist file in "
                           f"{tmp_path / 'net.d'} (is the primary CNI installed? or set "
                           "cni.conflist)\n")


def test_a_failed_write_exits_1(tmp_path: Path) -> None:
    config = node(tmp_path)
    conf = tmp_path / "net.d" / "10-bridge.conflist"
    conf.write_text(CONFLIST)
    (tmp_path / "bin").write_text("a file where the bin dir should be")
    proc = run("cni", "install", "-c", str(config))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"kmesh-plugin: {tmp_path / 'bin' / 'kmesh-cni'}: cannot "
                                  "write the launcher")
    assert conf.read_text() == CONFLIST


def test_cni_without_an_action_is_a_usage_error(tmp_path: Path) -> None:
    assert run("cni").returncode == 2
