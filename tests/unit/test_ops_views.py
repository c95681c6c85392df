"""The operator views of the datapath (`dump`, `status`, `explain`), on views made here: every
program's link, the reverse translations and the session affinity entries with what the next
connect does with each; a map userspace cannot walk left out of the counts."""

from __future__ import annotations

import ipaddress
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from kmesh_plugin import config as config_mod
from kmesh_plugin.agent.state import ClusterState
from kmesh_plugin.cni import spool
from kmesh_plugin.datapath import inspect, loader, records, syscall
from kmesh_plugin.datapath.build import Capacities
from kmesh_plugin.datapath.inspect import AffinityView, DatapathView, LinkView, ReverseView
from kmesh_plugin.datapath.records import (
    MODE_FAILOVER,
    MODE_RANDOM,
    MODE_STRICT,
    Backend,
    BackendSet,
    Frontend,
)
from kmesh_plugin.datapath.writer import Published
from kmesh_plugin.model import LocalityLabels, Scope
from kmesh_plugin.model.objects import object_key, parse
from kmesh_plugin.ops import explain, status
from kmesh_plugin.plugins import Plugins
from kmesh_plugin.sources.base import Event

SEC = 1_000_000_000
NOW = 5_000 * SEC  # the view's read_at (CLOCK_MONOTONIC ns)
VIP = "198.18.0.10"
FE = Frontend(ipaddress.ip_address(VIP), 5000, socket.IPPROTO_TCP)
OTHER = Frontend(ipaddress.ip_address(VIP), 53, socket.IPPROTO_UDP)
EP1, EP2, EP3 = "198.19.1.1", "198.19.2.1", "198.19.3.1"


def b(address: str, port: int = 5000) -> Backend:
    return Backend(ipaddress.ip_address(address), port)


def held(cookie: int, endpoint: str, idle_s: float, frontend: Frontend = FE,
         tier: int = 0) -> AffinityView:
    return AffinityView(cookie, frontend.pack(), frontend, b(endpoint), tier, 0,
                        NOW - int(idle_s * SEC))


def links(broken: str | None = None) -> list[LinkView]:
    out = []
    for i, name in enumerate(loader.PROGRAMS):
        if name == broken:
            out.append(LinkView(name, error=f"bpf(OBJ_GET) failed: ENOENT [links/{name}]"))
        else:
            out.append(LinkView(name, 10 + i, 20 + i, name, f"tag{i}", 7))
    return out


def view(groups: dict[Frontend, Published] | None = None,
         affinity: list[AffinityView] | None = None,
         reverse: list[ReverseView] | None = None, broken: str | None = None,
         cached: set[Frontend] | None = None) -> DatapathView:
    groups = {} if groups is None else groups
    names = list(loader.map_specs(Capacities(8, 64)))
    entries = dict.fromkeys(names, 0)
    entries[records.MAP_AFFINITY] = len(affinity or [])
    entries[records.MAP_REVERSE] = len(reverse or [])
    capacity = dict.fromkeys(names, 64)
    capacity[records.MAP_AFFINITY] = records.MAX_AFFINITY
    capacity[records.MAP_REVERSE] = records.MAX_REVERSE
    return DatapathView(Path("/sys/fs/bpf/kmesh"), groups, [FE.ip], {}, entries, capacity,
                        links(broken), "all", [], reverse or [], affinity or [], NOW,
                        set(groups) if cached is None else cached)


def sticky(*tiers: tuple[str, ...], mode: int = MODE_FAILOVER,
           timeout: int = 60) -> Published:
    return Published(0, 1, 3, BackendSet(mode, tuple(tuple(b(a) for a in t) for t in tiers),
                                         timeout))


# -- what the next connect does with an affinity entry (kmesh_sticky) -----------------------


