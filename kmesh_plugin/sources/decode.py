"""Where bytes become documents: the one bounded decoder every source goes through.

The manifest directory and the Kubernetes API source both read bytes someone else wrote. Any
of them may be hostile or broken, and none of it may kill the agent, hang its loop or blow up
its memory. So this module, and only it, turns bytes into JSON-like documents, and it
guarantees, for whatever input:

* it returns documents made only of dict (with string keys), list, str, int (within int64),
  float, bool and None, plus the scalar timestamps and binaries YAML has; nested at most
  ``MAX_DEPTH`` deep; with no cycles; whose *expanded* size (YAML aliases counted at every use)
  is linear in the input's size;
* or it raises ``DecodeError`` (a ``ManifestError``) that names ``where`` (the file, or the API
  object) and what is wrong, with the field's path when there is one.

Every exception the decoders raise is converted here, whatever its type: UnicodeDecodeError,
RecursionError, the ValueError of Python's int/str digit limit, yaml's errors, MemoryError. The
list of what third-party decoders can raise is not ours to keep up to date.
"""

from __future__ import annotations

import datetime
import json
import os
import stat
from typing import Any

import yaml
import yaml.events

from kmesh_plugin.errors import ManifestError

# A manifest file is at most 16 MiB: ten times the API server's largest object (etcd's default
# request limit is 1.5 MiB) and the size of a `kubectl get -A -o yaml` of a large cluster. The
# API source passes its own limits.
MAX_MANIFEST_BYTES = 16 << 20
# Kubernetes objects are shallow: an EndpointSlice is 5 levels deep, a Pod template with
# affinity rules about 15. 64 leaves room for any CRD-ish annotation payload and keeps every
# recursive walk over a document (ours, dataclass ==, repr, json.dumps) far from Python's
# recursion limit.
MAX_DEPTH = 64
# Everything a Kubernetes field can hold fits in int64 (int32 ports, int64 quantities in
# their integer form). Bigger ones are refused before anything converts or prints them.
INT_MIN = -(1 << 63)
INT_MAX = (1 << 63) - 1
# The digits (sign, base prefix and "_" included) an integer's text may have before it is
# converted at all: int64 needs 20 decimal digits or 66 binary ones. It stays far below Python's
# 4300-digit limit, so conversion never raises; longer ones are refused by the shape check.
MAX_INT_TEXT = 80
# Without aliases, JSON and YAML cannot hold more than about one node per byte ("[0,0]" has 3
# nodes in 5 bytes, "{a,b}" 5 in 5). Aliases may repeat a subtree at no cost in bytes: the
# expanded size of a file is allowed up to 2 nodes per byte plus this floor (so small files may
# reuse anchors freely), which keeps every walk over the documents linear in the input's size.
# A 324-byte alias bomb (nine anchors of nine aliases each) expands to 9^9 = 387 million
# nodes and is refused after counting a few hundred events.
NODE_FLOOR = 100_000
# One object of an API answer: an EndpointSlice holds at most 1000 endpoints (about 10,000
# nodes); a Node or Pod with every field set stays far below this.
MAX_PART_NODES = 1_000_000
# PyYAML composes a document into node objects of about 700 bytes each before we see it. One
# document may hold at most this many nodes (about 350 MB while composing; a typical YAML
# manifest has a node per 10 bytes, so a 5 MB single document). Files with more split into
# documents ("---"), which are composed one at a time, or use JSON.
MAX_YAML_DOCUMENT_NODES = 500_000
# A YAML file is counted event by event (constant memory, no composition) before it is loaded
# when it has anchors (aliases can only refer to anchors) or is big enough that one document in
# it could exceed MAX_YAML_DOCUMENT_NODES. Everything else, the common small manifest, skips
# that extra pass: its size already bounds it.
YAML_PRESCAN_BYTES = MAX_YAML_DOCUMENT_NODES // 2

_SCALARS = (str, int, float, bool, type(None), bytes, datetime.date)  # date covers datetime


class DecodeError(ManifestError):
    """``where`` could not be read or decoded: ``problem`` says why (one line)."""

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}" if where else problem)


class MissingFile(DecodeError):
    """There is no file at the path (it was deleted, or a directory on the way is gone)."""


# -- files ----------------------------------------------------------------------------------


