"""The loader's hygiene: what it trusts, what it leaves behind, which pins it reuses, and how
the node looks after `kmesh-plugin uninstall` (issue 8).

Every test runs against the real kernel, bpftool and clang. Paths a test makes untrusted
(chown to nobody, chmod g+w/o+w) are restored before the fixtures remove them.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from node_bed import agents, link_progs, start_agent, write_config, write_service

from kmesh_plugin import cli
from kmesh_plugin import config as config_mod
from kmesh_plugin.datapath import loader, records, syscall
from kmesh_plugin.datapath.bpftool import Bpftool
from kmesh_plugin.datapath.build import Capacities, compile_object
from kmesh_plugin.datapath.loader import Datapath
from kmesh_plugin.errors import BpfError, BpftoolError, DatapathError, KmeshError

pytestmark = pytest.mark.kernel

CAPS = Capacities(64, 1024)
NOBODY = 65534
CLI = [sys.executable, "-m", "kmesh_plugin.cli"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


@contextmanager
def no_leaks() -> Iterator[None]:
    """The block leaves as many fds open as it found, and no object had to be closed by the
    garbage collector (a ResourceWarning "unclosed ..." is a leak the safety net hid)."""
    gc.collect()
    before = open_fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    after = open_fds()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, unclosed
    assert len(after) == len(before), f"fds before {before}, after {after}"


def pins(root: Path) -> dict[str, int]:
    """Every pinned object below ``root`` (not the directories) -> its kernel id."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            continue
        fd = syscall.obj_get(path)
        try:
            info = syscall.link_info(fd)  # any object: the id field comes first
            out[str(path.relative_to(root))] = info.id
        finally:
            os.close(fd)
    return out


def attached(cgroup: Path) -> dict[int, list[int]]:
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {t: syscall.prog_query(fd, t) for t in loader.PROGRAMS.values()}
    finally:
        os.close(fd)


def stale_dirs(pin_dir: Path) -> list[str]:
    return sorted(p.name for p in pin_dir.glob("progs-*"))


@pytest.fixture
def private_build(build_dir: Path, tmp_path: Path) -> Path:
    """A build dir of the test's own holding the session's compiled object (no recompile)."""
    obj = compile_object(CAPS, build_dir)
    own = tmp_path / "cache"
    own.mkdir(mode=0o700)
    shutil.copy2(obj, own / obj.name)
    return own


@contextmanager
def untrusted(path: Path, change: str) -> Iterator[str]:
    """Make ``path`` untrusted for the block ("owner" or a mode); restore it afterwards.
    Yields what the refusal must mention."""
    st = path.stat()
    try:
        if change == "owner":
            os.chown(path, NOBODY, -1)
            yield f"uid {NOBODY}"
        else:
            mode = int(change, 8)
            os.chmod(path, mode)
            yield f"mode {mode:04o}"
    finally:
        os.chown(path, st.st_uid, st.st_gid)
        os.chmod(path, st.st_mode & 0o7777)


def node_config(tmp_path: Path, pin_dir: Path, cgroup: Path, build_dir: Path) -> Path:
    manifests = tmp_path / "manifests"
    write_service(manifests, "198.19.0.10", 80, [("198.18.0.1", 8080)], "1")
    return write_config(tmp_path / "plugin.toml", pin_dir=pin_dir, cgroup=cgroup,
                        build_dir=build_dir, manifests=manifests,
                        status_file=tmp_path / "run" / "status.json")


# --------------------------------------------------------------------------------------------
# 2. trust: owners and modes, bpffs mode, read-only opens
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "change"), [
    ("", "owner"), ("", "0770"), ("", "0707"),
    ("links", "owner"), ("maps", "0770"), ("progs", "0703"),
])
def test_an_untrusted_pin_dir_is_refused(
    pin_dir: Path, cgroup: Path, build_dir: Path, where: str, change: str
) -> None:
    loader.attach(pin_dir, cgroup, CAPS, build_dir).close()
    before = pins(pin_dir)
    target = pin_dir / where if where else pin_dir
    with untrusted(target, change) as mention:
        for attempt in (
            lambda: loader.attach(pin_dir, cgroup, CAPS, build_dir),
            lambda: Datapath.open(pin_dir, read_only=True),
            lambda: Datapath.open(pin_dir, read_only=False),
        ):
            with pytest.raises(DatapathError) as exc:
                attempt()
            message = str(exc.value)
            assert str(target) in message and mention in message, message
            assert "root" in message
        # Refused before anything was loaded or swapped.
        assert pins(pin_dir) == before
        assert stale_dirs(pin_dir) == []


