"""The map writer under injected kernel errors, at every failure point of a publish.

Every Map of the datapath is wrapped (datapath_bed.Faults): the N-th call of a chosen operation
raises BpfError, for every N that a publish reaches, in three modes (the call does nothing; a
batch does half its elements first, as the kernel's batch commands can; every call from there
on fails). A LiveSetGuard reads the real maps before each write and records any write into a
set a connect() may be reading, any flip or insert that makes an incomplete set reachable, and
any sid reused within a grace period. After each injected failure, with the real kernel maps:

(a) every group a connect can reach is complete and is the one before or after the publish;
(b) with the faults removed, the same publish and then another one make the maps equal their
    desired state, the writer's books equal the kernel, and nothing is left behind;
(c) clients connecting all along to the groups that exist in every state never fail and only
    ever reach an endpoint of one of that group's sets.

The grace machinery is tested here too, with the real barrier wrapped to fail or to stall.
"""

from __future__ import annotations

import collections
import contextlib
import json
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from datapath_bed import (
    MAP_OPS,
    Bed,
    Client,
    Faults,
    GraceClock,
    RawMaps,
    audit,
    instrument,
    ip,
    kernel_view,
    retired_keys_settled,
    tiers,
)

from kmesh_plugin.agent.agent import Agent
from kmesh_plugin.agent.state import ClusterState
from kmesh_plugin.agent.status import StatusFile
from kmesh_plugin.datapath.build import Capacities
from kmesh_plugin.datapath.records import MODE_FAILOVER, MODE_RANDOM, Backend, BackendSet, Frontend
from kmesh_plugin.datapath.writer import MapWriter, read_table
from kmesh_plugin.errors import BpfError
from kmesh_plugin.hookspecs import StrategySettings
from kmesh_plugin.model import LocalityLabels, Scope
from kmesh_plugin.model.objects import object_key, parse
from kmesh_plugin.plugins import Plugins
from kmesh_plugin.sources.base import Batch, Event, Source
from kmesh_plugin.sources.inotify import Inotify

pytestmark = pytest.mark.kernel

Table = dict[Frontend, BackendSet]


def udp(vip: str, port: int) -> Frontend:
    return Frontend(ip(vip), port, socket.IPPROTO_UDP)


E = {i: Backend(ip(f"198.18.0.{i}"), 5353) for i in range(1, 21)}
F1, F2, F5 = udp("198.19.0.10", 53), udp("198.19.0.10", 54), udp("198.19.0.10", 55)
F3, F7 = udp("198.19.0.11", 53), udp("198.19.0.11", 54)
F4 = udp("198.19.0.12", 53)
F6 = udp("198.19.0.14", 53)


def fo(*groups: list[int]) -> BackendSet:
    return tiers(*[[E[i] for i in g] for g in groups], mode=MODE_FAILOVER)


# BASE -> AFTER is the publish under faults: two updates (one shrinking tier 0 to nothing),
# one unchanged group, two removals (one takes its ClusterIP along, one shares it), two adds
# (one on a new ClusterIP, one on a ClusterIP in use). NEXT differs from AFTER in every group
# it keeps: had the writer lost track of which set is live, it would rewrite a live one.
BASE: Table = {F1: fo([1], [2, 3]), F2: tiers([E[4], E[5]], mode=MODE_RANDOM), F3: fo([6]),
               F4: fo([7]), F5: fo([8])}
AFTER: Table = {F1: fo([], [2, 3, 9]), F2: tiers([E[5], E[10], E[11]], mode=MODE_RANDOM),
                F3: fo([6]), F6: fo([12]), F7: fo([13, 14])}
NEXT: Table = {F1: fo([1, 15], [2]), F2: tiers([E[4]], mode=MODE_RANDOM), F3: fo([6]),
               F4: fo([7, 16]), F6: fo([12, 16])}
PERSISTENT = (F1, F2, F3)  # in every state: a connect to them must never fail


def changes(frm: Table, to: Table) -> dict[Frontend, BackendSet | None]:
    """What a reconcile passes for frm -> to: every wanted group, None for the gone ones."""
    out: dict[Frontend, BackendSet | None] = dict(to)
    out.update({f: None for f in frm if f not in to})
    return out


# 14 endpoint slots: BASE -> AFTER (8 active, 9 new) and AFTER -> NEXT (10 active, 8 new) do
# not fit at once, and go in two steps each: the faults then hit the second step too.
TIGHT = Capacities(16, 14)


