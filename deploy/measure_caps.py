#!/usr/bin/env python3
"""Measure which capability each kmesh-plugin operation needs (the table in deploy/README.md).

Run as root on a machine with bpffs and cgroup v2, from the repository root::

    .venv/bin/python deploy/measure_caps.py [--json results.json] [--code DIR]

``--code DIR`` runs the agent from another checkout of the package (e.g. a ``git archive``
of a commit) through PYTHONPATH; default: the installed package.

For every capability set in ``CASES`` it runs, as uid 0 with exactly that bounding set
(``setpriv --bounding-set=-all,+cap...``; a root process then holds exactly those capabilities):

* single bpf(2) commands and bpftool calls (``probe``), against a datapath that a full-capability
  agent attached to a private cgroup;
* the real agent (``kmesh-plugin run``) from nothing, and again over its own pins (the restart
  path: maps reused, links swapped with BPF_LINK_UPDATE);
* the operator commands ``status``, ``dump``, ``explain``, ``check-config``, ``datapath build``
  and ``datapath remove``.

and, in private mount namespaces, mount(2) of bpffs, the agent with /sys/fs/bpf not mounted
(it mounts bpffs itself), and the agent attaching through a read-only bind mount of the cgroup.

Everything is private: pin dirs /sys/fs/bpf/kmesh-test-cap<pid>-*, child cgroups
kmesh-test-cap<pid>-* of the cgroup v2 mount, a temporary directory. All of it is removed on
exit, also on failure or Ctrl-C. No traffic is sent; the cgroups hold no process.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PYTHON = sys.executable
BPFFS = Path("/sys/fs/bpf")

# name -> capabilities (None: the machine's full set, no setpriv)
CASES: dict[str, list[str] | None] = {
    "full": None,
    "bpf+net_admin+sys_admin": ["bpf", "net_admin", "sys_admin"],
    "bpf+net_admin": ["bpf", "net_admin"],
    "bpf+net_admin+perfmon": ["bpf", "net_admin", "perfmon"],
    "bpf+sys_admin": ["bpf", "sys_admin"],
    "net_admin+sys_admin": ["net_admin", "sys_admin"],
    "net_admin": ["net_admin"],
    "bpf": ["bpf"],
    "sys_admin": ["sys_admin"],
    "none": [],
}
MANIFESTS = """\
apiVersion: v1
kind: Node
metadata:
  name: kmesh-test-node
  labels: {topology.kubernetes.io/region: r1, topology.kubernetes.io/zone: z1}
---
apiVersion: v1
kind: Namespace
metadata: {name: sample}
---
apiVersion: v1
kind: Service
metadata: {name: helloworld, namespace: sample}
spec:
  clusterIP: 198.19.0.10
  ports: [{name: http, port: 5000}]
  trafficDistribution: PreferClose
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: helloworld-1
  namespace: sample
  labels: {kubernetes.io/service-name: helloworld}
addressType: IPv4
ports: [{name: http, port: 5000}]
endpoints:
- addresses: [198.18.0.10]
  nodeName: kmesh-test-node
  conditions: {ready: true}
"""


def caps_prefix(caps: Sequence[str] | None) -> list[str]:
    """argv prefix that runs a command with exactly ``caps`` (None: unchanged)."""
    if caps is None:
        return []
    bounding = "-all" + "".join(f",+{c}" for c in caps)
    return ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--"]


def short_error(text: str) -> str:
    """The informative lines of a failure: the verifier's reason, the errno libbpf or bpf(2)
    or mount(8) reported."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    found: list[str] = []
    for pattern in (r"prohibited|invalid|not allowed", r"bpf\(\w+\) failed: \w+",
                    r"failed to load: -?\d+", r"load failed: ", r"Couldn't load trivial",
                    r"[Pp]ermission denied", r"Operation not permitted", r"Error"):
        for line in lines:
            if re.search(pattern, line) and line not in found:
                found.append(line[:200])
                break
        if len(found) == 2:
            break
    return " / ".join(found) if found else (lines[-1] if lines else "no output")[:200]


