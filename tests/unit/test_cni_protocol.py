"""kmesh-cni against the CNI spec: every command in every version, version negotiation, each
error code, hostile stdin and environment, DEL twice and after the netns vanished, concurrent
ADDs, and the lean import of pyroute2.netns.

Most tests run the real entry point in-process (``main.main`` with a file as stdin and stdout);
a few run the installed ``kmesh-cni`` script. Tests that enrol a real netns need root and bpf(2)
(the ``kernel`` fixture): they pin a kmesh_enrolled-shaped map in a fresh
/sys/fs/bpf/kmesh-test-<hex> and create kmesh-test-<hex> network namespaces, all removed at the
end; no traffic is sent.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kmesh_plugin.cni import enrol, main, protocol, spool
from kmesh_plugin.cni.spool import PodRecord
from kmesh_plugin.datapath import records, syscall

VERSIONS = protocol.SUPPORTED_VERSIONS
KMESH_CNI = str(Path(sys.executable).with_name("kmesh-cni"))
PREFIX = "kmesh-test-"


# -- helpers --------------------------------------------------------------------------------


def run(env: dict[str, str], stdin: bytes) -> tuple[int, bytes]:
    """The real entry point in-process: (exit status, stdout)."""
    with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout:
        fin.write(stdin)
        fin.flush()
        fin.seek(0)
        rc = main.main(environ=env, stdin_fd=fin.fileno(), stdout_fd=fout.fileno())
        fout.seek(0)
        return rc, fout.read()


def run_doc(env: dict[str, str], stdin: bytes) -> tuple[int, Any]:
    rc, out = run(env, stdin)
    return rc, (json.loads(out) if out else None)


def expect_error(env: dict[str, str], stdin: bytes, code: int) -> dict[str, Any]:
    rc, doc = run_doc(env, stdin)
    assert rc == 1, doc
    assert isinstance(doc, dict) and set(doc) == {"cniVersion", "code", "msg", "details"}, doc
    assert doc["code"] == code, doc
    assert isinstance(doc["msg"], str) and doc["msg"]
    return doc


def prev_for(version: str, netns: str = "/var/run/netns/x") -> dict[str, Any]:
    """An interface plugin's result in ``version``'s shape (ips carry "version" before 1.0)."""
    ip: dict[str, Any] = {"address": "198.18.0.5/24", "gateway": "198.18.0.1", "interface": 1}
    ip6: dict[str, Any] = {"address": "2001:2::5/64", "interface": 1}
    if protocol.version_tuple(version) < (1, 0, 0):
        ip["version"], ip6["version"] = "4", "6"
    return {"cniVersion": version,
            "interfaces": [{"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
                           {"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": netns}],
            "ips": [ip, ip6], "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["198.18.0.53"]}}


def config(version: str = "1.0.0", *, pin_dir: str | Path = "/nonexistent-kmesh-test/pins",
           state_dir: str | Path = "/nonexistent-kmesh-test/state",
           prev: dict[str, Any] | str | None = "auto", **extra: Any) -> bytes:
    doc: dict[str, Any] = {"cniVersion": version, "name": "podnet", "type": "kmesh-cni",
                           "pinDir": str(pin_dir), "stateDir": str(state_dir)}
    if prev == "auto":
        prev = prev_for(version)
    if prev is not None:
        doc["prevResult"] = prev
    doc.update(extra)
    return json.dumps(doc).encode()


def cni_env(command: str, *, netns: str = "/var/run/netns/x", cid: str = "c0ffee",
            ifname: str = "eth0", **extra: str) -> dict[str, str]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
           "CNI_IFNAME": ifname, "CNI_PATH": "/usr/lib/cni",
           "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;"
                       "K8S_POD_UID=1234-5678"}
    env.update(extra)
    return env


def cookie_via_nsenter(netns: str) -> int:
    """The namespace's cookie, read by a process nsenter put there (independent of enrol.py)."""
    code = ("import socket,struct;s=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM);"
            "print(struct.unpack('=Q',s.getsockopt(socket.SOL_SOCKET,71,8))[0])")
    out = subprocess.run(["nsenter", f"--net={netns}", sys.executable, "-S", "-c", code],
                         check=True, capture_output=True, text=True).stdout
    return int(out)


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def enrolled_map(pin_dir: Path) -> Iterator[Path]:
    """A kmesh_enrolled-shaped map (as loader.map_specs declares it) pinned in pin_dir."""
    (pin_dir / "maps").mkdir()
    m = syscall.Map.create(syscall.BPF_MAP_TYPE_HASH, 8, records.ENROLMENT.size,
                           records.MAX_PODS, flags=syscall.BPF_F_NO_PREALLOC,
                           name=records.MAP_ENROLLED)
    try:
        m.pin(pin_dir / "maps" / records.MAP_ENROLLED)
    finally:
        m.close()
    yield pin_dir


def map_cookies(pin_dir: Path) -> set[int]:
    with syscall.Map.open_pinned(pin_dir / "maps" / records.MAP_ENROLLED) as m:
        return {records.U64.unpack(k)[0] for k in m.keys()}


