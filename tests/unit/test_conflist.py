"""kmesh_plugin.cni.conflist: our entry goes in and out of the node's conflist byte-exactly,
atomically, keeping the file's mode and owner, and a file we cannot edit safely is left as it
was with an error that names it."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmesh_plugin import cli
from kmesh_plugin import config as config_mod
from kmesh_plugin.cni import conflist
from kmesh_plugin.cni.conflist import (
    PLUGIN_TYPE,
    RUNTIME_EXTENSIONS,
    TMP_SUFFIX,
    CniInstallError,
    ConflistError,
    add_entry,
    ensure_installed,
    install,
    remove_entry,
    remove_installed,
    select,
)
from kmesh_plugin.config import Config
from kmesh_plugin.errors import ConfigError

OURS = {"type": PLUGIN_TYPE, "pinDir": "/sys/fs/bpf/kmesh-plugin",
        "stateDir": "/run/kmesh-plugin/cni"}
OTHER = {**OURS, "pinDir": "/sys/fs/bpf/elsewhere", "logFile": "/var/log/kmesh-cni.log"}


@pytest.fixture(autouse=True)
def _host_independent(monkeypatch: pytest.MonkeyPatch) -> None:
    """``datapath.cgroup = ""`` resolves to the cgroup v2 mount; make that host-independent.
    ensure_installed's memo is per process: start every test without one."""
    monkeypatch.setattr(config_mod, "cgroup2_root", lambda: Path("/fake/cgroup2"))
    conflist._memo.clear()


def make_config(tmp_path: Path, **cni: str) -> Config:
    """A plugin.toml in tmp_path with every path of ours under it."""
    for d in ("manifests", "net.d"):
        (tmp_path / d).mkdir(exist_ok=True)
    keys = {"conf_dir": str(tmp_path / "net.d"), "bin_dir": str(tmp_path / "bin"),
            "state_dir": str(tmp_path / "state"), **cni}
    lines = ["[cni]", *(f"{k} = {json.dumps(v)}" for k, v in keys.items()),
             "[datapath]", f'pin_dir = "{tmp_path / "pins"}"',
             "[source]", f'path = "{tmp_path / "manifests"}"']
    path = tmp_path / "plugin.toml"
    path.write_text("\n".join(lines) + "\n")
    return config_mod.load(path)


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path)


def file_state(path: Path) -> tuple[bytes, int, int, int]:
    st_ = os.stat(path)
    return path.read_bytes(), st_.st_ino, st_.st_mtime_ns, stat.S_IMODE(st_.st_mode)


# -- real-world shaped conflists -------------------------------------------------------------

PODMAN = """\
{
  "cniVersion": "0.4.0",
  "name": "podman",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni-podman0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "routes": [{ "dst": "0.0.0.0/0" }],
        "ranges": [
          [
            {
              "subnet": "10.88.0.0/16",
              "gateway": "10.88.0.1"
            }
          ]
        ]
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    },
    {
      "type": "firewall"
    },
    {
      "type": "tuning"
    }
  ]
}
"""

CALICO = """{
    "name": "k8s-pod-network",
    "cniVersion": "0.3.1",
    "plugins": [
        {
            "type": "calico",
            "log_level": "info",
            "datastore_type": "kubernetes",
            "nodename": "node-1",
            "mtu": 1440,
            "ipam": {"type": "calico-ipam", "assign_ipv4": "true"},
            "policy": {"type": "k8s"},
            "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}
        },
        {
            "type": "portmap",
            "snat": true,
            "capabilities": {"portMappings": true}
        },
        {
            "type": "bandwidth",
            "capabilities": {"bandwidth": true}
        }
    ]
}"""

FLANNEL_ONE_LINE = ('{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel",'
                    '"delegate":{"hairpinMode":true,"isDefaultGateway":true}},'
                    '{"type":"portmap","capabilities":{"portMappings":true}}]}')

SPACED_ONE_LINE = '{"cniVersion": "1.0.0", "name": "one", "plugins": [{"type": "bridge"}]}\n'

TABS_CRLF = ('{\r\n\t"cniVersion": "1.0.0",\r\n\t"name": "tabs",\r\n\t"plugins": [\r\n'
             '\t\t{\r\n\t\t\t"type": "bridge",\r\n\t\t\t"ipam": {\r\n\t\t\t\t"type": '
             '"host-local"\r\n\t\t\t}\r\n\t\t}\r\n\t]\r\n}\r\n')

TABS = TABS_CRLF.replace("\r\n", "\n")

UNICODE = """{
  "cniVersion": "1.0.0",
  "name": "réseau-ü-网络-🚀",
  "plugins": [
    {"type": "bridge", "bridge": "br-ü", "note": "naïve \\u00e9 \\ud83d\\ude80"}
  ]
}"""