@pytest.mark.parametrize(("where", "change"), [
    ("dir", "owner"), ("dir", "0777"), ("object", "0666"), ("object", "owner"),
])
def test_an_untrusted_build_dir_or_object_is_refused(
    pin_dir: Path, cgroup: Path, private_build: Path, where: str, change: str
) -> None:
    obj = next(private_build.glob("kmesh_lb-*.o"))
    target = private_build if where == "dir" else obj
    with untrusted(target, change) as mention:
        with pytest.raises(DatapathError) as exc:
            loader.attach(pin_dir, cgroup, CAPS, private_build)
        assert str(target) in str(exc.value) and mention in str(exc.value), str(exc.value)
        assert list(pin_dir.iterdir()) == []  # nothing loaded, nothing created
        assert attached(cgroup) == {t: [] for t in loader.PROGRAMS.values()}


def test_check_config_and_run_refuse_an_untrusted_pin_dir_before_the_kernel(
    pin_dir: Path, cgroup: Path, build_dir: Path, tmp_path: Path
) -> None:
    config = node_config(tmp_path, pin_dir, cgroup, build_dir)
    ok = subprocess.run([*CLI, "check-config", "-c", str(config)], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    with untrusted(pin_dir, "owner"):
        for command in ("check-config", "run"):
            proc = subprocess.run([*CLI, command, "-c", str(config)], capture_output=True,
                                  text=True, timeout=60)
            assert proc.returncode == 1, (command, proc.stdout, proc.stderr)
            assert str(pin_dir) in proc.stderr and f"uid {NOBODY}" in proc.stderr, proc.stderr
            assert list(pin_dir.iterdir()) == []
            assert attached(cgroup) == {t: [] for t in loader.PROGRAMS.values()}


def test_the_loader_creates_its_directories_0700(
    pin_dir: Path, cgroup: Path, build_dir: Path
) -> None:
    node = pin_dir / "node"
    try:
        loader.attach(node, cgroup, CAPS, build_dir).close()
        modes = {str(p.relative_to(pin_dir)): p.stat().st_mode & 0o7777
                 for p in [node, *node.rglob("*")] if p.is_dir()}
        assert modes == {"node": 0o700, "node/links": 0o700, "node/maps": 0o700,
                         "node/progs": 0o700}
    finally:
        loader.remove(node)


MOUNT_PROBE = """\
import os, subprocess, sys
from pathlib import Path
from kmesh_plugin.datapath.mounts import ensure_bpffs, filesystem_of
# A private mount namespace (unshare): unmounting here leaves the host's bpffs alone.
while (fs := filesystem_of(Path("/sys/fs/bpf"))) is not None and fs.fstype == "bpf":
    subprocess.run(["umount", "/sys/fs/bpf"], check=True)
ensure_bpffs(Path("/sys/fs/bpf/kmesh-plugin"))
assert filesystem_of(Path("/sys/fs/bpf")).fstype == "bpf"
print(oct(os.stat("/sys/fs/bpf").st_mode & 0o777))  # bpffs always adds the sticky bit
"""


def test_bpffs_is_mounted_0700(kernel: None) -> None:
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", MOUNT_PROBE],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0o700"


def test_a_read_only_open_creates_nothing_and_cannot_write(
    pin_dir: Path, cgroup: Path, build_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader.attach(pin_dir, cgroup, CAPS, build_dir).close()

    def no_create(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a read-only open must not create a map (the RCU barrier)")

    monkeypatch.setattr(syscall.Map, "create", no_create)
    dp = Datapath.open(pin_dir, read_only=True)
    try:
        assert dp.barrier is None
        key = records.U32.pack(0)
        assert dp[records.MAP_ACTIVE].lookup(key) == bytes(4)
        for name, attempt in (
            ("update", lambda: dp[records.MAP_ACTIVE].update(key, records.U32.pack(1))),
            ("batch", lambda: dp[records.MAP_ACTIVE].update_batch([(key, records.U32.pack(1))])),
            ("delete", lambda: dp[records.MAP_VIPS].delete(bytes(records.VIP.size))),
        ):
            with pytest.raises(BpfError) as exc:
                attempt()
            assert exc.value.errno in (errno.EPERM, errno.EACCES), name
        assert dp[records.MAP_ACTIVE].lookup(key) == bytes(4)
    finally:
        dp.close()


def test_dump_status_and_explain_open_the_maps_read_only(
    pin_dir: Path, cgroup: Path, build_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kmesh_plugin.ops import explain, status
    from kmesh_plugin.plugins import Plugins

    loader.attach(pin_dir, cgroup, CAPS, build_dir).close()
    cfg = config_mod.load(node_config(tmp_path, pin_dir, cgroup, build_dir))
    opened: list[tuple[str, int]] = []
    real = syscall.obj_get

    def spy(path: str | os.PathLike[str], *, flags: int = 0) -> int:
        if Path(path).parent.name == "maps":
            opened.append((Path(path).name, flags))
        return real(path, flags=flags)

    monkeypatch.setattr(syscall, "obj_get", spy)
    status.dump(cfg)
    status.status(cfg)
    explain.explain(cfg, Plugins.load(cfg.enabled), "t", "svc")
    assert opened and all(flags == syscall.BPF_F_RDONLY for _, flags in opened), opened
    assert loader.BARRIER not in {name for name, _ in opened}


def test_dump_status_and_explain_need_no_capability(
    pin_dir: Path, cgroup: Path, build_dir: Path, tmp_path: Path
) -> None:
    """Read-only, they need no map of their own (the barrier's inner map needed CAP_BPF)."""
    loader.attach(pin_dir, cgroup, CAPS, build_dir).close()
    config = node_config(tmp_path, pin_dir, cgroup, build_dir)
    no_caps = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
    for command in (["dump"], ["status", "-o", "json"], ["explain", "svc", "-n", "t"]):
        proc = subprocess.run([*no_caps, *CLI, *command, "-c", str(config)],
                              capture_output=True, text=True, timeout=60)
        if command[0] == "status":  # exit 1: no agent runs; the datapath must read fine
            assert json.loads(proc.stdout)["datapath"]["attached"] is True, proc.stdout
        else:
            assert proc.returncode == 0, (command, proc.stderr)
            assert "not read" not in proc.stdout, proc.stdout


# --------------------------------------------------------------------------------------------
# 3. links are swapped only from the pinned program
# --------------------------------------------------------------------------------------------


def test_a_link_running_a_program_that_is_not_pinned_is_refused(
    pin_dir: Path, cgroup: Path, build_dir: Path
) -> None:
    loader.attach(pin_dir, cgroup, CAPS, build_dir).close()
    Bpftool().prog_loadall(compile_object(CAPS, build_dir), pin_dir / "intruder")
    link = syscall.obj_get(pin_dir / "links" / records.PROG_CONNECT4)
    prog = syscall.obj_get(pin_dir / "intruder" / records.PROG_CONNECT4)
    try:
        syscall.link_update(link, prog)
        intruder = syscall.prog_info(prog).id
    finally:
        os.close(prog)
        os.close(link)
    before = link_progs(pin_dir)
    assert before[records.PROG_CONNECT4] == intruder
    with no_leaks(), pytest.raises(DatapathError) as exc:
        loader.attach(pin_dir, cgroup, CAPS, build_dir)
    message = str(exc.value)
    assert str(pin_dir / "links" / records.PROG_CONNECT4) in message
    assert f"program id {intruder}" in message and "progs/kmesh_connect4" in message, message
    assert link_progs(pin_dir) == before
    assert stale_dirs(pin_dir) == []


class RacingBpftool(Bpftool):
    """A second writer that swaps the connect6 link while our attach is loading."""

    def __init__(self, pin_dir: Path, obj: Path) -> None:
        super().__init__()
        self.pin_dir, self.obj = pin_dir, obj
        self.intruder: int | None = None

    def prog_loadall(self, *args: Any, **kwargs: Any) -> None:
        super().prog_loadall(*args, **kwargs)
        if self.intruder is None:
            super().prog_loadall(self.obj, self.pin_dir / "intruder")
            link = syscall.obj_get(self.pin_dir / "links" / records.PROG_CONNECT6)
            prog = syscall.obj_get(self.pin_dir / "intruder" / records.PROG_CONNECT6)
            try:
                syscall.link_update(link, prog)
                self.intruder = syscall.prog_info(prog).id
            finally:
                os.close(prog)
                os.close(link)


def test_a_concurrent_swap_is_not_clobbered_and_the_attach_rolls_back(
    pin_dir: Path, cgroup: Path, build_dir: Path
) -> None:
    loader.attach(pin_dir, cgroup, CAPS, build_dir).close()
    before = link_progs(pin_dir)
    pinned_before = pins(pin_dir)
    racer = RacingBpftool(pin_dir, compile_object(CAPS, build_dir))
    with no_leaks(), pytest.raises(DatapathError) as exc:
        loader.attach(pin_dir, cgroup, CAPS, build_dir, bpftool=racer)
    assert "kmesh_connect6" in str(exc.value)
    after = link_progs(pin_dir)
    # The other writer's program stays on connect6 (BPF_F_REPLACE refused to overwrite it);
    # connect4, swapped first, went back to the program it ran.
    assert after == {**before, records.PROG_CONNECT6: racer.intruder}
    assert {k: v for k, v in pins(pin_dir).items() if not k.startswith("intruder/")} == \
        pinned_before
    assert stale_dirs(pin_dir) == []


# --------------------------------------------------------------------------------------------
# 4. failures leak no fd and no pin
# --------------------------------------------------------------------------------------------


def _replace_with_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _replace_with_array(path: Path) -> None:
    path.unlink()
    with syscall.Map.create(syscall.ARRAY, 4, 4, 1, name="not_a_barrier") as m:
        m.pin(path)


@pytest.mark.parametrize(("read_only", "pin", "breakage"), [
    (True, records.MAP_STATS, _replace_with_dir),
    (False, records.MAP_STATS, _replace_with_dir),
    (False, loader.BARRIER, _replace_with_array),
    (False, loader.BARRIER, _replace_with_dir),
])
def test_a_failed_open_leaks_nothing(
    pin_dir: Path, cgroup: Path, build_dir: Path, read_only: bool, pin: str,
    breakage: Callable[[Path], None],
) -> None:
    loader.attach(pin_dir, cgroup, CAPS, build_dir).close()
    breakage(pin_dir / "maps" / pin)
    with no_leaks(), pytest.raises(KmeshError) as exc:
        Datapath.open(pin_dir, read_only=read_only)
    assert str(pin_dir / "maps" / pin) in str(exc.value)
    # A read-write open released the lock it took.
    assert loader.PinLock.holder(pin_dir) is None


def test_a_failed_load_leaks_nothing(pin_dir: Path, cgroup: Path, build_dir: Path,
                                     tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.o"
    garbage.write_bytes(b"not an ELF object")
    # Fresh: nothing pinned before, nothing after.
    with no_leaks(), pytest.raises(BpftoolError):
        loader.attach(pin_dir, cgroup, CAPS, build_dir, obj=garbage)
    assert pins(pin_dir) == {} and stale_dirs(pin_dir) == []
    # Over a running datapath: the links keep their programs, the pins stay as they were.
    loader.attach(pin_dir, cgroup, CAPS, build_dir).close()
    before, progs = pins(pin_dir), link_progs(pin_dir)
    with no_leaks(), pytest.raises(BpftoolError):
        loader.attach(pin_dir, cgroup, CAPS, build_dir, obj=garbage)
    assert pins(pin_dir) == before and link_progs(pin_dir) == progs
    assert stale_dirs(pin_dir) == []
    assert loader.PinLock.holder(pin_dir) is None


def test_a_failed_link_create_leaves_no_link_and_no_pin(
    pin_dir: Path, cgroup: Path, build_dir: Path
) -> None:
    """connect6 cannot be attached (the cgroup's 64 programs for that hook are taken) after
    connect4 was: the connect4 link must go again, and with it every pin of the attempt."""
    filler = pin_dir / "filler"
    Bpftool().prog_loadall(compile_object(CAPS, build_dir), filler)
    prog = syscall.obj_get(filler / records.PROG_CONNECT6)
    cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    links: list[int] = []
    try:
        with pytest.raises(BpfError) as full:
            for _ in range(65):
                links.append(syscall.link_create(prog, cg, syscall.BPF_CGROUP_INET6_CONNECT))
        assert full.value.errno == errno.E2BIG and len(links) == 64
        before = pins(pin_dir)
        with no_leaks(), pytest.raises(BpfError) as exc:
            loader.attach(pin_dir, cgroup, CAPS, build_dir)
        assert exc.value.errno == errno.E2BIG
        assert syscall.prog_query(cg, syscall.BPF_CGROUP_INET4_CONNECT) == []
        assert pins(pin_dir) == before
        assert stale_dirs(pin_dir) == []
    finally:
        for fd in links:
            os.close(fd)
        os.close(cg)
        os.close(prog)


# --------------------------------------------------------------------------------------------
# 5. the layout version of the pinned maps
# --------------------------------------------------------------------------------------------


def _refusal(version: int) -> str:
    return (f"pinned maps are layout version {version}, this build needs "
            f"{records.LAYOUT_VERSION}: run `kmesh-plugin datapath remove` to start over, or "
            "run a matching build")


def test_the_layout_version_is_pinned_with_the_maps(
    pin_dir: Path, cgroup: Path, build_dir: Path
) -> None:
    loader.attach(pin_dir, cgroup, CAPS, build_dir).close()
    with syscall.Map.open_pinned(pin_dir / "maps" / loader.META) as meta:
        assert meta.map_type == syscall.ARRAY and meta.max_entries == 1
        assert meta.lookup(records.U32.pack(0)) == records.U32.pack(records.LAYOUT_VERSION)
        # Frozen: nobody rewrites it behind the loader's back.
        with pytest.raises(BpfError) as exc:
            meta.update(records.U32.pack(0), records.U32.pack(99))
        assert exc.value.errno == errno.EPERM
    # A reload over the pins keeps the same record.
    loader.attach(pin_dir, cgroup, CAPS, build_dir).close()
    Datapath.open(pin_dir, read_only=True).close()


@pytest.mark.parametrize(
    "pinned", [records.LAYOUT_VERSION - 1, records.LAYOUT_VERSION + 1], ids=["upgrade", "downgrade"]
)
def test_pins_of_another_layout_version_are_refused(
    pin_dir: Path, cgroup: Path, build_dir: Path, monkeypatch: pytest.MonkeyPatch,
    pinned: int,
) -> None:
    needed = records.LAYOUT_VERSION
    monkeypatch.setattr(records, "LAYOUT_VERSION", pinned)  # the build that made the pins
    loader.attach(pin_dir, cgroup, CAPS, build_dir).close()
    monkeypatch.setattr(records, "LAYOUT_VERSION", needed)
    before, progs = pins(pin_dir), link_progs(pin_dir)
    for attempt in (
        lambda: loader.attach(pin_dir, cgroup, CAPS, build_dir),
        lambda: Datapath.open(pin_dir, read_only=True),
        lambda: Datapath.open(pin_dir, read_only=False),
    ):
        with no_leaks(), pytest.raises(DatapathError) as exc:
            attempt()
        assert _refusal(pinned) in str(exc.value)
    assert pins(pin_dir) == before and link_progs(pin_dir) == progs


def test_pins_without_a_layout_record_are_version_1(
    pin_dir: Path, cgroup: Path, build_dir: Path
) -> None:
    loader.attach(pin_dir, cgroup, CAPS, build_dir).close()
    (pin_dir / "maps" / loader.META).unlink()  # as every build before the record made them
    progs = link_progs(pin_dir)
    for attempt in (
        lambda: loader.attach(pin_dir, cgroup, CAPS, build_dir),
        lambda: Datapath.open(pin_dir, read_only=True),
    ):
        with pytest.raises(DatapathError) as exc:
            attempt()
        assert _refusal(1) in str(exc.value)
    assert link_progs(pin_dir) == progs
    assert not (pin_dir / "maps" / loader.META).exists()


# --------------------------------------------------------------------------------------------
# 6. uninstall
# --------------------------------------------------------------------------------------------


def node_state(node: Path, cgroup: Path, build: Path, status_file: Path) -> dict[str, Any]:
    return {
        "pin_dir": node.exists(),
        "attached": attached(cgroup),
        "build_dir": sorted(p.name for p in build.iterdir()) if build.exists() else None,
        "status_file": status_file.exists(),
        "status_dir": status_file.parent.exists(),
    }


def test_uninstall_leaves_the_node_as_it_found_it(
    pin_dir: Path, cgroup: Path, build_dir: Path, tmp_path: Path
) -> None:
    node = pin_dir / "node"
    build = tmp_path / "cache"
    build.mkdir()
    (build / "not-ours.o").write_text("a file of someone else's")
    config = node_config(tmp_path, node, cgroup, build)
    status_file = tmp_path / "run" / "status.json"
    found = node_state(node, cgroup, build, status_file)
    assert found == {"pin_dir": False, "attached": {t: [] for t in loader.PROGRAMS.values()},
                     "build_dir": ["not-ours.o"], "status_file": False, "status_dir": False}
    try:
        with agents() as started:
            agent = start_agent(config)
            started.append(agent)
            agent.wait_for(lambda line: line.get("msg") == "reconciled", timeout=120)
            agent.proc.send_signal(signal.SIGTERM)
            assert agent.proc.wait(30) == 0
        installed = node_state(node, cgroup, build, status_file)
        assert installed["pin_dir"] and installed["status_file"]
        assert all(len(ids) == 1 for ids in installed["attached"].values())
        assert any(n.startswith("kmesh_lb-") for n in installed["build_dir"])
        for _ in range(2):  # twice: the second finds nothing to do
            proc = subprocess.run([*CLI, "uninstall", "-c", str(config)], capture_output=True,
                                  text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            assert node_state(node, cgroup, build, status_file) == found
        assert "nothing" in proc.stdout
    finally:
        loader.remove(node)


CONFLIST = (b'{\n  "cniVersion": "1.0.0",\n  "name": "podnet",\n  "plugins": [\n'
            b'    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}}\n'
            b'  ]\n}\n')


def test_uninstall_in_cni_mode_also_restores_the_conflist_and_removes_pod_records(
    pin_dir: Path, cgroup: Path, build_dir: Path, tmp_path: Path
) -> None:
    from kmesh_plugin.cni import spool

    node = pin_dir / "node"
    conf_dir, bin_dir, state = tmp_path / "net.d", tmp_path / "bin", tmp_path / "run" / "cni"
    conf_dir.mkdir()
    bin_dir.mkdir()
    conflist = conf_dir / "10-podnet.conflist"
    conflist.write_bytes(CONFLIST)
    conflist.chmod(0o640)
    manifests = tmp_path / "manifests"
    write_service(manifests, "198.19.0.10", 80, [("198.18.0.1", 8080)], "1")
    config = write_config(
        tmp_path / "plugin.toml", pin_dir=node, cgroup=cgroup, build_dir=build_dir,
        manifests=manifests, status_file=tmp_path / "run" / "status.json",
        datapath=('enrolment = "cni"',),
        extra=("[cni]", "install = true", f'conf_dir = "{conf_dir}"', f'bin_dir = "{bin_dir}"',
               f'state_dir = "{state}"'))
    try:
        with agents() as started:
            agent = start_agent(config)
            started.append(agent)
            # The agent owns the entry (cni.install): it adds it at start.
            agent.wait_for(lambda line: "kmesh-cni" in str(line.get("msg")), timeout=120)
            assert b'"type": "kmesh-cni"' in conflist.read_bytes()
            assert (bin_dir / "kmesh-cni").is_file()
            # Another component rewrites the conflist without it: the agent puts it back.
            conflist.write_bytes(CONFLIST)
            # (It logs what it did; the file is checked at each log line, as it comes.)
            agent.wait_for(lambda line: b"kmesh-cni" in conflist.read_bytes(), timeout=60)
            assert b'"type": "kmesh-cni"' in conflist.read_bytes()
            # A pod kmesh-cni set up (its record; its cookie lives in the maps).
            spool.write_record(state, spool.PodRecord("c1", "eth0", "/var/run/netns/x", 7,
                                                      "t", "pod", "", ("198.18.0.9",)))
            agent.proc.send_signal(signal.SIGTERM)
            assert agent.proc.wait(30) == 0
        proc = subprocess.run([*CLI, "uninstall", "-c", str(config)], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert conflist.read_bytes() == CONFLIST
        assert stat.S_IMODE(conflist.stat().st_mode) == 0o640
        assert list(bin_dir.iterdir()) == []
        assert not state.exists() and not node.exists()
    finally:
        loader.remove(node)


def test_uninstall_refuses_while_an_agent_holds_the_pin_dir(
    pin_dir: Path, cgroup: Path, private_build: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = node_config(tmp_path, pin_dir, cgroup, private_build)
    dp = loader.attach(pin_dir, cgroup, CAPS, private_build)
    try:
        assert cli.main(["uninstall", "-c", str(config)]) == 1
        err = capsys.readouterr().err
        assert str(pin_dir) in err and f"pid {os.getpid()}" in err, err
        assert pin_dir.exists() and all(attached(cgroup).values())
        assert cli.main(["uninstall", "--force", "-c", str(config)]) == 0
        assert not pin_dir.exists()
        assert attached(cgroup) == {t: [] for t in loader.PROGRAMS.values()}
        assert not private_build.exists()  # only our object was in it
    finally:
        dp.close()