@pytest.mark.parametrize(
    ("entry", "published", "state", "left", "why"),
    [
        (held(1, EP1, 10), sticky((EP1, EP2)), "held", 50.0, ""),
        (held(1, EP1, 60), sticky((EP1, EP2)), "held", 0.0, ""),  # at the timeout: still held
        (held(1, EP1, 60.5), sticky((EP1, EP2)), "expired", None, "60 s timeout"),
        # A last use "in the future" (garbage) wraps in the kernel's u64 arithmetic: expired.
        (AffinityView(1, FE.pack(), FE, b(EP1), 0, 0, NOW + SEC), sticky((EP1,)), "expired",
         None, "timeout"),
        # Its endpoint left the best tier: a better tier appeared, or the endpoint went.
        (held(1, EP2, 10, tier=1), sticky((EP1,), (EP2,)), "stale", 50.0, "not in tier 0"),
        (held(1, EP3, 10), sticky((EP1, EP2)), "stale", 50.0, "not in tier 0"),
        (held(1, EP2, 10, tier=1), sticky((), (EP2,)), "held", 50.0, ""),
        # Strict picks from tier 0 only: an empty tier 0 refuses.
        (held(1, EP2, 10, tier=1), sticky((), (EP2,), mode=MODE_STRICT), "stale", 50.0,
         "no eligible endpoint"),
        (held(1, EP1, 10), sticky((EP1,), timeout=0), "stale", None, "no session affinity"),
        (held(1, EP1, 10), Published(0, 0, 1, None), "stale", None, "incomplete"),
        (held(1, EP1, 10), None, "stale", None, "no such frontend"),
    ],
)
def test_affinity_state(entry: AffinityView, published: Published | None, state: str,
                        left: float | None, why: str) -> None:
    got = inspect.affinity_state(entry, published, NOW)
    assert got.state == state
    assert got.left_seconds == (None if left is None else pytest.approx(left))
    assert why in got.why and (why != "" or got.why == "")


def test_affinity_json_is_rounded_and_named() -> None:
    entry = AffinityView(4097, FE.pack(), FE, b(EP1), 0, 2, NOW - 12_345_678_901)
    assert inspect.affinity_json(entry, sticky((EP1,)), NOW) == {
        "netns_cookie": 4097, "frontend": "198.18.0.10:5000/TCP", "endpoint": "198.19.1.1:5000",
        "tier": 0, "index": 2, "last_used_ns": NOW - 12_345_678_901, "idle_seconds": 12.3,
        "left_seconds": 47.7, "state": "held", "why": "",
    }


def test_an_entry_under_a_key_no_connect_builds_has_no_group() -> None:
    # A frontend key with a non-zero pad decodes to FE, but no connect looks it up.
    key = bytearray(FE.pack())
    key[-1] = 1
    odd = AffinityView(1, bytes(key), FE, b(EP1), 0, 0, NOW)
    v = view({FE: sticky((EP1,))}, [odd])
    assert v.published_for(odd) is None
    assert v.published_for(held(1, EP1, 1)) is not None


# -- reading the maps -----------------------------------------------------------------------


class FakeMap:
    def __init__(self, map_type: int, max_entries: int,
                 items: list[tuple[bytes, bytes]] | None = None) -> None:
        self.map_type = map_type
        self.max_entries = max_entries
        self.items = items or []
        self.batches = 0

    def lookup_batch(self) -> list[tuple[bytes, bytes]]:
        if self.map_type == syscall.BPF_MAP_TYPE_SK_STORAGE:
            raise AssertionError("socket storage cannot be walked (ENOTSUPP)")
        self.batches += 1
        return list(self.items)

    def keys(self) -> list[bytes]:
        return [k for k, _ in self.lookup_batch()]

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        return None  # no counters yet


class FakeDatapath:
    capacities = Capacities(8, 64)

    def __init__(self, maps: dict[str, FakeMap]) -> None:
        self.maps = maps
        self.pins = loader.Pins(Path("/sys/fs/bpf/kmesh"))

    def __getitem__(self, name: str) -> FakeMap:
        return self.maps[name]

    def enrolment(self) -> int:
        return records.ENROL_ALL

    def enrolled(self) -> list[int]:
        return []


# A socket storage map, as an earlier draft of the datapath pinned one: it cannot be walked.
PEERS = "kmesh_peers"


@pytest.fixture
def with_socket_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    real = loader.map_specs

    def specs(capacities: Capacities) -> dict[str, loader.MapSpec]:
        return {**real(capacities), PEERS: loader.MapSpec(
            syscall.BPF_MAP_TYPE_SK_STORAGE, 4, 40, 0, syscall.BPF_F_NO_PREALLOC)}

    monkeypatch.setattr(inspect, "map_specs", specs)


def fake_datapath(reverse: list[tuple[bytes, bytes]],
                  affinity: list[tuple[bytes, bytes]],
                  translated: list[tuple[bytes, bytes]] | None = None) -> FakeDatapath:
    maps = {}
    for name, spec in inspect.map_specs(FakeDatapath.capacities).items():
        maps[name] = FakeMap(spec.map_type, spec.max_entries)
    maps[records.MAP_REVERSE].items = reverse
    maps[records.MAP_TRANSLATED].items = translated or []
    maps[records.MAP_AFFINITY].items = affinity
    return FakeDatapath(maps)


