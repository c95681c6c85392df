"""plugin.toml: parsed with tomllib and validated before anything touches the kernel.

``SCHEMA`` is the single list of keys, types and defaults; the shipped plugin.toml documents the
same keys (a test keeps the two in step). Any unknown key, wrong type or bad path raises
``ConfigError`` naming the file and the dotted key; the CLI turns that into exit code 2. So does
every failure to read or parse the file, whatever it is (missing, a directory, a FIFO, not
UTF-8, nested deep enough to make tomllib recurse, ...): never a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmesh_plugin.datapath.build import Capacities
from kmesh_plugin.datapath.mounts import cgroup2_root, is_cgroup2_dir
from kmesh_plugin.errors import ConfigError, DatapathError
from kmesh_plugin.model import LocalityLabels, Scope
from kmesh_plugin.sources.decode import DecodeError, MissingFile, read_regular_file

# plugin.toml is a few KiB; 1 MiB bounds what a wrong --config (a log, a disk image) costs.
MAX_CONFIG_BYTES = 1 << 20
# The map capacities are compiled into the object as u32 max_entries (datapath/loader.py
# map_specs): frontends, vips, active and stats hold max_services entries, records
# max_services * 2 (two sets per group), slots max_endpoints. The bounds keep every one of
# them non-zero and far inside u32, and the memory sane: at the bound the per-CPU stats map
# costs 72 MiB per possible CPU, the frontend cache holds 4 Mi lines (128 MiB) and the slot
# hash preallocates 16 Mi entries (about 1 GiB).
# A cluster of 10,000 Services (Kubernetes' tested limit) needs well under both.
MAX_SERVICES = 1 << 20
MAX_ENDPOINTS = 1 << 24
# The environment variable the DaemonSet sets from the downward API (spec.nodeName).
NODE_NAME_ENV = "NODE_NAME"


@dataclass(frozen=True)
class Key:
    type: type | tuple[type, ...]
    default: Any
    check: Callable[[Any], str | None] | None = None  # returns a problem, or None
    item_type: type | None = None  # for lists


def _capacity(limit: int, why: str) -> Callable[[int], str | None]:
    def check(v: int) -> str | None:
        if v <= 0:
            return "must be > 0 (a map of zero entries cannot be created)"
        if v > limit:
            return f"must be at most {limit}: {why}"
        return None

    return check


def _absolute(v: str) -> str | None:
    if "\0" in v:
        return "must not contain a NUL character"
    return None if v == "" or os.path.isabs(v) else "must be an absolute path"


def _scopes(v: list[str]) -> str | None:
    names = [s.value for s in Scope]
    bad = [s for s in v if s not in names]
    if bad:
        return f"unknown scope(s) {bad}; scopes are {names}"
    if len(set(v)) != len(v):
        return "lists a scope twice"
    if not 1 <= len(v) <= 7:
        return "needs 1 to 7 scopes"
    return None


def _ip_address(v: str) -> str | None:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return "must be an IP address"
    return None


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "must be a port number (0 picks a free port)"


def _log_format(v: str) -> str | None:
    return None if v in ("keyvalue", "json") else "must be \"keyvalue\" or \"json\""


def _log_level(v: str) -> str | None:
    levels = ("debug", "info", "warning", "error")
    return None if v in levels else f"must be one of {', '.join(levels)}"


SOURCE_KINDS = ("manifests", "kubernetes")


def _source_kind(v: str) -> str | None:
    return None if v in SOURCE_KINDS else 'must be "manifests" or "kubernetes"'


ENROLMENT_MODES = ("all", "cni")


def _enrolment(v: str) -> str | None:
    return None if v in ENROLMENT_MODES else 'must be "all" or "cni"'


def _selector(v: str) -> str | None:
    from kmesh_plugin.model.selector import parse

    try:
        parse(v)
    except ValueError as e:
        return f"not a label selector: {e}"
    return None


def _file_name(v: str) -> str | None:
    return None if v == "" or ("/" not in v and v not in (".", "..")) else (
        "must be a file name in cni.conf_dir, not a path")


SCHEMA: dict[str, dict[str, Key]] = {
    "node": {
        "name": Key(str, ""),
    },
    "datapath": {
        "cgroup": Key(str, "", _absolute),
        "pin_dir": Key(str, "/sys/fs/bpf/kmesh-plugin", _absolute),
        "build_dir": Key(str, "/var/cache/kmesh-plugin", _absolute),
        "clang": Key(str, "clang"),
        "bpftool": Key(str, "bpftool"),
        "max_services": Key(int, 16384, _capacity(
            MAX_SERVICES, f"the records map holds 2 entries per group (u32 max_entries) and "
            f"the per-CPU stats map costs 72 bytes per group on every CPU; {MAX_SERVICES} "
            "groups is 72 MiB per CPU")),
        "max_endpoints": Key(int, 131072, _capacity(
            MAX_ENDPOINTS, "the slot hash map preallocates every entry (u32 max_entries); "
            f"{MAX_ENDPOINTS} slots is about 1 GiB of kernel memory")),
        "enrolment": Key(str, "all", _enrolment),
    },
    "cni": {
        "install": Key(bool, False),
        "conf_dir": Key(str, "/etc/cni/net.d", _absolute),
        "conflist": Key(str, "", _file_name),
        "bin_dir": Key(str, "/opt/cni/bin", _absolute),
        "state_dir": Key(str, "/run/kmesh-plugin/cni", _absolute),
        "log_file": Key(str, "", _absolute),
        "namespace_selector": Key(str, "", _selector),
    },
    "locality": {
        "network_label": Key(str, "topology.istio.io/network"),
        "region_label": Key(str, "topology.kubernetes.io/region"),
        "zone_label": Key(str, "topology.kubernetes.io/zone"),
        "subzone_labels": Key(
            list, ["topology.istio.io/subzone", "topology.kubernetes.io/subzone"], item_type=str
        ),
        "default_network": Key(str, ""),
    },
    "strategies": {
        "enabled": Key(list, ["local", "prefer_close"], item_type=str),
        "prefer_close_scopes": Key(
            list, ["NETWORK", "REGION", "ZONE", "SUBZONE"], _scopes, item_type=str
        ),
    },
    "source": {
        "kind": Key(str, "manifests", _source_kind),
        "path": Key(str, "/etc/kmesh-plugin/manifests", _absolute),
        "kubeconfig": Key(str, "", _absolute),
    },
    "agent": {
        "status_file": Key(str, "/run/kmesh-plugin/status.json", _absolute),
        "log_level": Key(str, "info", _log_level),
        "log_format": Key(str, "keyvalue", _log_format),
        "metrics": Key(bool, True),
        "metrics_address": Key(str, "127.0.0.1", _ip_address),
        "metrics_port": Key(int, 9464, _port),
    },
}


@dataclass(frozen=True)
class Config:
    path: Path
    node_name: str
    cgroup: Path
    pin_dir: Path
    build_dir: Path
    clang: str
    bpftool: str
    capacities: Capacities
    locality: LocalityLabels
    enabled: tuple[str, ...]
    prefer_close_scopes: tuple[Scope, ...]
    source_kind: str
    source_path: Path
    kubeconfig: Path | None  # None: in-cluster config, then $KUBECONFIG, then ~/.kube/config
    status_file: Path
    log_level: str
    log_format: str
    metrics: bool
    metrics_address: str
    metrics_port: int
    enrolment: str = "all"
    cni_conf_dir: Path = Path("/etc/cni/net.d")
    cni_conflist: str = ""
    cni_bin_dir: Path = Path("/opt/cni/bin")
    cni_state_dir: Path = Path("/run/kmesh-plugin/cni")
    cni_log_file: Path | None = None
    cni_install: bool = False
    cni_namespace_selector: str = ""


def load(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Config:
    """Read, check and resolve ``path``. ``overrides`` maps dotted keys to values."""
    path = Path(path)
    raw = _read(path)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(path, section, "must be a table ([section])")
        table[key] = value
    try:
        values = _validate(path, raw)
        return _resolve(path, values)
    except ConfigError:
        raise
    except Exception as e:
        # Not reached by design (every check returns a problem); a check that raises must
        # still end in exit code 2 with the file named, never a traceback.
        raise ConfigError(path, None, f"cannot be checked: {_one_line(e)}") from None


def _read(path: Path) -> dict[str, Any]:
    """The TOML table of ``path``; every failure, whatever raised it, a ConfigError."""
    try:
        data = read_regular_file(path, max_bytes=MAX_CONFIG_BYTES)
    except MissingFile:
        raise ConfigError(path, None, "file not found") from None
    except DecodeError as e:  # a directory, a FIFO, too large, unreadable
        raise ConfigError(path, None, e.problem) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"not UTF-8: {e.reason} at byte {e.start}") from None
    try:
        return tomllib.loads(text)
    except Exception as e:  # TOMLDecodeError, RecursionError, the int digit limit, ...
        raise ConfigError(path, None, f"invalid TOML: {_one_line(e)}") from None


def _one_line(e: BaseException, limit: int = 300) -> str:
    try:
        text = " ".join(str(e).split())
    except Exception:
        text = ""
    text = text or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _validate(path: Path, raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    values: dict[str, dict[str, Any]] = {}
    for section, table in raw.items():
        if section not in SCHEMA:
            raise ConfigError(path, _name(section),
                              f"unknown section (known: {', '.join(SCHEMA)})")
        if not isinstance(table, dict):
            raise ConfigError(path, section, "must be a table ([section])")
        for key in table:
            if key not in SCHEMA[section]:
                known = ", ".join(SCHEMA[section])
                raise ConfigError(path, f"{section}.{_name(key)}",
                                  f"unknown key (known: {known})")
    for section, keys in SCHEMA.items():
        values[section] = {}
        for key, spec in keys.items():
            dotted = f"{section}.{key}"
            value = raw.get(section, {}).get(key, spec.default)
            # bool is an int in Python: a TOML `true` is only valid where a bool is wanted.
            if isinstance(value, bool) != (spec.type is bool) or not isinstance(value, spec.type):
                raise ConfigError(
                    path, dotted, f"must be {_type_name(spec)}, got {_toml_repr(value)}"
                )
            if spec.item_type is not None and not all(
                isinstance(item, spec.item_type) for item in value
            ):
                raise ConfigError(path, dotted, f"must be {_type_name(spec)}")
            if spec.check is not None and (problem := spec.check(value)):
                raise ConfigError(path, dotted, problem)
            values[section][key] = value
    return values


def _resolve(path: Path, v: dict[str, dict[str, Any]]) -> Config:
    dp = v["datapath"]
    if dp["cgroup"]:
        cgroup = Path(dp["cgroup"])
        if not is_cgroup2_dir(cgroup):
            raise ConfigError(path, "datapath.cgroup", f"{cgroup} is not a cgroup v2 directory")
    else:
        try:
            cgroup = cgroup2_root()
        except DatapathError as e:
            raise ConfigError(path, "datapath.cgroup", f"not set and {e}") from None
    pin_dir = Path(dp["pin_dir"])
    if pin_dir.exists() and not pin_dir.is_dir():
        raise ConfigError(path, "datapath.pin_dir", f"{pin_dir} exists and is not a directory")
    src = v["source"]
    source_path = Path(src["path"])
    # Only the manifest source reads a directory; the Kubernetes source ignores the key.
    if src["kind"] == "manifests" and (not src["path"] or not source_path.is_dir()):
        raise ConfigError(path, "source.path",
                          f"{_name(src['path'])} is not a directory (source.kind is manifests)")
    kubeconfig = Path(src["kubeconfig"]) if src["kubeconfig"] else None
    if kubeconfig is not None and not kubeconfig.is_file():
        raise ConfigError(path, "source.kubeconfig", f"{_name(str(kubeconfig))} is not a file")
    loc = v["locality"]
    strategies = v["strategies"]
    if len(set(strategies["enabled"])) != len(strategies["enabled"]):
        raise ConfigError(path, "strategies.enabled", "lists a plugin twice")
    return Config(
        path=path,
        node_name=_node_name(v["node"]["name"]),
        cgroup=cgroup,
        pin_dir=pin_dir,
        build_dir=Path(dp["build_dir"]),
        clang=dp["clang"],
        bpftool=dp["bpftool"],
        capacities=Capacities(dp["max_services"], dp["max_endpoints"]),
        locality=LocalityLabels(
            network=loc["network_label"],
            region=loc["region_label"],
            zone=loc["zone_label"],
            subzone=tuple(loc["subzone_labels"]),
            default_network=loc["default_network"],
        ),
        enabled=tuple(strategies["enabled"]),
        prefer_close_scopes=tuple(Scope(s) for s in strategies["prefer_close_scopes"]),
        source_kind=src["kind"],
        source_path=source_path,
        kubeconfig=kubeconfig,
        status_file=Path(v["agent"]["status_file"]),
        log_level=v["agent"]["log_level"],
        log_format=v["agent"]["log_format"],
        metrics=v["agent"]["metrics"],
        metrics_address=v["agent"]["metrics_address"],
        metrics_port=v["agent"]["metrics_port"],
        enrolment=dp["enrolment"],
        cni_conf_dir=Path(v["cni"]["conf_dir"]),
        cni_conflist=v["cni"]["conflist"],
        cni_bin_dir=Path(v["cni"]["bin_dir"]),
        cni_state_dir=Path(v["cni"]["state_dir"]),
        cni_log_file=Path(v["cni"]["log_file"]) if v["cni"]["log_file"] else None,
        cni_install=v["cni"]["install"],
        cni_namespace_selector=v["cni"]["namespace_selector"],
    )


def _node_name(configured: str) -> str:
    """[node] name if set, else $NODE_NAME (the DaemonSet's downward API: spec.nodeName), else
    the host name (kubelet's default node name)."""
    return configured or os.environ.get(NODE_NAME_ENV, "") or socket.gethostname()


def _type_name(spec: Key) -> str:
    if spec.type is list:
        return f"a list of {spec.item_type.__name__ if spec.item_type else 'values'}"
    names = {str: "a string", int: "an integer", bool: "true or false"}
    return names.get(spec.type, str(spec.type))  # type: ignore[arg-type]


def _name(text: str, limit: int = 256) -> str:
    """A key or path from the file, bounded and on one line (a quoted TOML key may hold a
    newline) for a one-line message."""
    if not text.isprintable():
        text = repr(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _toml_repr(value: Any) -> str:
    """A value for a message, bounded: never the repr of a deep or huge one."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"int {value!r}" if -(10**18) < value < 10**18 else (
            f"int of {value.bit_length()} bits")
    if isinstance(value, str):
        return f"str {value[:64]!r}" + ("..." if len(value) > 64 else "")
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    if isinstance(value, dict):
        return "a table"
    return f"{type(value).__name__} {_name(repr(value))}"
