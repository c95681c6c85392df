"""Fuzzing kmesh-cni's boundary (hypothesis): whatever stdin and environment, the real entry
point prints one JSON document (or nothing, for a command that succeeds silently), exits 0 or
1, answers errors in the spec's shape with a known code, and never shows a traceback.

Most examples run ``main.main`` in-process (fast); a few run the installed script. Every path
the fuzzer can make kmesh-cni write to (stateDir, logFile) is inside a temporary directory;
pinDir never names a real datapath, and CNI_NETNS never names another network namespace, so no
example enrols anything. The default profile ("ci") keeps this file to seconds;
HYPOTHESIS_PROFILE=fuzz runs 10,000 examples per test.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmesh_plugin.cni import main, protocol

_COMMON: dict[str, Any] = {
    "deadline": None,  # a shared VM: wall-clock deadlines only add flakes
    "database": None,  # no .hypothesis/ directory in the checkout
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                              HealthCheck.filter_too_much],
}
settings.register_profile("cni-ci", max_examples=300, **_COMMON)
settings.register_profile("cni-fuzz", max_examples=10_000, **_COMMON)
PROFILE = settings.get_profile(
    "cni-fuzz" if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else "cni-ci")

KMESH_CNI = str(Path(sys.executable).with_name("kmesh-cni"))
SPEC_CODES = {1, 2, 3, 4, 5, 6, 7, 11, 50, 51}
OUR_CODES = {protocol.E_INTERNAL, protocol.E_NETNS, protocol.E_DATAPATH, protocol.E_STATE,
             protocol.E_NOT_ENROLLED}
SILENT = {"DEL", "CHECK", "GC", "STATUS"}  # success prints nothing

# Made by the module fixture (strategies only name paths in it), removed after the last test.
ROOT = Path(tempfile.gettempdir()) / f"kmesh-test-cni-fuzz-{os.getpid()}-{secrets.token_hex(4)}"


@pytest.fixture(scope="module", autouse=True)
def _root() -> Iterator[None]:
    ROOT.mkdir()
    try:
        yield
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)


def run(env: dict[str, str], stdin: bytes) -> tuple[int, bytes]:
    with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout:
        fin.write(stdin)
        fin.flush()
        fin.seek(0)
        rc = main.main(environ=env, stdin_fd=fin.fileno(), stdout_fd=fout.fileno())
        fout.seek(0)
        return rc, fout.read()


def check_answer(env: dict[str, str], rc: int, out: bytes, stderr: str = "") -> None:
    """The boundary's promise for one invocation."""
    assert "Traceback" not in stderr
    assert rc in (0, 1)
    command = env.get("CNI_COMMAND")
    if rc == 0 and not out:
        assert command in SILENT
        return
    assert out.endswith(b"\n") and out.count(b"\n") == 1, out  # exactly one document
    doc = json.loads(out)
    assert isinstance(doc, dict)
    if rc == 1:
        assert set(doc) == {"cniVersion", "code", "msg", "details"}, doc
        assert doc["code"] in SPEC_CODES | OUR_CODES, doc
        assert doc["code"] != protocol.E_INTERNAL, doc  # no input should reach a bug
        assert isinstance(doc["msg"], str) and doc["msg"] and isinstance(doc["details"], str)
        assert doc["cniVersion"] in protocol.SUPPORTED_VERSIONS
    elif command == "VERSION":
        assert doc["supportedVersions"] == list(protocol.SUPPORTED_VERSIONS)
    else:
        assert command == "ADD" and "cniVersion" in doc


# -- strategies -----------------------------------------------------------------------------

_text = st.text(max_size=40)
_env_text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                    max_size=40)
commands = st.one_of(st.sampled_from([*protocol.COMMANDS, "", "add", "BOGUS"]), _env_text)
versions = st.one_of(st.sampled_from([*protocol.SUPPORTED_VERSIONS, "0.2.0", "9.9.9", ""]),
                     _text, st.integers(), st.none())
