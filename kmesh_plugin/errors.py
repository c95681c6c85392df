"""Exceptions shared by every layer.

Every error names its culprit (a file and key, a Kubernetes object, a pinned path) so that an
operator can act on the message alone. Errors from the kernel keep their errno.
"""

from __future__ import annotations

import errno as errno_mod
import os


class KmeshError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(KmeshError):
    """plugin.toml (or another config file) is invalid; nothing was changed."""

    def __init__(self, path: str | os.PathLike[str], key: str | None, message: str) -> None:
        self.path = str(path)
        self.key = key
        self.message = message
        where = f"{self.path}: {key}" if key else self.path
        super().__init__(f"{where}: {message}")


# Kernel-internal error numbers that bpf(2) lets through but libc has no name for.
_KERNEL_ERRNOS = {524: ("ENOTSUPP", "operation not supported by this map or kernel")}


class BpfError(KmeshError, OSError):
    """A bpf(2) command failed. ``errno`` is the kernel's error number."""

    def __init__(self, err: int, operation: str, target: str = "") -> None:
        self.operation = operation
        self.target = target
        name = errno_mod.errorcode.get(err) or _KERNEL_ERRNOS.get(err, (str(err), ""))[0]
        reason = _KERNEL_ERRNOS[err][1] if err in _KERNEL_ERRNOS else os.strerror(err)
        text = f"bpf({operation}) failed: {name} ({reason})"
        if target:
            text += f" [{target}]"
        OSError.__init__(self, err, text)

    def __str__(self) -> str:
        return self.strerror or ""


class BpftoolError(KmeshError):
    """bpftool exited non-zero; ``message`` is bpftool's own error text."""

    def __init__(self, argv: list[str], returncode: int, message: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.message = message
        super().__init__(f"bpftool {' '.join(argv)}: exit {returncode}: {message}")


class DatapathError(KmeshError):
    """The datapath cannot be set up or updated as asked (capacity, layout mismatch, ...)."""


class ManifestError(KmeshError):
    """A Kubernetes manifest is malformed; the message names the file and object."""
