"""Least privilege for third-party code: an installed strategy plugin is imported only when
plugin.toml's ``[strategies] enabled`` names it. The plugin here is a real distribution on
sys.path (a dist-info with an entry point), found by importlib.metadata like any other."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmesh_plugin.hookspecs import ENTRY_POINT_GROUP
from kmesh_plugin.plugins import Plugins, installed_plugins

MODULE = "kmesh_test_intruder"


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[Path]:
    """A distribution that records its own import in a file."""
    marker = tmp_path / "imported"
    (tmp_path / f"{MODULE}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('yes')\n"
        "from kmesh_plugin.hookspecs import hookimpl\n"
        "@hookimpl\n"
        "def kmesh_strategy_claim(service, namespace):\n"
        "    return None\n"
    )
    info = tmp_path / "kmesh_test_intruder-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kmesh-test-intruder\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nintruder = {MODULE}\n")
    sys.path.insert(0, str(tmp_path))
    try:
        yield marker
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(MODULE, None)


def test_an_installed_plugin_is_not_imported_unless_named(installed: Path) -> None:
    assert "intruder" in installed_plugins()  # discoverable: the test would see a load
    plugins = Plugins.load(["local", "prefer_close"])
    assert MODULE not in sys.modules and not installed.exists()
    assert "intruder" not in plugins.names


def test_a_named_plugin_is_imported(installed: Path) -> None:
    plugins = Plugins.load(["intruder", "local"])
    assert installed.read_text() == "yes"
    assert "intruder" in plugins.names
