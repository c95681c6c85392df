"""A cluster source that watches a directory of Kubernetes YAML.

Every ``*.yaml``, ``*.yml`` or ``*.json`` file in the directory may hold several documents
(``---``) and ``kind: List`` wrappers, shaped as the API server returns objects. Node, Namespace,
Service and EndpointSlice objects are read; other kinds are ignored. The union over all files
is the cluster.

A file that cannot be used, whatever the reason (it does not parse, is not UTF-8, is too
large, is a FIFO or a directory named ``*.yaml``, holds an alias bomb, ...) is reported with its
name and the problem, and its *previous* content stays in effect: a half-written or broken file
changes nothing. Write files atomically (write elsewhere, then rename into the directory) to
avoid that window entirely. Files are read only through :mod:`kmesh_plugin.sources.decode`:
regular files only, opened without blocking, refused by their size before they are read.

If the directory holds a file named ``.revision``, its text is reported with each batch: a
writer that updates ``.revision`` after its manifests learns from the agent's status when the
agent has applied them (the lab waits on exactly that). A ``.revision`` that cannot be read
(not UTF-8, too large, not a regular file) is reported and the last good revision stays.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmesh_plugin import gcpause
from kmesh_plugin.errors import KmeshError, ManifestError
from kmesh_plugin.model.objects import KINDS, KubeObject, ObjectKey, object_key, parse
from kmesh_plugin.sources.base import Batch, Event, Source
from kmesh_plugin.sources.decode import (
    MAX_MANIFEST_BYTES,
    MissingFile,
    load_json,
    load_yaml_documents,
    read_regular_file,
)
from kmesh_plugin.sources.inotify import IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, Inotify

log = logging.getLogger(__name__)

REVISION_FILE = ".revision"
# A revision is a short token (a counter, a commit id): 4 KiB is plenty, and bounds what a
# broken .revision can put into every batch and status file.
MAX_REVISION_BYTES = 4096
SUFFIXES = (".yaml", ".yml", ".json")
# kubelet's atomic writer (ConfigMap and Secret volumes): app.yaml -> ..data/app.yaml, and an
# update renames a new ..data symlink over the old one.
CONFIGMAP_SWAP = "..data"


@dataclass
class _File:
    # A digest of the content: inode, size and mtime can all stay the same across an in-place
    # rewrite (same length, within one timestamp tick), and a missed change is a stale map.
    signature: bytes
    objects: dict[ObjectKey, KubeObject]


class ManifestSource(Source):
    kind = "manifests"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, _File] = {}
        self._view: dict[ObjectKey, KubeObject] = {}
        self._defs: dict[ObjectKey, dict[str, KubeObject]] = {}  # key -> file -> object
        self._inotify: Inotify | None = None
        self._synced = False
        self.revision: str | None = None
        self.errors: dict[str, str] = {}  # file -> current problem

    def check(self) -> None:
        if not self.directory.is_dir():
            raise KmeshError(f"manifest directory {self.directory} does not exist")

    def start(self) -> None:
        self.check()
        self._inotify = Inotify()
        # Watch before the first scan, so nothing written in between is missed.
        self._inotify.watch(self.directory)

    def next_batch(self, timeout: float) -> Batch | None:
        if not self._synced:
            self._synced = True
            # The full scan covers whatever was written since start(): drop those events, or
            # the next call wakes at once for changes this scan has already seen.
            if self._inotify is not None:
                self._inotify.wait(0)
            return self._scan(None)
        assert self._inotify is not None, "start() first"
        events = self._inotify.wait(timeout)
        if not events:
            return None
        if any(mask & (IN_Q_OVERFLOW | IN_DELETE_SELF | IN_MOVE_SELF) for mask, _ in events):
            return self._scan(None)  # the kernel dropped events: read everything again
        names = {name for _, name in events}
        if CONFIGMAP_SWAP in names:
            # A ConfigMap volume publishes a new version by swapping the ..data symlink that
            # every file links through: the files changed without an event of their own.
            return self._scan(None)
        # Only the files named by the events: a change costs the same with 10 or 20,000 files.
        return self._scan(names)

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "path": str(self.directory),
            "synced": self._synced,
            "objects": len(self._view),
            "errors": dict(self.errors),
        }

    # -- scanning ---------------------------------------------------------------------------

    def _scan(self, names: set[str] | None) -> Batch:
        with gcpause.paused():  # decoding and parsing thousands of files: see gcpause
            return self._scan_files(names)

    def _scan_files(self, names: set[str] | None) -> Batch:
        """Re-read ``names`` (every file when None) and return what changed in the view."""
        # The revision first: the manifests read after it are at least that new.
        batch = Batch(synced=True)
        revision = batch.revision = self._read_revision(batch)
        if names is None:
            # Every entry with a manifest's name, whatever its type: a FIFO or a directory
            # named *.yaml is reported (by the read below), not silently skipped.
            with os.scandir(self.directory) as entries:
                present = {e.name for e in entries if _is_manifest(e.name)}
            names = present | set(self._files)
        touched: dict[ObjectKey, None] = {}  # ordered: events come in file order
        for name in sorted(n for n in names if _is_manifest(n)):
            touched.update(dict.fromkeys(self._refresh(name, batch)))
        for key in touched:
            self._reconcile_key(key, batch)
        self.revision = revision
        return batch

    def _refresh(self, name: str, batch: Batch) -> list[ObjectKey]:
        """Re-read one file; returns the keys it defined before or defines now."""
        path = self.directory / name
        known = self._files.get(name)
        before = list(known.objects) if known else []
        signature = b""
        try:
            data = read_regular_file(path, max_bytes=MAX_MANIFEST_BYTES)
            signature = hashlib.sha256(data).digest()
            if known is not None and known.signature == signature:
                return []
            objects = self._parse_file(path, data)
        except MissingFile:
            self._files.pop(name, None)
            self.errors.pop(name, None)
            self._forget(name, before)
            return before
        except Exception as e:
            # ManifestError names the file; anything else would be our bug, and must not cost
            # the other files their update nor the agent its loop: reported the same way.
            message = str(e) if isinstance(e, ManifestError) else (
                f"{path}: cannot be read: {type(e).__name__}: {e}")
            if self.errors.get(name) != message:
                log.error("manifest rejected, keeping its last good content: %s", message,
                          extra={"file": str(path)})
            self.errors[name] = message
            batch.errors.append(message)
            if known is not None:
                known.signature = signature  # don't re-read until it changes again
            else:
                self._files[name] = _File(signature, {})
            return []
        self.errors.pop(name, None)
        self._files[name] = _File(signature, objects)
        self._forget(name, [k for k in before if k not in objects])
        for key, obj in objects.items():
            self._defs.setdefault(key, {})[name] = obj
        had = set(before)
        return [*before, *(k for k in objects if k not in had)]

    def _forget(self, name: str, keys: list[ObjectKey]) -> None:
        for key in keys:
            files = self._defs.get(key)
            if files is not None:
                files.pop(name, None)
                if not files:
                    del self._defs[key]

    def _reconcile_key(self, key: ObjectKey, batch: Batch) -> None:
        """The first file (by name) that defines ``key`` wins; report a change of the winner."""
        files = self._defs.get(key)
        if not files:
            if self._view.pop(key, None) is not None:
                batch.events.append(Event(key, None))
            return
        ordered = sorted(files)
        if len(ordered) > 1:
            message = f"{key} is defined in both {ordered[0]} and {ordered[1]}; using {ordered[0]}"
            batch.errors.append(message)
            log.warning(message)
        obj = files[ordered[0]]
        if self._view.get(key) != obj:
            self._view[key] = obj
            batch.events.append(Event(key, obj))

    def _read_revision(self, batch: Batch) -> str | None:
        """The text of .revision; None if there is none. One that cannot be read is reported
        and the last good revision stays: the manifests are still at least that new."""
        path = self.directory / REVISION_FILE
        try:
            data = read_regular_file(path, max_bytes=MAX_REVISION_BYTES)
            revision = data.decode("utf-8").strip()
        except MissingFile:
            self.errors.pop(REVISION_FILE, None)
            return None
        except Exception as e:
            message = str(e) if isinstance(e, ManifestError) else (
                f"{path}: not UTF-8: {e.reason} at byte {e.start}"
                if isinstance(e, UnicodeDecodeError)
                else f"{path}: cannot be read: {type(e).__name__}: {e}")
            if self.errors.get(REVISION_FILE) != message:
                log.error("revision file ignored, keeping revision %s: %s", self.revision,
                          message, extra={"file": str(path)})
            self.errors[REVISION_FILE] = message
            batch.errors.append(message)
            return self.revision
        self.errors.pop(REVISION_FILE, None)
        return revision

    def _parse_file(self, path: Path, data: bytes) -> dict[ObjectKey, KubeObject]:
        where = str(path)
        if path.suffix == ".json":
            docs = [load_json(data, where, max_bytes=MAX_MANIFEST_BYTES)]
        else:
            docs = load_yaml_documents(data, where, max_bytes=MAX_MANIFEST_BYTES)
        objects: dict[ObjectKey, KubeObject] = {}
        for raw in _flatten(docs, where):
            key = object_key(raw, where)
            if key.kind not in KINDS:
                continue
            if key in objects:
                raise ManifestError(f"{path}: {key} appears twice")
            objects[key] = parse(raw, where)
        return objects


def _is_manifest(name: str) -> bool:
    return not name.startswith(".") and name.endswith(SUFFIXES)


def _flatten(docs: list[Any], where: str) -> list[dict[str, Any]]:
    """The objects of ``docs``, List wrappers unpacked."""
    out: list[dict[str, Any]] = []
    for i, doc in enumerate(docs):
        _unpack(doc, where, f"document {i + 1}", out)
    return out


def _unpack(doc: Any, where: str, at: str, out: list[dict[str, Any]]) -> None:
    # Recursion through nested Lists is bounded: decode refuses documents deeper than 64.
    if doc is None:
        return
    if type(doc) is not dict:
        raise ManifestError(f"{where}: {at} is not a mapping")
    kind = doc.get("kind")
    items = doc.get("items")
    if kind == "List" or (type(kind) is str and kind.endswith("List") and type(items) is list):
        if items is None:
            return
        if type(items) is not list:
            raise ManifestError(f"{where}: {at}: items: must be a list")
        for j, item in enumerate(items):
            _unpack(item, where, f"{at}: items[{j}]", out)
    else:
        out.append(doc)
