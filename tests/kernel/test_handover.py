"""One writer per pin dir: the agent's lock, and a restart that overlaps the old agent.

The lock is flock(LOCK_EX) on an fd of the pin directory itself (bpffs keeps only BPF objects, so
there is no lock file). The kernel drops it with the process, SIGKILL included; /proc/locks
names the holder.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node_bed import Workloads, agents, link_progs, start_agent, write_config, write_service

from kmesh_plugin.datapath import loader
from kmesh_plugin.datapath.build import Capacities
from kmesh_plugin.datapath.loader import Datapath
from kmesh_plugin.datapath.records import Frontend
from kmesh_plugin.datapath.writer import read_table
from kmesh_plugin.errors import DatapathError

pytestmark = pytest.mark.kernel

CAPS = Capacities(64, 1024)
VIP = "198.19.0.10"

HOLD = """\
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder(pin_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the pin dir's lock until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(pin_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_attach_fails_at_once_naming_the_pin_dir_and_the_holder(
    pin_dir: Path, cgroup: Path, build_dir: Path
) -> None:
    dp = loader.attach(pin_dir, cgroup, CAPS, build_dir)
    try:
        before = link_progs(pin_dir)
        started = time.monotonic()
        with pytest.raises(DatapathError) as exc:
            loader.attach(pin_dir, cgroup, CAPS, build_dir, lock_timeout=0)
        assert time.monotonic() - started < 2
        assert str(pin_dir) in str(exc.value)
        assert f"pid {os.getpid()}" in str(exc.value)
        # The refused attach loaded nothing and swapped nothing.
        assert link_progs(pin_dir) == before
        assert sorted(p.name for p in pin_dir.iterdir()) == ["links", "maps", "progs"]
        # A read-write open is a writer too; a read-only one is not.
        with pytest.raises(DatapathError, match="pid"):
            Datapath.open(pin_dir, read_only=False)
        Datapath.open(pin_dir, read_only=True).close()
    finally:
        dp.close()
    # Closing the datapath releases the lock.
    loader.attach(pin_dir, cgroup, CAPS, build_dir, lock_timeout=0).close()


def test_the_wait_for_the_lock_is_bounded(
    pin_dir: Path, cgroup: Path, build_dir: Path, holder: subprocess.Popen[str]
) -> None:
    started = time.monotonic()
    with pytest.raises(DatapathError) as exc:
        loader.attach(pin_dir, cgroup, CAPS, build_dir, lock_timeout=0.5)
    waited = time.monotonic() - started
    assert 0.5 <= waited < 5
    assert f"pid {holder.pid}" in str(exc.value) and str(pin_dir) in str(exc.value)
    assert list(pin_dir.iterdir()) == []  # nothing was loaded meanwhile


def test_the_lock_goes_with_a_killed_holder_and_a_waiter_takes_over(
    pin_dir: Path, holder: subprocess.Popen[str]
) -> None:
    waiting = threading.Event()
    seen: list[int | None] = []
    result: dict[str, Any] = {}

    def wait() -> None:
        def on_wait(pid: int | None) -> None:
            seen.append(pid)
            waiting.set()

        try:
            result["lock"] = loader.PinLock.acquire(pin_dir, timeout=30, on_wait=on_wait)
            result["at"] = time.monotonic()
        except BaseException as e:  # reported by the main thread
            result["error"] = e
            waiting.set()

    thread = threading.Thread(target=wait)
    thread.start()
    try:
        assert waiting.wait(10)
        assert "error" not in result, result
        assert seen == [holder.pid]
        assert loader.PinLock.holder(pin_dir) == holder.pid
        killed = time.monotonic()
        holder.send_signal(signal.SIGKILL)
        thread.join(10)
        assert not thread.is_alive()
        assert "lock" in result, result
        handover = result["at"] - killed
        print(f"\nlock handover after SIGKILL of the holder: {handover * 1000:.1f} ms")
        assert handover < 2
        assert loader.PinLock.holder(pin_dir) == os.getpid()
    finally:
        thread.join(30)
        if "lock" in result:
            result["lock"].release()
    assert loader.PinLock.holder(pin_dir) is None


class Load:
    """GETs in short rounds (each a new connection) until stopped: a continuous load whose end
    the test decides. ``results`` grows after every round."""

    def __init__(self, client: Any, url: str) -> None:
        self.client, self.url = client, url
        self.results: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.stopped:
            reply = self.client.call(
                {"op": "loop", "urls": [self.url], "seconds": 0.2, "max": 100_000}, timeout=30)
            with self.cond:
                self.results.extend(reply["results"])
                self.cond.notify_all()

    def wait_for_connects_after(self, t: float, count: int, timeout: float = 30) -> None:
        with self.cond:
            assert self.cond.wait_for(
                lambda: sum(r["t"] > t for r in self.results) >= count, timeout), \
                f"fewer than {count} connects after {t}"

    def stop(self) -> None:
        self.stopped = True
        if self.thread.is_alive():
            self.thread.join(60)


