"""The lab's cluster network: the real CNI ``bridge`` + ``host-local`` plugins, run by hand.

A :class:`Fabric` owns one network namespace (the "fabric") that holds the Linux bridge and the
host ends of every pod's veth pair, so nothing of the lab is ever created in the host's own
namespace. Each pod is a named network namespace; :meth:`Fabric.add_pod` executes the CNI chain
for it exactly as a container runtime would (CNI spec 1.0.0: environment variables, config on
stdin, result or error JSON on stdout) and returns the addresses host-local assigned.

The IPAM config deliberately has no routes: a pod gets only its connected subnet, so a connect
that the eBPF datapath did not translate fails with ENETUNREACH inside the pod instead of
leaving it (see MACHINE-NOTES, network rules).
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from kmesh_lab import netns, procs

__all__ = ["CNI_VERSION", "DEFAULT_CNI_PATH", "CniError", "Fabric", "PodAddress"]

CNI_VERSION = "1.0.0"
DEFAULT_CNI_PATH = "/usr/lib/cni"
DEFAULT_SUBNET = "198.18.0.0/16"

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
    """What DEL needs to undo one ADD: the exact network config and the ADD result."""

    pod_netns: str
    container_id: str
    ifname: str
    config: dict[str, Any]
    result: dict[str, Any] | None


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
        for attachment in list(self._attachments.values()):
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

    def _env(self, command: str, pod_netns: str, container_id: str, ifname: str) -> dict[str, str]:
        netns_path = netns.path(pod_netns)
        if command == "DEL" and not os.path.exists(netns_path):
            netns_path = ""  # CNI: DEL without a namespace only releases the IPAM lease
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns_path,
            "CNI_IFNAME": ifname,
            "CNI_PATH": self.cni_path,
        }

    def _exec_plugin(
        self, plugin: dict[str, Any], env: dict[str, str], stdin_conf: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Run one plugin binary in the fabric namespace; return its result JSON (None if empty)."""
        name, command = plugin["type"], env["CNI_COMMAND"]
        proc = procs.spawn(
            [os.path.join(self.cni_path, name)],
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
        ADD result (spec 1.0, "Deleting a network attachment").
        """
        plugins = config["plugins"]
        if env["CNI_COMMAND"] == "DEL":
            plugins = list(reversed(plugins))
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
    ) -> PodAddress:
        """Attach existing namespace ``pod_netns_name`` to the bridge (CNI ADD); return addresses.

        ``ip_range`` / ``ipv6_range`` = (first, last) address a fake node hands out. When this
        returns, the addresses are configured and usable (IPv6 not tentative).
        """
        if not _CONTAINER_ID_RE.match(container_id):
            raise ValueError(f"invalid CNI container id {container_id!r}")
        if not 0 < len(ifname.encode()) <= _IFNAME_MAX:
            raise ValueError(f"interface name {ifname!r} must be 1..{_IFNAME_MAX} bytes")
        if any(key[0] == pod_netns_name and key[2] == ifname for key in self._attachments):
            # Refuse before running anything: the DEL that cleans up a failed ADD removes the
            # interface by name, which would tear down the existing attachment.
            raise ValueError(f"{pod_netns_name} already has {ifname} on this fabric")
        config = self.network_config(ip_range, ipv6_range)
        netns.sysctl(pod_netns_name, _POD_SYSCTLS)
        env = self._env("ADD", pod_netns_name, container_id, ifname)
        key = (pod_netns_name, container_id, ifname)
        # Recorded before running, so destroy() releases a lease even if ADD fails half way.
        self._attachments[key] = _Attachment(pod_netns_name, container_id, ifname, config, None)
        try:
            result = self._run_chain(config, env, None)
            if result is None:
                raise CniError("bridge", "ADD", None, "plugin printed no result")
            self._attachments[key].result = result
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

    def del_pod(self, pod_netns_name: str, container_id: str, ifname: str = "eth0") -> None:
        """Detach a pod (CNI DEL) and release its leases; no error if it is already gone."""
        key = (pod_netns_name, container_id, ifname)
        attachment = self._attachments.get(key)
        config = attachment.config if attachment else self.network_config()
        prev_result = attachment.result if attachment else None
        env = self._env("DEL", pod_netns_name, container_id, ifname)
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
