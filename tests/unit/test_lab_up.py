"""`lab up`'s pieces that need no root: the nodes file, the write barrier of the background
controllers (against a stand-in lab whose passes the test controls), `lab up` with a fake
daemon (a stuck start, Ctrl-C, the lock), the runner checks of `lab down`, and reading the seed
document's commands."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kmesh_lab import cluster, kind, labd, seeddoc
from kmesh_lab.apiserver import ApiError
from kmesh_lab.kube import LabError


def test_nodes_file_bare_or_under_nodes(tmp_path: Path) -> None:
    bare = tmp_path / "bare.yaml"
    bare.write_text("w1: {zone: z1}\nw2:\n")
    assert labd.load_nodes(bare) == {"w1": {"zone": "z1"}, "w2": {}}
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text("nodes:\n  w1: {zone: 1}\nsteps: []\n")
    assert labd.load_nodes(scenario) == {"w1": {"zone": "1"}}


@pytest.mark.parametrize(("text", "words"), [
    ("[]", "must map node names"),
    ("{}", "must map node names"),
    ("Bad_Name: {}", "node 'Bad_Name': a node name is a DNS subdomain"),
    ("w1: [a]", "nodes.w1: labels must be a mapping"),
    (": : :", "cannot read the nodes"),
])
def test_bad_nodes_files_name_the_file(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "nodes.yaml"
    path.write_text(text)
    with pytest.raises(LabError, match=rf"^{path}: .*{words}"):
        labd.load_nodes(path)
    with pytest.raises(LabError, match=f"^{tmp_path / 'missing.yaml'}: cannot read"):
        labd.load_nodes(tmp_path / "missing.yaml")


def test_default_nodes_are_kinds_workers_with_kinds_labels_only() -> None:
    nodes = labd.kind.worker_nodes()
    assert list(nodes) == ["ambient-worker", "ambient-worker2", "ambient-worker3"]
    for name, labels in nodes.items():
        assert labels["kubernetes.io/hostname"] == name
        assert not any(k.startswith("topology.") for k in labels)


class FakeApi:
    def __init__(self) -> None:
        self.revision = 10


class FakeLab:
    """Counts passes; a pass blocks until the test lets it go, and may write or fail."""

    def __init__(self, state: Path = Path("/nonexistent")) -> None:
        self.api = FakeApi()
        self.state = state
        self.write_barrier: Any = None
        self.go = threading.Semaphore(0)
        self.in_pass = threading.Event()
        self.passes = 0
        self.writes_per_pass = 0
        self.fail = False

    def reconcile(self) -> None:
        self.in_pass.set()
        assert self.go.acquire(timeout=10)
        self.passes += 1
        self.api.revision += self.writes_per_pass
        if self.fail:
            raise RuntimeError("boom")

    def converge(self) -> None:
        pass


class Writer(threading.Thread):
    """kubectl's write held by the barrier: ``error`` is what it was answered with, if not
    a success."""

    def __init__(self, lab: FakeLab, revision: int) -> None:
        super().__init__()
        self.barrier, self.revision = lab.write_barrier, revision
        self.error: ApiError | None = None
        self.start()

    def run(self) -> None:
        try:
            self.barrier(self.revision)
        except ApiError as e:
            self.error = e


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_a_write_is_answered_after_a_pass_that_saw_it(capsys: pytest.CaptureFixture[str]) -> None:
    lab = FakeLab()
    controllers = labd.Controllers(lab)  # type: ignore[arg-type]
    controllers.start()
    try:
        assert lab.write_barrier == controllers.wait_for
        lab.api.revision = 11  # kubectl wrote
        waiter = Writer(lab, 11)
        waiter.join(0.2)
        assert waiter.is_alive()  # held: no pass has run
        lab.writes_per_pass = 2  # the pass writes (pods, slices): one more pass follows
        lab.go.release()
        waiter.join(10)
        assert not waiter.is_alive() and waiter.error is None and lab.passes == 1
        lab.writes_per_pass = 0
        # The follow-up pass over its own writes (revision 13) finds nothing to do.
        waiter = Writer(lab, 13)
        lab.go.release()
        waiter.join(10)
        assert not waiter.is_alive() and lab.passes == 2
        # A failed pass does not answer the write: the pass is retried, without a new write,
        # and the write is answered once a retry succeeds. The daemon lives on.
        lab.fail = True
        lab.api.revision = 20
        waiter = Writer(lab, 20)
        lab.go.release()
        wait_until(lambda: controllers.failures == 1)
        waiter.join(0.3)
        assert waiter.is_alive()
        assert "controller pass failed (retry in 0.2 s)" in capsys.readouterr().out
        lab.fail = False
        lab.go.release()
        waiter.join(10)
        assert not waiter.is_alive() and waiter.error is None and lab.passes == 4
    finally:
        controllers.stop()
    assert lab.write_barrier is None


def test_a_write_whose_passes_keep_failing_is_answered_with_an_error(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(labd, "WRITE_TIMEOUT", 1.0)
    lab = FakeLab(tmp_path)
    lab.fail = True
    lab.go.release(100)
    controllers = labd.Controllers(lab)  # type: ignore[arg-type]
    controllers.start()
    try:
        lab.api.revision = 11
        waiter = Writer(lab, 11)
        waiter.join(10)
        assert not waiter.is_alive() and waiter.error is not None
        assert waiter.error.code == 500 and "RuntimeError: boom" in waiter.error.message
        assert str(tmp_path / "logs" / labd.LOG_NAME) in waiter.error.message
        # Retried with a backoff (0.2 s, 0.4 s, ...), not in a loop.
        assert 2 <= lab.passes <= 4
    finally:
        controllers.stop()


def test_stop_answers_held_writes_at_once_and_waits_for_a_pass_briefly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labd, "STOP_JOIN", 0.3)
    lab = FakeLab()
    controllers = labd.Controllers(lab)  # type: ignore[arg-type]
    controllers.start()
    lab.api.revision = 11
    waiter = Writer(lab, 11)
    try:
        assert lab.in_pass.wait(10)  # a pass is in flight, and stuck
        started = time.monotonic()
        controllers.stop()
        assert time.monotonic() - started < 5
        waiter.join(1)
        assert not waiter.is_alive() and waiter.error is not None
        assert waiter.error.code == 503 and "stopping" in waiter.error.message
    finally:
        lab.go.release()
        waiter.join(10)
        controllers._thread.join(10)
    assert not controllers._thread.is_alive()


# --- lab up's daemon, faked: a stuck start, Ctrl-C, the lock ----------------------------------

STUCK_DAEMON = """
import signal, subprocess, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stuck: a SIGTERM does not end it
child = subprocess.Popen(["sleep", "600"])  # in its process group
print(f"starting; child {child.pid}", flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    """No such process, or a zombie (init reaps those)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class FakeDaemon:
    """`lab up` against tmp_path as the state root, its daemon a script (:meth:`run`);
    ``cleaned``: the pids teardown_left_by was asked to clean up after."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.cleaned: list[int] = []
        self.pidfile = tmp_path / "fake-daemon.pid"
        self.monkeypatch = monkeypatch
        monkeypatch.setattr(labd, "STATE_ROOT", tmp_path)
        monkeypatch.setattr(labd, "RUNNER_STOP_TIMEOUT", 0.5)
        monkeypatch.setattr(labd, "teardown_left_by", lambda pid: self.cleaned.append(pid)
                            or [f"lab left by {pid}: removed"])

    def run(self, script: str) -> None:
        script = f"import os; open({str(self.pidfile)!r}, 'w').write(str(os.getpid()))\n" + script
        self.monkeypatch.setattr(labd, "_daemon_argv", lambda *_: [sys.executable, "-c", script])

    def kill_leftover(self) -> None:
        """Also when the test failed: no fake daemon or process of its group survives it."""
        if not self.pidfile.exists():
            return
        pid = int(self.pidfile.read_text())
        with contextlib.suppress(OSError):  # ended: nothing to do, nor a reused pid's group
            if str(self.pidfile).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def fake_daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(monkeypatch, tmp_path)
    try:
        yield fake
    finally:
        fake.kill_leftover()


def test_a_stuck_start_is_killed_with_its_group_and_cleaned_up(
        fake_daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    fake_daemon.run(STUCK_DAEMON)
    monkeypatch.setattr(labd, "UP_TIMEOUT", 2.0)
    started = time.monotonic()
    assert labd.cmd_up(None, source="kubernetes", enrolment="cni", verbose=False) == 1
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert "was not up within 2 s" in err and "did not stop within 0 s; killing it" in err
    (daemon,) = fake_daemon.cleaned
    assert f"lab left by {daemon}: removed" in err
    child = int(re.search(r"starting; child (\d+)", err).group(1))  # type: ignore[union-attr]
    wait_until(lambda: gone(child))  # the daemon's whole process group


def test_ctrl_c_while_it_starts_stops_the_daemon(
        fake_daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_daemon.run("import time; time.sleep(600)")

    def interrupted(daemon: subprocess.Popen[bytes], verbose: bool) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(labd, "_await_ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        labd.cmd_up(None, source="kubernetes", enrolment="cni", verbose=False)
    (daemon,) = fake_daemon.cleaned  # ended by the SIGTERM, and what it left removed
    assert gone(daemon)
    assert labd._take_up_lock() is not None  # released with it


def test_a_second_lab_up_fails_fast_while_one_holds_the_lock(
        fake_daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(labd, "_daemon_argv", lambda *_: pytest.fail("a daemon was started"))
    held = labd._take_up_lock()
    assert held is not None
    try:
        assert labd._take_up_lock() is None
        assert labd.cmd_up(None, source="kubernetes", enrolment="cni", verbose=False) == 1
        assert "another `kmesh-plugin lab up` is starting a lab" in capsys.readouterr().err
    finally:
        os.close(held)


def test_a_reused_pid_is_not_the_labs_runner(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setattr(labd, "STATE_ROOT", tmp_path)
    (tmp_path / "abcd").mkdir()
    record = {"id": "abcd", "up": True, "pid": os.getpid(),
              "pid_start": cluster.start_ticks(os.getpid())}
    (tmp_path / "abcd" / "lab.json").write_text(json.dumps(record))
    assert labd.running_up() == record
    # The same pid, another process (it started at another time): not the lab's daemon.
    stale = {**record, "pid_start": record["pid_start"] - 1}
    (tmp_path / "abcd" / "lab.json").write_text(json.dumps(stale))
    assert labd.running_up() is None
    assert cluster.runner_pidfd(stale) is None


def test_lab_down_kills_a_runner_that_does_not_stop() -> None:
    runner = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time; "
         "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert runner.stdout is not None and runner.stdout.readline() == b"\n"  # it ignores
        pidfd = cluster.runner_pidfd({"pid": runner.pid,
                                      "pid_start": cluster.start_ticks(runner.pid)})
        assert pidfd is not None
        try:
            said = cluster.stop_runner(pidfd, runner.pid, 0.3)
        finally:
            os.close(pidfd)
        assert said == [f"runner pid {runner.pid}: still running after 0 s; killed"]
        assert runner.wait(10) == -signal.SIGKILL
    finally:
        runner.kill()
        runner.wait()
        runner.stdout.close()  # type: ignore[union-attr]


def test_lab_downs_wait_outlasts_the_daemons_stop() -> None:
    """The daemon's worst stop: a pass in flight (STOP_JOIN), then close(): three agents'
    SIGKILL waited <= 10 s each, the cgroups <= 20 s."""
    assert labd.STOP_JOIN + 3 * 10 + 20 < cluster.RUNNER_STOP_TIMEOUT
    assert labd.STOP_JOIN < labd.WRITE_TIMEOUT


SEED = """Intro text
kubectl label namespace default istio-injection-
1. Assign locality information to nodes

kubectl label node ambient-worker topology.kubernetes.io/region=region
  • Create the sample namespace:

    kubectl create namespace sample
    kubectl apply -n sample -f - <<EOF
    apiVersion: v1
    kind: Service
    metadata:
    name: helloworld
    labels:
    app: helloworld
    EOF
    kubectl exec -n sample x -c sleep -- curl -sSL "http://helloworld:5000/hello"

    The response should come from the local instance running on ambient-worker, for example:

    Hello version: region.zone1.subzone1, instance: helloworld-x-6d6fdfd856-9dhv8
"""


def test_seed_commands_start_at_the_locality_heading_and_take_the_scenarios_manifests() -> None:
    cmds = seeddoc.commands(SEED)
    assert [c.line for c in cmds] == [
        "kubectl label node ambient-worker topology.kubernetes.io/region=region",
        "kubectl create namespace sample",
        "kubectl apply -n sample -f - <<EOF",
        'kubectl exec -n sample x -c sleep -- curl -sSL "http://helloworld:5000/hello"',
    ]
    apply = cmds[2]
    assert apply.manifest is not None and "name: helloworld" in apply.manifest
    assert "  selector:\n    app: helloworld" in apply.manifest  # indented, unlike the page
    assert apply.script.startswith("kubectl apply -n sample -f - <<EOF\napiVersion: v1\n")
    assert apply.script.endswith("\nEOF\n")
    assert cmds[3].example_versions == ["region.zone1.subzone1"]


def test_seed_document_errors() -> None:
    with pytest.raises(LabError, match="no heading 'Assign locality"):
        seeddoc.commands("kubectl get pods\n")
    unknown = SEED.replace("name: helloworld\n", "name: other\n", 1)
    with pytest.raises(LabError, match="applies no Service 'other'"):
        seeddoc.commands(unknown)


def test_kind_labels() -> None:
    assert kind.kind_labels("n")["kubernetes.io/os"] == "linux"