@pytest.fixture
def make_netns(kernel: None) -> Iterator[Callable[[], str]]:
    """Create kmesh-test-<hex> network namespaces; returns their /var/run/netns paths."""
    made: list[str] = []

    def make() -> str:
        name = f"{PREFIX}{secrets.token_hex(4)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        return f"/var/run/netns/{name}"

    try:
        yield make
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        assert not any(Path("/var/run/netns", n).exists() for n in made)


def drop_netns(path: str) -> None:
    subprocess.run(["ip", "netns", "del", os.path.basename(path)], check=True)


# -- VERSION and version negotiation --------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_version_echoes_the_request_and_lists_ours(version: str) -> None:
    rc, doc = run_doc({"CNI_COMMAND": "VERSION"}, json.dumps({"cniVersion": version}).encode())
    assert rc == 0
    assert doc == {"cniVersion": version, "supportedVersions": list(VERSIONS)}


@pytest.mark.parametrize("stdin", [b"", b"garbage", b"[1]", b'{"cniVersion": 7}',
                                   b'{"cniVersion": "x.y"}', b"\xff" * 10])
def test_version_never_fails_on_its_input(stdin: bytes) -> None:
    rc, doc = run_doc({"CNI_COMMAND": "VERSION"}, stdin)
    assert rc == 0
    assert doc == {"cniVersion": protocol.LATEST, "supportedVersions": list(VERSIONS)}


def test_version_from_a_terminal_does_not_wait() -> None:
    master, slave = os.openpty()
    try:
        with tempfile.TemporaryFile() as fout:
            assert main.main(environ={"CNI_COMMAND": "VERSION"}, stdin_fd=slave,
                             stdout_fd=fout.fileno()) == 0
            fout.seek(0)
            assert json.loads(fout.read())["cniVersion"] == protocol.LATEST
    finally:
        os.close(master)
        os.close(slave)


def test_version_of_an_older_runtime_is_answered_in_its_version() -> None:
    # A runtime speaking 0.2.0 asks; we answer in its terms and it sees we need >= 0.3.0.
    rc, doc = run_doc({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.2.0"}')
    assert rc == 0 and doc["cniVersion"] == "0.2.0" and "0.2.0" not in doc["supportedVersions"]


@pytest.mark.parametrize("command", ["ADD", "CHECK", "DEL", "GC", "STATUS"])
@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "2.0.0", "1.2.0", "abc", ""])
def test_unsupported_versions_are_incompatible(command: str, version: str) -> None:
    doc = expect_error(cni_env(command), config(version, prev=None),
                       protocol.E_INCOMPATIBLE_VERSION)
    assert doc["cniVersion"] == protocol.LATEST
    assert "1.1.0" in doc["details"]


def test_missing_cni_version_is_0_1_0_and_incompatible() -> None:
    conf = json.loads(config())
    del conf["cniVersion"]
    expect_error(cni_env("ADD"), json.dumps(conf).encode(), protocol.E_INCOMPATIBLE_VERSION)


def test_non_string_cni_version_is_a_decode_error() -> None:
    expect_error(cni_env("ADD"), config(prev=None).replace(b'"1.0.0"', b"1.0"),
                 protocol.E_DECODE)


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1"])
def test_check_needs_0_4_0(version: str) -> None:
    doc = expect_error(cni_env("CHECK"), config(version), protocol.E_INCOMPATIBLE_VERSION)
    assert "CHECK" in doc["msg"]
    assert doc["cniVersion"] == version  # the error speaks the request's version


@pytest.mark.parametrize("command", ["GC", "STATUS"])
@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0"])
def test_gc_and_status_need_1_1_0(command: str, version: str) -> None:
    doc = expect_error(cni_env(command), config(version, prev=None),
                       protocol.E_INCOMPATIBLE_VERSION)
    assert command in doc["msg"]


# -- environment ----------------------------------------------------------------------------


def test_missing_cni_command() -> None:
    doc = expect_error({}, config(), protocol.E_INVALID_ENV)
    assert "CNI_COMMAND" in doc["msg"]


def test_unknown_command() -> None:
    doc = expect_error({"CNI_COMMAND": "BOGUS"}, config(), protocol.E_INVALID_ENV)
    assert "BOGUS" in doc["msg"]


@pytest.mark.parametrize(("command", "names"), [
    ("ADD", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]),
    ("CHECK", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]),
    ("DEL", ["CNI_CONTAINERID", "CNI_IFNAME"]),
    ("GC", ["CNI_PATH"]),
])
def test_each_missing_variable_is_named(command: str, names: list[str]) -> None:
    for name in names:
        env = cni_env(command)
        del env[name]
        doc = expect_error(env, config("1.1.0"), protocol.E_INVALID_ENV)
        assert name in doc["msg"]
    env = {"CNI_COMMAND": command}
    doc = expect_error(env, config("1.1.0"), protocol.E_INVALID_ENV)
    assert all(n in doc["msg"] for n in names)


def test_del_does_not_need_a_netns(tmp_path: Path) -> None:
    env = cni_env("DEL")
    del env["CNI_NETNS"]
    rc, out = run(env, config(state_dir=tmp_path / "state"))
    assert (rc, out) == (0, b"")


