"""The lab's cluster network: the real CNI ``bridge`` + ``host-local`` plugins, run by hand.

A :class:`Fabric` owns one network namespace (the "fabric") that holds the Linux bridge and the
host ends of every pod's veth pair, so nothing of the lab is ever created in the host's own
namespace. Each pod is a named network namespace; :meth:`Fabric.add_pod` executes the CNI chain
for it exactly as a container runtime would (CNI spec 1.0.0: environment variables, config on
stdin, result or error JSON on stdout) and returns the addresses host-local assigned.

What it does as containerd's CRI plugin (go-cni) does:

* **Loopback** is a network of its own, ``cni-loopback`` (cniVersion 0.3.1, one ``loopback``
  plugin) on interface ``lo``, next to the pod's network on ``eth0`` (go-cni ``WithLoNetwork``).
  containerd ADDs the two concurrently (sequentially with ``setup_serially``); the lab ADDs
  loopback first, then the pod network. DEL goes in go-cni's ``Remove`` order: loopback, then
  the pod network (whose plugins run in reverse).
* **CNI_ARGS** carry the pod's identity: ``IgnoreUnknown=1;K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;
  K8S_POD_INFRA_CONTAINER_ID=..;K8S_POD_UID=..`` (:func:`k8s_args`), the same for every network
  and every plugin; CNI_CONTAINERID is the sandbox id.
* **CNI_PATH** is a list of directories searched in order for each plugin's ``type``
  (libcni's ``FindInPath``): a chained plugin installed in a node's own bin dir is found there,
  Debian's in /usr/lib/cni.
* **prevResult** goes to every plugin of an ADD after the first (the previous plugin's result)
  and, for a network of cniVersion 0.4.0 or later, to every plugin of a DEL (the ADD's result).

The IPAM config deliberately has no routes: a pod gets only its connected subnet, so a connect
that the eBPF datapath did not translate fails with ENETUNREACH inside the pod instead of
leaving it (see MACHINE-NOTES, network rules).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import ipaddress
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from kmesh_lab import netns, procs

__all__ = [
    "CNI_VERSION",
    "DEFAULT_CNI_PATH",
    "LOOPBACK_CONFIG",
    "CniError",
    "Fabric",
    "PodAddress",
    "find_plugin",
    "format_cni_args",
    "k8s_args",
    "load_conflist",
    "netns_cookie",
]

CNI_VERSION = "1.0.0"
DEFAULT_CNI_PATH = "/usr/lib/cni"
DEFAULT_SUBNET = "198.18.0.0/16"
# go-cni's built-in loopback network (containerd CRI: WithLoNetwork), attached on "lo".
LOOPBACK_CONFIG: dict[str, Any] = {
    "cniVersion": "0.3.1", "name": "cni-loopback", "plugins": [{"type": "loopback"}],
}
LOOPBACK_IFNAME = "lo"
MAX_CONFLIST_BYTES = 1 << 20
SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>; Python's socket module has no name for it

# CNI spec: container ids are alphanumeric plus "_.-"; Linux interface names are <= 15 bytes.
_CONTAINER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_IFNAME_MAX = 15

# Set in a pod's namespace before ADD: ``default`` is what the new eth0 inherits when the
# plugin moves it in. The bridge plugin (1.1.1) already turns DAD off on eth0 because of
# hairpinMode; doing it here too keeps an IPv6 address from ever being tentative (unusable)
# whatever the plugin version, and accept_ra=0 means no router advertisement can ever install a
# default route. _check_ipv6_usable() verifies the outcome after ADD.
_POD_SYSCTLS = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.all.accept_ra": "0",
    "net.ipv6.conf.default.accept_ra": "0",
}

IpRange = tuple[str, str]


class CniError(RuntimeError):
    """A CNI plugin failed. ``code`` and ``msg`` are the plugin's own (None if it gave none)."""

    def __init__(
        self, plugin: str, command: str, code: int | None, msg: str, details: str = ""
    ) -> None:
        self.plugin = plugin
        self.command = command
        self.code = code
        self.msg = msg
        self.details = details
        text = f"CNI {command} {plugin}: code {code}: {msg}"
        if details:
            text += f" ({details})"
        super().__init__(text)