def read_regular_file(path: str | os.PathLike[str], *, max_bytes: int) -> bytes:
    """The content of ``path``, which must be a regular file of at most ``max_bytes``.

    O_NONBLOCK: opening a FIFO (or a tty, or some devices) blocks until a writer appears; with
    it, open() returns at once, fstat() tells what we opened and anything but a regular file is
    refused before a read. O_NOFOLLOW is *not* used: a ConfigMap mounted as the manifest
    directory (or plugin.toml) is a tree of symlinks (app.yaml -> ..data/app.yaml), and what
    counts is what the link points at, which fstat of the opened fd checks. Whoever can write
    the directory already decides what the agent programs, so following a link gives nothing
    away. The size is checked on the open fd, before reading; at most ``max_bytes`` + 1 bytes
    are read, so a file that grows after the check is refused too.
    """
    where = os.fspath(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise MissingFile(where, "file not found") from None
    except OSError as e:
        raise DecodeError(where, _open_problem(path, e)) from None
    except Exception as e:  # a NUL in the path is a ValueError
        raise DecodeError(where, f"cannot open: {_one_line(e)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DecodeError(where, f"is {_file_kind(st.st_mode)}, not a regular file")
        if st.st_size > max_bytes:
            raise DecodeError(where, _too_big(st.st_size, max_bytes))
        chunks = []
        total = 0
        # One read of size + 1 covers the common case: a short read of a regular file means
        # end of file. Files that report size 0 (procfs) are read in 64 KiB steps.
        want = st.st_size + 1 if st.st_size else 1 << 16
        while True:
            chunk = os.read(fd, min(want, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise DecodeError(where, f"grew past the limit of {max_bytes} bytes while read")
            if len(chunk) < want:
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except DecodeError:
        raise
    except Exception as e:  # EIO, EISDIR on odd filesystems, MemoryError, ...
        raise DecodeError(where, f"cannot read: {_one_line(e)}") from None
    finally:
        os.close(fd)


def _open_problem(path: str | os.PathLike[str], e: OSError) -> str:
    # open() of a socket fails with ENXIO, which says nothing useful: name the file type.
    try:
        mode = os.stat(path).st_mode
    except Exception:
        mode = 0
    if mode and not stat.S_ISREG(mode):
        return f"is {_file_kind(mode)}, not a regular file"
    return f"cannot open: {e.strerror or _one_line(e)}"


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _too_big(size: int, limit: int) -> str:
    return f"{size} bytes is more than the limit of {limit} bytes"


# -- documents --------------------------------------------------------------------------------


def load_json(data: bytes, where: str, *, max_bytes: int) -> Any:
    """One JSON document from UTF-8 ``data``, shape-checked."""
    if len(data) > max_bytes:
        raise DecodeError(where, _too_big(len(data), max_bytes))
    try:
        text = data.decode("utf-8")
    except Exception as e:
        raise DecodeError(where, _not_utf8(e)) from None
    marked = False
    try:
        try:
            doc = _JSON.decode(text)
        except _IntOutOfRange:
            # Rare: decode again, keeping a marker where the integer was, so that the shape
            # check below can name its field.
            doc = _JSON_MARKING.decode(text)
            marked = True
    except Exception as e:
        raise DecodeError(where, f"invalid JSON: {_one_line(e)}") from None
    # The JSON decoder never shares a container between two places, its keys are strings and
    # its integers were range-checked as they were read: only the depth is left to check, in
    # one quick pass over the containers. The walk that names the culprit runs when that pass
    # fails, or when an integer was out of range.
    if marked or type(doc) not in (dict, list):
        _check(doc, where, _node_budget(len(data)), shared=False)
    else:
        try:
            _json_depth_ok(doc, 0)
        except Exception:
            _check(doc, where, _node_budget(len(data)), shared=False)
            raise DecodeError(where, "cannot check its shape") from None  # not reached
    return doc


def load_json_parts(data: bytes, where: str, *, max_bytes: int) -> tuple[Any, bool]:
    """A JSON document made of independent parts (an API list of objects, a watch event),
    where one bad object must not cost the others.

    Returns ``(doc, suspect)``. Size, UTF-8 and syntax bound the whole document as in
    :func:`load_json`; an out-of-range integer is kept as a marker instead, and an object nested
    too deep is left in place. ``suspect`` says that at least one such problem is somewhere:
    then every part must go through :func:`check_part`, which names it. Nothing else is
    walked, so the common case costs one decode and one pass over the containers.
    """
    if len(data) > max_bytes:
        raise DecodeError(where, _too_big(len(data), max_bytes))
    try:
        text = data.decode("utf-8")
    except Exception as e:
        raise DecodeError(where, _not_utf8(e)) from None
    suspect = False
    try:
        try:
            doc = _JSON.decode(text)
        except _IntOutOfRange:
            doc = _JSON_MARKING.decode(text)
            suspect = True
    except Exception as e:
        raise DecodeError(where, f"invalid JSON: {_one_line(e)}") from None
    if not suspect and type(doc) in (dict, list):
        try:
            # A part sits two levels below the top (items[i], or event.object).
            _json_depth_ok(doc, -2)
        except Exception:
            suspect = True
    return doc, suspect


def check_part(value: Any, where: str) -> None:
    """One part of a :func:`load_json_parts` document: DecodeError naming the field of an
    out-of-range integer, a nesting deeper than MAX_DEPTH, or a non-JSON value."""
    _check(value, where, NODE_FLOOR + MAX_PART_NODES, shared=False)


def load_yaml_documents(data: bytes, where: str, *, max_bytes: int) -> list[Any]:
    """Every document of UTF-8 YAML ``data`` ("---" separated), shape-checked. Empty
    documents are None, as PyYAML gives them."""
    if len(data) > max_bytes:
        raise DecodeError(where, _too_big(len(data), max_bytes))
    try:
        text = data.decode("utf-8")
    except Exception as e:
        raise DecodeError(where, _not_utf8(e)) from None
    budget = _node_budget(len(data))
    # Without an anchor there is no alias, and the constructor shares no container: the tree
    # walk suffices. With one, the prescan bounds the expansion and the walk memoises.
    anchors = b"&" in data
    try:
        if anchors or len(data) > YAML_PRESCAN_BYTES:
            _prescan_yaml(text, budget)
        try:
            docs = list(yaml.load_all(text, Loader=_BASE_LOADER))
        except ValueError:
            # Python's int digit limit (a 5000-digit integer), or another value error: load
            # again with integers bounded as they are read, so that the walk below can name
            # the field. Rare, so the common path keeps the plain loader's speed.
            docs = list(yaml.load_all(text, Loader=_YamlLoader))
    except _ShapeError as e:
        raise DecodeError(where, e.describe("")) from None
    except Exception as e:
        raise DecodeError(where, f"invalid YAML: {_one_line(e)}") from None
    for i, doc in enumerate(docs):
        budget -= _check(doc, where, budget, shared=anchors,
                         document=i + 1 if len(docs) > 1 else None)
    return docs


def check_shape(value: Any, where: str, *, max_nodes: int) -> int:
    """Check a JSON-like ``value`` that did not come through this module (a value a parser
    keeps raw, say) against the same bounds; returns its expanded node count."""
    return _check(value, where, max_nodes, shared=True)


def _node_budget(size: int) -> int:
    return 2 * size + NODE_FLOOR


def _not_utf8(e: Exception) -> str:
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8: {e.reason} at byte {e.start}"
    return f"not UTF-8: {_one_line(e)}"


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one bounded line: yaml's messages span lines, MemoryError has none."""
    try:
        text = " ".join(str(e).split())
    except Exception:
        text = ""
    text = text or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# -- YAML -------------------------------------------------------------------------------------


class _Oversized:
    """An integer whose text is too long to convert; the shape check names where it is."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits


class _IntOutOfRange(Exception):
    pass


def _int_in_range(text: str) -> int:
    if len(text) <= 18:  # the common case: 18 digits always fit
        return int(text)
    value = int(text) if len(text) <= MAX_INT_TEXT else None
    if value is None or not INT_MIN <= value <= INT_MAX:
        raise _IntOutOfRange
    return value


def _int_or_marker(text: str) -> int | _Oversized:
    try:
        return _int_in_range(text)
    except _IntOutOfRange:
        return _Oversized(len(text))


# One decoder each, made once: json.loads with a hook builds a new decoder on every call.
_JSON = json.JSONDecoder(parse_int=_int_in_range)
_JSON_MARKING = json.JSONDecoder(parse_int=_int_or_marker)


class _TooDeep(Exception):
    pass


def _json_depth_ok(node: Any, depth: int) -> None:
    """The quick pass over a decoded JSON document: containers only."""
    if depth >= MAX_DEPTH:
        raise _TooDeep
    for value in node.values() if type(node) is dict else node:
        t = type(value)
        if t is dict or t is list:
            _json_depth_ok(value, depth + 1)


# libyaml's parser when PyYAML was built with it (about 10x faster); same safe semantics.
_BASE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _YamlLoader(_BASE_LOADER):  # type: ignore[misc]
    """The safe loader, with integers bounded before they are converted (a marker instead of
    Python's ValueError for a 5000-digit one)."""


def _yaml_int(loader: Any, node: yaml.ScalarNode) -> int | _Oversized:
    if len(node.value) > MAX_INT_TEXT:
        return _Oversized(len(node.value))
    return yaml.constructor.SafeConstructor.construct_yaml_int(loader, node)  # type: ignore[no-any-return]


_YamlLoader.add_constructor("tag:yaml.org,2002:int", _yaml_int)

_EV = yaml.events


def _prescan_yaml(text: str, budget: int) -> None:
    """Count the nodes of every document, aliases expanded, from the event stream (constant
    memory, linear time), before anything is composed: refuses alias bombs, recursive aliases,
    documents too big to compose and nesting deeper than MAX_DEPTH."""
    loader = _YamlLoader(text)
    event: Any = None
    try:
        total = 0
        document_nodes = 0
        sizes: dict[str, int] = {}  # anchor -> expanded nodes of its subtree
        open_: list[tuple[str | None, int]] = []  # (anchor, total at its start) per level
        open_anchors: set[str] = set()
        while loader.check_event():
            event = loader.get_event()
            kind = type(event)
            if kind is _EV.ScalarEvent:
                total += 1
                document_nodes += 1
                if event.anchor is not None:
                    sizes[event.anchor] = 1
            elif kind is _EV.SequenceStartEvent or kind is _EV.MappingStartEvent:
                if len(open_) >= MAX_DEPTH:
                    raise _ShapeError(f"nested deeper than {MAX_DEPTH} levels")
                open_.append((event.anchor, total))
                if event.anchor is not None:
                    open_anchors.add(event.anchor)
                total += 1
                document_nodes += 1
            elif kind is _EV.SequenceEndEvent or kind is _EV.MappingEndEvent:
                anchor, start = open_.pop()
                if anchor is not None:
                    sizes[anchor] = total - start
                    open_anchors.discard(anchor)
            elif kind is _EV.AliasEvent:
                if event.anchor in open_anchors:
                    raise _ShapeError(f"recursive alias *{_short(event.anchor)} refers to the "
                                      "node that contains it")
                total += sizes.get(event.anchor, 1)  # an unknown anchor: the loader says so
            elif kind is _EV.DocumentStartEvent:
                document_nodes = 0
                sizes.clear()  # anchors are per document
            if total > budget:
                raise _ShapeError(
                    f"aliases expand to more than {budget} nodes, the limit for a file of "
                    "this size"
                )
            if document_nodes > MAX_YAML_DOCUMENT_NODES:
                raise _ShapeError(f"a document has more than {MAX_YAML_DOCUMENT_NODES} nodes; "
                                  "split it into documents ('---') or use JSON")
    except _ShapeError as e:
        mark = getattr(event, "start_mark", None)
        if mark is not None:
            e.path.append(f"line {mark.line + 1}")
        raise
    finally:
        loader.dispose()


# -- the shape check --------------------------------------------------------------------------


class _ShapeError(Exception):
    """Raised at the offending node; each enclosing level adds its key on the way out."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path: list[str] = []  # innermost first

    def at(self, key: Any) -> _ShapeError:
        self.path.append(f"[{key}]" if isinstance(key, int) else _key_text(key))
        return self

    def describe(self, prefix: str) -> str:
        path = self.path[::-1]
        if len(path) > 12:  # 64 levels of "[0]" say no more than a dozen do
            path = [*path[:6], "[...]", *path[-5:]]
        parts = "".join(path).lstrip(".")
        where = ": ".join(p for p in (prefix, parts) if p)
        return f"{where}: {self.problem}" if where else self.problem


def _key_text(key: Any) -> str:
    text = _short(key)
    return f".{text}" if text.replace("_", "a").replace("-", "a").isalnum() else f"[{text!r}]"


def _short(value: Any, limit: int = 64) -> str:
    """Bounded text for a key or anchor: never the repr of a huge or deep value."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "..."
    if value is None or (type(value) in (int, bool, float) and -(10**18) < value < 10**18):
        return f"{value!r} (a {type(value).__name__})"
    return f"of type {type(value).__name__}"


def _check(value: Any, where: str, budget: int, *, shared: bool,
           document: int | None = None) -> int:
    """The expanded node count of ``value``, or DecodeError naming where the problem is."""
    try:
        count = _walk_graph(value, 0, {})[0] if shared else _walk_tree(value, 0)
        if count > budget:
            raise _ShapeError(f"expands to {count} nodes, more than the limit of {budget}")
        return count
    except _ShapeError as e:
        raise DecodeError(where, e.describe(f"document {document}" if document else "")) from None
    except Exception as e:  # cannot happen by design; the boundary stays closed regardless
        raise DecodeError(where, f"cannot check: {_one_line(e)}") from None


def _scalar_problem(value: Any) -> str | None:
    """Why a non-container leaf is not allowed, or None if it is fine."""
    if type(value) is int:
        if INT_MIN <= value <= INT_MAX:
            return None
        return f"integer of {value.bit_length()} bits is out of range (more than int64)"
    if isinstance(value, _Oversized):
        return f"integer of {value.digits} digits is out of range (more than int64)"
    if isinstance(value, _SCALARS):
        if isinstance(value, int) and not isinstance(value, bool):  # an int subclass
            return _scalar_problem(int(value))
        return None
    return f"a {type(value).__name__} is not a JSON value"


def _walk_tree(node: Any, depth: int) -> int:
    """Node count of a tree (no shared containers): the fast path for JSON."""
    if depth >= MAX_DEPTH:
        raise _ShapeError(f"nested deeper than {MAX_DEPTH} levels")
    count = 1
    if type(node) is dict:
        for key, value in node.items():
            if type(key) is not str:
                raise _ShapeError(f"key {_short(key)} is not a string")
            t = type(value)
            if t is str or t is bool or t is float or value is None:
                count += 1
            elif t is dict or t is list:
                try:
                    count += _walk_tree(value, depth + 1)
                except _ShapeError as e:
                    raise e.at(key) from None
            elif t is int and INT_MIN <= value <= INT_MAX:
                count += 1
            else:
                problem = _scalar_problem(value)
                if problem:
                    raise _ShapeError(problem).at(key)
                count += 1
    elif type(node) is list:
        for i, value in enumerate(node):
            t = type(value)
            if t is str or t is bool or t is float or value is None:
                count += 1
            elif t is dict or t is list:
                try:
                    count += _walk_tree(value, depth + 1)
                except _ShapeError as e:
                    raise e.at(i) from None
            elif t is int and INT_MIN <= value <= INT_MAX:
                count += 1
            else:
                problem = _scalar_problem(value)
                if problem:
                    raise _ShapeError(problem).at(i)
                count += 1
    else:
        problem = _scalar_problem(node)
        if problem:
            raise _ShapeError(problem)
    return count


def _walk_graph(node: Any, depth: int, memo: dict[int, tuple[int, int] | None]
                ) -> tuple[int, int]:
    """(expanded node count, height) of a value whose containers may be shared (YAML
    aliases) or even cyclic. Each container is walked once (memoised by identity), so the
    time is linear in the *unexpanded* size however often an alias repeats it."""
    if isinstance(node, dict | list):
        key = id(node)
        if key in memo:
            found = memo[key]
            if found is None:
                raise _ShapeError("a recursive alias makes the value contain itself")
            if depth + found[1] > MAX_DEPTH:
                raise _ShapeError(f"nested deeper than {MAX_DEPTH} levels (through an alias)")
            return found
        if depth >= MAX_DEPTH:
            raise _ShapeError(f"nested deeper than {MAX_DEPTH} levels")
        memo[key] = None  # in progress: meeting it again below is a cycle
        count, height = 1, 1
        is_dict = isinstance(node, dict)
        items: Any = node.items() if is_dict else enumerate(node)
        for k, value in items:
            if is_dict and type(k) is not str:
                raise _ShapeError(f"key {_short(k)} is not a string")
            try:
                n, h = _walk_graph(value, depth + 1, memo)
            except _ShapeError as e:
                raise e.at(k) from None
            count += n
            height = max(height, h + 1)
        memo[key] = (count, height)
        return count, height
    problem = _scalar_problem(node)
    if problem:
        raise _ShapeError(problem)
    return 1, 0