def reverse_entry(cookie: int, endpoint: Backend, frontend: Frontend) -> tuple[bytes, bytes]:
    return (records.REVERSE_KEY.pack({"socket_cookie": cookie, "endpoint": endpoint.pack()}),
            records.REVERSE.pack({"frontend": frontend.pack()}))


def translated_entry(slot: int, cookie: int, endpoint: Backend, frontend: Frontend,
                     check: int | None = None) -> tuple[bytes, bytes]:
    if check is None:
        check = records.translation_check(cookie, endpoint.pack(), frontend.pack())
    return (records.U32.pack(slot), records.TRANSLATION.pack(
        {"socket_cookie": cookie, "endpoint": endpoint.pack(), "frontend": frontend.pack(),
         "check": check}))


def test_read_shows_only_whole_translations(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = translated_entry(1, 40, b(EP1, 53), OTHER)
    torn = translated_entry(2, 41, b(EP2, 53), OTHER,
                            check=records.translation_check(41, b(EP2, 53).pack(), FE.pack()))
    empty = (records.U32.pack(3), bytes(records.TRANSLATION.size))
    dp = fake_datapath([reverse_entry(9, b(EP2, 53), OTHER)], [], [empty, torn, whole])
    monkeypatch.setattr(inspect, "read_table", lambda dp: {FE: sticky((EP1,), (EP2,))})
    monkeypatch.setattr(inspect, "read_links", lambda pin_dir: links())
    v = inspect.read(dp)  # type: ignore[arg-type]
    assert v.reverse == [ReverseView(40, b(EP1, 53), OTHER, held="translated"),
                         ReverseView(9, b(EP2, 53), OTHER)]
    assert v.entries[records.MAP_TRANSLATED] == 1
    assert v.capacity[records.MAP_TRANSLATED] == records.MAX_TRANSLATED


def cache_line(frontend: Frontend, sid: int, which: int = 0,
               lines: int = FakeDatapath.capacities.frontend_lines) -> tuple[bytes, bytes]:
    line = records.frontend_candidates(frontend.pack(), lines)[which]
    return records.U32.pack(line), records.frontend_line(frontend.pack(), sid)


def test_read_counts_only_the_cache_lines_a_connect_would_use(
        monkeypatch: pytest.MonkeyPatch) -> None:
    groups = {FE: sticky((EP1,), (EP2,)),
              OTHER: Published(1, 0, 1, BackendSet(MODE_RANDOM, ((b(EP1, 53),),)))}
    good = cache_line(FE, groups[FE].sid, which=-1)  # the last line of its second pair
    wrong_sid = cache_line(OTHER, 7)  # whole, but not the sid OTHER has
    key, value = cache_line(OTHER, 1, which=1)
    torn = bytearray(value)
    torn[0] ^= 1  # the check no longer covers the fields
    lines = FakeDatapath.capacities.frontend_lines
    mine = records.frontend_candidates(OTHER.pack(), lines)
    elsewhere = (next(n for n in range(lines) if n not in mine), value)  # none of its lines
    dp = fake_datapath([], [])
    dp.maps[records.MAP_FRONTEND_CACHE].items = [
        good, wrong_sid, (key, bytes(torn)), (records.U32.pack(elsewhere[0]), elsewhere[1])]
    monkeypatch.setattr(inspect, "read_table", lambda dp: groups)
    monkeypatch.setattr(inspect, "read_links", lambda pin_dir: links())
    v = inspect.read(dp)  # type: ignore[arg-type]
    assert v.cached == {FE}
    assert v.entries[records.MAP_FRONTEND_CACHE] == 1
    text = status.render_dump(v, [])
    assert f"{OTHER}  sid 1, set 0, generation 1, random, found by hash" in text
    assert [g["cached"] for g in v.to_json()["frontends"]] == [True, False]


def affinity_entry(cookie: int, frontend: Frontend, endpoint: Backend, tier: int, index: int,
                   last_used: int) -> tuple[bytes, bytes]:
    return (records.AFFINITY_KEY.pack({"netns_cookie": cookie, "frontend": frontend.pack()}),
            records.AFFINITY.pack({"endpoint": endpoint.pack(), "tier": tier, "index": index,
                                   "last_used": last_used}))


@pytest.mark.usefixtures("with_socket_storage")
def test_read_decodes_reverse_and_affinity_and_skips_a_socket_storage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dp = fake_datapath(
        [reverse_entry(9, b(EP2, 53), OTHER), reverse_entry(3, b(EP1, 53), OTHER)],
        [affinity_entry(77, FE, b(EP2), 1, 4, 123), affinity_entry(5, FE, b(EP1), 0, 0, 456)],
    )
    monkeypatch.setattr(inspect, "read_table", lambda dp: {FE: sticky((EP1,), (EP2,))})
    monkeypatch.setattr(inspect, "read_links", lambda pin_dir: links())
    v = inspect.read(dp)  # type: ignore[arg-type]
    assert PEERS in dp.maps
    assert PEERS not in v.entries and PEERS not in v.capacity
    assert v.entries[records.MAP_REVERSE] == 2 and v.entries[records.MAP_AFFINITY] == 2
    assert v.capacity[records.MAP_AFFINITY] == records.MAX_AFFINITY
    # Read once each: the lists and the counts come from the same read.
    assert dp.maps[records.MAP_REVERSE].batches == dp.maps[records.MAP_AFFINITY].batches == 1
    assert v.reverse == [ReverseView(3, b(EP1, 53), OTHER), ReverseView(9, b(EP2, 53), OTHER)]
    assert v.affinity == [AffinityView(5, FE.pack(), FE, b(EP1), 0, 0, 456),
                          AffinityView(77, FE.pack(), FE, b(EP2), 1, 4, 123)]
    assert v.read_at > 0
    out = json.loads(json.dumps(v.to_json()))
    assert PEERS not in out["maps"]
    assert [a["state"] for a in out["affinity"]] == ["expired", "expired"]  # used at boot
    assert out["reverse"][0] == {"socket_cookie": 3, "endpoint": "198.19.1.1:53",
                                 "frontend": "198.18.0.10:53/UDP", "held": "reverse"}
    assert out["frontends"][0]["affinity_timeout"] == 60


@pytest.mark.usefixtures("with_socket_storage")
def test_map_fill_counts_every_map_but_per_object_ones() -> None:
    dp = fake_datapath([reverse_entry(1, b(EP1), OTHER)], [])
    entries, capacity = inspect.map_fill(dp, {})  # type: ignore[arg-type]
    assert set(entries) == set(capacity) == set(loader.map_specs(dp.capacities))
    assert entries[records.MAP_REVERSE] == 1


# -- dump and status ------------------------------------------------------------------------


def test_dump_shows_every_link_the_reverse_and_the_affinity_entries() -> None:
    v = view({FE: sticky((EP1, EP2), (EP3,)), OTHER: Published(1, 0, 1, BackendSet(
        MODE_RANDOM, ((b(EP1, 53),),)))},
        [held(4097, EP1, 12), held(4098, EP3, 5, tier=1), held(4099, EP2, 61)],
        [ReverseView(11, b(EP1, 53), OTHER)])
    text = status.render_dump(v, [])
    for name in loader.PROGRAMS:
        assert f"link {name}: id " in text
    # Whatever the datapath attaches now (connect, sendmsg, recvmsg, getpeername, ...).
    assert {records.PROG_CONNECT4, records.PROG_SENDMSG6, records.PROG_RECVMSG4,
            records.PROG_GETPEERNAME6} <= set(loader.PROGRAMS)
    assert f"  {records.MAP_AFFINITY:<20}        3 / 65536" in text
    assert f"  {records.MAP_REVERSE:<20}        1 / 65536" in text
    assert "198.18.0.10:5000/TCP  sid 0, set 1, generation 3, failover, session affinity 60 s" \
        in text
    assert "198.18.0.10:53/UDP  sid 1, set 0, generation 1, random\n" in text
    assert "reverse translations (1)" in text
    assert "socket cookie 11: 198.19.1.1:53 shown as 198.18.0.10:53/UDP" in text
    assert "session affinity (3)" in text
    assert ("netns cookie 4097: 198.18.0.10:5000/TCP -> 198.19.1.1:5000, slot tier 0 index 0, "
            "idle 12 s, 48 s left: held") in text
    assert ("netns cookie 4098: 198.18.0.10:5000/TCP -> 198.19.3.1:5000, slot tier 1 index 0, "
            "idle 5 s, 55 s left: stale (endpoint not in tier 0, the tier a connect picks "
            "from)") in text
    assert "netns cookie 4099:" in text and "idle 61 s: expired" in text


def test_status_lists_every_link_and_every_map(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    cfg = load_config(tmp_path)
    v = view(broken=records.PROG_GETPEERNAME6)
    v.capacity[records.MAP_CONFIG] = 0  # what a zero capacity would be shown as
    monkeypatch.setattr(status, "dump", lambda cfg: v)
    st = json.loads(json.dumps(status.status(cfg)))
    dp = st["datapath"]
    assert [link["name"] for link in dp["links"]] == list(loader.PROGRAMS)
    assert dp["attached"] is False  # one link is missing
    assert set(dp["maps"]) == set(loader.map_specs(Capacities(8, 64)))
    assert dp["maps"][records.MAP_CONFIG]["fill"] == 0.0
    assert dp["maps"][records.MAP_AFFINITY] == {"entries": 0, "capacity": 65536, "fill": 0.0}
    text = status.render_status(st)
    assert "datapath: DETACHED" in text
    for name in loader.PROGRAMS:
        assert f"  {name}: " in text
    assert f"  {records.PROG_GETPEERNAME6}: bpf(OBJ_GET) failed" in text
    assert f"  {records.PROG_RECVMSG4}: link 14 -> program kmesh_recvmsg4" in text
    v.links = links()
    assert json.loads(json.dumps(status.status(cfg)))["datapath"]["attached"] is True


# -- explain --------------------------------------------------------------------------------


def load_config(tmp_path: Path) -> config_mod.Config:
    # Made directly, not loaded: loading checks the cgroup, which a unit test has no need of.
    manifests = tmp_path / "manifests"
    manifests.mkdir(exist_ok=True)
    return config_mod.Config(
        path=tmp_path / "plugin.toml", node_name="worker1", cgroup=tmp_path / "cgroup",
        pin_dir=tmp_path / "pins", build_dir=tmp_path / "build", clang="clang",
        bpftool="bpftool", capacities=Capacities(8, 64), locality=LocalityLabels(),
        enabled=("local", "prefer_close"), prefer_close_scopes=(Scope.REGION, Scope.ZONE),
        source_kind="manifests", source_path=manifests, kubeconfig=None,
        status_file=tmp_path / "status.json", log_level="info", log_format="json",
        metrics=False, metrics_address="127.0.0.1", metrics_port=0,
        cni_state_dir=tmp_path / "cni",
    )


def objects(**spec: Any) -> list[dict[str, Any]]:
    labels = {"topology.kubernetes.io/region": "r", "topology.kubernetes.io/zone": "z"}
    return [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "worker1", "labels": labels}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "svc", "namespace": "t"},
         "spec": {"clusterIP": VIP, "ports": [{"name": "http", "port": 5000},
                                              {"name": "dns", "port": 53, "protocol": "UDP"}],
                  **spec}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "svc-1", "namespace": "t",
                      "labels": {"kubernetes.io/service-name": "svc"}},
         "addressType": "IPv4",
         "ports": [{"name": "http", "port": 5000}, {"name": "dns", "port": 53,
                                                    "protocol": "UDP"}],
         "endpoints": [{"addresses": [a], "nodeName": "worker1",
                        "targetRef": {"kind": "Pod", "name": f"pod-{i}"}}
                       for i, a in enumerate((EP1, EP2), 1)]},
    ]