def _backends(pin_dir: Path) -> set[str]:
    dp = Datapath.open(pin_dir, read_only=True)
    try:
        table = read_table(dp)
    finally:
        dp.close()
    published = table[Frontend(ipaddress.ip_address(VIP), 80)]
    assert published.backends is not None
    return {str(b) for tier in published.backends.tiers for b in tier}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_an_overlapping_restart_hands_over_without_a_failed_connect(
    pin_dir: Path, cgroup: Path, netns: str, build_dir: Path, tmp_path: Path, sig: int
) -> None:
    """Agent A runs; agent B starts on the same pin dir and waits; A is killed (SIGKILL, or
    SIGTERM: it stops in order); B takes over. A client connects in a loop throughout: no
    connect may fail, and only one agent writes at any time (B loads nothing while A lives;
    A applies changes while B waits)."""
    manifests = tmp_path / "manifests"
    write_service(manifests, VIP, 80, [("198.18.0.1", 8080)], "1")
    config = write_config(tmp_path / "plugin.toml", pin_dir=pin_dir, cgroup=cgroup,
                          build_dir=build_dir, manifests=manifests,
                          status_file=tmp_path / "status.json")
    work = Workloads(netns, cgroup)
    load: Load | None = None
    try:
        work.server("e1", "198.18.0.1", 8080)
        work.server("e2", "198.18.0.2", 8080)
        client = work.client()
        with agents() as started:
            a = start_agent(config)
            started.append(a)
            a.wait_for(lambda line: line.get("msg") == "reconciled" and line.get("full"))
            progs_of_a = link_progs(pin_dir)

            load = Load(client, f"http://{VIP}/hello")
            load.thread.start()
            load.wait_for_connects_after(0, 100)
            t_b = time.monotonic()
            b = start_agent(config)
            started.append(b)
            b.wait_for(lambda line: "waiting" in str(line.get("msg"))
                       and f"pid {a.pid}" in str(line.get("msg")))
            assert loader.PinLock.holder(pin_dir) == a.pid

            # While B waits, A is the writer: it applies a change, and B has loaded nothing.
            t_change = time.monotonic()
            mark = len(a.lines)
            write_service(manifests, VIP, 80, [("198.18.0.1", 8080), ("198.18.0.2", 8080)], "2")
            a.wait_for(lambda line: line.get("msg") == "reconciled", start=mark)
            assert _backends(pin_dir) == {"198.18.0.1:8080", "198.18.0.2:8080"}
            assert link_progs(pin_dir) == progs_of_a
            assert not any(m.startswith("datapath:") for m in b.messages()), b.messages()
            assert not (pin_dir / f"progs-new-{b.pid}").exists()
            assert loader.PinLock.holder(pin_dir) == a.pid

            t_kill = time.monotonic()
            a.proc.send_signal(sig)
            assert a.proc.wait(30) == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
            b.wait_for(lambda line: line.get("msg") == "agent started")
            t_b_started = time.monotonic()
            b.wait_for(lambda line: line.get("msg") == "reconciled" and line.get("full"))
            assert loader.PinLock.holder(pin_dir) == b.pid
            assert link_progs(pin_dir) != progs_of_a  # B swapped the links in place

            # B is the writer now.
            mark = len(b.lines)
            write_service(manifests, VIP, 80, [("198.18.0.2", 8080)], "3")
            b.wait_for(lambda line: line.get("msg") == "reconciled", start=mark)
            assert _backends(pin_dir) == {"198.18.0.2:8080"}
            t_applied = time.monotonic()
            load.wait_for_connects_after(t_applied, 200)
            t_end = time.monotonic()
            load.stop()
            assert b.stop() == 0
    finally:
        if load is not None:
            load.stop()
        work.close()
    assert load is not None
    results = load.results

    failed = [r for r in results if r["errno"]]
    phases = collections.Counter(
        "before B" if r["t"] < t_b else
        "A runs, B waits" if r["t"] < t_kill else
        "no agent" if r["t"] < t_b_started else
        "B runs" for r in results if r["t"] < t_end
    )
    answered = collections.Counter(r["version"] for r in results)
    print(f"\nhandover ({signal.Signals(sig).name}): {len(results)} connects, {len(failed)} "
          f"failed; by phase {dict(phases)}; answered {dict(answered)}; change applied by A "
          f"{t_kill - t_change:.2f} s before "
          f"the kill; B started {t_b_started - t_kill:.2f} s after it")
    assert not failed, collections.Counter(r["errno"] for r in failed)
    assert set(answered) <= {"e1", "e2"}
    # B's change is live once it is in the maps: e1 is gone for every later connect.
    assert {r["version"] for r in results if r["t"] > t_applied} == {"e2"}
    assert all(phases[p] > 0 for p in ("A runs, B waits", "no agent", "B runs")), phases