EMPTY_INLINE = '{"cniVersion": "1.0.0", "name": "empty", "plugins": []}'
EMPTY_LINES = '{\n  "cniVersion": "1.0.0",\n  "name": "empty",\n  "plugins": [\n  ]\n}\n'

PLUGINS_NOT_LAST = """{
  "plugins": [
    {
      "type": "ptp",
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.1.0.0/16"}], []]}
    }
  ],
  "cniVersion": "1.0.0",
  "name": "first",
  "disableCheck": true,
  "cniVersions": ["0.4.0", "1.0.0"]
}
"""

TRICKY_STRINGS = r"""{
  "name": "brackets ] and [ and { } in \"quotes\" \\",
  "cniVersion": "1.0.0",
  "comment]": "a key with ] in it, and \"plugins\": [ inside a string",
  "plugins": [
    {
      "type": "bridge",
      "args": ["]", "[", "\"]\"", "\\", "}", "plugins"],
      "plugins": [{"type": "not-top-level"}],
      "nested": {"a": [{"b": [[], {}, [{}]]}], "c": "\u005d"}
    },
    {
      "type": "tuning",
      "sysctl": {"net.core.somaxconn": "500"}
    }
  ]
}"""

SPACE_BEFORE_COLON = '{ "name" : "x" , "cniVersion" : "1.0.0" , "plugins" : [ { "type" : "a" } ] }'

MULTILINE_SAME_LINE = """{
  "name": "k",
  "plugins": [{
    "type": "a"
  }, {
    "type": "b"
  }]
}"""

FOUR_SPACE_NO_NEWLINE = json.dumps(
    {"cniVersion": "1.0.0", "name": "four", "plugins": [{"type": "bridge"}, {"type": "a"}]},
    indent=4)

CONFLISTS = {
    "podman": PODMAN, "calico-4-space": CALICO, "flannel-one-line": FLANNEL_ONE_LINE,
    "spaced-one-line": SPACED_ONE_LINE, "tabs": TABS, "tabs-crlf": TABS_CRLF,
    "unicode": UNICODE, "empty-inline": EMPTY_INLINE, "empty-lines": EMPTY_LINES,
    "plugins-not-last": PLUGINS_NOT_LAST, "tricky-strings": TRICKY_STRINGS,
    "space-before-colon": SPACE_BEFORE_COLON, "braces-on-one-line": MULTILINE_SAME_LINE,
    "4-space-no-trailing-newline": FOUR_SPACE_NO_NEWLINE,
}


def assert_inserted_only(before: str, after: str) -> str:
    """``after`` is ``before`` with one run of text inserted; returns that run."""
    p = 0
    while p < len(before) and before[p] == after[p]:
        p += 1
    inserted = after[p:p + len(after) - len(before)]
    assert after == before[:p] + inserted + before[p:]
    return inserted


@pytest.mark.parametrize("name", sorted(CONFLISTS))
def test_add_then_remove_is_byte_exact(name: str) -> None:
    text = CONFLISTS[name]
    original = json.loads(text)
    new, message = add_entry(text, OURS)
    assert new is not None and message.startswith(f"added {PLUGIN_TYPE} as plugin")
    after = json.loads(new)
    assert after["plugins"] == [*original["plugins"], OURS]
    assert {k: v for k, v in after.items() if k != "plugins"} == {
        k: v for k, v in original.items() if k != "plugins"}
    assert list(after) == list(original)  # the key order too
    assert_inserted_only(text, new)
    assert add_entry(new, OURS)[0] is None  # idempotent
    assert remove_entry(new)[0] == text
    updated, message = add_entry(new, OTHER)
    assert updated is not None and "pinDir, logFile changed" in message
    assert json.loads(updated)["plugins"] == [*original["plugins"], OTHER]
    assert remove_entry(updated)[0] == text


@pytest.mark.parametrize("name", sorted(CONFLISTS))
def test_the_entry_takes_the_style_of_its_neighbours(name: str) -> None:
    text = CONFLISTS[name]
    inserted = assert_inserted_only(text, add_entry(text, OURS)[0] or "")
    if "\r\n" in text:
        assert "\n" not in inserted.replace("\r\n", "")
    if name in ("tabs", "tabs-crlf"):
        assert '\n\t\t\t"pinDir"' in inserted and "  " not in inserted
    if name == "podman":
        assert inserted == (',\n    {\n      "type": "kmesh-cni",\n      "pinDir": '
                            '"/sys/fs/bpf/kmesh-plugin",\n      "stateDir": '
                            '"/run/kmesh-plugin/cni"\n    }')
    if name == "calico-4-space":
        assert '\n            "stateDir"' in inserted
    if name == "flannel-one-line":
        assert inserted == (',{"type":"kmesh-cni","pinDir":"/sys/fs/bpf/kmesh-plugin",'
                            '"stateDir":"/run/kmesh-plugin/cni"}')
    if name == "spaced-one-line":
        assert inserted.startswith(', {"type": "kmesh-cni", "pinDir": ')


