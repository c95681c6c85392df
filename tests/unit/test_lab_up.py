"""`lab up`'s pieces that need no root: the nodes file, the write barrier of the background
controllers (against a stand-in lab whose passes the test controls), and reading the seed
document's commands."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from kmesh_lab import kind, labd, seeddoc
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

    def __init__(self) -> None:
        self.api = FakeApi()
        self.write_barrier: Any = None
        self.go = threading.Semaphore(0)
        self.passes = 0
        self.writes_per_pass = 0
        self.fail = False

    def reconcile(self) -> None:
        assert self.go.acquire(timeout=10)
        self.passes += 1
        self.api.revision += self.writes_per_pass
        if self.fail:
            raise RuntimeError("boom")

    def converge(self) -> None:
        pass


def barrier_in_thread(lab: FakeLab, revision: int) -> threading.Thread:
    t = threading.Thread(target=lab.write_barrier, args=(revision,))
    t.start()
    return t


def test_a_write_is_answered_after_a_pass_that_saw_it(capsys: pytest.CaptureFixture[str]) -> None:
    lab = FakeLab()
    controllers = labd.Controllers(lab)  # type: ignore[arg-type]
    controllers.start()
    try:
        assert lab.write_barrier == controllers.wait_for
        lab.api.revision = 11  # kubectl wrote
        waiter = barrier_in_thread(lab, 11)
        waiter.join(0.2)
        assert waiter.is_alive()  # held: no pass has run
        lab.writes_per_pass = 2  # the pass writes (pods, slices): one more pass follows
        lab.go.release()
        waiter.join(10)
        assert not waiter.is_alive() and lab.passes == 1
        lab.writes_per_pass = 0
        # The follow-up pass over its own writes (revision 13) finds nothing to do.
        waiter = barrier_in_thread(lab, 13)
        lab.go.release()
        waiter.join(10)
        assert not waiter.is_alive() and lab.passes == 2
        # A failed pass still answers the write (the log says why), and the daemon lives on.
        lab.fail = True
        lab.api.revision = 20
        waiter = barrier_in_thread(lab, 20)
        lab.go.release()
        waiter.join(10)
        assert not waiter.is_alive() and controllers.failures == 1
        assert "controller pass failed" in capsys.readouterr().out
    finally:
        controllers.stop()
    assert lab.write_barrier is None


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
