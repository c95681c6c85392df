"""bpftool, run as a subprocess: loads objects and serves diagnostics.

Arguments always go as a list (never through a shell) and always with ``-j``: bpftool 7.1 then
prints ``null`` on success and ``{"error": "..."}`` on failure (exit 255, or 254 for a missing
key), which becomes a ``BpftoolError`` carrying bpftool's own text.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kmesh_plugin.errors import BpftoolError


class Bpftool:
    def __init__(self, binary: str = "bpftool") -> None:
        self.binary = binary

    def run(self, *args: str | Path) -> Any:
        """Run ``bpftool -j ARGS`` and return the decoded JSON (None for bpftool's ``null``)."""
        argv = [str(a) for a in args]
        path = shutil.which(self.binary)
        if path is None:
            raise BpftoolError(argv, 127, f"{self.binary} not found on PATH (apt install bpftool)")
        proc = subprocess.run(
            [path, "-j", *argv], capture_output=True, text=True, check=False
        )
        payload = _decode(proc.stdout)
        if proc.returncode != 0 or (isinstance(payload, dict) and "error" in payload):
            message = (
                str(payload["error"]) if isinstance(payload, dict) and "error" in payload
                else proc.stdout.strip() or "no output"
            )
            # libbpf explains on stderr (the verifier log, the errno of a failed syscall).
            detail = proc.stderr.strip()
            if detail:
                message += "\n" + "\n".join(detail.splitlines()[-30:])
            raise BpftoolError(argv, proc.returncode, message)
        return payload

    def version(self) -> str:
        info = self.run("version")
        return str(info.get("version", "")) if isinstance(info, dict) else ""

    def prog_loadall(
        self,
        obj: Path,
        prog_dir: Path,
        *,
        reuse_maps: Mapping[str, Path] | None = None,
        pin_maps_dir: Path | None = None,
    ) -> None:
        """Load every program of ``obj`` and pin them under ``prog_dir``.

        ``reuse_maps`` binds map names to already pinned maps (a restart keeps its state);
        ``pin_maps_dir`` pins the maps the load created. No ``type`` argument: it would force
        every program in the object to one type.
        """
        args: list[str | Path] = ["prog", "loadall", obj, prog_dir]
        for name, pinned in sorted((reuse_maps or {}).items()):
            args += ["map", "name", name, "pinned", pinned]
        if pin_maps_dir is not None:
            args += ["pinmaps", pin_maps_dir]
        self.run(*args)

    def prog_show(self, pinned: Path) -> dict[str, Any]:
        return self.run("prog", "show", "pinned", pinned)

    def map_show(self, pinned: Path) -> dict[str, Any]:
        return self.run("map", "show", "pinned", pinned)

    def map_dump(self, pinned: Path) -> list[dict[str, Any]]:
        """Every entry; with BTF each carries a ``formatted`` view of key and value."""
        return self.run("map", "dump", "pinned", pinned) or []

    def btf_dump_object(self, obj: Path) -> dict[str, Any]:
        return self.run("btf", "dump", "file", obj, "format", "raw")

    def link_show(self, pinned: Path) -> dict[str, Any]:
        return self.run("link", "show", "pinned", pinned)

    def cgroup_show(self, cgroup: Path) -> list[dict[str, Any]]:
        return self.run("cgroup", "show", cgroup) or []


def _decode(stdout: str) -> Any:
    text = stdout.strip()
    if not text:
        return None  # `cgroup show` of an empty cgroup prints a bare newline
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"error": text}
