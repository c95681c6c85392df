"""The node's CNI network configuration list: add, update and remove the kmesh-cni entry.

Container runtimes (containerd, CRI-O, podman) load the first file of their conf dir in sorted
order of ``*.conf``, ``*.conflist`` and ``*.json`` and run its ``plugins`` in order; kmesh-cni is
chained at the end of that array. The file belongs to the primary CNI (Calico, Flannel, the
bridge plugin, ...), so nothing but our entry's bytes changes: the document is never
re-serialised. A small scanner finds the spans of the top-level ``plugins`` array and of its
elements in the raw text, checked against ``json.loads`` of the same text, and our entry's text
is spliced in (in the style of the entries around it) or cut out, so that install then uninstall
gives back the original bytes. Every edit is checked by parsing its result before it is written.

Every write is a temporary file in the same directory (named so that no runtime takes it for a
config: see ``TMP_SUFFIX``), fsync'ed, given the original's mode and owner and renamed over it: a
runtime reading at the same time sees the old file or the new one, never a partial one. A file
replaced by someone else between our read and our rename is read again (compare and swap on its
stat), not overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import sys
import tempfile
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmesh_plugin.config import Config
from kmesh_plugin.errors import ConfigError, KmeshError
from kmesh_plugin.sources.decode import DecodeError, MissingFile, read_regular_file

log = logging.getLogger(__name__)

PLUGIN_TYPE = "kmesh-cni"
LAUNCHER_NAME = "kmesh-cni"
# The settings the contract puts in our entry; anything else in it is ignored by kmesh-cni.
SETTINGS = ("pinDir", "stateDir", "logFile", "enrol")
# A conflist is a few KiB; the bound keeps a wrong cni.conflist (a log, an image) cheap.
MAX_CONFLIST_BYTES = 1 << 20
# libcni.ConfFiles: what a runtime considers in its conf dir, in sorted (byte) order.
RUNTIME_EXTENSIONS = (".conf", ".conflist", ".json")
# Temporary files end in this, not in a RUNTIME_EXTENSIONS suffix: ".x.conflist" would sort
# before every real config (a dot sorts before digits) and a runtime could load a half-written
# copy.
TMP_SUFFIX = ".kmesh-tmp"
LAUNCHER_MARKER = "# kmesh-cni launcher, written by `kmesh-plugin cni install`"
# Linux reads at most 255 bytes of a "#!" line (BINPRM_BUF_SIZE is 256 since 5.1).
MAX_SHEBANG = 255
_ATTEMPTS = 3  # reads of a file that another writer keeps replacing under us


class ConflistError(ConfigError):
    """A CNI config file cannot be edited safely; it was not changed. ``raw`` holds the bytes
    that were read, if any (uninstall skips a broken file that cannot hold our entry)."""

    def __init__(self, path: str | os.PathLike[str], message: str,
                 raw: bytes | None = None) -> None:
        super().__init__(path, None, f"{message} (not changed)")
        self.raw = raw


class CniInstallError(KmeshError):
    """Writing the conflist or the launcher failed (permissions, a full disk, a read-only
    mount), or an edit failed its own check; the file was not changed."""


def entry(cfg: Config) -> dict[str, str]:
    """Our entry, as the contract (notes/cni-contract.md) defines it."""
    e = {"type": PLUGIN_TYPE, "pinDir": str(cfg.pin_dir), "stateDir": str(cfg.cni_state_dir)}
    if cfg.cni_log_file is not None:
        e["logFile"] = str(cfg.cni_log_file)
    if cfg.cni_namespace_selector:
        e["enrol"] = "agent"  # the agent enrols by Namespace labels; ADD only records
    return e


# -- the scanner ------------------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")
_STRING = re.compile(r'"(?:[^"\\\x00-\x1f]+|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"')
# json.loads also takes NaN and Infinity; a scalar the scanner misreads fails the check below.
_SCALAR = re.compile(
    r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null|NaN|-?Infinity")
_STRUCTURAL = re.compile(r'["\[\]{}]')


class _ScanError(Exception):
    pass


class _Scanner:
    """Spans of JSON values in text that json.loads accepted. Iterative: no recursion limit."""

    def __init__(self, text: str) -> None:
        self.text = text

    def ws(self, i: int) -> int:
        return _WS.match(self.text, i).end()  # type: ignore[union-attr]  # "*" always matches

    def char(self, i: int) -> str:
        return self.text[i] if i < len(self.text) else ""

    def expect(self, i: int, c: str) -> int:
        if self.char(i) != c:
            raise _ScanError(f"expected {c!r} at offset {i}")
        return i + 1

    def string(self, i: int) -> int:
        m = _STRING.match(self.text, i)
        if m is None:
            raise _ScanError(f"expected a string at offset {i}")
        return m.end()

    def value(self, i: int) -> int:
        """The end of the value starting at ``i``."""
        c = self.char(i)
        if c == '"':
            return self.string(i)
        if c in ("[", "{"):
            depth = 0
            while True:
                m = _STRUCTURAL.search(self.text, i)
                if m is None:
                    raise _ScanError(f"unterminated {c!r}")
                i = m.start()
                if m.group() == '"':
                    i = self.string(i)
                    continue
                depth += 1 if m.group() in "[{" else -1
                i += 1
                if depth == 0:
                    return i
        m = _SCALAR.match(self.text, i)
        if m is None:
            raise _ScanError(f"expected a value at offset {i}")
        return m.end()

    def object(self, i: int) -> tuple[list[tuple[str, int, int]], int]:
        """(key, value start, value end) of each member of the object at ``i``, and the index
        of its closing brace."""
        i = self.ws(self.expect(i, "{"))
        members: list[tuple[str, int, int]] = []
        if self.char(i) == "}":
            return members, i
        while True:
            end = self.string(i)
            key = json.loads(self.text[i:end])
            i = self.ws(self.expect(self.ws(end), ":"))
            end = self.value(i)
            members.append((key, i, end))
            i = self.ws(end)
            if self.char(i) != ",":
                self.expect(i, "}")
                return members, i
            i = self.ws(i + 1)

    def array(self, i: int) -> tuple[list[tuple[int, int]], int]:
        """(start, end) of each element of the array at ``i``, and the index of its ``]``."""
        i = self.ws(self.expect(i, "["))
        elements: list[tuple[int, int]] = []
        if self.char(i) == "]":
            return elements, i
        while True:
            end = self.value(i)
            elements.append((i, end))
            i = self.ws(end)
            if self.char(i) != ",":
                self.expect(i, "]")
                return elements, i
            i = self.ws(i + 1)


@dataclass(frozen=True)
class Doc:
    """A parsed conflist and where its ``plugins`` array is in the text."""

    text: str
    data: dict[str, Any]
    open: int  # the index of the array's "["
    close: int  # the index of its "]"
    elements: tuple[tuple[int, int], ...]  # [start, end) of each element

    @property
    def plugins(self) -> list[Any]:
        return self.data["plugins"]


def parse(text: str, where: str | os.PathLike[str] = "<conflist>") -> Doc:
    """The conflist in ``text``; ConflistError naming ``where`` if it is not one we can edit."""
    try:
        data = json.loads(text)
    except Exception as e:  # JSONDecodeError, RecursionError, the int digit limit, MemoryError
        raise ConflistError(where, f"invalid JSON: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise ConflistError(where, f"is not a JSON object but {_kind(data)}")
    if "plugins" not in data:
        raise ConflistError(where, 'has no "plugins" array (a single-plugin .conf is not a '
                            "conflist)")
    if not isinstance(data["plugins"], list):
        raise ConflistError(where, f'"plugins" is {_kind(data["plugins"])}, not an array')
    try:
        return _locate(text, data)
    except Exception as e:  # _ScanError, or whatever a scanner bug raises: never a traceback
        raise ConflistError(where, f"cannot be edited byte-exactly: {_one_line(e)}") from None


def _locate(text: str, data: dict[str, Any]) -> Doc:
    scan = _Scanner(text)
    members, close = scan.object(scan.ws(0))
    if scan.ws(close + 1) != len(text):
        raise _ScanError(f"text after the top-level object at offset {close + 1}")
    keys = [key for key, _, _ in members]
    if keys.count("plugins") > 1:
        # json.loads takes the last; which one every runtime takes is not ours to guess.
        raise _ScanError(f'{keys.count("plugins")} top-level "plugins" keys')
    spans = {key: (start, end) for key, start, end in members}  # later keys win, as in json
    if list(spans) != list(data):
        raise _ScanError("the scanned keys disagree with json.loads")
    start, end = spans["plugins"]
    elements, close = scan.array(start)
    if close + 1 != end or len(elements) != len(data["plugins"]):
        raise _ScanError('the scanned "plugins" array disagrees with json.loads')
    for (s, e), plugin in zip(elements, data["plugins"], strict=True):
        if _canon(json.loads(text[s:e])) != _canon(plugin):
            raise _ScanError(f"the scanned plugin at offset {s} disagrees with json.loads")
    return Doc(text, data, start, close, tuple(elements))


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True)  # NaN == NaN here, unlike with ==


# -- the edits --------------------------------------------------------------------------------


def add_entry(text: str, desired: dict[str, Any],
              where: str | os.PathLike[str] = "<conflist>") -> tuple[str | None, str]:
    """``text`` with ``desired`` at the end of its plugins (or our entry there updated in
    place, a duplicate of it removed), and what was done; None for the text if nothing had to
    change."""
    doc = parse(text, where)
    ours = [i for i, p in enumerate(doc.plugins) if _is_ours(p)]
    n = len(doc.plugins)
    if not ours:
        new = _insert(doc, desired)
        _verify(new, doc, [*doc.plugins, desired], where)
        return new, f"added {PLUGIN_TYPE} as plugin {n + 1} of {n + 1}"
    k = ours[0]
    new = text
    for extra in reversed(ours[1:]):  # one entry is enough: a second would run us twice
        new = _remove(parse(new, where), extra)
    expected = [p for i, p in enumerate(doc.plugins) if i not in ours[1:]]
    done = [f"removed {len(ours) - 1} duplicate {PLUGIN_TYPE} entries"] if ours[1:] else []
    changed = [key for key in SETTINGS if doc.plugins[k].get(key) != desired.get(key)]
    if k == 0 and len(expected) > 1:
        # First in the chain it gets no prevResult and fails every ADD: no pod would start.
        new = _insert(parse(_remove(parse(new, where), 0), where), desired)
        expected = [*expected[1:], desired]
        done.insert(0, f"moved {PLUGIN_TYPE} from plugin 1 to plugin {len(expected)} of "
                    f"{len(expected)}: it must follow the plugin whose result it passes on")
    elif changed:
        new = _replace(parse(new, where), k, desired)
        expected[k] = desired
        done.insert(0, f"updated {PLUGIN_TYPE} (plugin {k + 1} of {len(expected)}): "
                    f"{', '.join(changed)} changed")
    if new == text:
        return None, f"unchanged: {PLUGIN_TYPE} is plugin {k + 1} of {n} with these settings"
    _verify(new, doc, expected, where)
    return new, "; ".join(done)


def remove_entry(text: str,
                 where: str | os.PathLike[str] = "<conflist>") -> tuple[str | None, str]:
    """``text`` without any kmesh-cni entry, and what was done; None if it has none."""
    doc = parse(text, where)
    ours = [i for i, p in enumerate(doc.plugins) if _is_ours(p)]
    if not ours:
        return None, f"no {PLUGIN_TYPE} entry"
    new = text
    for k in reversed(ours):
        new = _remove(parse(new, where), k)
    _verify(new, doc, [p for i, p in enumerate(doc.plugins) if i not in ours], where)
    n = len(doc.plugins)
    return new, f"removed {PLUGIN_TYPE} (plugin {', '.join(str(k + 1) for k in ours)} of {n})"


def _is_ours(plugin: Any) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def _verify(new: str, before: Doc, plugins: list[Any], where: str | os.PathLike[str]) -> None:
    """An edit must change the plugins exactly as meant and nothing else; else it is a bug,
    and nothing is written."""
    try:
        after = parse(new, where).data
    except ConflistError as e:
        raise CniInstallError(f"{where}: editing would make it unreadable ({e}): a bug in "
                              "kmesh-plugin; not changed") from None
    rest = {k: v for k, v in before.data.items() if k != "plugins"}
    if (_canon(after["plugins"]) != _canon(plugins)
            or _canon({k: v for k, v in after.items() if k != "plugins"}) != _canon(rest)):
        raise CniInstallError(f"{where}: the edit does not check out (a bug in kmesh-plugin); "
                              "not changed")


def _insert(doc: Doc, desired: dict[str, Any]) -> str:
    t, els = doc.text, doc.elements
    if not els:  # "plugins": [] (a runtime refuses it, but it is valid JSON)
        inner = t[doc.open + 1:doc.close]
        if "\n" not in inner:
            return t[:doc.open + 1] + _render(desired, None, "", _spaced(t), t) + t[doc.open + 1:]
        unit = _unit(t, None, "")
        base = _line_indent(t, doc.close) + unit
        lead = _newline(t) + base
        return t[:doc.open + 1] + lead + _render(desired, unit, base, True, t) + t[doc.open + 1:]
    last_s, last_e = els[-1]
    ref = t[last_s:last_e]
    if len(els) > 1:  # the whitespace after the comma between the last two entries
        between = t[els[-2][1]:last_s]
        sep = between[between.index(",") + 1:]
    else:
        sep = t[doc.open + 1:last_s]
        if not sep and _spaced(ref):
            sep = " "
    if "\n" in ref:
        base = sep.rsplit("\n", 1)[1] if "\n" in sep else _line_indent(t, last_e - 1)
        text = _render(desired, _unit(t, ref, _line_indent(t, last_s)), base, True, t)
    else:
        text = _render(desired, None, "", _spaced(ref), t)
    return t[:last_e] + "," + sep + text + t[last_e:]


def _replace(doc: Doc, k: int, desired: dict[str, Any]) -> str:
    t = doc.text
    s, e = doc.elements[k]
    rs, re_ = doc.elements[k - 1] if k else (s, e)  # the style of the entry before ours
    ref = t[rs:re_]
    if "\n" in ref:
        text = _render(desired, _unit(t, ref, _line_indent(t, rs)), _line_indent(t, s), True, t)
    else:
        text = _render(desired, None, "", _spaced(ref), t)
    return t[:s] + text + t[e:]


def _remove(doc: Doc, k: int) -> str:
    """Cut element ``k`` with the comma and whitespace that separate it: the exact inverse of
    _insert for the last element (and of the empty-array case for a sole one)."""
    t, els = doc.text, doc.elements
    s, e = els[k]
    if k:
        return t[:els[k - 1][1]] + t[e:]
    if len(els) > 1:
        return t[:s] + t[els[1][0]:]
    return t[:doc.open + 1] + t[e:]


def _render(desired: dict[str, Any], unit: str | None, base: str, spaced: bool,
            text: str) -> str:
    """Our entry on one line (unit None) or indented by ``unit`` under ``base``."""
    if unit is None:
        seps = (", ", ": ") if spaced else (",", ":")
        return json.dumps(desired, ensure_ascii=False, separators=seps)
    # json.dumps escapes a newline inside a string: every "\n" here is layout.
    return json.dumps(desired, ensure_ascii=False, indent=unit).replace(
        "\n", _newline(text) + base)


def _newline(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def _spaced(text: str) -> bool:
    return ": " in text or ", " in text


def _leading(line: str) -> str:
    return line[:len(line) - len(line.lstrip(" \t"))]


def _line_indent(text: str, pos: int) -> str:
    """The indentation of the line that holds ``pos``."""
    return _leading(text[text.rfind("\n", 0, pos) + 1:pos + 1])


def _unit(text: str, ref: str | None, base: str) -> str:
    """One level of indentation: what the reference entry's second line adds to its first,
    else the file's first indented line, else two spaces."""
    if ref is not None and "\n" in ref:
        lead = _leading(ref.split("\n", 2)[1])
        if lead.startswith(base) and len(lead) > len(base):
            return lead[len(base):]
    m = re.search(r"\n([ \t]+)\S", text)
    return m.group(1) if m else "  "


