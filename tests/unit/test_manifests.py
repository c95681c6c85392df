"""The manifest directory source: batches, errors, revisions and inotify wake-ups."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kmesh_plugin.errors import KmeshError
from kmesh_plugin.model import EndpointSlice, Namespace, Node, ObjectKey, Service
from kmesh_plugin.sources.base import Batch, Event
from kmesh_plugin.sources.manifests import ManifestSource

# Long enough that returning before it proves an inotify wake-up, never waited out in full
# by a passing test.
WAKE_TIMEOUT = 10.0
PROMPT = 2.0


def node(name: str, zone: str = "zone1") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}}


def service(name: str, port: Any = 5000, ns: str = "sample") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": "198.18.0.10", "ports": [{"name": "http", "port": port}]}}


def endpoint_slice(name: str, service_name: str, address: str = "198.19.1.1") -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "sample",
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 5000}],
        "endpoints": [{"addresses": [address], "nodeName": "worker1"}],
    }


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def deployment(name: str) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": "sample"}, "spec": {"replicas": 1}}


def dump(*docs: dict[str, Any]) -> str:
    return yaml.safe_dump_all(list(docs), sort_keys=False)


NODE1 = ObjectKey("Node", "", "worker1")
NODE2 = ObjectKey("Node", "", "worker2")
HELLO = ObjectKey("Service", "sample", "helloworld")
WEB = ObjectKey("Service", "sample", "web")
SLICE = ObjectKey("EndpointSlice", "sample", "helloworld-1")
NS = ObjectKey("Namespace", "", "sample")


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


def by_key(batch: Batch) -> dict[ObjectKey, Any]:
    keys = [e.key for e in batch.events]
    assert len(keys) == len(set(keys)), f"duplicate events: {keys}"
    return {e.key: e.obj for e in batch.events}


def first(source: ManifestSource) -> Batch:
    batch = source.next_batch(0)
    assert batch is not None
    assert batch.synced
    return batch


def changed(source: ManifestSource) -> Batch:
    """The batch for changes made since the last call (already queued: no waiting)."""
    start = time.monotonic()
    batch = source.next_batch(WAKE_TIMEOUT)
    assert batch is not None, "no batch after a change"
    assert time.monotonic() - start < PROMPT
    return batch


def rename_in(directory: Path, name: str, text: str) -> None:
    """Write atomically: into a staging file outside the watched directory, then rename."""
    staging = directory.parent / f".staging-{name}"
    staging.write_text(text)
    os.replace(staging, directory / name)


# -- the initial batch --------------------------------------------------------------------


def test_initial_batch_holds_everything(directory: Path, source: ManifestSource) -> None:
    (directory / "nodes.yaml").write_text(dump(node("worker1"), node("worker2")))
    (directory / "app.yml").write_text(dump(namespace("sample"), service("helloworld"),
                                            endpoint_slice("helloworld-1", "helloworld")))
    (directory / "web.json").write_text(json.dumps(service("web")))
    batch = first(source)
    assert batch.errors == []
    assert batch.revision is None
    objects = by_key(batch)
    assert set(objects) == {NODE1, NODE2, HELLO, WEB, SLICE, NS}
    assert all(e.obj is not None for e in batch.events)
    assert isinstance(objects[NODE1], Node)
    assert objects[NODE1].labels == {"topology.kubernetes.io/zone": "zone1"}
    assert isinstance(objects[NS], Namespace)
    assert isinstance(objects[HELLO], Service)
    assert objects[HELLO].ports[0].port == 5000
    assert isinstance(objects[SLICE], EndpointSlice)
    assert objects[SLICE].service_name == "helloworld"
    assert source.describe()["objects"] == 6
    assert source.describe()["synced"] is True


def test_initial_batch_of_an_empty_directory_is_synced(source: ManifestSource) -> None:
    batch = first(source)
    assert batch.events == []
    assert batch.errors == []


def test_list_documents(directory: Path, source: ManifestSource) -> None:
    (directory / "list.yaml").write_text(dump(
        {"apiVersion": "v1", "kind": "List", "items": [node("worker1"), service("helloworld")]},
        {"apiVersion": "v1", "kind": "NodeList", "items": [node("worker2")]},
        {"apiVersion": "v1", "kind": "List",
         "items": [{"apiVersion": "v1", "kind": "List", "items": [service("web")]}]},
    ))
    assert set(by_key(first(source))) == {NODE1, NODE2, HELLO, WEB}


def test_other_kinds_and_files_are_ignored(directory: Path, source: ManifestSource) -> None:
    (directory / "mixed.yaml").write_text(
        dump(deployment("helloworld"), service("helloworld"),
             {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}})
        + "---\n"  # an empty document
    )
    (directory / "README.md").write_text("kind: Node\n")
    (directory / ".hidden.yaml").write_text(dump(node("hidden")))
    (directory / "subdir").mkdir()
    batch = first(source)
    assert set(by_key(batch)) == {HELLO}
    assert batch.errors == []


def test_a_directory_named_like_a_manifest_is_reported(
    directory: Path, source: ManifestSource
) -> None:
    # Not silently skipped: someone meant it to be read. Reported, and nothing else changes.
    (directory / "subdir.yaml").mkdir()
    (directory / "good.yaml").write_text(dump(node("worker1")))
    batch = first(source)
    assert set(by_key(batch)) == {NODE1}
    assert batch.errors == [f"{directory / 'subdir.yaml'}: is a directory, not a regular file"]
    assert source.describe()["errors"] == {"subdir.yaml": batch.errors[0]}


def test_symlinked_files_are_read(directory: Path, source: ManifestSource) -> None:
    # A ConfigMap volume is a tree of symlinks: what a link points at is what counts.
    target = directory.parent / "real.yaml"
    target.write_text(dump(node("worker1")))
    (directory / "linked.yaml").symlink_to(target)
    (directory / "zero.yaml").symlink_to("/dev/zero")
    (directory / "dangling.yaml").symlink_to(directory.parent / "absent.yaml")
    batch = first(source)
    assert set(by_key(batch)) == {NODE1}
    assert batch.errors == [
        f"{directory / 'zero.yaml'}: is a character device, not a regular file"
    ]


def test_a_configmap_update_is_seen(directory: Path, source: ManifestSource) -> None:
    # kubelet's atomic writer: files link through ..data, an update swaps ..data alone.
    v1, v2 = directory / "..v1", directory / "..v2"
    v1.mkdir()
    (v1 / "nodes.yaml").write_text(dump(node("worker1", zone="zone1")))
    (directory / "..data").symlink_to("..v1")
    (directory / "nodes.yaml").symlink_to("..data/nodes.yaml")
    assert by_key(first(source))[NODE1].labels == {"topology.kubernetes.io/zone": "zone1"}
    v2.mkdir()
    (v2 / "nodes.yaml").write_text(dump(node("worker1", zone="zone2")))
    (directory / "..data_tmp").symlink_to("..v2")
    os.replace(directory / "..data_tmp", directory / "..data")
    objects = by_key(changed(source))
    assert objects[NODE1].labels == {"topology.kubernetes.io/zone": "zone2"}


def test_start_on_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(KmeshError, match=str(tmp_path / "absent")):
        ManifestSource(tmp_path / "absent").start()


# -- changes ------------------------------------------------------------------------------


def test_nothing_changed_is_none(directory: Path, source: ManifestSource) -> None:
    (directory / "a.yaml").write_text(dump(node("worker1")))
    first(source)
    assert source.next_batch(0.05) is None


def test_modification_yields_only_changed_objects(
    directory: Path, source: ManifestSource
) -> None:
    path = directory / "cluster.yaml"
    path.write_text(dump(node("worker1"), node("worker2"), service("helloworld")))
    first(source)
    # Same length, rewritten in place right away: only the content tells the change.
    path.write_text(dump(node("worker1"), node("worker2", zone="zone2"), service("helloworld")))
    batch = changed(source)
    assert batch.synced
    assert batch.errors == []
    objects = by_key(batch)
    assert list(objects) == [NODE2]
    assert objects[NODE2].labels == {"topology.kubernetes.io/zone": "zone2"}
    assert source.next_batch(0.05) is None


def test_rewrite_with_same_inode_size_and_mtime_is_seen(
    directory: Path, source: ManifestSource
) -> None:
    # A coarse timestamp clock gives two quick writes the same mtime: the content decides.
    path = directory / "a.yaml"
    path.write_text(dump(node("worker1", zone="zone1")))
    before = path.stat()
    first(source)
    with open(path, "r+") as f:
        f.write(dump(node("worker1", zone="zone2")))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns
    )
    objects = by_key(changed(source))
    assert objects[NODE1].labels == {"topology.kubernetes.io/zone": "zone2"}


def test_identical_rewrite_yields_no_event(directory: Path, source: ManifestSource) -> None:
    (directory / "a.yaml").write_text(dump(node("worker1")))
    first(source)
    rename_in(directory, "a.yaml", dump(node("worker1")))
    batch = changed(source)
    assert batch.events == []


def test_new_file_yields_its_objects(directory: Path, source: ManifestSource) -> None:
    (directory / "a.yaml").write_text(dump(node("worker1")))
    first(source)
    (directory / "b.yaml").write_text(dump(service("helloworld")))
    assert list(by_key(changed(source))) == [HELLO]


def test_object_moved_between_files_is_no_change(
    directory: Path, source: ManifestSource
) -> None:
    (directory / "a.yaml").write_text(dump(node("worker1"), service("helloworld")))
    first(source)
    rename_in(directory, "b.yaml", dump(service("helloworld")))
    rename_in(directory, "a.yaml", dump(node("worker1")))
    batch = changed(source)
    assert batch.events == []
    assert batch.errors == []


def test_deleting_a_file_yields_deletions(directory: Path, source: ManifestSource) -> None:
    (directory / "a.yaml").write_text(dump(node("worker1")))
    (directory / "b.yaml").write_text(dump(service("helloworld"),
                                           endpoint_slice("helloworld-1", "helloworld")))
    first(source)
    (directory / "b.yaml").unlink()
    batch = changed(source)
    assert batch.events == [Event(HELLO, None), Event(SLICE, None)]
    assert source.describe()["objects"] == 1


def test_removing_an_object_from_a_file(directory: Path, source: ManifestSource) -> None:
    (directory / "a.yaml").write_text(dump(node("worker1"), node("worker2")))
    first(source)
    rename_in(directory, "a.yaml", dump(node("worker2")))
    assert changed(source).events == [Event(NODE1, None)]


# -- broken files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("kind: Node\nmetadata: {name: worker1\n", "invalid YAML"),
        (dump(node("worker1"), service("helloworld", port="http")),
         "Service sample/helloworld: spec.ports[0].port"),
        (dump(node("worker1"), service("helloworld", port=70000)), "spec.ports[0].port"),
        (dump(node("worker1"), node("worker1")), "appears twice"),
        (dump(node("worker1")) + "---\n- just\n- a list\n", "document 2 is not a mapping"),
        (dump(node("worker1"), {"kind": "Service", "metadata": {}}), "metadata.name"),
    ],
)
def test_broken_file_keeps_its_previous_content(
    directory: Path, source: ManifestSource, text: str, fragment: str
) -> None:
    path = directory / "cluster.yaml"
    path.write_text(dump(node("worker1"), service("helloworld")))
    (directory / "other.yaml").write_text(dump(node("worker2")))
    first(source)

    rename_in(directory, "cluster.yaml", text)
    batch = changed(source)
    assert batch.events == []  # no deletion, no half-applied change
    assert len(batch.errors) == 1
    assert batch.errors[0].startswith(f"{path}: ")
    assert fragment in batch.errors[0]
    assert source.describe()["errors"] == {"cluster.yaml": batch.errors[0]}
    assert source.describe()["objects"] == 3

    # Other files still apply while this one is broken.
    rename_in(directory, "other.yaml", dump(node("worker2", zone="zone9")))
    batch = changed(source)
    assert list(by_key(batch)) == [NODE2]

    # Fixed: its changes apply and the error is gone.
    rename_in(directory, "cluster.yaml", dump(node("worker1", zone="zone3")))
    batch = changed(source)
    assert batch.errors == []
    objects = by_key(batch)
    assert set(objects) == {NODE1, HELLO}
    assert objects[HELLO] is None
    assert objects[NODE1].labels == {"topology.kubernetes.io/zone": "zone3"}
    assert source.describe()["errors"] == {}


def test_broken_new_file_contributes_nothing(directory: Path, source: ManifestSource) -> None:
    (directory / "good.yaml").write_text(dump(node("worker1")))
    (directory / "bad.yaml").write_text(dump(node("worker2"), service("helloworld", port=0)))
    batch = first(source)
    assert set(by_key(batch)) == {NODE1}
    assert len(batch.errors) == 1
    assert str(directory / "bad.yaml") in batch.errors[0]
    assert "spec.ports[0].port" in batch.errors[0]


def test_non_utf8_file_is_an_error(directory: Path, source: ManifestSource) -> None:
    (directory / "good.yaml").write_text(dump(node("worker1")))
    (directory / "bad.yaml").write_bytes(b"kind: Node\nmetadata: {name: \xff\xfe}\n")
    batch = first(source)
    assert set(by_key(batch)) == {NODE1}
    assert len(batch.errors) == 1
    assert str(directory / "bad.yaml") in batch.errors[0]


def test_broken_json(directory: Path, source: ManifestSource) -> None:
    (directory / "a.json").write_text('{"kind": "Node", ')
    batch = first(source)
    assert batch.events == []
    assert len(batch.errors) == 1
    assert batch.errors[0].startswith(f"{directory / 'a.json'}: ")


def test_deleting_a_broken_file_removes_its_last_good_content(
    directory: Path, source: ManifestSource
) -> None:
    (directory / "a.yaml").write_text(dump(node("worker1")))
    first(source)
    rename_in(directory, "a.yaml", "{{{")
    assert changed(source).events == []
    (directory / "a.yaml").unlink()
    batch = changed(source)
    assert batch.events == [Event(NODE1, None)]
    assert source.describe()["errors"] == {}


def test_same_object_in_two_files_first_file_wins(
    directory: Path, source: ManifestSource
) -> None:
    (directory / "a.yaml").write_text(dump(node("worker1", zone="from-a")))
    (directory / "b.yaml").write_text(dump(node("worker1", zone="from-b"), node("worker2")))
    batch = first(source)
    objects = by_key(batch)
    assert set(objects) == {NODE1, NODE2}
    assert objects[NODE1].labels == {"topology.kubernetes.io/zone": "from-a"}
    assert len(batch.errors) == 1
    assert "Node worker1" in batch.errors[0]
    assert "a.yaml" in batch.errors[0] and "b.yaml" in batch.errors[0]

    # The first file loses it: the second file's copy takes over, with no deletion.
    rename_in(directory, "a.yaml", dump(node("worker3")))
    batch = changed(source)
    objects = by_key(batch)
    assert objects[NODE1].labels == {"topology.kubernetes.io/zone": "from-b"}
    assert set(objects) == {NODE1, ObjectKey("Node", "", "worker3")}
    assert batch.errors == []


# -- revision and wake-ups ----------------------------------------------------------------


def test_revision_is_reported(directory: Path, source: ManifestSource) -> None:
    (directory / "a.yaml").write_text(dump(node("worker1")))
    (directory / ".revision").write_text("7\n")
    batch = first(source)
    assert batch.revision == "7"
    assert source.revision == "7"

    rename_in(directory, "a.yaml", dump(node("worker1", zone="zone2")))
    rename_in(directory, ".revision", "8\n")
    batch = changed(source)
    assert batch.revision == "8"
    assert list(by_key(batch)) == [NODE1]

    # A revision bump alone is a batch too, without events: the writer sees it applied.
    rename_in(directory, ".revision", "9")
    batch = changed(source)
    assert batch.events == []
    assert batch.revision == "9"


def test_timeout_without_changes(source: ManifestSource) -> None:
    first(source)
    start = time.monotonic()
    assert source.next_batch(0.2) is None
    assert time.monotonic() - start >= 0.15


def test_wakes_promptly_when_a_file_is_renamed_in(
    directory: Path, source: ManifestSource
) -> None:
    first(source)
    result: list[Batch | None] = []
    waiting = threading.Event()

    def wait() -> None:
        waiting.set()
        result.append(source.next_batch(WAKE_TIMEOUT))

    thread = threading.Thread(target=wait)
    start = time.monotonic()
    thread.start()
    assert waiting.wait(WAKE_TIMEOUT)
    rename_in(directory, "new.yaml", dump(service("helloworld")))
    thread.join(WAKE_TIMEOUT + 5)
    elapsed = time.monotonic() - start
    assert not thread.is_alive()
    assert elapsed < PROMPT, f"next_batch took {elapsed:.2f}s: no inotify wake-up"
    assert len(result) == 1 and result[0] is not None
    assert list(by_key(result[0])) == [HELLO]


def test_next_batch_after_close_needs_start(directory: Path) -> None:
    src = ManifestSource(directory)
    src.start()
    first(src)
    src.close()
    src.close()  # idempotent
    with pytest.raises(AssertionError):
        src.next_batch(0)