def state_of(**spec: Any) -> ClusterState:
    state = ClusterState(LocalityLabels(), "worker1")
    state.apply([Event(object_key(o), parse(o)) for o in objects(**spec)])
    return state


class OpenedDatapath:
    def close(self) -> None:
        pass


def run_explain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, v: DatapathView | None,
                **spec: Any) -> explain.Explanation:
    cfg = load_config(tmp_path)
    if v is not None:
        monkeypatch.setattr(explain.Datapath, "open",
                            classmethod(lambda cls, pin_dir, read_only: OpenedDatapath()))
        monkeypatch.setattr(explain.inspect, "read", lambda dp: v)
    return explain.explain(cfg, Plugins.load(cfg.enabled), "t", "svc", state=state_of(**spec))


def test_explain_shows_the_affinity_intent_the_record_and_the_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = {"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}
    udp = Published(1, 0, 1, BackendSet(MODE_RANDOM, ((b(EP1, 53), b(EP2, 53)),), 60))
    v = view({FE: sticky((EP1, EP2), mode=MODE_RANDOM), OTHER: udp},
             [held(4097, EP1, 12), held(4098, EP3, 5), held(4099, EP2, 70),
              held(5000, EP1, 1, frontend=OTHER)])
    rec = spool.PodRecord("c" * 64, "eth0", "/run/netns/a", 4097, "t", "client-a")
    spool.write_record(tmp_path / "cni", rec)
    e = run_explain(tmp_path, monkeypatch, v, **spec)
    assert e.warnings == []  # maps and intent agree, the timeout included
    tcp, dns = e.groups
    assert (tcp.session_affinity, tcp.affinity_timeout) == ("ClientIP", 60)
    assert tcp.kernel is not None and tcp.kernel.affinity_timeout == 60
    # Only this frontend's entries, with the client pod and the endpoint's pod named.
    assert [(a["netns_cookie"], a["client"], a["endpoint"], a["state"])
            for a in tcp.kernel.affinity] == [
        (4097, "t/client-a", "198.19.1.1:5000 (pod-1)", "held"),
        (4098, None, "198.19.3.1:5000", "stale"),
        (4099, None, "198.19.2.1:5000 (pod-2)", "expired"),
    ]
    assert dns.kernel is not None
    assert [a["netns_cookie"] for a in dns.kernel.affinity] == [5000]
    out = json.loads(json.dumps(e.to_json()))
    group = out["groups"][0]
    assert group["session_affinity"] == "ClientIP" and group["affinity_timeout"] == 60
    assert group["kernel"]["affinity_timeout"] == 60
    assert group["kernel"]["affinity"][0]["left_seconds"] == 48.0
    text = explain.render(e)
    assert "  session affinity: ClientIP, timeout 60 s (a client network namespace keeps" in text
    assert "generation 3, random, endpoints per tier [2], session affinity 60 s" in text
    assert ("a connect from worker1 now picks from tier 0: 198.19.1.1:5000 (pod-1), "
            "198.19.2.1:5000 (pod-2); a client held to one of them (below) gets it again") \
        in text
    assert "  session affinity entries (3):" in text
    assert ("    netns cookie 4097 (t/client-a): 198.19.1.1:5000 (pod-1), slot tier 0 index 0, "
            "idle 12 s, 48 s left: held") in text
    assert "    netns cookie 4098: 198.19.3.1:5000, slot tier 0 index 0, idle 5 s, 55 s left: " \
           "stale (endpoint not in tier 0" in text
    assert "idle 70 s: expired (idle longer than its 60 s timeout)" in text


def test_explain_without_affinity_and_a_record_that_disagrees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The maps still hold an affinity the Service dropped: a mismatch that says so.
    v = view({FE: sticky((EP1, EP2), mode=MODE_RANDOM, timeout=60)}, [held(4097, EP1, 1)])
    e = run_explain(tmp_path, monkeypatch, v)
    tcp, dns = e.groups
    assert (tcp.session_affinity, tcp.affinity_timeout) == ("None", 0)
    assert tcp.mismatch is not None and "session affinity 60 s), intent" in tcp.mismatch
    assert tcp.kernel is not None and [a["state"] for a in tcp.kernel.affinity] == ["held"]
    assert dns.kernel is None and dns.kernel_note == "no frontend in the maps"
    text = explain.render(e)
    assert "  session affinity: None" in text
    # A record without affinity: stated, and no entries section.
    v = view({FE: sticky((EP1, EP2), mode=MODE_RANDOM, timeout=0)})
    e = run_explain(tmp_path, monkeypatch, v)
    assert e.groups[0].mismatch is None
    text = explain.render(e)
    assert "endpoints per tier [2], no session affinity" in text
    assert "session affinity entries" not in text
    assert "now picks, uniformly, from tier 0" in text


def test_explain_with_an_incomplete_set_still_lists_the_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    v = view({FE: Published(0, 0, 1, None)}, [held(4097, EP1, 1)])
    e = run_explain(tmp_path, monkeypatch, v, sessionAffinity="ClientIP")
    k = e.groups[0].kernel
    assert k is not None and k.affinity_timeout is None
    assert [a["state"] for a in k.affinity] == ["stale"]
    json.dumps(e.to_json())
    explain.render(e)


def test_explain_without_a_datapath(tmp_path: Path) -> None:
    e = run_explain(tmp_path, pytest.MonkeyPatch(), None, sessionAffinity="ClientIP")
    assert [g.affinity_timeout for g in e.groups] == [10800, 10800]
    assert all(g.kernel is None and g.kernel_note and g.kernel_note.startswith("not read")
               for g in e.groups)
    assert "session affinity: ClientIP, timeout 10800 s" in explain.render(e)
