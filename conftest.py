"""Fixtures shared by the kernel tests (tests/kernel) and the lab tests (integration/tests).

Tests that need root, bpffs, cgroup v2 and a BPF-capable kernel use the ``kernel`` fixture:
it skips them where that is missing, unless KMESH_REQUIRE_BPF=1 (CI on the kernel machines),
where a missing prerequisite fails the test instead. Every resource a fixture creates carries
the prefix "kmesh-test-" and is removed in the fixture's finalizer, also when the test fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRE_BPF = os.environ.get("KMESH_REQUIRE_BPF") == "1"
PREFIX = "kmesh-test-"


def missing(reason: str) -> None:
    """Skip for a missing prerequisite, or fail when KMESH_REQUIRE_BPF=1 demands it."""
    if REQUIRE_BPF:
        pytest.fail(f"KMESH_REQUIRE_BPF=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _kernel_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("clang", "bpftool", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        from kmesh_plugin.datapath import syscall

        syscall.Map.create(syscall.BPF_MAP_TYPE_ARRAY, 4, 4, 1).close()
    except OSError as e:
        return f"bpf(2) unavailable: {e}"
    from kmesh_plugin.datapath.mounts import cgroup2_root
    from kmesh_plugin.errors import DatapathError

    try:
        cgroup2_root()
    except DatapathError as e:
        return str(e)
    return None


@pytest.fixture(scope="session")
def kernel() -> None:
    reason = _kernel_unavailable()
    if reason:
        missing(reason)
    from kmesh_plugin.datapath.mounts import BPFFS_DEFAULT, ensure_bpffs

    ensure_bpffs(BPFFS_DEFAULT)


@pytest.fixture(scope="session")
def cni_plugins() -> None:
    """Root and Debian's CNI plugins (containernetworking-plugins) for the lab's pods."""
    if os.geteuid() != 0:
        missing("needs root")
    for plugin in ("bridge", "host-local"):
        if not os.access(f"/usr/lib/cni/{plugin}", os.X_OK):
            missing(f"CNI plugin {plugin} is not installed (containernetworking-plugins)")
    if shutil.which("ip") is None:
        missing("iproute2 (ip) is not installed")


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One object cache per session: the datapath compiles once."""
    return tmp_path_factory.mktemp("bpf-build")


@pytest.fixture
def pin_dir(kernel: None) -> Iterator[Path]:
    """A fresh /sys/fs/bpf/kmesh-test-<random>; its links are detached and pins removed."""
    from kmesh_plugin.datapath import loader

    path = Path("/sys/fs/bpf") / f"{PREFIX}{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        loader.remove(path)
    assert not path.exists()


@pytest.fixture
def cgroup(kernel: None) -> Iterator[Path]:
    """A fresh cgroup v2 directory kmesh-test-<random>; its processes are killed at the end."""
    from kmesh_lab import procs
    from kmesh_plugin.datapath.mounts import cgroup2_root

    path = cgroup2_root() / f"{PREFIX}{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        procs.remove_cgroup_tree(str(path))
    assert not path.exists()


@pytest.fixture
def netns(kernel: None) -> Iterator[str]:
    """A fresh network namespace kmesh-test-<random> with lo up; no default route."""
    name = f"{PREFIX}{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert not Path("/var/run/netns", name).exists()
