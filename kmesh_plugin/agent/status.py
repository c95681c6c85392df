"""The agent's status file: JSON, replaced atomically after every reconcile.

`kmesh-plugin status` reads it, and so does the lab: an agent's ``source_revision`` tells which
manifest revision its maps reflect.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class StatusFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, status: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(status, f, indent=1, sort_keys=True, default=str)
            os.replace(tmp, self.path)  # readers see the old file or the new one, never half
        except BaseException:
            os.unlink(tmp)
            raise

    def read(self) -> dict[str, Any]:
        with open(self.path) as f:
            return json.load(f)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
