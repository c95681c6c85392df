"""Hostile and broken input: it is refused with the culprit named, and the agent lives on.

Part (a) is the review's concrete cases, each through the surface that met it (the manifest
source, the object parser, plugin.toml and check-config). Part (b) fuzzes the same surfaces with
hypothesis: whatever the input, only our error types come out, and each names the file, the
object and the field. The default profile ("ci") keeps the file to a few seconds;
HYPOTHESIS_PROFILE=fuzz runs at least 10,000 inputs per surface.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from kmesh_plugin import cli
from kmesh_plugin import config as config_mod
from kmesh_plugin.agent.agent import Agent
from kmesh_plugin.agent.state import ClusterState
from kmesh_plugin.agent.status import StatusFile
from kmesh_plugin.datapath.build import Capacities
from kmesh_plugin.datapath.records import BackendSet, Frontend
from kmesh_plugin.datapath.writer import PublishStats
from kmesh_plugin.errors import ConfigError, ManifestError
from kmesh_plugin.hookspecs import StrategySettings
from kmesh_plugin.model import LocalityLabels, Scope
from kmesh_plugin.model.objects import KubeObject, ObjectKey, object_key, parse
from kmesh_plugin.plugins import Plugins
from kmesh_plugin.sources import decode
from kmesh_plugin.sources.base import Batch
from kmesh_plugin.sources.inotify import Inotify
from kmesh_plugin.sources.manifests import ManifestSource

# -- hypothesis profiles --------------------------------------------------------------------

_COMMON: dict[str, Any] = {
    "deadline": None,  # a shared 2-vCPU VM: wall-clock deadlines would only add flakes
    "database": None,  # leave no .hypothesis/ directory in the checkout
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                              HealthCheck.filter_too_much],
}
settings.register_profile("ci", max_examples=40, **_COMMON)
settings.register_profile("fuzz", max_examples=10_000, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Long enough never to be waited out by a passing test on a loaded machine, short enough that
# a regression (a hang) fails instead of blocking CI.
DEADLINE = 20.0
MB = 1 << 20

# -- helpers --------------------------------------------------------------------------------


@contextmanager
def deadline(seconds: float = DEADLINE) -> Iterator[None]:
    """Fail, instead of hanging, if the block takes longer than ``seconds``. SIGALRM interrupts
    a blocking open() or read() (the FIFO case) as well as Python code."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def node(name: str, **labels: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def service(name: str = "hw", ip: str = "198.19.0.10", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "sample"},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}], **spec}}


def endpoint_slice(svc: str = "hw", address: str = "198.18.1.1") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc}-1", "namespace": "sample",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [address], "nodeName": "w1",
                           "conditions": {"ready": True}}]}


NODE1 = ObjectKey("Node", "", "w1")
FIVE_THOUSAND_DIGITS = "1" * 5000