@pytest.mark.parametrize("cid", ["-abc", "a b", "a/b", "ab;rm", "é"])
def test_invalid_container_id(cid: str) -> None:
    expect_error(cni_env("ADD", cid=cid), config(), protocol.E_INVALID_ENV)


@pytest.mark.parametrize("ifname", ["x" * 16, ".", "..", "a/b", "a:b", "a b", "a\tb"])
def test_invalid_ifname(ifname: str) -> None:
    expect_error(cni_env("DEL", ifname=ifname), config(), protocol.E_INVALID_ENV)


def test_cni_args_parsing() -> None:
    assert protocol.parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=web") == {
        "IgnoreUnknown": "1", "K8S_POD_NAME": "web"}
    assert protocol.parse_cni_args("") == {}
    assert protocol.parse_cni_args("junk;;=x;A=b=c; B = d ") == {"A": "b=c", "B": "d"}


# -- stdin ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stdin", [b"", b"garbage", b"{", b"[]", b'"x"', b"null", b"\xff\xfe",
                                   b'{"a": NaN}', b'{"a": 1e999}', b"[" * 100_000,
                                   b'{"a": ' + b"9" * 5000 + b"}"])
def test_undecodable_stdin(stdin: bytes) -> None:
    expect_error(cni_env("ADD"), stdin, protocol.E_DECODE)


def test_huge_stdin_is_refused_with_the_limit() -> None:
    doc = expect_error(cni_env("ADD"), b" " * (protocol.STDIN_LIMIT + 1), protocol.E_IO)
    assert str(protocol.STDIN_LIMIT) in doc["msg"]


def test_stdin_at_the_limit_is_read() -> None:
    body = config(prev=None)
    padded = body + b" " * (protocol.STDIN_LIMIT - len(body))
    expect_error(cni_env("ADD"), padded, protocol.E_INVALID_CONFIG)  # read, then no prevResult


def test_unclosed_stdin_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "STDIN_TIMEOUT", 0.2)
    r, w = os.pipe()
    try:
        with tempfile.TemporaryFile() as fout:
            rc = main.main(environ=cni_env("ADD"), stdin_fd=r, stdout_fd=fout.fileno())
            fout.seek(0)
            doc = json.loads(fout.read())
    finally:
        os.close(r)
        os.close(w)
    assert rc == 1 and doc["code"] == protocol.E_IO and "within" in doc["msg"]


def test_closed_stdin_is_an_io_error() -> None:
    with tempfile.TemporaryFile() as fout:
        fd = os.open(os.devnull, os.O_RDONLY)
        os.close(fd)  # now an invalid descriptor, and nothing reuses it before main reads
        rc = main.main(environ=cni_env("ADD"), stdin_fd=fd, stdout_fd=fout.fileno())
        fout.seek(0)
        doc = json.loads(fout.read())
    assert rc == 1 and doc["code"] == protocol.E_IO


# -- network configuration ------------------------------------------------------------------


def test_missing_or_bad_network_name() -> None:
    conf = json.loads(config())
    for name in (None, "", 5, "-x", "a b"):
        conf["name"] = name
        expect_error(cni_env("ADD"), json.dumps(conf).encode(), protocol.E_INVALID_CONFIG)


@pytest.mark.parametrize("command", ["ADD", "CHECK", "DEL", "GC"])
@pytest.mark.parametrize("key", ["pinDir", "stateDir"])
def test_missing_dirs_are_an_invalid_config(command: str, key: str) -> None:
    conf = json.loads(config("1.1.0"))
    del conf[key]
    conf["cni.dev/valid-attachments"] = []
    doc = expect_error(cni_env(command), json.dumps(conf).encode(), protocol.E_INVALID_CONFIG)
    assert key in doc["msg"]


def test_status_needs_a_pin_dir() -> None:
    conf = json.loads(config("1.1.0"))
    del conf["pinDir"]
    expect_error({"CNI_COMMAND": "STATUS"}, json.dumps(conf).encode(), protocol.E_INVALID_CONFIG)


@pytest.mark.parametrize("value", ["relative/dir", "pins", "/a\u0000b"])
def test_unusable_dir_is_an_unsupported_field(value: str) -> None:
    doc = expect_error(cni_env("ADD"), config(pin_dir=value), protocol.E_UNSUPPORTED_FIELD)
    assert "pinDir" in doc["msg"] and repr(value)[1:-1][:10] in doc["msg"]


def test_wrong_type_dir_is_an_invalid_config() -> None:
    conf = json.loads(config())
    conf["stateDir"] = ["/x"]
    expect_error(cni_env("ADD"), json.dumps(conf).encode(), protocol.E_INVALID_CONFIG)


@pytest.mark.parametrize("version", VERSIONS)
def test_add_without_prev_result_is_refused(version: str) -> None:
    doc = expect_error(cni_env("ADD"), config(version, prev=None), protocol.E_INVALID_CONFIG)
    assert "prevResult" in doc["msg"] and "chained" in doc["details"]
    assert doc["cniVersion"] == version