# -- files ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _File:
    shown: Path  # the path as configured: messages name it
    target: Path  # the regular file behind it (a symbolic link's target in the conf dir)
    st: os.stat_result
    text: str


def _read(path: Path, conf_dir: Path) -> _File:
    """The conflist at ``path``; every failure a ConflistError naming it."""
    try:
        link = stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        raise ConflistError(path, "file not found", raw=b"") from None
    except Exception as e:
        raise ConflistError(path, f"cannot stat: {_one_line(e)}") from None
    target = path
    if link:
        # A link into the conf dir (a ConfigMap's ..data/) is edited where it points, and stays
        # a link. One out of it points at a file that is not the CNI config's to change.
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(os.path.realpath(conf_dir)):
            raw = None
            with suppress(Exception):
                raw = read_regular_file(target, max_bytes=MAX_CONFLIST_BYTES)
            raise ConflistError(path, f"is a symbolic link to {target}, outside {conf_dir}",
                                raw=raw)
    try:
        st = os.stat(target)
        raw = read_regular_file(target, max_bytes=MAX_CONFLIST_BYTES)
    except (FileNotFoundError, MissingFile):
        raise ConflistError(path, "file not found" + (f" (a link to {target})" if link else ""),
                            raw=b"") from None
    except DecodeError as e:  # a directory, a FIFO, too large, unreadable
        raise ConflistError(path, e.problem) from None
    except Exception as e:
        raise ConflistError(path, f"cannot read: {_one_line(e)}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConflistError(path, f"not UTF-8: {e.reason} at byte {e.start}", raw=raw) from None
    try:
        parse(text, path)
    except ConflistError as e:
        e.raw = raw
        raise
    return _File(path, target, st, text)


class _Raced(Exception):
    """The file was replaced between our read and our rename."""


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _write_atomic(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None,
                  expect: os.stat_result | None = None) -> None:
    """Replace ``path`` by a file holding ``data``, by rename; raises _Raced (nothing written)
    if ``path`` no longer is the file ``expect`` describes."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if owner is not None and (os.fstat(fd).st_uid, os.fstat(fd).st_gid) != owner:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)  # after fchown, which clears set-id bits
            os.fsync(fd)
        finally:
            os.close(fd)
        if expect is not None:
            try:
                now = os.stat(path)
            except FileNotFoundError:
                raise _Raced from None
            if _stat_key(now) != _stat_key(expect):
                raise _Raced
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    with suppress(OSError):  # the rename itself survives a crash once the directory is synced
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


Edit = Callable[[str, Path], tuple[str | None, str]]


def _edit(path: Path, conf_dir: Path, edit: Edit) -> tuple[bool, str]:
    """Apply ``edit`` to the conflist at ``path``: (whether it was written, what was done)."""
    for _ in range(_ATTEMPTS):
        f = _read(path, conf_dir)
        new, message = edit(f.text, path)
        if new is None:
            return False, message
        try:
            _write_atomic(f.target, new.encode("utf-8"), stat.S_IMODE(f.st.st_mode),
                          (f.st.st_uid, f.st.st_gid), expect=f.st)
        except _Raced:
            continue
        except Exception as e:
            raise CniInstallError(f"{path}: cannot write {f.target}: {_one_line(e)}; "
                                  "not changed") from None
        return True, message
    raise CniInstallError(f"{path}: replaced by another writer {_ATTEMPTS} times while being "
                          "edited; not changed, try again")


# -- which file -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    path: Path
    reason: str
    runtime_first: Path | None  # what a runtime loads: the first *.conf, *.conflist, *.json


def _listing(cfg: Config) -> list[tuple[str, bool]] | None:
    """(name, is a directory) in the conf dir in sorted byte order, as Go sorts; None if the
    directory does not exist."""
    try:
        with os.scandir(cfg.cni_conf_dir) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    except FileNotFoundError:
        return None
    except Exception as e:
        raise ConfigError(cfg.path, "cni.conf_dir",
                          f"cannot list {cfg.cni_conf_dir}: {_one_line(e)}") from None
    return sorted(entries, key=lambda e: os.fsencode(e[0]))


def select(cfg: Config) -> Selection:
    """The conflist to edit: cni.conflist if set, else the first *.conflist in sorted order
    (libcni skips directories, so do we)."""
    d = cfg.cni_conf_dir
    try:
        entries = _listing(cfg)
    except ConfigError:
        if not cfg.cni_conflist:
            raise
        entries = None
    first = next((d / n for n, is_dir in entries or () if not is_dir
                  and n.endswith(RUNTIME_EXTENSIONS)), None)
    if cfg.cni_conflist:
        return Selection(d / cfg.cni_conflist, f"cni.conflist in {cfg.path}", first)
    if entries is None:
        raise ConfigError(cfg.path, "cni.conf_dir", f"{d} does not exist (is the primary CNI "
                          "installed? set cni.conf_dir to its directory)")
    lists = [n for n, is_dir in entries if not is_dir and n.endswith(".conflist")]
    if not lists:
        raise ConfigError(cfg.path, "cni.conf_dir", f"no *.conflist file in {d} (is the "
                          "primary CNI installed? or set cni.conflist)")
    why = f"the first *.conflist in {d} in sorted order (cni.conflist is not set)"
    return Selection(d / lists[0], why, first)


def _warnings(sel: Selection) -> list[str]:
    if sel.runtime_first is None or sel.runtime_first == sel.path:
        return []
    return [f"container runtimes load {sel.runtime_first} (the first *.conf, *.conflist or "
            f"*.json in sorted order), not {sel.path}: kmesh-cni does not run until that "
            "changes"]


# -- the launcher -----------------------------------------------------------------------------


def launcher_text(python: str | None = None) -> str:
    python = python if python is not None else sys.executable
    if not python or not os.path.isabs(python) or any(c.isspace() for c in python):
        raise CniInstallError(f"cannot write a launcher for the interpreter {python!r}: a #! "
                              "line needs an absolute path without spaces")
    if len(f"#!{python} -IS") > MAX_SHEBANG:
        raise CniInstallError(f"the interpreter path {python} is too long for a #! line")
    paths = _import_roots()
    return (
        f"#!{python} -IS\n"
        f"{LAUNCHER_MARKER}\n"
        "# Container runtimes exec CNI plugins from their bin dir with a bare environment, so\n"
        "# this runs the interpreter that `kmesh-plugin cni install` ran under: the node needs\n"
        "# that interpreter, with the kmesh-plugin wheel installed in it. -I: no PYTHON*\n"
        "# variables and not this directory on sys.path. -S: no site module; kmesh-cni runs\n"
        "# once per pod in the chain, and site (with its .pth files) costs ~15-20 ms of a\n"
        "# start-up, so the launcher names the directories kmesh_plugin and pyroute2 are\n"
        "# imported from, as found when it was installed (`cni install` again after moving them).\n"
        "import sys\n"
        f"sys.path[:0] = {paths!r}\n"
        "from kmesh_plugin.cni.main import main\n"
        "\n"
        "raise SystemExit(main())\n"
    )


def _import_roots() -> list[str]:
    """The sys.path entries kmesh-cni imports from: its own package's and pyroute2's."""
    import importlib.util

    roots: list[str] = []
    for name in ("kmesh_plugin", "pyroute2"):
        spec = importlib.util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec else []
        if not locations:
            raise CniInstallError(f"cannot find the {name} package for the kmesh-cni launcher")
        root = os.path.dirname(os.path.abspath(locations[0]))
        if root not in roots:
            roots.append(root)
    return roots


def launcher_path(cfg: Config) -> Path:
    return cfg.cni_bin_dir / LAUNCHER_NAME


def install_launcher(cfg: Config) -> tuple[bool, str]:
    path = launcher_path(cfg)
    data = launcher_text().encode()
    with suppress(Exception):
        st = os.lstat(path)
        if (stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
                and read_regular_file(path, max_bytes=len(data)) == data):
            return False, f"{path}: unchanged"
    try:
        cfg.cni_bin_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        _write_atomic(path, data, 0o755)
    except Exception as e:
        raise CniInstallError(f"{path}: cannot write the launcher: {_one_line(e)}") from None
    return True, f"{path}: installed (runs kmesh_plugin.cni.main under {sys.executable})"


def _remove_launcher(cfg: Config) -> list[str]:
    path = launcher_path(cfg)
    done = []
    for leftover in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
        with suppress(FileNotFoundError):
            leftover.unlink()
            done.append(f"removed {leftover}")
    try:
        data = read_regular_file(path, max_bytes=64 << 10)
    except MissingFile:
        return done
    except Exception as e:
        log.warning("%s left in place: %s", path, _one_line(e))
        return done
    if LAUNCHER_MARKER.encode() not in data:
        log.warning("%s left in place: not a launcher written by kmesh-plugin", path)
        return done
    try:
        path.unlink()
    except FileNotFoundError:
        return done
    except Exception as e:
        raise CniInstallError(f"{path}: cannot remove: {_one_line(e)}") from None
    return [*done, f"removed {path}"]


# -- install, uninstall, ensure ---------------------------------------------------------------


@dataclass
class Report:
    selection: Selection
    lines: list[str]  # what was chosen and what was done, one line each, for the operator
    changes: list[str] = field(default_factory=list)  # the lines of what was written
    warnings: list[str] = field(default_factory=list)


def install(cfg: Config) -> Report:
    """`kmesh-plugin cni install`: the launcher, then our entry (a runtime that sees the entry
    finds the executable). An invalid conflist fails before either is written."""
    sel = select(cfg)
    _read(sel.path, cfg.cni_conf_dir)
    report = Report(sel, [f"{sel.path}: chosen: {sel.reason}"], warnings=_warnings(sel))
    changed, line = install_launcher(cfg)
    report.lines.append(line)
    if changed:
        report.changes.append(line)
    desired = entry(cfg)
    changed, message = _edit(sel.path, cfg.cni_conf_dir,
                             lambda text, where: add_entry(text, desired, where))
    report.lines.append(f"{sel.path}: {message}")
    if changed:
        report.changes.append(report.lines[-1])
    return report


def remove_installed(cfg: Config) -> list[str]:
    """`kmesh-plugin cni uninstall` and `kmesh-plugin uninstall`: every kmesh-cni entry out of
    cni.conflist (if set) or of every *.conflist in cni.conf_dir, then the launcher and any
    temporary file of ours. Returns one line per change; [] when there was nothing to do (the
    conf dir or the files may be missing). A conflist that cannot be parsed is skipped when its
    bytes do not mention kmesh-cni (nothing of ours can be in it) and is a ConflistError (exit
    2, nothing removed from it) when they do; a failed write is a CniInstallError."""
    d = cfg.cni_conf_dir
    if cfg.cni_conflist:
        candidates = [d / cfg.cni_conflist] if os.path.lexists(d / cfg.cni_conflist) else []
    else:
        entries = _listing(cfg) or []
        candidates = [d / n for n, is_dir in entries if not is_dir and n.endswith(".conflist")]
    # Checked before anything is removed: an error leaves the node as it was.
    readable = []
    for path in candidates:
        try:
            _read(path, d)
        except ConflistError as e:
            if e.raw is not None and PLUGIN_TYPE.encode() not in e.raw:
                continue
            raise
        readable.append(path)
    done = []
    for path in readable:
        changed, message = _edit(path, d, remove_entry)
        if changed:
            done.append(f"{path}: {message}")
    for path in candidates:
        for leftover in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
            with suppress(FileNotFoundError):
                leftover.unlink()
                done.append(f"removed {leftover}")
    return done + _remove_launcher(cfg)


_memo: dict[tuple[str, ...], tuple[Any, str | None]] = {}
_memo_lock = threading.Lock()


def ensure_installed(cfg: Config) -> str | None:
    """Put our entry (and the launcher) back when they are missing or stale: for the agent's
    periodic check, in enrolment = "cni" mode.

    Returns None when nothing had to be done, else one line for the log (warning level suits
    every case): what was written ("<conflist>: added kmesh-cni as plugin 3 of 3", say, after
    the primary CNI rewrote its file), a file a runtime loads instead of ours, or why it could
    not be done ("kmesh-cni not ensured: <file>: invalid JSON: ... (not changed)"). Never
    raises: a vanished, unreadable or invalid conflist is such a line, and the file is left as
    it is.

    Cheap when nothing changed: a call stats the conf dir, the conflist it chose last and the
    launcher, and reads nothing if those are as the last call left them. So a problem is
    reported once, and again only after one of them changes (which is also when it can have
    been fixed). A change made in the instant between our write and the stat that follows it
    is noticed at the next change.
    """
    key = (str(cfg.cni_conf_dir), cfg.cni_conflist, str(cfg.cni_bin_dir), sys.executable,
           _canon(entry(cfg)))
    with _memo_lock:
        last = _memo.get(key)
        name = cfg.cni_conflist or (last[1] if last else None)
        before = _fingerprint(cfg, name)
        if last is not None and last[0] == before:
            return None
        picked = name
        try:
            report = install(cfg)
            picked = report.selection.path.name
            lines = report.changes + report.warnings
        except KmeshError as e:
            report = None
            lines = [f"{PLUGIN_TYPE} not ensured: {e}"]
        except Exception as e:  # a bug must not stop the agent
            report = None
            lines = [f"{PLUGIN_TYPE} not ensured: {type(e).__name__}: {_one_line(e)}"]
        unchanged = report is not None and not report.changes and picked == name
        _memo[key] = (before if unchanged else _fingerprint(cfg, picked), picked)
    return "; ".join(lines) or None


def _fingerprint(cfg: Config, name: str | None) -> tuple[Any, ...]:
    def one(path: Path, follow: bool) -> Any:
        try:
            st = os.stat(path) if follow else os.lstat(path)
        except Exception as e:
            return type(e).__name__
        return (*_stat_key(st), st.st_mode)

    # The directory's mtime moves when a file is added, removed or renamed into it: that
    # covers a new first *.conflist and an atomic rewrite of ours.
    parts = [one(cfg.cni_conf_dir, True), one(launcher_path(cfg), False)]
    if name:
        parts += [one(cfg.cni_conf_dir / name, False), one(cfg.cni_conf_dir / name, True)]
    return tuple(parts)


def _kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _one_line(e: BaseException, limit: int = 300) -> str:
    try:
        text = " ".join(str(e).split())
    except Exception:
        text = ""
    text = text or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."