@dataclass(frozen=True)
class PodAddress:
    """What one CNI ADD gave a pod: its addresses and the interfaces on both ends."""

    netns: str
    container_id: str
    ifname: str
    ipv4: str
    ipv4_prefixlen: int
    ipv6: str | None = None
    ipv6_prefixlen: int | None = None
    mac: str | None = None
    host_veth: str | None = None
    result: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass
class _Attachment:
    """What DEL needs to undo one ADD: the exact network config, arguments and ADD result."""

    pod_netns: str
    container_id: str
    ifname: str
    config: dict[str, Any]
    result: dict[str, Any] | None
    cni_args: dict[str, str] = field(default_factory=dict)
    cni_path: str = DEFAULT_CNI_PATH


def k8s_args(namespace: str, name: str, sandbox_id: str, uid: str) -> dict[str, str]:
    """CNI_ARGS as containerd's CRI plugin passes them for a pod sandbox (``IgnoreUnknown``
    first: plugins that parse CNI_ARGS strictly, host-local among them, would refuse the rest)."""
    return {
        "IgnoreUnknown": "1",
        "K8S_POD_NAMESPACE": namespace,
        "K8S_POD_NAME": name,
        "K8S_POD_INFRA_CONTAINER_ID": sandbox_id,
        "K8S_POD_UID": uid,
    }


def format_cni_args(args: Mapping[str, str]) -> str:
    """``K=V;K2=V2``, the CNI_ARGS syntax; refuses what it cannot carry."""
    for key, value in args.items():
        if not key or any(c in key for c in "=;") or ";" in value:
            raise ValueError(f"CNI_ARGS cannot carry {key!r}={value!r}")
    return ";".join(f"{key}={value}" for key, value in args.items())


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("."))
    except (AttributeError, ValueError):
        return (0,)


def find_plugin(plugin_type: str, cni_path: str, command: str = "ADD") -> str:
    """The executable for ``type`` in the first CNI_PATH directory holding it (libcni's
    FindInPath); a type with a slash is never a path."""
    if not plugin_type or "/" in plugin_type or plugin_type in (".", ".."):
        raise CniError(str(plugin_type), command, None, f"invalid plugin type {plugin_type!r}")
    dirs = [d for d in cni_path.split(os.pathsep) if d]
    for directory in dirs:
        candidate = os.path.join(directory, plugin_type)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(plugin_type, command, None,
                   f'failed to find plugin "{plugin_type}" in path {dirs}')


