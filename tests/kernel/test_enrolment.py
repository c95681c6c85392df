"""Which sockets are ours (SPEC.md section 9), in the real kernel.

Mode all: every socket in the attached cgroup. Mode cni: only sockets whose network namespace
cookie is in kmesh_enrolled; any other socket is never touched, so even a connect to a
ClusterIP without endpoints (refused when ours) passes through unchanged, and ends here in
ENETUNREACH because the test namespace has no route for it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from datapath_bed import Bed, answered, ip, tiers

from kmesh_plugin.datapath import loader, records
from kmesh_plugin.datapath.records import MODE_FAILOVER, Frontend

pytestmark = pytest.mark.kernel

VIP, EMPTY_VIP = "198.19.0.10", "198.19.0.11"
FRONT = Frontend(ip(VIP), 80, socket.IPPROTO_TCP)
EMPTY = Frontend(ip(EMPTY_VIP), 80, socket.IPPROTO_TCP)
URL = f"http://{VIP}:80/hello"
COOKIE = ("import socket; print(int.from_bytes(socket.socket(socket.AF_UNIX, "
          "socket.SOCK_DGRAM).getsockopt(socket.SOL_SOCKET, 71, 8), 'little'))")


@pytest.fixture
def bed(pin_dir: Path, cgroup: Path, netns: str, build_dir: Path) -> Iterator[Bed]:
    b = Bed(pin_dir, cgroup, netns, build_dir)
    try:
        yield b
    finally:
        b.close()


def netns_cookie(netns_path: str) -> int:
    """SO_NETNS_COOKIE of a socket opened inside the namespace (what kmesh-cni records)."""
    out = subprocess.run(["nsenter", f"--net={netns_path}", sys.executable, "-c", COOKIE],
                         check=True, capture_output=True, text=True, timeout=30)
    return int(out.stdout)


def attach(bed: Bed, enrolment: int) -> None:
    """Reattach over the pins in another mode, as an agent restarted with it would."""
    bed.writer.close()
    bed.dp.close()
    bed.dp = loader.attach(bed.pin_dir, bed.cgroup, bed.capacities, bed.build_dir, obj=bed.obj,
                           enrolment=enrolment)
    bed.writer = type(bed.writer)(bed.dp)
    bed.writer.recover()


def test_cni_mode_touches_only_enrolled_network_namespaces(bed: Bed) -> None:
    ep = bed.server("e1", "198.18.0.1", 8080)
    bed.publish({FRONT: tiers([ep], mode=MODE_FAILOVER), EMPTY: tiers([], mode=MODE_FAILOVER)})
    client = bed.client()
    # Mode all (the default): ours without enrolment.
    assert answered(client.get(URL)) == ["e1"]
    assert client.connect(EMPTY_VIP, 80)[0]["errno"] == "ECONNREFUSED"

    attach(bed, records.ENROL_CNI)
    assert bed.dp.enrolment() == records.ENROL_CNI and bed.dp.enrolled() == []
    # Not enrolled: untouched, the ClusterIP without endpoints included (not refused).
    assert client.connect(VIP, 80)[0]["errno"] == "ENETUNREACH"
    assert client.connect(EMPTY_VIP, 80)[0]["errno"] == "ENETUNREACH"

    cookie = netns_cookie(bed.netns_path)
    enrolled = bed.dp[records.MAP_ENROLLED]
    enrolled.update(records.U64.pack(cookie), records.ENROLMENT.pack({"flags": 0, "pad": 0}))
    assert bed.dp.enrolled() == [cookie]
    assert answered(client.get(URL, count=3)) == ["e1"] * 3
    assert client.connect(EMPTY_VIP, 80)[0]["errno"] == "ECONNREFUSED"
    # Another namespace's cookie does not make this one ours.
    enrolled.delete(records.U64.pack(cookie))
    enrolled.update(records.U64.pack(cookie + 1), records.ENROLMENT.pack({"flags": 0, "pad": 0}))
    assert client.connect(VIP, 80)[0]["errno"] == "ENETUNREACH"

    # Back to mode all: ours again, whatever is enrolled.
    attach(bed, records.ENROL_ALL)
    assert bed.dp.enrolment() == records.ENROL_ALL
    assert answered(client.get(URL)) == ["e1"]


def test_the_mode_is_written_before_a_link_runs_and_restored_when_an_attach_fails(
    bed: Bed,
) -> None:
    attach(bed, records.ENROL_CNI)
    with pytest.raises(Exception):  # noqa: B017 - any refusal; the point is what it leaves
        loader.attach(bed.pin_dir, bed.cgroup, bed.capacities, bed.build_dir,
                      obj=bed.build_dir / "missing.o", enrolment=records.ENROL_ALL)
    assert bed.dp.enrolment() == records.ENROL_CNI