def test_an_entry_not_at_the_end_is_cut_with_its_separator() -> None:
    text = PODMAN
    with_ours, _ = add_entry(text, OURS)
    assert with_ours is not None
    # Another chained plugin installed after us appends behind our entry.
    later = with_ours.replace('"/run/kmesh-plugin/cni"\n    }',
                              '"/run/kmesh-plugin/cni"\n    },\n    {\n      "type": "b"\n    }')
    expected = text.replace('"type": "tuning"\n    }',
                            '"type": "tuning"\n    },\n    {\n      "type": "b"\n    }')
    assert remove_entry(later)[0] == expected
    # At the front: the entry, its comma and the whitespace up to the next entry go.
    front = '{"plugins": [{"type": "kmesh-cni"}, {"type": "a"}], "name": "x"}'
    assert remove_entry(front)[0] == '{"plugins": [{"type": "a"}], "name": "x"}'
    # And a setting changed in place leaves every other byte as it was.
    updated, _ = add_entry(later, OTHER)
    assert updated is not None
    assert updated.replace(json.dumps(OTHER, indent=2).replace("\n", "\n    "), "X") == \
        later.replace(json.dumps(OURS, indent=2).replace("\n", "\n    "), "X")


def test_duplicates_of_our_entry_are_reduced_to_one_and_all_removed() -> None:
    text = '{"plugins": [{"type": "a"}, {"type": "kmesh-cni"}, {"type": "kmesh-cni"}]}'
    new, message = add_entry(text, OURS)
    assert new is not None and "duplicate" in message and "updated" in message
    assert json.loads(new)["plugins"] == [{"type": "a"}, OURS]
    assert remove_entry(text)[0] == '{"plugins": [{"type": "a"}]}'


def test_only_our_settings_count_as_a_difference() -> None:
    text = json.dumps({"plugins": [{"type": "a"}, {**OURS, "name": "injected"}]})
    assert add_entry(text, OURS)[0] is None


# -- the property: any conflist, however formatted --------------------------------------------

_leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**64)
         | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10))
_value = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=15)
_plugin = st.builds(
    lambda t, extra: {"type": t, **extra},
    st.text(min_size=1, max_size=12).filter(lambda t: t != PLUGIN_TYPE),
    st.dictionaries(st.text(max_size=8).filter(lambda k: k != "type"), _value, max_size=4))
_layout = st.one_of(
    st.tuples(st.none(), st.sampled_from([(",", ":"), (", ", ": "), (" , ", " : ")])),
    st.tuples(st.sampled_from([0, 1, 2, 3, 4, "\t", " \t"]),
              st.sampled_from([(",", ": "), (",", ":"), (" ,", " : ")])),
)