# --------------------------------------------------------------------------------------------
# probe: single bpf(2) commands, run under the reduced set
# --------------------------------------------------------------------------------------------


def probe(pin: Path, cgroup: Path, obj: Path, spare_link: Path) -> dict[str, str]:
    from kmesh_plugin.datapath import records, syscall
    from kmesh_plugin.datapath.mounts import cgroup2_root
    from kmesh_plugin.errors import BpfError, BpftoolError

    out: dict[str, str] = {}

    def attempt(name: str, fn: Any) -> Any:
        try:
            value = fn()
        except BpfError as e:
            out[name] = f"{errno.errorcode.get(e.errno or 0, e.errno)}: {e}"
        except BpftoolError as e:
            out[name] = "bpftool: " + short_error(e.message)
        except OSError as e:
            out[name] = f"{errno.errorcode.get(e.errno or 0, e.errno)}: {e}"
        except ValueError as e:  # setrlimit refuses to raise a hard limit without the cap
            out[name] = f"EPERM: {e}"
        else:
            out[name] = "ok"
            return value
        return None

    from kmesh_plugin.datapath.bpftool import Bpftool

    tool = Bpftool()
    out["caps"] = Path("/proc/self/status").read_text().split("CapEff:")[1].split()[0]
    attempt("read /proc/self/mountinfo (cgroup2_root)", cgroup2_root)

    def map_create() -> None:
        with syscall.Map.create(syscall.ARRAY, 4, 4, 1, name="kmesh_probe") as m:
            m.update(b"\0" * 4, b"\1\0\0\0")
            m.pin(pin / f"probe-map-{os.getpid()}")
        os.unlink(pin / f"probe-map-{os.getpid()}")

    attempt("BPF_MAP_CREATE + UPDATE_ELEM + OBJ_PIN (private map)", map_create)

    def barrier() -> None:
        with syscall.Barrier.create() as b:
            b.wait()

    attempt("ARRAY_OF_MAPS create + update (RCU barrier)", barrier)

    def open_map() -> syscall.Map:
        m = syscall.Map.open_pinned(pin / "maps" / records.MAP_FRONTENDS)
        m.lookup_batch()
        return m

    frontends = attempt("BPF_OBJ_GET map + GET_INFO_BY_FD + LOOKUP_BATCH", open_map)

    def link_info() -> Any:
        fd = syscall.obj_get(pin / "links" / records.PROG_CONNECT4)
        try:
            return syscall.link_info(fd)
        finally:
            os.close(fd)

    info = attempt("BPF_OBJ_GET link + GET_INFO_BY_FD (loader._check_links)", link_info)

    def prog_info_pinned() -> None:
        fd = syscall.obj_get(pin / "progs" / records.PROG_CONNECT4)
        try:
            syscall.prog_info(fd)
        finally:
            os.close(fd)

    attempt("BPF_OBJ_GET prog + GET_INFO_BY_FD (pinned program)", prog_info_pinned)
    if info is not None:
        attempt("BPF_PROG_GET_FD_BY_ID (inspect.read_links)",
                lambda: os.close(syscall.prog_get_fd_by_id(info.prog_id)))
        attempt("BPF_LINK_GET_FD_BY_ID", lambda: os.close(syscall.link_get_fd_by_id(info.id)))
    if frontends is not None:
        attempt("BPF_MAP_GET_FD_BY_ID", lambda: syscall.Map.from_id(frontends.id).close())
        frontends.close()

    def link_create() -> None:
        prog = syscall.obj_get(pin / "progs" / records.PROG_CONNECT4)
        cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            link = syscall.link_create(prog, cg, syscall.BPF_CGROUP_INET4_CONNECT)
            os.close(link)  # unpinned: closing the last fd detaches it
        finally:
            os.close(cg)
            os.close(prog)

    attempt("BPF_LINK_CREATE on a cgroup", link_create)

    def link_update() -> None:
        prog = syscall.obj_get(pin / "progs" / records.PROG_CONNECT4)
        link = syscall.obj_get(spare_link)
        try:
            syscall.link_update(link, prog)
        finally:
            os.close(link)
            os.close(prog)

    attempt("BPF_LINK_UPDATE (pinned link)", link_update)

    def link_detach() -> None:
        link = syscall.obj_get(spare_link)
        try:
            syscall.link_detach(link)
        finally:
            os.close(link)

    attempt("BPF_LINK_DETACH (pinned link)", link_detach)

    def query() -> None:
        cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            syscall.prog_query(cg, syscall.BPF_CGROUP_INET4_CONNECT)
        finally:
            os.close(cg)

    attempt("BPF_PROG_QUERY on a cgroup", query)

    scratch_progs = pin / f"probe-progs-{os.getpid()}"
    scratch_maps = pin / f"probe-maps-{os.getpid()}"

    def loadall() -> None:
        scratch_maps.mkdir()
        tool.prog_loadall(obj, scratch_progs, pin_maps_dir=scratch_maps)

    attempt("bpftool prog loadall (MAP_CREATE, PROG_LOAD cgroup/connect4+6)", loadall)
    for d in (scratch_progs, scratch_maps):
        with contextlib.suppress(OSError):
            shutil.rmtree(d)
    attempt("bpftool prog show pinned",
            lambda: tool.prog_show(pin / "progs" / records.PROG_CONNECT4))
    attempt("bpftool map show pinned",
            lambda: tool.map_show(pin / "maps" / records.MAP_FRONTENDS))
    attempt("bpftool link show pinned",
            lambda: tool.link_show(pin / "links" / records.PROG_CONNECT4))
    attempt("bpftool cgroup show", lambda: tool.cgroup_show(cgroup))
    inf = resource.RLIM_INFINITY
    attempt("setrlimit(RLIMIT_MEMLOCK, infinity)",
            lambda: resource.setrlimit(resource.RLIMIT_MEMLOCK, (inf, inf)))
    return out