@pytest.mark.parametrize("prev", [[], "x", 5, True])
def test_prev_result_must_be_an_object(prev: Any) -> None:
    expect_error(cni_env("ADD"), config(prev=prev), protocol.E_INVALID_CONFIG)


def test_gc_needs_valid_attachments(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for bad in (None, {}, [1], [{"containerID": "a"}], [{"containerID": 1, "ifname": "e"}]):
        conf = json.loads(config("1.1.0", state_dir=state, prev=None))
        if bad is not None:
            conf["cni.dev/valid-attachments"] = bad
        expect_error({"CNI_COMMAND": "GC", "CNI_PATH": "/x"}, json.dumps(conf).encode(),
                     protocol.E_INVALID_CONFIG)


def test_status_without_datapath_is_not_available(tmp_path: Path) -> None:
    doc = expect_error({"CNI_COMMAND": "STATUS"}, config("1.1.0", pin_dir=tmp_path),
                       protocol.E_NOT_AVAILABLE)
    assert "kmesh_enrolled" in doc["details"]


def test_add_with_a_missing_netns(tmp_path: Path) -> None:
    env = cni_env("ADD", netns=str(tmp_path / "gone"))
    expect_error(env, config(state_dir=tmp_path / "s"), protocol.E_NETNS)
    assert not (tmp_path / "s").exists()  # nothing written


@pytest.mark.parametrize("path", ["/dev/null", "/etc/hostname", "/proc/self/ns/net"])
def test_add_with_a_path_that_is_no_other_netns(tmp_path: Path, path: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"{path} missing")
    expect_error(cni_env("ADD", netns=path), config(state_dir=tmp_path / "s"), protocol.E_NETNS)


def test_fifo_netns_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    expect_error(cni_env("ADD", netns=str(fifo)), config(state_dir=tmp_path / "s"),
                 protocol.E_NETNS)


def test_internal_errors_become_code_100(monkeypatch: pytest.MonkeyPatch,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    def boom(*args: Any) -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setitem(main.COMMANDS, "DEL", boom)
    doc = expect_error(cni_env("DEL"), config(), protocol.E_INTERNAL)
    assert "ZeroDivisionError" in doc["msg"] and "test_cni_protocol.py" in doc["msg"]
    assert doc["details"] == "boom"
    assert "Traceback" not in capfd.readouterr().err


def test_keyboard_interrupt_is_also_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setitem(main.COMMANDS, "DEL", interrupted)
    expect_error(cni_env("DEL"), config(), protocol.E_INTERNAL)


def test_lock_timeout_is_try_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool, "LOCK_TIMEOUT", 0.2)
    state = tmp_path / "state"
    state.mkdir()
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        expect_error(cni_env("DEL"), config(state_dir=state), protocol.E_TRY_AGAIN)
    finally:
        os.close(fd)
    assert run(cni_env("DEL"), config(state_dir=state)) == (0, b"")


def test_unwritable_state_is_code_103(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    expect_error(cni_env("DEL"), config(state_dir=blocker / "state"), protocol.E_STATE)


def test_log_file_gets_a_line_per_invocation(tmp_path: Path) -> None:
    log = tmp_path / "cni.log"
    assert run(cni_env("DEL"), config(state_dir=tmp_path / "s", logFile=str(log)))[0] == 0
    expect_error(cni_env("DEL"), config("9.9.9", logFile=str(log)), protocol.E_INCOMPATIBLE_VERSION)
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    assert "INFO DEL c0ffee/eth0: ok" in lines[0] and "ERROR DEL c0ffee/eth0: code 1" in lines[1]


# -- results across versions ----------------------------------------------------------------


@pytest.mark.parametrize("asked", VERSIONS)
@pytest.mark.parametrize("given", VERSIONS)
def test_convert_result(asked: str, given: str) -> None:
    prev = prev_for(given)
    out = protocol.convert_result(prev, asked)
    assert out["cniVersion"] == asked
    assert {k: v for k, v in out.items() if k != "ips"} == {
        **{k: v for k, v in prev.items() if k != "ips"}, "cniVersion": asked}
    old_shape = protocol.version_tuple(asked) < (1, 0, 0)
    if old_shape == (protocol.version_tuple(given) < (1, 0, 0)):
        assert out["ips"] == prev["ips"]  # the same shape: unchanged
    else:
        assert [("version" in ip) for ip in out["ips"]] == [old_shape, old_shape]
        if old_shape:
            assert [ip["version"] for ip in out["ips"]] == ["4", "6"]
    assert prev == prev_for(given)  # the input is not modified


def test_result_ips() -> None:
    prev = prev_for("1.0.0")
    prev["ips"] += [{"address": "nonsense/3"}, "x", {"address": 5}, {"address": "198.18.0.5/32"}]
    assert protocol.result_ips(prev, main._is_ip) == ["198.18.0.5", "2001:2::5"]
    assert protocol.result_ips({"ips": "x"}, main._is_ip) == []


# -- state records --------------------------------------------------------------------------


def test_record_round_trip_and_format(tmp_path: Path) -> None:
    rec = PodRecord("c1", "eth0", "/var/run/netns/p", 4096, "ns", "pod", "uid",
                    ("198.18.0.5",), "1.0.0", 1.5)
    path = spool.write_record(tmp_path, rec)
    assert path == spool.record_path(tmp_path, "c1", "eth0")
    assert json.loads(Path(path).read_text()) == {
        "version": 1, "containerId": "c1", "ifname": "eth0", "netns": "/var/run/netns/p",
        "netnsCookie": 4096, "podNamespace": "ns", "podName": "pod", "podUid": "uid",
        "ips": ["198.18.0.5"], "cniVersion": "1.0.0", "enrolledAt": 1.5, "network": ""}
    assert spool.read_records(tmp_path) == [rec]
    assert spool.read_record(tmp_path, "c1", "eth0") == rec
    assert spool.remove_record(tmp_path, "c1", "eth0") is True
    assert spool.remove_record(tmp_path, "c1", "eth0") is False
    assert spool.read_records(tmp_path) == []


def test_read_records_skips_and_reports_bad_files(tmp_path: Path) -> None:
    good = PodRecord("c1", "eth0", "/n", 7)
    spool.write_record(tmp_path, good)
    pods = tmp_path / "pods"
    (pods / "junk.json").write_text("{")
    (pods / "c2@eth0.json").write_text(json.dumps({**good.to_json(), "netnsCookie": -1}))
    (pods / "c3@eth0.json").write_text(json.dumps(good.to_json()))  # name does not match
    (pods / ".c4@eth0.json.tmp.1").write_text("partial")  # a writer's temporary: not listed
    (pods / "README").write_text("not a record")
    bad: list[tuple[str, str]] = []
    assert spool.read_records(tmp_path, on_bad=lambda p, r: bad.append((p, r))) == [good]
    assert sorted(os.path.basename(p) for p, _ in bad) == ["c2@eth0.json", "c3@eth0.json",
                                                           "junk.json"]
    assert spool.read_records(tmp_path / "missing") == []


def test_record_names_are_unambiguous() -> None:
    names = {spool.record_name(c, i) for c, i in [("a-b", "c"), ("a", "b-c"), ("a", "b@c"),
                                                  ("a@b", "c"), ("a", "%41"), ("a", "A"),
                                                  ("x" * 300, "eth0"), ("x" * 301, "eth0")]}
    assert len(names) == 8
    assert all(len(n) <= 200 and "/" not in n for n in names)
    assert spool.record_name("c0ffee", "eth0") == "c0ffee@eth0"
    assert spool.record_name("c", "é/") == "c@%C3%A9%2F"


def test_malformed_records_do_not_raise_from_the_parser() -> None:
    base = PodRecord("c", "e", "/n", 1).to_json()
    for change in ({"version": 2}, {"netnsCookie": True}, {"netnsCookie": 1 << 64},
                   {"ips": [1]}, {"enrolledAt": "x"}, {"containerId": ""}, {"podName": None}):
        with pytest.raises(ValueError):
            PodRecord.from_json({**base, **change})
    with pytest.raises(ValueError):
        PodRecord.from_json([])


def test_enrol_constants_match_the_datapath_records() -> None:
    assert enrol.COOKIE.format == records.U64.format
    assert len(enrol.ENROLMENT_VALUE) == records.ENROLMENT.size
    assert records.ENROLMENT.pack({"flags": 0, "pad": 0}) == enrol.ENROLMENT_VALUE
    assert enrol.MAP_ENROLLED == records.MAP_ENROLLED
    assert enrol.ATTR_SIZE == syscall.ATTR_SIZE


# -- imports --------------------------------------------------------------------------------

# Imports the package kmesh_plugin without its __init__ (which loads pluggy and the model), to
# see what kmesh-cni itself pulls in.
_BARE_PACKAGE = ("import sys, importlib.util as u; s = u.find_spec('kmesh_plugin'); "
                 "m = type(sys)('kmesh_plugin'); m.__path__ = list(s.submodule_search_locations);"
                 " sys.modules['kmesh_plugin'] = m; ")


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout


def test_main_imports_stay_lean() -> None:
    out = _python(_BARE_PACKAGE + "import kmesh_plugin.cni.main; print(sorted(sys.modules))")
    loaded = set(eval(out))  # a printed list of names
    for heavy in ("kubernetes", "yaml", "pluggy", "prometheus_client", "pyroute2", "typing",
                  "dataclasses", "logging", "ctypes", "kmesh_plugin.datapath"):
        assert heavy not in loaded, heavy


def test_lean_netns_import_skips_the_package_init() -> None:
    out = _python(
        "import sys; from kmesh_plugin.cni import enrol; m = enrol.load_netns(); "
        "print(enrol.netns_import, m.__name__, 'pyroute2' in sys.modules, "
        "'pyroute2.iproute' in sys.modules, callable(m.setns)); "
        "import pyroute2; print(hasattr(pyroute2, 'IPRoute'))")
    assert out.split() == ["lean", "pyroute2.netns", "False", "False", "True", "True"]


def test_netns_import_falls_back_when_the_lean_path_fails() -> None:
    out = _python(
        "import sys, importlib.util; importlib.util.find_spec = lambda *a, **k: None; "
        "from kmesh_plugin.cni import enrol; m = enrol.load_netns(); "
        "print(enrol.netns_import, m.__name__, 'pyroute2.iproute' in sys.modules)")
    assert out.split() == ["full", "pyroute2.netns", "True"]


def test_no_lean_path_when_pyroute2_is_already_imported() -> None:
    out = _python("import pyroute2; from kmesh_plugin.cni import enrol; enrol.load_netns(); "
                  "print(enrol.netns_import)")
    assert out.split() == ["full"]


# -- with a real netns and a pinned map (root) ----------------------------------------------


@pytest.mark.kernel
@pytest.mark.parametrize("version", VERSIONS)
def test_add_check_del_in_every_version(version: str, enrolled_map: Path, tmp_path: Path,
                                        make_netns: Callable[[], str]) -> None:
    netns = make_netns()
    state = tmp_path / "state"
    env = cni_env("ADD", netns=netns)
    prev = prev_for(version, netns)
    conf = config(version, pin_dir=enrolled_map, state_dir=state, prev=prev)
    rc, doc = run_doc(env, conf)
    assert rc == 0 and doc == prev  # passed through unchanged, in the request's version
    cookie = cookie_via_nsenter(netns)
    assert map_cookies(enrolled_map) == {cookie}
    [rec] = spool.read_records(state)
    assert (rec.container_id, rec.ifname, rec.netns, rec.netns_cookie) == (
        "c0ffee", "eth0", netns, cookie)
    assert (rec.pod_namespace, rec.pod_name, rec.pod_uid) == ("shop", "web-0", "1234-5678")
    assert rec.ips == ("198.18.0.5", "2001:2::5") and rec.cni_version == version

    if protocol.version_tuple(version) >= (0, 4, 0):
        assert run(cni_env("CHECK", netns=netns), conf) == (0, b"")
    # DEL: 0.3.x runtimes pass no prevResult, later ones do; twice is fine.
    del_conf = config(version, pin_dir=enrolled_map, state_dir=state,
                      prev=prev if protocol.version_tuple(version) >= (0, 4, 0) else None)
    assert run(cni_env("DEL", netns=netns), del_conf) == (0, b"")
    assert map_cookies(enrolled_map) == set() and spool.read_records(state) == []
    assert run(cni_env("DEL", netns=netns), del_conf) == (0, b"")


@pytest.mark.kernel
def test_podman_style_args(enrolled_map: Path, tmp_path: Path,
                           make_netns: Callable[[], str]) -> None:
    netns = make_netns()
    env = cni_env("ADD", netns=netns, CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=web")
    assert run(env, config(pin_dir=enrolled_map, state_dir=tmp_path))[0] == 0
    [rec] = spool.read_records(tmp_path)
    assert (rec.pod_namespace, rec.pod_name, rec.pod_uid) == ("", "web", "")


@pytest.mark.kernel
def test_del_after_the_netns_vanished(enrolled_map: Path, tmp_path: Path,
                                      make_netns: Callable[[], str]) -> None:
    netns = make_netns()
    conf = config(pin_dir=enrolled_map, state_dir=tmp_path)
    assert run(cni_env("ADD", netns=netns), conf)[0] == 0
    drop_netns(netns)
    assert run(cni_env("CHECK", netns=netns), conf) == (0, b"")  # record and map agree
    assert run(cni_env("DEL", netns=netns), conf) == (0, b"")
    assert map_cookies(enrolled_map) == set() and spool.read_records(tmp_path) == []
    assert run(cni_env("DEL", netns=netns), conf) == (0, b"")


@pytest.mark.kernel
def test_del_without_a_datapath_still_cleans_the_record(enrolled_map: Path, tmp_path: Path,
                                                        make_netns: Callable[[], str]) -> None:
    netns = make_netns()
    assert run(cni_env("ADD", netns=netns),
               config(pin_dir=enrolled_map, state_dir=tmp_path))[0] == 0
    assert run(cni_env("DEL", netns=netns),
               config(pin_dir=tmp_path / "no-pins", state_dir=tmp_path)) == (0, b"")
    assert spool.read_records(tmp_path) == []


@pytest.mark.kernel
def test_del_of_a_lost_record_removes_the_live_netns_cookie(
        enrolled_map: Path, tmp_path: Path, make_netns: Callable[[], str]) -> None:
    netns = make_netns()
    conf = config(pin_dir=enrolled_map, state_dir=tmp_path)
    assert run(cni_env("ADD", netns=netns), conf)[0] == 0
    spool.remove_record(tmp_path, "c0ffee", "eth0")  # the state dir lost it
    assert run(cni_env("DEL", netns=netns), conf) == (0, b"")
    assert map_cookies(enrolled_map) == set()


@pytest.mark.kernel
def test_check_failures(enrolled_map: Path, tmp_path: Path,
                        make_netns: Callable[[], str]) -> None:
    netns, other = make_netns(), make_netns()
    conf = config(pin_dir=enrolled_map, state_dir=tmp_path)
    expect_error(cni_env("CHECK", netns=netns), conf, protocol.E_NOT_ENROLLED)  # never added
    assert run(cni_env("ADD", netns=netns), conf)[0] == 0
    # Same attachment, but CNI_NETNS now names another namespace: its cookie differs.
    doc = expect_error(cni_env("CHECK", netns=other), conf, protocol.E_NOT_ENROLLED)
    assert "changed" in doc["msg"]
    with syscall.Map.open_pinned(enrolled_map / "maps" / records.MAP_ENROLLED) as m:
        m.delete(records.U64.pack(cookie_via_nsenter(netns)))
    doc = expect_error(cni_env("CHECK", netns=netns), conf, protocol.E_NOT_ENROLLED)
    assert "missing" in doc["msg"]
    expect_error(cni_env("CHECK", netns=netns), config(pin_dir=tmp_path, state_dir=tmp_path),
                 protocol.E_DATAPATH)


@pytest.mark.kernel
def test_two_attachments_share_one_netns(enrolled_map: Path, tmp_path: Path,
                                         make_netns: Callable[[], str]) -> None:
    netns = make_netns()
    conf = config(pin_dir=enrolled_map, state_dir=tmp_path)
    for ifname in ("eth0", "net1"):
        assert run(cni_env("ADD", netns=netns, ifname=ifname), conf)[0] == 0
    cookie = cookie_via_nsenter(netns)
    assert run(cni_env("DEL", netns=netns, ifname="eth0"), conf) == (0, b"")
    assert map_cookies(enrolled_map) == {cookie}  # net1 still enrols it
    assert run(cni_env("DEL", netns=netns, ifname="net1"), conf) == (0, b"")
    assert map_cookies(enrolled_map) == set()


@pytest.mark.kernel
def test_add_again_in_a_new_netns_replaces_the_old_cookie(
        enrolled_map: Path, tmp_path: Path, make_netns: Callable[[], str]) -> None:
    first, second = make_netns(), make_netns()
    conf = config(pin_dir=enrolled_map, state_dir=tmp_path)
    assert run(cni_env("ADD", netns=first), conf)[0] == 0
    assert run(cni_env("ADD", netns=second), conf)[0] == 0
    assert map_cookies(enrolled_map) == {cookie_via_nsenter(second)}
    assert [r.netns for r in spool.read_records(tmp_path)] == [second]


@pytest.mark.kernel
def test_add_rolls_back_when_the_map_is_full(tmp_path: Path, pin_dir: Path,
                                             make_netns: Callable[[], str]) -> None:
    (pin_dir / "maps").mkdir()
    with syscall.Map.create(syscall.BPF_MAP_TYPE_HASH, 8, 8, 1, flags=syscall.BPF_F_NO_PREALLOC,
                            name=records.MAP_ENROLLED) as m:
        m.pin(pin_dir / "maps" / records.MAP_ENROLLED)
        m.update(records.U64.pack(1), bytes(8))  # full
    netns = make_netns()
    doc = expect_error(cni_env("ADD", netns=netns), config(pin_dir=pin_dir, state_dir=tmp_path),
                       protocol.E_DATAPATH)
    assert "full" in doc["msg"]
    assert spool.read_records(tmp_path) == []  # no record without its cookie


@pytest.mark.kernel
def test_a_pin_that_is_not_our_map_is_refused(tmp_path: Path, pin_dir: Path,
                                              make_netns: Callable[[], str]) -> None:
    (pin_dir / "maps").mkdir()
    with syscall.Map.create(syscall.BPF_MAP_TYPE_ARRAY, 4, 8, 1,
                            name=records.MAP_ENROLLED) as m:
        m.pin(pin_dir / "maps" / records.MAP_ENROLLED)
    doc = expect_error(cni_env("ADD", netns=make_netns()),
                       config(pin_dir=pin_dir, state_dir=tmp_path), protocol.E_DATAPATH)
    assert "is not kmesh_enrolled" in doc["msg"]
    expect_error({"CNI_COMMAND": "STATUS"}, config("1.1.0", pin_dir=pin_dir),
                 protocol.E_NOT_AVAILABLE)


@pytest.mark.kernel
def test_status_ok_with_the_map(enrolled_map: Path) -> None:
    assert run({"CNI_COMMAND": "STATUS"}, config("1.1.0", pin_dir=enrolled_map)) == (0, b"")


@pytest.mark.kernel
def test_gc_keeps_valid_attachments_only(enrolled_map: Path, tmp_path: Path,
                                         make_netns: Callable[[], str]) -> None:
    netns = [make_netns() for _ in range(3)]
    conf = config(pin_dir=enrolled_map, state_dir=tmp_path)
    for i, path in enumerate(netns):
        assert run(cni_env("ADD", netns=path, cid=f"c{i}"), conf)[0] == 0
    cookies = [cookie_via_nsenter(p) for p in netns]
    with syscall.Map.open_pinned(enrolled_map / "maps" / records.MAP_ENROLLED) as m:
        m.update(records.U64.pack(999_999_999), bytes(8))  # an orphan (ADD crashed)
    (tmp_path / "pods" / ".c9@eth0.json.tmp.1").write_text("{")
    gc = json.loads(config("1.1.0", pin_dir=enrolled_map, state_dir=tmp_path, prev=None))
    # Another network chaining kmesh-cni: its attachments are not in this list, and stay.
    other = PodRecord("o1", "eth0", "/n/o1", 424242, network="other-net")
    spool.write_record(tmp_path, other)
    gc["cni.dev/valid-attachments"] = [{"containerID": "c1", "ifname": "eth0"},
                                       {"containerID": "gone", "ifname": "eth0"}]
    env = {"CNI_COMMAND": "GC", "CNI_PATH": "/usr/lib/cni"}
    assert run(env, json.dumps(gc).encode()) == (0, b"")
    assert map_cookies(enrolled_map) == {cookies[1]}  # other's cookie was never in the map
    assert sorted(r.container_id for r in spool.read_records(tmp_path)) == ["c1", "o1"]
    assert sorted(os.listdir(tmp_path / "pods")) == ["c1@eth0.json", "o1@eth0.json"]
    assert run(env, json.dumps(gc).encode()) == (0, b"")  # idempotent
    # An unreadable record (a newer kmesh-cni's, say) is left alone, and so is every cookie
    # while it exists: its cookie cannot be told from an orphan.
    (tmp_path / "pods" / "junk.json").write_text("{")
    with syscall.Map.open_pinned(enrolled_map / "maps" / records.MAP_ENROLLED) as m:
        m.update(records.U64.pack(999_999_998), bytes(8))
    assert run(env, json.dumps(gc).encode()) == (0, b"")
    assert (tmp_path / "pods" / "junk.json").exists()
    assert map_cookies(enrolled_map) == {cookies[1], 999_999_998}


@pytest.mark.kernel
def test_concurrent_adds_and_dels(enrolled_map: Path, tmp_path: Path,
                                  make_netns: Callable[[], str]) -> None:
    """20 kmesh-cni processes at once, each for its own pod: all enrolled, one record each."""
    n = 20
    netns = [make_netns() for _ in range(n)]
    conf = config(pin_dir=enrolled_map, state_dir=tmp_path)

    def invoke(command: str, i: int) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, **cni_env(command, netns=netns[i], cid=f"pod{i:02d}")}
        return subprocess.run([KMESH_CNI], input=conf, env=env, capture_output=True,
                              timeout=60)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        adds = list(pool.map(lambda i: invoke("ADD", i), range(n)))
    assert [p.returncode for p in adds] == [0] * n, [p.stdout for p in adds]
    assert all(json.loads(p.stdout) == prev_for("1.0.0") for p in adds)
    cookies = {cookie_via_nsenter(p) for p in netns}
    assert len(cookies) == n and map_cookies(enrolled_map) == cookies
    recs = spool.read_records(tmp_path)
    assert {(r.container_id, r.netns_cookie) for r in recs} == {
        (f"pod{i:02d}", cookie_via_nsenter(netns[i])) for i in range(n)}
    assert not [f for f in os.listdir(tmp_path / "pods") if f.startswith(".")]

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        dels = list(pool.map(lambda i: invoke("DEL", i), range(n)))
    assert [(p.returncode, p.stdout) for p in dels] == [(0, b"")] * n
    assert map_cookies(enrolled_map) == set() and spool.read_records(tmp_path) == []


@pytest.mark.kernel
def test_installed_script_end_to_end(enrolled_map: Path, tmp_path: Path,
                                     make_netns: Callable[[], str]) -> None:
    netns = make_netns()
    conf = config("1.1.0", pin_dir=enrolled_map, state_dir=tmp_path,
                  prev=prev_for("1.1.0", netns))
    for command, expect_out in (("ADD", True), ("CHECK", False), ("DEL", False), ("DEL", False)):
        p = subprocess.run([KMESH_CNI], input=conf, capture_output=True, timeout=30,
                           env={**os.environ, **cni_env(command, netns=netns)})
        assert p.returncode == 0, p.stdout
        assert bool(p.stdout) == expect_out and b"Traceback" not in p.stderr
    assert map_cookies(enrolled_map) == set()


def test_del_ignores_a_malformed_prev_result(tmp_path: Path) -> None:
    # DEL never uses prevResult, and a failing DEL would stop the runtime's teardown chain.
    for prev in ("", [], 5):
        assert run(cni_env("DEL"), config(state_dir=tmp_path, prev=prev)) == (0, b"")


def test_a_log_file_that_is_a_fifo_or_our_stdout_is_ignored(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    rc, doc = run_doc(cni_env("VERSION"), config(logFile=str(fifo)))
    assert rc == 0 and "supportedVersions" in doc and time.monotonic() - started < 5
    # Our stdout as the log file: the JSON must stay alone on stdout.
    rc, doc = run_doc(cni_env("DEL"), config(state_dir=tmp_path, logFile="/dev/stdout"))
    assert rc == 0 and doc is None
