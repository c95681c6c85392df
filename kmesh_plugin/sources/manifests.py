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
from kmesh_plugin.sources.inotify import Inotify

log = logging.getLogger(__name__)

REVISION_FILE = ".revision"
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
            return self._scan(synced=True)
        assert self._inotify is not None, "start() first"
        if not self._inotify.wait(timeout):
            return None
        return self._scan(synced=True)

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

    def _scan(self, synced: bool) -> Batch:
        # The revision first: the manifests read after it are at least that new.
        revision = self._read_revision()
        batch = Batch(synced=synced, revision=revision)
        present = []
        for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.name.endswith(SUFFIXES):
                continue
            if not entry.is_file():
                continue
            present.append(entry.name)
        for name in list(self._files):
            if name not in present:
                del self._files[name]
                self.errors.pop(name, None)
        for name in present:
            known = self._files.get(name)
            signature = b""
            try:
                data = (self.directory / name).read_bytes()
                signature = hashlib.sha256(data).digest()
                if known is not None and known.signature == signature:
                    continue
                objects = self._parse_file(self.directory / name, data)
            except (ManifestError, OSError, UnicodeDecodeError, yaml.YAMLError,
                    json.JSONDecodeError) as e:
                message = f"{self.directory / name}: {_describe_error(e)}"
                if self.errors.get(name) != message:
                    log.error("manifest rejected, keeping its last good content: %s", message,
                              extra={"file": str(self.directory / name)})
                self.errors[name] = message
                batch.errors.append(message)
                if known is not None:
                    known.signature = signature  # don't re-read until it changes again
                else:
                    self._files[name] = _File(signature, {})
                continue
            self.errors.pop(name, None)
            self._files[name] = _File(signature, objects)

        view: dict[ObjectKey, KubeObject] = {}
        owner: dict[ObjectKey, str] = {}
        for name in sorted(self._files):
            for key, obj in self._files[name].objects.items():
                if key in view:
                    message = (
                        f"{key} is defined in both {owner[key]} and {name}; using {owner[key]}"
                    )
                    batch.errors.append(message)
                    log.warning(message)
                    continue
                view[key] = obj
                owner[key] = name
        for key, obj in view.items():
            if self._view.get(key) != obj:
                batch.events.append(Event(key, obj))
        batch.events.extend(Event(key, None) for key in self._view if key not in view)
        self._view = view
        self.revision = revision
        return batch

    def _read_revision(self) -> str | None:
        try:
            return (self.directory / REVISION_FILE).read_text().strip()
        except FileNotFoundError:
            return None

    def _parse_file(self, path: Path, data: bytes) -> dict[ObjectKey, KubeObject]:
        text = data.decode("utf-8")
        docs = [json.loads(text)] if path.suffix == ".json" else list(yaml.safe_load_all(text))
        objects: dict[ObjectKey, KubeObject] = {}
        for raw in _flatten(docs, path):
            key = object_key(raw, str(path))
            if key.kind not in KINDS:
                continue
            if key in objects:
                raise ManifestError(f"{path}: {key} appears twice")
            objects[key] = parse(raw, str(path))
        return objects


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
