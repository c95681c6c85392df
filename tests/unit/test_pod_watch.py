"""The agent follows kmesh-cni's records and fires the pod hooks through pluggy, once per change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kmesh_plugin.agent.pods import PodWatch
from kmesh_plugin.cni import spool
from kmesh_plugin.hookspecs import hookimpl
from kmesh_plugin.model import Locality, NodeInfo
from kmesh_plugin.plugins import Plugins


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    @hookimpl
    def kmesh_pod_enrolled(self, pod: Any, node: Any) -> None:
        self.calls.append(("enrolled", f"{pod.namespace}/{pod.name}", node.name))

    @hookimpl
    def kmesh_pod_removed(self, pod: Any, node: Any) -> None:
        self.calls.append(("removed", f"{pod.namespace}/{pod.name}", node.name))


class Broken:
    @hookimpl
    def kmesh_pod_enrolled(self, pod: Any, node: Any) -> None:
        raise RuntimeError("a third-party bug")


def record(cid: str, name: str, cookie: int) -> spool.PodRecord:
    return spool.PodRecord(cid, "eth0", f"/var/run/netns/{cid}", cookie, "sample", name, "",
                           ("198.18.0.9",), "1.0.0", 1.0)


def watch(tmp_path: Path, *plugins: tuple[object, str]) -> PodWatch:
    p = Plugins()
    for plugin, name in plugins:
        p.register(plugin, name)
    node = NodeInfo("w1", Locality(), {})
    return PodWatch(tmp_path, p, lambda: node)


def test_enrolments_and_removals_fire_once_each(tmp_path: Path) -> None:
    rec = Recorder()
    w = watch(tmp_path, (rec, "recorder"))
    assert w.poll() == 0  # no state directory yet
    spool.write_record(tmp_path, record("c1", "a", 11))
    spool.write_record(tmp_path, record("c2", "b", 12))
    assert w.poll() == 2
    assert w.poll() == 0  # unchanged directory: not even read again
    spool.remove_record(tmp_path, "c1", "eth0")
    assert w.poll() == 1
    assert sorted(rec.calls) == [("enrolled", "sample/a", "w1"), ("enrolled", "sample/b", "w1"),
                                 ("removed", "sample/a", "w1")]
    assert w.status()["pods"] == 1


def test_a_malformed_record_and_a_failing_plugin_stop_nothing(tmp_path: Path) -> None:
    rec = Recorder()
    w = watch(tmp_path, (Broken(), "broken"), (rec, "recorder"))
    spool.write_record(tmp_path, record("c1", "a", 11))
    Path(spool.pods_dir(tmp_path), "junk.json").write_text("{not json")
    assert w.poll() == 1
    assert rec.calls == [("enrolled", "sample/a", "w1")]
