"""plugin.toml: the shipped file, the schema, and every way a bad file is rejected."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from kmesh_plugin import cli
from kmesh_plugin import config as config_mod
from kmesh_plugin.config import SCHEMA, load
from kmesh_plugin.datapath.build import Capacities
from kmesh_plugin.errors import ConfigError
from kmesh_plugin.model import LocalityLabels, Scope

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "plugin.toml"
FAKE_CGROUP2 = Path("/fake/cgroup2")


@pytest.fixture(autouse=True)
def cgroup2_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    """``datapath.cgroup = ""`` resolves to the cgroup v2 mount; make that host-independent."""
    monkeypatch.setattr(config_mod, "cgroup2_root", lambda: FAKE_CGROUP2)
    return FAKE_CGROUP2


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    path = tmp_path / "manifests"
    path.mkdir()
    return path


def write(tmp_path: Path, text: str, manifests: Path | None = None) -> Path:
    """A config file with ``text``; source.path points at ``manifests`` unless text sets it."""
    path = tmp_path / "plugin.toml"
    if manifests is not None and "[source]" not in text:
        text = f'{text}\n[source]\npath = "{manifests}"\n'
    path.write_text(text)
    return path


# -- the shipped file ---------------------------------------------------------------------


def test_shipped_file_loads(manifests: Path) -> None:
    cfg = load(SHIPPED, overrides={"source.path": str(manifests)})
    assert cfg.path == SHIPPED
    assert cfg.source_path == manifests
    assert cfg.source_kind == "manifests"
    assert cfg.cgroup == FAKE_CGROUP2
    assert cfg.pin_dir == Path("/sys/fs/bpf/kmesh-plugin")
    assert cfg.build_dir == Path("/var/cache/kmesh-plugin")
    assert (cfg.clang, cfg.bpftool) == ("clang", "bpftool")
    assert cfg.capacities == Capacities(16384, 131072)
    assert cfg.locality == LocalityLabels()
    assert cfg.enabled == ("local", "prefer_close")
    assert cfg.prefer_close_scopes == (Scope.NETWORK, Scope.REGION, Scope.ZONE, Scope.SUBZONE)
    assert cfg.status_file == Path("/run/kmesh-plugin/status.json")
    assert (cfg.log_level, cfg.log_format) == ("info", "keyvalue")
    assert cfg.kubeconfig is None
    assert cfg.node_name  # "" means $NODE_NAME or the host name, which is never empty


def test_shipped_file_documents_every_key_with_its_default() -> None:
    with open(SHIPPED, "rb") as f:
        shipped = tomllib.load(f)
    assert set(shipped) == set(SCHEMA)
    for section, keys in SCHEMA.items():
        assert set(shipped[section]) == set(keys), section
        for key, spec in keys.items():
            assert shipped[section][key] == spec.default, f"{section}.{key}"
            assert type(shipped[section][key]) is type(spec.default), f"{section}.{key}"


def test_schema_defaults_match_the_model_defaults() -> None:
    loc = SCHEMA["locality"]
    assert LocalityLabels(
        network=loc["network_label"].default,
        region=loc["region_label"].default,
        zone=loc["zone_label"].default,
        subzone=tuple(loc["subzone_labels"].default),
        default_network=loc["default_network"].default,
    ) == LocalityLabels()


def test_empty_file_is_all_defaults(tmp_path: Path, manifests: Path) -> None:
    empty = load(write(tmp_path, "", manifests))
    shipped = load(SHIPPED, overrides={"source.path": str(manifests)})
    assert {k: v for k, v in vars(empty).items() if k != "path"} == {
        k: v for k, v in vars(shipped).items() if k != "path"
    }


def test_values_are_read(tmp_path: Path, manifests: Path) -> None:
    cfg = load(write(tmp_path, """