@pytest.fixture
def bed(request: pytest.FixtureRequest, pin_dir: Path, cgroup: Path, netns: str,
        build_dir: Path) -> Iterator[Bed]:
    caps = getattr(request, "param", Capacities(64, 1024))
    b = Bed(pin_dir, cgroup, netns, build_dir, capacities=caps)
    try:
        for e in E.values():
            b.address(str(e.ip))  # a UDP connect needs a route, not a listener
        yield b
    finally:
        b.close()


class Prober:
    """Clients in the bed connecting (UDP: the hook runs, nothing is sent) to each persistent
    group in a loop, in background threads, until stopped."""

    def __init__(self, bed: Bed, frontends: tuple[Frontend, ...]) -> None:
        self.results: dict[Frontend, list[dict[str, Any]]] = {f: [] for f in frontends}
        self.stop = threading.Event()
        self.clients = {f: bed.client() for f in frontends}
        self.threads = [threading.Thread(target=self._run, args=(f,)) for f in frontends]
        for t in self.threads:
            t.start()

    def _run(self, frontend: Frontend) -> None:
        client: Client = self.clients[frontend]
        while not self.stop.is_set():
            self.results[frontend] += client.connect(str(frontend.ip), frontend.port,
                                                     proto="udp", count=100, timeout=1.0)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def check_between(view: dict[str, Any], before: Table, after: Table) -> list[str]:
    """(a): what a connect can reach now is complete and is the group before or after."""
    problems = []
    table = view["table"]
    for f, p in table.items():
        if f not in before and f not in after:
            problems.append(f"{f} is reachable but in neither state")
        elif p.backends is None:
            problems.append(f"{f} is reachable with an incomplete set")
        elif p.backends not in (before.get(f), after.get(f)):
            problems.append(f"{f} serves {p.backends}, neither the set before nor after")
    for f in before.keys() & after.keys():
        if f not in table:
            problems.append(f"{f} exists before and after but is not reachable")
        if f.ip not in view["vips"]:
            problems.append(f"ClusterIP {f.ip} of {f} is missing from kmesh_vips")
    ips = {f.ip for f in (*before, *after)}
    if not view["vips"] <= ips:
        problems.append(f"kmesh_vips holds {sorted(map(str, view['vips'] - ips))}")
    return problems


def check_equal(view: dict[str, Any], want: Table) -> list[str]:
    """(b): the maps hold exactly ``want``."""
    got = {f: p.backends for f, p in view["table"].items()}
    problems = []
    if got != want:
        problems.append("maps differ from the desired state: "
                        + str({str(f): (got.get(f), want.get(f))
                               for f in set(got) | set(want) if got.get(f) != want.get(f)}))
    if view["vips"] != {f.ip for f in want}:
        problems.append(f"kmesh_vips {sorted(map(str, view['vips']))}")
    return problems


def run_failure_points(bed: Bed, faults: Faults, settled: bool,
                       tried: collections.Counter[str]) -> list[str]:
    """Every (operation, N, mode) that a BASE -> AFTER publish reaches; the problems found."""
    problems: list[str] = []
    maps = faults.real
    state: Table = BASE

    def fresh_writer() -> None:
        # After a problem the books may be beyond use: start again from the kernel's state.
        bed.writer.close()
        bed.writer = MapWriter(bed.dp)
        bed.writer.recover()

    for op in MAP_OPS:
        modes = ["fail", "partial", "sticky"] if op.endswith("_batch") else ["fail", "sticky"]
        for mode in modes:
            n = 0
            while True:
                n += 1
                label = f"{'settled' if settled else 'busy'} {op} #{n} {mode}"
                found: list[str] = []
                try:
                    bed.writer.publish(changes(state, BASE))
                    state = BASE
                    if settled:
                        bed.writer.settle()
                    found += check_equal(kernel_view(maps), BASE)
                    faults.arm(op, n, mode)
                    with contextlib.suppress(BpfError):
                        bed.writer.publish(changes(BASE, AFTER))
                    fired = bool(faults.fired)
                    faults.disarm()
                    if not fired:
                        state = AFTER
                        found += check_equal(kernel_view(maps), AFTER)
                        break
                    tried[f"{op} {mode}"] += 1
                    found += check_between(kernel_view(maps), BASE, AFTER)
                    if not getattr(bed.writer, "stale", False):
                        # kmesh_vips may lag the frontends until the retry (a ClusterIP not yet
                        # refused on other ports, or refused a little longer): not a hole.
                        found += [f"after the failure: {p}"
                                  for p in audit(bed.writer, maps, vips_follow=False)]
                    state = {}  # unknown until the retry lands
                    bed.writer.publish(changes(BASE, AFTER))  # the agent's retry
                    found += check_equal(kernel_view(maps), AFTER)
                    found += [f"after the retry: {p}" for p in audit(bed.writer, maps)]
                    bed.writer.publish(changes(AFTER, NEXT))
                    state = NEXT
                    found += check_equal(kernel_view(maps), NEXT)
                    found += [f"after the next publish: {p}" for p in audit(bed.writer, maps)]
                    bed.writer.settle()
                    found += retired_keys_settled(bed.writer, maps)
                except Exception as e:  # a problem to report, then go on
                    faults.disarm()
                    found.append(f"{type(e).__name__}: {e}")
                assert faults.guard is not None
                found += faults.guard.violations
                faults.guard.violations.clear()
                if found:
                    problems += [f"{label}: {p}" for p in found]
                    fresh_writer()
                    state = {f: p.backends for f, p in bed.writer.published.items()
                             if p.backends is not None}
                if n > 50:
                    problems.append(f"{label}: the publish never stopped reaching the fault")
                    break
    bed.writer.publish(changes(state, BASE))
    return problems


