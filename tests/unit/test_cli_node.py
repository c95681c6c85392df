"""``--node NAME`` without --config: the CLI loads the config of the agent running for NAME
(found by ops.locate) as that agent resolved it, not in the CLI's own environment."""

from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from kmesh_plugin import cli
from kmesh_plugin import config as config_mod
from kmesh_plugin.errors import ConfigError

AGENT_SCRIPT = ("import sys\nsys.stdout.write('up\\n'); sys.stdout.flush()\n"
                "sys.stdin.read()\n")  # up until the test closes its stdin (or kills it)


@pytest.fixture(autouse=True)
def cgroup2_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """``datapath.cgroup = ""`` resolves to the cgroup v2 mount; make that host-independent."""
    monkeypatch.setattr(config_mod, "cgroup2_root", lambda: Path("/fake/cgroup2"))


def test_the_located_config_has_the_agents_node_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's config has no [node] name: the agent is that node by its $NODE_NAME, which
    the CLI (another environment, another node name) must not replace with its own."""
    node = f"kmesh-test-agent-{secrets.token_hex(4)}"
    (tmp_path / "manifests").mkdir()
    config = tmp_path / "plugin.toml"
    config.write_text(f'[source]\npath = "{tmp_path / "manifests"}"\n')
    script = tmp_path / "bin" / "kmesh-plugin"  # an interpreter running the console script
    script.parent.mkdir()
    script.write_text(AGENT_SCRIPT)
    monkeypatch.setenv("NODE_NAME", "kmesh-test-the-cli-side")
    proc = subprocess.Popen([sys.executable, str(script), "run", "-c", "plugin.toml"],
                            cwd=tmp_path, env={"NODE_NAME": node}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        cfg = cli._located_config(argparse.Namespace(config=None, node=node))
        assert (cfg.path, cfg.node_name) == (config, node)
        # Seat mode (explain) goes the same way without --config.
        assert cli._located_config(argparse.Namespace(config=None, node=node),
                                   seat=True).node_name == node
    finally:
        proc.kill()
        proc.wait()


def test_config_and_node_that_disagree_are_refused(tmp_path: Path) -> None:
    (tmp_path / "manifests").mkdir()
    config = tmp_path / "plugin.toml"
    config.write_text(f'[node]\nname = "w1"\n[source]\npath = "{tmp_path / "manifests"}"\n')
    with pytest.raises(ConfigError, match=r"is 'w1', not --node 'w2'"):
        cli._located_config(argparse.Namespace(config=config, node="w2"))
    assert cli._located_config(argparse.Namespace(config=config, node="w2"),
                               seat=True).node_name == "w1"