def alias_bomb(levels: int = 9) -> str:
    """The classic: nine anchors, each a list of nine aliases of the previous: 9^9 leaves."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    path = tmp_path / "manifests"
    path.mkdir()
    return path


@pytest.fixture
def source(directory: Path) -> Iterator[ManifestSource]:
    src = ManifestSource(directory)
    src.start()
    try:
        yield src
    finally:
        src.close()


def started(source: ManifestSource, directory: Path) -> None:
    """A first batch with one good object, so that every later case has a last good state."""
    (directory / "good.yaml").write_text(yaml.safe_dump(node("w1", zone="z1")))
    with deadline():
        batch = source.next_batch(0)
    assert batch is not None and batch.errors == [] and len(batch.events) == 1


def next_change(source: ManifestSource) -> Batch:
    with deadline():
        batch = source.next_batch(DEADLINE)
    assert batch is not None, "no batch after a change"
    return batch


def only_error(batch: Batch, path: Path) -> str:
    assert batch.events == [], "a rejected file changed the view"
    assert len(batch.errors) == 1, batch.errors
    message = batch.errors[0]
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message and len(message) < 500
    return message


# == (a) the concrete cases ================================================================
# -- the manifest source ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        # json.loads raised ValueError (Python's 4300-digit limit), not caught: the agent died.
        ("big-int.json", '{"kind": "Node", "metadata": {"name": "w9", "labels": {"a": '
         + FIVE_THOUSAND_DIGITS + "}}}", "metadata.labels.a: integer of 5000 digits"),
        # yaml's int constructor raised the same ValueError (not a YAMLError).
        ("big-int.yaml", "kind: Node\nmetadata: {name: w9, labels: {a: "
         + FIVE_THOUSAND_DIGITS + "}}\n", "metadata.labels.a: integer of 5000 digits"),
        ("big-port.yaml", yaml.safe_dump(service(ports=[{"port": 2**64}])),
         "spec.ports[0].port: integer of 65 bits"),
        # RecursionError from the JSON decoder, not caught.
        ("deep.json", nested_json(2000), "invalid JSON: maximum recursion depth"),
        # Within the decoder's limits, beyond ours: refused with the path.
        ("deep-100.json", '{"kind": "Node", "metadata": {"name": "w9", "labels": '
         + nested_json(100) + "}}", "metadata.labels[0][0]"),
        ("deep.yaml", nested_json(2000), "invalid YAML"),
        ("not-utf8.yaml", b"kind: Node\nmetadata: {name: \xff\xfe}\n", "not UTF-8"),
        ("not-utf8.json", b'{"kind": "Node", "metadata": {"name": "\xc3\x28"}}', "not UTF-8"),
    ],
)
def test_a_hostile_file_is_reported_and_the_agent_source_lives_on(
    directory: Path, source: ManifestSource, name: str, content: str | bytes, fragment: str
) -> None:
    started(source, directory)
    path = directory / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    message = only_error(next_change(source), path)
    assert fragment in message, message
    assert source.describe()["errors"] == {name: message}
    assert source.describe()["objects"] == 1


def test_the_alias_bomb_is_refused_in_linear_time_and_memory(
    directory: Path, source: ManifestSource
) -> None:
    # 324 bytes; expanded, 387 million strings (str() of it took 865 MB and minutes).
    started(source, directory)
    bomb = alias_bomb(9)
    assert len(bomb) < 500
    text = "kind: Node\nmetadata:\n  name: w9\n  labels:\n" + "".join(
        f"    {line}\n" for line in bomb.splitlines())
    before = peak_rss_mb()
    start = time.monotonic()
    (directory / "bomb.yaml").write_text(text)
    message = only_error(next_change(source), directory / "bomb.yaml")
    assert "aliases expand to more than" in message
    assert time.monotonic() - start < 2.0
    assert peak_rss_mb() - before < 50


def test_a_bomb_within_the_first_object_of_a_file_is_refused_at_decode() -> None:
    with pytest.raises(decode.DecodeError, match=r"^b\.yaml: line \d+: aliases expand"):
        decode.load_yaml_documents(alias_bomb(9).encode(), "b.yaml", max_bytes=MB)


def test_small_aliases_are_fine() -> None:
    text = b"base: &labels {app: hw, tier: web}\nmore: *labels\nlist: [*labels, *labels]\n"
    docs = decode.load_yaml_documents(text, "a.yaml", max_bytes=MB)
    assert docs == [{"base": {"app": "hw", "tier": "web"}, "more": {"app": "hw", "tier": "web"},
                     "list": [{"app": "hw", "tier": "web"}] * 2}]


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "a: &a {b: *a}\n", "- &a [x, [y, *a]]\n"])
def test_a_recursive_alias_is_refused(text: str) -> None:
    with pytest.raises(decode.DecodeError, match=r"^r\.yaml: line \d+: recursive alias \*a"):
        decode.load_yaml_documents(text.encode(), "r.yaml", max_bytes=MB)


def test_a_recursive_alias_in_a_manifest_is_refused(
    directory: Path, source: ManifestSource
) -> None:
    # Kept raw as spec.trafficDistribution, a self-containing list made the next comparison
    # of the Service (any later change to the file) raise RecursionError out of the source.
    started(source, directory)
    path = directory / "rec.yaml"
    text = yaml.safe_dump(service()).replace("spec:\n", "spec:\n  trafficDistribution: &a [*a]\n")
    path.write_text(text)
    message = only_error(next_change(source), path)
    assert "recursive alias *a" in message
    path.write_text(text + "# changed\n")
    only_error(next_change(source), path)


def test_a_fifo_named_like_a_manifest_never_blocks(
    directory: Path, source: ManifestSource
) -> None:
    # open() of a FIFO blocks until a writer comes: it hung the agent's loop for good.
    started(source, directory)
    fifo = directory / "x.yaml"
    os.mkfifo(fifo)
    message = only_error(next_change(source), fifo)
    assert message == f"{fifo}: is a FIFO, not a regular file"
    # A full scan (a restarted agent) reports it too, without blocking.
    again = ManifestSource(directory)
    again.start()
    try:
        with deadline():
            batch = again.next_batch(0)
    finally:
        again.close()
    assert batch is not None and batch.errors == [message]
    assert set(e.key for e in batch.events) == {NODE1}


def test_a_directory_named_like_a_manifest_is_reported_by_the_full_scan(
    directory: Path,
) -> None:
    (directory / "good.yaml").write_text(yaml.safe_dump(node("w1")))
    (directory / "d.yaml").mkdir()
    src = ManifestSource(directory)
    src.start()
    try:
        with deadline():
            batch = src.next_batch(0)
    finally:
        src.close()
    assert batch is not None
    assert batch.errors == [f"{directory / 'd.yaml'}: is a directory, not a regular file"]
    assert [e.key for e in batch.events] == [NODE1]


def test_a_50_mb_file_is_refused_by_its_size_before_it_is_read(
    directory: Path, source: ManifestSource
) -> None:
    started(source, directory)
    big = directory / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(50 * MB)  # sparse: no disk space, 50 MB to whoever reads it
    asked: list[int] = []
    real_read = os.read

    def read(fd: int, n: int) -> bytes:
        asked.append(n)
        return real_read(fd, n)

    with mock.patch.object(decode.os, "read", read):
        message = only_error(next_change(source), big)
    assert message == f"{big}: {50 * MB} bytes is more than the limit of {16 * MB} bytes"
    assert max(asked, default=0) <= 65536  # inotify's reads only: not a byte of the file


@pytest.mark.parametrize("case", ["good-then-bomb", "good-then-fifo", "good-then-big"])
def test_a_good_file_turned_hostile_keeps_its_last_good_content(
    directory: Path, source: ManifestSource, case: str
) -> None:
    started(source, directory)
    path = directory / "good.yaml"
    path.unlink()
    if case == "good-then-bomb":
        path.write_text(alias_bomb(9))
    elif case == "good-then-fifo":
        os.mkfifo(path)
    else:
        with open(path, "wb") as f:
            f.truncate(50 * MB)
    batch = next_change(source)
    assert batch.events == []  # no deletion of w1: its last good content stays
    assert len(batch.errors) == 1 and batch.errors[0].startswith(f"{path}: ")
    assert source.describe()["objects"] == 1


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: p.write_bytes(b"\xff\xfe7\n"), "not UTF-8"),
        (lambda p: os.mkfifo(p), "is a FIFO, not a regular file"),
        (lambda p: p.mkdir(), "is a directory, not a regular file"),
        (lambda p: p.write_text("7" * 5000), "more than the limit of 4096 bytes"),
    ],
    ids=["not-utf8", "fifo", "directory", "too-large"],
)
def test_a_broken_revision_is_reported_and_ignored(
    directory: Path, source: ManifestSource, make: Any, fragment: str
) -> None:
    # A non-UTF-8 .revision raised UnicodeDecodeError out of every scan: the agent died, and
    # died again on every restart.
    revision = directory / ".revision"
    revision.write_text("6\n")
    started(source, directory)
    assert source.revision == "6"
    revision.unlink()
    make(revision)
    (directory / "good.yaml").write_text(yaml.safe_dump(node("w1", zone="z2")))
    batch = next_change(source)
    assert batch.revision == "6"  # the last good one: the manifests are at least that new
    assert [e.key for e in batch.events] == [NODE1]  # the manifests still apply
    assert len(batch.errors) == 1
    assert batch.errors[0].startswith(f"{revision}: ") and fragment in batch.errors[0]
    assert source.describe()["errors"] == {".revision": batch.errors[0]}
    # Fixed: the error goes, the new revision is reported.
    if revision.is_dir():
        revision.rmdir()
    else:
        revision.unlink()
    staging = directory.parent / "rev"
    staging.write_text("8\n")
    os.replace(staging, revision)
    batch = next_change(source)
    assert batch.revision == "8" and batch.errors == []
    assert source.describe()["errors"] == {}


def test_read_regular_file_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "s.yaml"))
        with pytest.raises(decode.DecodeError, match="is a socket, not a regular file"):
            decode.read_regular_file(tmp_path / "s.yaml", max_bytes=MB)
    finally:
        sock.close()
    with pytest.raises(decode.DecodeError, match="is a character device"):
        decode.read_regular_file("/dev/zero", max_bytes=MB)
    with pytest.raises(decode.MissingFile):
        decode.read_regular_file(tmp_path / "absent", max_bytes=MB)
    (tmp_path / "exact").write_bytes(b"x" * 100)
    assert decode.read_regular_file(tmp_path / "exact", max_bytes=100) == b"x" * 100
    with pytest.raises(decode.DecodeError, match="101 bytes is more than the limit of 100"):
        (tmp_path / "exact").write_bytes(b"x" * 101)
        decode.read_regular_file(tmp_path / "exact", max_bytes=100)


# -- plugin.toml and check-config -------------------------------------------------------------


def check_config(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    with deadline():
        code = cli.main(["check-config", "--config", str(path)])
    out = capsys.readouterr()
    assert code == 2, out
    assert out.out == ""
    lines = out.err.splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith(f"kmesh-plugin: {path}: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: p.write_bytes(b"[node]\nname = \"\xff\"\n"), "not UTF-8"),
        (lambda p: p.mkdir(), "is a directory, not a regular file"),
        (lambda p: os.mkfifo(p), "is a FIFO, not a regular file"),
        (lambda p: p.write_text("a = " + "[" * 10_000 + "]" * 10_000 + "\n"), "invalid TOML"),
        (lambda p: p.write_text(f"[datapath]\nmax_services = {FIVE_THOUSAND_DIGITS}\n"),
         "invalid TOML"),
        (lambda p: p.write_text("x" * (2 * MB)), "more than the limit"),
    ],
    ids=["not-utf8", "directory", "fifo", "deep-array", "5000-digits", "too-large"],
)
def test_check_config_on_a_broken_file_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, fragment: str
) -> None:
    path = tmp_path / "plugin.toml"
    make(path)
    assert fragment in check_config(path, capsys)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [(0, "must be > 0"), (2**31, "at most 1048576"), (2**32, "at most 1048576"),
     (-1, "must be > 0")],
)
def test_check_config_refuses_capacities_no_map_can_have(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: int, fragment: str
) -> None:
    manifests = tmp_path / "m"
    manifests.mkdir()
    path = tmp_path / "plugin.toml"
    path.write_text(f'[datapath]\nmax_services = {value}\n[source]\npath = "{manifests}"\n')
    with mock.patch.object(config_mod, "cgroup2_root", lambda: Path("/fake")):
        line = check_config(path, capsys)
    assert "datapath.max_services" in line and fragment in line


@pytest.mark.parametrize("value", [0, 2**31, 2**32])
def test_max_endpoints_is_bounded_too(tmp_path: Path, value: int) -> None:
    path = tmp_path / "plugin.toml"
    path.write_text(f"[datapath]\nmax_endpoints = {value}\n")
    with pytest.raises(ConfigError) as info:
        config_mod._validate(path, config_mod.tomllib.loads(path.read_text()))
    assert info.value.key == "datapath.max_endpoints"


def test_check_config_executable_prints_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "plugin.toml"
    path.write_text("a = " + "[" * 10_000 + "]" * 10_000 + "\n")
    exe = Path(sys.executable).parent / "kmesh-plugin"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "kmesh_plugin.cli"]
    proc = subprocess.run([*argv, "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and str(path) in proc.stderr


# -- the agent --------------------------------------------------------------------------------


class RecordingWriter:
    """The map writer's contract, on a dict (as tests/unit/test_agent.py does)."""

    def __init__(self) -> None:
        self.published: dict[Frontend, BackendSet] = {}

    def recover(self) -> int:
        return 0

    def publish(self, changes: Mapping[Frontend, BackendSet | None]) -> PublishStats:
        stats = PublishStats()
        for frontend, backends in changes.items():
            if backends is None:
                self.published.pop(frontend, None)
            else:
                self.published[frontend] = backends
        return stats

    def sync(self, desired: Mapping[Frontend, BackendSet]) -> PublishStats:
        changes: dict[Frontend, BackendSet | None] = dict(desired)
        changes.update({f: None for f in self.published if f not in desired})
        return self.publish(changes)

    def slots_in_use(self) -> int:
        return sum(b.size for b in self.published.values())

    def slots_retired(self) -> int:
        return 0

    def collect(self) -> int:
        return 0

    def settle(self) -> None:
        pass

    def close(self) -> None:
        pass