[node]
name = "worker1"
[datapath]
max_services = 64
max_endpoints = 1024
[locality]
subzone_labels = ["topology.kubernetes.io/subzone"]
default_network = "net0"
[strategies]
enabled = ["prefer_close"]
prefer_close_scopes = ["NETWORK", "REGION", "ZONE"]
[agent]
log_level = "debug"
log_format = "json"
""", manifests))
    assert cfg.node_name == "worker1"
    assert cfg.capacities == Capacities(64, 1024)
    assert cfg.locality.subzone == ("topology.kubernetes.io/subzone",)
    assert cfg.locality.default_network == "net0"
    assert cfg.enabled == ("prefer_close",)
    assert cfg.prefer_close_scopes == (Scope.NETWORK, Scope.REGION, Scope.ZONE)
    assert (cfg.log_level, cfg.log_format) == ("debug", "json")


def test_capacity_bounds_are_accepted(tmp_path: Path, manifests: Path) -> None:
    text = "[datapath]\nmax_services = 1048576\nmax_endpoints = 16777216\n"
    assert load(write(tmp_path, text, manifests)).capacities == Capacities(1 << 20, 1 << 24)
    text = "[datapath]\nmax_services = 1\nmax_endpoints = 1\n"
    assert load(write(tmp_path, text, manifests)).capacities == Capacities(1, 1)


def test_capacity_bounds_keep_every_map_inside_u32() -> None:
    # What the limits promise, checked against the loader's own map specs.
    from kmesh_plugin.datapath.loader import map_specs

    biggest = Capacities(config_mod.MAX_SERVICES, config_mod.MAX_ENDPOINTS)
    for name, spec in map_specs(biggest).items():
        assert 0 < spec.max_entries < 2**32, name
    for name, spec in map_specs(Capacities(1, 1)).items():
        assert spec.max_entries > 0, name


# -- node name ------------------------------------------------------------------------------


def test_node_name_from_the_file_wins(
    tmp_path: Path, manifests: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NODE_NAME", "from-env")
    assert load(write(tmp_path, '[node]\nname = "worker1"\n', manifests)).node_name == "worker1"


def test_node_name_from_the_environment(
    tmp_path: Path, manifests: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NODE_NAME", "from-env")
    assert load(write(tmp_path, "", manifests)).node_name == "from-env"


def test_node_name_falls_back_to_the_host_name(
    tmp_path: Path, manifests: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    monkeypatch.setattr(config_mod.socket, "gethostname", lambda: "the-host")
    assert load(write(tmp_path, "", manifests)).node_name == "the-host"
    monkeypatch.setenv("NODE_NAME", "")  # set but empty: as unset
    assert load(write(tmp_path, "", manifests)).node_name == "the-host"


# -- the Kubernetes source's keys -----------------------------------------------------------


def test_kubernetes_source_needs_no_manifest_directory(tmp_path: Path) -> None:
    text = f'[source]\nkind = "kubernetes"\npath = "{tmp_path / "nowhere"}"\n'
    cfg = load(write(tmp_path, text))
    assert cfg.source_kind == "kubernetes"
    assert cfg.kubeconfig is None  # "": in-cluster, then $KUBECONFIG, then ~/.kube/config


def test_kubeconfig_is_read(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    text = f'[source]\nkind = "kubernetes"\nkubeconfig = "{kubeconfig}"\n'
    assert load(write(tmp_path, text)).kubeconfig == kubeconfig


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_kubeconfig_must_be_an_existing_file(tmp_path: Path, what: str) -> None:
    kubeconfig = tmp_path / "kube"
    if what == "directory":
        kubeconfig.mkdir()
    text = f'[source]\nkind = "kubernetes"\nkubeconfig = "{kubeconfig}"\n'
    error = _rejected(write(tmp_path, text), "source.kubeconfig")
    assert str(kubeconfig) in error.message


def test_manifest_source_still_needs_its_directory(tmp_path: Path) -> None:
    text = f'[source]\nkind = "manifests"\npath = "{tmp_path / "nowhere"}"\n'
    error = _rejected(write(tmp_path, text), "source.path")
    assert "is not a directory" in error.message


def test_overrides_win_over_the_file(tmp_path: Path, manifests: Path) -> None:
    path = write(tmp_path, '[node]\nname = "a"\n', manifests)
    assert load(path, overrides={"node.name": "b"}).node_name == "b"


# -- rejections ---------------------------------------------------------------------------


def _rejected(path: Path, key: str | None, *overrides: tuple[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path, overrides=dict(overrides) or None)
    error = info.value
    assert error.path == str(path)
    assert error.key == key
    assert str(path) in str(error)
    if key is not None:
        assert key in str(error)
    return error


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[nodes]\nname = 'x'\n", "nodes", "unknown section"),
        ("[node]\nhostname = 'x'\n", "node.hostname", "unknown key"),
        ("node = 'x'\n", "node", "must be a table"),
        ("[datapath]\nmax_services = true\n", "datapath.max_services", "got true"),
        ("[datapath]\nmax_endpoints = '1024'\n", "datapath.max_endpoints", "an integer"),
        ("[datapath]\nmax_endpoints = 1.5\n", "datapath.max_endpoints", "an integer"),
        ("[datapath]\nmax_services = 0\n", "datapath.max_services", "must be > 0"),
        ("[node]\nname = 5\n", "node.name", "a string"),
        ("[node]\nname = false\n", "node.name", "got false"),
        ("[strategies]\nenabled = 'local'\n", "strategies.enabled", "a list of str"),
        ("[strategies]\nenabled = ['local', 1]\n", "strategies.enabled", "a list of str"),
        ("[locality]\nsubzone_labels = [true]\n", "locality.subzone_labels", "a list of str"),
        ("[strategies]\nprefer_close_scopes = ['NETWORK', 'CITY']\n",
         "strategies.prefer_close_scopes", "unknown scope"),
        ("[strategies]\nprefer_close_scopes = ['network']\n",
         "strategies.prefer_close_scopes", "unknown scope"),
        ("[strategies]\nprefer_close_scopes = ['ZONE', 'ZONE']\n",
         "strategies.prefer_close_scopes", "twice"),
        ("[strategies]\nprefer_close_scopes = []\n",
         "strategies.prefer_close_scopes", "1 to 7"),
        ("[strategies]\nenabled = ['local', 'local']\n", "strategies.enabled", "twice"),
        ("[datapath]\npin_dir = 'bpf/kmesh'\n", "datapath.pin_dir", "absolute"),
        ("[datapath]\nbuild_dir = 'cache'\n", "datapath.build_dir", "absolute"),
        ("[datapath]\ncgroup = 'sys/fs/cgroup'\n", "datapath.cgroup", "absolute"),
        ("[agent]\nstatus_file = 'status.json'\n", "agent.status_file", "absolute"),
        ("[agent]\nlog_level = 'verbose'\n", "agent.log_level", "one of"),
        ("[agent]\nlog_format = 'text'\n", "agent.log_format", "keyvalue"),
        ("[source]\nkind = 'api'\npath = '/'\n", "source.kind", '"manifests" or "kubernetes"'),
        ("[source]\nkind = 'Kubernetes'\npath = '/'\n", "source.kind", "or \"kubernetes\""),
        ("[source]\npath = 'manifests'\n", "source.path", "absolute"),
        ("[source]\nkubeconfig = 'kube/config'\n", "source.kubeconfig", "absolute"),
        ("[source]\nkubeconfig = 5\n", "source.kubeconfig", "a string"),
        ("[datapath]\nmax_services = -1\n", "datapath.max_services", "must be > 0"),
        ("[datapath]\nmax_endpoints = 0\n", "datapath.max_endpoints", "must be > 0"),
        ("[datapath]\nmax_services = 1048577\n", "datapath.max_services", "at most 1048576"),
        ("[datapath]\nmax_endpoints = 16777217\n", "datapath.max_endpoints",
         "at most 16777216"),
        ("[datapath]\nmax_endpoints = 4294967296\n", "datapath.max_endpoints",
         "at most 16777216"),
        ("[datapath]\nenrolment = 'pods'\n", "datapath.enrolment", '"all" or "cni"'),
        ("[cni]\nnamespace_selector = 'env in (a)'\n", "cni.namespace_selector",
         "set-based"),
        ("[cni]\nnamespace_selector = '-x=1'\n", "cni.namespace_selector", "label key"),
        ("[cni]\nconflist = 'a/b.conflist'\n", "cni.conflist", "file name"),
        ("[cni]\nconf_dir = 'net.d'\n", "cni.conf_dir", "absolute"),
        ("[cni]\ninstall = 'yes'\n", "cni.install", "true or false"),
    ],
)
def test_bad_values(tmp_path: Path, manifests: Path, text: str, key: str, fragment: str) -> None:
    error = _rejected(write(tmp_path, text, manifests), key)
    assert fragment in error.message


def test_relative_source_path_override(tmp_path: Path, manifests: Path) -> None:
    _rejected(write(tmp_path, "", manifests), "source.path", ("source.path", "manifests"))


def test_missing_source_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    error = _rejected(write(tmp_path, f'[source]\npath = "{missing}"\n'), "source.path")
    assert str(missing) in error.message


def test_source_path_that_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "file.yaml"
    file.write_text("")
    _rejected(write(tmp_path, f'[source]\npath = "{file}"\n'), "source.path")


def test_cgroup_that_is_not_cgroup2(tmp_path: Path, manifests: Path) -> None:
    # tmp_path is a plain directory, not on a cgroup v2 mount.
    text = f'[datapath]\ncgroup = "{tmp_path}"\n'
    error = _rejected(write(tmp_path, text, manifests), "datapath.cgroup")
    assert "cgroup v2" in error.message


def test_cgroup_that_does_not_exist(tmp_path: Path, manifests: Path) -> None:
    text = f'[datapath]\ncgroup = "{tmp_path / "missing"}"\n'
    _rejected(write(tmp_path, text, manifests), "datapath.cgroup")


def test_no_cgroup2_mount(
    tmp_path: Path, manifests: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmesh_plugin.errors import DatapathError

    def no_mount() -> Path:
        raise DatapathError("no cgroup v2 filesystem is mounted")

    monkeypatch.setattr(config_mod, "cgroup2_root", no_mount)
    error = _rejected(write(tmp_path, "", manifests), "datapath.cgroup")
    assert "no cgroup v2" in error.message


def test_pin_dir_that_is_a_file(tmp_path: Path, manifests: Path) -> None:
    file = tmp_path / "pins"
    file.write_text("")
    _rejected(write(tmp_path, f'[datapath]\npin_dir = "{file}"\n', manifests), "datapath.pin_dir")


def test_invalid_toml(tmp_path: Path) -> None:
    error = _rejected(write(tmp_path, "[node\nname = "), None)
    assert "invalid TOML" in error.message


def test_missing_file(tmp_path: Path) -> None:
    error = _rejected(tmp_path / "absent.toml", None)
    assert "not found" in error.message


def test_unknown_override_key(tmp_path: Path, manifests: Path) -> None:
    _rejected(write(tmp_path, "", manifests), "source.dir", ("source.dir", "/"))


# -- the CLI ------------------------------------------------------------------------------


def test_cli_check_config_bad_file(
    tmp_path: Path, manifests: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[datapath]\nmax_services = true\n", manifests)
    assert cli.main(["check-config", "--config", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert str(path) in out.err
    assert "datapath.max_services" in out.err


def test_cli_check_config_unknown_plugin(
    tmp_path: Path, manifests: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[strategies]\nenabled = ['local', 'nope']\n", manifests)
    assert cli.main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert "strategies.enabled" in err
    assert "'nope'" in err


def test_cli_check_config_good_file(
    tmp_path: Path, manifests: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[node]\nname = "worker1"\n', manifests)
    assert cli.main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: ok" in out
    assert "local, prefer_close" in out


def test_cli_executable_exits_2(tmp_path: Path, manifests: Path) -> None:
    path = write(tmp_path, "[node]\nhostname = 'x'\n", manifests)
    exe = Path(sys.executable).parent / "kmesh-plugin"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "kmesh_plugin.cli"]
    proc = subprocess.run(
        [*argv, "check-config", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr
    assert "node.hostname" in proc.stderr