@pytest.mark.parametrize("bed", [Capacities(64, 1024), TIGHT], indirect=True,
                         ids=["roomy", "tight"])
def test_every_failure_point_of_a_publish_keeps_maps_and_books_true(bed: Bed) -> None:
    faults, _clock = instrument(bed)
    if bed.capacities == TIGHT:
        for frm, to in ((BASE, AFTER), (AFTER, NEXT)):
            bed.writer.publish(dict(frm))
            bed.writer.settle()
            stats = bed.writer.publish(changes(frm, to))
            assert stats.steps == 2 and not stats.left_out, stats
            bed.writer.publish(changes(to, {}))
    bed.writer.publish(dict(BASE))  # before the clients start: they must never fail
    prober = Prober(bed, PERSISTENT)
    tried: collections.Counter[str] = collections.Counter()
    try:
        problems = run_failure_points(bed, faults, settled=True, tried=tried)
        problems += run_failure_points(bed, faults, settled=False, tried=tried)
    finally:
        prober.finish()
    allowed = {f: {str(e) for s in (BASE, AFTER, NEXT) for t in s[f].tiers for e in t}
               for f in PERSISTENT}
    connects = {f: len(r) for f, r in prober.results.items()}
    failed = {str(f): collections.Counter(r["errno"] for r in rs if not r["ok"])
              for f, rs in prober.results.items()}
    strangers = {str(f): {r["endpoint"] for r in rs if r["ok"]} - allowed[f]
                 for f, rs in prober.results.items()}
    total = sum(tried.values())
    print(f"{bed.capacities}: {total} failure points: {dict(sorted(tried.items()))}")
    print(f"connects to the persistent groups meanwhile: "
          f"{ {str(f): n for f, n in connects.items()} }, failures {failed}")
    for p in problems[:40]:
        print("PROBLEM", p)
    assert not problems, f"{len(problems)} problems, first: {problems[:5]}"
    assert total >= 20  # every write of a publish, in each mode, in both scenarios
    assert all(not c for c in failed.values()), failed
    assert all(not s for s in strangers.values()), strangers
    assert all(n > 0 for n in connects.values()), connects


# -- grace periods with the real barrier --------------------------------------------------------


def test_a_failing_barrier_delays_reclaim_and_never_sticks(bed: Bed) -> None:
    faults, clock = instrument(bed)
    bed.writer.publish({F1: BASE[F1]})
    clock.fail = 5  # the next five grace periods fail in the kernel
    for i in range(6):  # each update needs the set the one before it retired
        bed.writer.publish({F1: NEXT[F1] if i % 2 else AFTER[F1]})
        assert check_equal(kernel_view(faults.real), {F1: NEXT[F1] if i % 2 else AFTER[F1]}) \
            == []
    bed.writer.settle()
    assert bed.writer.slots_retired() == 0
    assert retired_keys_settled(bed.writer, faults.real) == []
    assert audit(bed.writer, faults.real) == []
    assert clock.fail == 0  # every injected failure was met, and retried
    assert faults.guard is not None and faults.guard.violations == []