@st.composite
def conflists(draw: st.DrawFn) -> str:
    top = {"cniVersion": draw(st.sampled_from(["0.3.1", "0.4.0", "1.0.0", "1.1.0"])),
           "name": draw(st.text(max_size=12))}
    top.update(draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k != "plugins"),
                                    _value, max_size=3)))
    keys = list(top)
    at = draw(st.integers(0, len(keys)))
    plugins = draw(st.lists(_plugin, max_size=5))
    ordered = dict([(k, top[k]) for k in keys[:at]] + [("plugins", plugins)]
                   + [(k, top[k]) for k in keys[at:]])
    indent, separators = draw(_layout)
    text = json.dumps(ordered, indent=indent, separators=separators,
                      ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")  # json.dumps escapes newlines in strings
    return draw(st.sampled_from(["", " ", "\n"])) + text + draw(
        st.sampled_from(["", "\n", "\r\n", "\n\n", "  "]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conflists())
def test_property_install_uninstall_round_trip(text: str) -> None:
    original = json.loads(text)
    new, _ = add_entry(text, OURS)
    assert new is not None
    after = json.loads(new)
    assert after["plugins"] == [*original["plugins"], OURS]
    assert {k: v for k, v in after.items() if k != "plugins"} == {
        k: v for k, v in original.items() if k != "plugins"}
    assert_inserted_only(text, new)
    assert add_entry(new, OURS)[0] is None  # install twice == install once
    assert remove_entry(new)[0] == text
    updated, _ = add_entry(new, OTHER)
    assert updated is not None and json.loads(updated)["plugins"][-1] == OTHER
    assert remove_entry(updated)[0] == text
    assert remove_entry(text)[0] is None


# -- files: install, uninstall, idempotence, mode, owner --------------------------------------


@pytest.mark.parametrize("name", sorted(CONFLISTS))
def test_install_then_uninstall_gives_back_the_file(cfg: Config, name: str) -> None:
    path = cfg.cni_conf_dir / "10-net.conflist"
    path.write_bytes(CONFLISTS[name].encode())
    before = file_state(path)
    report = install(cfg)
    assert report.selection.path == path
    assert json.loads(path.read_bytes())["plugins"][-1] == conflist.entry(cfg)
    installed = file_state(path)
    assert installed[1] != before[1]  # replaced by rename: a new inode
    assert install(cfg).changes == []  # idempotent: not even rewritten
    assert file_state(path) == installed
    done = remove_installed(cfg)
    assert done == [f"{path}: removed kmesh-cni (plugin "
                    f"{len(json.loads(CONFLISTS[name])['plugins']) + 1} of "
                    f"{len(json.loads(CONFLISTS[name])['plugins']) + 1})",
                    f"removed {cfg.cni_bin_dir / 'kmesh-cni'}"]
    assert path.read_bytes() == before[0]
    assert remove_installed(cfg) == []  # idempotent
    assert sorted(p.name for p in cfg.cni_conf_dir.iterdir()) == ["10-net.conflist"]


def test_the_entry_follows_the_config(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, log_file="/var/log/kmesh-cni.log")
    (cfg.cni_conf_dir / "10-net.conflist").write_text(PODMAN)
    install(cfg)
    plugins = json.loads((cfg.cni_conf_dir / "10-net.conflist").read_text())["plugins"]
    assert plugins[-1] == {"type": "kmesh-cni", "pinDir": str(tmp_path / "pins"),
                           "stateDir": str(tmp_path / "state"),
                           "logFile": "/var/log/kmesh-cni.log"}
    # Settings that change are updated in place, and uninstall still restores the original.
    moved = dataclasses.replace(cfg, cni_state_dir=tmp_path / "other", cni_log_file=None)
    report = install(moved)
    assert report.changes == [f"{cfg.cni_conf_dir / '10-net.conflist'}: updated kmesh-cni "
                              "(plugin 5 of 5): stateDir, logFile changed"]
    assert json.loads((cfg.cni_conf_dir / "10-net.conflist").read_text())["plugins"][-1] == {
        "type": "kmesh-cni", "pinDir": str(tmp_path / "pins"), "stateDir": str(tmp_path / "other")}
    remove_installed(moved)
    assert (cfg.cni_conf_dir / "10-net.conflist").read_text() == PODMAN


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640, 0o444])
def test_the_file_mode_is_kept(cfg: Config, mode: int) -> None:
    path = cfg.cni_conf_dir / "10-net.conflist"
    path.write_text(CALICO)
    path.chmod(mode)
    install(cfg)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    remove_installed(cfg)
    assert stat.S_IMODE(path.stat().st_mode) == mode and path.read_text() == CALICO


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_the_file_owner_is_kept(cfg: Config) -> None:
    path = cfg.cni_conf_dir / "10-net.conflist"
    path.write_text(CALICO)
    os.chown(path, 1234, 5678)
    install(cfg)
    assert (path.stat().st_uid, path.stat().st_gid) == (1234, 5678)
    remove_installed(cfg)
    assert (path.stat().st_uid, path.stat().st_gid) == (1234, 5678)


