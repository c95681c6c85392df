"""A test bed for the real datapath: programs attached to a test cgroup, endpoints in a test
network namespace, and a client process placed in both.

Endpoints are helloworld servers bound to their own address on the namespace's loopback
(198.18.0.0/16 and 2001:2::/48, the benchmarking ranges); ClusterIPs come from 198.19.0.0/16,
which nothing in the namespace routes: an untranslated connect fails with ENETUNREACH.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmesh_lab import procs
from kmesh_plugin.datapath import loader, records, syscall
from kmesh_plugin.datapath.build import Capacities, compile_object
from kmesh_plugin.datapath.records import Backend, BackendSet, Frontend
from kmesh_plugin.datapath.writer import MapWriter, read_table
from kmesh_plugin.errors import BpfError

WORKLOADS = [sys.executable, "-m", "kmesh_lab.workloads"]
START_TIMEOUT = 20.0


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


class Client:
    """The workloads client (JSON lines over stdin/stdout), inside the bed's netns and cgroup."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.reader = procs.LineReader(proc.stdout)  # type: ignore[arg-type]
        self.reader.expect("ready", START_TIMEOUT)

    def call(self, command: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()
        reply = json.loads(self.reader.readline(timeout))
        assert "error" not in reply, reply
        return reply

    def connect(self, host: str, port: int, proto: str = "tcp", count: int = 1,
                timeout: float = 2.0) -> list[dict[str, Any]]:
        return self.call({"op": "connect", "host": host, "port": port, "proto": proto,
                          "count": count, "timeout": timeout})["results"]

    def get(self, url: str, count: int = 1, timeout: float = 2.0) -> list[dict[str, Any]]:
        return self.call({"op": "get", "url": url, "count": count, "timeout": timeout})["results"]

    def send(self, command: dict[str, Any]) -> None:
        """Start a command without waiting for its reply (see ``receive``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()

    def receive(self, timeout: float = 120.0) -> dict[str, Any]:
        return json.loads(self.reader.readline(timeout))


@dataclass
class Bed:
    pin_dir: Path
    cgroup: Path
    netns: str
    build_dir: Path
    capacities: Capacities = field(default_factory=lambda: Capacities(64, 1024))
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    defines: tuple[str, ...] = ()  # a test variant of the object (KMESH_TEST_* macros)

    def __post_init__(self) -> None:
        self.obj = compile_object(self.capacities, self.build_dir, defines=self.defines)
        self.dp = loader.attach(self.pin_dir, self.cgroup, self.capacities, self.build_dir,
                                obj=self.obj)
        self.writer = MapWriter(self.dp)
        self.writer.recover()
        self._addresses: set[str] = set()

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    def reattach(self) -> None:
        """What a restarting agent does: load again over the pinned maps and swap the links."""
        self.writer.close()
        self.dp.close()
        self.dp = loader.attach(self.pin_dir, self.cgroup, self.capacities, self.build_dir,
                                obj=self.obj)
        self.writer = MapWriter(self.dp)
        self.writer.recover()

    def address(self, text: str) -> None:
        """Put ``text`` on the namespace's loopback (v6 without DAD, usable at once)."""
        if text in self._addresses:
            return
        cidr = f"{text}/128" if ":" in text else f"{text}/32"
        extra = ["nodad"] if ":" in text else []
        subprocess.run(["ip", "-n", self.netns, "addr", "add", cidr, "dev", "lo", *extra],
                       check=True)
        self._addresses.add(text)

    def server(self, name: str, address: str, port: int) -> Backend:
        """A helloworld server answering with version ``name`` on address:port."""
        self.address(address)
        proc = procs.spawn(
            [*WORKLOADS, "helloworld", "--port", str(port), "--version", name,
             "--instance", name, "--bind", address],
            netns=self.netns_path, cgroup=None,
        )
        self.processes.append(proc)
        procs.LineReader(proc.stdout).expect("ready", START_TIMEOUT)  # type: ignore[arg-type]
        return Backend(ip(address), port)

    def client(self) -> Client:
        proc = procs.spawn([*WORKLOADS, "client"], netns=self.netns_path, cgroup=str(self.cgroup),
                           stdin=subprocess.PIPE)
        self.processes.append(proc)
        return Client(proc)

    def publish(self, table: dict[Frontend, BackendSet | None]) -> None:
        self.writer.publish(table)

    def close(self) -> None:
        for proc in self.processes:
            procs.stop(proc)
        self.writer.close()
        self.dp.close()


def tiers(*groups: list[Backend], mode: int) -> BackendSet:
    return BackendSet(mode, tuple(tuple(g) for g in groups))


def answered(results: list[dict[str, Any]]) -> list[str | None]:
    """The version (server name) behind each HTTP result; None for a failure."""
    return [r["version"] if r["ok"] else None for r in results]


# -- fault injection and oracles (tests/kernel/test_writer_faults.py, test_capacity.py) -------

MAP_OPS = ("lookup", "lookup_percpu", "lookup_batch", "keys", "update", "update_batch",
           "delete", "delete_batch")


class RawMaps:
    """The real maps of a datapath, as ``read_table`` wants them: reads that no fault or guard
    sees."""

    def __init__(self, maps: dict[str, syscall.Map]) -> None:
        self.maps = maps

    def __getitem__(self, name: str) -> syscall.Map:
        return self.maps[name]


class GraceClock:
    """Wraps the datapath's Barrier: numbers the barriers started and knows the highest one
    that completed, so a guard can tell whether a grace period passed since a moment."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.started = 0
        self.completed = 0
        self.fail: int = 0  # fail this many of the next waits (BpfError EIO)
        self.gate: threading.Event | None = None  # set: waits block until it is set
        self.lock = threading.Lock()

    def wait(self) -> float:
        with self.lock:
            self.started += 1
            mine = self.started
            failing = self.fail > 0
            if failing:
                self.fail -= 1
        if failing:
            raise BpfError(errno.EIO, "MAP_UPDATE_ELEM", "kmesh_barrier (injected)")
        gate = self.gate
        if gate is not None:
            gate.wait(60.0)
        seconds = float(self.real.wait())
        with self.lock:
            self.completed = max(self.completed, mine)
        return seconds

    def close(self) -> None:
        self.real.close()


class LiveSetGuard:
    """An oracle of SPEC.md section 6 at every write: reads the real maps before each write of
    the map writer and records a violation when the write touches what a connect() may be
    reading: a slot or record of an active set a frontend reaches, a set switched away from
    (or a sid whose frontend went) less than a grace period ago; or when a flip or a frontend
    insert makes reachable a set that is not complete."""

    def __init__(self, maps: dict[str, syscall.Map], clock: GraceClock) -> None:
        self.maps = maps
        self.clock = clock
        self.recent: dict[tuple[int, int], int] = {}  # (sid, set) -> barriers started then
        self.violations: list[str] = []

    def _reachable(self) -> dict[int, tuple[bytes, int]]:
        """sid -> (frontend key, active set) for every frontend in the kernel."""
        out = {}
        for k, v in self.maps[records.MAP_FRONTENDS].lookup_batch():
            sid = records.FRONTEND.unpack(v)["sid"]
            raw = self.maps[records.MAP_ACTIVE].lookup(records.U32.pack(sid))
            out[sid] = (k, records.U32.unpack(raw)[0] & 1 if raw else 0)
        return out

    def _graced(self, owner: tuple[int, int]) -> bool:
        mark = self.recent.get(owner)
        return mark is None or self.clock.completed > mark

    def _complete(self, sid: int, set_: int, frontend: bytes) -> str | None:
        raw = self.maps[records.MAP_RECORDS].lookup(records.record_index(sid, set_))
        if raw is None:
            return "no record"
        rec = records.RECORD.unpack(raw)
        if rec["frontend"] != frontend:
            return "a record naming another frontend"
        if not 1 <= rec["ntiers"] <= records.MAX_TIERS:
            return f"ntiers {rec['ntiers']}"
        for tier in range(rec["ntiers"]):
            for i in range(rec["count"][tier]):
                if self.maps[records.MAP_SLOTS].lookup(records.slot_key(sid, set_, tier, i)) \
                        is None:
                    return f"count {rec['count'][tier]} of tier {tier} without slot {i}"
        # The program reads the record's copies of the picked tier instead of those slots.
        tier = rec["inline_tier"]
        size = records.ENDPOINT.size
        count = rec["count"][tier] if tier < records.MAX_TIERS else 0
        for i in range(min(records.INLINE_SLOTS, count)):
            slot = self.maps[records.MAP_SLOTS].lookup(records.slot_key(sid, set_, tier, i))
            if rec["inline_slots"][i * size:(i + 1) * size] != slot:
                return f"inline slot {i} of tier {tier} differs from its slot"
        return None

    def _touch(self, what: str, owners: set[tuple[int, int]]) -> None:
        live = self._reachable()
        for sid, set_ in sorted(owners):
            if sid in live and live[sid][1] == set_:
                self.violations.append(f"{what} of the live set ({sid}, {set_})")
            elif not self._graced((sid, set_)):
                self.violations.append(
                    f"{what} of ({sid}, {set_}) less than a grace period after it was left"
                )

    def before(self, name: str, op: str, keys: list[bytes], values: list[bytes] | None) -> None:
        if name == records.MAP_SLOTS and op in ("update", "update_batch", "delete",
                                                "delete_batch"):
            self._touch(f"{op} of slots", {(records.SLOT_KEY.unpack(k)["sid"],
                                            records.SLOT_KEY.unpack(k)["set"]) for k in keys})
        elif name == records.MAP_RECORDS and op in ("update", "update_batch"):
            index = {records.U32.unpack(k)[0] for k in keys}
            self._touch(f"{op} of records", {(i // records.SETS, i % records.SETS)
                                             for i in index})
        elif name == records.MAP_ACTIVE and op in ("update", "update_batch") and values:
            live = self._reachable()
            for k, v in zip(keys, values, strict=True):
                sid, new = records.U32.unpack(k)[0], records.U32.unpack(v)[0] & 1
                if sid in live:
                    frontend, old = live[sid]
                    problem = self._complete(sid, new, frontend)
                    if problem:
                        self.violations.append(f"flip of sid {sid} to set {new}: {problem}")
                    if old != new:
                        self.recent[(sid, old)] = self.clock.started
        elif name == records.MAP_FRONTENDS and op in ("update", "update_batch") and values:
            live = self._reachable()
            for k, v in zip(keys, values, strict=True):
                sid = records.FRONTEND.unpack(v)["sid"]
                for s in range(records.SETS):
                    if not self._graced((sid, s)):
                        self.violations.append(
                            f"sid {sid} given to a frontend less than a grace period after "
                            "its group went")
                raw = self.maps[records.MAP_ACTIVE].lookup(records.U32.pack(sid))
                active = records.U32.unpack(raw)[0] & 1 if raw else 0
                problem = self._complete(sid, active, k)
                if problem:
                    self.violations.append(f"insert of a frontend on sid {sid}: {problem}")
                if sid in live and live[sid][0] != k:
                    self.violations.append(f"sid {sid} serves two frontends at once")
        elif name == records.MAP_FRONTENDS and op in ("delete", "delete_batch"):
            live = self._reachable()
            for sid, (frontend, _) in live.items():
                if frontend in keys:
                    for s in range(records.SETS):
                        self.recent[(sid, s)] = self.clock.started


class Faults:
    """Wraps every Map of a Datapath: counts the calls, raises BpfError (EIO) at the N-th call
    of a chosen operation (and map), and lets a LiveSetGuard see every write first.

    Modes: ``fail`` (the call does nothing), ``partial`` (a batch does its first half, as the
    kernel's batch commands can), ``sticky`` (that call and every later one fail, whatever
    the operation, until ``disarm``)."""

    def __init__(self, maps: dict[str, syscall.Map], guard: LiveSetGuard | None = None) -> None:
        self.real = dict(maps)
        self.guard = guard
        self.calls: list[tuple[str, str]] = []  # (map, op), every call while armed or not
        self.target: tuple[str | None, str, int, str] | None = None
        self.count = 0
        self.fired: list[str] = []
        self.sticky = False
        self.wrapped = {name: FaultyMap(m, name, self) for name, m in self.real.items()}

    def arm(self, op: str, n: int, mode: str = "fail", map_name: str | None = None) -> None:
        assert op in MAP_OPS and mode in ("fail", "partial", "sticky"), (op, mode)
        self.target, self.count, self.fired, self.sticky = (map_name, op, n, mode), 0, [], False

    def disarm(self) -> None:
        self.target, self.sticky = None, False

    def check(self, name: str, op: str) -> str | None:
        """What to do with this call: None (run it), "fail" or "partial"."""
        self.calls.append((name, op))
        if self.sticky:
            self.fired.append(f"{op} {name} (sticky)")
            return "fail"
        if self.target is None:
            return None
        map_name, want, n, mode = self.target
        if op != want or (map_name is not None and map_name != name):
            return None
        self.count += 1
        if self.count != n:
            return None
        self.fired.append(f"{op} #{n} on {name} ({mode})")
        if mode == "sticky":
            self.sticky = True
            return "fail"
        return mode

    def error(self, name: str, op: str) -> BpfError:
        return BpfError(errno.EIO, op.upper(), f"{name} (injected fault)")


class FaultyMap:
    """A Map that asks its Faults before every call; everything else is the real Map's."""

    def __init__(self, real: syscall.Map, name: str, faults: Faults) -> None:
        self._real = real
        self._name = name
        self._faults = faults

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._real, attr)

    def _guard(self, op: str, keys: list[bytes], values: list[bytes] | None = None) -> None:
        if self._faults.guard is not None:
            self._faults.guard.before(self._name, op, keys, values)

    def _read(self, op: str) -> None:
        if self._faults.check(self._name, op) is not None:
            raise self._faults.error(self._name, op)

    def lookup(self, key: bytes) -> bytes | None:
        self._read("lookup")
        return self._real.lookup(key)

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        self._read("lookup_percpu")
        return self._real.lookup_percpu(key)

    def lookup_batch(self, chunk: int = 1024) -> list[tuple[bytes, bytes]]:
        self._read("lookup_batch")
        return self._real.lookup_batch(chunk)

    def keys(self) -> Iterator[bytes]:
        self._read("keys")
        return self._real.keys()

    def update(self, key: bytes, value: bytes, flags: int = syscall.ANY) -> None:
        action = self._faults.check(self._name, "update")
        if action is not None:
            raise self._faults.error(self._name, "update")
        self._guard("update", [key], [value])
        self._real.update(key, value, flags)

    def update_batch(self, items: Sequence[tuple[bytes, bytes]], flags: int = syscall.ANY,
                     **kw: Any) -> int:
        items = list(items)
        action = self._faults.check(self._name, "update_batch")
        if action == "partial" and len(items) > 1:
            half = items[: len(items) // 2]
            self._guard("update_batch", [k for k, _ in half], [v for _, v in half])
            self._real.update_batch(half, flags, **kw)
        if action is not None:
            raise self._faults.error(self._name, "update_batch")
        self._guard("update_batch", [k for k, _ in items], [v for _, v in items])
        return self._real.update_batch(items, flags, **kw)

    def delete(self, key: bytes) -> bool:
        if self._faults.check(self._name, "delete") is not None:
            raise self._faults.error(self._name, "delete")
        self._guard("delete", [key])
        return self._real.delete(key)

    def delete_batch(self, keys: Sequence[bytes], **kw: Any) -> int:
        keys = list(keys)
        action = self._faults.check(self._name, "delete_batch")
        if action == "partial" and len(keys) > 1:
            half = keys[: len(keys) // 2]
            self._guard("delete_batch", half)
            self._real.delete_batch(half, **kw)
        if action is not None:
            raise self._faults.error(self._name, "delete_batch")
        self._guard("delete_batch", keys)
        return self._real.delete_batch(keys, **kw)


def instrument(bed: Bed, *, guard: bool = True) -> tuple[Faults, GraceClock]:
    """Put Faults (with a LiveSetGuard) around the bed's maps and a GraceClock around its
    barrier, and give the bed a new MapWriter on them (recovering what the maps hold)."""
    bed.writer.close()
    clock = GraceClock(bed.dp.barrier)
    real = dict(bed.dp.maps)
    faults = Faults(real, LiveSetGuard(real, clock) if guard else None)
    bed.dp.maps = faults.wrapped  # type: ignore[assignment]
    bed.dp.barrier = clock  # type: ignore[assignment]
    bed.writer = MapWriter(bed.dp)
    bed.writer.recover()
    return faults, clock


def kernel_view(maps: dict[str, syscall.Map]) -> dict[str, Any]:
    """What the kernel holds, decoded: frontends with their active sets, every slot key by
    owner, the ClusterIPs of kmesh_vips."""
    raw = RawMaps(maps)
    owners: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for k, _ in maps[records.MAP_SLOTS].lookup_batch():
        key = records.SLOT_KEY.unpack(k)
        owners.setdefault((key["sid"], key["set"]), set()).add((key["tier"], key["index"]))
    return {
        "table": read_table(raw),  # type: ignore[arg-type]
        "slots": owners,
        "vips": {records.decode_addr(k) for k in maps[records.MAP_VIPS].keys()},
    }


def audit(writer: MapWriter, maps: dict[str, syscall.Map], vips_follow: bool = True) -> list[str]:
    """Where the writer's books (published, vips, slot counts, free sids) disagree with the
    kernel, or the kernel holds a slot no book accounts for. Empty when all is true.
    ``vips_follow``: also require kmesh_vips to hold exactly the frontends' ClusterIPs."""
    view = kernel_view(maps)
    problems = []
    table = view["table"]
    if table != writer.published:
        diff = {str(f): (table.get(f), writer.published.get(f))
                for f in set(table) | set(writer.published)
                if table.get(f) != writer.published.get(f)}
        problems.append(f"published differs from the kernel (kernel, books): {diff}")
    if view["vips"] != writer.vips:
        problems.append(f"vips: kernel {sorted(map(str, view['vips']))}, "
                        f"books {sorted(map(str, writer.vips))}")
    want_vips = {f.ip for f in table}
    if vips_follow and view["vips"] != want_vips:
        problems.append(f"kmesh_vips {sorted(map(str, view['vips']))} is not the ClusterIPs "
                        f"of the frontends {sorted(map(str, want_vips))}")
    total = sum(len(v) for v in view["slots"].values())
    if total != writer.slots_in_use() + writer.slots_retired():
        problems.append(f"the kernel holds {total} slots, the books {writer.slots_in_use()} "
                        f"active + {writer.slots_retired()} retired")
    live = {(p.sid, p.set) for p in table.values()}
    active = sum(len(v) for o, v in view["slots"].items() if o in live)
    if active != writer.slots_in_use():
        problems.append(f"active sets hold {active} slots, the books say "
                        f"{writer.slots_in_use()}")
    free = set(getattr(writer, "_free_sids", ()))
    used = {p.sid for p in table.values()}
    if free & used:
        problems.append(f"sids {sorted(free & used)} are free and serving a frontend")
    return problems


def retired_keys_settled(writer: MapWriter, maps: dict[str, syscall.Map]) -> list[str]:
    """After ``writer.settle()``: the kernel holds exactly the slots of the active sets."""
    view = kernel_view(maps)
    problems = []
    for f, p in view["table"].items():
        if p.backends is None:
            problems.append(f"{f}: incomplete active set")
            continue
        want = {(t, i) for t, members in enumerate(p.backends.tiers)
                for i in range(len(members))}
        if view["slots"].get((p.sid, p.set), set()) != want:
            problems.append(f"{f}: active set holds {view['slots'].get((p.sid, p.set))}")
    live = {(p.sid, p.set) for p in view["table"].values()}
    stray = {o: len(v) for o, v in view["slots"].items() if o not in live}
    if stray:
        problems.append(f"slots outside every active set: {stray}")
    return problems