def wait_status(status: StatusFile, thread: threading.Thread, until: Any) -> dict[str, Any]:
    """The agent's status once ``until(status)`` holds: woken by the file's rename (inotify)."""
    end = time.monotonic() + DEADLINE
    with Inotify() as watch:
        watch.watch(status.path.parent)
        while True:
            try:
                current = status.read()
            except (FileNotFoundError, json.JSONDecodeError):
                current = None
            if current is not None and until(current):
                return current
            assert thread.is_alive(), "the agent's loop died"
            assert time.monotonic() < end, f"status never got there: {current}"
            watch.wait(end - time.monotonic())


def test_the_agent_keeps_running_and_its_last_good_state(tmp_path: Path) -> None:
    directory = tmp_path / "manifests"
    directory.mkdir()
    good = directory / "good.yaml"
    good.write_text(yaml.safe_dump_all([node("w1"), service(), endpoint_slice()]))
    (directory / ".revision").write_text("1")
    writer = RecordingWriter()
    (tmp_path / "run").mkdir()
    status = StatusFile(tmp_path / "run" / "status.json")
    agent = Agent(
        node_name="w1",
        state=ClusterState(LocalityLabels(), "w1"),
        plugins=Plugins.load(["local", "prefer_close"]),
        settings=StrategySettings([Scope.NETWORK, Scope.REGION, Scope.ZONE, Scope.SUBZONE]),
        source=ManifestSource(directory),
        datapath=SimpleNamespace(  # type: ignore[arg-type]
            pins=SimpleNamespace(root=Path("/sys/fs/bpf/x")), events=[],
            capacities=Capacities(16, 64)),
        cgroup="/sys/fs/cgroup/x",
        status=status,
        writer=writer,  # type: ignore[arg-type]
    )
    failures: list[BaseException] = []

    def run() -> None:
        try:
            agent.run()
        except BaseException as e:  # reported by the test, not lost in the thread
            failures.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_status(status, thread, lambda s: s["source_revision"] == "1" and s["synced"])
        published = dict(writer.published)
        assert len(published) == 1

        hostile: dict[str, bytes | None] = {
            "big-int.json": b'{"kind": "Node", "metadata": {"name": "w2", "labels": {"a": '
                            + FIVE_THOUSAND_DIGITS.encode() + b"}}}",
            "deep.json": nested_json(2000).encode(),
            "bomb.yaml": alias_bomb(9).encode(),
            "recursive.yaml": b"a: &a [*a]\n",
            "not-utf8.yaml": b"kind: Node\nmetadata: {name: \xff}\n",
            "fifo.yaml": None,
            "dir.yaml": None,
            "big.yaml": None,
        }
        for name, content in hostile.items():
            path = directory / name
            if content is not None:
                path.write_bytes(content)
            elif name == "fifo.yaml":
                os.mkfifo(path)
            elif name == "dir.yaml":
                path.mkdir()
            else:
                with open(path, "wb") as f:
                    f.truncate(50 * MB)
        # The good file turns hostile too: its last good content must stay in effect.
        good.write_text(alias_bomb(9))
        staging = tmp_path / "rev"
        staging.write_text("2")
        os.replace(staging, directory / ".revision")
        names = {*hostile, "good.yaml"}
        st_ = wait_status(status, thread, lambda s: s["source_revision"] == "2"
                          and set(s["source"]["errors"]) == names)
        for name, message in st_["source"]["errors"].items():
            assert message.startswith(f"{directory / name}: "), message
        assert st_["source"]["objects"] == 3
        assert writer.published == published

        # A .revision that is not UTF-8: reported, the last good revision stays.
        (directory / ".revision").write_bytes(b"\xff\xfe")
        st_ = wait_status(status, thread, lambda s: ".revision" in s["source"]["errors"])
        assert st_["source_revision"] == "2"
        assert st_["source"]["errors"][".revision"].startswith(f"{directory / '.revision'}: ")
        assert thread.is_alive() and writer.published == published
    finally:
        agent.stop()
        thread.join(DEADLINE)
    assert not thread.is_alive()
    assert failures == []