def make_spare_link(pin: Path, cgroup: Path, path: Path) -> None:
    """A pinned connect4 link on ``cgroup`` for the LINK_UPDATE/LINK_DETACH probes."""
    from kmesh_plugin.datapath import records, syscall

    prog = syscall.obj_get(pin / "progs" / records.PROG_CONNECT4)
    cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        link = syscall.link_create(prog, cg, syscall.BPF_CGROUP_INET4_CONNECT)
        try:
            syscall.obj_pin(link, path)
        finally:
            os.close(link)
    finally:
        os.close(cg)
        os.close(prog)


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------


class Bench:
    """Private pins, cgroups and files; ``close()`` removes every one of them."""

    def __init__(self, code: Path | None) -> None:
        from kmesh_plugin.datapath.mounts import cgroup2_root

        self.tag = f"kmesh-test-cap{os.getpid()}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.cg_root = cgroup2_root()
        self.env = dict(os.environ)
        if code is not None:
            self.env["PYTHONPATH"] = str(code)
        self.manifests = self.tmp / "manifests"
        self.manifests.mkdir()
        (self.manifests / "objects.yaml").write_text(MANIFESTS)
        self.build = self.tmp / "build"
        self.pins: list[Path] = []
        self.cgroups: list[Path] = []
        self.agents: list[subprocess.Popen[bytes]] = []
        self.configs: list[Path] = []

    # -- resources --------------------------------------------------------------------------

    def pin_dir(self, name: str) -> Path:
        path = BPFFS / f"{self.tag}-{name}"
        self.pins.append(path)
        return path

    def cgroup(self, name: str) -> Path:
        path = self.cg_root / f"{self.tag}-{name}"
        path.mkdir()
        self.cgroups.append(path)
        return path

    def config(self, name: str, pin: Path, cgroup: Path, build: Path | None = None) -> Path:
        lines = [
            "[node]", 'name = "kmesh-test-node"',
            "[datapath]", f"cgroup = {json.dumps(str(cgroup))}",
            f"pin_dir = {json.dumps(str(pin))}",
            f"build_dir = {json.dumps(str(build or self.build))}",
            "max_services = 64", "max_endpoints = 256",
            "[source]", 'kind = "manifests"', f"path = {json.dumps(str(self.manifests))}",
            "[agent]", f"status_file = {json.dumps(str(self.tmp / name / 'status.json'))}",
            'metrics_address = "127.0.0.1"', "metrics_port = 0",
        ]
        path = self.tmp / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        self.configs.append(path)
        return path

    def status_file(self, name: str) -> Path:
        return self.tmp / name / "status.json"

    # -- processes --------------------------------------------------------------------------

    def run(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        # cwd: `python -m` puts the working directory first on sys.path (a checkout there
        # would shadow --code).
        return subprocess.run(argv, capture_output=True, text=True, env=self.env,
                              cwd=self.tmp, timeout=timeout, check=False)

    def cli(self, caps: Sequence[str] | None, *args: str | Path,
            wrap: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        return self.run([*wrap, *caps_prefix(caps), PYTHON, "-m", "kmesh_plugin.cli",
                         *map(str, args)])

    def start_agent(self, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"agent-{len(self.agents)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp,
                                start_new_session=True)
        log.close()
        proc.log = self.tmp / f"agent-{len(self.agents)}.log"  # type: ignore[attr-defined]
        self.agents.append(proc)
        return proc

    def agent(self, caps: Sequence[str] | None, config: Path,
              wrap: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        return self.start_agent([*wrap, *caps_prefix(caps), PYTHON, "-m", "kmesh_plugin.cli",
                                 "run", "--config", str(config)])

    def wait_up(self, proc: subprocess.Popen[bytes], status: Path,
                timeout: float = 60) -> tuple[bool, str]:
        """Until the agent reports synced (up) or exits (the reason it printed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                text = Path(proc.log).read_text(errors="replace")  # type: ignore[attr-defined]
                return False, f"exit {proc.returncode}: {short_error(text)}"
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(status.read_text())
                if data.get("synced") and data.get("pid") in (proc.pid, _child_pid(proc.pid)):
                    return True, "synced, datapath attached"
            time.sleep(0.2)
        return False, "timeout"

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def remove_datapath(self, pin: Path) -> None:
        cfg = self.tmp / "remove.toml"
        cfg.write_text(f"[datapath]\npin_dir = {json.dumps(str(pin))}\ncgroup = "
                       f"{json.dumps(str(self.cg_root))}\n[source]\npath = "
                       f"{json.dumps(str(self.manifests))}\n")
        self.cli(None, "datapath", "remove", "--config", cfg)

    def close(self) -> list[str]:
        problems = []
        for proc in self.agents:
            self.stop(proc)
        for pin in self.pins:
            if pin.exists():
                self.remove_datapath(pin)
            if pin.exists():
                shutil.rmtree(pin, ignore_errors=True)
            if pin.exists():
                problems.append(f"{pin} is left")
        for cg in reversed(self.cgroups):
            try:
                cg.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                problems.append(f"cannot remove cgroup {cg}: {e}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


def _child_pid(pid: int) -> int:
    """setpriv execs in place, prlimit/unshare fork or exec: the agent is pid or its child."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return pid
    return int(children[0]) if children else pid


def measure(bench: Bench) -> dict[str, Any]:
    results: dict[str, Any] = {"kernel": os.uname().release, "cases": {}, "namespaces": {}}
    bench.build.mkdir()
    # A full-capability agent on cgroup "base": the datapath the probes and commands read.
    base_pin, base_cg = bench.pin_dir("base"), bench.cgroup("base")
    base_cfg = bench.config("base", base_pin, base_cg)
    spare_cg = bench.cgroup("spare")
    obj = Path(bench.cli(None, "datapath", "build", "--config", base_cfg).stdout.strip())
    base = bench.agent(None, base_cfg)
    up, why = bench.wait_up(base, bench.status_file("base"))
    if not up:
        raise SystemExit(f"the full-capability agent did not come up: {why}")
    results["object"] = obj.name

    for name, caps in CASES.items():
        print(f"case {name} ...", file=sys.stderr, flush=True)
        case: dict[str, Any] = {"caps": caps}
        spare = base_pin / f"spare-link-{name.replace('+', '-')}"
        bench.run([PYTHON, __file__, "spare-link", str(base_pin), str(spare_cg), str(spare)])
        p = bench.run([*caps_prefix(caps), PYTHON, __file__, "probe", str(base_pin),
                       str(spare_cg), str(obj), str(spare)])
        case["probe"] = json.loads(p.stdout) if p.returncode == 0 else {"error": p.stderr}
        with contextlib.suppress(OSError):
            spare.unlink()

        commands: dict[str, str] = {}
        for label, args in (
            ("check-config", ["check-config", "--config", base_cfg]),
            ("status", ["status", "-o", "json", "--config", base_cfg]),
            ("dump", ["dump", "-o", "json", "--config", base_cfg]),
            ("explain", ["explain", "helloworld", "-n", "sample", "-o", "json",
                         "--config", base_cfg]),
        ):
            r = bench.cli(caps, *args)
            commands[label] = f"exit {r.returncode}" + _command_detail(label, r)
        fresh_build = bench.tmp / f"build-{name}"
        build_cfg = bench.config(f"build-{name}", base_pin, base_cg, fresh_build)
        r = bench.cli(caps, "datapath", "build", "--config", build_cfg)
        commands["datapath build (clang)"] = f"exit {r.returncode}" + (
            "" if r.returncode == 0 else f": {short_error(r.stderr)}")
        case["commands"] = commands

        # The agent from nothing, then over its own pins (a pod restart), then remove.
        pin, cg = bench.pin_dir(f"agent-{name.replace('+', '-')}"), bench.cgroup(
            f"agent-{name.replace('+', '-')}")
        cfg = bench.config(f"agent-{name}", pin, cg)
        agent = bench.agent(caps, cfg)
        up, why = bench.wait_up(agent, bench.status_file(f"agent-{name}"))
        bench.stop(agent)
        case["agent fresh start"] = why
        if not up:  # give the restart test pins to restart over
            helper = bench.agent(None, cfg)
            bench.wait_up(helper, bench.status_file(f"agent-{name}"))
            bench.stop(helper)
        agent = bench.agent(caps, cfg)
        up, why = bench.wait_up(agent, bench.status_file(f"agent-{name}"))
        bench.stop(agent)
        case["agent restart over pins"] = why
        r = bench.cli(caps, "datapath", "remove", "--config", cfg)
        left = pin.exists() or bool(bench.run(["bpftool", "-j", "cgroup", "show", str(cg)])
                                    .stdout.strip() not in ("", "[]"))
        case["datapath remove"] = f"exit {r.returncode}" + (
            f": {short_error(r.stdout + r.stderr)}" if r.returncode or left else "") + (
            " (pins or links left)" if left else "")
        results["cases"][name] = case

    # memlock: the agent with RLIMIT_MEMLOCK 0 (the kernel charges BPF memory to the memcg).
    pin, cg = bench.pin_dir("memlock0"), bench.cgroup("memlock0")
    cfg = bench.config("memlock0", pin, cg)
    agent = bench.agent(["bpf", "net_admin", "sys_admin"], cfg,
                        wrap=["prlimit", "--memlock=0:0"])
    results["namespaces"]["agent with RLIMIT_MEMLOCK 0 (bpf+net_admin+sys_admin)"] = (
        bench.wait_up(agent, bench.status_file("memlock0"))[1])
    bench.stop(agent)
    bench.cli(None, "datapath", "remove", "--config", cfg)

    unshare = ["unshare", "--mount", "--propagation", "private", "--"]
    # mount(2) of a new bpffs instance, in a private mount namespace.
    target = bench.tmp / "bpffs-mountpoint"
    target.mkdir()
    for caps in (["bpf", "net_admin", "perfmon"], ["sys_admin"]):
        r = bench.run([*unshare, *caps_prefix(caps), "mount", "-t", "bpf", "bpf", str(target)])
        results["namespaces"][f"mount -t bpf ({'+'.join(caps)})"] = (
            "ok" if r.returncode == 0 else short_error(r.stderr))

    # The agent where /sys/fs/bpf is not bpffs (umounted in a private namespace): it mounts
    # bpffs itself, in its own mount namespace, so its pins die with that namespace.
    for caps in (["bpf", "net_admin"], ["bpf", "net_admin", "sys_admin"]):
        label = "+".join(caps)
        pin = bench.pin_dir("nofs")  # in the agent's private bpffs; listed for cleanup
        cg = bench.cgroup(f"nofs-{label.replace('+', '-')}")
        cfg = bench.config(f"nofs-{label}", pin, cg)
        script = (f"umount {BPFFS} && exec " + " ".join(caps_prefix(caps)) +
                  f" {PYTHON} -m kmesh_plugin.cli run --config {cfg}")
        agent = bench.start_agent([*unshare, "sh", "-c", script])
        up, why = bench.wait_up(agent, bench.status_file(f"nofs-{label}"))
        bench.stop(agent)
        time.sleep(0.5)
        links = bench.run(["bpftool", "-j", "cgroup", "show", str(cg)]).stdout.strip()
        after = "links gone after the namespace exited" if links in ("", "[]") else (
            f"links still attached: {links}")
        results["namespaces"][f"agent, /sys/fs/bpf not mounted ({label})"] = (
            f"{why}; {after}" if up else why)

    # The agent attaching through a read-only bind mount of its cgroup (a readOnly hostPath).
    cg = bench.cgroup("ro")
    pin = bench.pin_dir("ro")
    ro = bench.tmp / "cgroup-ro"
    ro.mkdir()
    cfg = bench.config("ro", pin, ro)
    caps = ["bpf", "net_admin", "sys_admin"]
    script = (f"mount --bind {cg} {ro} && mount -o remount,bind,ro {ro} && exec "
              + " ".join(caps_prefix(caps)) + f" {PYTHON} -m kmesh_plugin.cli run --config {cfg}")
    agent = bench.start_agent([*unshare, "sh", "-c", script])
    up, why = bench.wait_up(agent, bench.status_file("ro"))
    links = bench.run(["bpftool", "-j", "cgroup", "show", str(cg)]).stdout
    # The kernel keeps 15 characters of a program name: count by prefix.
    ours = sum(str(p.get("name", "")).startswith("kmesh_") for p in json.loads(links or "[]"))
    bench.stop(agent)
    key = "agent, cgroup through a read-only bind mount (bpf+net_admin+sys_admin)"
    results["namespaces"][key] = (
        f"{why}; {ours} programs on the cgroup" if up else why)
    bench.remove_datapath(pin)

    bench.stop(base)
    return results


def _command_detail(label: str, r: subprocess.CompletedProcess[str]) -> str:
    if label not in ("status", "dump"):
        return "" if r.returncode == 0 else f": {short_error(r.stderr or r.stdout)}"
    try:
        data = json.loads(r.stdout)
    except ValueError:
        return f": {short_error(r.stderr or r.stdout)}"
    dp = data.get("datapath", data)
    details = [dp["problem"]] if dp.get("problem") else []
    details += sorted({link["error"] for link in dp.get("links") or [] if link.get("error")})
    if label == "status":
        details.insert(0, f"attached {dp.get('attached')}, agent healthy "
                          f"{data['agent'].get('healthy')}")
    return f" ({'; '.join(details)})" if details else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    p = sub.add_parser("probe")
    for arg in ("pin", "cgroup", "obj", "spare"):
        p.add_argument(arg, type=Path)
    s = sub.add_parser("spare-link")
    for arg in ("pin", "cgroup", "path"):
        s.add_argument(arg, type=Path)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--code", type=Path, help="import kmesh_plugin from this directory")
    args = parser.parse_args(argv)
    if args.cmd == "probe":
        print(json.dumps(probe(args.pin, args.cgroup, args.obj, args.spare)))
        return 0
    if args.cmd == "spare-link":
        make_spare_link(args.pin, args.cgroup, args.path)
        return 0
    if os.geteuid() != 0:
        parser.error("run as root")
    if args.code is not None:
        sys.path.insert(0, str(args.code.resolve()))
    bench = Bench(args.code.resolve() if args.code else None)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        results = measure(bench)
    finally:
        problems = bench.close()
        signal.signal(signal.SIGTERM, previous)
        for problem in problems:
            print(f"cleanup: {problem}", file=sys.stderr)
    text = json.dumps(results, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
