"""The wheels, installed into a fresh venv outside the checkout, run the agent.

Builds the three wheels (kmesh-plugin and the two strategy plugins), checks what they carry
(the BPF source and header; no test harness), installs them into a new virtual environment in
a temporary directory, and from a directory outside the checkout runs ``check-config``,
``datapath build`` and an agent against the in-test API server, then reads the kernel maps.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import missing  # the shared skip-or-fail rule (KMESH_REQUIRE_BPF)
from kmesh_lab.apiserver import ApiServer
from kmesh_plugin.datapath import records
from kmesh_plugin.datapath.loader import Datapath
from kmesh_plugin.datapath.records import Frontend
from kmesh_plugin.sources.inotify import Inotify

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
PROJECTS = [REPO, REPO / "hooks" / "local", REPO / "hooks" / "prefer_close"]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("wheels")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
         *map(str, PROJECTS)],
        capture_output=True, text=True, timeout=600,
    )
    if build.returncode != 0:
        missing(f"pip wheel failed (needs the setuptools build backend from PyPI): "
                f"{build.stderr[-2000:]}")
    return sorted(out.glob("*.whl"))


@pytest.fixture(scope="module")
def venv(wheels: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
    install = subprocess.run([str(root / "bin" / "pip"), "install", "-q", *map(str, wheels)],
                             capture_output=True, text=True, timeout=900)
    if install.returncode != 0:
        missing(f"pip install of the wheels failed (needs PyPI for the dependencies): "
                f"{install.stderr[-2000:]}")
    return root


def test_the_wheels_carry_the_kernel_side_and_no_test_harness(wheels: list[Path]) -> None:
    assert sorted(w.name.split("-")[0] for w in wheels) == [
        "kmesh_plugin", "kmesh_strategy_local", "kmesh_strategy_prefer_close"]
    (core,) = (w for w in wheels if w.name.startswith("kmesh_plugin-"))
    names = zipfile.ZipFile(core).namelist()
    assert {n.split("/")[0] for n in names if not n.startswith("kmesh_plugin-")} == {
        "kmesh_plugin"}, "the wheel installs only the kmesh_plugin package"
    data = {n.rsplit("/", 1)[1] for n in names if "/data/share/kmesh-plugin/bpf/" in n}
    assert data == {"kmesh_lb.c", "kmesh_lb.h"}
    for wheel in wheels:
        top = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
        assert not top & {"integration", "kmesh_lab", "tests"}, (wheel.name, top)


def run(venv: Path, *args: str, cwd: Path,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / "kmesh-plugin"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working directory that is not the checkout (nothing importable from it)."""
    assert REPO not in tmp_path.parents
    return tmp_path


@pytest.fixture
def server() -> Iterator[ApiServer]:
    with ApiServer(token="kmesh-test-wheel", tls=True) as s:
        yield s


def test_the_installed_agent_follows_the_api_server(
    venv: Path, outside: Path, server: ApiServer, pin_dir: Path, cgroup: Path
) -> None:
    python = venv / "bin" / "python"
    probe = subprocess.run(
        [str(python), "-c", "import kmesh_plugin, sys; print(kmesh_plugin.__file__); "
         "import importlib.util as u; print(u.find_spec('integration'), u.find_spec('kmesh_lab'))"],
        cwd=outside, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )
    assert probe.returncode == 0, probe.stderr
    where, harness = probe.stdout.splitlines()
    assert str(venv) in where and harness == "None None"

    kubeconfig = server.write_kubeconfig(outside / "kubeconfig")
    server.create({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": "wheel-node",
                                "labels": {"topology.kubernetes.io/zone": "z1"}}})
    server.create({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "web", "namespace": "default"},
                   "spec": {"clusterIP": "198.19.3.1", "clusterIPs": ["198.19.3.1"],
                            "trafficDistribution": "PreferClose",
                            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
    server.create({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": "web-1", "namespace": "default",
                                "labels": {"kubernetes.io/service-name": "web"}},
                   "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                   "endpoints": [{"addresses": ["198.18.3.1"], "nodeName": "wheel-node"}]})
    status = outside / "status.json"
    config = outside / "plugin.toml"
    config.write_text("\n".join([
        "[node]", 'name = "wheel-node"',
        "[datapath]", f'cgroup = "{cgroup}"', f'pin_dir = "{pin_dir}"',
        f'build_dir = "{outside / "build"}"', "max_services = 64", "max_endpoints = 1024",
        "[source]", 'kind = "kubernetes"', f'kubeconfig = "{kubeconfig}"',
        "[agent]", f'status_file = "{status}"', "metrics = false",
    ]) + "\n")

    check = run(venv, "check-config", "-c", str(config), cwd=outside)
    assert check.returncode == 0, check.stderr
    assert "source kubernetes, plugins local, prefer_close" in check.stdout
    build = run(venv, "datapath", "build", "-c", str(config), cwd=outside)
    assert build.returncode == 0, build.stderr
    obj = Path(build.stdout.strip())
    assert obj.parent == outside / "build" and obj.stat().st_size > 0

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    agent = subprocess.Popen([str(venv / "bin" / "kmesh-plugin"), "run", "-c", str(config)],
                             cwd=outside, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        with Inotify() as watch:
            watch.watch(outside)
            while True:
                try:
                    st = json.loads(status.read_text())
                except (FileNotFoundError, json.JSONDecodeError):
                    st = {}
                if st.get("synced") and st.get("datapath", {}).get("groups") == 1:
                    break
                assert agent.poll() is None, agent.communicate()[0]
                assert time.monotonic() < deadline, st
                watch.wait(1.0)
        assert st["source"]["kind"] == "kubernetes" and st["plugins"] == ["local", "prefer_close"]
        dp = Datapath.open(pin_dir)
        try:
            raw = dp[records.MAP_FRONTENDS].lookup(
                Frontend(ipaddress.ip_address("198.19.3.1"), 80).pack())
            assert raw is not None, "the installed agent programmed the Service's frontend"
        finally:
            dp.close()
        healthy = run(venv, "status", "--ready", "-c", str(config), cwd=outside)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    finally:
        agent.terminate()
        out, _ = agent.communicate(timeout=60)
    assert agent.returncode == 0, out