# == (b) properties ==========================================================================
# -- strategies ---------------------------------------------------------------------------

INTS = st.one_of(
    st.integers(-10, 70000),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1]),
    # Beyond Python's 4300-digit str() limit (built, so that no repr of the strategy prints one).
    st.integers(4301, 5000).map(lambda n: 10**n), st.integers(4301, 5000).map(lambda n: -(10**n)),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), INTS, st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["None", "TCP", "UDP", "ICMP", "IPv4", "IPv6", "FQDN", "198.19.0.10",
                     "fd00::10", "198.18.1.1", "PreferClose", "Local", "", "http", "w1"]),
)
KEYS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["kind", "metadata", "name", "namespace", "labels", "annotations", "spec",
                     "ports", "port", "protocol", "targetPort", "clusterIP", "clusterIPs",
                     "endpoints", "addresses", "conditions", "ready", "serving",
                     "terminating", "nodeName", "zone", "targetRef", "addressType", "items",
                     "trafficDistribution", "selector", "type", "publishNotReadyAddresses"]),
)
JSON_LIKE = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(KEYS, children, max_size=5)),
    max_leaves=40,
)


def deep(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


def to_json(value: Any) -> str:
    """JSON text of a JSON-like value of any depth, integers of any size included (json.dumps
    can print neither: it recurses, and str() of a 5000-digit int raises). Keys that are not
    strings are printed as distinct strings, so that the text holds every value."""
    out: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if type(item) is _Text:
            out.append(item.text)
        elif isinstance(item, dict):
            parts: list[Any] = [_Text("{")]
            for i, (k, v) in enumerate(item.items()):
                key = k if type(k) is str else f"\0key{i}"  # unique: no value is dropped
                parts += [_Text((", " if i else "") + json.dumps(key) + ": "), v]
            stack.extend(reversed([*parts, _Text("}")]))
        elif isinstance(item, list):
            parts = [_Text("[")]
            for i, v in enumerate(item):
                parts += [_Text(", ")] if i else []
                parts.append(v)
            stack.extend(reversed([*parts, _Text("]")]))
        elif type(item) is int:
            if abs(item) < 10**4000:
                out.append(str(item))
            else:  # about as many digits as it has
                out.append(("-" if item < 0 else "") + "9" * (item.bit_length() * 3 // 10))
        elif isinstance(item, float) and not math.isfinite(item):
            out.append("1e999" if item > 0 else "-1e999")
        else:
            out.append(json.dumps(item))
    return "".join(out)


class _Text:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def wrapped(value: Any, depth: int) -> str:
    return "[" * depth + to_json(value) + "]" * depth


ANY_VALUE = st.one_of(
    JSON_LIKE,
    st.builds(deep, JSON_LIKE, st.integers(60, 1500)),
    st.dictionaries(st.one_of(st.integers(), st.none(), st.booleans()), SCALARS, max_size=3),
)


@st.composite
def near_objects(draw: st.DrawFn) -> Any:
    """Mostly well-formed Kubernetes objects with any field replaced by anything, so the
    fuzzer reaches the parser's inner fields instead of failing at kind or name."""
    kind = draw(st.sampled_from(["Node", "Namespace", "Service", "EndpointSlice", "Pod"]))
    obj: dict[str, Any] = {
        "Node": node("w1", zone="z1"),
        "Namespace": {"kind": "Namespace", "metadata": {"name": "sample",
                                                       "annotations": {"a": "b"}}},
        "Service": service(),
        "EndpointSlice": endpoint_slice(),
        "Pod": {"kind": "Pod", "metadata": {"name": "p", "namespace": "sample"}},
    }[kind]
    for _ in range(draw(st.integers(0, 3))):
        # Walk to a random container in the object and set a random key of it.
        target: Any = obj
        for _ in range(draw(st.integers(0, 3))):
            if isinstance(target, dict) and target:
                child = target[draw(st.sampled_from(list(target)))]
            elif isinstance(target, list) and target:
                child = target[draw(st.integers(0, len(target) - 1))]
            else:
                break
            if not isinstance(child, dict | list):
                break
            target = child
        value = draw(st.one_of(SCALARS, ANY_VALUE))
        if isinstance(target, dict):
            key = draw(st.one_of(st.sampled_from(list(target) or ["x"]), KEYS))
            target[key] = value
        elif isinstance(target, list):
            target.append(value)
    return obj


def check_manifest_error(message: str, where: str, obj: Any) -> None:
    """A rejection names the file, the object when it has a key, and the field."""
    assert message.startswith(f"{where}: "), message
    assert "\n" not in message and len(message) < 1000, message
    try:
        key = object_key(obj)
    except ManifestError:
        return  # it has no usable kind or name: the message says which (checked above)
    rest = message[len(f"{where}: "):]
    assert rest.startswith(f"{key}: "), message
    field = rest[len(f"{key}: "):]
    assert re.match(r"(metadata|spec|addressType|ports|endpoints|kind)\b", field), message


def check_parsed(result: KubeObject, obj: Any) -> None:
    """What a successful parse returns is safe to compare, hash-key and show."""
    assert result == parse(obj, "/m/x.yaml")
    repr(result)
    for text in getattr(result, "labels", {}).items():
        assert all(type(t) is str for t in text)
    for e in getattr(result, "endpoints", ()):
        assert e.node_name is None or type(e.node_name) is str
        assert all(type(a) is str for a in e.addresses)
        hash(e.node_name)


# -- surface 1: the object parser, on any JSON-like value --------------------------------------


@PROFILE
@given(st.one_of(near_objects(), near_objects(), ANY_VALUE))
@example({"kind": "Node", "metadata": {"name": 10**5000}})
@example({"kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": [{"port": 10**5000}]}})
def test_parse_any_json_like_value(obj: Any) -> None:
    try:
        result = parse(obj, "/m/x.yaml")
    except ManifestError as e:
        check_manifest_error(str(e), "/m/x.yaml", obj)
        event("refused")
    else:
        check_parsed(result, obj)
        event(f"parsed a {type(result).__name__}")


# -- surface 2: bytes, through decode and the parser (the manifest source's path) -------------


GOOD_TEXTS = [
    yaml.safe_dump_all([node("w1", zone="z1"), service(), endpoint_slice()]),
    json.dumps({"kind": "List", "items": [service(), endpoint_slice()]}),
    "base: &l {app: hw}\n---\n" + yaml.safe_dump(node("w2", app="x")),
    alias_bomb(3),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A good manifest with a few bytes changed, inserted or removed."""
    data = bytearray(draw(st.sampled_from(GOOD_TEXTS)).encode())
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["set", "insert", "delete", "splice"]))
        if op == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.sampled_from(
                [b"&a ", b"*a", b"[", b"]", b"{", b"}", b"\xff", b"\x00", b"---\n", b": ",
                 b"!!set ", b"!!binary ", FIVE_THOUSAND_DIGITS.encode(), b"<<: *a\n"]))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        else:
            data[at:at] = draw(st.binary(max_size=16))
    return bytes(data)


DEPTHS = st.one_of(st.just(0), st.integers(1, 1500))
FILE_BYTES = st.one_of(
    mutated(),
    st.binary(max_size=200),
    st.builds(lambda v, n: wrapped(v, n).encode(), st.one_of(near_objects(), JSON_LIKE), DEPTHS),
)


@PROFILE
@given(FILE_BYTES, st.sampled_from(["x.yaml", "x.json"]))
@example(b"[" * 2000, "x.json")
@example(alias_bomb(9).encode(), "x.yaml")
@example(b"a: &a [*a]\n", "x.yaml")
@example(b"\xff", "x.yaml")
def test_decode_and_parse_any_bytes(data: bytes, name: str) -> None:
    src = ManifestSource(Path("/m"))
    where = f"/m/{name}"
    try:
        objects = src._parse_file(Path(where), data)
    except ManifestError as e:
        message = str(e)
        assert message.startswith(f"{where}: "), message
        assert "\n" not in message and len(message) < 1000, message
        event("refused: " + message[len(where) + 2:].split(":")[0][:30])
    else:
        for obj in objects.values():
            repr(obj)
        event(f"accepted, {min(len(objects), 3)}+ objects")


@PROFILE
@given(st.one_of(JSON_LIKE, near_objects()), DEPTHS)
@example(10**5000, 0)
@example([2**63], 0)
@example([], 63)
@example([], 64)
def test_load_json_accepts_exactly_what_is_in_bounds(value: Any, depth: int) -> None:
    # An independent statement of the bounds: depth, int64, string keys; nothing else refused.
    def in_bounds(v: Any, level: int) -> bool:
        if isinstance(v, dict | list):
            if level >= decode.MAX_DEPTH:
                return False
            children = v.values() if isinstance(v, dict) else v
            return all(in_bounds(c, level + 1) for c in children)
        if type(v) is int:
            return decode.INT_MIN <= v <= decode.INT_MAX
        return True

    if isinstance(value, dict) and not all(type(k) is str for k in value):
        return  # printed with string keys: a different document
    expected = in_bounds(value, depth) and (depth == 0 or depth < decode.MAX_DEPTH)
    text = wrapped(value, depth).encode()
    try:
        got = decode.load_json(text, "v.json", max_bytes=64 * MB)
    except decode.DecodeError as e:
        assert not expected, f"refused a value within the bounds: {e}"
        assert str(e).startswith("v.json: ")
        event("refused")
    else:
        assert expected, "accepted a value outside the bounds"
        event("accepted")
        for _ in range(depth):
            assert isinstance(got, list) and len(got) == 1
            got = got[0]
        assert got == json.loads(to_json(value))  # floats as JSON prints them


# -- surface 3: plugin.toml ------------------------------------------------------------------

TOML_VALUES = st.one_of(
    st.sampled_from(["0", "-1", "16384", "1048576", "1048577", str(2**31), str(2**32),
                     str(2**64), FIVE_THOUSAND_DIGITS, "true", "1.5", "inf", "nan",
                     "'/abs/path'", "'relative'", '"a\\u0000b"', '"\\ud800"', "''",
                     "'kubernetes'", "'manifests'", "[]", "['local']", "[1, 'a']",
                     "[" * 50 + "]" * 50, "[" * 3000 + "]" * 3000, "{a = 1}", "1979-05-27",
                     '"""multi\nline"""', "0x7fffffff", "1_000"]),
    st.text(max_size=12).map(json.dumps),
)
TOML_LINES = st.one_of(
    st.builds(lambda s: f"[{s}]", st.sampled_from(
        [*config_mod.SCHEMA, "nodes", "a.b", "source", "datapath", ""])),
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(
        [k for keys in config_mod.SCHEMA.values() for k in keys] + ["x", "a.b", '"q"']),
        TOML_VALUES),
    st.text(max_size=30),
)


@st.composite
def toml_tables(draw: st.DrawFn) -> list[str]:
    """Well-formed sections with the schema's keys and hostile values: reaches validation."""
    lines = []
    for section in draw(st.lists(st.sampled_from(sorted(config_mod.SCHEMA)), max_size=3,
                                 unique=True)):
        lines.append(f"[{section}]")
        keys = sorted(config_mod.SCHEMA[section])
        for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
            lines.append(f"{key} = {draw(TOML_VALUES)}")
    return lines


@PROFILE
@given(st.one_of(toml_tables(), st.lists(TOML_LINES, max_size=8)),
       st.one_of(st.just(b""), st.just(b""), st.just(b""), st.binary(max_size=8)))
@example(["a = " + "[" * 10_000 + "]" * 10_000], b"")
@example(["[node]", 'name = "\xff"'], b"\xff")
def test_config_load_any_toml_ish_text(
    tmp_path_factory: pytest.TempPathFactory, lines: list[str], tail: bytes
) -> None:
    base = tmp_path_factory.getbasetemp() / "toml-fuzz"
    (base / "m").mkdir(parents=True, exist_ok=True)
    path = base / "plugin.toml"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n" + tail)
    with mock.patch.object(config_mod, "cgroup2_root", lambda: Path("/fake")):
        try:
            config_mod.load(path, overrides={"source.path": str(base / "m")})
            event("accepted")
        except ConfigError as e:
            event(f"refused: {e.key or e.message.split(':')[0][:20]}")
            message = str(e)
            assert message.startswith(f"{path}: "), message
            assert "\n" not in message and len(message) < 1000, message
            if e.key is not None:
                assert message.startswith(f"{path}: {e.key}: ")
