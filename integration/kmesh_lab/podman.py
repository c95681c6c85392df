"""A real container runtime for the tests: podman 4.3 (Debian 12) running CNI conflists.

:class:`Podman` is a private podman installation in one temporary directory: its own storage
(``--root``/``--runroot``, vfs driver), its own containers.conf (``CONTAINERS_CONF``), its own
network config dir and CNI bin dir, its own lock files, events log and cgroup parent. Nothing of
the host's podman state (/var/lib/containers, /etc/cni/net.d, /dev/shm/libpod_lock) is read or
written. :meth:`Podman.close` removes every container, image, network (conflist and bridge),
network namespace, mount, cgroup and temporary file it created, also after a failure, and
raises if something could not be removed.

What podman 4.3.1 (Debian 12) needs and does here, measured on these machines:

- Offline image: ``podman import`` of a tarball holding /bin/busybox of busybox-static (the
  dynamic busybox package would need a libc in the image). Commands run as
  ``/bin/busybox <applet>``, so no applet links are needed; /bin/sh is one for ``sh -c``.
- ``runtime = "runc"``: crun refuses the hybrid cgroup layout (v1 controllers +
  /sys/fs/cgroup/unified). ``cgroup_manager = "cgroupfs"``: PID 1 is not systemd.
- ``default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]``: without them ``podman run``
  exits 126, "runc create failed: ... error setting rlimit type 7: operation not permitted"
  (it asks for more than the hard limit the runner has).
- ``network_backend = "cni"``: podman 4.3 then reads every *.conflist in
  ``network_config_dir`` (the network name is the conflist's "name"), finds plugins in
  ``cni_plugin_dirs`` and runs the chain itself: ADD with cniVersion 1.0.0 and prevResult
  (VERSION first and DEL on stop/restart: see KUBERNETES-CNI-NOTES), CNI_ARGS
  ``IgnoreUnknown=1;K8S_POD_NAME=<container name>`` (no namespace, no uid), CNI_CONTAINERID =
  the full 64-hex container id, CNI_IFNAME eth0, CNI_NETNS = /run/netns/netns-<uuid>
  (``.NetworkSettings.SandboxKey``). ``rm -f`` runs DEL before it returns; ``podman container
  cleanup`` (conmon's exit command) runs it when the container exits by itself, with
  CONTAINERS_CONF inherited through conmon. CHECK is never called.
- An in-memory network "podman" (10.88.0.0/16) is always listed; it is never used here.
- The bridge plugin creates its Linux bridge (no address with isGateway false) in the host's
  namespace; removing the last container leaves it. ``podman network rm`` deletes the bridge
  and the conflist; :meth:`close` deletes the bridges it named with ``ip link del``.
- libcni caches each ADD result in /var/lib/cni/results/<network>-<id>-<ifname> (a fixed
  path, removed on DEL); runc keeps state in /run/runc/<id> (removed on delete). Both
  directories are removed at close if this harness created them and they are empty.
- ``lock_type = "file"`` keeps locks in <tmp_dir>/locks; the default "shm" creates
  /dev/shm/libpod_lock, shared by every rootful podman of the host.
- ``.NetworkSettings.Networks[<net>].Gateway`` reports <subnet>.1 even with isGateway false;
  the container's routing table has only the connected subnet (no default route).
- ``--runroot`` may be at most 50 characters long (podman exits 125 otherwise): the temp dir
  is /tmp/kmesh-test-podman-<hex>, not pytest's tmp_path.
- busybox-static 1.35's ``wget -T`` segfaults (exit 139, on the host too): bound a wget with
  ``busybox timeout N busybox wget ...`` instead.
- vfs mounts a shm tmpfs per container at <root>/vfs-containers/<id>/userdata/shm in the host's
  mount namespace; rm unmounts it (close unmounts any left under the temp dir).
- A container's processes sit in <cgroup-parent>/libpod-<id> in every hierarchy (v1 and
  unified); conmon in <cgroup-parent>/conmon (cgroupfs). The default parent "/libpod_parent"
  would be left behind, so every container here gets ``--cgroup-parent /kmesh-test-<hex>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import struct
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from kmesh_lab import procs
from kmesh_plugin.datapath.mounts import cgroup2_root, mounts

__all__ = ["BUSYBOX", "Network", "Podman", "PodmanError", "busybox_is_static", "unavailable"]

BUSYBOX = Path("/bin/busybox")  # busybox-static installs it here
CNI_DIR = Path("/usr/lib/cni")  # containernetworking-plugins
PREFIX = "kmesh-test-"
# podman's fixed host-side paths (see the module docstring): removed when we created them.
CNI_CACHE = Path("/var/lib/cni")
RUNC_STATE = Path("/run/runc")
TIMEOUT = 120.0
# "the specified runroot is longer than 50 characters": so the temp dir is in /tmp, not in
# pytest's (long) tmp_path.
MAX_RUNROOT = 50


class PodmanError(RuntimeError):
    """A podman command failed; the message has its argv, exit code and stderr."""


def busybox_is_static(path: Path = BUSYBOX) -> bool:
    """True if ``path`` is an ELF without a PT_INTERP program header (a static binary)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
                return False
            end = "<" if head[5] == 1 else ">"
            phoff, = struct.unpack_from(end + "Q", head, 0x20)
            phentsize, phnum = struct.unpack_from(end + "HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    pt_interp = 3
    return all(struct.unpack_from(end + "I", table, i * phentsize)[0] != pt_interp
               for i in range(phnum))


def unavailable() -> str | None:
    """Why podman cannot run containers here (None if it can)."""
    if os.geteuid() != 0:
        return "needs root"
    for tool, package in (("podman", "podman"), ("runc", "runc"), ("conmon", "conmon")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt package {package})"
    if not busybox_is_static():
        return f"{BUSYBOX} is missing or not static (apt package busybox-static)"
    for plugin in ("bridge", "host-local"):
        if not os.access(CNI_DIR / plugin, os.X_OK):
            return f"CNI plugin {plugin} is not installed (containernetworking-plugins)"
    if shutil.which("ip") is None:
        return "ip is not installed (iproute2)"
    return None


@dataclass(frozen=True)
class Network:
    """A CNI network of this podman: its conflist (in ``Podman.net_dir``) and bridge."""

    name: str
    bridge: str
    subnet: str
    conflist: Path

    def read(self) -> dict[str, Any]:
        return json.loads(self.conflist.read_text())


class Podman:
    """A private podman (see the module docstring); use it as a context manager."""

    def __init__(self, tmp: Path = Path("/tmp")) -> None:
        self.token = secrets.token_hex(4)
        runroot = tmp / f"{PREFIX}podman-{self.token}" / "run"
        if len(str(runroot)) > MAX_RUNROOT:
            raise PodmanError(f"{runroot}: podman refuses a runroot longer than {MAX_RUNROOT} "
                              "characters; give a shorter temporary directory")
        self._created_cni_cache = not CNI_CACHE.exists()
        self._created_runc_state = not RUNC_STATE.exists()
        self.dir = runroot.parent
        self.dir.mkdir(mode=0o700)
        self.root = self.dir / "storage"
        self.runroot = runroot
        self.tmp_dir = self.dir / "libpod"
        self.net_dir = self.dir / "net.d"
        self.bin_dir = self.dir / "bin"
        self.ipam_dir = self.dir / "ipam"
        self.conf = self.dir / "containers.conf"
        self.cgroup_parent = f"/{PREFIX}{self.token}"
        self.image = f"localhost/{PREFIX}busybox:{self.token}"
        self.networks: list[Network] = []
        self.containers: dict[str, str] = {}  # name -> full id
        self.netns: set[str] = set()  # SandboxKey of every container started
        for d in (self.root, self.runroot, self.tmp_dir, self.net_dir, self.bin_dir,
                  self.ipam_dir, self.dir / "tmp"):
            d.mkdir(mode=0o700)
        self.conf.write_text(CONTAINERS_CONF.format(
            plugin_dirs=json.dumps([str(CNI_DIR), str(self.bin_dir)]),
            net_dir=json.dumps(str(self.net_dir)), tmp_dir=json.dumps(str(self.tmp_dir)),
            events=json.dumps(str(self.dir / "events.log")),
            copy_tmp=json.dumps(str(self.dir / "tmp")),
        ))
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf),
                    "TMPDIR": str(self.dir / "tmp")}
        for var in ("CONTAINERS_STORAGE_CONF", "CONTAINERS_REGISTRIES_CONF", "CONTAINER_HOST"):
            self.env.pop(var, None)

    def __enter__(self) -> Podman:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- commands ---------------------------------------------------------------------------

    def argv(self, *args: str) -> list[str]:
        return ["podman", "--root", str(self.root), "--runroot", str(self.runroot),
                "--storage-driver", "vfs", *args]

    def podman(self, *args: str, check: bool = True,
               timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        try:
            out = subprocess.run(self.argv(*args), capture_output=True, text=True,
                                 env=self.env, stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise PodmanError(f"podman {' '.join(args)}: no answer in {timeout} s") from e
        if check and out.returncode != 0:
            raise PodmanError(f"podman {' '.join(args)}: exit {out.returncode}: "
                              f"{out.stderr.strip()}")
        return out

    def import_busybox(self) -> str:
        """The image ``self.image``: a rootfs of /bin/busybox (static), /bin/sh, /etc/passwd,
        /etc/group and an empty /www, imported offline."""
        rootfs = self.dir / "rootfs"
        for d in ("bin", "etc", "www", "tmp", "proc", "sys", "dev"):
            (rootfs / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
        (rootfs / "bin" / "sh").symlink_to("busybox")
        (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
        (rootfs / "etc" / "group").write_text("root:x:0:\n")
        tarball = self.dir / "busybox.tar"
        with tarfile.open(tarball, "w") as tar:
            for entry in sorted(rootfs.iterdir()):
                tar.add(entry, arcname=entry.name)
        self.podman("import", str(tarball), self.image)
        shutil.rmtree(rootfs)
        tarball.unlink()
        return self.image

    def add_network(self, subnet: str, plugins: Sequence[dict[str, Any]] = ()) -> Network:
        """A conflist ``<name>.conflist`` in net_dir: bridge (no gateway, no masquerade) with
        host-local IPAM (only ``subnet``, no routes: no default route in the container), then
        ``plugins``."""
        index = len(self.networks)
        name = f"{PREFIX}{self.token}-{index}"
        bridge = f"kmt{self.token}{index}"  # interface names are at most 15 bytes
        assert len(bridge) <= 15
        conflist = {
            "cniVersion": "1.0.0", "name": name,
            "plugins": [
                {"type": "bridge", "bridge": bridge, "isGateway": False, "ipMasq": False,
                 "hairpinMode": True,
                 "ipam": {"type": "host-local", "dataDir": str(self.ipam_dir),
                          "ranges": [[{"subnet": subnet}]]}},
                *plugins,
            ],
        }
        network = Network(name, bridge, subnet, self.net_dir / f"{name}.conflist")
        self.networks.append(network)
        network.conflist.write_text(json.dumps(conflist, indent=1) + "\n")
        return network

    def run(self, name: str, network: Network, *command: str) -> str:
        """Start a detached container ``name`` on ``network``; its full id. The CNI ADD has
        run (and succeeded) when this returns."""
        self.containers[name] = ""  # removed at close even if run fails half-way
        out = self.podman("run", "-d", "--name", name, "--network", network.name,
                          "--cgroup-parent", self.cgroup_parent, self.image, *command)
        cid = out.stdout.strip().splitlines()[-1]
        self.containers[name] = cid
        sandbox = self.inspect(name)["NetworkSettings"].get("SandboxKey")
        if sandbox:
            self.netns.add(sandbox)
        return cid

    def exec(self, name: str, *command: str,
             timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        """``podman exec``: the command runs in the container's namespaces; not checked."""
        return self.podman("exec", name, *command, check=False, timeout=timeout)

    def rm(self, name: str) -> None:
        """``podman rm -f -t 0``: kills the container and runs the CNI DEL."""
        self.podman("rm", "-f", "-t", "0", name)
        self.containers.pop(name, None)

    def inspect(self, name: str) -> dict[str, Any]:
        return json.loads(self.podman("inspect", "--type", "container", name).stdout)[0]

    def ip(self, name: str, network: Network) -> str:
        return str(self.inspect(name)["NetworkSettings"]["Networks"][network.name]["IPAddress"])

    def sandbox(self, name: str) -> str:
        """The container's network namespace path (/run/netns/netns-<uuid>)."""
        return str(self.inspect(name)["NetworkSettings"]["SandboxKey"])

    def exists(self, name: str) -> bool:
        return self.podman("container", "exists", name, check=False).returncode == 0

    # -- cleanup ----------------------------------------------------------------------------

    def close(self) -> None:
        """Remove everything this podman created; every step runs even if one fails, and
        what could not be removed is raised at the end."""
        problems: list[str] = []

        def step(what: str, fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as e:
                problems.append(f"{what}: {e}")

        if self.root.exists():
            step("rm containers", self.podman, "rm", "-a", "-f", "-t", "0")
            step("rm images", self.podman, "rmi", "-a", "-f")
        step("cgroups", self._remove_cgroups)
        step("conmon", self._kill_conmon)
        for sandbox in sorted(self.netns):
            step(f"netns {sandbox}", _remove_netns, sandbox)
        for network in self.networks:
            step(f"bridge {network.bridge}", _delete_link, network.bridge)
            for cached in CNI_CACHE.glob(f"results/{network.name}-*"):
                step(f"cni cache {cached}", cached.unlink)
        step("mounts", self._unmount)
        for cid in self.containers.values():
            if cid and (RUNC_STATE / cid).exists():
                problems.append(f"runc state {RUNC_STATE / cid} left behind")
        created = [CNI_CACHE / "results", CNI_CACHE] if self._created_cni_cache else []
        created += [RUNC_STATE] if self._created_runc_state else []
        for d in created:
            if d.is_dir():
                step(f"{d}", d.rmdir)
        step("temp dir", shutil.rmtree, self.dir)
        if problems:
            raise PodmanError("podman cleanup: " + "; ".join(problems))

    def _cgroup_dirs(self) -> list[Path]:
        """The cgroup parent in every hierarchy: the unified one first."""
        rel = self.cgroup_parent.lstrip("/")
        dirs = [cgroup2_root() / rel]
        dirs += [Path(m.mount_point) / rel for m in mounts() if m.fstype == "cgroup"]
        return dirs

    def _remove_cgroups(self) -> None:
        unified, *legacy = self._cgroup_dirs()
        procs.remove_cgroup_tree(str(unified), timeout=30)  # kills what is left, waits
        for top in legacy:
            if top.is_dir():
                for current, _dirs, _files in os.walk(top, topdown=False):
                    os.rmdir(current)

    def _kill_conmon(self) -> None:
        """A conmon of ours outside the cgroup parent (never expected): killed by pid."""
        marker = str(self.dir).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"/usr/bin/conmon\0") and marker in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)

    def _unmount(self) -> None:
        """Unmount whatever is still mounted below the temp dir, deepest first."""
        below = sorted((m.mount_point for m in mounts() if self.dir in m.mount_point.parents),
                       reverse=True)
        for point in below:
            subprocess.run(["umount", "-l", str(point)], check=True, timeout=30)


def _remove_netns(path: str) -> None:
    if not os.path.exists(path):
        return
    subprocess.run(["umount", "-l", path], check=False, timeout=30, capture_output=True)
    os.unlink(path)


def _delete_link(name: str) -> None:
    if Path("/sys/class/net", name).exists():
        subprocess.run(["ip", "link", "del", name], check=True, timeout=30)
    if Path("/sys/class/net", name).exists():
        raise PodmanError(f"link {name} still exists")


CONTAINERS_CONF = """\
# Written by kmesh_lab.podman: a private podman for one test (see its docstring).
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
netns = "private"
log_driver = "k8s-file"

[network]
network_backend = "cni"
cni_plugin_dirs = {plugin_dirs}
network_config_dir = {net_dir}

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = {events}
tmp_dir = {tmp_dir}
lock_type = "file"
image_copy_tmp_dir = {copy_tmp}
"""
