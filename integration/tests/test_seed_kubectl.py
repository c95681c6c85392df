"""The seed document's own kubectl commands, verbatim, against `kmesh-plugin lab up`.

`kmesh-plugin lab up` (the real CLI, as a user runs it) starts the lab in the background with
the seed's three kind workers, unlabelled. The commands are read out of the seed document
(``seeddoc``: every kubectl line from "Assign locality information to nodes" on, heredocs with
the seed scenario's manifests) and run by bash with the real kubectl, as a user pastes them.
What they print is held to what the document says: the local instance answers, then after the
local Deployment is deleted the subzone2 one, then both subzone2 instances once worker3 is
relabelled. Then the operator views by node name, a few kubectl verbs the seed does not use,
and `lab down`, after which nothing of the lab is left on the machine.

Each test asks for what it needs (the lab, the seed's commands run once: module fixtures), so
any one of them runs alone.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import missing
from kmesh_lab import kind, netns, seeddoc
from kmesh_lab.cluster import PREFIX, STATE_ROOT
from kmesh_plugin.datapath.mounts import BPFFS_DEFAULT, cgroup2_root

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
SEED_DOC_NAME = Path("seed") / "locality-load-balancing.txt"
KMESH_PLUGIN = [sys.executable, "-m", "kmesh_plugin.cli"]
# "Test multiple times": enough that both subzone2 instances answer unless one never does
# (all 30 on one of two: p = 2 * 0.5**30).
REPEATS = 30
TIMEOUT = 120


def seed_document() -> Path:
    for candidate in (os.environ.get("KMESH_SEED_DOC"), REPO.parent / "shared" / SEED_DOC_NAME,
                      Path("/work/shared") / SEED_DOC_NAME):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    missing("the seed document ../shared/seed/locality-load-balancing.txt is not on this "
            "machine (set KMESH_SEED_DOC)")
    raise AssertionError("unreachable")


class Shell:
    """bash with the lab's KUBECONFIG and a HOME of its own (kubectl's discovery cache)."""

    def __init__(self, kubeconfig: str, home: Path) -> None:
        self.env = {**os.environ, "KUBECONFIG": kubeconfig, "HOME": str(home)}

    def __call__(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["bash", "-c", script], env=self.env, capture_output=True,
                              text=True, timeout=TIMEOUT)
        if check and proc.returncode != 0:
            raise AssertionError(f"{script!r} exited {proc.returncode}:\n{proc.stdout}"
                                 f"{proc.stderr}")
        return proc


def leftovers() -> list[str]:
    found = [f"netns {n}" for n in netns.list_names(PREFIX)]
    found += [f"cgroup {p}" for p in Path(cgroup2_root()).glob(f"{PREFIX}*")]
    if BPFFS_DEFAULT.exists():
        found += [f"pins {p}" for p in BPFFS_DEFAULT.glob(f"{PREFIX}*")]
    if STATE_ROOT.exists():
        found += [f"state {p}" for p in STATE_ROOT.iterdir()]
    for pid, cmdline, cgroup in _processes():
        agent = "kmesh_plugin.cli" in cmdline and " run " in cmdline and "kmesh-lab" in cmdline
        # A lab's daemon, or anything in a lab's cgroups (pods' and kubectl exec's processes).
        if agent or "kmesh_lab.labd" in cmdline or f"/{PREFIX}" in cgroup:
            found.append(f"process {pid} {cmdline}")
    return found


def _processes() -> list[tuple[int, str, str]]:
    """(pid, command line, cgroup) of every live process (not zombies: init reaps those)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
                out.append((int(entry.name),
                            (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(),
                            (entry / "cgroup").read_text()))
            except OSError:
                continue
    return out


@pytest.fixture(scope="module")
def lab_up(kernel: None, cni_plugins: None,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shell]:
    if subprocess.run(["kubectl", "version", "--client"], capture_output=True).returncode:
        missing("kubectl is not installed")
    assert not [x for x in leftovers() if not x.startswith("state")], leftovers()
    try:
        # In the try: a `lab up` that times out is killed, and its daemon removed below.
        up = subprocess.run([*KMESH_PLUGIN, "lab", "up"], capture_output=True, text=True,
                            timeout=400)
        assert up.returncode == 0, up.stdout + up.stderr
        exports = re.findall(r"^export KUBECONFIG=(\S+)$", up.stdout, re.M)
        assert len(exports) == 1, up.stdout
        assert f"kubeconfig: {exports[0]}" in up.stdout
        yield Shell(exports[0], tmp_path_factory.mktemp("kubectl-home"))
    finally:
        subprocess.run([*KMESH_PLUGIN, "lab", "down"], capture_output=True, timeout=300)


def test_lab_up_starts_the_seed_cluster_unlabelled(lab_up: Shell) -> None:
    nodes = json.loads(lab_up("kubectl get nodes -o json").stdout)["items"]
    assert {n["metadata"]["name"]: n["metadata"]["labels"] for n in nodes} == {
        name: kind.kind_labels(name) for name in kind.WORKERS}
    # A second `lab up` refuses while this one runs, and names it.
    again = subprocess.run([*KMESH_PLUGIN, "lab", "up"], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 1 and "is already up" in again.stderr
    # The daemon holds `lab up`'s lock on the state root for as long as it runs.
    fd = os.open(STATE_ROOT, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    status = subprocess.run([*KMESH_PLUGIN, "lab", "status", "-o", "json"], capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    view = json.loads(status.stdout)
    assert view["healthy"] and view["nodes"] == list(kind.WORKERS)
    assert view["kubeconfig"] == lab_up.env["KUBECONFIG"]


class Seeded:
    """The seed document's commands, run once in order: what each printed (an exec's
    answers: several runs)."""

    def __init__(self, shell: Shell) -> None:
        self.commands = seeddoc.read(seed_document())
        self.execs = [c for c in self.commands if c.line.startswith("kubectl exec ")]
        self.printed: list[tuple[seeddoc.SeedCommand, str]] = []
        self.answers: dict[int, list[str]] = {}
        for command in self.commands:
            if command.line.startswith("kubectl exec "):
                # "Test multiple times" for the last; the first two answer the same each time.
                runs = REPEATS if command is self.execs[-1] else 5
                self.answers[len(self.answers)] = [
                    shell(command.script).stdout for _ in range(runs)]
            else:
                self.printed.append((command, shell(command.script).stdout.strip()))


@pytest.fixture(scope="module")
def seeded(lab_up: Shell) -> Seeded:
    return Seeded(lab_up)


def test_the_seed_documents_commands_give_its_answers(seeded: Seeded) -> None:
    cmds, execs, answers = seeded.commands, seeded.execs, seeded.answers
    assert len(execs) == 3, [c.line for c in cmds]  # local, failover, both subzone2
    for command, out in seeded.printed:
        words = command.line.split()
        if words[1] == "label":
            assert out == f"node/{words[3]} labeled", (command.line, out)
        elif words[1] == "create":
            assert out == "namespace/sample created"
        elif words[1] == "delete":
            assert out == f'deployment.apps "{words[-1]}" deleted'
        else:  # apply
            assert re.fullmatch(r"(service|deployment\.apps)/\S+ created", out), out
    for index, command in enumerate(execs):
        versions = collections.Counter()
        for body in answers[index]:
            m = re.fullmatch(r"Hello version: (\S+), instance: (\S+)\n", body)
            assert m, body
            # The instance is the answering pod: a pod of the Deployment of that version.
            assert re.fullmatch(rf"helloworld-{re.escape(m.group(1))}-[a-z0-9]+-[a-z0-9]+",
                                m.group(2)), body
            versions[m.group(1)] += 1
        # The document's examples are exactly the versions that answer.
        assert set(versions) == set(command.example_versions), (command.line, versions)
    assert execs[0].example_versions == ["region.zone1.subzone1"]
    assert execs[1].example_versions == ["region.zone1.subzone2"]


def test_operator_views_by_node_name(seeded: Seeded) -> None:
    status = subprocess.run([*KMESH_PLUGIN, "status", "--node", kind.WORKERS[0], "-o", "json"],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    view = json.loads(status.stdout)
    assert view["node"] == kind.WORKERS[0] and view["datapath"]["attached"]
    explained = subprocess.run(
        [*KMESH_PLUGIN, "explain", "helloworld", "-n", "sample", "--node", kind.WORKERS[0],
         "-o", "json"], capture_output=True, text=True, timeout=60)
    assert explained.returncode == 0, explained.stdout + explained.stderr
    result = json.loads(explained.stdout)
    assert result["node"] == kind.WORKERS[0] and result["mode"] == "failover"
    (group,) = result["groups"]
    # After the seed: worker1's instance is gone, worker2's and worker3's share tier 1 (same
    # region and zone, other subzone) from worker1's seat, and the kernel picks from both.
    tiers = {e["node"]: e["tier"] for e in group["endpoints"]}
    assert tiers == {kind.WORKERS[1]: 1, kind.WORKERS[2]: 1}, group["endpoints"]
    assert group["mismatch"] is None and len(group["kernel"]["pickable"]) == 2, group
    unknown = subprocess.run([*KMESH_PLUGIN, "status", "--node", "no-such-node"],
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1
    assert "no kmesh-plugin agent for node 'no-such-node'" in unknown.stderr
    assert kind.WORKERS[2] in unknown.stderr  # the running agents are named


def test_kubectl_verbs_beyond_the_seed(lab_up: Shell, seeded: Seeded) -> None:
    pods = lab_up("kubectl get pods -n sample -o wide").stdout.splitlines()
    assert pods[0].split()[:5] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    rows = [r.split() for r in pods[1:]]
    assert rows and all(r[1] == "1/1" and r[2] == "Running" for r in rows), pods
    assert {r[6] for r in rows} == set(kind.WORKERS)  # NODE: one instance each + sleep
    nodes = lab_up("kubectl get nodes").stdout.splitlines()
    assert [r.split()[:2] for r in nodes[1:]] == [[n, "Ready"] for n in kind.WORKERS]
    dep = "helloworld-region.zone1.subzone2"
    assert lab_up(f"kubectl scale deployment -n sample {dep} --replicas=2").stdout.strip() == \
        f"deployment.apps/{dep} scaled"
    lab_up(f"kubectl rollout status deployment/{dep} -n sample --timeout=60s")
    lab_up(f"kubectl wait --for=condition=Available deployment/{dep} -n sample --timeout=60s")
    ready = lab_up(f"kubectl get deployment {dep} -n sample "
                   "-o jsonpath='{.status.readyReplicas}'")
    assert ready.stdout == "2"
    lab_up(f"kubectl scale deployment -n sample {dep} --replicas=1")
    sleep = lab_up("kubectl get pod -n sample -l app=sleep -o "
                   "jsonpath='{.items[0].metadata.name}'").stdout
    # exec: stdout, stderr and the exit code come back apart; the command runs in the pod's
    # network namespace (its address is the pod's) and cgroup.
    proc = lab_up(f"kubectl exec -n sample {sleep} -c sleep -- sh -c "
                  "'echo out; echo err >&2; cat /proc/self/cgroup; exit 3'", check=False)
    assert proc.returncode == 3, proc
    assert proc.stdout.startswith("out\n") and f"/{kind.WORKERS[0]}/{sleep}" in proc.stdout
    assert proc.stderr.startswith("err\n")
    ip = lab_up(f"kubectl get pod -n sample {sleep} -o jsonpath='{{.status.podIP}}'").stdout
    addrs = lab_up(f"kubectl exec -n sample {sleep} -- cat /proc/net/fib_trie").stdout
    assert ip in addrs
    missing_pod = lab_up("kubectl exec -n sample no-such-pod -- true", check=False)
    assert missing_pod.returncode == 1 and "NotFound" in missing_pod.stderr + missing_pod.stdout
    bad = lab_up("kubectl apply -n sample -f - <<EOF\napiVersion: apps/v1\nkind: Deployment\n"
                 "metadata: {name: nginx}\nspec:\n  selector: {matchLabels: {app: nginx}}\n"
                 "  template:\n    metadata: {labels: {app: nginx}}\n    spec:\n"
                 "      containers: [{name: nginx, image: nginx}]\nEOF", check=False)
    assert bad.returncode == 1 and "cannot run in the lab" in bad.stderr, bad
    # The namespace controller: deleting a namespace takes its pods, Services and Deployments
    # with it (the write is answered once they are gone). Another namespace than the seed's,
    # which the other tests read: the seed's Service and first Deployment, applied there.
    lab_up("kubectl create namespace scratch")
    for command in seeded.commands:
        manifest = command.manifest or ""
        if "kind: Service" in manifest or "name: helloworld-region.zone1.subzone1" in manifest:
            lab_up(command.script.replace("kubectl apply -n sample ", "kubectl apply -n scratch "))
    made = lab_up("kubectl get pods,services,deployments -n scratch -o name").stdout.split()
    assert len(made) == 3 and made[0].startswith("pod/helloworld-region.zone1.subzone1-"), made
    before = lab_up("kubectl get pods,services,deployments -n sample -o name").stdout
    assert lab_up("kubectl delete namespace scratch").stdout.strip() == \
        'namespace "scratch" deleted'
    assert lab_up("kubectl get pods,services,deployments -n scratch -o name").stdout == ""
    assert lab_up("kubectl get pods,services,deployments -n sample -o name").stdout == before


def test_lab_down_leaves_nothing(lab_up: Shell) -> None:
    down = subprocess.run([*KMESH_PLUGIN, "lab", "down"], capture_output=True, text=True,
                          timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "removed" in down.stdout
    assert leftovers() == []
    status = subprocess.run([*KMESH_PLUGIN, "lab", "status"], capture_output=True, text=True,
                            timeout=60)
    assert status.returncode == 1 and "no lab is up" in status.stdout