def load_conflist(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a network configuration list as a runtime does before every ADD and DEL."""
    with open(path, "rb") as handle:
        raw = handle.read(MAX_CONFLIST_BYTES + 1)
    if len(raw) > MAX_CONFLIST_BYTES:
        raise ValueError(f"{path}: larger than {MAX_CONFLIST_BYTES} bytes")
    conf = json.loads(raw)
    if not isinstance(conf, dict) or not isinstance(conf.get("cniVersion"), str) \
            or not isinstance(conf.get("name"), str):
        raise ValueError(f"{path}: a conflist needs cniVersion and name")
    plugins = conf.get("plugins")
    if not isinstance(plugins, list) or not plugins or not all(
            isinstance(p, dict) and isinstance(p.get("type"), str) for p in plugins):
        raise ValueError(f"{path}: plugins must be a non-empty list of objects with a type")
    return conf


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int
_CLONE_NEWNET = 0x40000000


def netns_cookie(pod_netns_name: str) -> int:
    """The netns cookie of a named namespace: SO_NETNS_COOKIE of a socket opened inside it,
    which equals bpf_get_netns_cookie() there. Read in a short-lived thread that enters only
    that namespace (setns changes the calling thread alone) and then exits."""
    outcome: list[int | BaseException] = []

    def probe() -> None:
        try:
            fd = os.open(netns.path(pod_netns_name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {pod_netns_name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
            outcome.append(struct.unpack("=Q", raw)[0])
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)

    thread = threading.Thread(target=probe, name=f"netns-cookie-{pod_netns_name}")
    thread.start()
    thread.join()
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _check_range(subnet: str, ip_range: IpRange | None) -> None:
    if ip_range is None:
        return
    net = ipaddress.ip_network(subnet)
    start, end = (ipaddress.ip_address(value) for value in ip_range)
    if start not in net or end not in net or start > end:
        raise ValueError(f"range {ip_range[0]}-{ip_range[1]} is not an ordered range in {subnet}")


def _range_set(subnet: str, ip_range: IpRange | None) -> list[dict[str, str]]:
    """One host-local range set (a list of ranges); ``rangeStart/End`` pin a node's slice."""
    _check_range(subnet, ip_range)
    entry = {"subnet": subnet}
    if ip_range is not None:
        entry["rangeStart"], entry["rangeEnd"] = ip_range
    return [entry]


def _parse_result(
    result: dict[str, Any], pod_netns: str, container_id: str, ifname: str
) -> PodAddress:
    """Pick the pod's IPv4 (and IPv6) address and both veth ends out of a CNI 1.0 result."""
    interfaces = result.get("interfaces", [])
    v4: ipaddress.IPv4Interface | None = None
    v6: ipaddress.IPv6Interface | None = None
    for entry in result.get("ips", []):
        iface = ipaddress.ip_interface(entry["address"])
        if isinstance(iface, ipaddress.IPv4Interface) and v4 is None:
            v4 = iface
        elif isinstance(iface, ipaddress.IPv6Interface) and v6 is None:
            v6 = iface
    if v4 is None:
        raise CniError("bridge", "ADD", None, f"result has no IPv4 address: {json.dumps(result)}")
    pod_if = next((i for i in interfaces if i.get("sandbox") and i.get("name") == ifname), {})
    # The bridge plugin lists [bridge, host veth, pod interface]; the host veth has no sandbox.
    host_ifs = [i for i in interfaces if not i.get("sandbox")]
    return PodAddress(
        netns=pod_netns,
        container_id=container_id,
        ifname=ifname,
        ipv4=str(v4.ip),
        ipv4_prefixlen=v4.network.prefixlen,
        ipv6=str(v6.ip) if v6 else None,
        ipv6_prefixlen=v6.network.prefixlen if v6 else None,
        mac=pod_if.get("mac"),
        host_veth=host_ifs[-1]["name"] if len(host_ifs) > 1 else None,
        result=result,
    )


class Fabric:
    """One lab cluster network: a fabric namespace holding a CNI bridge, pods attached to it.

    Use as a context manager, or call :meth:`create` and :meth:`destroy` yourself.
    """

    def __init__(
        self,
        netns_name: str,
        bridge: str,
        state_dir: str,
        *,
        subnet: str = DEFAULT_SUBNET,
        ipv6_subnet: str | None = None,
        network_name: str | None = None,
        cni_path: str = DEFAULT_CNI_PATH,
        timeout: float = 30.0,
    ) -> None:
        """Describe the fabric; nothing is created until :meth:`create`.

        ``bridge`` is the Linux bridge name (<= 15 bytes) inside the fabric namespace.
        ``state_dir`` is the lab's state directory; host-local keeps its leases below it.
        ``ipv6_subnet`` (e.g. ``2001:2::/64``) turns on dual stack.
        """
        if not 0 < len(bridge.encode()) <= _IFNAME_MAX:
            raise ValueError(f"bridge name {bridge!r} must be 1..{_IFNAME_MAX} bytes")
        ipaddress.IPv4Network(subnet)  # validate early, with the standard error message
        if ipv6_subnet is not None:
            ipaddress.IPv6Network(ipv6_subnet)
        self.netns_name = netns_name
        self.bridge = bridge
        self.subnet = subnet
        self.ipv6_subnet = ipv6_subnet
        self.network_name = network_name or netns_name
        self.cni_path = cni_path
        self.timeout = timeout
        self.data_dir = os.path.join(state_dir, "cni", self.network_name)
        self._attachments: dict[tuple[str, str, str], _Attachment] = {}

    # ---------------------------------------------------------------- lifecycle

    @property
    def netns_path(self) -> str:
        """Path of the fabric namespace file (where the plugins run)."""
        return netns.path(self.netns_name)

    def create(self) -> Fabric:
        """Create the fabric namespace and the host-local data directory."""
        os.makedirs(self.data_dir, exist_ok=True)
        netns.add(self.netns_name)
        return self

    def destroy(self) -> None:
        """DEL every pod still attached, delete the fabric namespace and host-local data.

        Idempotent. Cleans up as much as it can and then raises the first error, if any.
        """
        first_error: BaseException | None = None
        for key, attachment in list(self._attachments.items()):
            if key not in self._attachments:
                continue  # its pod's DEL above took it (a loopback network)
            try:
                self.del_pod(attachment.pod_netns, attachment.container_id, attachment.ifname)
            except Exception as exc:  # keep going: the namespace removal below undoes it anyway
                first_error = first_error or exc
        try:
            netns.delete(self.netns_name)  # takes the bridge and the host veth ends with it
        except Exception as exc:
            first_error = first_error or exc
        self._attachments.clear()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        if first_error is not None:
            raise first_error

    def __enter__(self) -> Fabric:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # ---------------------------------------------------------------- configuration

    def network_config(
        self, ip_range: IpRange | None = None, ipv6_range: IpRange | None = None
    ) -> dict[str, Any]:
        """Return the network configuration list (conflist) for one pod's ADD/DEL."""
        ranges = [_range_set(self.subnet, ip_range)]
        if self.ipv6_subnet is not None:
            ranges.append(_range_set(self.ipv6_subnet, ipv6_range))
        elif ipv6_range is not None:
            raise ValueError("ipv6_range given but the fabric has no ipv6_subnet")
        bridge = {
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": False,
            "isDefaultGateway": False,
            "ipMasq": False,
            "hairpinMode": True,
            # No "routes": the pod gets no default route, in v4 nor v6.
            "ipam": {"type": "host-local", "ranges": ranges, "dataDir": self.data_dir},
        }
        return {"cniVersion": CNI_VERSION, "name": self.network_name, "plugins": [bridge]}

    # ---------------------------------------------------------------- plugin execution

    def _env(self, command: str, pod_netns: str, container_id: str, ifname: str,
             cni_args: Mapping[str, str] | None = None,
             cni_path: str | None = None) -> dict[str, str]:
        netns_path = netns.path(pod_netns)
        if command == "DEL" and not os.path.exists(netns_path):
            netns_path = ""  # CNI: DEL without a namespace only releases the IPAM lease
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns_path,
            "CNI_IFNAME": ifname,
            "CNI_PATH": cni_path or self.cni_path,
        }
        if cni_args:
            env["CNI_ARGS"] = format_cni_args(cni_args)
        return env

    def _exec_plugin(
        self, plugin: dict[str, Any], env: dict[str, str], stdin_conf: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Run one plugin binary in the fabric namespace; return its result JSON (None if empty)."""
        name, command = plugin["type"], env["CNI_COMMAND"]
        proc = procs.spawn(
            [find_plugin(name, env["CNI_PATH"], command)],
            netns=self.netns_path,
            cgroup=None,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = proc.communicate(json.dumps(stdin_conf).encode(), timeout=self.timeout)
        except subprocess.TimeoutExpired as exc:
            raise CniError(name, command, None, f"timed out after {self.timeout}s") from exc
        finally:
            procs.stop(proc, timeout=5.0)
        if proc.returncode != 0:
            raise self._plugin_error(name, command, proc.returncode, out, err)
        return json.loads(out) if out.strip() else None

    @staticmethod
    def _plugin_error(name: str, command: str, rc: int, out: bytes, err: bytes) -> CniError:
        """Turn a failed plugin's output into a CniError (spec: error JSON on stdout)."""
        try:
            payload = json.loads(out)
            return CniError(
                name,
                command,
                payload.get("code"),
                payload.get("msg", ""),
                payload.get("details", ""),
            )
        except (ValueError, AttributeError):
            text = (out + err).decode(errors="replace").strip()
            return CniError(name, command, None, f"exit {rc}: {text}")

    def _run_chain(
        self,
        config: dict[str, Any],
        env: dict[str, str],
        prev_result: dict[str, Any] | None,
    ) -> dict[str, Any] | None:
        """Execute a conflist: ADD forward, DEL in reverse, each plugin given ``prevResult``.

        For ADD, plugin N receives plugin N-1's result; for DEL every plugin receives the final
        ADD result (spec 1.0, "Deleting a network attachment") when the network's cniVersion
        has prevResult on DEL (0.4.0 and later; libcni sends none to an older one).
        """
        plugins = config["plugins"]
        if env["CNI_COMMAND"] == "DEL":
            plugins = list(reversed(plugins))
            if _version(config["cniVersion"]) < (0, 4, 0):
                prev_result = None
        result = prev_result
        for plugin in plugins:
            conf = copy.deepcopy(plugin)
            conf["cniVersion"] = config["cniVersion"]
            conf["name"] = config["name"]
            if result is not None:
                conf["prevResult"] = result
            output = self._exec_plugin(plugin, env, conf)
            if env["CNI_COMMAND"] == "ADD":
                result = output
        return result

    # ---------------------------------------------------------------- pods

    def add_pod(
        self,
        pod_netns_name: str,
        container_id: str,
        ifname: str = "eth0",
        ip_range: IpRange | None = None,
        ipv6_range: IpRange | None = None,
        *,
        config: dict[str, Any] | None = None,
        cni_args: Mapping[str, str] | None = None,
        cni_path: str | None = None,
        loopback: bool = False,
    ) -> PodAddress:
        """Attach existing namespace ``pod_netns_name`` to the bridge (CNI ADD); return addresses.

        ``ip_range`` / ``ipv6_range`` = (first, last) address a fake node hands out, for the
        fabric's own bridge-only :meth:`network_config`; or ``config``, a whole conflist to run
        instead (a node's, chained plugins included), whose first plugin is the bridge.
        ``cni_args`` become CNI_ARGS, ``cni_path`` (``os.pathsep``-separated directories)
        replaces the fabric's CNI_PATH for this pod. ``loopback``: first ADD go-cni's
        ``cni-loopback`` network on ``lo``, as containerd does for every pod sandbox. When this
        returns, the addresses are configured and usable (IPv6 not tentative).
        """
        if not _CONTAINER_ID_RE.match(container_id):
            raise ValueError(f"invalid CNI container id {container_id!r}")
        if not 0 < len(ifname.encode()) <= _IFNAME_MAX or ifname == LOOPBACK_IFNAME:
            raise ValueError(f"interface name {ifname!r} must be 1..{_IFNAME_MAX} bytes, not lo")
        if any(key[0] == pod_netns_name and key[2] == ifname for key in self._attachments):
            # Refuse before running anything: the DEL that cleans up a failed ADD removes the
            # interface by name, which would tear down the existing attachment.
            raise ValueError(f"{pod_netns_name} already has {ifname} on this fabric")
        if config is None:
            config = self.network_config(ip_range, ipv6_range)
        elif ip_range is not None or ipv6_range is not None:
            raise ValueError("give either a config or the ranges of the fabric's own config")
        config = copy.deepcopy(config)
        args = dict(cni_args or {})
        path = cni_path or self.cni_path
        format_cni_args(args)  # refused before anything runs
        netns.sysctl(pod_netns_name, _POD_SYSCTLS)
        key = (pod_netns_name, container_id, ifname)
        lo_key = (pod_netns_name, container_id, LOOPBACK_IFNAME)
        try:
            if loopback and lo_key not in self._attachments:
                self._attach(lo_key, copy.deepcopy(LOOPBACK_CONFIG), args, path)
            result = self._attach(key, config, args, path)
            if result is None:
                raise CniError(config["plugins"][0]["type"], "ADD", None,
                               "plugin printed no result")
            address = _parse_result(result, pod_netns_name, container_id, ifname)
            if address.ipv6 is not None:
                _check_ipv6_usable(pod_netns_name, ifname, address.ipv6)
        except Exception:
            # As a container runtime does: a failed ADD is followed by DEL, so no half-made
            # veth or lease is left behind. The ADD error is the one worth reporting.
            with contextlib.suppress(Exception):
                self.del_pod(pod_netns_name, container_id, ifname)
            raise
        return address

    def _attach(self, key: tuple[str, str, str], config: dict[str, Any],
                args: dict[str, str], path: str) -> dict[str, Any] | None:
        """ADD one network; recorded before running, so destroy() undoes even a half ADD."""
        pod_netns_name, container_id, ifname = key
        attachment = _Attachment(pod_netns_name, container_id, ifname, config, None, args, path)
        self._attachments[key] = attachment
        env = self._env("ADD", pod_netns_name, container_id, ifname, args, path)
        attachment.result = self._run_chain(config, env, None)
        return attachment.result

    def del_pod(self, pod_netns_name: str, container_id: str, ifname: str = "eth0") -> None:
        """Detach a pod (CNI DEL) and release its leases; no error if it is already gone.

        A pod's loopback network goes first, as go-cni's Remove does, then ``ifname``'s
        network, each with the config, arguments and CNI_PATH of its ADD.
        """
        first_error: Exception | None = None
        lo_key = (pod_netns_name, container_id, LOOPBACK_IFNAME)
        if ifname != LOOPBACK_IFNAME and lo_key in self._attachments:
            try:
                self._detach(lo_key)
            except Exception as exc:  # still release the pod network's lease
                first_error = exc
        self._detach((pod_netns_name, container_id, ifname))
        if first_error is not None:
            raise first_error

    def _detach(self, key: tuple[str, str, str]) -> None:
        pod_netns_name, container_id, ifname = key
        attachment = self._attachments.get(key)
        if attachment is not None:
            config, prev_result = attachment.config, attachment.result
            args, path = attachment.cni_args, attachment.cni_path
        elif ifname == LOOPBACK_IFNAME:
            config, prev_result, args, path = copy.deepcopy(LOOPBACK_CONFIG), None, {}, None
        else:
            config, prev_result, args, path = self.network_config(), None, {}, None
        env = self._env("DEL", pod_netns_name, container_id, ifname, args, path)
        self._run_chain(config, env, prev_result)
        self._attachments.pop(key, None)

    def pods(self) -> list[tuple[str, str, str]]:
        """Return (netns name, container id, ifname) of every pod this fabric attached."""
        return list(self._attachments)


def _check_ipv6_usable(pod_netns_name: str, ifname: str, address: str) -> None:
    """Fail unless ``address`` on ``ifname`` is configured and neither tentative nor failed."""
    out = netns.run_in(pod_netns_name, ["ip", "-j", "-6", "addr", "show", "dev", ifname])
    for link in json.loads(out or "[]"):
        for info in link.get("addr_info", []):
            if ipaddress.ip_address(info.get("local", "::")) != ipaddress.ip_address(address):
                continue
            bad = [flag for flag in ("tentative", "dadfailed") if info.get(flag)]
            if bad:
                raise CniError("bridge", "ADD", None, f"{address} on {ifname} is {'/'.join(bad)}")
            return
    raise CniError("bridge", "ADD", None, f"{address} not found on {ifname} in {pod_netns_name}")