def test_the_launcher(cfg: Config) -> None:
    (cfg.cni_conf_dir / "10-net.conflist").write_text(PODMAN)
    report = install(cfg)
    launcher = cfg.cni_bin_dir / "kmesh-cni"
    assert f"{launcher}: installed (runs kmesh_plugin.cni.main under {sys.executable})" in (
        report.lines)
    text = launcher.read_text()
    assert text.startswith(f"#!{sys.executable} -IS\n")
    assert "from kmesh_plugin.cni.main import main\n" in text and "raise SystemExit(main())" in text
    assert stat.S_IMODE(launcher.stat().st_mode) == 0o755
    # The interpreter it names finds this installation without site (-IS), through the
    # directories the launcher names.
    probe = text.replace(
        "from kmesh_plugin.cni.main import main\n",
        "import kmesh_plugin.cni.conflist as m\nmain = lambda: print(m.__file__)\n")
    proc = subprocess.run([sys.executable, "-IS", "-c", probe], capture_output=True, text=True,
                          env={}, timeout=60, check=False, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == conflist.__file__


def test_the_launcher_runs_kmesh_cni(cfg: Config) -> None:
    pytest.importorskip("kmesh_plugin.cni.main")
    (cfg.cni_conf_dir / "10-net.conflist").write_text(PODMAN)
    install(cfg)
    # What a runtime does: exec it from the bin dir with a bare environment.
    proc = subprocess.run([str(cfg.cni_bin_dir / "kmesh-cni")], input="{}", capture_output=True,
                          text=True, env={"CNI_COMMAND": "VERSION"}, timeout=60, check=False,
                          cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert "1.0.0" in json.loads(proc.stdout)["supportedVersions"]


def test_a_launcher_that_is_not_ours_is_left(cfg: Config) -> None:
    cfg.cni_bin_dir.mkdir()
    (cfg.cni_bin_dir / "kmesh-cni").write_text("#!/bin/sh\necho someone else's\n")
    assert remove_installed(cfg) == []
    assert (cfg.cni_bin_dir / "kmesh-cni").exists()


# -- atomicity --------------------------------------------------------------------------------


def test_a_failing_write_leaves_the_original(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    path = cfg.cni_conf_dir / "10-net.conflist"
    path.write_text(PODMAN)
    before = file_state(path)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(TMP_SUFFIX) and "conflist" in \
                os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CniInstallError) as exc:
        install(cfg)
    assert str(path) in str(exc.value) and "No space left on device" in str(exc.value)
    assert file_state(path) == before
    assert sorted(p.name for p in cfg.cni_conf_dir.iterdir()) == ["10-net.conflist"]


def test_the_temporary_file_is_never_a_config_a_runtime_loads(
        cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not TMP_SUFFIX.endswith(RUNTIME_EXTENSIONS)
    path = cfg.cni_conf_dir / "10-net.conflist"
    path.write_text(PODMAN)
    seen: list[list[str]] = []
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        # Just before the rename: the old file is whole, the new one is complete on disk.
        names = sorted(os.listdir(cfg.cni_conf_dir))
        seen.append(names)
        if Path(dst) == path:
            assert path.read_text() == PODMAN
            assert select(cfg).path == path
            assert json.loads(Path(src).read_text())["plugins"][-1]["type"] == PLUGIN_TYPE
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    install(cfg)
    assert any(len(names) == 2 for names in seen)


def test_a_reader_never_sees_a_partial_file(cfg: Config) -> None:
    path = cfg.cni_conf_dir / "10-net.conflist"
    path.write_text(CALICO)
    with_ours = add_entry(CALICO, conflist.entry(cfg))[0]
    stop = threading.Event()
    seen: set[str] = set()
    bad: list[str] = []

    def read() -> None:
        while not stop.is_set():
            text = path.read_text()
            if text not in (CALICO, with_ours):
                bad.append(text)
            seen.add(text)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(100):
            install(cfg)
            remove_installed(cfg)
    finally:
        stop.set()
        reader.join()
    assert not bad
    assert path.read_text() == CALICO


def test_a_file_replaced_during_the_edit_is_read_again(
        cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    path = cfg.cni_conf_dir / "10-net.conflist"
    path.write_text(PODMAN)
    real_read = conflist._read
    calls = []

    def read(p: Path, conf_dir: Path) -> Any:
        f = real_read(p, conf_dir)
        calls.append(p)
        if len(calls) == 2:  # install's check reads once, then the edit: another writer wins
            tmp = path.with_name("new")
            tmp.write_text(CALICO)
            os.replace(tmp, path)
        return f

    monkeypatch.setattr(conflist, "_read", read)
    install(cfg)
    assert len(calls) == 3
    assert json.loads(path.read_text())["plugins"][-1]["type"] == PLUGIN_TYPE
    assert remove_entry(path.read_text())[0] == CALICO  # their file, plus our entry


# -- invalid conflists are left untouched -----------------------------------------------------

INVALID = {
    "bad-json": (b'{"plugins": [{"type": "a"},]}', "invalid JSON"),
    "truncated": (PODMAN[:100].encode(), "invalid JSON"),
    "empty": (b"", "invalid JSON"),
    "an-array": (b'[{"type": "a"}]', "is not a JSON object but an array"),
    "a-string": (b'"plugins"', "is not a JSON object but a string"),
    "no-plugins": (b'{"cniVersion": "1.0.0", "name": "n", "type": "bridge"}',
                   'has no "plugins" array'),
    "plugins-object": (b'{"plugins": {"type": "a"}}', '"plugins" is an object, not an array'),
    "plugins-null": (b'{"plugins": null}', '"plugins" is null, not an array'),
    "plugins-string": (b'{"plugins": "[]"}', '"plugins" is a string, not an array'),
    "two-plugins-keys": (b'{"plugins": [], "plugins": [{"type": "a"}]}',
                         '2 top-level "plugins" keys'),
    "not-utf8": (b'{"name": "\xff\xfe", "plugins": []}', "not UTF-8"),
    "utf8-bom": (b'\xef\xbb\xbf{"plugins": []}', "invalid JSON"),
    "too-deep": (b'{"plugins": [' + b"[" * 100000 + b"]" * 100000 + b"]}", "invalid JSON"),
    "too-large": (b'{"plugins": [], "x": "' + b"a" * (1 << 20) + b'"}', "limit"),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_an_invalid_conflist_is_left_untouched(cfg: Config, name: str) -> None:
    data, problem = INVALID[name]
    path = cfg.cni_conf_dir / "10-net.conflist"
    path.write_bytes(data)
    before = file_state(path)
    with pytest.raises(ConflistError) as exc:
        install(cfg)
    assert str(exc.value).startswith(f"{path}: ") and problem in str(exc.value), str(exc.value)
    assert "not changed" in str(exc.value) and "\n" not in str(exc.value)
    assert isinstance(exc.value, ConfigError)  # the CLI's exit 2
    assert file_state(path) == before
    assert not cfg.cni_bin_dir.exists()  # nothing written, not even the launcher
    # ensure_installed reports it once, never raises.
    line = ensure_installed(cfg)
    assert line is not None and line.startswith("kmesh-cni not ensured: ") and str(path) in line
    assert ensure_installed(cfg) is None
    assert file_state(path) == before


def test_a_directory_named_as_the_conflist_is_refused(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, conflist="10-net.conflist")
    (cfg.cni_conf_dir / "10-net.conflist").mkdir()
    with pytest.raises(ConflistError, match=r"10-net.conflist: is a directory"):
        install(cfg)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, conflist="10-net.conflist")
    os.mkfifo(cfg.cni_conf_dir / "10-net.conflist")
    with pytest.raises(ConflistError, match="not a regular file"):
        install(cfg)


def test_a_symlink_out_of_the_conf_dir_is_refused(cfg: Config, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.conflist"
    outside.write_text(PODMAN)
    before = file_state(outside)
    (cfg.cni_conf_dir / "10-net.conflist").symlink_to(outside)
    with pytest.raises(ConflistError, match=f"symbolic link to {outside}, outside"):
        install(cfg)
    assert file_state(outside) == before
    assert remove_installed(cfg) == []  # nothing of ours in it: not an error for uninstall


def test_a_dangling_symlink_is_refused(cfg: Config, tmp_path: Path) -> None:
    (cfg.cni_conf_dir / "10-net.conflist").symlink_to(cfg.cni_conf_dir / "gone")
    with pytest.raises(ConflistError, match="file not found"):
        install(cfg)


def test_a_symlink_into_the_conf_dir_is_edited_where_it_points(cfg: Config) -> None:
    # A ConfigMap volume: 10-net.conflist -> ..data/10-net.conflist.
    data = cfg.cni_conf_dir / "..data"
    data.mkdir()
    (data / "10-net.conflist").write_text(CALICO)
    link = cfg.cni_conf_dir / "10-net.conflist"
    link.symlink_to("..data/10-net.conflist")
    install(cfg)
    assert link.is_symlink()
    assert json.loads(link.read_text())["plugins"][-1]["type"] == PLUGIN_TYPE
    assert sorted(p.name for p in data.iterdir()) == ["10-net.conflist"]
    remove_installed(cfg)
    assert link.is_symlink() and link.read_text() == CALICO


# -- which conflist ---------------------------------------------------------------------------


def test_the_first_conflist_in_sorted_order_is_chosen(cfg: Config) -> None:
    d = cfg.cni_conf_dir
    for name in ("20-b.conflist", "10-a.conflist", "99-z.conflist"):
        (d / name).write_text(SPACED_ONE_LINE)
    (d / "00-dir.conflist").mkdir()  # libcni skips directories
    (d / "05-notes.txt").write_text("x")
    sel = select(cfg)
    assert sel.path == d / "10-a.conflist"
    assert sel.reason == f"the first *.conflist in {d} in sorted order (cni.conflist is not set)"
    report = install(cfg)
    assert report.lines[0] == f"{d / '10-a.conflist'}: chosen: {sel.reason}"
    assert report.warnings == []
    assert (d / "20-b.conflist").read_text() == SPACED_ONE_LINE


def test_a_config_a_runtime_loads_first_is_warned_about(cfg: Config) -> None:
    d = cfg.cni_conf_dir
    (d / "10-a.conflist").write_text(SPACED_ONE_LINE)
    (d / "05-single.conf").write_text('{"cniVersion": "1.0.0", "name": "s", "type": "bridge"}')
    report = install(cfg)
    assert report.selection.path == d / "10-a.conflist"
    assert report.warnings == [
        f"container runtimes load {d / '05-single.conf'} (the first *.conf, *.conflist or "
        f"*.json in sorted order), not {d / '10-a.conflist'}: kmesh-cni does not run until that "
        "changes"]


def test_cni_conflist_names_the_file(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, conflist="50-mine.conflist")
    (cfg.cni_conf_dir / "10-a.conflist").write_text(SPACED_ONE_LINE)
    (cfg.cni_conf_dir / "50-mine.conflist").write_text(CALICO)
    sel = select(cfg)
    assert sel.path == cfg.cni_conf_dir / "50-mine.conflist"
    assert sel.reason == f"cni.conflist in {cfg.path}"
    install(cfg)
    assert (cfg.cni_conf_dir / "10-a.conflist").read_text() == SPACED_ONE_LINE
    with pytest.raises(ConflistError, match=r"60-absent\.conflist: file not found"):
        install(dataclasses.replace(cfg, cni_conflist="60-absent.conflist"))


def test_no_conflist_names_the_directory(cfg: Config) -> None:
    (cfg.cni_conf_dir / "05-single.conf").write_text("{}")
    with pytest.raises(ConfigError) as exc:
        install(cfg)
    assert str(exc.value) == (f"{cfg.path}: cni.conf_dir: no *.conflist file in "
                              f"{cfg.cni_conf_dir} (is the primary CNI installed? or set "
                              "cni.conflist)")
    missing = dataclasses.replace(cfg, cni_conf_dir=cfg.cni_conf_dir / "absent")
    with pytest.raises(ConfigError, match=f"{missing.cni_conf_dir} does not exist"):
        install(missing)
    assert remove_installed(missing) == []


# -- uninstall --------------------------------------------------------------------------------


def test_uninstall_removes_our_entry_from_every_conflist(cfg: Config) -> None:
    d = cfg.cni_conf_dir
    (d / "10-a.conflist").write_text(PODMAN)
    install(cfg)
    # The first file changed since: ours now sits in a file that sorts later.
    (d / "20-b.conflist").write_bytes((d / "10-a.conflist").read_bytes())
    (d / "10-a.conflist").write_text(CALICO)
    (d / "30-broken.conflist").write_text("{not json")  # not ours: skipped
    done = remove_installed(cfg)
    assert done == [f"{d / '20-b.conflist'}: removed kmesh-cni (plugin 5 of 5)",
                    f"removed {cfg.cni_bin_dir / 'kmesh-cni'}"]
    assert (d / "20-b.conflist").read_text() == PODMAN
    assert (d / "10-a.conflist").read_text() == CALICO


def test_uninstall_stops_at_a_broken_conflist_that_mentions_us(cfg: Config) -> None:
    d = cfg.cni_conf_dir
    (d / "10-a.conflist").write_text(PODMAN)
    install(cfg)
    broken = d / "20-b.conflist"
    broken.write_text('{"plugins": [{"type": "kmesh-cni"},,]}')
    with_ours = (d / "10-a.conflist").read_bytes()
    with pytest.raises(ConflistError, match=f"{broken}: invalid JSON"):
        remove_installed(cfg)
    # Nothing removed anywhere: uninstall refuses before it starts.
    assert (d / "10-a.conflist").read_bytes() == with_ours
    assert (cfg.cni_bin_dir / "kmesh-cni").exists()


def test_uninstall_removes_temporary_files_a_crash_left(cfg: Config) -> None:
    d = cfg.cni_conf_dir
    (d / "10-a.conflist").write_text(PODMAN)
    install(cfg)
    (d / f".10-a.conflist.abc123{TMP_SUFFIX}").write_text("half")
    (cfg.cni_bin_dir / f".kmesh-cni.xyz{TMP_SUFFIX}").write_text("half")
    done = remove_installed(cfg)
    assert f"removed {d / f'.10-a.conflist.abc123{TMP_SUFFIX}'}" in done
    assert f"removed {cfg.cni_bin_dir / f'.kmesh-cni.xyz{TMP_SUFFIX}'}" in done
    assert sorted(p.name for p in d.iterdir()) == ["10-a.conflist"]
    assert list(cfg.cni_bin_dir.iterdir()) == []


def test_kmesh_plugin_uninstall_removes_the_entry(cfg: Config) -> None:
    path = cfg.cni_conf_dir / "10-a.conflist"
    path.write_text(TABS_CRLF)
    install(cfg)
    assert cli._uninstall_cni(cfg) == [f"{path}: removed kmesh-cni (plugin 2 of 2)",
                                       f"removed {cfg.cni_bin_dir / 'kmesh-cni'}"]
    assert path.read_bytes() == TABS_CRLF.encode()
    assert cli._uninstall_cni(cfg) == []


# -- ensure_installed -------------------------------------------------------------------------


def test_ensure_installed_puts_the_entry_back(cfg: Config, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    path = cfg.cni_conf_dir / "10-a.conflist"
    path.write_text(PODMAN)
    line = ensure_installed(cfg)
    assert line == (f"{cfg.cni_bin_dir / 'kmesh-cni'}: installed (runs kmesh_plugin.cni.main "
                    f"under {sys.executable}); {path}: added kmesh-cni as plugin 5 of 5")
    assert ensure_installed(cfg) is None
    # Cheap when nothing changed: nothing is read.
    reads: list[Path] = []
    real_read = conflist._read
    monkeypatch.setattr(conflist, "_read", lambda p, d: reads.append(p) or real_read(p, d))
    for _ in range(20):
        assert ensure_installed(cfg) is None
    assert reads == []
    # The primary CNI rewrites its file (atomically, or in place) without our entry.
    tmp = path.with_name("tmp")
    tmp.write_text(PODMAN)
    os.replace(tmp, path)
    assert ensure_installed(cfg) == f"{path}: added kmesh-cni as plugin 5 of 5"
    assert ensure_installed(cfg) is None
    path.write_text(CALICO)
    assert ensure_installed(cfg) == f"{path}: added kmesh-cni as plugin 4 of 4"
    assert remove_entry(path.read_text())[0] == CALICO
    # Our launcher deleted.
    (cfg.cni_bin_dir / "kmesh-cni").unlink()
    assert ensure_installed(cfg) == (f"{cfg.cni_bin_dir / 'kmesh-cni'}: installed (runs "
                                     f"kmesh_plugin.cni.main under {sys.executable})")
    assert reads  # read again once a stat changed


def test_ensure_installed_never_raises(cfg: Config) -> None:
    path = cfg.cni_conf_dir / "10-a.conflist"
    line = ensure_installed(cfg)  # no conflist yet: the primary CNI is not installed
    assert line is not None and "no *.conflist file in" in line
    assert ensure_installed(cfg) is None  # reported once
    path.write_text(PODMAN)
    assert ensure_installed(cfg).endswith(f"{path}: added kmesh-cni as plugin 5 of 5")  # type: ignore[union-attr]
    path.unlink()
    line = ensure_installed(cfg)
    assert line is not None and line.startswith("kmesh-cni not ensured: ")
    path.write_text("{broken")
    line = ensure_installed(cfg)
    assert line is not None and f"{path}: invalid JSON" in line
    assert path.read_text() == "{broken"
    cfg.cni_conf_dir.joinpath("10-a.conflist").unlink()
    cfg.cni_conf_dir.rmdir()
    line = ensure_installed(cfg)
    assert line is not None and "does not exist" in line


def test_ensure_installed_follows_a_new_first_conflist(cfg: Config) -> None:
    d = cfg.cni_conf_dir
    (d / "20-b.conflist").write_text(PODMAN)
    assert ensure_installed(cfg) is not None
    (d / "10-a.conflist").write_text(CALICO)
    assert ensure_installed(cfg) == f"{d / '10-a.conflist'}: added kmesh-cni as plugin 4 of 4"
    (d / "05-c.conf").write_text("{}")
    line = ensure_installed(cfg)
    assert line is not None and line.startswith(f"container runtimes load {d / '05-c.conf'}")


def test_a_namespace_selector_makes_the_agent_the_enroller(cfg: Config) -> None:
    import dataclasses

    assert "enrol" not in conflist.entry(cfg)
    selected = dataclasses.replace(cfg, cni_namespace_selector="istio.io/dataplane-mode=kmesh")
    assert conflist.entry(selected)["enrol"] == "agent"


def test_an_entry_first_in_the_chain_is_moved_to_the_end(cfg: Config) -> None:
    ours = conflist.entry(cfg)
    text = json.dumps({"cniVersion": "1.0.0", "name": "n",
                       "plugins": [ours, {"type": "bridge"}]}, indent=2)
    new, done = add_entry(text, ours)
    assert new is not None and "moved" in done
    assert [p["type"] for p in json.loads(new)["plugins"]] == ["bridge", "kmesh-cni"]


def test_turning_the_selector_on_or_off_updates_the_entry(cfg: Config) -> None:
    import dataclasses

    plain = conflist.entry(cfg)
    selected = conflist.entry(dataclasses.replace(cfg, cni_namespace_selector="a=b"))
    text = json.dumps({"cniVersion": "1.0.0", "name": "n",
                       "plugins": [{"type": "bridge"}, plain]}, indent=2)
    on, done = add_entry(text, selected)
    assert on is not None and "enrol" in done
    assert json.loads(on)["plugins"][-1]["enrol"] == "agent"
    off, done = add_entry(on, plain)
    assert off is not None and "enrol" not in json.loads(off)["plugins"][-1]
