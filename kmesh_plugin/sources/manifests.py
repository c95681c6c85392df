"""A cluster source that watches a directory of Kubernetes YAML.

Every ``*.yaml``, ``*.yml`` or ``*.json`` file in the directory may hold several documents
(``---``) and ``kind: List`` wrappers, shaped as the API server returns objects. Node, Namespace,
Service and EndpointSlice objects are read; other kinds are ignored. The union over all files
is the cluster.

A file that does not parse is reported with its name and the problem, and its *previous*
content stays in effect: a half-written or broken file changes nothing. Write files
atomically (write elsewhere, then rename into the directory) to avoid that window entirely.

If the directory holds a file named ``.revision``, its text is reported with each batch: a
writer that updates ``.revision`` after its manifests learns from the agent's status when the
agent has applied them (the lab waits on exactly that).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kmesh_plugin.errors import KmeshError, ManifestError
from kmesh_plugin.model.objects import KINDS, KubeObject, ObjectKey, object_key, parse
from kmesh_plugin.sources.base import Batch, Event, Source
from kmesh_plugin.sources.inotify import IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, Inotify

log = logging.getLogger(__name__)

REVISION_FILE = ".revision"
# libyaml's parser when PyYAML was built with it (about 10x faster); same safe semantics.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SUFFIXES = (".yaml", ".yml", ".json")


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

    def start(self) -> None:
        if not self.directory.is_dir():
            raise KmeshError(f"manifest directory {self.directory} does not exist")
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
        # Only the files named by the events: a change costs the same with 10 or 20,000 files.
        return self._scan({name for _, name in events})

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
        """Re-read ``names`` (every file when None) and return what changed in the view."""
        # The revision first: the manifests read after it are at least that new.
        revision = self._read_revision()
        batch = Batch(synced=True, revision=revision)
        if names is None:
            present = {
                e.name for e in os.scandir(self.directory)
                if _is_manifest(e.name) and e.is_file()
            }
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
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._files.pop(name, None)
            self.errors.pop(name, None)
            self._forget(name, before)
            return before
        except OSError as e:
            data = None
            failure: Exception | None = e
        signature = hashlib.sha256(data).digest() if data is not None else b""
        if known is not None and data is not None and known.signature == signature:
            return []
        objects = None
        if data is not None:
            try:
                objects = self._parse_file(path, data)
                failure = None
            except (ManifestError, UnicodeDecodeError, yaml.YAMLError,
                    json.JSONDecodeError) as e:
                failure = e
        if objects is None:
            message = f"{path}: {_describe_error(failure or OSError('unreadable'))}"
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

    def _read_revision(self) -> str | None:
        try:
            return (self.directory / REVISION_FILE).read_text().strip()
        except FileNotFoundError:
            return None

    def _parse_file(self, path: Path, data: bytes) -> dict[ObjectKey, KubeObject]:
        text = data.decode("utf-8")
        if path.suffix == ".json":
            docs = [json.loads(text)]
        else:
            docs = list(yaml.load_all(text, Loader=_YAML_LOADER))
        objects: dict[ObjectKey, KubeObject] = {}
        for raw in _flatten(docs, path):
            key = object_key(raw, str(path))
            if key.kind not in KINDS:
                continue
            if key in objects:
                raise ManifestError(f"{path}: {key} appears twice")
            objects[key] = parse(raw, str(path))
        return objects


def _is_manifest(name: str) -> bool:
    return not name.startswith(".") and name.endswith(SUFFIXES)


def _flatten(docs: list[Any], path: Path) -> list[dict[str, Any]]:
    out = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ManifestError(f"{path}: document {i + 1} is not a mapping")
        if doc.get("kind") == "List" or (
            str(doc.get("kind", "")).endswith("List") and isinstance(doc.get("items"), list)
        ):
            out.extend(_flatten(doc.get("items") or [], path))
        else:
            out.append(doc)
    return out


def _describe_error(e: Exception) -> str:
    if isinstance(e, ManifestError):
        # Already prefixed with the file; keep the part after it.
        text = str(e)
        return text.split(": ", 1)[1] if ": " in text else text
    if isinstance(e, yaml.YAMLError):
        return f"invalid YAML: {e}".replace("\n", " ")
    return str(e)