def test_a_stalled_grace_period_defers_the_group_and_reclaims_later(bed: Bed) -> None:
    faults, clock = instrument(bed)
    bed.writer.grace_timeout = 0.2  # type: ignore[attr-defined]
    bed.writer.publish({F1: BASE[F1], F3: BASE[F3]})
    bed.writer.settle()
    clock.gate = threading.Event()  # grace periods now hang until the gate opens
    try:
        bed.writer.publish({F1: AFTER[F1]})  # retires F1's first set: its grace hangs
        # F1's next update needs that set: the publish waits 0.2 s, then leaves it out, not
        # raised (was: TimeoutError after 10 s); F3's update, which needs no such set, lands.
        stats = bed.writer.publish({F1: NEXT[F1], F3: fo([6, 7])})
        assert set(stats.left_out) == {F1}  # type: ignore[attr-defined]
        assert stats.left_out[F1].reason == "grace_period"  # type: ignore[attr-defined]
        view = kernel_view(faults.real)
        assert check_equal(view, {F1: AFTER[F1], F3: fo([6, 7])}) == []
        assert bed.writer.slots_retired() > 0
    finally:
        clock.gate.set()
        clock.gate = None
    bed.writer.publish({F1: NEXT[F1]})
    bed.writer.settle()
    assert check_equal(kernel_view(faults.real), {F1: NEXT[F1], F3: fo([6, 7])}) == []
    assert retired_keys_settled(bed.writer, faults.real) == []
    assert audit(bed.writer, faults.real) == []
    assert isinstance(clock, GraceClock) and faults.guard is not None
    assert faults.guard.violations == []


class QueueSource(Source):
    kind = "queue"

    def __init__(self) -> None:
        self.queue: queue.Queue[Batch] = queue.Queue()

    def start(self) -> None:
        pass

    def next_batch(self, timeout: float) -> Batch | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        pass


def _service_objects(version: int) -> list[Event]:
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dns", "namespace": "t"},
           "spec": {"clusterIP": "198.19.0.10",
                    "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "dns-1", "namespace": "t",
                        "labels": {"kubernetes.io/service-name": "dns"}},
           "addressType": "IPv4", "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
           "endpoints": [{"addresses": [f"198.18.0.{version}"], "nodeName": "w1"}]}
    return [Event(object_key(o), parse(o)) for o in (svc, eps)]


def _wait_status(status: StatusFile, thread: threading.Thread, until: Any) -> dict[str, Any]:
    """The agent's status once ``until(status)`` holds: woken by the file's rename."""
    end = time.monotonic() + 30.0
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


def test_an_agent_outlives_a_stalled_grace_period(bed: Bed, tmp_path: Path) -> None:
    faults, clock = instrument(bed)
    bed.writer.grace_timeout = 0.2  # type: ignore[attr-defined]
    source = QueueSource()
    status = StatusFile(tmp_path / "status.json")
    agent = Agent(
        node_name="w1", state=ClusterState(LocalityLabels(), "w1"),
        plugins=Plugins.load(["local", "prefer_close"]),
        settings=StrategySettings([Scope.NETWORK, Scope.REGION, Scope.ZONE, Scope.SUBZONE]),
        source=source, datapath=bed.dp, cgroup=bed.cgroup, status=status, writer=bed.writer,
    )
    failures: list[BaseException] = []

    def run() -> None:
        try:
            agent.run()
        except BaseException as e:  # reported by the test
            failures.append(e)

    thread = threading.Thread(target=run)
    front = udp("198.19.0.10", 53)

    def serves(version: int) -> bool:
        p = read_table(RawMaps(faults.real)).get(front)  # type: ignore[arg-type]
        return p is not None and p.backends == tiers([E[version]], mode=MODE_RANDOM)

    source.queue.put(Batch(_service_objects(1), synced=True, revision="1"))
    thread.start()
    try:
        _wait_status(status, thread, lambda s: s["source_revision"] == "1")
        assert serves(1)
        clock.gate = threading.Event()  # every grace period from now on hangs
        source.queue.put(Batch(_service_objects(2), revision="2"))  # retires set 0
        _wait_status(status, thread, lambda s: s["source_revision"] == "2")
        assert serves(2)
        # Writing version 3 needs set 0, whose grace period hangs: the agent waits 0.2 s,
        # reports the Service held up, and lives on (was: TimeoutError after 10 s, the
        # agent thread dead).
        source.queue.put(Batch(_service_objects(3), revision="3"))
        st = _wait_status(status, thread, lambda s: s["source_revision"] == "3")
        assert st["not_programmed"]["services"]["t/dns"][0]["reason"] == "grace_period"
        assert st["not_programmed"]["services"]["t/dns"][0]["stale"] is True
        assert serves(2) and thread.is_alive()
        clock.gate.set()  # the grace period passes: the retry (with backoff) lands
        st = _wait_status(status, thread, lambda s: s["not_programmed"]["count"] == 0)
        assert serves(3)
    finally:
        if clock.gate is not None:
            clock.gate.set()
        agent.stop()
        thread.join(30.0)
    assert not thread.is_alive() and failures == []
    assert faults.guard is not None and faults.guard.violations == []