# Where CNI_NETNS may point: nothing, things that are not another netns, our own netns.
netns_paths = st.one_of(st.sampled_from(["", "/nonexistent-kmesh-test", "/dev/null",
                                         "/proc/self/ns/net", "/proc/thread-self/ns/net",
                                         "/etc/hostname", "relative", "/"]), _env_text)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children,
                                                                      max_size=4),
    max_leaves=12,
)


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-formed requests with fuzzed fields, so examples get past the first checks."""
    sub = ROOT / f"s{draw(st.integers(0, 7))}"
    doc: dict[str, Any] = {"cniVersion": draw(versions), "name": draw(st.sampled_from(
        ["podnet", "", "bad name", "x" * 3])), "type": "kmesh-cni",
        "pinDir": draw(st.sampled_from([str(ROOT / "no-pins"), "relative", "", None, 5])),
        "stateDir": draw(st.sampled_from([str(sub / "state"), "relative", "", None, [1]])),
    }
    if draw(st.booleans()):
        doc["logFile"] = draw(st.sampled_from([str(sub / "cni.log"), "relative", 7,
                                               str(ROOT / "no-dir" / "x" / "log")]))
    if draw(st.booleans()):
        doc["prevResult"] = draw(st.one_of(json_values, st.fixed_dictionaries({
            "cniVersion": versions, "ips": st.lists(st.fixed_dictionaries(
                {"address": _text}), max_size=3), "interfaces": json_values})))
    if draw(st.booleans()):
        doc["cni.dev/valid-attachments"] = draw(st.one_of(json_values, st.lists(
            st.fixed_dictionaries({"containerID": _text, "ifname": _text}), max_size=3)))
    extra = draw(st.dictionaries(_text, json_values, max_size=3))
    for key, value in extra.items():
        if key not in ("pinDir", "stateDir", "logFile"):  # those stay inside ROOT
            doc[key] = value
    for key in [k for k, v in doc.items() if v is None and draw(st.booleans())]:
        del doc[key]
    return doc


@st.composite
def environments(draw: st.DrawFn) -> dict[str, str]:
    env: dict[str, str] = {}
    for name, values in (("CNI_COMMAND", commands), ("CNI_CONTAINERID", st.one_of(
            st.sampled_from(["c0ffee", "a" * 300, "-x"]), _env_text)),
            ("CNI_NETNS", netns_paths), ("CNI_IFNAME", st.one_of(st.sampled_from(
                ["eth0", "x" * 16, ".."]), _env_text)),
            ("CNI_ARGS", st.one_of(st.just("IgnoreUnknown=1;K8S_POD_NAME=web"), _env_text)),
            ("CNI_PATH", _env_text)):
        if draw(st.integers(0, 9)) > 0:
            env[name] = draw(values)
    return env


def encode(doc: object, draw_mode: int) -> bytes:
    text = json.dumps(doc)
    return text.encode("utf-16") if draw_mode == 1 else text.encode()


# -- in-process -----------------------------------------------------------------------------


@PROFILE
@given(env=environments(), stdin=st.binary(max_size=2000))
def test_random_bytes_on_stdin(env: dict[str, str], stdin: bytes) -> None:
    check_answer(env, *run(env, stdin))


@PROFILE
@given(env=environments(), doc=configs(), mode=st.integers(0, 3))
def test_fuzzed_requests(env: dict[str, str], doc: dict[str, Any], mode: int) -> None:
    stdin = encode(doc, mode)
    if mode == 2:
        stdin = stdin[: len(stdin) // 2]  # cut short
    check_answer(env, *run(env, stdin))


@PROFILE
@given(doc=configs(), command=st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS"]))
def test_fuzzed_requests_with_a_valid_environment(doc: dict[str, Any], command: str) -> None:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c0ffee", "CNI_IFNAME": "eth0",
           "CNI_NETNS": "/nonexistent-kmesh-test", "CNI_PATH": "/usr/lib/cni"}
    check_answer(env, *run(env, json.dumps(doc).encode()))


@PROFILE
@given(doc=json_values, command=st.sampled_from(protocol.COMMANDS))
def test_any_json_document(doc: Any, command: str) -> None:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c0ffee", "CNI_IFNAME": "eth0",
           "CNI_NETNS": "/nonexistent-kmesh-test", "CNI_PATH": "/x"}
    check_answer(env, *run(env, json.dumps(doc).encode()))


# -- the installed script -------------------------------------------------------------------


def run_script(env: dict[str, str], stdin: bytes, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    return subprocess.run([KMESH_CNI], input=stdin, env={**base, **env}, capture_output=True,
                          timeout=60, **kw)


@pytest.mark.parametrize("stdin", [os.urandom(4096), b"\x00" * 100, b"{" * 200_000,
                                   b"x" * (3 << 20)])
def test_script_on_garbage_and_huge_stdin(stdin: bytes) -> None:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee", "CNI_IFNAME": "eth0",
           "CNI_NETNS": "/nonexistent-kmesh-test"}
    p = run_script(env, stdin)
    check_answer(env, p.returncode, p.stdout, p.stderr.decode(errors="replace"))
    assert p.returncode == 1
    code = json.loads(p.stdout)["code"]
    assert code == (protocol.E_IO if len(stdin) > protocol.STDIN_LIMIT else protocol.E_DECODE)


def test_script_with_no_environment_at_all() -> None:
    p = subprocess.run([KMESH_CNI], input=b"", env={}, capture_output=True, timeout=60)
    check_answer({}, p.returncode, p.stdout, p.stderr.decode(errors="replace"))
    assert json.loads(p.stdout)["code"] == protocol.E_INVALID_ENV


def test_script_with_undecodable_environment_bytes() -> None:
    env = {b"CNI_COMMAND": b"ADD", b"CNI_CONTAINERID": b"\xff\xfe", b"CNI_IFNAME": b"e\xff",
           b"CNI_NETNS": b"/\xff", b"CNI_ARGS": b"K8S_POD_NAME=\xff", b"PATH": b"/usr/bin"}
    p = subprocess.run([KMESH_CNI], input=b"{}", env=env, capture_output=True, timeout=60)
    check_answer({"CNI_COMMAND": "ADD"}, p.returncode, p.stdout, p.stderr.decode("latin-1"))
    assert json.loads(p.stdout)["code"] == protocol.E_INVALID_ENV


def test_script_with_stdin_and_stdout_closed() -> None:
    # Closed stdin: an I/O error on stdout. Closed stdout too: exit 1, and still no traceback.
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c0ffee", "CNI_IFNAME": "eth0"}
    p = subprocess.run(["sh", "-c", f"exec 0<&- ; exec {KMESH_CNI}"], env=env,
                       capture_output=True, timeout=60)
    assert p.returncode == 1 and b"Traceback" not in p.stderr
    assert json.loads(p.stdout)["code"] == protocol.E_IO
    p = subprocess.run(["sh", "-c", f"exec 1>&- ; exec {KMESH_CNI}"],
                       env={"CNI_COMMAND": "VERSION"}, capture_output=True, timeout=60)
    assert p.returncode == 1 and b"Traceback" not in p.stderr


def test_script_version() -> None:
    p = run_script({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}')
    check_answer({"CNI_COMMAND": "VERSION"}, p.returncode, p.stdout, p.stderr.decode())
    assert json.loads(p.stdout)["cniVersion"] == "1.0.0"
